"""What the gateway keeps of a request while relaying it, and how that becomes a `LogRecord`.

Two halves on purpose. `Capture` is filled on the latency path and does nothing but keep
references, raw bytes and clock readings: no parsing, no encoding, no allocation beyond a list
append per chunk. `RecordBuilder` turns captures into records later, in the publisher's
background task, in batches: JSON parsing (orjson), usage extraction, stream reassembly,
compression and the body-store split all happen there, after the client has its last byte. A
whole stream is read only at its ends there (usage, model): the worker rebuilds its message
(`llmtap.handlers.streams`), off the gateway's process altogether when scaled out.

Clocks: one `time.time()` at the start gives the wall-clock anchor; every other instant is a
`time.perf_counter()` reading, so durations are monotonic and cost ~50 ns each.
"""

from __future__ import annotations

import base64
import re
import zlib
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import brotli
import msgspec
import orjson
import zstandard

from llmtap import limits
from llmtap.bodies.offload import inline_body
from llmtap.gateway.headers import REQUEST_DROP, RESPONSE_DROP, HeaderFilter, LlmtapHeaders
from llmtap.providers import provider_for
from llmtap.providers.base import Provider
from llmtap.providers.common import dumps, loads
from llmtap.providers.forms import form_boundary, form_parts
from llmtap.providers.sse import StreamResult
from llmtap.record import Body, LogRecord, Outcome, Usage
from llmtap.redact import is_secret_header, redact_text, redact_url

#: Past `Capture.max_bytes` a stream keeps this much of its end, so the usage that providers send
#: last is still found in very long streams.
TAIL_BYTES = 64 * 1024

#: What zstd may add to incompressible bytes (frame and block headers): a stream whose events
#: are at most the inline limit less this stays inline, so the worker can reassemble it.
_ZSTD_SLACK = 64

#: Rough fixed memory of one capture beyond its bodies (objects, headers), for buffer accounting.
CAPTURE_OVERHEAD = 1024


#: A multipart form's `model` field: its part's headers, a blank line, the value.
#: Bytes kept of the end of a request cut at `max_bytes` (`Capture.request_tail`).
REQUEST_TAIL = 64 * 1024
#: The form fields a record reads (an upload's `model`; a transcription's `response_format`),
#: in a part's `Content-Disposition`.
#: Form fields an upload's record reads: its model, and the format its answer comes in.
_FORM_NAMES = frozenset(("model", "response_format"))


def _form_fields(content_type: str, head: bytes, tail: bytes = b"") -> dict[str, str]:
    """The fields `_FORM_NAMES` names, read part by part at the form's boundary
    (`providers.forms`), never from a file's bytes or another field's value (rev19: a file
    holding `name="response_format"` set it); a field sent twice keeps its last value.
    `head`: the body, or its start when a size limit cut it; `tail`: then, its end."""
    boundary = form_boundary(content_type)
    if boundary is None:
        return {}
    fields: dict[str, str] = {}
    for piece, cut, at_start in ((head, bool(tail), True), (tail, False, False)):
        for name, is_file, value, whole in form_parts(piece, boundary, at_start):
            # As servers read them, case and all; a field the size limit cut is not its value
            # (rev22: `gpt-4o-mini-transcribe` cut after `gpt-4o` was recorded as `gpt-4o`).
            if is_file or (cut and not whole) or name not in _FORM_NAMES:
                continue
            end = value.find(b"\r\n")  # a value of one line: its first line
            end = len(value) if end < 0 else end
            if 0 < end <= 256:
                fields[name] = value[:end].decode("utf-8", "replace")
    return fields


class Capture:
    """Raw facts about one proxied request. Filled on the hot path; read by `RecordBuilder`."""

    __slots__ = (
        "chunks",
        "error",
        "id",
        "llmtap",
        "max_bytes",
        "method",
        "outcome",
        "path",
        "provider",
        "request_body",
        "request_headers",
        "request_size",
        "request_tail",
        "response_headers",
        "response_size",
        "started",
        "status",
        "streamed",
        "t0",
        "t_end",
        "t_first",
        "t_headers",
        "tail",
        "tail_size",
        "target_url",
        "tenant",
        "truncated",
    )

    def __init__(
        self,
        request_id: str,
        tenant: str,
        provider: str,
        method: str,
        path: str,
        target_url: str,
        request_headers: Iterable[tuple[str, str]],
        llmtap: list[tuple[str, str]] | None,
        request_body: bytes,
        request_size: int,
        started: float,
        t0: float,
        max_bytes: int,
    ) -> None:
        self.id = request_id
        self.tenant = tenant
        self.provider = provider
        self.method = method
        self.path = path
        self.target_url = target_url
        self.request_headers = request_headers
        self.llmtap = llmtap
        self.request_body = request_body  # already cut to `max_bytes`
        self.request_size = request_size
        #: The end of a request cut at `max_bytes` (`REQUEST_TAIL`): a form's fields after its
        #: file (`-F file=@big.mp3 -F model=...`, as OpenAI's docs order them).
        self.request_tail = b""
        self.started = started  # time.time() at arrival
        self.t0 = t0  # perf_counter() at arrival
        self.t_headers = 0.0  # upstream response headers received
        self.t_first = 0.0  # first generated output received (`Provider.token_marker`)
        self.t_end = 0.0
        self.status: int | None = None
        self.response_headers: Iterable[tuple[str, str]] = ()
        self.chunks: list[bytes] = []
        self.response_size = 0
        self.truncated = False
        self.tail: deque[bytes] | None = None
        self.tail_size = 0
        self.streamed = False
        self.outcome: Outcome = "completed"
        self.error: str | None = None
        self.max_bytes = max_bytes  # LLMTAP_MAX_BODY_BYTES: kept of each body

    def add(self, chunk: bytes) -> None:
        """Keep a response chunk, up to `max_bytes` in all (then a bounded tail)."""
        limit = self.max_bytes
        size = self.response_size
        self.response_size = size + len(chunk)
        if size + len(chunk) <= limit:
            self.chunks.append(chunk)
            return
        if size < limit:
            self.chunks.append(chunk[: limit - size])
            chunk = chunk[limit - size :]  # the tail continues where the head stops: no byte twice
        self.truncated = True
        tail = self.tail
        if tail is None:
            tail = self.tail = deque()
        tail.append(chunk)
        self.tail_size += len(chunk)
        while self.tail_size > TAIL_BYTES and len(tail) > 1:
            self.tail_size -= len(tail.popleft())

    @property
    def nbytes(self) -> int:
        """Memory this capture holds, for the publisher's byte bound."""
        kept = self.response_size if self.response_size < self.max_bytes else self.max_bytes
        return CAPTURE_OVERHEAD + len(self.request_body) + kept + self.tail_size


# -- record building (background) ---------------------------------------------------------------


def _decode(data: bytes, encoding: str | None, limit: int) -> bytes | None:
    """Undo a Content-Encoding for parsing and storing; None if we cannot (an unknown coding).

    At most `limit + 1` bytes come out, so a caller can tell a body cut at `limit`: a few KB of
    gzip or brotli can hold gigabytes (a "zip bomb" from a client or an upstream), and this
    runs on the event loop. Decompression objects accept a truncated input and return what it
    holds.
    """
    if not encoding:
        return data
    enc = encoding.strip().lower()
    cap = limit + 1
    try:
        if enc in ("", "identity"):
            return data
        if enc in ("gzip", "x-gzip"):
            return zlib.decompressobj(wbits=47).decompress(data, cap)
        if enc == "deflate":
            try:
                return zlib.decompressobj(wbits=47).decompress(data, cap)
            except zlib.error:
                return zlib.decompressobj(wbits=-15).decompress(data, cap)
        if enc == "zstd":
            # A streaming server may end a frame per flush: read them all.
            reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
            parts: list[bytes] = []
            got = 0
            while got < cap and (part := reader.read(cap - got)):
                parts.append(part)
                got += len(part)
            return b"".join(parts)
        if enc == "br":
            return bytes(brotli.Decompressor().process(data, output_buffer_limit=cap))[:cap]
    except (zlib.error, zstandard.ZstdError, brotli.error):
        return None
    return None


def _loads(data: bytes | None) -> Any:
    if not data:
        return None
    try:
        return loads(data)
    except orjson.JSONDecodeError:
        return None


_NO_LLMTAP = LlmtapHeaders()
_SCHEMED = re.compile(r"(?i)^[a-z][a-z0-9._~+-]*\s+(\S.*)$")


def _credentials(cap: Capture) -> set[bytes]:
    """The credentials the client sent (header values, and what its URL's rule masks), the
    token of a `Bearer <token>`, the password a `Basic` one encodes, and each as JSON writes it
    (`/` as `\\/`): what an upstream's error answer may quote back."""
    found: list[str] = [v for k, v in cap.request_headers if is_secret_header(k, v)]
    # Every value the URL rule masks, raw and decoded (path parameters, query, fragment): an
    # upstream echoing the URL quotes it raw (rev26: `?key=AbC%2B...` in "Invalid URL (POST
    # /v1/x?key=...)"). From the rule itself, so the two cannot disagree (rev28b: a key as a
    # plain value, a bare piece, a name, an encoded URL's password were masked but quoted back).
    redact_url(cap.target_url, found)
    values: list[str] = []
    for value in found:
        value = value.strip()
        m = _SCHEMED.match(value)
        v = m.group(1).strip() if m else value  # `Bearer <token>`: the token (quoted as `Bearer ***`)
        values.append(v)
        if m and value[:6].lower() == "basic ":
            try:
                plain = base64.b64decode(v, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                continue
            values += [plain, plain.partition(":")[2]]
    out: set[bytes] = set()
    for v in values:
        if _key_like(v):
            out.add(v.encode("utf-8", "surrogateescape"))
            if "/" in v:
                out.add(v.replace("/", "\\/").encode("utf-8", "surrogateescape"))
    return out


def _key_like(v: str) -> bool:
    """A value worth masking wherever it appears: 12 characters or more, or 8 with letters and
    digits both. A placeholder key (`Bearer anything`, `x-api-key: 10000000`) masked as such
    turned ordinary words and numbers of error messages into `***`."""
    if len(v) >= 12:
        return True
    return len(v) >= 8 and any(c.isdigit() for c in v) and any(c.isalpha() for c in v)


def _scrub_text(text: str, secrets: set[bytes]) -> str:
    return _scrub(text.encode("utf-8", "surrogateescape"), secrets).decode("utf-8", "surrogateescape")


def _is_error(obj: Any) -> bool:
    """A 2xx JSON body that is an error: an `error` member that is set (`true`, a message, an
    object with anything in it). OpenAI's fine-tuning jobs carry `"error": {}` (or null) while
    all is well."""
    err = obj.get("error") if isinstance(obj, dict) else None
    return bool(err.strip()) if isinstance(err, str) else bool(err)


def _scrub(body: bytes, secrets: set[bytes], cut: bool = False) -> bytes:
    """`body` with the client's own credentials masked; the same object when none is in it.
    Exact values only: pattern rules (`redact.redact_body`) would mask an error's
    `"code": "rate_limit_exceeded"` (`code` names an OAuth secret). A body `cut` at the size
    limit may end in the first part of one: that goes too."""
    out = body
    for secret in sorted(secrets, key=len, reverse=True):  # a key holding another first
        if secret in out:
            out = out.replace(secret, b"***")
        if cut:
            for n in range(len(secret) - 1, 7, -1):
                if out.endswith(secret[:n]):
                    out = out[:-n] + b"***"
                    break
    return out


class RecordBuilder:
    """Captures → records, their bodies inline (`bodies.offload.inline_body`).

    Which bodies must go to the body store before the record is published is decided by
    `llmtap.bodies.offload` in the publisher, with the one inline limit (`inline_body_bytes`).
    Compressed HTTP bodies (gzip, deflate, zstd, br) are stored decoded; a coding we cannot
    decode as sent.

    Times: `first_byte_at` is when the upstream's response headers arrived. Time to first token
    is, for streams, when the first body bytes arrived (the first SSE event: a role or content
    delta, in practice within a token of the first content), and for other responses the
    latency, since the client sees nothing before the whole body.
    """

    def __init__(self, *, inline_body_bytes: int, gateway: str) -> None:
        self.inline = inline_body_bytes
        self.gateway = gateway
        self.rebuild_errors = 0  # streams whose message could not be rebuilt (stored as they came)
        self.rebuild_error = ""  # the last one's exception type
        self._request_headers = HeaderFilter(REQUEST_DROP)
        self._response_headers = HeaderFilter(RESPONSE_DROP, answer=True)

    def _rebuild_failed(self, e: Exception) -> None:
        self.rebuild_errors += 1
        self.rebuild_error = type(e).__name__  # not its text, which may quote the answer

    def build(self, cap: Capture) -> LogRecord:
        fmt = provider_for(cap.provider, cap.path)
        lh = LlmtapHeaders(cap.llmtap) if cap.llmtap else _NO_LLMTAP
        truncated: list[str] = []
        req_headers = limits.headers(self._request_headers(cap.request_headers), "request_headers", truncated)
        resp_headers = limits.headers(
            self._response_headers(cap.response_headers), "response_headers", truncated
        )

        started_at = datetime.fromtimestamp(cap.started, UTC)
        end = cap.t_end or cap.t0
        latency_ms = (end - cap.t0) * 1000.0
        ended_at = started_at + timedelta(seconds=end - cap.t0)
        first_byte_at = started_at + timedelta(seconds=cap.t_headers - cap.t0) if cap.t_headers else None

        # -- request
        req_ctype = req_headers.get("content-type")
        req_json = None
        req_kept, req_size = cap.request_body, cap.request_size
        req_cut = req_size > len(req_kept)
        if req_kept and "content-encoding" in req_headers:
            # Stored decoded, like responses. A body that decodes past `max_bytes` is cut, so
            # it does not parse: no model, as for a body sent bigger than that.
            dec = _decode(req_kept, req_headers["content-encoding"], cap.max_bytes)
            if dec is not None and dec is not req_kept:
                req_cut = req_cut or len(dec) > cap.max_bytes
                req_kept = dec[: cap.max_bytes]
                req_size = len(req_kept)
        if req_kept and not req_cut:
            req_json = _loads(req_kept)
        if (
            req_json is None
            and req_kept
            and req_ctype
            and req_ctype.lower().startswith("multipart/form-data")
        ):
            # An upload (audio transcription, translation) names its model in a form field.
            fields = _form_fields(req_ctype, req_kept, cap.request_tail)
            if fields:
                req_json = fields

        # -- response
        raw = b"".join(cap.chunks)
        resp_ctype = resp_headers.get("content-type")
        decoded = _decode(raw, resp_headers.get("content-encoding"), cap.max_bytes)
        cut = cap.truncated  # the body kept is not all there was (raw, or once decoded)
        if decoded is not None and len(decoded) > cap.max_bytes:
            decoded, cut = decoded[: cap.max_bytes], True
        usage = Usage()
        error = cap.error
        outcome = cap.outcome
        response_body: bytes | None = decoded if decoded is not None else raw
        response_body_type = resp_ctype
        events: bytes | None = None
        response_obj: Any = None
        deferred = False  # the message is left to the worker
        if cap.streamed and decoded is not None:
            scan = decoded
            if cap.tail:
                tail = b"".join(cap.tail)
                scan = decoded + b"\n\n" + tail
            result: StreamResult | None = None
            message: bytes | None = None
            try:
                if (
                    not cap.tail
                    and not lh.omit_response
                    and len(decoded) + _ZSTD_SLACK <= self.inline
                    and fmt.model(cap.path, req_json, None) is not None
                ):
                    # A whole stream's usage from its first and last events: the worker
                    # rebuilds its message from the events (`llmtap.handlers.streams`), which
                    # stay inline for it. Only where the request names the model: the message
                    # could name another.
                    result = fmt.stream_summary(decoded)
                deferred = result is not None
                if result is None:
                    result = fmt.reassemble_stream(scan)
            except Exception as e:  # a provider's bug on an odd stream costs its message, no more:
                # the stream is stored as it came (before: the whole record was published bare)
                self._rebuild_failed(e)
                result, deferred = None, False
                usage = _tail_usage(fmt, scan)
            if result is not None and result.message is not None:
                try:
                    message = dumps(result.message)
                except Exception as e:  # nested past JSON's depth (a tool's `[[[...]]]`): the
                    # stream is the body, its usage and outcome still read (rev31: both lost)
                    self._rebuild_failed(e)
            if result is not None:
                # a message that could not be written: the stream is the body, as it came
                events = None if result.message is not None and message is None else decoded
                if result.message is not None and message is not None:
                    response_body = message
                    response_body_type = "application/json"
                    response_obj = result.message
                elif result.model is not None:  # a summary: the model its first chunk names
                    response_obj = {"model": result.model}
                usage, outcome, error = result.settle(outcome, error)
                if (
                    not result.complete
                    and result.error is None  # an error event ends it: `upstream_error`, told later
                    and outcome == "completed"
                    and _unended(result, cut, cap, decoded is raw)
                ):
                    outcome = "upstream_cut"
                    error = error or "the upstream closed the connection before the stream's end marker"
            if cap.tail and usage.source == "missing" and decoded is raw:
                # The stream's last event began before the tail kept (a Responses API
                # `response.completed` repeats the whole output): its usage member is at its end.
                found = fmt.usage_from_tail(b"".join(cap.tail))
                if found.source == "provider" and outcome != "completed":
                    found = msgspec.structs.replace(found, source="partial")
                usage = found if found.source != "missing" else usage
        elif decoded is not None and raw:
            obj = response_obj = _loads(decoded)
            if obj is not None:
                usage = fmt.usage_from_body(obj)
                if cap.status is not None and error is None and (cap.status >= 400 or _is_error(obj)):
                    # A 2xx whose body is an error object (OpenRouter, some proxies) says so too.
                    error = fmt.error_message(obj)
                    if error is None and cap.status < 400:
                        msg = obj.get("message") if isinstance(obj, dict) else None
                        error = msg if isinstance(msg, str) and msg else "the answer's JSON holds an error"
            elif cap.tail and decoded is raw:
                # Cut at `max_bytes` (a big embeddings answer): its usage and model are in the tail kept.
                tail = b"".join(cap.tail)
                usage = fmt.usage_from_tail(tail)
                if fmt.bills(cap.method, cap.path):  # not a listing's last item's model
                    response_obj = fmt.response_from_tail(tail)

        if error is None and cap.status is not None and cap.status >= 400:
            # An answer without a readable error (an HTML page from a load balancer, an empty
            # body): the record says what came, where it said nothing.
            kind = resp_ctype.split(";")[0].strip() if resp_ctype else "no content type"
            error = f"upstream answered {cap.status} ({kind}, {cap.response_size} bytes)"
        size = cap.response_size if decoded is raw else len(response_body or b"")  # before masking
        if error is not None or (cap.status is not None and cap.status >= 400):
            # An error answer may quote the caller's key back ("Incorrect API key provided:
            # Bearer sk-..."), in its body, a stream's error event or a 2xx error object: stored
            # with it masked, like the error text. Only error answers are read for it, so the
            # common request pays nothing.
            secrets = _credentials(cap)
            if secrets:
                # A debug header may quote the key too.
                resp_headers = {k: _scrub_text(v, secrets) for k, v in resp_headers.items()}
                if response_body:
                    response_body = _scrub(response_body, secrets, cut)
                if events:
                    events = _scrub(events, secrets, cut)
                if error:
                    error = _scrub_text(error, secrets)

        if usage.source != "missing" and not fmt.bills(cap.method, cap.path):
            usage = Usage()  # a look-up of an answer billed when it was made
        elif usage.source == "missing" and cap.status is not None and 200 <= cap.status < 300:
            usage = fmt.usage_from_request(cap.path, req_json) or usage  # speech: its characters
            if usage.source == "missing" and not response_obj and decoded:  # subtitles: their end
                answer = b"".join(cap.tail) if cap.tail and decoded is raw else decoded  # cut: its end
                usage = fmt.usage_from_text(cap.path, req_json, answer) or usage

        model = fmt.model(cap.path, req_json, response_obj)

        if cap.streamed and cap.t_first:
            ttft = (cap.t_first - cap.t0) * 1000.0
        elif cap.streamed:
            ttft = None
        else:
            ttft = latency_ms if cap.status is not None else None

        inline = self.inline

        def body(data: bytes, size: int, truncated: bool, ctype: str | None) -> Body:
            return inline_body(data, size=size, truncated=truncated, content_type=ctype, limit=inline)

        request_body = None
        if not lh.omit_request:
            request_body = body(
                req_kept,
                req_size,
                req_cut,
                req_ctype,
            )
        resp_body = resp_events = None
        if not lh.omit_response:
            if deferred and events is not None:
                resp_events = body(events, cap.response_size, cut, resp_ctype)
            elif events is not None and response_body is not None:
                resp_body = body(response_body, len(response_body), cut, response_body_type)
                resp_events = body(events, cap.response_size, cut, resp_ctype)
            elif response_body is not None and (raw or cap.status is not None):
                resp_body = body(
                    response_body,
                    size,
                    cut,
                    response_body_type,
                )

        # The header says who asked; else the user the request names to the provider.
        user_id = lh.user_id if lh.user_id is not None else fmt.end_user(req_json)
        user_id = limits.ident(user_id, "user_id", truncated)
        session_id = limits.ident(lh.session_id, "session_id", truncated)
        properties = limits.properties(lh.properties, truncated)
        if model is not None:
            short = limits.cut(model, limits.MAX_MODEL_BYTES)
            if short is not None:
                model = short
                truncated.append("model")

        record = LogRecord(
            id=cap.id,
            tenant=cap.tenant,
            user_id=user_id,
            session_id=session_id,
            properties=properties,
            provider=cap.provider,
            target_url=redact_url(cap.target_url),
            method=cap.method,
            path=redact_url(cap.path),
            model=model,
            streamed=cap.streamed,
            started_at=started_at,
            first_byte_at=first_byte_at,
            ended_at=ended_at,
            latency_ms=latency_ms,
            time_to_first_token_ms=ttft,
            status=cap.status,
            outcome=outcome,
            # Error texts can quote a URL (an invalid-URL error names it): mask its secrets too.
            error=redact_text(error)[:2000] if error else None,
            usage=usage,
            request_headers=req_headers,
            response_headers=resp_headers,
            request_body=request_body,
            response_body=resp_body,
            response_events=resp_events,
            omit_request=lh.omit_request,
            omit_response=lh.omit_response,
            truncated=truncated,
            gateway=self.gateway,
        )
        return record

    def fallback(self, cap: Capture, exc: BaseException) -> LogRecord:
        """A bare record from the capture's plain fields when building failed (a bug, not data):
        the request is still counted, and the reason is visible."""
        started_at = datetime.fromtimestamp(cap.started, UTC)
        end = cap.t_end or cap.t0
        return LogRecord(
            id=cap.id,
            tenant=cap.tenant,
            provider=cap.provider,
            target_url=redact_url(cap.target_url),
            method=cap.method,
            path=redact_url(cap.path),
            streamed=cap.streamed,
            started_at=started_at,
            ended_at=started_at + timedelta(seconds=end - cap.t0),
            latency_ms=(end - cap.t0) * 1000.0,
            status=cap.status,
            outcome=cap.outcome,
            error=redact_text(f"llmtap could not build this record: {type(exc).__name__}: {exc}")[:2000],
            gateway=self.gateway,
        )


#: The end of a stream `_tail_usage` reads.
_TAIL_USAGE = 64 * 1024


def _tail_usage(fmt: Provider, stream: bytes) -> Usage:
    """A stream's usage when its rebuild failed: the last usage member its end holds, as
    `partial` (whether those are the final counts is what the rebuild would have said). Before,
    such a record had no tokens at all (stop 56)."""
    try:
        found = fmt.usage_from_tail(stream[-_TAIL_USAGE:])
    except Exception:
        return Usage()
    return found if found.source == "missing" else msgspec.structs.replace(found, source="partial")


def _unended(result: StreamResult, cut: bool, cap: Capture, plain: bool) -> bool:
    """Whether a stream whose rebuild found no end marker was cut. A body of neither a length
    nor chunks ended with the connection, so a connection the upstream dropped looked whole to
    the client; a format whose every stream ends with its marker (`marked`) is cut without it
    however its body ended (a proxy before the provider closing its chunks). Past the size
    limit the marker may not be in what was kept: a Responses stream's end event, as long as
    the output it repeats, begins before the kept end (rev32), which then tells by how it ends
    (`_tail_ended`; rev33, rev34). A compressed tail, or a body cut once decoded, cannot be
    read there: the framing decides."""
    if result.marked and cut:
        if cap.tail and plain:
            return not _tail_ended(b"".join(cap.tail))
    elif result.marked:
        return True
    return _close_delimited(cap.response_headers)


#: A `"usage"` member (whatever its value: null from some servers).
_USAGE_KEY = re.compile(rb'"usage"\s*:')


def _tail_ended(tail: bytes) -> bool:
    """The kept end of a stream holds its end event's end: the `usage` member every Responses
    end event has, in the last event, and that event ended (rev34: one cut inside its end
    event, after `usage`, was taken for whole)."""
    end = tail.rstrip()
    if end.endswith(b"data: [DONE]"):
        end = end[: -len(b"data: [DONE]")].rstrip()
    if not end.endswith(b"}") or not (tail.endswith(b"\n\n") or tail.endswith(b"\r\n\r\n")):
        return False
    last = max(end.rfind(b"\n\n"), end.rfind(b"\r\n\r\n"))  # the last event's start, if kept
    return _USAGE_KEY.search(end, max(last, 0)) is not None


def _close_delimited(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether an answer's body ended where its connection did (HTTP/1.0 style)."""
    for name, value in headers:
        lname = name.lower()
        if lname == "content-length" or (lname == "transfer-encoding" and "chunked" in value.lower()):
            return False
    return True
