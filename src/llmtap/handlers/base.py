"""Handlers: small steps a batch of records goes through, in order (structlog-processor style).

A handler works on a whole batch (so inserts and uploads are batched) but judges records one by
one: a record it cannot process is marked with `Item.fail(reason)` and skipped by the handlers
after it; the worker retries or dead-letters it. An *outage* (store or body store down) is not
the record's fault: the handler raises `TransientError` and the worker retries the whole batch
later without acknowledging anything.

Every handler must be idempotent: a batch may be handled again after a crash or a retry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmtap.record import LogRecord

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.config import Settings
    from llmtap.store.base import Store


@dataclass(slots=True)
class Item:
    """One record on its way through the chain."""

    record: LogRecord
    error: str | None = None
    #: What an early handler read from the bodies for a later one (they leave the record after
    #: the body handler): e.g. the response id and model for the OpenTelemetry span.
    notes: dict[str, Any] = field(default_factory=dict)
    #: What `q=` searches (`llmtap.store.search`), taken from the bodies while their bytes are
    #: at hand (the body handler); None: the store reads whatever body is still inline.
    search_text: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason


class Handler(ABC):
    name: str = "handler"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open what the handler needs (connections, clients)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release it."""

    @abstractmethod
    async def handle(self, items: Sequence[Item]) -> None:
        """Process the items that are still `ok`. Raise `TransientError` on an outage."""


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
            except Exception as e:
                from llmtap.errors import TransientError

                if isinstance(e, TransientError):
                    raise
                # An unexpected bug or a bad record we could not pin down: if it is one record,
                # it is that record's fault; otherwise let the worker bisect.
                if len(live) == 1:
                    live[0].fail(f"{handler.name}: {type(e).__name__}: {e}")
                    return
                raise


def build_chain(settings: Settings, store: Store, bodies: BodyStore) -> Chain:
    """The standard chain. Order matters: bodies and cost are settled before the row is written."""
    from llmtap.handlers.bodies import BodyHandler
    from llmtap.handlers.cost import CostHandler
    from llmtap.handlers.store import StoreHandler
    from llmtap.webhooks.deliverer import env_endpoint

    # Webhooks are not a handler: the store writes their outbox with the records, and the
    # deliverer (in `llmtap server` / `up`) sends it, so no receiver can hold back storing.
    store_handler = StoreHandler(store, env_endpoint(settings))
    handlers: list[Handler] = [BodyHandler(bodies), CostHandler(), store_handler]
    from llmtap.handlers import otel

    if otel.enabled():
        # Capture reads the bodies before they leave the record; export follows the store.
        handlers = [otel.OtelCapture(), *handlers, otel.OtelExport()]
    return Chain(handlers)
