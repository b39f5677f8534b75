"""The floor for one Python hop: a minimal aiohttp reverse proxy with no logging at all.

bench_gateway.py runs it next to `llmtap up` so that llmtap's cost is judged against what any
aiohttp proxy must pay (parse the request, open/reuse an upstream connection, relay the body
chunk by chunk), not against a direct connection that no proxy can match.  It mirrors the
gateway's routing (`/openai/<path>` -> upstream `/<path>`), uses uvloop and one pooled
ClientSession, and streams with `iter_any()` so SSE events pass through as they arrive.

    python bench/passthrough.py --port 8790 --upstream http://127.0.0.1:9999
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones aiohttp sets itself for the new hop.
_HOP = frozenset(
    h.lower()
    for h in (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    )
)


def make_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")
    app = web.Application()
    sessions: list[ClientSession] = []

    async def start(_: web.Application) -> None:
        sessions.append(
            ClientSession(
                connector=TCPConnector(limit=1000, ttl_dns_cache=None),
                timeout=ClientTimeout(total=None, sock_read=600),
                auto_decompress=False,  # relay bytes as sent
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            )
        )

    async def stop(_: web.Application) -> None:
        await sessions[0].close()

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def proxy(request: web.Request) -> web.StreamResponse:
        url = f"{base}/{request.match_info['tail']}"
        if request.query_string:
            url += "?" + request.query_string
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        async with sessions[0].request(request.method, url, headers=headers, data=body) as up:
            resp = web.StreamResponse(
                status=up.status,
                reason=up.reason,
                headers={k: v for k, v in up.headers.items() if k.lower() not in _HOP},
            )
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except ConnectionResetError:  # the client went away mid-stream; nothing to relay to
                pass
            return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/openai/{tail:.*}", proxy)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9999")
    args = parser.parse_args()
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
        shutdown_timeout=1.0,
        handle_signals=True,
    )


if __name__ == "__main__":
    main()
