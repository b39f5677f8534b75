"""The gateway service: aiohttp's low-level server + `Proxy` + `Publisher`, with orderly stop.

aiohttp's low-level `web.Server` is used instead of `web.Application`: the gateway has two
prefixes and two fixed paths, and dispatching them with `str.startswith` skips the router's
per-request regex match, middleware chain and signal plumbing.

Stop order (SIGTERM): close the listener, let in-flight requests finish (up to
`shutdown_timeout`), publish every capture still pending (to the queue, or down the fallback
chain to the disk spool), stop the spool replayer, close the upstream pool, then the queue and
the body store. A request that was answered is therefore logged.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmtap.bodies.base import BodyStore
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, ConfigError
from llmtap.gateway.orphans import OrphanServer
from llmtap.gateway.proxy import HEADER_LIMITS, Proxy
from llmtap.gateway.publisher import Publisher, QueueSink, Sink
from llmtap.gateway.sinks import IngestSink, SpoolReplayer, SpoolSink
from llmtap.gateway.spool import DiskSpool, spool_dir
from llmtap.ingest_token import ingest_token
from llmtap.providers import BUILTIN, Route
from llmtap.queue.base import Queue, open_queue
from llmtap.redact import redact_url
from llmtap.runtime import OnBackends, SharedBackends, cancel, livez
from llmtap.store.base import Store

__all__ = ["GatewayService", "make_server"]

#: Largest request body accepted (LLM requests with images or documents run to tens of MB).
CLIENT_MAX_SIZE = 512 * 1024 * 1024

_HANDLER_KWARGS: dict[str, Any] = {
    "access_log": None,  # a log line per request would cost more than all of our logging
    "auto_decompress": False,  # relay compressed request bodies byte-for-byte
    **HEADER_LIMITS,
}


log = logging.getLogger("llmtap.gateway")
_RECONNECT_MAX = 5.0  # seconds between attempts to reach a queue that was down at start


def make_server(proxy: Proxy, header_timeout: float) -> web.Server:
    """aiohttp's low-level server around `proxy.handle` (must be called in a running loop).

    `handler_cancellation=True`: when a client disconnects, its handler is cancelled right
    away, so a long stream's upstream read stops at once instead of at the next chunk. Requests
    its connection held but had not handed over yet are recorded all the same (`orphans`).
    """
    loop = asyncio.get_running_loop()

    def request_factory(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=CLIENT_MAX_SIZE
        )

    return OrphanServer(
        proxy.handle,
        on_orphans=proxy.orphans,
        header_timeout=header_timeout,
        request_factory=request_factory,
        handler_cancellation=True,
        **_HANDLER_KWARGS,
    )


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})


def self_loop(settings: Settings, table: dict[str, Route]) -> str | None:
    """A sentence naming the route whose upstream is this gateway itself, else None.

    Such a gateway sends each request to itself, again and again: an outside check saw one
    curl call become 1,467 nested requests and as many error records in 10 s.
    """
    port = settings.gateway_port
    ours = _LOOPBACK | {settings.host.strip("[]").lower()}
    for name, route in table.items():
        try:
            url = urlsplit(route.base)
            target = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            continue
        host = (url.hostname or "").lower()
        if target == port and (host in ours or host.startswith("127.")):
            setting = f"LLMTAP_{name.upper()}_BASE_URL" if name in BUILTIN else "LLMTAP_UPSTREAMS"
            return (
                f"{setting} ({redact_url(route.base)}) is this gateway itself (port {port}): every"
                f" request to /{name}/... would be sent back to it; point it at the provider"
            )
    return None


class GatewayService(OnBackends):
    """`llmtap gateway`: the proxy and its publisher, as a `llmtap.runtime.Service`."""

    name = "gateway"

    def __init__(
        self,
        settings: Settings,
        *,
        queue: Queue | None = None,
        bodies: BodyStore | None = None,
        sinks: list[Sink] | None = None,
        backends: SharedBackends | None = None,
    ) -> None:
        """`queue` defaults to the one the settings name (connected and closed by the service);
        a given one is used as it is and left open. The body store (and, in multi-tenant mode,
        the store of the key table) come from `backends` (shared, its maker's to close) or
        from a `SharedBackends` of its own over `bodies` (a given one stays the caller's).

        The default sink chain is queue → ingest endpoint (`LLMTAP_INGEST_URL`, by default the
        server's) → disk spool (`<data dir>/spool`), the spool also taking what overflows the
        memory buffer, and a replayer moving spooled records into the queue once it is back.
        `sinks` replaces that chain (no overflow sink, no replayer).
        """
        self.settings = settings
        #: Made here, so connected and closed here; given ones are their maker's.
        self.queue: Queue = queue if queue is not None else open_queue(settings)
        self._private_queue = self.queue if queue is None else None
        self._use_backends(settings, backends, bodies=bodies)
        self.replayer: SpoolReplayer | None = None
        self._queue_sink: QueueSink | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._bodies_later: asyncio.Task[None] | None = None
        overflow: Sink | None = None
        if sinks is None:
            by = settings.partition_by
            spool = DiskSpool(spool_dir(settings), settings.spool_max_bytes)
            overflow = SpoolSink(spool, by)
            self._queue_sink = QueueSink(self.queue, by)
            ingest = IngestSink(settings.effective_ingest_url, ingest_token(settings))
            sinks = [self._queue_sink, ingest, overflow]
            # A queue of our own opening: the replayer opens another on its own thread, so a
            # large replay never runs on the proxy's event loop (see SpoolReplayer.replay_once).
            factory = (lambda: open_queue(settings)) if queue is None else None
            self.replayer = SpoolReplayer(
                spool,
                self.queue,
                queue_factory=factory,
                bodies=self.bodies,  # spooled bodies above the inline limit go there before the queue
                inline_limit=settings.inline_body_bytes,
                whole=ingest,  # a record the queue refuses goes there whole, not bare
            )
        self.publisher = Publisher(settings, sinks, self.bodies, overflow=overflow)
        if self.replayer is not None:
            replayer = self.replayer
            self.publisher.dropped_elsewhere.append(lambda: replayer.dropped)
        self.proxy = Proxy(settings, self.publisher, self.resolve_tenant)
        self.proxy.local = {"/healthz": self._healthz, "/livez": livez, "/metrics": self._metrics}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.publisher.collector())
        self._spool_metrics: _SpoolCollector | None = None
        if self.replayer is not None:
            self._spool_metrics = _SpoolCollector(self.replayer)
            self.registry.register(self._spool_metrics)
        # Multi-tenant mode maps `Llmtap-Auth` keys to tenants through the store's key table
        # (cached per process for `keys.CACHE_TTL` seconds, so the lookup is rarely a query).
        self._keys_store: Store | None = self.backends.store if settings.multi_tenant else None
        self.port: int | None = None
        self._runner: web.ServerRunner | None = None
        self._ready = False
        self._stop_deadline: float | None = None

    # -- tenants ---------------------------------------------------------------------------------
    def resolve_tenant(self, auth_header: str | None) -> str | Awaitable[str | None] | None:
        """The tenant a request belongs to, from its `Llmtap-Auth` header (or None → 401).

        Single-tenant: everything is `default_tenant`, with or without a key. Multi-tenant: the
        key is looked up in the store's key table (`llmtap.keys.resolve_tenant`, cached per
        process); a missing, unknown or revoked key is refused before anything goes upstream.
        """
        if not self.settings.multi_tenant:
            return self.settings.default_tenant
        if self._keys_store is None:
            return None
        from llmtap import keys

        return keys.resolve_tenant(self._keys_store, auth_header)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Connect, start publishing, listen; a failure undoes what was done, in reverse.

        What is undone at stop is pushed on an exit stack as it is done, in an order that
        makes the stop order the documented one: listener, publisher, replayer, upstream
        pool, queue, backends.
        """
        s = self.settings
        loop = self_loop(s, self.proxy.routes)
        if loop is not None:
            raise ConfigError(loop)
        fallback_note: list[str] = []
        self._stop_deadline = None
        async with self._start_stack() as stack:
            if self._private_queue is not None:
                try:
                    await self._private_queue.connect("producer")
                except BackendUnavailable as e:
                    if self._queue_sink is None or self.replayer is None:
                        raise  # a custom sink chain has no fallback to start on
                    # Start in fallback mode: serve now, log through ingest/spool, and connect
                    # the queue in the background (then the spool is replayed into it).
                    self._queue_sink.down = str(e)
                    fallback_note.append(
                        f"FALLBACK  queue unreachable at start ({e}); records go to the ingest "
                        "endpoint or the disk spool until it is back"
                    )
                stack.push_async_callback(self._close_queue)
            try:
                await self.backends.connect_bodies()
            except BackendUnavailable as e:
                # The body store only takes bodies above the inline limit; while it is away
                # those records wait in the spool (`bodies.offload`): proxy now, connect later.
                fallback_note.append(
                    f"FALLBACK  body store unreachable at start ({e}); records with bodies above"
                    " the inline limit wait in the disk spool until it is back"
                )
                self._bodies_later = asyncio.create_task(
                    self._connect_bodies_later(), name="llmtap-bodies-reconnect"
                )
            if self._keys_store is not None:
                await self.backends.connect_store()
            stack.push_async_callback(self.proxy.close)  # the upstream pool, after the last publish
            if self.replayer is not None:
                stack.push_async_callback(self.replayer.stop)
            stack.push_async_callback(self._stop_reconnect)
            await self.publisher.start()
            stack.push_async_callback(self._stop_publisher)
            if self._queue_sink is not None and self._queue_sink.down is not None:
                connect = self._connect_queue_later()
                self._reconnect = asyncio.create_task(connect, name="llmtap-queue-reconnect")
            elif self.replayer is not None:
                self.replayer.start()  # also brings back what was spooled before a restart
            await self.proxy.start()
            stack.push_async_callback(self._settle_orphans)  # their records, then the publisher
            server = make_server(self.proxy, s.header_timeout)
            runner = web.ServerRunner(server, shutdown_timeout=s.shutdown_timeout)
            await runner.setup()
            # Closes the listener, then waits (up to shutdown_timeout) for in-flight requests.
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, s.host, s.gateway_port, backlog=4096, reuse_address=True)
            try:
                await site.start()
            except OSError as e:
                raise ConfigError(
                    f"cannot listen on {s.host}:{s.gateway_port} for the gateway: {e.strerror or e} "
                    "(set LLMTAP_GATEWAY_PORT or LLMTAP_HOST)"
                ) from None
            self._stack = stack.pop_all()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._stack.callback(_freeze_startup_objects())  # undone on stop (an embedding process lives on)
        self._ready = True
        url = f"http://{_host(s.host)}:{self.port}"
        routes = ", ".join(f"{url}/{name} → {redact_url(r.base)}" for name, r in self.proxy.routes.items())
        return [f"gateway   {url}  ({routes})", *fallback_note]

    async def _connect_queue_later(self) -> None:
        """Fallback mode: keep trying the queue; once it answers, publish to it again and
        replay the spool into it. Tries at least every `_RECONNECT_MAX` seconds: a queue back
        after a long outage is used again within seconds, not after a minute of backoff."""
        assert self._queue_sink is not None
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self.queue.connect("producer")
            except BackendUnavailable as e:
                self._queue_sink.down = str(e)
                delay = min(delay * 2, _RECONNECT_MAX)
                continue
            except Exception as e:  # keep trying whatever goes wrong; say what it was
                log.warning("connecting the queue failed (%s: %s); retrying", type(e).__name__, e)
                delay = min(delay * 2, _RECONNECT_MAX)
                continue
            self._queue_sink.down = None
            log.warning("queue %s reachable again: leaving fallback mode", self.queue.description)
            if self.replayer is not None:
                self.replayer.start()
            return

    async def _connect_bodies_later(self) -> None:
        """The body store was unreachable at start: keep trying, as for the queue."""
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self.backends.connect_bodies()
            except Exception as e:  # an outage, or a setting S3 now refuses: keep trying, say so
                if not isinstance(e, BackendUnavailable):
                    log.warning("connecting the body store failed (%s: %s); retrying", type(e).__name__, e)
                delay = min(delay * 2, _RECONNECT_MAX)
                continue
            log.warning("body store %s reachable: spooled bodies go there", self.bodies.description)
            return

    async def _stop_reconnect(self) -> None:
        reconnect, self._reconnect = self._reconnect, None
        later, self._bodies_later = self._bodies_later, None
        for task in (reconnect, later):
            if task is not None:
                await cancel(task)

    async def _settle_orphans(self) -> None:
        """Requests the stop found unhandled are recorded with the time the stop leaves beyond
        the publisher's own 4 s, at least half a second: the runtime gives the whole stop
        `shutdown_timeout` + 5 s (rev24: a floor of 1 s overran it)."""
        deadline = self._stop_deadline
        left = 0.5 if deadline is None else deadline - asyncio.get_running_loop().time() - 4.0
        await self.proxy.orphans.settle(max(left, 0.5))

    async def _stop_publisher(self) -> None:
        """Publish what is pending with the time `stop` left (1 s when start failed)."""
        deadline = self._stop_deadline
        loop = asyncio.get_running_loop()
        await self.publisher.stop(timeout=1.0 if deadline is None else max(deadline - loop.time(), 4.0))

    async def _close_queue(self) -> None:
        """Our queue, if connected (at start, or later by the fallback mode's reconnect)."""
        if self._queue_sink is None or self._queue_sink.down is None:
            await self.queue.close()

    async def stop(self) -> None:
        """Stop within about `shutdown_timeout` (+ a few seconds for the last publish).

        `llmtap.runtime` gives a service `shutdown_timeout + 5` s in all; requests in flight may
        use `shutdown_timeout` of it, and the publisher gets what is left, at least 4 s.
        """
        self._ready = False
        self.proxy.draining = True
        self._stop_deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout + 4.0
        self._runner = None
        await self._unwind()

    # -- gateway-own routes ------------------------------------------------------------------------
    async def _healthz(self, request: web.BaseRequest) -> web.StreamResponse:
        ok = self._ready
        pub = self.publisher  # records lost show here too, not only in /metrics and the log
        body = orjson.dumps(
            {
                "status": "ok" if ok else "stopping",
                "pending_records": pub.pending,
                "dropped_records": pub.dropped_total,
            }
        )
        return web.Response(status=200 if ok else 503, body=body, content_type="application/json")

    async def _metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        # The spool's listing on a thread: a stat per segment held the proxy's loop for 0.3 s a
        # scrape with 20,000 segments (rev19). The counters on the loop, which changes them: read
        # from a thread, a dict or deque changing under the read could fail the scrape (rev20).
        if self._spool_metrics is not None:
            self._spool_metrics.stats = await asyncio.to_thread(self._spool_metrics.replayer.spool.stats)
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _SpoolCollector(Collector):
    """The disk spool at scrape time: what waits there, and for how long."""

    def __init__(self, replayer: SpoolReplayer) -> None:
        self.replayer = replayer
        self.stats: tuple[int, int, float] | None = None  # read off the loop before a scrape

    def collect(self) -> Iterator[Metric]:
        total, held, oldest = self.stats if self.stats is not None else self.replayer.spool.stats()
        yield GaugeMetricFamily("llmtap_gateway_spool_bytes", "Bytes of records waiting in the disk spool",
                                value=total)  # fmt: skip
        yield GaugeMetricFamily(
            "llmtap_gateway_spool_held_bytes",
            "Bytes of spooled records the queue refused, waiting for the ingest endpoint",
            value=held,
        )
        yield GaugeMetricFamily(
            "llmtap_gateway_spool_oldest_seconds",
            "Seconds since the oldest spool segment (not held) was written (0: none waits); alert when"
            " it keeps growing while the queue is up: the replay makes no progress",
            value=oldest,
        )
        replayed = self.replayer.replayed
        yield CounterMetricFamily("llmtap_gateway_spool_replayed", "Spooled records published to the queue",
                                  value=replayed)  # fmt: skip


#: Gateways running in this process that froze it, and the threshold found before the first.
_freezes: list[tuple[int, int, int]] = []


def _freeze_startup_objects() -> Callable[[], None]:
    """Exempt everything that exists once we are ready from the cyclic garbage collector;
    returns what undoes it.

    Modules, settings, price tables, connection pools live for the whole process; scanning them
    again on every full collection costs milliseconds each time, paid by whichever request is
    running (a classic server tweak: `gc.freeze`). Objects created later are collected as usual.
    A process that embeds gateways and stops them (tests, an application) gets its collector
    back once the last one stopped.
    """
    gc.collect()
    gc.freeze()
    before = gc.get_threshold()
    _freezes.append(before)
    gen0, gen1, gen2 = before
    if gen0 == 700:  # Python's default: nobody tuned it
        gc.set_threshold(20_000, gen1, gen2)

    def undo() -> None:
        first = _freezes[0]  # what the process had before any gateway
        _freezes.pop()
        if not _freezes:
            gc.unfreeze()
            gc.set_threshold(*first)

    return undo


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
