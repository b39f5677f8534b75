"""`llmtap server`: the query API, the dashboard and the fallback ingest endpoint.

One aiohttp application. A middleware turns every failure into a JSON error a client can act
on: 400 naming the bad parameter, 401 without a valid key (multi-tenant mode), 404, 503 with
`Retry-After` while the store or body store is down, and a logged 500 for bugs only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from prometheus_client import REGISTRY, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llmtap.bodies.base import BodyStore
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, ConfigError
from llmtap.handlers.chain import Chain
from llmtap.headertimeout import app_runner
from llmtap.ingest_token import ingest_token
from llmtap.retention import RetentionTask
from llmtap.runtime import OnBackends, SharedBackends, cancel, livez, open_when_back
from llmtap.server import alerts_api, api, dashboard, openapi, security, webhooks_api
from llmtap.server.auth import INGEST_TOKEN, Unauthorized, check_ingest, tenant_for
from llmtap.server.ingest import IngestQueue
from llmtap.store.base import Store

log = logging.getLogger("llmtap.server")

STATIC = Path(__file__).parent / "static"
#: Largest accepted request body (an ingest batch of records with inline bodies).
MAX_BODY = 128 * 1024 * 1024

API_REQUESTS = Counter(
    "llmtap_api_requests_total", "Query API calls by endpoint and status", ["endpoint", "status"]
)
INGEST_LAG = Gauge(
    "llmtap_server_ingest_lag",
    "Records POST /api/v1/ingest accepted into this server's ingest.db, not yet stored",
)
INGEST_DEAD = Gauge("llmtap_server_ingest_dead_letters", "Dead letters in this server's ingest.db")
INGEST_OPEN = Gauge(
    "llmtap_server_ingest_open",
    "1 while this server's ingest.db is open (0: ingest answers 503, gateways spool)",
)

# Routes that never need a tenant's key.
_PUBLIC = frozenset({"/healthz", "/livez", "/metrics", "/", "/api/v1/openapi.json", "/api/v1/ingest"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    endpoint = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    )
    try:
        response = await handler(request)
    except api.BadParameter as e:
        response = api.error_response(400, e.message, parameter=e.parameter)
    except Unauthorized as e:
        response = api.error_response(401, str(e))
        response.headers["WWW-Authenticate"] = "Bearer"
    except BackendUnavailable as e:  # TransientError included: the store or body store is down
        log.warning("%s %s: %s", request.method, request.path, e)
        response = api.error_response(503, f"temporarily unavailable: {e}")
    except (web.RequestPayloadError, ContentEncodingError) as e:
        response = _unreadable_body(request, e)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG or not request.path.startswith("/static/"):
            raise
        response = api.error_response(404, "Not Found")  # a name no file can have
    except web.HTTPNotFound as e:
        if request.path.startswith(("/api/", "/static/")):
            response = api.error_response(e.status, e.reason)
        else:  # an SDK pointed at this port instead of the gateway's, mostly
            response = api.error_response(404, _not_here(request))
    except web.HTTPException as e:
        if not request.path.startswith("/api/") or e.status < 400:
            raise
        response = api.error_response(e.status, e.reason)
        if "Allow" in e.headers:  # a 405 says which methods are (RFC 9110)
            response.headers["Allow"] = e.headers["Allow"]
    except Exception as e:
        stream = request.get(api.STREAM)
        if not (isinstance(e, ConnectionResetError) and stream is not None):  # not a client gone
            log.exception("%s %s failed", request.method, request.path)
        response = api.error_response(500, "internal error (logged on the server)")
    stream = request.get(api.STREAM)
    if stream is not None and stream is not response and stream.prepared:
        # Its status went out with the first bytes: a second answer would be written into the
        # body. End the connection unfinished (no last chunk): the client knows it is cut.
        if request.transport is not None:
            request.transport.close()
        status, response = response.status, stream  # counted as what it would have answered
    else:
        status = response.status
    if endpoint.startswith("/api/"):
        API_REQUESTS.labels(endpoint, str(status)).inc()
    return response


#: Content-Encodings aiohttp decodes: the only ones an undecodable body can have been sent in.
_DECODED = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})


def _unreadable_body(request: web.Request, e: Exception) -> web.Response:
    """400 for a body aiohttp could not decode or read (bad gzip, cut chunking): the client's
    fault, raised by `request.read()` as a plain exception that would otherwise be a 500.

    The connection is closed after the answer: the parser stopped mid-body, and aiohttp's
    lingering read of the rest would raise the same error again (logged as unhandled).
    """
    cause = e if isinstance(e, ContentEncodingError) else e.__cause__
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if isinstance(cause, ContentEncodingError) and encoding in _DECODED:
        message = f"the request body could not be decoded (Content-Encoding: {encoding})"
    else:
        message = "the request body could not be read (malformed or cut short)"
    request.content.feed_eof()  # nothing more is read from it: no lingering read
    response = api.error_response(400, message)
    response.force_close()
    return response


def _not_here(request: web.Request) -> str:
    s = request.app[api.SETTINGS]
    return (
        f"no route for {request.path[:200]} on llmtap's API and dashboard port: LLM requests go to"
        f" the gateway's port (LLMTAP_GATEWAY_PORT, {s.gateway_port} here), e.g. an SDK's"
        f" base_url http://{request.host.rsplit(':', 1)[0]}:{s.gateway_port}/openai/v1"
    )


def _auth(settings: Settings, store: Store) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path == "/api/v1/ingest":
            request[api.INGEST_CALLER] = await check_ingest(request, settings, store)
        elif path.startswith("/api/") and path not in _PUBLIC:
            request[api.TENANT] = await tenant_for(request, settings, store)
        return await handler(request)

    return auth


#: What the server waits for (the store it could not connect), or None: `/healthz` says so.
WAITING: web.AppKey[Callable[[], str | None]] = web.AppKey("waiting")


async def _healthz(request: web.Request) -> web.Response:
    """200 when the API can answer; 503 with the reason while the server waits for its store
    (the API answers 503 then: a readiness check said ok)."""
    waiting = request.app.get(WAITING)
    reason = waiting() if waiting is not None else None
    if reason is not None:
        return api.json_response({"status": "waiting", "reason": reason}, status=503)
    try:  # one indexed look-up: a store that went away after start-up says so here too
        await asyncio.wait_for(request.app[api.STORE].get_request("", _NO_ID), _PROBE_TIMEOUT)
    except (BackendUnavailable, TimeoutError) as e:  # TransientError too
        why = str(e) or f"no answer within {_PROBE_TIMEOUT:g} s"
        return api.json_response({"status": "waiting", "reason": f"store: {why}"}, status=503)
    return api.json_response({"status": "ok"})


_NO_ID = "00000000-0000-0000-0000-000000000000"
_PROBE_TIMEOUT = 3.0


#: Assets index.html names; their URLs carry a hash of their content (see `_index`).
_ASSETS = ("app.js", "app.css", "vendor/uplot/uPlot.min.css")
_IMMUTABLE = "public, max-age=31536000, immutable"


def _asset_hash(name: str) -> str:
    return hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:16]


async def _index(request: web.Request) -> web.Response:
    """index.html, naming its script and styles by URLs that carry their content's hash.

    Each URL is then cached for good (`immutable`, see `_cache_assets`) and a changed file is a
    new URL: a returning page asks the server for nothing but this page, where heuristic caching
    revalidated each file, a round trip each before the first API call (~100-300 ms apiece on a
    busy machine).
    """
    html = (STATIC / "index.html").read_text("utf-8")
    for name in _ASSETS:
        html = html.replace(f'"static/{name}"', f'"static/{name}?v={_asset_hash(name)}"')
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})


async def _cache_assets(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: an asset asked for by its current hash may be cached for good."""
    name = request.path.removeprefix("/static/")
    v = request.query.get("v")
    if v and response.status == 200 and name in _ASSETS and v == _asset_hash(name):
        response.headers["Cache-Control"] = _IMMUTABLE


async def _metrics(request: web.Request) -> web.Response:
    ingest = await dashboard.ingest_status(request.app[api.INGEST])
    INGEST_OPEN.set(ingest["error"] is None)
    # Read per scrape: the drain runs in this process, the figure is exact (unknown: NaN, not 0).
    INGEST_LAG.set(math.nan if ingest["lag"] is None else ingest["lag"])
    INGEST_DEAD.set(math.nan if ingest["dead_letters"] is None else ingest["dead_letters"])
    resp = web.Response(body=generate_latest(REGISTRY))
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


async def _openapi(request: web.Request) -> web.Response:
    api.no_params(request)
    return api.json_response(openapi.document())


def build_app(
    settings: Settings,
    store: Store,
    bodies: BodyStore,
    chain: Chain,
    ingest: IngestQueue,
    waiting: Callable[[], str | None] | None = None,
) -> web.Application:
    """The server's aiohttp application over its backends (`waiting`: why the store is not
    connected yet, or None)."""
    app = web.Application(
        # security.guard first: a foreign Host or a non-JSON POST never reaches any route.
        middlewares=[security.guard(settings), _errors, _auth(settings, store)],
        client_max_size=MAX_BODY,
    )
    app.on_response_prepare.append(security.add_headers)
    app.on_response_prepare.append(_cache_assets)
    app[api.SETTINGS] = settings
    app[api.STORE] = store
    app[api.BODIES] = bodies
    app[api.CHAIN] = chain
    app[api.INGEST] = ingest
    app[INGEST_TOKEN] = ingest_token(settings)
    if waiting is not None:
        app[WAITING] = waiting
    r = app.router
    r.add_get("/healthz", _healthz)
    r.add_get("/livez", livez)
    r.add_get("/metrics", _metrics)
    r.add_get("/", _index)
    r.add_static("/static/", STATIC)  # the dashboard's script and style: the CSP allows no inline ones
    dashboard.add_routes(app)  # the dashboard's API routes (export, live tail, pipeline)
    r.add_get("/api/v1/openapi.json", _openapi)
    r.add_get("/api/v1/requests", api.list_requests)
    r.add_get("/api/v1/requests/{id:[^/]+}", api.get_request)  # braces too: `{uuid}` is an id
    r.add_get("/api/v1/stats", api.stats)
    r.add_get("/api/v1/sessions/{id}", api.session)
    r.add_get("/api/v1/users", api.users)
    r.add_post("/api/v1/ingest", api.ingest)
    webhooks_api.add_routes(r)
    alerts_api.add_routes(r)
    return app


class ServerService(OnBackends):
    """`llmtap server`: a `runtime.Service`.

    Store, body store and handler chain (the ingest drain's, `server.ingest`) come from
    `backends`, shared with the other services of `llmtap up` and closed by whoever made it,
    or from a `SharedBackends` of its own over `store`/`bodies` (given objects stay the caller's).
    """

    name = "server"

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        bodies: BodyStore | None = None,
        backends: SharedBackends | None = None,
    ) -> None:
        self.settings = settings
        self._use_backends(settings, backends, store=store, bodies=bodies)
        self.ingest = IngestQueue(settings, self.backends)
        self.port: int = settings.server_port
        self._runner: web.AppRunner | None = None

    async def start(self) -> list[str]:
        """Listen, and connect the backends; during an outage, listen anyway and connect later.

        Like the gateway's fallback mode: a stack restarted while the store is down must come
        up without an outside supervisor. Until the store is back the API answers 503 (the
        store's own "not connected" error) and ingested records wait in the ingest queue; a
        wrong setting or a port in use still stops start-up.
        """
        async with self._start_stack() as stack:  # a failure stops what started, in reverse
            waiting: BackendUnavailable | None = None
            try:
                await self._open()
            except BackendUnavailable as e:
                waiting = e
            # Starts the chain and drains what a previous run accepted but had not stored.
            await self.ingest.start()
            # The batch in hand is finished, or left in the ingest queue for the next start.
            stack.push_async_callback(self._stop_ingest)
            why = str(waiting) if waiting is not None else ""
            app = build_app(
                self.settings, self.store, self.bodies, self.chain, self.ingest,
                waiting=lambda: None if self.backends.connected("store") else why,
            )  # fmt: skip
            runner = app_runner(
                app,
                self.settings.header_timeout,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=self.settings.shutdown_timeout,
            )
            await runner.setup()
            stack.push_async_callback(self._finish_calls, runner)
            host = self.settings.host
            try:
                site = web.TCPSite(runner, host, self.settings.server_port)
                await site.start()
            except OSError as e:
                why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
                raise ConfigError(
                    f"cannot listen on {host}:{self.settings.server_port}"
                    f" (LLMTAP_HOST/LLMTAP_SERVER_PORT): {why}"
                ) from None
            self._stack = stack.pop_all()
        self._runner = runner
        self.port = runner.addresses[0][1]
        shown = host if ":" not in host else f"[{host}]"
        lines = [f"server    http://{shown}:{self.port}  (API /api/v1, dashboard /)"]
        if self.ingest.down is not None:
            lines.append(f"server    ingest WAITING: {self.ingest.down} (ingest answers 503; gateways spool)")
        if waiting is not None:
            if self.backends.connected("store"):  # records are listed, each body says why not
                until = "records are served; their bodies read as unavailable until it is back"
            else:
                until = "the API answers 503 until it is back"
            lines.append(f"server    WAITING: {waiting} ({until})")
            connect = asyncio.create_task(self._open_later(str(waiting)), name="llmtap-server-connect")
            self._stack.push_async_callback(cancel, connect)
        else:
            self._start_retention()
        if self.settings.retention_days:
            lines.append(
                f"retention records and bodies older than {self.settings.retention_days} days are deleted"
            )
        return lines

    async def _open(self) -> None:
        await self.backends.connect_store()
        await self.backends.connect_bodies()

    async def _open_later(self, reason: str) -> None:
        if not await open_when_back("server", reason, self._open):
            return
        log.warning("server: backends are back; the API serves again")
        self._start_retention()

    def _start_retention(self) -> None:
        """Records and bodies past `LLMTAP_RETENTION_DAYS` (if set); finished webhook deliveries
        past `LLMTAP_WEBHOOK_KEEP_DAYS` (always)."""
        retention = RetentionTask(
            self.store,
            self.bodies,
            self.settings.retention_days,
            webhook_keep_days=self.settings.webhook_keep_days,
        )
        retention.start()
        self._stack.push_async_callback(retention.stop)  # first to stop: it uses everything else

    async def _finish_calls(self, runner: web.AppRunner) -> None:
        """Stop accepting and let the calls in flight finish (ingest: an fsync), cutting the
        store reads they wait on (a raw stats call: seconds) until the last has answered: a
        call accepted as the stop began asks for its read after the first cut."""
        cleanup = asyncio.ensure_future(runner.cleanup())
        try:
            while not cleanup.done():
                await self.store.cut_reads()
                await asyncio.wait([cleanup], timeout=0.1)
        finally:
            cleanup.cancel()  # nothing when done; else a stop given up on takes it along
        await cleanup

    async def _stop_ingest(self) -> None:
        with contextlib.suppress(Exception):
            await self.ingest.stop()

    async def stop(self) -> None:
        """Undo `start` in reverse: retention or the connector, the listener, the ingest drain,
        private backends."""
        self._runner = None
        await self._unwind()
