"""The floor for one Python hop: a minimal aiohttp reverse proxy with no logging at all.

bench_gateway.py runs it next to `llmtap up` so that llmtap's cost is judged against what any
aiohttp proxy must pay (parse the request, reuse a pooled upstream connection, relay the body),
not against a direct connection that no proxy can match.  It mirrors the gateway's routing
(`/openai/<path>` -> upstream `/<path>`) and takes the same cheap, public-API shortcuts a careful
proxy would, so that it is a floor and not a straw man: uvloop, aiohttp's low-level `web.Server`
(no router, no middlewares), one pooled ClientSession without a cookie jar, no access log.
Streams (`text/event-stream`) are relayed with `iter_any()` as chunks arrive; other bodies are
read whole and sent in one write with their headers.

    python bench/passthrough.py --port 8790 --upstream http://127.0.0.1:9999
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones aiohttp sets itself for the new hop.
_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
    | {"host", "content-length"}
)


class Passthrough:
    def __init__(self, upstream: str) -> None:
        self.base = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
            auto_decompress=False,  # relay bytes as sent
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.raw_path
        if not path.startswith("/openai/"):
            if path == "/healthz":
                return web.Response(text="ok")
            return web.Response(status=404, text="not found")
        assert self.session is not None
        url = self.base + path[len("/openai") :]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        async with self.session.request(request.method, url, headers=headers, data=body) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if not up.content_type.startswith("text/event-stream"):
                return web.Response(status=up.status, reason=up.reason, headers=out, body=await up.read())
            resp = web.StreamResponse(status=up.status, reason=up.reason, headers=out)
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except ConnectionResetError:  # the client went away mid-stream; nothing to relay to
                pass
            return resp


async def serve(host: str, port: int, upstream: str) -> None:
    proxy = Passthrough(upstream)
    await proxy.start()
    runner = web.ServerRunner(web.Server(proxy.handle, access_log=None), shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Minimal aiohttp passthrough proxy (benchmark baseline)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9999")
    args = parser.parse_args()
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
