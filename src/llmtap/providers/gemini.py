"""Google Gemini API wire format (`generateContent`, `streamGenerateContent?alt=sse`,
`countTokens`, `embedContent`, `batchEmbedContents`). Runs off the latency path: Gemini needs no
request rewrite, every stream chunk carries the usage so far.

Token convention (the record's, see `llmtap.pricing`), from `usageMetadata`:

    prompt_tokens      = promptTokenCount + toolUsePromptTokenCount   (cache reads included)
    cached_tokens      = cachedContentTokenCount
    completion_tokens  = candidatesTokenCount + thoughtsTokenCount
    reasoning_tokens   = thoughtsTokenCount                             (billed as output)
    total_tokens       = totalTokenCount
    input/output_audio_tokens, output_image_tokens = the AUDIO / IMAGE entries of
                         promptTokensDetails / candidatesTokensDetails  (priced apart)

Its OpenAI-compatible endpoint (`/v1beta/openai/...`) answers in OpenAI's wire format, which
`GeminiOpenAI` reads (`Provider.wire`), at Google's prices.

`countTokens` costs nothing and consumes nothing: its answer is not usage (source "missing").
The API key travels as `x-goog-api-key` or `?key=`: both are credentials the record never keeps
(`llmtap.gateway.headers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson

from llmtap.providers.base import Provider, response_model
from llmtap.providers.common import after_last_reply, error_message, loads, role_is, scrub_stream, token_count
from llmtap.providers.openai import OpenAI
from llmtap.providers.sse import StreamResult, edge_events, iter_events
from llmtap.record import Usage

if TYPE_CHECKING:
    from llmtap.config import Settings

__all__ = ["Gemini", "model_from_path", "parse_usage", "reassemble_stream", "usage_from_body"]


def parse_usage(u: Any) -> Usage:
    """A Gemini `usageMetadata` object as a `Usage` (mapping in the module docstring)."""
    if not isinstance(u, dict):
        return Usage()
    prompt = token_count(u.get("promptTokenCount"))
    candidates = token_count(u.get("candidatesTokenCount"))
    thoughts = token_count(u.get("thoughtsTokenCount"))
    tool_prompt = token_count(u.get("toolUsePromptTokenCount"))
    total = token_count(u.get("totalTokenCount"))
    if prompt is None and candidates is None and total is None:
        return Usage()
    if prompt is not None and tool_prompt:
        prompt += tool_prompt
    # Gemini leaves out zero counts: a reply of only thoughts, or a blocked prompt, has no
    # candidatesTokenCount. With a prompt count present, absent output counts are zero.
    completion = (candidates or 0) + (thoughts or 0) if prompt is not None else None
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return Usage(
        source="provider",
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_tokens=token_count(u.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
        input_audio_tokens=_modality(u.get("promptTokensDetails"), "AUDIO"),
        output_audio_tokens=_modality(u.get("candidatesTokensDetails"), "AUDIO"),
        output_image_tokens=_modality(u.get("candidatesTokensDetails"), "IMAGE"),
    )


def _modality(details: Any, modality: str) -> int | None:
    """The count of one modality in a `ModalityTokenCount` list (None when absent or 0)."""
    total = 0
    for d in details if isinstance(details, list) else ():
        if isinstance(d, dict) and d.get("modality") == modality:
            total += token_count(d.get("tokenCount")) or 0
    return total or None


def with_grounding(usage: Usage, response: Any) -> Usage:
    """The usage with the Google Search grounding the answer was billed for
    (`groundingMetadata.webSearchQueries`): Gemini 3 bills each search query, earlier models
    each grounded prompt (the price table's `web_searches` unit for both; free daily or monthly
    quotas are not known here, so it is the paid price)."""
    queries, grounded = 0, False
    cands = response.get("candidates") if isinstance(response, dict) else None
    for c in cands if isinstance(cands, list) else ():
        meta = c.get("groundingMetadata") if isinstance(c, dict) else None
        asked = meta.get("webSearchQueries") if isinstance(meta, dict) else None
        if isinstance(asked, list) and asked:
            grounded = True
            queries += len(asked)
    if grounded and usage.source == "provider":
        # `gemini-2.5-flash`, `models/gemini-2.0-flash-001`, `publishers/google/models/...`
        version = response.get("modelVersion") if isinstance(response, dict) else None
        named = version.lower() if isinstance(version, str) else ""
        per_prompt = "gemini-1" in named or "gemini-2" in named
        usage.web_search_requests = 1 if per_prompt else queries
    return usage


def usage_from_body(body: Any) -> Usage:
    if isinstance(body, list):
        # `streamGenerateContent` without `alt=sse` answers one JSON array of the chunks; the
        # usage is the last chunk's, the search queries every chunk's (rev17: they come in the
        # first, the usage in the last: the searches were lost).
        chunks = [c for c in body if isinstance(c, dict)]
        last = next((c for c in reversed(chunks) if "usageMetadata" in c), None)
        if last is None:
            return Usage()
        return with_grounding(parse_usage(last.get("usageMetadata")), _grounded(chunks))
    if isinstance(body, dict):
        return with_grounding(parse_usage(body.get("usageMetadata")), body)
    return Usage()


def _grounded(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Stream chunks as one response as far as `with_grounding` reads it: each candidate's
    grounding merged over the chunks (`_merge_grounding`), the last model version."""
    candidates: dict[Any, dict[str, Any]] = {}
    queries: dict[Any, tuple[list[Any], set[Any]]] = {}
    version = None
    for chunk in chunks:
        version = chunk.get("modelVersion", version)
        cands = chunk.get("candidates")
        for i, c in enumerate(cands if isinstance(cands, list) else ()):
            if isinstance(c, dict) and "groundingMetadata" in c:
                index = c.get("index", i)
                key = index if isinstance(index, int) else i
                asked, seen = queries.setdefault(key, ([], set()))
                _merge_grounding(candidates.setdefault(key, {}), c["groundingMetadata"], asked, seen)
    return {"candidates": list(candidates.values()), "modelVersion": version}


def model_from_path(path: str) -> str | None:
    """`/v1beta/models/gemini-2.5-flash:generateContent` → `gemini-2.5-flash`."""
    i = path.find("models/")
    if i < 0:
        return None
    name = path[i + 7 :]
    if "%" in name:  # `gemini-2.5-flash%3AgenerateContent` is the same call to the upstream
        name = unquote(name)
    colon = name.find(":")
    name = name if colon < 0 else name[:colon]
    return name or None


def _merge_part(parts: list[dict[str, Any]], part: dict[str, Any], run: list[str]) -> None:
    """Append a streamed part, joining text onto the previous text part of the same kind
    (answer text with answer text, thought text with thought text) like the SDK's own
    accumulation does; not a part that carries a `thoughtSignature` (it signs that text).

    The joined text's pieces wait in `run` (the last part's), joined once by `_flush`: a `+=`
    per chunk copied the text so far each time (4 MB of 60-char chunks: 21 s)."""
    text = part.get("text")
    if isinstance(text, str) and parts:
        last = parts[-1]
        if (
            isinstance(last.get("text"), str)
            and bool(last.get("thought")) == bool(part.get("thought"))
            and set(last) <= {"text", "thought"}
            and set(part) <= {"text", "thought"}
        ):
            if not run:
                run.append(last["text"])
            run.append(text)
            return
    _flush(parts, run)
    parts.append(dict(part))


def _flush(parts: list[dict[str, Any]], run: list[str]) -> None:
    """The last part's text joined from its pieces (`_merge_part`)."""
    if run:
        parts[-1]["text"] = "".join(run)
        run.clear()


def _query_key(q: Any) -> Any:
    """A search query as a set member: itself, or its JSON (keys sorted: dicts compare so) for
    one that is no key; one that has no JSON is its own."""
    if isinstance(q, (str, int, float)) or q is None:
        return q
    try:
        return orjson.dumps(q, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return ("unique", id(q))


def _merge_grounding(candidate: dict[str, Any], meta: Any, asked: list[Any], seen: set[Any]) -> None:
    """A chunk's `groundingMetadata` onto the candidate's: later members win, but the search
    queries of every chunk are kept (an earlier chunk's were lost to a later one's supports).

    `asked` is the candidate's queries and `seen` their keys: a look-up in the list and a copy
    of it per chunk were quadratic (2 chunks of 30,000 queries, 0.5 MB: 27 s)."""
    before = candidate.get("groundingMetadata")
    if not isinstance(meta, dict) or not isinstance(before, dict):
        # the first (or one after an odd one): kept as it came, its repeats too, as a
        # non-streamed answer's are (rev31: 5c95511 made one of two equal queries, and the
        # stream billed one search less)
        asked.clear()
        seen.clear()
        candidate["groundingMetadata"] = meta
        first = meta.get("webSearchQueries") if isinstance(meta, dict) else None
        if isinstance(first, list):
            asked.extend(first)
            seen.update(map(_query_key, first))
        return
    merged = {**before, **meta}
    later = meta.get("webSearchQueries")
    for q in later if isinstance(later, list) else ():
        key = _query_key(q)
        if key not in seen:
            seen.add(key)
            asked.append(q)
    if asked:
        merged["webSearchQueries"] = asked
    candidate["groundingMetadata"] = merged


def reassemble_stream(raw: bytes) -> StreamResult | None:
    """`_reassemble`, its text scrubbed: events are read keeping lone surrogates, so an emoji
    split over two deltas is whole again once they are joined (`common.loads`)."""
    return scrub_stream(_reassemble(raw), raw)


def _reassemble(raw: bytes) -> StreamResult | None:
    """Rebuild the `GenerateContentResponse` a `streamGenerateContent?alt=sse` stream stands for.

    Each event is a partial response: parts are appended per candidate (text joined), the last
    `finishReason`, `safetyRatings`, `citationMetadata` and `usageMetadata` win. The stream is
    complete once a candidate has its `finishReason` (Gemini sends no other end marker).
    """
    head: dict[str, Any] = {}
    candidates: dict[int, dict[str, Any]] = {}
    runs: dict[int, list[str]] = {}  # per candidate, its last part's text pieces (`_merge_part`)
    queries: dict[int, tuple[list[Any], set[Any]]] = {}  # its search queries (`_merge_grounding`)
    usage: Any = None
    error: str | None = None
    seen = complete = False
    for _, data in iter_events(raw):
        try:
            obj = loads(data, keep_surrogates=True)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        seen = True
        if "error" in obj:
            error = error_message(obj)
            continue
        for key in ("modelVersion", "responseId", "createTime", "promptFeedback"):
            if key in obj:
                head[key] = obj[key]
        if isinstance(obj.get("usageMetadata"), dict):
            usage = obj["usageMetadata"]
        cands = obj.get("candidates")
        for c in cands if isinstance(cands, list) else ():
            if not isinstance(c, dict):
                continue
            idx = c.get("index", 0)
            idx = idx if isinstance(idx, int) else 0
            out = candidates.setdefault(idx, {})
            content = c.get("content")
            if isinstance(content, dict):
                acc = out.setdefault("content", {"parts": [], "role": content.get("role", "model")})
                parts = content.get("parts")
                run = runs.setdefault(idx, [])
                for p in parts if isinstance(parts, list) else ():
                    if isinstance(p, dict):
                        _merge_part(acc["parts"], p, run)
            for key, value in c.items():
                if key == "groundingMetadata":
                    _merge_grounding(out, value, *queries.setdefault(idx, ([], set())))
                elif key != "content":
                    out[key] = value
            if c.get("finishReason"):
                complete = True
    if not seen:
        return None
    for idx, run in runs.items():
        _flush(candidates[idx]["content"]["parts"], run)
    message: dict[str, Any] = {"candidates": [candidates[i] for i in sorted(candidates)]}
    if usage is not None:
        message["usageMetadata"] = usage
    message.update(head)
    model = head.get("modelVersion")
    return StreamResult(
        message,
        with_grounding(parse_usage(usage), message),
        model if isinstance(model, str) else None,
        error,
        complete,
    )


def stream_summary(raw: bytes) -> StreamResult | None:
    """A stream's usage and model version from its last chunk, when that chunk finishes a
    candidate and carries `usageMetadata`; None otherwise (the gateway then reassembles it). The
    worker reassembles the message later and has the last word on usage and errors."""
    ends = edge_events(raw, 1)
    if ends is None:
        return None
    try:
        last = loads(ends[1][0][1])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(last, dict) or "error" in last or not isinstance(last.get("usageMetadata"), dict):
        return None
    cands = last.get("candidates")
    if not isinstance(cands, list) or not any(isinstance(c, dict) and c.get("finishReason") for c in cands):
        return None
    model = last.get("modelVersion")
    return StreamResult(
        None,
        with_grounding(parse_usage(last["usageMetadata"]), last),
        model if isinstance(model, str) else None,
        None,
        True,
    )


_MODEL = role_is("model")


def _thoughts_as_output(usage: Usage) -> Usage:
    """Output that counts the thoughts, as the record's convention does (`llmtap.pricing`).

    Gemini's OpenAI-compatible answers may leave the thoughts out of `completion_tokens` while
    `total_tokens` counts them (and bills them as output): what the total holds beyond the
    prompt and that output is the thinking."""
    prompt, out, total = usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
    if prompt is not None and out is not None and total is not None and total > prompt + out:
        hidden = total - prompt - out
        usage.completion_tokens = out + hidden
        usage.reasoning_tokens = (usage.reasoning_tokens or 0) + hidden
    return usage


def _thoughts_in(result: StreamResult | None) -> StreamResult | None:
    if result is not None:
        _thoughts_as_output(result.usage)
    return result


class GeminiOpenAI(OpenAI):
    """Gemini's OpenAI-compatible endpoint (`/v1beta/openai/chat/completions`, `/embeddings`):
    OpenAI's wire, the model named in the body, Google's prices."""

    name = "gemini"
    pricing_id: str | None = "google"

    def base_url(self, settings: Settings) -> str | None:
        return settings.gemini_base_url

    def usage_from_body(self, body: Any) -> Usage:
        return _thoughts_as_output(super().usage_from_body(body))

    def reassemble_stream(self, raw: bytes) -> StreamResult | None:
        return _thoughts_in(super().reassemble_stream(raw))

    def stream_summary(self, raw: bytes) -> StreamResult | None:
        return _thoughts_in(super().stream_summary(raw))

    def model(self, path: str, request: Any, response: Any) -> str | None:
        # The SDK's `models/gemini-2.5-flash` is the same model as `gemini-2.5-flash`.
        model = super().model(path, request, response)
        return (model[7:] or None) if model is not None and model.startswith("models/") else model


#: Where Gemini answers in OpenAI's format: `/v1beta/openai/...` (any API version).
_OPENAI_COMPATIBLE = "/openai/"


class Gemini(Provider):
    """`/gemini/...` → `LLMTAP_GEMINI_BASE_URL` (the Gemini Developer API)."""

    name = "gemini"
    pricing_id: str | None = "google"

    def __init__(self, stream_usage: bool = True) -> None:
        self.compatible = GeminiOpenAI(stream_usage)

    def base_url(self, settings: Settings) -> str | None:
        return settings.gemini_base_url

    def wire(self, path: str) -> Provider:
        return self.compatible if _OPENAI_COMPATIBLE in path else self

    usage_member = "usageMetadata"
    #: The Files API's resumable upload answers where to send the file: the upstream's URL,
    #: which took the bytes round the gateway.
    relocated_headers = frozenset({"location", "x-goog-upload-url"})

    def usage_from_body(self, body: Any) -> Usage:
        return usage_from_body(body)

    def reassemble_stream(self, raw: bytes) -> StreamResult | None:
        return reassemble_stream(raw)

    def stream_summary(self, raw: bytes) -> StreamResult | None:
        return stream_summary(raw)

    def turn(self, request: Any) -> Any:
        """The `contents` after the last `model` one (`systemInstruction`, `tools` are resent)."""
        return after_last_reply(request, "contents", _MODEL)

    def model(self, path: str, request: Any, response: Any) -> str | None:
        """The model named in the URL (the body names none), else the response's `modelVersion`."""
        return model_from_path(path) or response_model(response, "modelVersion")
