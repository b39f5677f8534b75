"""The fake upstream's Gemini API (`/v1beta/models/{model}:{method}`), in Gemini's wire format.

Shapes follow the `google-genai` SDK's types (`GenerateContentResponse`, `UsageMetadata`,
`CountTokensResponse`, `EmbedContentResponse`) in their JSON (camelCase) spelling, which is what
the API sends. Replies are deterministic like the rest of the fake: text is ``"echo: " + <last
user text>``, token counts are word counts (see :func:`gemini_usage`).

Knobs beyond the shared ones (``x-fake-status``, ``x-fake-cut-after``, ``x-fake-chunks``,
``x-fake-cached-tokens``): ``x-fake-tool-use-prompt-tokens: N`` reports N
``toolUsePromptTokenCount``. Thinking: a ``generationConfig.thinkingConfig`` with a budget other
than 0 reports ``THOUGHTS_TOKENS`` ``thoughtsTokenCount`` (and a thought part when
``includeThoughts``). A request with ``tools`` is answered with a ``functionCall`` part.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from llmtap.testing import fake_upstream as fu

__all__ = ["THOUGHTS_TOKENS", "add_routes", "gemini_usage"]

THOUGHTS_TOKENS: Final = 48
_SSE_SEP: Final = b"\r\n\r\n"  # the Gemini API ends SSE events with CRLF CRLF

_STATUS_NAMES: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _error(status: int, message: str | None = None) -> web.Response:
    name = _STATUS_NAMES.get(status, "UNKNOWN")
    body = {
        "error": {
            "code": status,
            "message": message or f"Forced error {status} (x-fake-status).",
            "status": name,
        }
    }
    return web.Response(status=status, body=fu._pretty(body), headers=dict(fu._JSON_HEADERS))


def _get(obj: Any, camel: str, snake: str) -> Any:
    """A field by either spelling: the API takes proto JSON, where both are valid (the SDK
    sends `generationConfig.thinkingConfig` in snake_case on v1)."""
    if not isinstance(obj, dict):
        return None
    return obj[camel] if camel in obj else obj.get(snake)


def _parts_text(content: Any) -> str:
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    out: list[str] = []
    for p in parts if isinstance(parts, list) else ():
        if isinstance(p, dict):
            if isinstance(p.get("text"), str):
                out.append(p["text"])
            fr = _get(p, "functionResponse", "function_response")
            if isinstance(fr, dict):
                out.append(fu._ENC.encode(fr.get("response")).decode())
    return " ".join(out)


class _Plan:
    __slots__ = (
        "cached",
        "prompt",
        "text",
        "thought_part",
        "thoughts",
        "tool",
        "tool_args",
        "tool_use",
        "words",
    )

    def __init__(self, req: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        contents = req.get("contents")
        msgs = [c for c in contents if isinstance(c, dict)] if isinstance(contents, list) else []
        words = fu._count_words(_parts_text(_get(req, "systemInstruction", "system_instruction")))
        words += sum(fu._count_words(_parts_text(c)) for c in msgs)
        self.cached = max(0, fu._int_header(headers, "x-fake-cached-tokens") or 0)
        self.tool_use = max(0, fu._int_header(headers, "x-fake-tool-use-prompt-tokens") or 0)
        # promptTokenCount includes the cached part, like the real API.
        self.prompt = fu.PROMPT_OVERHEAD + words + self.cached
        user = ""
        for c in reversed(msgs):
            if c.get("role", "user") == "user":
                user = _parts_text(c)
                break
        last = fu._ENC.encode(msgs[-1]).decode() if msgs else ""
        last_is_result = "functionResponse" in last or "function_response" in last
        tools = req.get("tools")
        self.tool: str | None = None
        self.tool_args: dict[str, Any] = {}
        if isinstance(tools, list) and tools and not last_is_result:
            for t in tools:
                decls = _get(t, "functionDeclarations", "function_declarations")
                if isinstance(decls, list) and decls and isinstance(decls[0], dict):
                    self.tool = str(decls[0].get("name") or "tool")
                    self.tool_args = {"text": user}
                    break
        if last_is_result:
            source = ["tool", "result:", *_parts_text(msgs[-1]).split()]
        else:
            source = ["echo:", *user.split()]
        n = fu._int_header(headers, "x-fake-chunks")
        if n is not None:
            source = [w for w, _ in zip(itertools.cycle(source), range(max(n, 0)), strict=False)]
        self.words = source
        thinking = _get(
            _get(req, "generationConfig", "generation_config"), "thinkingConfig", "thinking_config"
        )
        budget = _get(thinking, "thinkingBudget", "thinking_budget")
        self.thoughts = THOUGHTS_TOKENS if isinstance(thinking, dict) and budget != 0 else 0
        self.thought_part = self.thoughts > 0 and bool(_get(thinking, "includeThoughts", "include_thoughts"))
        self.text = " ".join(self.words)

    @property
    def output(self) -> int:
        if self.tool is not None:
            return fu._count_words(fu._ENC.encode(self.tool_args).decode()) + fu.TOOL_CALL_OVERHEAD
        return len(self.words)

    def usage(self, final: bool = True) -> dict[str, Any]:
        """`usageMetadata`: the final counts, or (`final=False`) what a stream's earlier chunks
        say before any candidate token is counted."""
        prompt = self.prompt
        u: dict[str, Any] = {"promptTokenCount": prompt}
        out = self.output if final else 0
        if final:
            u["candidatesTokenCount"] = out
        total = prompt + out + self.thoughts + self.tool_use
        u["totalTokenCount"] = total
        if self.cached:
            u["cachedContentTokenCount"] = self.cached
        if self.tool_use:
            u["toolUsePromptTokenCount"] = self.tool_use
        if self.thoughts:
            u["thoughtsTokenCount"] = self.thoughts
        u["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
        if self.cached:
            u["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": self.cached}]
        return u


def gemini_usage(request_json: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The exact `usageMetadata` the fake sends for this request (the last stream chunk's too)."""
    return _Plan(request_json, fu._lower_headers(headers)).usage()


def _gate(request: web.Request) -> web.Response | None:
    if not (request.headers.get("x-goog-api-key") or request.query.get("key")):
        return _error(
            403,
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API.",
        )
    forced = fu._int_header(request.headers, "x-fake-status")
    if forced is not None and forced >= 400:
        return _error(forced)
    return None


async def _parse(request: web.Request, body: bytes) -> dict[str, Any] | web.Response:
    try:
        req = fu._decode_json(body, request.headers)
    except ValueError:
        return _error(400, "Invalid JSON payload received.")
    if not isinstance(req, dict):
        return _error(400, "Invalid JSON payload received. Expected an object.")
    return req


def _response(
    plan: _Plan, model: str, rid: str, parts: list[dict[str, Any]], finish: bool, final: bool
) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if finish:
        cand["finishReason"] = "STOP"
    cand["index"] = 0
    return {
        "candidates": [cand],
        "usageMetadata": plan.usage(final),
        "modelVersion": model,
        "responseId": rid,
    }


def _parts(plan: _Plan) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if plan.thought_part:
        parts.append({"text": "**Thinking** about the reply", "thought": True})
    if plan.tool is not None:
        parts.append({"functionCall": {"name": plan.tool, "args": plan.tool_args}})
    else:
        parts.append({"text": plan.text})
    return parts


async def models(request: web.Request) -> web.StreamResponse:
    """`POST /{version}/models/{model}:{method}`."""
    body, _ = await fu._receive(request)
    spec = request.match_info["spec"]
    model, _, method = spec.partition(":")
    early = _gate(request)
    if early is not None:
        return early
    req = await _parse(request, body)
    if isinstance(req, web.Response):
        return req
    headers = {**fu._JSON_HEADERS}
    fu._echo_headers(request, body, headers)
    plan = _Plan(req, request.headers)
    rid = fu._new_id("resp")
    if method == "generateContent":
        reply = _response(plan, model, rid, _parts(plan), True, True)
        return await fu._send_json(request, 200, fu._pretty(reply), headers)
    if method == "streamGenerateContent":
        if request.query.get("alt") != "sse":
            return _error(400, "this fake serves streamGenerateContent with ?alt=sse only")
        headers.update({"Content-Type": "text/event-stream", "Content-Disposition": "attachment"})
        events: list[dict[str, Any]] = []
        if plan.thought_part:
            part = {"text": "**Thinking** about the reply", "thought": True}
            events.append(_response(plan, model, rid, [part], False, False))
        if plan.tool is not None:
            call = {"functionCall": {"name": plan.tool, "args": plan.tool_args}}
            events.append(_response(plan, model, rid, [call], True, True))
        else:
            words = plan.words or [""]
            for i, w in enumerate(words):
                last = i == len(words) - 1
                text = w if i == 0 else " " + w
                events.append(_response(plan, model, rid, [{"text": text}], last, last))
        return await fu._write_events(
            request, headers, [b"data: " + fu._ENC.encode(e) + _SSE_SEP for e in events]
        )
    if method == "countTokens":
        contents = req.get("contents")
        inner = _get(req, "generateContentRequest", "generate_content_request")
        if contents is None and isinstance(inner, dict):
            plan = _Plan(inner, request.headers)
        out = {
            "totalTokens": plan.prompt,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": plan.prompt}],
        }
        return web.Response(body=fu._pretty(out), headers=headers)
    if method == "embedContent":
        text = _parts_text(req.get("content"))
        dims = _get(req, "outputDimensionality", "output_dimensionality")
        values, _ = fu._embedding(text, dims if isinstance(dims, int) and 0 < dims <= 3072 else 8)
        return web.Response(body=fu._pretty({"embedding": {"values": values}}), headers=headers)
    if method == "batchEmbedContents":  # what the SDK's embed_content calls on the Gemini API
        reqs = req.get("requests")
        out_list = []
        for item in reqs if isinstance(reqs, list) else ():
            values, _ = fu._embedding(_parts_text(_get(item, "content", "content")), 8)
            out_list.append({"values": values})
        return web.Response(body=fu._pretty({"embeddings": out_list}), headers=headers)
    return _error(404, f"Method {method!r} is not found for model {model!r}.")


async def upload_file(request: web.Request) -> web.Response:
    """The Files API's resumable upload (`client.files.upload`): `start` answers the URL to send
    the bytes to (this server's own, absolute, as Google's), `upload, finalize` takes them."""
    command = request.headers.get("X-Goog-Upload-Command", "")
    body = await request.read()
    if "start" in command:
        url = f"{request.url.origin()}{request.path}?upload_id=fake-upload-1&upload_protocol=resumable"
        return web.Response(headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})
    if request.query.get("upload_id") != "fake-upload-1":
        return _error(400, "Unknown upload id.")
    done = "finalize" in command
    file = {
        "name": "files/fake-file-1",
        "mimeType": "application/octet-stream",
        "sizeBytes": str(len(body)),
        "uri": f"{request.url.origin()}/v1beta/files/fake-file-1",
        "state": "ACTIVE",
    }
    return web.Response(
        body=fu._pretty({"file": file}) if done else b"",
        content_type="application/json",
        headers={"X-Goog-Upload-Status": "final" if done else "active"},
    )


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the Gemini routes (before the fake's catch-all), its OpenAI-compatible
    endpoint too (`/v1beta/openai/...`: OpenAI's wire, served as the OpenAI fake serves it)."""
    from llmtap.testing import fake_openai

    router.add_post("/{version}/models/{spec}", models)
    router.add_post("/upload/{version}/files", upload_file)
    router.add_post("/{version}/openai/chat/completions", fake_openai.openai_chat_completions)
    router.add_post("/{version}/openai/embeddings", fake_openai.openai_embeddings)
