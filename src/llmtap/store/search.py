"""The searchable text of a request: what `q=` matches, indexed when the row is stored.

Bodies live in the body store, not in the database, so their text is extracted once, when the
record is written (the worker has the bytes then), and kept beside the row: a FTS5 trigram
index on SQLite, a `pg_trgm` GIN index on PostgreSQL. Both match substrings of any language.

What is indexed, per record: the string values of the request and response JSON bodies (keys
and punctuation left out, `\\u` escapes decoded, so "日本" matches however the client encoded
it); for streams, the response the gateway reassembled from the events (its text is the deltas
joined as the client saw them), or the deltas from the raw events when nothing could be
reassembled; a body that is not JSON as text; of a multipart form its text fields. Encoded
media is left out: audio, image and other binary bodies, uploaded files, and JSON strings that
are base64 data (an image in a message, `b64_json`). At most `SEARCH_BYTES` (32 KiB of UTF-8) per
record: when the request and the response are both long, each keeps 16 KiB, so the answer stays
searchable however long the conversation resent with it; a request cut keeps its start (the
system prompt) and its end (the latest message), the response its start.

`SCOPE_TURN` (setting `search_scope`) indexes of a request only what it adds to its conversation
(the provider's `turn`): chat clients resend every earlier message with each turn, so indexing
whole requests costs a conversation the square of its length, and each text is then found in
every later request of it; by turn, each text is found where it entered the conversation.
Text is case-folded (Python's `casefold`) at index and query time alike, which makes the
search case-insensitive in every script the same way on both stores.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import orjson
import zstandard

from llmtap.providers import provider_for
from llmtap.providers.common import loads
from llmtap.providers.forms import form_boundary, form_parts
from llmtap.record import Body, LogRecord, declared_charset, decompress
from llmtap.store.sql import clean

#: Bytes of UTF-8 text indexed per record, by default (setting `search_bytes`).
SEARCH_BYTES = 32 * 1024
#: What of a request is indexed (setting `search_scope`): all of it, or the turn it adds.
Scope = Literal["request", "turn"]
SCOPE_REQUEST: Scope = "request"
SCOPE_TURN: Scope = "turn"
#: Bytes of a decompressed body read to extract the text (a longer body is read up to here).
_READ_BYTES = 4 * 1024 * 1024


def _decode(body: Body, raw: bytes) -> bytes:
    if body.encoding == "zstd":
        try:
            return decompress(raw, _READ_BYTES)
        except zstandard.ZstdError:
            return b""
    return raw[:_READ_BYTES]


#: Encoded media in JSON: base64 image, audio or document data. Where its place says it is
#: (`_media`: Anthropic's base64 `source.data`, Gemini's `inline_data.data`, OpenAI's
#: `input_audio.data`, an audio answer's `data`, `b64_json`, an image generation's `result`)
#: a string of base64's letters this long is media whatever its letters (rev17: silent or
#: quiet audio uses few of them). Elsewhere it must be longer and look random (`_random`): a
#: password or a list of identifiers a few hundred letters long is text, and so is what a
#: key of the same name holds in another place (rev18b: Gemini's function `result`, an
#: Anthropic text document's `data`).
_BLOB_MIN = 200
_LOOSE_MIN = 1024
#: Keys whose string is base64 wherever it is (their names say so).
_ALWAYS_MEDIA = frozenset(
    {"b64_json", "partial_image_b64", "bytesBase64Encoded", "embedding", "audio", "file_data"}
)
#: Every key `_media` may call media: a dict with none of them is walked at C speed.
_MEDIA_KEYS = _ALWAYS_MEDIA | {"data", "result"}
_BASE64 = re.compile(r"[A-Za-z0-9+/_\r\n-]+=*")  # MIME base64 wraps its lines
#: Content types whose bytes are no text: an audio answer decoded as text indexed 17 KB of
#: garbage, matched by random queries (media audit).
_BINARY = ("audio/", "image/", "video/", "application/octet-stream", "application/pdf", "application/zip")


def _media(holder: dict[str, Any], key: str) -> bool:
    """Whether `holder[key]` is media by its place (the dashboard's `mediaPlace` agrees)."""
    if key in _ALWAYS_MEDIA:
        return True
    if key == "result":  # the Responses API's image generation; a function's result is text
        return holder.get("type") == "image_generation_call"
    if key != "data":
        return False
    if "media_type" in holder:  # Anthropic's source: base64, or a text document's own text
        return holder.get("type") == "base64"
    # Gemini's inline_data (base64 whatever its type), OpenAI's input_audio, an audio answer
    return any(k in holder for k in ("mime_type", "mimeType", "format", "transcript", "expires_at"))


def _blob(s: str, keyed: bool = False) -> bool:
    """Encoded media, not prose: indexed, it matched random queries and took the record's
    whole text budget from the words around it (media audit). `keyed`: in a media place."""
    if " " in s:
        return False
    if s.startswith("data:"):
        return ";base64," in s[:200]
    if not keyed and len(s) < _LOOSE_MIN:
        return False
    return _BASE64.fullmatch(s) is not None and (keyed or _random(s))


def _random(s: str) -> bool:
    """Base64 of media uses most of its 64 letters in any 200 (~60 for random bytes); a path,
    an identifier, a DNA sequence or a hex digest uses few (rev15, rev16). Three places are
    looked at: audio that begins with silence begins with "AAAA"."""
    n = len(s)
    return any(len(set(s[i : i + 200])) >= 40 for i in (0, n // 2, max(0, n - 200)))


#: Runs of base64's letters in text that is not JSON any more (a body cut at the size limit),
#: JSON's escaped `\n` and `\/` inside them; each run matched once (no backtracking).
_BASE64_RUN = re.compile(r"(?:[A-Za-z0-9+/_-]|\\[nr/])+=*")
#: A `data:` URL's payload in prose (a Markdown image: rev17, 400 KB of an image's base64 was
#: indexed, each random fragment of it found the record), whatever its letters.
_DATA_URL_IN_TEXT = re.compile(r";base64,[A-Za-z0-9+/_-]{200,}=*")


def _without_blobs(text: str) -> str:
    return _BASE64_RUN.sub(lambda m: " " if len(m[0]) >= _BLOB_MIN and _random(m[0]) else m[0], text)


def _strings(v: Any) -> list[str]:
    """The string values of parsed JSON, in document order, encoded media left out (`_blob`);
    a loop, not recursion, so that any nesting depth orjson accepts is walked."""
    out: list[str] = []
    stack = [v]
    pop, extend, append = stack.pop, stack.extend, out.append
    keys = _MEDIA_KEYS
    while stack:
        x = pop()
        t = type(x)  # orjson makes exactly these types: no isinstance chain per value
        if t is str:
            if len(x) < _BLOB_MIN:
                append(x)
            elif " " in x:  # prose: a `data:` URL in it is left out (a cheap test first: a
                # regex over every long message cost a conversation's turn 50-75 us)
                append(_DATA_URL_IN_TEXT.sub(";base64, ", x) if ";" in x and ";base64," in x else x)
            elif not _blob(x):
                append(x)
        elif t is dict:
            if keys.isdisjoint(x):
                extend(reversed(x.values()))
            else:  # a string in a media place is left out here, by its own rule
                extend(
                    reversed(
                        [
                            val
                            for k, val in x.items()
                            if not (
                                k in keys
                                and type(val) is str
                                and len(val) >= _BLOB_MIN
                                and _media(x, k)
                                and _blob(val, True)
                            )
                        ]
                    )
                )
        elif t is list:
            extend(reversed(x))
    return out


def _deltas(event: Any) -> Iterator[str]:
    """Text pieces of one stream event (OpenAI chat/responses, Anthropic messages)."""
    if not isinstance(event, dict):
        return
    for choice in event.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            yield delta["content"]
    delta = event.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("text"), str):
        yield delta["text"]
    elif isinstance(delta, str):
        yield delta


def body_text(body: Body, raw: bytes, pick: Callable[[Any], Any] | None = None) -> str:
    """The text of a body; `pick` chooses the part of a JSON body to take it from."""
    data = _decode(body, raw)
    ctype = (body.content_type or "").lower()
    if "event-stream" in ctype or data.startswith((b"data:", b"event:")):
        pieces, other = [], []
        for line in data.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                event = loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            found = list(_deltas(event))
            pieces += found
            if not found:
                other.append("\n".join(_strings(event)))
        return "".join(pieces) + ("\n" + "\n".join(other) if other else "")
    if ctype.startswith(_BINARY):
        return ""
    if ctype.startswith("multipart/form-data"):
        return _form_text(data, body.content_type or "")
    try:
        obj = loads(data)
    except orjson.JSONDecodeError:
        # Not JSON (any more: a body over the size limit is cut): its text, without the base64
        # runs an image request holds (rev15: a 6 MB one indexed 4 MiB of it).
        return _without_blobs(_text(data, body.content_type))
    return "\n".join(_strings(obj if pick is None else pick(obj)))


def _text(data: bytes, content_type: str | None) -> str:
    """UTF-8, else the charset the body names (a Latin-1 answer indexed "caf\ufffd")."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(declared_charset(content_type) or "utf-8", "replace")


def _form_text(data: bytes, content_type: str) -> str:
    """The text fields of a multipart form (an image edit's `prompt`, a transcription's), not
    its files: an upload's bytes are no text. Parts read as the gateway reads them
    (`providers.forms`)."""
    boundary = form_boundary(content_type)
    if boundary is None:
        return ""
    out = []
    for name, is_file, value, _ in form_parts(data, boundary):  # a cut field's start is text too
        if name is None or is_file:
            continue
        text = _text(value, None)
        if text and not (len(text) >= _BLOB_MIN and _blob(text)):  # a file sent as a field
            out.append(text)
    return "\n".join(out)


def _text_or_none(body: Body, raw: bytes, pick: Callable[[Any], Any] | None = None) -> str | None:
    """Best effort: a body whose text cannot be extracted is stored unsearchable, never lost
    (the record must not become a poison message because of its search text)."""
    try:
        return body_text(body, raw, pick)
    except Exception:  # any failure here only costs the body its searchability
        return None


def fold(text: str) -> str:
    """The indexed form of text, and of a query: case-folded, storable on both stores."""
    return clean(text.casefold())


def record_text(
    record: LogRecord,
    raw: Sequence[tuple[Body, bytes]] | None = None,
    limit: int = SEARCH_BYTES,
    scope: Scope = SCOPE_REQUEST,
) -> str | None:
    """The searchable text of a record, from `raw` (body, stored bytes) pairs or, by default,
    from the bodies still inline in the record; at most `limit` bytes, of the whole request or
    of the turn it adds (the worker's `search_bytes` and `search_scope` settings)."""
    if raw is None:
        raw = [
            (b, b.data)
            for b in (record.request_body, record.response_body, record.response_events)
            if b is not None and b.data is not None
        ]
    events, response = record.response_events, record.response_body
    if events is not None and any(b is response for b, _ in raw):
        # The reassembled response already holds the stream's text: parsing every event again
        # cost 8x the rest of the record (a 20-event stream) and indexed the text twice.
        raw = [(b, data) for b, data in raw if b is not events]
    pick = provider_for(record.provider, record.path).turn if scope == SCOPE_TURN else None
    asked = [t for b, data in raw if b is record.request_body and (t := _text_or_none(b, data, pick))]
    said = [t for b, data in raw if b is not record.request_body and (t := _text_or_none(b, data))]
    if not asked and not said:
        return None
    return fold(_within_bound("\n".join(asked), "\n".join(said), limit)) or None


def _within_bound(asked: str, said: str, limit: int) -> str:
    """The request's and the response's text in at most `limit` bytes.

    A long request (a conversation resent whole each turn) must not crowd out the answer: when
    both are long each keeps half, and a side shorter than half leaves the rest to the other.
    The response keeps its start; a request cut keeps its start and its end, half its room
    each: the system prompt and the question just asked, which comes last.
    """
    a, s = asked.encode("utf-8", "replace"), said.encode("utf-8", "replace")
    if len(a) + len(s) > limit:
        keep = min(len(s), max(limit // 2, limit - len(a)))
        room = limit - keep
        if len(a) > room:
            head = room // 2
            a = a[:head] + b"\n" + a[len(a) - (room - head) + 1 :] if room > 1 else a[:room]
        s = s[:keep]
    return "\n".join(t for t in (a.decode("utf-8", "ignore"), s.decode("utf-8", "ignore")) if t)


def like_pattern(q: str) -> str:
    """`%q%` for LIKE with `\\` as the escape character."""
    return "%" + fold(q).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
