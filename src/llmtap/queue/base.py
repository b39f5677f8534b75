"""The queue interface every backend implements (SQLite, Kafka, Redis Streams, SQS).

Modelled on Dramatiq's broker: a small surface the rest of llmtap codes against, so the
gateway's publisher and the worker never know which backend they talk to.

Semantics every backend keeps:

- `publish` returns only once the batch is durable (fsynced / acked by the broker); it raises
  `BackendUnavailable` when it cannot be, so the publisher can fall back.
- Messages with the same key go to the same partition and are delivered in publish order.
- `consume` hands out at most `max_messages` deliveries from the partitions this consumer owns;
  a delivery not acknowledged is delivered again (to this or another consumer) later: at least
  once. Consumers of one group share partitions; a dead consumer's partitions are taken over.
- `ack` commits deliveries; `dead_letter` moves one aside with its reason (and acks it), where
  `dead_letters` lists it and `replay_dead_letters` publishes it again. Dead-lettering the same
  delivery twice (a batch re-run after a failed ack) leaves one dead letter.
- `Delivery.delivery_count` is above 1 when the message was handed out before without an ack,
  *also by a process that died since* (the count is persisted, not kept in memory). Then the
  worker handles such messages one by one, calling `begin_attempt` before each: a persisted
  per-message count of handlings begun, so a message that kills the worker process each time
  is dead-lettered after N deliveries instead of being redelivered forever.
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
from prometheus_client import Counter

from llmtap.backends import QUEUES

if TYPE_CHECKING:
    from llmtap.config import Settings

#: `inspect`: read-only commands (`status`, `dlq list`): connect to what exists, create nothing,
#: and raise `QueueMissing` when the queue is not there.
Role = Literal["producer", "consumer", "both", "inspect"]
#: Records a broker removed before any worker stored them (Kafka retention or compaction, Redis
#: streams trimmed or deleted from by hand): lost logs, each also an ERROR line. Alert on any
#: increase.
LOST = Counter(
    "llmtap_queue_records_lost_total",
    "Records the queue's broker removed before any worker stored them (Kafka retention or compaction,"
    " a Redis stream trimmed by hand)",
    ["queue"],
)

N = TypeVar("N")
D = TypeVar("D")


@dataclass(slots=True)
class Message:
    """What the gateway publishes: a partition key and the encoded record.

    `id` names the record (tenant and request id) for queues that deduplicate by it (SQS FIFO);
    without it they deduplicate by content.
    """

    key: str
    value: bytes
    id: str | None = None


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer. `handle` is backend-private (e.g. a stream entry id)."""

    partition: int
    offset: int
    key: str
    value: bytes
    delivery_count: int = 1
    handle: Any = None


@dataclass(slots=True)
class DeadLetter:
    id: str
    partition: int
    offset: int
    key: str
    value: bytes
    reason: str
    failed_at: float

    @property
    def request_id(self) -> str | None:
        """The id of the request the letter holds, as its client got it in `Llmtap-Request-Id`
        (an operator's way to match a letter to a user's report); None if it is not a record."""
        try:
            return _IdOnly.decode(self.value).id[:200]
        except Exception:  # a poison message: anything goes
            return None


class _RecordId(msgspec.Struct):
    id: str


_IdOnly = msgspec.json.Decoder(_RecordId)  # reads `id`, skips the rest without building it


@dataclass(slots=True)
class PartitionStatus:
    partition: int
    lag: int  # messages published but not yet acknowledged
    owner: str | None = None


@dataclass(slots=True)
class QueueStatus:
    """Partitioned queues report lag per partition; SQS, which has no partitions or offsets,
    reports the messages `waiting` and `in_flight` (received, not yet deleted) instead."""

    backend: str
    partitions: list[PartitionStatus] = field(default_factory=list)
    dead_letters: int = 0
    waiting: int | None = None
    in_flight: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def lag(self) -> int:
        if self.waiting is not None:
            return self.waiting + (self.in_flight or 0)
        return sum(p.lag for p in self.partitions)


async def bounded(step: Awaitable[Any], timeout: float, what: str) -> None:
    """Run one step of a `close()` for at most `timeout` seconds, never raising.

    `asyncio.wait_for` is no bound: after its timeout it cancels the step and then *waits* for
    it, and a client library that swallows the cancellation (seen with redis-py and aiokafka
    during a broker hiccup) hangs the caller's shutdown forever. Here a step that overruns is
    cancelled and left behind, so a stopping worker or gateway always gets past its queue.
    """
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(_drain_result)
        logging.getLogger("llmtap.queue").warning("%s did not finish within %gs; left behind", what, timeout)
        return
    _drain_result(task)


def _drain_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log "exception was never retrieved"


def letter_field(text: str | bytes | None, kind: Callable[[str], N], default: D) -> N | D:
    """A number a dead letter carries as text (partition, offset, time), or `default`.

    Anything can be written to a dead-letter place by hand (a Kafka topic, a Redis stream, an SQS
    queue): one letter with a field that is not a number must not fail the listing, or the
    replay, of all the others.
    """
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if not text:
        return default
    try:
        v = kind(text.strip())
    except (ValueError, OverflowError):
        return default
    if isinstance(v, float) and not math.isfinite(v):
        return default
    return v


def partition_for(key: str, partitions: int) -> int:
    """Stable key → partition mapping (same on every process and restart)."""
    return zlib.crc32(key.encode()) % partitions


class Queue(ABC):
    """A durable, partitioned log with consumer groups and a dead-letter place."""

    #: Human description for banners, without credentials.
    description: str = ""

    @abstractmethod
    async def connect(self, role: Role) -> None:
        """Open connections; raise `BackendUnavailable` with one clear sentence if unreachable."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and partition ownership (so another consumer takes over now)."""

    # -- producer -----------------------------------------------------------------------------
    @abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None:
        """Append the batch durably, or raise `BackendUnavailable`."""

    # -- consumer -----------------------------------------------------------------------------
    @abstractmethod
    async def consume(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to `max_messages` deliveries, waiting at most `timeout` seconds for the first."""

    @abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Commit these deliveries: they are never delivered again."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move one delivery to the dead-letter place with its reason, and ack it."""

    async def begin_attempt(self, delivery: Delivery) -> int:
        """Persist that handling of this (redelivered) delivery begins; return how many began.

        Backends persist it (so it survives the process dying during the handling) and forget
        it when the message is acknowledged or dead-lettered. This default, for test doubles,
        persists nothing.
        """
        return delivery.delivery_count

    async def forget_attempt(self, delivery: Delivery) -> None:  # noqa: B027 - optional hook
        """Undo `begin_attempt`: the handling was abandoned (stopping), not fatal to the process."""

    # -- operations ---------------------------------------------------------------------------
    @abstractmethod
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead letters."""

    @abstractmethod
    async def replay_dead_letters(self, ids: Sequence[str] | None = None, *, publish: bool = True) -> int:
        """Publish dead letters (all, or these ids) again and remove them; returns how many.
        `publish=False` only removes them (`discard_dead_letters`)."""

    async def discard_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        """Remove dead letters (all, or these ids) for good: records that can never be stored.
        Their only copy goes (list or export them first); returns how many."""
        return await self.replay_dead_letters(ids, publish=False)

    @abstractmethod
    async def status(self) -> QueueStatus:
        """Lag per partition and dead-letter count."""


def embedded_queue_path(settings: Settings) -> str | None:
    """The SQLite queue's file when `LLMTAP_QUEUE` is the embedded queue, else None."""
    return QUEUES.embedded_path(settings.queue, settings.data_dir)


def open_queue(settings: Settings, *, group: str = "llmtap-workers") -> Queue:
    """The queue backend named by `LLMTAP_QUEUE` (`ConfigError` when its extra is missing)."""
    url = settings.queue
    backend, cls = QUEUES.load(url)
    queue: Queue
    if backend.embedded:
        queue = cls(embedded_queue_path(settings), partitions=settings.partitions)
    elif backend.name == "sqs":
        queue = cls(
            url, partitions=settings.partitions, group=group, inline_body_bytes=settings.inline_body_bytes
        )
    else:
        queue = cls(url, partitions=settings.partitions, group=group)
    return queue
