"""The reverse proxy: the one piece of llmtap on the client's latency path.

Per request it does only what relaying needs — one pass over the request headers, one upstream
call on a pooled keep-alive connection, one write per upstream chunk — plus a `Capture` of raw
facts handed to the publisher after the last byte went out. No logging calls, no JSON work
(except the opt-in OpenAI stream-usage rewrite), no regex, no tasks of its own.

Relaying rules:

- Method, path, query string and body go upstream unchanged; headers too, minus hop-by-hop
  ones, `Host` (set from the upstream URL) and `Llmtap-*` (addressed to us). aiohttp is told not
  to add `Accept`, `Accept-Encoding`, `User-Agent` or `Content-Type` of its own, and not to
  decompress (`auto_decompress=False`), so compressed bodies pass byte-exact both ways.
- Every upstream answer, 4xx/5xx included, reaches the client as sent. Only when there is no
  answer does the gateway speak: 502 (`llmtap_upstream_unreachable`) or 504
  (`llmtap_upstream_timeout`), JSON, like the providers' own errors.
- Streams (`text/event-stream`) are written chunk by chunk as they arrive; other bodies too, but
  with the headers coalesced into the first write. A client that goes away stops the upstream
  read at once (handler cancellation); an upstream that breaks mid-body is relayed as a broken
  body (the client's connection is closed without the final chunk).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from llmtap.gateway.capture import REQUEST_TAIL, Capture
from llmtap.gateway.headers import (
    FORWARD_DROP,
    LLMTAP_PREFIXES,
    PROXY_TRAIL_PREFIXES,
    RESPONSE_DROP,
    connection_listed,
)
from llmtap.gateway.orphans import Orphanage
from llmtap.ids import canonical_id, new_id
from llmtap.providers import Provider, Route, StreamFilter, routes
from llmtap.redact import redact_text, redact_url

if TYPE_CHECKING:
    from llmtap.config import Settings

REQUEST_ID_HEADER = "Llmtap-Request-Id"
_SSE = "text/event-stream"
_URL_CACHE_MAX = 4096

#: aiohttp's client adds these when the caller did not; a proxy must not (an added
#: `Accept-Encoding: gzip` would make the upstream compress for a client that cannot decode).
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


#: An error answer read whole to ask the provider whether it refuses a rewrite (`_small_body`).
_REFUSALS = frozenset({400, 422})
log = logging.getLogger("llmtap.gateway")

_SMALL_BODY = 65536
#: Bytes the client's connection may hold unsent before a write to it is timed: below the
#: transport's high-water mark (64 KiB), no write can pause it (and so make aiohttp wait).
_BACKED_UP = 16 * 1024


#: aiohttp's parser errors as their payload errors quote them: `<TransferEncodingError: 400,
#: message='Not enough data ...'>`. The 400 is the parser's code, not any status of this request.
_PARSER_REPR = re.compile(r"<\w+Error: \d{3}, message='([^']*)'>")


def _plain(exc: BaseException) -> str:
    """An exception's text without aiohttp's parser-error reprs (their message stays)."""
    return _PARSER_REPR.sub(r"\1", str(exc))


class ClientStalled(ConnectionError):
    """The client read nothing of the answer for `client_stall_timeout` seconds."""


#: Bytes of one read kept for the next, while looking for the first token: longer than any
#: `token_marker` match.
_CARRY = 64
#: Header values aiohttp refuses to write (any control character but tab).
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _identity(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers asking for an uncompressed answer."""
    out = [(k, v) for k, v in headers if k.lower() != "accept-encoding"]
    out.append(("Accept-Encoding", "identity"))
    return out


async def _small_body(upstream: aiohttp.ClientResponse) -> bytes | None:
    """The body of an answer that says it is small, read whole; None (nothing read) if it says
    it is larger. Without a length (chunked), up to `_SMALL_BODY` bytes and a little more are
    read: what was read is relayed first either way.

    An upstream that breaks mid-body leaves what came: it is relayed first, then the relay
    meets the same error and cuts the client's connection as it would have.
    """
    length = upstream.headers.get("Content-Length")
    if length is not None and (not length.isdigit() or int(length) > _SMALL_BODY):
        return None
    limit = _SMALL_BODY + 1 if length is None else int(length)
    got = b""
    while len(got) < limit:
        try:
            chunk = await upstream.content.readany()
        except (aiohttp.ClientError, TimeoutError, OSError):
            break  # the stream keeps the error for the relay
        if not chunk:
            break
        got += chunk
    return got


class CaptureSink(Protocol):
    def submit(self, capture: Capture) -> None: ...


LocalHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

#: `Llmtap-Auth` header value (or None) → tenant, or None to refuse with 401 before anything
#: goes upstream. May return an awaitable (a key lookup that misses its cache).
TenantResolver = Callable[[str | None], "str | Awaitable[str | None] | None"]


class _Coalesced(web.StreamResponse):
    """A response whose headers leave in the same write as the first body bytes.

    For non-stream bodies that saves a syscall per request; streams keep aiohttp's default
    (headers at once) so an SSE client sees the response start before the first event.
    """

    _send_headers_immediately = False


def _origin_form(raw: str) -> str:
    """The path and query of an absolute-form request target (RFC 9112 3.2.2; the scheme in
    any case): `http://host?q=/openai/x` is the path `/` with a query, not `/openai/x`."""
    if raw[:8].lower().startswith(("http://", "https://")):
        authority = raw.find("//") + 2
        ends = [i for i in (raw.find(c, authority) for c in "/?#") if i >= 0]
        if not ends:
            return "/"
        end = min(ends)
        return raw[end:] if raw[end] == "/" else "/" + raw[end:]
    return raw


def _tidy(rest: str) -> str:
    """What the upstream is sent after the route's base: no fragment (yarl drops it, and the
    record and the provider's path checks named a path never requested: a `#` hid a stream's
    usage), no dot segments (`/groq/../x` left the route's base on upstreams that resolve
    them; resolved here, never above the base)."""
    cut = rest.find("#")
    if cut >= 0:
        rest = rest[:cut]
    q = rest.find("?")
    path = rest if q < 0 else rest[:q]
    if "/." not in path and "%2e" not in path and "%2E" not in path:
        return rest
    kept: list[str] = []
    segments = path.split("/")[1:]
    for seg in segments:
        plain = seg.replace("%2e", ".").replace("%2E", ".")
        if plain == "..":
            if kept:
                kept.pop()
        elif plain != ".":
            kept.append(seg)
    last = segments[-1].replace("%2e", ".").replace("%2E", ".") if segments else ""
    path = "/" + "/".join(kept) + ("/" if kept and last in (".", "..") else "")
    return path if q < 0 else path + rest[q:]


def _under(url: str, base: str) -> bool:
    """Whether `url` is `base` or below it (not `https://api.example.com.evil/`); the scheme
    and host ignore case (`HTTP://API.example.com/...` is the same place)."""
    n = len(base)
    return url[:n].lower() == base.lower() and url[n : n + 1] in ("", "/", "?", "#")


def _here(request: web.BaseRequest, route: str, public: str | None) -> str | None:
    """This route's URL as the client reached it: where an upstream URL handed to the client
    must point, or the client goes round the gateway (Gemini's resumable uploads: every file's
    bytes unlogged, and lost to a client that can reach only the gateway). `LLMTAP_PUBLIC_URL`
    when set; else what a proxy in front says (`Forwarded`, `X-Forwarded-Proto/-Host/-Port/
    -Prefix`: rev17, a prefix nginx strips was lost and the upload went to no route); else the
    request's own `Host`."""
    if public is not None:
        return f"{public}/{route}"
    proto, host = _forwarded(request.headers.get("Forwarded", ""))
    headers = request.headers
    proto = proto or _first(headers.get("X-Forwarded-Proto", "")).lower()
    host = host or _first(headers.get("X-Forwarded-Host", ""))
    scheme = proto if proto in ("http", "https") else request.scheme
    if _port(host) is None:
        host = request.host  # none, or no host name (rev15: spaces, `..` and a query were used)
        if _port(host) is None:
            return None  # no URL of ours to give (a `Host: a b`): the upstream's is left
    elif _port(host) == "":  # the proxy's own port, when it says it apart
        port = _first(headers.get("X-Forwarded-Port", ""))
        # ASCII digits only: a superscript two or full-width digits are digits to str.isdigit
        # (rev18a: int() raised, a 500 and the request unlogged)
        default = {"http": "80", "https": "443"}.get(scheme)
        if _PORT.fullmatch(port) and 0 < int(port) < 65536 and port != default:
            host = f"{host}:{port}"
    return f"{scheme}://{host}{_prefix(request)}/{route}"


def _first(value: str) -> str:
    """A header a chain of proxies appends to: the first (the outermost) value."""
    return value.split(",", 1)[0].strip()


def _forwarded(value: str) -> tuple[str, str]:
    """`proto` and `host` of RFC 7239's first element (the proxy nearest the client)."""
    proto = host = ""
    for pair in _first(value).split(";"):
        name, _, v = pair.strip().partition("=")
        v = v.strip().strip('"')
        if name.lower() == "proto":
            proto = v.lower()
        elif name.lower() == "host":
            host = v
    return proto, host


def _prefix(request: web.BaseRequest) -> str:
    """`X-Forwarded-Prefix`: the path a proxy in front strips before the gateway's routes
    (`/v1proxy`); only a plain path is taken, never `..` or a query."""
    prefix = _first(request.headers.get("X-Forwarded-Prefix", "")).rstrip("/")
    if not prefix or not _PREFIX.fullmatch(prefix) or "/../" in prefix + "/" or "/./" in prefix + "/":
        return ""
    return prefix


#: A host (name, IPv4 or [IPv6]) and an optional port, as a `Host` header holds one.
_HOST = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?"
)
_PORT = re.compile(r"[0-9]{1,5}")
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")


def _port(value: str) -> str | None:
    """A `Host` value's port ("" for none), or None when it is no host (a port over 65535 too)."""
    found = _HOST.fullmatch(value)
    if found is None or (found[1] is not None and not 0 < int(found[1]) < 65536):
        return None
    return found[1] or ""


def _relocated(value: str, request: web.BaseRequest, route: tuple[str, str], public: str | None) -> str:
    """An upstream URL rewritten to the gateway's route: absolute under the route's base, or
    a path under the base's own (`Location: /v1/models` took the client to no route)."""
    base = route[1]
    if _under(value, base):
        here = _here(request, route[0], public)
        return value if here is None else here + value[len(base) :]
    if value.startswith("/") and not value.startswith("//"):
        prefix = urlsplit(base).path.rstrip("/")
        if _under(value, prefix) if prefix else True:
            mount = urlsplit(public).path.rstrip("/") if public is not None else _prefix(request)
            return f"{mount}/{route[0]}{value[len(prefix) :]}"
    return value


def _json_error(status: int, kind: str, message: str, request_id: str | None) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    body = orjson.dumps({"error": {"type": kind, "message": message}})
    return web.Response(status=status, body=body, headers=headers)


#: Header sizes both sides of the gateway accept. aiohttp's defaults (8 KiB lines, 128
#: headers) are too small for some SDKs' headers (long tokens, cookies), for clients sending
#: many `Llmtap-Property-*` headers (the record keeps the first `limits.MAX_PROPERTIES` and
#: says so) and for some upstreams' answers: nothing the upstream or the client would take is
#: refused for its headers' sake.
MAX_LINE_SIZE = MAX_FIELD_SIZE = 65536
MAX_HEADERS = 1024
HEADER_LIMITS: dict[str, int] = {
    "max_line_size": MAX_LINE_SIZE,
    "max_field_size": MAX_FIELD_SIZE,
    "max_headers": MAX_HEADERS,
}


class Proxy:
    """The request handler. `handle` is given to aiohttp's low-level server."""

    def __init__(
        self,
        settings: Settings,
        publisher: CaptureSink,
        resolve_tenant: TenantResolver,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.resolve_tenant = resolve_tenant
        self.session: aiohttp.ClientSession | None = None
        #: Gateway-own routes by exact path (`/healthz`, `/metrics`), set by the service.
        self.local: dict[str, LocalHandler] = {}
        #: The one routing table: first path segment → provider and upstream.
        self.routes: dict[str, Route] = routes(settings)
        self._max_body = settings.max_body_bytes
        self._urls: dict[str, URL] = {}
        #: Upstreams (base URLs) that refused a request rewrite: sent the client's own since.
        self.refuse_rewrite: set[str] = set()
        #: Set when the gateway stops: responses then say `Connection: close`, so clients and
        #: load balancers learn from the answer itself not to send more on that connection.
        self.draining = False
        #: Requests read but never handed to `handle` when their connection was lost: recorded.
        self.orphans = Orphanage(self.handle, log)

    async def start(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=s.upstream_max_connections,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
            enable_cleanup_closed=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=None,
                sock_connect=s.upstream_connect_timeout,
                sock_read=s.upstream_read_timeout,
            ),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
            trust_env=False,
            raise_for_status=False,
            requote_redirect_url=False,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _url(self, target: str) -> URL:
        url = self._urls.get(target)
        if url is None:
            url = URL(target, encoded=True)
            if len(self._urls) >= _URL_CACHE_MAX:
                self._urls.clear()
            self._urls[target] = url
        return url

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = request.raw_path
        if raw[:1] != "/":  # absolute-form (`POST http://host/openai/...`), which servers must take
            if request.method == "CONNECT":  # authority-form (`host:port`): a tunnel, not proxied
                return _json_error(405, "llmtap_method_not_allowed", "CONNECT is not proxied", None)
            raw = _origin_form(raw)
        slash = raw.find("/", 1)
        route = self.routes.get(raw[1:slash]) if slash > 0 else None
        if route is None:
            local = self.local.get(request.path)
            if local is not None:
                return await local(request)
            names = ", ".join(f"/{n}/..." for n in self.routes)
            first = raw[1:slash] if slash > 0 else raw[1:]
            hint = "; /azure/... is on once LLMTAP_AZURE_BASE_URL is set" if first == "azure" else ""
            if first in ("", "api", "static"):
                port = self.settings.server_port
                hint = f" (the dashboard and /api/... are on the server's port, LLMTAP_SERVER_PORT: {port})"
            return _json_error(
                404,
                "llmtap_not_found",
                f"no route for {request.path}: use {names}{hint}",
                None,  # not logged: an id would point at no record
            )
        if request.method == "CONNECT":  # a tunnel: nothing to log, no path to send it to
            return _json_error(405, "llmtap_method_not_allowed", "CONNECT is not proxied", None)
        provider = route.provider
        base = route.base
        rest = _tidy(raw[slash:])

        started = time.time()
        t0 = time.perf_counter()

        # One pass over the headers: what goes upstream, and the Llmtap-* ones for us.
        forward: list[tuple[str, str]] = []
        llmtap: list[tuple[str, str]] | None = None
        request_id: str | None = None
        auth: str | None = None
        two_keys = False  # two different Llmtap-Auth values
        expect: str | None = None
        # aiohttp's client keeps only the last of two headers whose names differ in case
        # (`X-A` then `x-a`); a repeat is sent with its first spelling, so both values arrive.
        spelling: dict[str, str] = {}
        hop: frozenset[str] = frozenset()  # names the client's `Connection` header lists
        for name, value in request.headers.items():
            lname = name.lower()
            if lname in FORWARD_DROP:
                if lname == "expect":
                    expect = value
                elif lname == "connection" and (listed := connection_listed(value)):
                    hop = hop | listed if hop else listed
                continue
            if lname.startswith(PROXY_TRAIL_PREFIXES):
                continue  # recorded (the record's own filter), not forwarded
            if lname.startswith(LLMTAP_PREFIXES):
                if llmtap is None:
                    llmtap = []
                llmtap.append((name, value))
                if lname == "llmtap-request-id":
                    request_id = value
                elif lname == "llmtap-auth":
                    if auth is not None and value != auth:
                        two_keys = True
                    auth = value
                continue
            forward.append((spelling.setdefault(lname, name), value))
        if hop:
            forward = [(n, v) for n, v in forward if n.lower() not in hop]

        if request_id is not None:
            request_id = canonical_id(request_id)
        if request_id is None:
            request_id = new_id()

        if two_keys and self.settings.multi_tenant:
            # A front proxy's key and the client's own: which tenant pays is not ours to guess
            # (the last one won, so a client could bill another tenant's key over its proxy's).
            return _json_error(401, "llmtap_unauthorized", "two different Llmtap-Auth keys", None)
        resolved = self.resolve_tenant(auth)
        if resolved is None or isinstance(resolved, str):
            tenant = resolved
        else:  # an async resolver (a key lookup)
            tenant = await resolved
        if tenant is None:
            # Not logged (a tenant's log is for its keys' requests): no id to look up.
            return _json_error(401, "llmtap_unauthorized", "missing or unknown Llmtap-Auth key", None)

        lost: BaseException | None = None
        try:
            if (
                expect is not None
                and expect.lower() == "100-continue"
                and request.version >= (1, 1)
                and request.transport is not None  # an orphan: its body came, or never will
            ):
                # We read the whole body before going upstream, so say so now (like aiohttp's
                # router does); otherwise curl & co. wait a second before sending it. A client
                # gone by then is recorded like one gone mid-upload (it was not, at all).
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await request.read()
        except (asyncio.CancelledError, ConnectionError) as e:
            # The client hung up mid-upload, or llmtap is stopping (aiohttp then drops what
            # still arrives): nothing goes upstream, but the request is still recorded.
            body, lost = b"", e
        except MemoryError as e:  # a body larger than the memory left (many huge uploads at once)
            body, lost = b"", e
        except HttpProcessingError as e:  # the body turned malformed (`headertimeout`): a 400
            body, lost = b"", e
        method = request.method
        q = rest.find("?")
        path = rest if q < 0 else rest[:q]
        target = base + rest
        provider = provider.wire(path)

        upstream_body = body
        stripper: StreamFilter | None = None
        sent_headers = forward
        rewrite_key = provider.rewrite_scope(base, "" if q < 0 else rest[q + 1 :])
        if rewrite_key not in self.refuse_rewrite:
            rewritten = provider.rewrite_request(method, path, body, "" if q < 0 else rest[q + 1 :])
            if rewritten is not None:
                upstream_body, stripper = rewritten
                # The filter reads the stream's bytes: they must come uncompressed.
                sent_headers = _identity(forward)

        max_body = self._max_body
        cap = Capture(
            request_id,
            tenant,
            provider.name,
            method,
            path,
            target,
            request.headers.items(),
            llmtap,
            body if len(body) <= max_body else body[:max_body],
            len(body),
            started,
            t0,
            max_body,
        )
        if len(body) > max_body:
            cap.request_tail = body[-REQUEST_TAIL:]
        if isinstance(lost, MemoryError):
            why = f"llmtap ran out of memory reading the request body ({request.content_length or '?'} bytes)"
            resp = _json_error(503, "llmtap_out_of_memory", why + "; nothing was sent upstream", cap.id)
            cap.status, cap.response_headers = 503, resp.headers.items()
            cap.add(resp.body)  # type: ignore[arg-type]
            self._finish(cap, "completed", why)  # answered in full, by the gateway
            return resp
        if isinstance(lost, HttpProcessingError):
            # The reason's first line only: aiohttp quotes the client's bytes after it.
            reason = (str(lost.message).strip().splitlines() or [type(lost).__name__])[0].rstrip(": ")
            why = f"malformed request body: {reason}"
            resp = _json_error(400, "llmtap_bad_request", why + "; nothing was sent upstream", cap.id)
            resp.force_close()  # what follows on the connection cannot be read
            cap.status, cap.response_headers = 400, resp.headers.items()
            cap.add(resp.body)  # type: ignore[arg-type]
            self._finish(cap, "completed", why)  # answered in full, by the gateway
            return resp
        if lost is not None:
            cancelled = isinstance(lost, asyncio.CancelledError)
            self._finish(cap, "client_disconnected", self._gone("before its body arrived", cancelled))
            if cancelled:
                raise lost
            return web.Response(status=400)  # nobody is there to read it
        if request.transport is None:
            # Its connection is gone already: the client left as its body ended, or this is a
            # request aiohttp read but never handed over (`gateway.orphans`). Nobody would read
            # the answer: nothing goes upstream (and nothing is billed).
            who = "llmtap stopped" if self.draining else "client went away"
            self._finish(cap, "client_disconnected", f"{who} before the request was sent upstream")
            return web.Response(status=400)

        session = self.session
        assert session is not None
        read_ahead: bytes | None = None  # an error body read to decide on a resend, relayed first
        while True:
            try:
                upstream = await session.request(
                    method,
                    self._url(target),
                    headers=sent_headers,
                    data=upstream_body or None,
                    allow_redirects=False,
                )
            except asyncio.CancelledError:
                self._finish(
                    cap, "client_disconnected", self._gone("before the upstream answered", cancelled=True)
                )
                raise
            except TimeoutError as e:  # aiohttp's connect/read timeouts are TimeoutErrors too
                s = self.settings
                if isinstance(e, aiohttp.ConnectionTimeoutError):
                    why = f"could not connect to {redact_url(base)} within {s.upstream_connect_timeout:g} s"
                else:
                    why = f"{redact_url(base)} sent no response within {s.upstream_read_timeout:g} s"
                return self._gateway_error(cap, 504, "upstream_timeout", why)
            except (aiohttp.ClientError, OSError, ValueError) as e:
                return self._gateway_error(
                    cap,
                    502,
                    "upstream_unreachable",
                    f"could not reach {redact_url(base)}: {type(e).__name__}: {redact_text(str(e))}",
                )
            if stripper is None or upstream.status not in _REFUSALS:
                break
            try:
                read_ahead = await _small_body(upstream)
            except asyncio.CancelledError:
                upstream.close()
                self._finish(
                    cap, "client_disconnected", self._gone("before the upstream answered", cancelled=True)
                )
                raise
            if read_ahead is None or not provider.refuses_rewrite(upstream.status, read_ahead):
                break
            # The upstream refused what the rewrite added (Mistral refuses any field it does not
            # know): send the client's own request instead, and never rewrite for this upstream
            # again (one extra round trip per process).
            upstream.release()
            self.refuse_rewrite.add(rewrite_key)
            upstream_body, stripper, sent_headers, read_ahead = body, None, forward, None

        try:
            return await self._relay(
                request, upstream, cap, stripper, request_id, read_ahead, provider, path, (raw[1:slash], base)
            )
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        cap: Capture,
        stripper: StreamFilter | None,
        request_id: str,
        read_ahead: bytes | None,
        provider: Provider,
        path: str,
        route: tuple[str, str],  # (name, upstream base URL): to rewrite `relocated_headers`
    ) -> web.StreamResponse:
        cap.t_headers = time.perf_counter()
        cap.status = upstream.status
        up_headers = upstream.headers
        cap.response_headers = up_headers.items()
        sse = up_headers.get("Content-Type", "").lower().startswith(_SSE)  # media types ignore case
        cap.streamed = sse
        marker = provider.token_marker(path) if sse else None  # time to first token: streams only
        if not sse or up_headers.get("Content-Encoding", "identity").lower() != "identity":
            # Compressed although asked not to: relayed as it is, the filter cannot read it.
            stripper = None

        headers: list[tuple[str, str]] = []
        hop = connection_listed(up_headers.get("Connection"))
        relocated = provider.relocated_headers
        for name, value in up_headers.items():
            lname = name.lower()
            if lname in RESPONSE_DROP or lname in hop:
                continue
            if lname in relocated:
                try:
                    value = _relocated(value, request, route, self.settings.public_url)
                except Exception:  # a bug here must not cost the record: the upstream's URL
                    log.exception("could not rewrite the %s header of request %s", name, request_id)
            if stripper is not None and lname == "content-length":
                continue  # we change the body's length
            if not value.isprintable() and _FORBIDDEN.search(value) is not None:
                continue  # aiohttp would refuse to send the whole answer; the record keeps it
            headers.append((name, value))
        headers.append((REQUEST_ID_HEADER, request_id))
        if sse and "X-Accel-Buffering" not in up_headers:
            # nginx buffers a proxied answer whole unless told not to (or configured so): a
            # stream behind a default nginx reached the client in one piece at its end.
            headers.append(("X-Accel-Buffering", "no"))

        reason = upstream.reason
        if reason and not reason.isprintable() and _FORBIDDEN.search(reason) is not None:
            reason = None  # aiohttp's standard phrase instead of one it refuses to write
        resp = (web.StreamResponse if sse else _Coalesced)(
            status=upstream.status, reason=reason, headers=headers
        )
        if self.draining or request.version < (1, 1):
            # HTTP/1.0 with `keep-alive`: an answer of no length (a stream) ends only with the
            # connection, which aiohttp would keep open: the client waited for ever.
            resp.force_close()
        content = upstream.content
        carry = b""  # the last read's end, while looking for the first token's marker
        relayed = False  # every body byte was handed to the client's connection
        client = request.transport
        try:
            await resp.prepare(request)
            if read_ahead:  # already read from the upstream: it comes first
                if marker is None or marker.search(read_ahead):
                    cap.t_first = time.perf_counter()
                cap.add(read_ahead)
                await resp.write(read_ahead)
            while True:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError, OSError) as e:
                    tail = stripper.flush() if stripper is not None else b""
                    return await self._cut(request, resp, upstream, cap, tail, e)
                if not chunk:
                    break
                if not cap.t_first:
                    if (
                        marker is None
                        or marker.search(chunk)
                        or (carry and marker.search(carry + chunk[:_CARRY]))
                    ):
                        cap.t_first = time.perf_counter()  # the first token's arrival (`token_marker`)
                    else:
                        carry = (carry + chunk)[-_CARRY:]  # a marker split across reads
                cap.add(chunk)
                if stripper is not None:
                    chunk = stripper.feed(chunk)
                    if not chunk:
                        continue
                if client is not None and client.get_write_buffer_size() + len(chunk) > _BACKED_UP:
                    await self._write_or_stall(resp, client, chunk)  # the client reads slower than it gets
                else:  # no write under the mark can make aiohttp wait for the client
                    await resp.write(chunk)
            if stripper is not None:
                rest = stripper.flush()
                if rest:
                    await resp.write(rest)
            relayed = True
            if client is not None and client.get_write_buffer_size() > _BACKED_UP:
                await self._write_or_stall(resp, client, None)  # the end waits for the client too
            else:
                await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError) as e:
            # The client went away. If that was only during the final framing, it had the
            # whole body (the record builder also spots streams that reached their end marker).
            upstream.close()
            if isinstance(e, ClientStalled) and client is not None:
                client.abort()
            if relayed and not isinstance(e, ClientStalled):
                self._finish(cap, "completed", None)
            elif isinstance(e, ClientStalled):
                self._finish(cap, "client_disconnected", str(e))
            else:
                cancelled = isinstance(e, asyncio.CancelledError)
                self._finish(cap, "client_disconnected", self._gone("mid-response", cancelled))
            if isinstance(e, asyncio.CancelledError):
                raise
            return resp
        except Exception as e:  # a bug, or an answer aiohttp will not write: still a record
            log.exception("could not relay the upstream's answer to request %s", request_id)
            if not resp.prepared:  # nothing sent yet: say so to the client
                upstream.close()
                why = f"llmtap could not relay the upstream's answer: {type(e).__name__}: {e}"
                return self._gateway_error(cap, 502, "upstream_cut", why)
            return await self._cut(request, resp, upstream, cap, b"", e, "llmtap could not relay")
        self._finish(cap, "completed", None)
        return resp

    async def _write_or_stall(
        self, resp: web.StreamResponse, client: asyncio.Transport, chunk: bytes | None
    ) -> None:
        """Write to a client that is behind (None: the end of the answer), giving up once it
        took nothing for `client_stall_timeout` seconds: a client that stops reading held its
        upstream connection (and a place in the pool every other request waits for) for ever.
        Progress, not the write, is timed: one write of a large read may take a slow link
        minutes while its bytes do flow (what is left unsent only shrinks meanwhile)."""
        stall = self.settings.client_stall_timeout
        write = asyncio.ensure_future(resp.write_eof() if chunk is None else resp.write(chunk))
        unsent = client.get_write_buffer_size()
        try:
            while True:
                done, _ = await asyncio.wait({write}, timeout=stall)
                if done:
                    return write.result()
                now = client.get_write_buffer_size()
                if now >= unsent:
                    break
                unsent = now  # it took some: wait on
        except asyncio.CancelledError:
            write.cancel()
            raise
        write.cancel()
        raise ClientStalled(
            f"client read nothing for {stall:g} s while the answer waited"
            " (LLMTAP_CLIENT_STALL_TIMEOUT): cut off"
        )

    async def _cut(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        cap: Capture,
        tail: bytes,
        exc: BaseException,
        what: str | None = None,
    ) -> web.StreamResponse:
        """The upstream broke mid-body (or llmtap could not pass it on, `what`): pass on what
        came, then end the client's connection without a proper end of body, so the client
        sees the truncation."""
        upstream.close()
        what = what or f"upstream {'timed out' if isinstance(exc, TimeoutError) else 'broke'}"
        self._finish(cap, "upstream_cut", f"{what} mid-response: {type(exc).__name__}: {_plain(exc)}")
        transport = request.transport
        try:  # also sends the headers if nothing was written yet
            if transport is not None and transport.get_write_buffer_size() + len(tail) > _BACKED_UP:
                await self._write_or_stall(resp, transport, tail)
            else:
                await resp.write(tail)
        except Exception:  # the client's connection is closed next either way
            if transport is not None:
                transport.abort()  # what it did not take will not be taken
        if transport is not None:
            transport.close()
        resp.force_close()
        return resp

    def _gone(self, when: str, cancelled: bool) -> str:
        """Why the client's connection ended early: the client left, or llmtap stopped (a
        request still running when the gateway's `shutdown_timeout` runs out is cancelled)."""
        if cancelled and self.draining:
            return f"llmtap stopped {when}: the request outlasted LLMTAP_SHUTDOWN_TIMEOUT"
        return f"client went away {when}"

    def _gateway_error(self, cap: Capture, status: int, outcome: str, message: str) -> web.Response:
        resp = _json_error(status, f"llmtap_{outcome}", message, cap.id)
        if self.draining:
            resp.force_close()
        cap.status = status
        cap.response_headers = resp.headers.items()
        body = resp.body
        if isinstance(body, bytes):
            cap.add(body)
        self._finish(cap, outcome, message)
        return resp

    def _finish(self, cap: Capture, outcome: str, error: str | None) -> None:
        if cap.t_end:  # finished already (a cut whose last write was cancelled): one record
            return
        cap.t_end = time.perf_counter()
        cap.outcome = outcome  # type: ignore[assignment]
        cap.error = error
        self.publisher.submit(cap)
