"""The log record: one per proxied request, the same bytes on every queue.

A record is built by the gateway *after* the client has its last byte, published as JSON
(msgspec: typed, validated, and the fastest JSON codec in Python), and completed by the worker's
handlers (cost, body references). `v` is the schema version; a consumer refuses versions it does
not know instead of guessing (the message is dead-lettered with that reason).

Bodies travel either inline (zstd-compressed, base64 in JSON) or as a reference to the body
store, so a queue message stays far below Kafka's 1 MB default: `llmtap.bodies.offload` decides.
"""

from __future__ import annotations

import codecs
import re
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
import zstandard

from llmtap.errors import RecordError

VERSION = 1

Outcome = Literal[
    "completed",  # the whole response was relayed (any status, 4xx/5xx included)
    "client_disconnected",  # the client went away before the response ended
    "upstream_cut",  # the upstream closed or broke the stream mid-way
    "upstream_timeout",  # no upstream answer in time: the gateway answered 504
    "upstream_unreachable",  # could not connect upstream: the gateway answered 502
    # A stream the upstream answered with 2xx, then ended with an error event (Anthropic's
    # `overloaded_error` mid-answer, OpenAI's `response.failed`). Set by the worker
    # (`handlers.streams`), so a gateway never sends it to an older worker.
    "upstream_error",
]
#: `partial`: the provider's counts of a stream that ended before its end marker (a cut stream
#: keeps only what its events said so far, e.g. Anthropic's placeholder output count).
UsageSource = Literal["provider", "partial", "estimated", "missing"]
Route = Literal["queue", "ingest", "spool"]


class Body(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=True):
    """A captured body: inline bytes or a reference into the body store.

    `data` holds the body encoded per `encoding` (`zstd` or `identity`); `ref` is a body-store
    key. `size` is the original size in bytes; `truncated` says `LLMTAP_MAX_BODY_BYTES` was hit (the
    client and upstream still got every byte).
    """

    content_type: str | None = None
    size: int = 0
    truncated: bool = False
    encoding: Literal["identity", "zstd"] = "identity"
    data: bytes | None = None
    ref: str | None = None


class Usage(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=True):
    """Token counts as the provider reported them. `source` says where they came from."""

    source: UsageSource = "missing"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens read from the provider's cache
    cache_write_tokens: int | None = None  # prompt tokens written to the cache (all TTLs)
    cache_write_1h_tokens: int | None = None  # ... of which with Anthropic's 1-hour TTL
    reasoning_tokens: int | None = None  # part of completion_tokens (thinking, billed as output)
    input_audio_tokens: int | None = None  # part of prompt_tokens
    output_audio_tokens: int | None = None  # part of completion_tokens
    input_image_tokens: int | None = None  # part of prompt_tokens (image models price them apart)
    output_image_tokens: int | None = None  # part of completion_tokens (Gemini's image output)
    audio_seconds: int | None = None  # audio billed by its length (whisper-1), in whole seconds
    input_characters: int | None = None  # input billed per character (tts-1), from the request
    service_tier: str | None = None  # as the provider reported it (`flex`, `priority` price differently)
    speed: str | None = None  # Anthropic's `speed` when not standard (`fast`: premium prices)
    inference_geo: str | None = None  # Anthropic's `inference_geo` when not global (`us`: 1.1x)
    web_search_requests: int | None = None  # server-side web searches, billed per call
    #: The provider's own charge for the call in USD (OpenRouter's `usage.cost`), which the
    #: record's cost takes over the price table's (`llmtap.pricing.apply_cost`).
    billed_usd: float | None = None


class LogRecord(
    msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="v", tag=VERSION, forbid_unknown_fields=True
):
    """Version 1 of the log record. Field names are part of the contract.

    The version travels as the struct's tag: every encoded record starts with `"v": 1`, and a
    decoder refuses any other value (which `decode` reports as an unknown version). Fields are
    only ever added to version 1; a decoder refuses a field it does not know (a record from a
    newer gateway), so the record waits in the dead-letter place for an upgraded worker instead
    of being stored without it.
    """

    #: An empty id would merge unrelated requests; a longer one than `GET /api/v1/requests/{id}`
    #: takes (512) could not be read back, nor paged past (list cursors embed it).
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    tenant: str = "default"
    user_id: str | None = None
    session_id: str | None = None
    properties: dict[str, str] = {}

    provider: str
    target_url: str
    method: str
    path: str
    model: str | None = None
    streamed: bool = False

    started_at: datetime
    first_byte_at: datetime | None = None
    ended_at: datetime
    latency_ms: float
    time_to_first_token_ms: float | None = None

    status: int | None = None
    outcome: Outcome = "completed"
    error: str | None = None

    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float | None = None
    cost_nanos: int | None = None  # exact cost in 1e-9 USD, for sums without float drift
    price_version: str | None = None

    request_headers: dict[str, str] = {}
    response_headers: dict[str, str] = {}
    request_body: Body | None = None  # None: omitted by the client (Llmtap-Omit-Request)
    #: For streams: the reassembled message as JSON. A plain OpenAI chat stream leaves the gateway
    #: without it (its events are the response) and the worker adds it (`handlers.streams`).
    response_body: Body | None = None
    response_events: Body | None = None  # for streams: the raw SSE bytes
    omit_request: bool = False
    omit_response: bool = False

    #: What the gateway cut to the documented metadata limits (`llmtap.limits`), e.g.
    #: `["properties", "user_id"]`; empty when nothing was. The client's call was never refused.
    truncated: list[str] = []

    route: Route = "queue"  # how the record reached the worker
    gateway: str | None = None  # host:pid of the gateway that captured it

    @property
    def v(self) -> int:
        """The schema version (the struct's tag)."""
        return VERSION


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LogRecord)
_probe = msgspec.json.Decoder(dict[str, Any])


def encode(record: LogRecord) -> bytes:
    """The record as JSON. A record holding text that is not valid Unicode (a header byte that
    is not UTF-8 arrives as a lone surrogate) is repaired, not refused: see `repaired`.
    Raises `RecordError` only for a record that cannot be encoded even then."""
    try:
        return _encoder.encode(record)
    except Exception:  # the cold path: repair, then try once more
        pass
    try:
        return _encoder.encode(repaired(record))
    except Exception as e:
        raise RecordError(
            f"cannot encode record {clean_text(record.id)!r}: {type(e).__name__}: {e}"
        ) from None


def encode_many(records: list[LogRecord]) -> bytes:
    """A JSON array of records (the ingest endpoint's and the spool's batch format)."""
    try:
        return _encoder.encode(records)
    except Exception:
        return b"[" + b",".join(encode(r) for r in records) + b"]"


# -- text that JSON cannot carry ------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match[str]) -> str:
    o = ord(m.group())
    # aiohttp decodes header bytes with `surrogateescape`: U+DC80..U+DCFF stand for the raw
    # bytes 0x80..0xFF, shown as `\xNN`; any other lone surrogate as `\uNNNN`.
    return f"\\x{o - 0xDC00:02x}" if 0xDC80 <= o <= 0xDCFF else f"\\u{o:04x}"


def clean_text(s: str) -> str:
    r"""`s` as valid Unicode: each byte that was not UTF-8 (a lone surrogate) becomes the text
    `\xNN`. Costs one `isascii` on ordinary text. (NUL is the stores' business: `store.sql`.)"""
    if s.isascii():
        return s
    return _SURROGATE.sub(_escape_surrogate, s)


def _clean(obj: Any) -> Any:
    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, dict):
        return {(clean_text(k) if isinstance(k, str) else k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, msgspec.Struct):
        return msgspec.structs.replace(obj, **{f: _clean(getattr(obj, f)) for f in obj.__struct_fields__})
    return obj


def repaired(record: LogRecord) -> LogRecord:
    """A copy of `record` whose every string is valid Unicode (`clean_text`): the record with odd
    bytes is kept, escaped, instead of failing the batch it travels in."""
    out: LogRecord = _clean(record)
    return out


def _text(value: object) -> str:
    return clean_text(value if isinstance(value, str) else str(value))


def lightened(record: LogRecord, reason: str) -> LogRecord:
    """The record without its bodies and headers, every other field kept (model, tokens, cost,
    user, session, properties), with `reason` added to its error: what is sent when the whole
    record is too large for the queue or the dead-letter place. `stripped` is for a record
    that cannot be encoded at all."""
    note = f"llmtap could not deliver the full record (bodies and headers left out): {reason}"
    error = note if record.error is None else f"{record.error} | {note}"
    return msgspec.structs.replace(
        record,
        request_body=None,
        response_body=None,
        response_events=None,
        request_headers={},
        response_headers={},
        error=clean_text(error)[:2000],
    )


def stripped(record: LogRecord, reason: str) -> LogRecord:
    """The record reduced to its plain fields, with `reason` as its error: what is stored when
    the full record cannot be encoded or is refused, so the request is still counted and the
    reason visible instead of the record vanishing."""
    return LogRecord(
        id=_text(record.id),
        tenant=_text(record.tenant),
        provider=_text(record.provider),
        target_url=_text(record.target_url),
        method=_text(record.method),
        path=_text(record.path),
        streamed=record.streamed,
        started_at=record.started_at,
        first_byte_at=record.first_byte_at,
        ended_at=record.ended_at,
        latency_ms=record.latency_ms,
        status=record.status if isinstance(record.status, int) and 0 <= record.status < 1000 else None,
        outcome=record.outcome,
        error=clean_text(f"llmtap could not deliver the full record: {reason}")[:2000],
        route=record.route,
        gateway=record.gateway,
    )


def decode(data: bytes) -> LogRecord:
    """Parse one message. Raises `RecordError` with a reason fit for the dead-letter place,
    whatever the bytes are: any other exception would fail the whole batch again and again."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as e:
        raise RecordError(_invalid(data, e)) from None
    except Exception as e:
        raise RecordError(_unreadable(e, data)) from None


def _invalid(data: bytes, e: msgspec.ValidationError) -> str:
    """Tell "a version we don't know" and "a newer gateway's field" apart from "a broken record"."""
    text = str(e)
    try:
        version = _probe.decode(data).get("v")
    except Exception:
        version = None
    if text.endswith("`$.v`"):
        if text.startswith("Invalid value "):  # an int, and not ours (also when `v` is repeated)
            return f"unknown record version {text.split()[2]} (this worker reads v{VERSION})"
        return f"invalid record version {str(version)[:40]!r} (this worker reads v{VERSION})"
    if type(version) is int and version != VERSION:
        return f"unknown record version {version} (this worker reads v{VERSION})"
    if text.startswith("Object contains unknown field") and version is None:
        # No `v` at all: not a record of any version (an export row posted back, restore check)
        return f"invalid record: {text} (not a log record: it has no `v`; an export row is a report)"
    if text.startswith("Object contains unknown field"):
        return (
            f"invalid record: {text} (a newer llmtap's field: upgrade the workers, then "
            "`llmtap dlq replay --all`)"
        )
    return f"invalid record: {text}"


_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _unreadable(e: Exception, data: bytes) -> str:
    if isinstance(e, UnicodeError):
        return "not a JSON log record: not valid UTF-8"
    if isinstance(e, RecursionError):
        return "not a JSON log record: nested too deeply"
    if isinstance(e, msgspec.DecodeError):
        if str(e) == "Input data was truncated" and _LONE_SURROGATE_ESCAPE.search(data):
            # msgspec's words for a lone surrogate escape at a string's end (unicode check)
            return "not a JSON log record: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
        return f"not a JSON log record: {e}"
    return f"not a JSON log record: {type(e).__name__}: {str(e)[:200]}"


_many_decoder = msgspec.json.Decoder(list[LogRecord])


def decode_many(data: bytes) -> list[LogRecord]:
    try:
        return _many_decoder.decode(data)
    except msgspec.ValidationError as e:
        raise RecordError(_invalid(b"{}", e).replace("invalid record", "invalid record batch", 1)) from None
    except Exception as e:
        raise RecordError(_unreadable(e, data)) from None


# -- body helpers ------------------------------------------------------------------------------

_zc = zstandard.ZstdCompressor(level=3)
_zd = zstandard.ZstdDecompressor()


def compress(data: bytes) -> bytes:
    return _zc.compress(data)


#: The most bytes a stored body decodes to (`max_body_bytes` may not exceed it). A record's
#: body is anyone's bytes once ingested: a 16 KB zstd frame of zeros declared 512 MB made the
#: server take 6.9 GB for one read.
DECODE_LIMIT = 64 * 1024 * 1024


def decompress(data: bytes, limit: int = DECODE_LIMIT) -> bytes:
    """The bytes of a zstd body, at most `limit` of them (more are cut off). Raises
    `zstandard.ZstdError` when a frame is cut short or followed by bytes that are none: a
    damaged body reads as missing, never as an empty or shorter one.

    Every frame is read (a body written in pieces by another producer came back as its
    first), and frames without their size in the header too."""
    size = zstandard.frame_content_size(data)
    if 0 <= size <= limit:  # the common case, ours: one frame of known size, read in one call
        one = _zd.decompressobj()
        out = one.decompress(data)
        if not one.eof:
            raise zstandard.ZstdError("the zstd frame is cut short")
        if not one.unused_data:
            return out
    # Several frames, or sizes not known (or above the limit): first how much they make, read
    # no further than the limit (a frame of zeros says nothing of its size until decoded)...
    reader = _zd.stream_reader(data, read_across_frames=True)
    head: list[bytes] = []
    got = 0
    while got <= limit and (chunk := reader.read(min(limit + 1 - got, 1 << 20))):
        head.append(chunk)
        got += len(chunk)
    if got > limit:
        return b"".join(head)[:limit]
    # ...then, as all of it is within the limit, frame by frame, which says when one ends early.
    parts: list[bytes] = []
    rest = data
    while rest:
        frame = _zd.decompressobj()
        parts.append(frame.decompress(rest))
        if not frame.eof:
            raise zstandard.ZstdError("a zstd frame is cut short")
        rest = frame.unused_data
    return b"".join(parts)


#: Python text codecs no body is in (they decode escapes, or nothing at all).
_NOT_CHARSETS = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined", "utf-7", "mbcs", "oem"}
)


def declared_charset(content_type: str | None) -> str | None:
    """The codec a body's `charset=` names when it is not UTF-8's (None: no charset, UTF-8,
    or one Python does not know): a Latin-1 answer read as UTF-8 showed and indexed "caf\ufffd"."""
    if not content_type or "charset" not in content_type.lower():
        return None
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            try:
                codec = codecs.lookup(value.strip().strip('"').strip())
            except (LookupError, ValueError):
                return None
            if not codec._is_text_encoding or codec.name in _NOT_CHARSETS or codec.name == "utf-8":
                return None  # `charset=base64`, `rot13`, `unicode_escape`: a client's, no charset
            return codec.name
    return None


def body_bytes(body: Body) -> bytes | None:
    """The original bytes of an inline body (None when it lives in the body store)."""
    if body.data is None:
        return None
    return decompress(body.data) if body.encoding == "zstd" else body.data


def partition_key(record: LogRecord, by: str) -> str:
    """The key that decides a record's partition (and so its ordering domain).

    A record without the value (no session) has no order to keep with any other: keyed by its
    own id, such records spread over every partition, so every worker has work."""
    if by == "tenant":
        return record.tenant
    value = getattr(record, by, None)
    return clean_text(str(value)) if value else record.id
