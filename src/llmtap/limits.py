"""Documented limits on the metadata one request may attach (README, "Limits").

Client-controlled metadata is unbounded on the wire (one request stored 6.6 MB of properties),
but a log store has to index it and an API page has to carry it. Beyond these limits the value
is cut (at a UTF-8 character boundary) and the record says what was cut in `truncated`; the
client's LLM call is never refused for its metadata. Sizes are UTF-8 bytes.
"""

from __future__ import annotations

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


def cut(s: str, limit: int) -> str | None:
    """`s` cut to `limit` UTF-8 bytes at a character boundary, or None when it already fits."""
    if len(s) <= limit // 4:  # fits whatever its characters (no encoding needed)
        return None
    b = s.encode("utf-8", "surrogatepass")
    if len(b) <= limit:
        return None
    return b[:limit].decode("utf-8", "ignore")
