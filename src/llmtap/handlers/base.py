"""Handlers: small steps a batch of records goes through, in order (structlog-processor style).

A handler works on a whole batch (so inserts and uploads are batched) but judges records one by
one: a record it cannot process is marked with `Item.fail(reason)` and skipped by the handlers
after it. An *outage* (store or body store down) is not the record's fault: the handler raises
`TransientError`. What then happens to the record or the batch is decided in one place,
`llmtap.handlers.chain` (the chain, its bisection and `run_with_attempts`).

Every handler must be idempotent: a batch may be handled again after a crash or a retry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmtap.record import LogRecord


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
