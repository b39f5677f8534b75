"""Documented limits on the metadata one request may attach (README, "Limits").

Client-controlled metadata is unbounded on the wire (one request stored 6.6 MB of properties),
but a log store has to index it and an API page has to carry it. Beyond these limits the value
is cut (at a UTF-8 character boundary) and the record says what was cut in `truncated`; the
client's LLM call is never refused for its metadata. Sizes are UTF-8 bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtap.record import clean_text
from llmtap.redact import redact_url

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
        if "?" in value or "#" in value or ";" in value:
            # a query, a fragment or path parameters (rev26: `Referer: .../models;key=...`,
            # `#access_token=...` were stored whole): `; charset=utf-8` comes out as it is
            value = headers[name] = _url_masked(value)
        short = cut(value, min(MAX_HEADER_VALUE_BYTES, max(MAX_HEADER_BYTES - total, 0)))
        if short is not None:
            value = headers[name] = short
            was_cut = True
        total += len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if was_cut:
        truncated.append(what)
    return headers


def ident(value: str | None, what: str, truncated: list[str]) -> str | None:
    """A user or session id held to `MAX_ID_BYTES`."""
    if value is None:
        return None
    value = clean_text(value)
    short = cut(value, MAX_ID_BYTES)
    if short is None:
        return value
    truncated.append(what)
    return short


def properties(props: dict[str, str], truncated: list[str]) -> dict[str, str]:
    """Properties held to the documented limits (count, name and value size)."""
    if len(props) <= MAX_PROPERTIES and all(
        len(k) <= MAX_PROPERTY_NAME_BYTES // 4 and len(v) <= MAX_PROPERTY_VALUE_BYTES // 4
        for k, v in props.items()
    ):
        return props  # the common case: a few short ones
    out: dict[str, str] = {}
    flags: set[str] = set()
    for name, value in props.items():
        if len(out) >= MAX_PROPERTIES:
            flags.add("properties")
            break
        name, value = clean_text(name), clean_text(value)
        short = cut(name, MAX_PROPERTY_NAME_BYTES)
        if short is not None:
            name = short
            flags.add("property_name")
        short = cut(value, MAX_PROPERTY_VALUE_BYTES)
        if short is not None:
            value = short
            flags.add("property_value")
        out.setdefault(name, value)
    truncated.extend(sorted(flags))
    return out


def bound(record: LogRecord) -> None:
    """Hold a record that did not come from a gateway (the ingest endpoint) to the limits a
    gateway applies while it builds one: 20,000 posted properties were stored as 20,001 rows."""
    flags: list[str] = []
    record.request_headers = headers(record.request_headers, "request_headers", flags)
    record.response_headers = headers(record.response_headers, "response_headers", flags)
    record.user_id = ident(record.user_id, "user_id", flags)
    record.session_id = ident(record.session_id, "session_id", flags)
    record.properties = properties(record.properties, flags)
    if record.model is not None:
        short = cut(record.model, MAX_MODEL_BYTES)
        if short is not None:
            record.model = short
            flags.append("model")
    if flags:
        record.truncated = [*record.truncated, *(f for f in flags if f not in record.truncated)]
