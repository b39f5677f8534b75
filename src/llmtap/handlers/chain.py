"""The handler chain, and what happens to a record that fails in it: the one place that decides.

The worker (`llmtap worker`, and the server's ingest drain, which is a `WorkerService` over its
own queue) runs records through `run_with_attempts`; every constant of the policy is in
`RetryPolicy`. What each failure becomes:

- a handler that cannot process one record → `Item.fail(reason)` (per-item handlers use
  `fail_each`); the record skips the handlers after it;
- an exception out of a handler for a *single* live item → that item fails with
  `"<handler>: <Type>: <message>"` (`Chain.run`);
- an exception for several items → the batch is bisected until the record(s) that raise are
  isolated (`process_records`; handlers are idempotent, re-running the good ones is harmless);
- a record that failed → retried with backoff until `RetryPolicy.max_attempts` tries, then given
  up with its reason (the worker dead-letters it: "cost: ValueError: ...");
- `TransientError` (store, body store down) → not the records' fault: the same records are
  retried with backoff, no attempt counted, for as long as the outage lasts;
- stopping while records wait for a retry → `Abandoned`: nothing acknowledged, redelivered later.

Around this the worker applies the same `RetryPolicy` to what only it can see: a message that
is not a record is dead-lettered at once (`RecordError`), a message redelivered after killing
the worker process is given up after `max_attempts` deliveries (`crash_reason`), and a failing
consume or acknowledgement is retried with `delay`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmtap.cooperate import SLICE
from llmtap.errors import TransientError
from llmtap.handlers.base import Handler, Item
from llmtap.record import LogRecord

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.config import Settings
    from llmtap.store.base import Store

log = logging.getLogger("llmtap.worker")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Every constant of the retry policy (Dramatiq keeps its equivalents in `Retries`)."""

    #: Tries of a failing record before it is given up; also deliveries of a message that
    #: kills the worker process (`LLMTAP_WORKER_MAX_ATTEMPTS`).
    max_attempts: int = 5
    #: First wait after a failure; doubled after each further one, up to `backoff_cap`.
    backoff_start: float = 0.1
    #: An outage ends when the backend is back: do not sleep far past it.
    backoff_cap: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(max_attempts=settings.worker_max_attempts)

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` failures in a row (1 or more): exponential, capped,
        with full jitter in [d/2, d] so workers that failed together do not retry together."""
        d: float = min(self.backoff_cap, self.backoff_start * 2.0 ** min(max(failures, 1) - 1, 32))
        return d * (0.5 + random.random() / 2)

    def gives_up(self, attempts: int) -> bool:
        """A record that failed `attempts` times is given up (dead-lettered)."""
        return attempts >= self.max_attempts

    def crash_reason(self, deliveries: int) -> str | None:
        """Why a message handed out `deliveries` times without an ack is given up, or None.

        Such a message may have killed the worker process (no exception to catch): without a
        bound it would come back forever and hold its partition.
        """
        if deliveries >= self.max_attempts:
            return f"delivered {deliveries} times without ack: the worker died while processing it"
        return None


class Abandoned(Exception):
    """Stopping while records wait for a retry: leave them unacknowledged for redelivery."""


def failure(handler: str, exc: BaseException) -> str:
    """The reason a record failed in `handler`, as dead letters show it."""
    return f"{handler}: {type(exc).__name__}: {exc}"


async def fail_each(handler: Handler, items: Sequence[Item], fn: Callable[[Item], object]) -> None:
    """Apply `fn` to each item; an item `fn` raises for fails alone, the others go on.

    For handlers that work record by record (cost): one bad record costs no bisection.
    """
    for n, item in enumerate(items):
        try:
            fn(item)
        except Exception as e:
            item.fail(failure(handler.name, e))
        if n % SLICE == SLICE - 1:
            await asyncio.sleep(0)


class Chain:
    """Runs items through handlers in order; a failed item skips the remaining handlers."""

    def __init__(self, handlers: Sequence[Handler]) -> None:
        self.handlers = list(handlers)

    async def start(self) -> None:
        for h in self.handlers:
            await h.start()

    async def close(self) -> None:
        for h in reversed(self.handlers):
            await h.close()

    async def run(self, items: Sequence[Item]) -> None:
        for handler in self.handlers:
            live = [i for i in items if i.ok]
            if not live:
                return
            try:
                await handler.handle(live)
            except TransientError:
                raise
            except Exception as e:
                # One live record: it is that record's fault. Several: `process_records` bisects.
                if len(live) == 1:
                    live[0].fail(failure(handler.name, e))
                    return
                raise


async def _isolate(chain: Chain, items: list[Item]) -> None:
    """Run the chain; on an unexpected error bisect until the failing records are pinned down."""
    live = [i for i in items if i.ok]
    if not live:
        return
    try:
        await chain.run(live)
    except TransientError:
        raise
    except Exception as e:
        still = [i for i in live if i.ok]
        if len(still) <= 1:
            for i in still:  # the chain fails single items itself; this is a last resort
                i.fail(f"{type(e).__name__}: {e}")
            return
        mid = len(still) // 2
        await _isolate(chain, still[:mid])
        await _isolate(chain, still[mid:])


async def process_records(chain: Chain, records: Sequence[LogRecord]) -> list[Item]:
    """Run records through the chain once; returns one `Item` per record, in order.

    Items with `error` set could not be processed (`run_with_attempts` retries or gives them
    up). Raises `TransientError` when a backend is down: then nothing can be assumed done.
    """
    items = [Item(r) for r in records]
    await _isolate(chain, items)
    return items


async def run_with_attempts(
    chain: Chain,
    records: Sequence[LogRecord],
    policy: RetryPolicy,
    *,
    give_up: Callable[[int, str], Awaitable[None]],
    pause: Callable[[float], Awaitable[object]] = asyncio.sleep,
    stopping: Callable[[], bool] = lambda: False,
    retried: Callable[[str, int], None] = lambda kind, n: None,
    outage: Callable[[str | None], None] = lambda reason: None,
) -> list[int]:
    """Run `records` through the chain until each went through or was given up.

    Returns the indexes (into `records`) of those that went through, in order. A record given
    up is passed to `give_up(index, reason)` at once (the worker dead-letters it), so a retry
    of the others never repeats it. `retried(kind, n)` reports retries: `"transient"` (the
    whole lot, an outage) or `"record"` (n failing records); `outage(reason)` an outage as it
    begins, and `outage(None)` its end. `pause` sleeps and should wake up when stopping; raises
    `Abandoned` if `stopping()` while records wait for a retry. An outage is logged when it
    begins, about once a minute while it lasts and when it ends, not at every retry.
    """
    attempts = [0] * len(records)
    pending = list(range(len(records)))
    done: list[int] = []
    outages = 0
    while pending:
        try:
            items = await process_records(chain, [records[i] for i in pending])
        except TransientError as e:
            if stopping():
                raise Abandoned from e
            outages += 1
            retried("transient", len(pending))
            wait = policy.delay(outages)
            outage(str(e))  # each time: `/healthz` names the cause of now, not the first one
            if outages == 1 or outages % OUTAGE_LOG_EVERY == 0:
                still = "" if outages == 1 else f"still, after {outages} tries: "
                log.warning("worker: %s%s; retrying %d records in %.1fs", still, e, len(pending), wait)
            await pause(wait)
            continue
        if outages:
            log.warning("worker: the chain works again after %d tries", outages)
            outage(None)
        outages = 0
        failed: list[int] = []
        for idx, item in zip(pending, items, strict=True):
            if item.ok:
                done.append(idx)
                continue
            attempts[idx] += 1
            if policy.gives_up(attempts[idx]):
                assert item.error is not None
                await give_up(idx, item.error)
            else:
                failed.append(idx)
        pending = failed
        if pending:
            if stopping():
                raise Abandoned  # no time to retry: redelivered later, with fresh attempts
            retried("record", len(pending))
            await pause(policy.delay(max(attempts[i] for i in pending)))
    done.sort()
    return done


#: Retries of one outage between two log lines about it (a retry waits up to a few seconds:
#: about a line a minute; a line per retry was 20-37 a minute, 50,000 a day).
OUTAGE_LOG_EVERY = 12


def build_chain(settings: Settings, store: Store, bodies: BodyStore) -> Chain:
    """The standard chain. Order matters: streams are whole, bodies and cost settled, before the
    row is written."""
    from llmtap.handlers.bodies import BodyHandler
    from llmtap.handlers.cost import CostHandler
    from llmtap.handlers.store import StoreHandler
    from llmtap.handlers.streams import StreamHandler
    from llmtap.webhooks.deliverer import env_endpoint

    # Webhooks are not a handler: the store writes their outbox with the records, and the
    # deliverer (in `llmtap server` / `up`) sends it, so no receiver can hold back storing.
    store_handler = StoreHandler(store, env_endpoint(settings))
    handlers: list[Handler] = [
        StreamHandler(settings.inline_body_bytes),
        BodyHandler(bodies, settings.search_bytes, settings.search_scope),
        CostHandler(),
        store_handler,
    ]
    from llmtap.handlers import otel

    if otel.enabled():
        # Capture reads the bodies (streams rebuilt) before they leave the record; export
        # follows the store.
        handlers = [handlers[0], otel.OtelCapture(settings.otlp_content), *handlers[1:], otel.OtelExport()]
    return Chain(handlers)
