"""What a browser must not be able to do to the server: the guards in front of every route.

The single-tenant API has no credentials (it binds to loopback), so the browser of the user who
runs llmtap is the attacker's way in:

- **DNS rebinding**: a page on `evil.example` re-points its name at 127.0.0.1 and then reads
  `http://evil.example:8788/api/v1/requests` as same-origin. Its requests carry
  `Host: evil.example`, so only `Host` values in `LLMTAP_ALLOWED_HOSTS` (default: localhost,
  127.0.0.1, ::1 and the bind host) are answered; anything else gets 421. `/healthz` and
  `/metrics` are exempt (load balancers and scrapers address pods by IP; they carry no records).
- **Cross-site POSTs**: a form or `fetch(..., {mode: "no-cors"})` can POST `text/plain` to any
  origin without a preflight. Every POST/PUT/PATCH must be `application/json` (415 otherwise),
  which a cross-site page cannot send without a CORS preflight that the server never grants.
- **Injected script in the dashboard**: a strict Content-Security-Policy (no inline script, no
  other origin), `nosniff` and `frame-ancestors 'none'` on every response.

The gateway has no such guard: SDKs reach it through load balancers under any `Host`, and it
serves no stored data (README, "Security").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from llmtap.config import Settings, normalize_host

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths answered whatever the `Host`: probes address the server by pod IP; nothing stored here.
HOST_EXEMPT = frozenset({"/healthz", "/livez", "/metrics"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def host_name(header: str) -> str:
    """The name part of a `Host` header: `[::1]:8788` → `::1`, `Example.com.:80` → `example.com`."""
    h = header.strip()
    if h.startswith("["):
        end = h.find("]")
        return normalize_host(h[: end + 1] if end > 0 else h)
    name, sep, port = h.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        h = name
    return normalize_host(h)


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    if "*" in allowed:
        return True
    if not header:
        return False
    name = host_name(header)
    if name in allowed:
        return True
    return any(a.startswith(".") and (name.endswith(a) or name == a[1:]) for a in allowed)


def _error(status: int, message: str) -> web.Response:
    from llmtap.server.api import error_response

    return error_response(status, message)


def guard(settings: Settings) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The outermost middleware: Host check, then the JSON-only rule for requests with a body."""
    allowed = settings.allowed_host_names

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in HOST_EXEMPT and not host_allowed(request.headers.get("Host"), allowed):
            shown = (request.headers.get("Host") or "")[:100]
            return _error(
                421,
                f"this server does not answer for host {shown!r}: add it to LLMTAP_ALLOWED_HOSTS"
                " (a guard against DNS rebinding)",
            )
        if request.method in _BODY_METHODS and request.content_type != "application/json":
            return _error(
                415,
                f"{request.method} needs 'Content-Type: application/json' (a body or not: a guard"
                " against cross-site requests), got "
                + (repr(request.content_type) if "Content-Type" in request.headers else "none"),
            )
        return await handler(request)

    return middleware


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every response (static files, errors, 404s) gets the headers."""
    for k, v in HEADERS.items():
        response.headers.setdefault(k, v)
