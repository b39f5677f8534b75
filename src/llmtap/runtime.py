"""Running services in one process: shared backends, start-up banner, signals, orderly shutdown.

`llmtap up` runs gateway, worker and server together; `llmtap gateway|worker|server` run one.
Each is a `Service`: `start()` returns banner lines once it is ready (or raises
`BackendUnavailable` / `ConfigError` with one sentence), `stop()` drains and releases.
Services stop in reverse start order, so `up` stops the gateway first (it flushes its pending
records into the queue) and the worker after it. The services of one process share one
`SharedBackends` (one store, one body store, one handler chain), started first and stopped last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from llmtap import __version__
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, ConfigError, LlmtapError
from llmtap.redact import install_log_filter, redact_dsn

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.handlers.chain import Chain
    from llmtap.store.base import Store

log = logging.getLogger("llmtap")


class Service(Protocol):
    name: str

    async def start(self) -> list[str]:
        """Become ready; return lines for the banner (where it listens, what it uses)."""
        ...

    async def stop(self) -> None:
        """Finish in-flight work within the shutdown deadline and release resources."""
        ...


class JsonLines(logging.Formatter):
    """One JSON object a line (`LLMTAP_LOG_FORMAT=json`): what log collectors parse without a
    pattern. The credential filter has run on the record before (message and traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else None)
        if exc:
            out["exception"] = exc
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str, fmt: str = "text") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLines())
    # No log line may carry a credential: aiohttp quotes a malformed request's raw bytes.
    install_log_filter()
    # aiohttp's per-request access log would cost the hot path; we log records, not lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    quiet_libraries()


def quiet_libraries() -> None:
    """Libraries that say what llmtap says better: also for the admin commands (`dlq`,
    `status`), which print their own one-line errors and set up no logging."""
    # aiokafka logs an ERROR per retry while a broker is away (tens of thousands a minute);
    # the queue backend reports outages itself, rate-limited, in one line.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # "Found credentials in environment variables" at each S3/SQS connect, above the banner.
    logging.getLogger("aiobotocore.credentials").setLevel(logging.WARNING)


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable without it
        pass


def banner(settings: Settings, title: str, lines: Sequence[str]) -> str:
    out = [f"llmtap {__version__} · {title}"]
    out += [f"  {line}" for line in lines]
    backends = settings.describe()
    if title == "gateway" and not settings.multi_tenant:
        backends.pop("store")  # a gateway reads the store only for tenants' keys
    out.append("  backends: " + ", ".join(f"{k}={v}" for k, v in backends.items()))
    if settings.multi_tenant:
        out.append("  tenants: multi-tenant (every request and API call needs a tenant's key)")
    if title != "gateway":
        from llmtap.handlers import otel

        if otel.enabled():
            out.append(f"  spans: every stored record to {otel.endpoint()} (OTLP/HTTP)")
    said = notes(settings, title)
    if title in ("up", "gateway"):
        import resource

        said += filter(None, [fd_note(resource.getrlimit(resource.RLIMIT_NOFILE)[0])])
    out += [f"  note: {n}" for n in said]
    out.append("  press Ctrl-C to stop")
    return "\n".join(out)


#: Below this many file descriptors a gateway is said to run short under load: each client
#: connection and each upstream connection holds one.
FEW_FDS = 4096


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one, as servers do; returns the limit now.

    Distributions default the soft limit to 1024 (containers sometimes less): a gateway with a
    few hundred clients then has no descriptor left for its upstream connections, and every
    request fails with 502 'Too many open files' at once."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    # macOS says "unlimited" but refuses more than its kern.maxfilesperproc: step down.
    for want in (top, min(top, 65536), min(top, 10240)):
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            continue
        return want
    return soft


def fd_note(fds: int) -> str | None:
    """A start-up note when a gateway may open few files (after `raise_fd_limit`)."""
    if fds >= FEW_FDS:
        return None
    return (
        f"this process may open only {fds} files (ulimit -n): each client and"
        " upstream connection takes one, so a few hundred at once fail with 'Too many open"
        f" files'; raise it to {FEW_FDS} or more"
    )


def notes(settings: Settings, title: str) -> list[str]:
    """What a deployment's settings leave to the operator, said at start-up."""
    from llmtap.backends import BODIES, QUEUES

    out = []
    if title in ("up", "server") and settings.host.strip("[]") in ("0.0.0.0", "::"):
        out.append(
            "listening on every address, but the server answers only the Host names in"
            " LLMTAP_ALLOWED_HOSTS: add the names or addresses people open the dashboard by"
        )
    files = BODIES.embedded_path(settings.bodies, settings.data_dir)
    scaled_out = QUEUES.embedded_path(settings.queue, settings.data_dir) is None
    if title != "up" and files is not None and scaled_out:
        # Scaled out with bodies on local disk: a body written by one host is read by another.
        out.append(
            f"bodies are files under {Path(files).resolve()}: every gateway, worker and server must"
            " share that directory (or set LLMTAP_BODIES=s3://...), else the API finds no body"
        )
    return out


class SharedBackends:
    """The store, body store and handler chain of one process, shared by its services.

    `llmtap up` makes one and hands it to the worker, the server (and its ingest drain), the
    webhook deliverer and the gateway; a service made without one makes its own and closes it
    at stop. Each backend is created when a service first needs it (the gateway alone never
    creates a store) and connected once, by whichever service asks first: a service started
    during an outage asks again until it is back (`open_when_back`), and the others find it
    connected. `stop()` closes what was connected, in reverse order, after every service.

    Objects passed in are the caller's: used as they are, never connected, started or closed here.
    """

    name = "backends"

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        bodies: BodyStore | None = None,
        chain: Chain | None = None,
    ) -> None:
        self.settings = settings
        self._store, self._bodies, self._chain = store, bodies, chain
        given = {"store": store, "body store": bodies, "handler chain": chain}
        self._given = frozenset(name for name, obj in given.items() if obj is not None)
        self._ready = set(self._given)
        self._stack = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()
        self._looked_behind = False  # for requests in an embedded store left behind (`left_behind`)

    @property
    def store(self) -> Store:
        if self._store is None:
            from llmtap.store.base import open_store

            self._store = open_store(self.settings)
        return self._store

    @property
    def bodies(self) -> BodyStore:
        if self._bodies is None:
            from llmtap.bodies.base import open_body_store

            self._bodies = open_body_store(self.settings)
        return self._bodies

    @property
    def chain(self) -> Chain:
        if self._chain is None:
            from llmtap.handlers.chain import build_chain

            self._chain = build_chain(self.settings, self.store, self.bodies)
        return self._chain

    def store_description(self) -> str:
        """The store for a banner line, without creating one (a worker given only a chain)."""
        if self._store is not None:
            return self._store.description
        return redact_dsn(self.settings.store)

    def connected(self, name: str) -> bool:
        """Whether `name` ("store", "body store", "handler chain") is open."""
        return name in self._ready

    async def connect_store(self) -> Store:
        store = self.store
        await self._once("store", store.connect, store.close, store.description)
        if not self._looked_behind and "store" not in self._given:
            self._looked_behind = True
            from llmtap.store.base import left_behind

            warning = await asyncio.to_thread(left_behind, self.settings)
            if warning:
                log.warning("%s", warning)
        return store

    async def connect_bodies(self) -> BodyStore:
        bodies = self.bodies
        await self._once("body store", bodies.connect, bodies.close, bodies.description)
        return bodies

    async def start_chain(self) -> Chain:
        """The chain, started once its store and body store are connected (it writes to them)."""
        chain = self.chain
        if "handler chain" not in self._ready:
            await self.connect_store()
            await self.connect_bodies()
            await self._once("handler chain", chain.start, chain.close, "")
        return chain

    async def _once(
        self, name: str, open_: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]], what: str
    ) -> None:
        """Open `name` unless it is open; a failed open is closed again, so it can be retried."""
        async with self._lock:  # two services waiting out one outage must not both connect
            if name in self._ready:
                return
            try:
                await open_()
            except BaseException:
                with contextlib.suppress(Exception):
                    await close()
                raise
            self._ready.add(name)
            self._stack.push_async_callback(self._close, name, close)
            log.debug("backends: %s ready%s", name, f" ({what})" if what else "")

    @staticmethod
    async def _close(name: str, close: Callable[[], Awaitable[None]]) -> None:
        await close()
        log.debug("backends: %s closed", name)

    async def start(self) -> list[str]:
        """Nothing to connect yet: each backend is connected by the first service that needs it."""
        return []

    async def stop(self) -> None:
        """Close what was connected, in reverse order (the chain before the stores it writes to)."""
        async with self._lock:
            stack, self._stack = self._stack, contextlib.AsyncExitStack()
            self._ready = set(self._given)
            await stack.aclose()


class OnBackends:
    """A service on `SharedBackends`: the store, body store and chain it uses, and an exit stack
    that undoes its start (closing the backends too if it made its own)."""

    backends: SharedBackends
    _private: SharedBackends | None
    _stack: contextlib.AsyncExitStack

    def _use_backends(
        self,
        settings: Settings,
        backends: SharedBackends | None,
        *,
        store: Store | None = None,
        bodies: BodyStore | None = None,
        chain: Chain | None = None,
    ) -> None:
        """Use the shared `backends`, or private ones over the given objects (the caller's);
        only private ones are closed by the service."""
        self._private = None
        if backends is None:
            backends = self._private = SharedBackends(settings, store=store, bodies=bodies, chain=chain)
        self.backends = backends
        self._stack = contextlib.AsyncExitStack()

    @property
    def store(self) -> Store:
        return self.backends.store

    @property
    def bodies(self) -> BodyStore:
        return self.backends.bodies

    @property
    def chain(self) -> Chain:
        return self.backends.chain

    def _start_stack(self) -> contextlib.AsyncExitStack:
        """A new exit stack for `start`; its last callback closes the private backends."""
        stack = contextlib.AsyncExitStack()
        if self._private is not None:
            stack.push_async_callback(self._private.stop)
        return stack

    async def _unwind(self) -> None:
        """Undo `start` in reverse (each service pushes onto `_stack` what it must undo)."""
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a background task and wait until it has ended (what it raises is its own business)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def settle_heap() -> None:
    """Keep what start-up made out of the garbage collector's full passes.

    Modules, settings, pools, price tables: they live as long as the process, yet every full
    collection walked them all again, holding the event loop (in `llmtap up`: every request in
    flight) for up to ~50 ms each time (bench/README, "GC pauses"). Frozen after start-up, a
    full pass walks only what came later. Their garbage, if any, is kept: a one-off amount.
    """
    gc.collect()
    gc.freeze()


async def run_services(settings: Settings, title: str, services: Sequence[Service]) -> int:
    """Start services in order, print the banner, wait for SIGINT/SIGTERM, stop in reverse.

    A service that fails to start stops the ones started before it (in reverse order too).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failed: list[str] = []

    async def stop_one(svc: Service) -> None:
        try:
            await asyncio.wait_for(svc.stop(), timeout=settings.shutdown_timeout + 5)
        except TimeoutError:
            log.error("stopping %s failed: not done within %g s", svc.name, settings.shutdown_timeout + 5)
            failed.append(svc.name)
        except Exception as e:  # keep stopping the others; report the failure
            log.error("stopping %s failed: %s", svc.name, str(e) or type(e).__name__)
            failed.append(svc.name)

    try:
        async with contextlib.AsyncExitStack() as stack:
            # SIGHUP too (a closed terminal, `kill -HUP` as a reload habit): it killed the
            # process at once, records answered but not yet published with it (deploy audit).
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, _stopping, sig, stop)
                stack.callback(loop.remove_signal_handler, sig)
            stack.callback(gc.unfreeze)  # after every service stopped (callbacks run last-in first)
            lines: list[str] = []
            for svc in services:
                started = await _start_unless_stopped(svc, stop)
                if started is None:  # SIGINT/SIGTERM during start-up (a backend that hangs)
                    print(f"llmtap: stopped while starting {svc.name}", file=sys.stderr, flush=True)
                    break
                lines += started
                stack.push_async_callback(stop_one, svc)
            else:
                print(banner(settings, title, lines), flush=True)
                settle_heap()
                await stop.wait()
            _say("llmtap: stopping (finishing in-flight requests and flushing logs)...")
    except LlmtapError as e:  # from a start: the services started before it are stopped
        print(f"llmtap: {e}", file=sys.stderr, flush=True)
        return 2
    _say("llmtap: stopped")
    return 1 if failed else 0


async def livez(request: Any) -> Any:
    """Liveness (`GET /livez` on every port): 200 while the process's event loop answers, even
    stopping or waiting for a backend. `/healthz` is readiness: a liveness probe on it had an
    orchestrator restart every worker and server through a database outage (deploy audit)."""
    from aiohttp import web

    return web.Response(body=b'{"status":"alive"}', content_type="application/json")


def _stopping(sig: signal.Signals, stop: asyncio.Event) -> None:
    said = stop.is_set()
    stop.set()  # first: a hung-up terminal's stderr raises (rev18a: the stop was never set)
    if sig == signal.SIGHUP and not said:
        _say("llmtap: SIGHUP: stopping as on SIGTERM (there is no reload)")


def _say(line: str) -> None:
    """A line on stderr, which may be gone: a closed terminal (EIO), a closed pipe (EPIPE)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


async def _start_unless_stopped(svc: Service, stop: asyncio.Event) -> list[str] | None:
    """`svc.start()`, or None when a stop is asked first: a start waiting on a backend that
    hangs (a locked table) ignored SIGTERM and SIGINT until it timed out."""
    starting = asyncio.ensure_future(svc.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if starting.done():
        return starting.result()
    starting.cancel()  # its start-up stack undoes what it had opened
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await starting
    return None


async def open_when_back(
    who: str,
    reason: str,
    open_: Callable[[], Awaitable[object]],
    pause: Callable[[float], Awaitable[object]] = asyncio.sleep,
    stopping: Callable[[], bool] = lambda: False,
    *,
    start: float = 0.1,
    cap: float = 5.0,
    quiet: bool = False,
) -> bool:
    """Retry `open_` until the backends answer (True) or `stopping()` (False).

    The one policy for a worker or server started during an outage: jittered backoff capped at
    a few seconds (an outage ends when the backend is back; do not sleep far past it), and one
    log line per change of the outage, not one per retry (none with `quiet`: a part of a
    process whose main service already reports the same outage).
    """
    log = logging.getLogger(f"llmtap.{who}")
    if not quiet:
        log.warning("%s: started without its backends: %s; retrying until they are back", who, reason)
    delay, shown = start, reason
    while not stopping():
        await pause(delay * (0.5 + random.random() / 2))
        if stopping():
            break
        delay = min(delay * 2, cap)
        try:
            await open_()
        except (BackendUnavailable, ConfigError) as e:  # a backend back wrong (a dropped
            # database) is still waited for: refusing to start is for start-up only
            if str(e) != shown and not quiet:
                shown = str(e)
                log.warning("%s: still waiting: %s", who, e)
            continue
        except Exception:
            log.exception("%s: connecting failed unexpectedly; retrying", who)
            continue
        return True
    return False
