"""The passthrough of bench/passthrough.py with granian's Rust HTTP server in front (issue 15 spike).

Only the server side changes: granian (hyper + tokio, RSGI interface) parses the client's
requests and writes the answers; the upstream side is the very same pooled aiohttp
ClientSession as passthrough.py (its `Passthrough.start` builds it), so a difference in the
figures is what the server core costs.  Same routing (`/openai/<path>` -> upstream `/<path>`),
same hop-by-hop header filter, streams relayed chunk by chunk as `iter_any()` yields them.

`reqwest_app` swaps the upstream client too: pyreqwest (Rust reqwest/hyper on its own tokio
runtime, a PyPI wheel) with the same settings where they exist (pooled, no decompression, no
redirects, no cookies).  With both ends in Rust, what remains in Python is the handler's glue:
it bounds what a Rust core with a Python handler per request could save.

    SPIKE_UPSTREAM=http://127.0.0.1:9999 granian --interface rsgi --working-dir bench \
        --workers 1 --runtime-mode st --loop uvloop spike_granian_app:app

bench/spike_core.py starts it with the full option set it measures.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import aiohttp
from granian._granian import RSGIProtocolClosed as ProtocolClosed  # granian.rsgi's, typed
from passthrough import _HOP, Passthrough  # bench/ is granian's working dir, so on sys.path

if TYPE_CHECKING:
    from granian._granian import RSGIHTTPProtocol as HTTPProtocol
    from granian.rsgi import Scope
    from pyreqwest.client import Client


def _local(path: str, proto: HTTPProtocol) -> bool:
    """Answer what is not proxied (`/healthz`, 404); True if answered."""
    if path.startswith("/openai/"):
        return False
    if path == "/healthz":
        proto.response_bytes(200, [("content-type", "text/plain")], b"ok")
    else:
        proto.response_bytes(404, [("content-type", "text/plain")], b"not found")
    return True


class GranianPassthrough:
    def __init__(self, upstream: str) -> None:
        self.proxy = Passthrough(upstream)
        self.session: aiohttp.ClientSession | None = None

    async def _session(self) -> aiohttp.ClientSession:
        # aiohttp's connector needs a running loop; granian calls __rsgi_init__ before it runs one.
        if self.proxy.session is None:
            await self.proxy.start()
        assert self.proxy.session is not None
        self.session = self.proxy.session
        return self.session

    async def __rsgi__(self, scope: Scope, proto: HTTPProtocol) -> None:
        path = scope.path
        if _local(path, proto):
            return
        session = self.session or await self._session()
        url = self.proxy.base + path[len("/openai") :]
        if scope.query_string:
            url += "?" + scope.query_string
        headers = [(k, v) for k, v in scope.headers.items() if k.lower() not in _HOP]
        body = await proto()
        async with session.request(scope.method, url, headers=headers, data=body) as up:
            out = [(k, v) for k, v in up.headers.items() if k.lower() not in _HOP]
            if not up.content_type.startswith("text/event-stream"):
                proto.response_bytes(up.status, out, await up.read())
                return
            transport = proto.response_stream(up.status, out)
            try:
                async for chunk in up.content.iter_any():
                    await transport.send_bytes(chunk)
            except (ProtocolClosed, ConnectionResetError):  # the client went away mid-stream
                pass


class ReqwestPassthrough:
    def __init__(self, upstream: str) -> None:
        self.base = upstream.rstrip("/")
        self.client: Client | None = None

    def _client(self) -> Client:
        from pyreqwest.client import ClientBuilder

        builder = ClientBuilder().gzip(False).brotli(False).zstd(False).deflate(False)
        self.client = builder.follow_redirects(False).http1_only().build()
        return self.client

    async def __rsgi__(self, scope: Scope, proto: HTTPProtocol) -> None:
        path = scope.path
        if _local(path, proto):
            return
        client = self.client or self._client()
        url = self.base + path[len("/openai") :]
        if scope.query_string:
            url += "?" + scope.query_string
        headers = [(k, v) for k, v in scope.headers.items() if k.lower() not in _HOP]
        body = await proto()
        req = client.request(scope.method, url).headers(headers).body_bytes(body)
        # The default limit (64 KiB) buffers a stream until that much or the end has come: an SSE
        # answer would arrive in one piece at the end.  1 hands over every chunk as it arrives.
        req = req.streamed_read_buffer_limit(1)
        async with req.build_streamed() as up:
            out = [(k, v) for k, v in up.headers.items() if k not in _HOP]  # hyper: lower case
            if not (up.get_header("content-type") or "").startswith("text/event-stream"):
                proto.response_bytes(up.status, out, (await up.bytes()).to_bytes())
                return
            transport = proto.response_stream(up.status, out)
            reader = up.body_reader
            try:
                while (chunk := await reader.read_chunk()) is not None:
                    await transport.send_bytes(chunk.to_bytes())
            except (ProtocolClosed, ConnectionResetError):  # the client went away mid-stream
                pass


app = GranianPassthrough(os.environ.get("SPIKE_UPSTREAM", "http://127.0.0.1:9999"))
reqwest_app = ReqwestPassthrough(os.environ.get("SPIKE_UPSTREAM", "http://127.0.0.1:9999"))
