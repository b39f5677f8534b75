"""Documented limits on the metadata one request may attach (README, "Limits").

Client-controlled metadata is unbounded on the wire (one request stored 6.6 MB of properties),
but a log store has to index it and an API page has to carry it. Beyond these limits the value
is cut (at a UTF-8 character boundary) and the record says what was cut in `truncated`; the
client's LLM call is never refused for its metadata. Sizes are UTF-8 bytes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from llmtap.record import Usage, clean_text
from llmtap.redact import distinct_name, redact_url

if TYPE_CHECKING:
    from llmtap.record import LogRecord

#: Properties per request (`Llmtap-Property-*` headers); the rest are not recorded.
MAX_PROPERTIES = 64
#: A property name (after the `Llmtap-Property-` prefix).
MAX_PROPERTY_NAME_BYTES = 128
#: A property value.
MAX_PROPERTY_VALUE_BYTES = 1024
#: `Llmtap-User-Id`, `Llmtap-Session-Id`.
MAX_ID_BYTES = 256
#: The model name read from the request or response body.
MAX_MODEL_BYTES = 256
#: Recorded request or response headers: how many, and each value's size.
MAX_HEADERS = 128
MAX_HEADER_VALUE_BYTES = 4096
#: ... and all of one direction's recorded header values together.
MAX_HEADER_BYTES = 32768
#: `Llmtap-Request-Id` must be a UUID (36 characters); anything else gets a fresh id.
REQUEST_ID_CHARS = 36
#: The largest token count a record takes. A provider (or a fake one) can send any JSON number;
#: a count past this is not a count but garbage, and kept it would overflow the store's 64-bit
#: integers (a dead-lettered record for a request the client got) or the cost's nanodollars.
MAX_TOKENS = 10**12
#: Counts PostgreSQL keeps in 32-bit columns (migrations 6 and 15: 1-hour cache writes, audio,
#: web searches, audio seconds, input characters): past this one is garbage too, and it
#: overflowed the column (the record was dead-lettered). Ingest refuses it; a store keeps it as
#: unknown.
NARROW_USAGE = (
    "cache_write_1h_tokens", "input_audio_tokens", "output_audio_tokens", "web_search_requests",
    "audio_seconds", "input_characters",
)  # fmt: skip
MAX_NARROW_COUNT = 2**31 - 1
#: A charge a provider reports above this for one call is not a charge (a bug, or not USD); the
#: bound also keeps its nanodollars in 64 bits (fuzz2: an ingested 1e12 was dead-lettered).
MAX_BILLED_USD = 1_000_000.0
#: Characters of a record's `error` kept (the gateway's; ingest cuts what it is posted to it).
MAX_ERROR_CHARS = 2000


#: Every count `Usage` holds: what a gateway records is 0..MAX_TOKENS (`token_count`).
_USAGE_INTS = tuple(f.name for f in msgspec.structs.fields(Usage) if f.type == (int | None))
_usage_ints = operator.attrgetter(*_USAGE_INTS)
_INT64 = (-(2**63), 2**63 - 1)
#: Request times a store can bucket and print as ISO 8601: not before the epoch (SQLite's
#: buckets round toward zero), not in the year 9999 (PostgreSQL's next bucket is year 10000).
TIMES = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))
_BODY_PARTS = ("request_body", "response_body", "response_events")


def unknown_counts(record: LogRecord) -> None:
    """A usage count outside 0..MAX_TOKENS (or a charge outside 0..MAX_BILLED_USD) made unknown:
    the worker's form of `check` for them. A gateway records a provider's counts held to that
    range, but some it adds up (prompt + completion, Anthropic's cache reads and writes, Gemini's
    modalities) may pass it, and such a record is the gateway's own: stored, never
    dead-lettered (rev27). Ingest refuses the posted ones instead."""
    usage = record.usage
    counts = tuple(filter(None, _usage_ints(usage)))
    if counts and (min(counts) < 0 or max(counts) > MAX_TOKENS):
        for name in _USAGE_INTS:
            count = getattr(usage, name)
            if count is not None and not 0 <= count <= MAX_TOKENS:
                setattr(usage, name, None)
    billed = usage.billed_usd
    if billed is not None and not 0 <= billed <= MAX_BILLED_USD:  # NaN too
        usage.billed_usd = None


def check(record: LogRecord) -> str | None:
    """Why no store can keep this record as it is, or None: numbers and times no gateway
    records. Ingest refuses such a record with it, a worker dead-letters it (a queue message is
    not only a gateway's: a script, another version, a replayed letter). Runs for every record.

    A narrow count (`NARROW_USAGE`) up to MAX_TOKENS passes: a gateway records a provider's, and
    the store keeps it as unknown.
    """
    usage = record.usage
    counts = tuple(filter(None, _usage_ints(usage)))  # the common case in C: no loop over 14 names
    if counts and (min(counts) < 0 or max(counts) > MAX_TOKENS):
        for name in _USAGE_INTS:
            count = getattr(usage, name)
            if count is not None and not 0 <= count <= MAX_TOKENS:
                return f"usage.{name} {str(count)[:30]} is not a token count (0 to {MAX_TOKENS})"
    billed = usage.billed_usd
    if billed is not None and not 0 <= billed <= MAX_BILLED_USD:  # NaN fails too
        return f"usage.billed_usd {str(billed)[:30]} is not a charge (0 to {MAX_BILLED_USD:.0f} USD)"
    status = record.status
    if status is not None and not 0 <= status <= 999:
        return f"status {str(status)[:30]} is not an HTTP status"
    nanos = record.cost_nanos
    if nanos is not None and not _INT64[0] <= nanos <= _INT64[1]:
        return f"cost_nanos {str(nanos)[:30]} does not fit in 64 bits"
    for part in _BODY_PARTS:
        body = getattr(record, part)
        if body is not None and not _INT64[0] <= body.size <= _INT64[1]:
            return f"{part}.size {str(body.size)[:30]} does not fit in 64 bits"
    if not 0 <= record.latency_ms <= 1e12:  # NaN fails too
        return f"latency_ms {str(record.latency_ms)[:30]} is not a duration"
    ttft = record.time_to_first_token_ms
    if ttft is not None and not 0 <= ttft <= 1e12:
        return f"time_to_first_token_ms {str(ttft)[:30]} is not a duration"
    for name in ("started_at", "first_byte_at", "ended_at"):
        at = getattr(record, name)
        if at is not None and not TIMES[0] <= (at if at.tzinfo else at.replace(tzinfo=UTC)) < TIMES[1]:
            return f"{name} {str(at)[:40]} is not between 1970 and 9999"
    return None


def cut(s: str, limit: int) -> str | None:
    """`s` cut to `limit` UTF-8 bytes at a character boundary, or None when it already fits."""
    if len(s) <= limit // 4:  # fits whatever its characters (no encoding needed)
        return None
    b = s.encode("utf-8", "surrogatepass")
    if len(b) <= limit:
        return None
    return b[:limit].decode("utf-8", "ignore")


#: Header values totalling at most this many characters fit both header limits, whatever they hold.
_SHORT_HEADERS = min(MAX_HEADER_VALUE_BYTES, MAX_HEADER_BYTES) // 4


#: Header values `redact_url` leaves as they are (`application/json; charset=utf-8`, an
#: `alt-svc`): most responses carry some, and the rule costs 3-6 us a value. Short values only,
#: none holding a secret, emptied when full.
_CLEAN: set[str] = set()
_CLEAN_KEPT = 1024


def _url_masked(value: str) -> str:
    if value in _CLEAN:
        return value
    red = redact_url(value)
    if red == value and len(value) <= 256:
        if len(_CLEAN) >= _CLEAN_KEPT:
            _CLEAN.clear()
        _CLEAN.add(value)
    return red


def headers(headers: dict[str, str], what: str, truncated: list[str]) -> dict[str, str]:
    """Headers as recorded: URLs (`Referer`, `Location`) lose the secrets of their query, path
    parameters and fragment, and the count and value sizes are held to the documented limits."""
    if len(headers) <= MAX_HEADERS:
        # The common case in one pass of C: no query to mask, and all values together so short
        # (in characters, at most 4 UTF-8 bytes each) that neither limit can be reached.
        # Path parameters (`; charset=utf-8`) only in values known to hold no secret.
        joined = "".join(headers.values())
        if len(joined) <= _SHORT_HEADERS and "?" not in joined and "#" not in joined:
            if ";" not in joined or all(";" not in v or v in _CLEAN for v in headers.values()):
                return headers
    was_cut = False
    if len(headers) > MAX_HEADERS:
        headers = dict(list(headers.items())[:MAX_HEADERS])
        was_cut = True
    total = 0
    for name, value in headers.items():
        read = 0
        room = min(MAX_HEADER_VALUE_BYTES, max(MAX_HEADER_BYTES - total, 0))
        if not room:  # the record's header bytes are spent: nothing of it is kept, nor read
            if value:
                headers[name], was_cut = "", True
            continue
        if "?" in value or "#" in value or ";" in value:
            # a query, a fragment or path parameters (rev26: `Referer: .../models;key=...`,
            # `#access_token=...` were stored whole): `; charset=utf-8` comes out as it is.
            # Only what is kept is read, and `MASK_MARGIN` past it (rev29b: 15 values of 64 KB
            # holding queries held the loop 0.7 s, read whole to keep 4 KB of each).
            part = value[: room + MASK_MARGIN]
            read = len(part)
            if read < len(value):
                # The slice split its last piece, which masking cannot judge (rev30b: a password
                # whose `@` fell past it was kept once `id_token=<5 KB>` shrank to `***`): it
                # is not kept, and the header is flagged cut.
                split = max(map(part.rfind, "&;#?"))
                if split >= 0:  # none: a path, which the URL rule does not read (rev31: a long
                    part = part[:split]  # Referer whose `?` lay past the read was emptied)
                was_cut = True
            # The budget pays for what was read, not only what masking kept (rev30b: 128 values
            # of 5 KB masked to `***` were each read whole, 0.7 s).
            value = headers[name] = _url_masked(part)
        short = cut(value, room)
        if short is not None:
            value = headers[name] = short
            was_cut = True
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        total += size if size > read else read
    if was_cut:
        truncated.append(what)
    return headers


def ident(value: str | None, what: str, truncated: list[str], mask: Mask | None = None) -> str | None:
    """A user or session id held to `MAX_ID_BYTES` (`mask`: see `bound`)."""
    if value is None:
        return None
    value = clean_text(value)
    short = _cut(value, MAX_ID_BYTES, mask)
    if short is None:
        return value
    truncated.append(what)
    return short


def properties(
    props: dict[str, str], truncated: list[str], mask: Mask | None = None, name_mask: Mask | None = None
) -> dict[str, str]:
    """Properties held to the documented limits (count, name and value size; `mask`,
    `name_mask`: see `bound`)."""
    if not props or (
        len(props) <= MAX_PROPERTIES
        and max(map(len, props)) <= MAX_PROPERTY_NAME_BYTES // 4
        and max(map(len, props.values())) <= MAX_PROPERTY_VALUE_BYTES // 4
    ):
        return props  # the common case, in C: none, or a few short ones
    out: dict[str, str] = {}
    flags: set[str] = set()
    for name, value in props.items():
        if len(out) >= MAX_PROPERTIES:
            flags.add("properties")
            break
        name, value = clean_text(name), clean_text(value)
        short = _cut(name, MAX_PROPERTY_NAME_BYTES, name_mask)
        if short is not None:
            name = short
            flags.add("property_name")
        short = _cut(value, MAX_PROPERTY_VALUE_BYTES, mask)
        if short is not None:
            value = short
            flags.add("property_value")
        out.setdefault(distinct_name(name, out), value)
    truncated.extend(sorted(flags))
    return out


#: A user id, session id or property value is read this far past its limit by `mask` before
#: it is cut: a credential the cut splits is seen whole (longer than any key), and a long value
#: costs no more than this to read.
MASK_MARGIN = 1024
Mask = Callable[[str], str]


def _cut(value: str, limit: int, mask: Mask | None) -> str | None:
    """`cut`, but with `mask` applied first to what the cut keeps and a margin past it: the
    gateway masks a whole header before it cuts, and so does ingest (rev28b: `"u"*240 + " sk-..."`
    masked after the cut kept `sk-proj-Ab3dEfG`)."""
    short = cut(value, limit)
    if short is not None and mask is not None:
        masked = mask(value[: limit + MASK_MARGIN])
        if masked != value[: limit + MASK_MARGIN]:
            return cut(masked, limit) or masked
    return short


def bound(record: LogRecord, mask: Mask | None = None, name_mask: Mask | None = None) -> None:
    """Hold a record that may not come from a gateway (ingest, a queue message) to the limits a
    gateway applies while it builds one: 20,000 posted properties were stored as 20,001 rows.
    `mask` (`redact.masked_value`) is applied to a user id, session id or property value before
    it is cut, `name_mask` (`redact.masked_name`) to a property name; the caller masks those not
    cut."""
    if record.error is not None and len(record.error) > MAX_ERROR_CHARS:  # as a gateway cuts it
        record.error = record.error[:MAX_ERROR_CHARS]
    flags: list[str] = []
    record.request_headers = headers(record.request_headers, "request_headers", flags)
    record.response_headers = headers(record.response_headers, "response_headers", flags)
    record.user_id = ident(record.user_id, "user_id", flags, mask)
    record.session_id = ident(record.session_id, "session_id", flags, mask)
    record.properties = properties(record.properties, flags, mask, name_mask)
    if record.model is not None:
        short = cut(record.model, MAX_MODEL_BYTES)
        if short is not None:
            record.model = short
            flags.append("model")
    if flags:
        record.truncated = [*record.truncated, *(f for f in flags if f not in record.truncated)]
