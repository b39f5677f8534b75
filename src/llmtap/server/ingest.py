"""The ingest endpoint's durable hand-off: answer once the records are on disk, store them later.

`POST /api/v1/ingest` used to run the whole handler chain (body uploads, cost, store insert)
for up to 500 records before answering. A slow store or body store made the gateway give up
after its timeout and spool the batch, which the server then stored anyway: every record
travelled twice and the gateway's count and the store's `route` disagreed. Now the endpoint
only appends the batch to an embedded SQLite queue in the server's data dir
(`<data dir>/ingest.db`, one fsynced commit per batch) and answers; a `WorkerService` inside
the server drains that queue through the same chain, with the worker's retry policy
(`handlers.chain.RetryPolicy`, `run_with_attempts`) and dead letters. Records a killed server
had accepted are drained when it starts again (at least once; the store keeps one row per
request id, so redelivery is harmless).

The data dir of a server that takes ingest must therefore be persistent (a volume, not a
container's scratch layer). Records the chain rejects are dead-lettered in this queue:
`LLMTAP_QUEUE=sqlite:<data dir>/ingest.db llmtap dlq ...` lists and replays them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from llmtap.config import Settings
from llmtap.errors import BackendUnavailable
from llmtap.queue.base import Message, QueueStatus
from llmtap.queue.sqlite import SQLiteQueue
from llmtap.record import LogRecord, encode, partition_key
from llmtap.runtime import SharedBackends
from llmtap.worker.worker import WorkerService

log = logging.getLogger("llmtap.server")

#: Partitions of the ingest queue: one drainer consumes them all; a few keep one slow batch
#: of a key from holding back every other key's records.
PARTITIONS = 4


def ingest_queue_path(settings: Settings) -> Path:
    return settings.data_dir / "ingest.db"


class IngestQueue:
    """Durable append (`put`) plus the background drain into the handler chain."""

    def __init__(self, settings: Settings, backends: SharedBackends) -> None:
        self.settings = settings
        path = ingest_queue_path(settings)
        self.queue = SQLiteQueue(str(path), partitions=PARTITIONS)
        self._drain_queue = SQLiteQueue(str(path), partitions=PARTITIONS)
        self.worker = WorkerService(settings, queue=self._drain_queue, backends=backends)
        self._by = settings.partition_by
        #: Why `ingest.db` could not be opened (ingest answers 503 meanwhile), or None.
        self.down: str | None = None
        self._retry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open `ingest.db` and start its drain; on a disk that refuses it (full, read-only),
        start anyway: ingest answers 503 (a gateway then spools) and the file is opened again
        every few seconds. It used to stop the whole `llmtap up`: a full disk and a restart
        took every proxied request down with it."""
        try:
            await self._start()
        except BackendUnavailable as e:
            self.down = str(e)
            log.warning("ingest: %s; POST /api/v1/ingest answers 503 until it opens (retried)", e)
            self._retry = asyncio.create_task(self._start_later(), name="llmtap-ingest-open")

    async def _start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.queue.connect("producer")
        try:
            await self.worker.start()  # starts the (shared) chain, then takes the partitions
        except BaseException:
            await self.queue.close()
            raise
        self.down = None

    async def _start_later(self, every: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self._start()
            except BackendUnavailable as e:
                self.down = str(e)
                continue
            log.warning("ingest: %s opened; POST /api/v1/ingest takes records again", self.queue.path)
            return

    async def stop(self) -> None:
        """Store what was accepted while the drain makes progress, then stop (the chain is the server's).

        A server stopped for good leaves nothing behind when its store is up. When the store
        is down nothing moves, so stopping does not wait out `shutdown_timeout`: the records
        stay in `ingest.db` for the next start.
        """
        if self._retry is not None:
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)
        if self.down is not None:  # never opened: nothing to drain or stop
            return
        try:
            await self._settle()
        except Exception as e:
            log.warning("ingest: could not drain before stopping: %s", e)
        try:
            await self.worker.stop()
        finally:
            await self.queue.close()

    async def _settle(self, stall: float = 2.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        last, moved_at = await self.lag(), loop.time()
        while last and loop.time() < deadline and loop.time() - moved_at < stall:
            await asyncio.sleep(0.05)
            lag = await self.lag()
            if lag != last:
                last, moved_at = lag, loop.time()
        if last:
            log.warning("ingest: %d accepted record(s) left for the next start (stored then)", last)

    async def put(self, records: Sequence[LogRecord]) -> None:
        """Durable on return (fsynced); raises `BackendUnavailable` when the disk refuses."""
        if self.down is not None:
            raise BackendUnavailable(f"the server's ingest queue is not open: {self.down}")
        by = self._by
        await self.queue.publish([Message(key=partition_key(r, by), value=encode(r)) for r in records])

    async def lag(self) -> int:
        return (await self.status()).lag

    async def status(self) -> QueueStatus:
        """What waits in `ingest.db`: accepted, not yet stored (`lag`), and dead letters."""
        if self.down is not None:
            raise BackendUnavailable(f"the server's ingest queue is not open: {self.down}")
        return await self.queue.status()

    async def drained(self, timeout: float = 60.0) -> None:
        """Wait until everything accepted so far is stored or dead-lettered (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while await self.lag():
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingest queue not drained after {timeout}s")
            await asyncio.sleep(0.05)
