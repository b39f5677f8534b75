"""Header rules of the gateway, precomputed as lowercase frozensets (no per-request regex).

Three decisions live here:

- what is *not forwarded* (hop-by-hop headers, which describe one connection, not the message;
  `Host`, `Content-Length` and `Expect`, which the gateway's own upstream connection sets;
  every `Llmtap-*` header, which is addressed to the gateway; and what a reverse proxy in
  front of it says about the client's network, `PROXY_TRAIL`, which is recorded),
- what is *never recorded* (credentials: they go upstream but never into a record, a queue, a
  store or a body file; which ones is `llmtap.redact`'s rule, the one query parameters follow),
- how the `Llmtap-*` headers a client sent become record fields.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

from llmtap.redact import (
    CHALLENGES,
    distinct_name,
    is_secret_name,
    is_secret_value,
    key_in_header_name,
    masked_name,
    masked_value,
)

LLMTAP_PREFIX = "llmtap-"
#: Names addressed to the gateway, never sent upstream nor recorded: `Llmtap_Auth` too, which
#: CGI-style stacks take for `Llmtap-Auth` (a tenant's key went to the provider that way).
LLMTAP_PREFIXES = ("llmtap-", "llmtap_")
PROPERTY_PREFIX = "llmtap-property-"

#: RFC 9110 §7.6.1 connection-scoped headers. `Proxy-Authorization` is addressed to a proxy
#: (that is us), so it is consumed here, like `Proxy-Connection`.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Request headers not sent upstream (the upstream connection sets its own framing and Host).
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}

#: What a reverse proxy in front of the gateway adds about the client and the network (its
#: address, your host names, the proxies on the way): recorded, never sent to the provider,
#: for whom the gateway is the client. A default nginx config sent users' internal addresses
#: to OpenAI that way.
PROXY_TRAIL = frozenset(
    {
        "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
        "x-forwarded-prefix", "x-forwarded-server", "x-forwarded-uri", "x-real-ip", "forwarded",
        "via", "x-client-ip", "true-client-ip", "cf-connecting-ip", "x-envoy-external-address",
        "x-original-forwarded-for", "x-original-uri", "x-original-url", "x-cluster-client-ip",
        "fastly-client-ip", "x-azure-clientip", "x-azure-socketip", "x-appengine-user-ip",
    }
)  # fmt: skip
#: Request headers never forwarded (`REQUEST_DROP` and `PROXY_TRAIL`): one set look-up a header.
FORWARD_DROP = REQUEST_DROP | PROXY_TRAIL
#: Families of what front doors add (`PROXY_TRAIL` by prefix): forwarded identities and client
#: certificates, and the access tokens and signed assertions of an authenticating proxy
#: (oauth2-proxy, AWS ALB OIDC, Azure Easy Auth, Cloudflare Access, Google IAP), which are the
#: user's credentials for your network, not the provider's business.
PROXY_TRAIL_PREFIXES = (
    "x-forwarded-", "x-original-", "x-auth-request-", "x-amzn-oidc-", "x-ms-token-",
    "x-ms-client-principal", "cf-access-", "x-goog-iap-", "x-arr-", "x-remote-", "x-originating-",
    "cf-connecting-",
)  # fmt: skip

#: Response headers not relayed to the client. Content-Length stays: the body is relayed
#: byte-for-byte (compressed bodies included), so the upstream's length is still right. An
#: upstream's own `Llmtap-Request-Id` (another llmtap in front of the provider) is replaced by
#: ours: the client got both, and `headers.get` joined them into no id at all.
RESPONSE_DROP = HOP_BY_HOP | {"llmtap-request-id"}


_PLAIN_CONNECTION = frozenset(("keep-alive", "close", "Keep-Alive", "Close"))


def connection_listed(value: str | None) -> frozenset[str]:
    """Header names a `Connection` header makes hop-by-hop (RFC 9110 7.6.1): not forwarded.
    Empty for the usual `keep-alive` / `close`, so the common case costs one set look-up."""
    if not value or value in _PLAIN_CONNECTION:
        return frozenset()
    names = {t.strip().lower() for t in value.split(",")} - {"keep-alive", "close", ""}
    return frozenset(names)


class HeaderFilter:
    """Headers as the record keeps them: lowercase names, credentials and `Llmtap-*` removed.
    A credential is known by its name, or by its value whatever the name (`X-Whatever: Bearer
    ...`, `sk-...`): a client's custom auth header is not ours to guess.

    The verdict per header *name as spelled* is cached: clients repeat the same few spellings,
    so a header costs one dict lookup instead of a lowercase copy and three set/prefix tests.
    So are short values known to be no credential (`application/json`, the SDK's user agent):
    a set lookup instead of a function call per header. Repeated headers are joined with ", "
    (RFC 9110 §5.3).
    """

    __slots__ = ("_answer", "_cache", "_drop", "_plain")

    def __init__(self, drop: frozenset[str], answer: bool = False) -> None:
        self._drop = drop
        self._answer = answer  # an answer's headers: its `WWW-Authenticate` is a challenge
        self._cache: dict[str, str | None] = {}
        self._plain: set[str] = set()  # values that are no credential (never a secret's)

    def _verdict(self, name: str) -> str | None:
        lname = name.lower()
        if lname in self._drop or lname.startswith(LLMTAP_PREFIXES) or is_secret_name(lname):
            return None
        # a key as a header's name (rev30b: `Sk-Proj-...: 1` was stored as its lowercase)
        return None if key_in_header_name(name) else lname

    def __call__(self, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
        out: dict[str, str] = {}
        cache = self._cache
        plain = self._plain
        for name, value in headers:
            lname = cache.get(name, "")  # "" = not seen yet (a real name is never empty)
            if lname == "":
                lname = self._verdict(name)
                if len(cache) < 4096:  # bounded: header names are client-controlled
                    cache[name] = lname
            if lname is None:
                continue
            if value not in plain:
                challenge = self._answer and lname in CHALLENGES  # (a request's is none: rev33)
                if is_secret_value(value, challenge):
                    continue
                if not challenge and len(value) <= 256 and len(plain) < 4096:  # bounded: ~1 MB
                    plain.add(value)
            prev = out.get(lname)
            out[lname] = value if prev is None else f"{prev}, {value}"
        return out


def recordable(
    headers: Iterable[tuple[str, str]], drop: frozenset[str], answer: bool = False
) -> dict[str, str]:
    """One-off form of `HeaderFilter` (no cache)."""
    return HeaderFilter(drop, answer)(headers)


class LlmtapHeaders:
    """The `Llmtap-*` request headers, parsed (off the latency path)."""

    __slots__ = ("omit_request", "omit_response", "properties", "session_id", "user_id")

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self.user_id: str | None = None
        self.session_id: str | None = None
        self.properties: dict[str, str] = {}
        self.omit_request = False
        self.omit_response = False
        for name, value in pairs:
            lname = name.lower()
            if "_" in lname and lname.replace("_", "-") in _OMITS:
                lname = lname.replace("_", "-")  # `Llmtap_Omit_*`: a privacy request is honoured
            if lname.startswith(PROPERTY_PREFIX):
                # Lowercase, like the header name itself is case-insensitive (RFC 9110 §5.1):
                # HTTP/2 and some SDKs lowercase every header, others send `Title-Case`, and one
                # property must not split into two by client. A name holding a key is `***`
                # (read as sent: `AIza`, `eyJ` are keys in their case only).
                prop = distinct_name(masked_name(name[len(PROPERTY_PREFIX) :]).lower(), self.properties)
                if prop:
                    self.properties[prop] = _metadata(value)
            elif lname == "llmtap-user-id":
                self.user_id = _metadata(value) or None
            elif lname == "llmtap-session-id":
                self.session_id = _metadata(value) or None
            # Said twice (a front proxy's and the client's, or `true, false`): any yes is a yes;
            # the last one won, so a client could undo its proxy's omission.
            elif lname == "llmtap-omit-request":
                self.omit_request = self.omit_request or _truthy(value)
            elif lname == "llmtap-omit-response":
                self.omit_response = self.omit_response or _truthy(value)


_OMITS = frozenset(("llmtap-omit-request", "llmtap-omit-response"))


def _metadata(value: str) -> str:
    """A user id, session id or property value as recorded: one that reads as a credential
    (`Bearer ...`, a key's shape, a JWT) is `***`, as it would be dropped in any other header."""
    return masked_value(_ext_value(value))


def _ext_value(value: str) -> str:
    """`UTF-8''Jos%C3%A9` as `José` (RFC 8187's ext-value): the Python OpenAI, Anthropic and
    Google SDKs send header values as ASCII only, so a user id, session id or property value in
    any other script can only travel percent-encoded. Bytes that are no UTF-8 are Latin-1, as
    HTTP has it: Node's `fetch` (every Node SDK) sends `José` so, and the two runtimes' users
    were two (the clients audit). Anything else is kept as sent."""
    if _UNDECODED.search(value):
        try:  # the bytes as they came (aiohttp's escape), each one a Latin-1 character
            value = value.encode("utf-8", "surrogateescape").decode("latin-1")
        except UnicodeEncodeError:  # another lone surrogate: not bytes that came
            pass
    if value[:7].lower() != "utf-8''":
        return value
    try:
        return unquote(value[7:], errors="strict")
    except UnicodeDecodeError:
        return value


#: What aiohttp makes of header bytes that are no UTF-8: `surrogateescape`'s stand-ins.
_UNDECODED = re.compile("[\udc80-\udcff]")


def _truthy(value: str) -> bool:
    return any(v.strip().lower() in ("true", "1", "yes", "on") for v in value.split(","))
