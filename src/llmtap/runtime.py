"""Running services in one process: start-up banner, signal handling, orderly shutdown.

`llmtap up` runs gateway, worker and server together; `llmtap gateway|worker|server` run one.
Each is a `Service`: `start()` returns banner lines once it is ready (or raises
`BackendUnavailable` / `ConfigError` with one sentence), `stop()` drains and releases.
Services stop in reverse start order, so `up` stops the gateway first (it flushes its pending
records into the queue) and the worker after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from llmtap import __version__
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, LlmtapError, TransientError
from llmtap.redact import install_log_filter

log = logging.getLogger("llmtap")


class Service(Protocol):
    name: str

    async def start(self) -> list[str]:
        """Become ready; return lines for the banner (where it listens, what it uses)."""
        ...

    async def stop(self) -> None:
        """Finish in-flight work within the shutdown deadline and release resources."""
        ...


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # No log line may carry a credential: aiohttp quotes a malformed request's raw bytes.
    install_log_filter()
    # aiohttp's per-request access log would cost the hot path; we log records, not lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiokafka logs an ERROR per retry while a broker is away (tens of thousands a minute);
    # the queue backend reports outages itself, rate-limited, in one line.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


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
    out.append("  backends: " + ", ".join(f"{k}={v}" for k, v in backends.items()))
    out.append("  press Ctrl-C to stop")
    return "\n".join(out)


async def run_services(settings: Settings, title: str, services: Sequence[Service]) -> int:
    """Start services in order, print the banner, wait for SIGINT/SIGTERM, stop in reverse."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    started: list[Service] = []
    lines: list[str] = []
    try:
        for svc in services:
            lines += await svc.start()
            started.append(svc)
    except LlmtapError as e:
        for svc in reversed(started):
            with contextlib.suppress(Exception):
                await svc.stop()
        print(f"llmtap: {e}", file=sys.stderr, flush=True)
        return 2

    print(banner(settings, title, lines), flush=True)
    await stop.wait()
    print("llmtap: stopping (finishing in-flight requests and flushing logs)...", file=sys.stderr, flush=True)
    code = 0
    for svc in reversed(started):
        try:
            await asyncio.wait_for(svc.stop(), timeout=settings.shutdown_timeout + 5)
        except Exception as e:  # keep stopping the others; report the failure
            log.error("stopping %s failed: %s", svc.name, e)
            code = 1
    print("llmtap: stopped", file=sys.stderr, flush=True)
    return code


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
        except (BackendUnavailable, TransientError) as e:
            if str(e) != shown and not quiet:
                shown = str(e)
                log.warning("%s: still waiting: %s", who, e)
            continue
        except Exception:
            log.exception("%s: connecting failed unexpectedly; retrying", who)
            continue
        return True
    return False
