"""The embedded queue: a partitioned log in one SQLite file, shared by processes on one machine.

`llmtap up` (and a gateway with several `llmtap worker` processes beside it) need a durable
queue without a broker. SQLite in WAL mode gives that: many readers and one writer at a time
across processes, crash-safe commits, and a file the user can copy or delete.

Layout (one file):

- ``messages``: one row per message, ``id = partition << 40 | offset`` so a partition is one
  contiguous rowid range: reading "the next N of partition p" and trimming "all of p below the
  committed offset" are range scans on the table's own B-tree, no secondary index.
- ``partitions``: per partition the next offset to assign, the committed offset (everything
  below it is processed) and the owner's lease.
- ``consumers``: live consumers and their heartbeats; every consumer computes the same fair
  assignment from it (partition p goes to the (p mod n)-th live consumer by id).
- ``dead_letters``: messages set aside with their reason (id ``partition-offset``, so
  dead-lettering a message twice leaves one).
- ``partitions.delivered`` (the offset after the last one ever handed out) and ``attempts``
  (handlings begun of a redelivered message, by message id): persisted so a message that
  kills the consumer *process* is known as redelivered by the next one, and dead-lettered by
  the worker after N deliveries instead of coming back forever. One small write per fetch.

Ownership is by lease: a consumer renews its partitions every ``heartbeat_interval`` from a
background task (independent of how long processing takes); a partition whose lease is not
renewed for ``lease_timeout`` seconds is taken by its new assignee. While a consumer has
unacknowledged deliveries of a partition it hands out nothing more from it, so processing is
strictly ordered per partition; and it releases a partition it must give up only once those are
acknowledged (or when it closes, abandoning them for redelivery).

Durability: publish commits one transaction per batch. With ``synchronous="FULL"`` (default)
SQLite fsyncs the WAL on every commit, so a published batch survives a power loss, as the queue
interface promises. ``"NORMAL"`` survives any process crash but may lose the last commits on
power loss or an OS crash; acks always use NORMAL (a lost ack only means a redelivery, which
handlers tolerate).

Every blocking call runs on one dedicated thread (with its own connection), so the event loop
never blocks; all consumer bookkeeping lives on that thread too, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from llmtap.errors import BackendUnavailable, QueueMissing
from llmtap.queue.base import (
    DeadLetter,
    Delivery,
    Message,
    PartitionStatus,
    Queue,
    QueueStatus,
    Role,
    bounded,
    letter_field,
    partition_for,
)
from llmtap.sqlitefile import FileAway, FileGone, WatchedFile

log = logging.getLogger("llmtap.queue.sqlite")

T = TypeVar("T")

_SHIFT = 40  # offsets per partition: 2**40; partitions * 2**40 stays far below 2**63
_MAX_OFFSET = (1 << _SHIFT) - 1
#: Pages of a new queue file. A message (a record, ~1-8 KB) is written to the WAL, read back and
#: written again by the checkpoint, and read by the consumer, a page at a time: with SQLite's 4 KB
#: default a 2.5 KB message filled a page of its own (two could not share one), ~3.4 `pwrite` and
#: ~1 `pread` calls a message (strace). 16 KB holds six: publish 15 -> 9 us and consume + ack
#: 15 -> 7 us a message (`bench/queue_pages.py`; bench/README.md, "... queue pages"). An existing
#: file keeps its page size (SQLite cannot change it in WAL mode).
PAGE_SIZE = 16384
_SHRINK_MIN_BYTES = 16 << 20  # free before the file is shrunk
_SHRINK_BYTES = 8 << 20  # at most this much per heartbeat: a short write transaction
_SHRINK_MAX_LAG = 1000  # messages still waiting: more is a backlog being drained, shrink after
_POLL_MIN, _POLL_MAX = 0.005, 0.1  # seconds between polls of an empty queue: first, at most
_REFETCH = 1.0  # seconds: an idle consumer fetches at least this often, whatever the probe says
_LOCK_RETRIES = 20  # on top of busy_timeout: "database is locked" that the busy handler did not absorb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, key TEXT NOT NULL, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS partitions (
    partition INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL DEFAULT 0,
    committed INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS consumers (id TEXT PRIMARY KEY, heartbeat REAL NOT NULL, lease REAL NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_failed_at ON dead_letters (failed_at);
"""


@dataclass(slots=True)
class _Owned:
    """A partition this consumer holds. Offsets: committed <= delivered <= published."""

    lease_until: float
    committed: int  # next offset not yet acknowledged (as far as this consumer knows)
    delivered: int  # next offset to hand out; > committed means deliveries are outstanding
    releasing: bool = False  # reassigned elsewhere: hand out nothing more, release once acked


@dataclass(slots=True)
class _State:
    owned: dict[int, _Owned] = field(default_factory=dict)
    acked: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))  # acked above committed
    rr: int = 0  # round-robin start so no partition starves the others
    beat: float = 0.0  # when our heartbeat and leases were last written


class SQLiteQueue(Queue):
    """`Queue` on one SQLite file in WAL mode; producers and consumers may be separate processes."""

    def __init__(
        self,
        path: str,
        partitions: int,
        *,
        lease_timeout: float = 5.0,
        heartbeat_interval: float | None = None,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout_ms: int = 10_000,
        consumer_id: str | None = None,
    ) -> None:
        if partitions < 1 or partitions > 1 << 20:
            raise ValueError("partitions must be between 1 and 2**20")
        self.path = path
        self.partitions = partitions
        self.lease_timeout = lease_timeout
        self.heartbeat_interval = heartbeat_interval or max(0.05, lease_timeout / 5)
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._closing = False  # stop retrying a locked file: the queue is being closed
        self.consumer_id = consumer_id or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.description = f"sqlite {path}"
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched on the executor thread only
        self._page_size = PAGE_SIZE  # the file's, once open
        self._state = _State()  # likewise
        self._file = WatchedFile(path, "SQLite queue", log)  # removed or replaced while open: opened again
        self._gen = 1  # files opened so far: a delivery's `handle`, so none is acked in the next
        self._role: Role | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._poll_pause = _POLL_MIN
        # `PRAGMA data_version` read on the event loop (it only reads the WAL index): a poll of
        # an empty queue hops to the queue thread only when some connection committed since the
        # last fetch that found nothing (`_idle_version`), or `_REFETCH` after it.
        self._probe: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat_failing: tuple[float, str] | None = None  # since when, and why
        self._idle_version: int | None = None
        self._idle_at = 0.0

    # -- plumbing -----------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise BackendUnavailable(f"the SQLite queue {self.path} is not connected")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self._guarded, fn, *args))

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the queue thread, retrying lock contention, mapping errors to ours.

        A lock the busy handler gave up on after its whole `busy_timeout` is held by another
        process (a `BEGIN IMMEDIATE` by hand, a backup): an outage, said at once. Retried 20
        times, each waiting the timeout again, a worker stood ~200 s without a word, `/healthz`
        ok (rev13). Errors the handler never waited on (a read snapshot's upgrade) retry."""
        started = time.monotonic()
        for attempt in range(_LOCK_RETRIES):
            try:
                return fn(*args)
            except sqlite3.OperationalError as e:
                self._rollback()
                msg = str(e).lower()
                waited = time.monotonic() - started
                if (
                    ("locked" in msg or "busy" in msg)
                    and attempt < _LOCK_RETRIES - 1
                    and not self._closing
                    and waited < self.busy_timeout_ms / 1000
                ):
                    time.sleep(min(0.2, 0.005 * 2**attempt))
                    continue
                if "locked" in msg or "busy" in msg:
                    raise BackendUnavailable(
                        f"the SQLite queue {self.path} is locked by another process"
                        f" ({waited:.0f} s waited): {e}"
                    ) from e
                raise BackendUnavailable(f"the SQLite queue {self.path} failed: {e}") from e
            except sqlite3.DatabaseError as e:
                self._rollback()
                raise BackendUnavailable(f"the SQLite queue {self.path} failed: {e}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:  # opening it again after its file went failed: try once more
            self._open()
        assert self._conn is not None
        return self._conn

    def _write(self, fn: Callable[[sqlite3.Connection], T], sync: str | None = None) -> T:
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front, so the busy
        handler (busy_timeout) waits for other processes instead of failing on upgrade."""
        if self._file.away_since is not None:
            self._check_file()  # nothing written into a file moved away, until it is back
        db = self._db()
        if sync is not None:
            db.execute(f"PRAGMA synchronous={sync}")
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        finally:
            if sync is not None and sync != self.synchronous:
                db.execute(f"PRAGMA synchronous={self.synchronous}")
        self._check_file()
        return result

    def _check_file(self) -> None:
        try:
            self._file.check()
        except FileAway as e:  # committed into a file that may come back: refused all the same
            raise BackendUnavailable(f"the SQLite queue {self.path}: {e}") from None
        except FileGone as e:  # committed into a file nobody opens again: refused, not lost
            self._open_again(e)
            raise BackendUnavailable(f"the SQLite queue {self.path}: {e} while open; opened again") from None

    def _open_again(self, e: FileGone) -> None:
        """The file at the path is opened in place of the one that went (an outside check
        deleted queue.db under a running stack: the gateway published into the deleted file,
        every record since lost, and said nothing). What the old file held goes with it; its
        deliveries are never acknowledged in the new one (`_gen`), whose offsets start again."""
        what = "a new, empty queue" if "removed" in str(e) else "the file now there"
        log.error("SQLite queue %s: %s while open; opening %s", self.path, e, what)
        db, self._conn = self._conn, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self._file.drop_stale_wal()
        self._state = _State()  # its partitions are claimed again in the new file
        self._gen += 1
        self._idle_version = None
        self._open()
        if self._probe is not None:
            old, self._probe = self._probe, self._open_probe()
            # Closed on the event loop, which reads it (`_version`); left open, it kept the old
            # file's descriptors, and their disk space, for good (the review found 32 after 10).
            if self._loop is not None:
                self._loop.call_soon_threadsafe(old.close)

    # -- lifecycle ----------------------------------------------------------------------------
    async def connect(self, role: Role) -> None:
        self._closing = False
        self._loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtap-sqlite-queue")
        self._role = role
        try:
            await self._call(self._open)
        except (BackendUnavailable, QueueMissing):
            await self._shutdown_executor()
            raise
        if role in ("consumer", "both"):
            self._probe = await self._call(self._open_probe)
            await self._call(self._tick)
            self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="llmtap-queue-heartbeat")

    def _open(self) -> None:
        if self._conn is not None:
            return
        if self._role == "inspect" and not Path(self.path).exists():  # create nothing to look at
            raise QueueMissing(f"no queue file {self.path}: nothing was published to it yet")
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise BackendUnavailable(f"cannot open the SQLite queue at {self.path}: {e}") from e
        self._conn = db
        try:
            self._file.open()
            db.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
            # Both only take effect on a new, empty file, the page size only if set first.
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            # Lets a drained backlog give space back.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL mode (got {mode})")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA journal_size_limit=67108864")  # shrink the WAL back after bursts
            self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])  # older files: 4 KB

            def init(db: sqlite3.Connection) -> None:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                columns = {r[1] for r in db.execute("PRAGMA table_info(partitions)")}
                if "delivered" not in columns:  # a file from before delivery tracking
                    db.execute("ALTER TABLE partitions ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0")
                row = db.execute("SELECT v FROM meta WHERE k='partitions'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('partitions', ?)", (str(self.partitions),))
                    db.executemany(
                        "INSERT OR IGNORE INTO partitions (partition) VALUES (?)",
                        [(p,) for p in range(self.partitions)],
                    )
                elif int(row[0]) != self.partitions:
                    # Every process must map keys alike: the file's count wins over the setting.
                    # Said to the services that publish or consume, not to a command that only
                    # looks (`llmtap dlq list` on the server's ingest queue, made with 4).
                    (log.debug if self._role == "inspect" else log.warning)(
                        "queue %s was created with %s partitions; using that, not %s",
                        self.path,
                        row[0],
                        self.partitions,
                    )
                    self.partitions = int(row[0])

            for attempt in range(_LOCK_RETRIES):
                try:
                    self._write(init)
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e).lower() or attempt == _LOCK_RETRIES - 1:
                        raise
                    time.sleep(0.01 * (attempt + 1))
            self._file.wal_made()
        except sqlite3.Error as e:
            self._conn = None
            db.close()
            raise BackendUnavailable(f"cannot open the SQLite queue at {self.path}: {e}") from e

    def _open_probe(self) -> sqlite3.Connection | None:
        try:
            # No busy wait: read on the event loop, a locked file must fail at once (then fetch).
            return sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return None  # no probe: every poll fetches, as before

    def _version(self) -> int | None:
        """Changes whenever another connection (any process; our queue thread's included)
        committed to the file; None when it cannot be read (then the poll fetches)."""
        if self._probe is None:
            return None
        try:
            return int(self._probe.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._heartbeat_task
            self._heartbeat_task = None
        if self._executor is None:
            return
        # A call stuck on a file another process holds locked (each try waits busy_timeout,
        # 20 tries) held a stopping process for minutes: it now gives up after its current try,
        # and the close waits that long at most, then is left to finish on its own.
        self._closing = True
        close = self._call(self._close_db)
        await bounded(close, self.busy_timeout_ms / 1000 + 5, f"closing the SQLite queue {self.path}")
        await self._shutdown_executor()

    async def _shutdown_executor(self) -> None:
        ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=False)  # its thread ends once its last call returned

    def _close_db(self) -> None:
        db = self._conn
        if db is None:
            return
        try:
            if self._role in ("consumer", "both"):

                def release(db: sqlite3.Connection) -> None:
                    db.execute(
                        "UPDATE partitions SET owner=NULL, lease_until=0 WHERE owner=?", (self.consumer_id,)
                    )
                    db.execute("DELETE FROM consumers WHERE id=?", (self.consumer_id,))

                with contextlib.suppress(sqlite3.Error):
                    self._write(release)
            self._state = _State()
        finally:
            self._conn = None
            db.close()
            self._file.drop_stale_wal()

    # -- producer -----------------------------------------------------------------------------
    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        batch = [(m.key, m.value) for m in messages]
        await self._call(self._write, partial(self._append, batch))

    def _append(self, batch: Sequence[tuple[str, bytes]], db: sqlite3.Connection) -> int:
        """Append in the caller's transaction; offsets follow publish order within a partition."""
        nexts: dict[int, int] = dict(db.execute("SELECT partition, next_offset FROM partitions").fetchall())
        n = self.partitions
        rows: list[tuple[int, str, bytes]] = []
        touched: dict[int, int] = {}
        for key, value in batch:
            p = partition_for(key, n)
            off = touched[p] if p in touched else nexts[p]
            if off > _MAX_OFFSET:
                raise sqlite3.OperationalError(f"partition {p} is out of offsets")
            rows.append(((p << _SHIFT) | off, key, value))
            touched[p] = off + 1
        db.executemany("INSERT INTO messages (id, key, value) VALUES (?, ?, ?)", rows)
        db.executemany(
            "UPDATE partitions SET next_offset=? WHERE partition=?", [(o, p) for p, o in touched.items()]
        )
        return len(rows)

    # -- consumer -----------------------------------------------------------------------------
    async def consume(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Poll with a back-off kept across calls: a worker asks again every half second while
        the queue is empty, and a back-off restarting at 5 ms each time made it poll twice as
        often as 10 times a second. A poll fetches (a thread hop and a query) only when the
        file changed since the last fetch that found nothing: the version is read before the
        fetch, so a commit racing with it is seen by the next poll."""
        deadline = time.monotonic() + max(0.0, timeout)
        if self._heartbeat_failing is not None and time.monotonic() - self._heartbeat_failing[0] > max(
            2 * self.heartbeat_interval, 5.0
        ):
            # Its leases are not renewed: an outage, though an idle poll writes nothing (a worker
            # said ok while its heartbeat failed once a minute and its lag grew: review).
            raise BackendUnavailable(
                f"the SQLite queue {self.path}: its heartbeat fails: {self._heartbeat_failing[1]}"
            )
        while True:
            version = self._version()
            stale = time.monotonic() - self._idle_at >= _REFETCH
            if version is None or version != self._idle_version or stale:
                out = await self._fetch_shielded(max_messages)
                if out:
                    self._poll_pause = _POLL_MIN
                    self._idle_version = None
                    return out
                self._idle_version, self._idle_at = version, time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            pause = self._poll_pause
            await asyncio.sleep(min(pause, left))
            self._poll_pause = min(pause * 2, _POLL_MAX)  # idle: back off to 10 polls a second

    async def _fetch_shielded(self, max_messages: int) -> list[Delivery]:
        """Fetch on the thread; if our caller is cancelled meanwhile, undo the hand-out so the
        partition is not blocked by deliveries nobody will ever acknowledge."""
        if self._executor is None:
            raise BackendUnavailable(f"the SQLite queue {self.path} is not connected")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, partial(self._guarded, self._fetch, max_messages))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:

            def undo(f: asyncio.Future[list[Delivery]]) -> None:
                if not f.cancelled() and f.exception() is None and f.result() and self._executor:
                    with contextlib.suppress(RuntimeError):
                        self._executor.submit(self._undeliver, f.result())

            fut.add_done_callback(undo)
            raise

    def _undeliver(self, deliveries: list[Delivery]) -> None:
        self._idle_version = None  # handed out again without a commit: the next poll fetches
        first: dict[int, int] = {}
        for d in deliveries:
            first[d.partition] = min(first.get(d.partition, d.offset), d.offset)
        for p, off in first.items():
            st = self._state.owned.get(p)
            if st is not None and st.delivered > off:
                st.delivered = max(off, st.committed)

    def _fetch(self, max_messages: int) -> list[Delivery]:
        state = self._state
        if not state.owned or max_messages <= 0:
            return []
        now = time.time()
        margin = min(1.0, self.lease_timeout / 4)
        ready = sorted(
            p
            for p, st in state.owned.items()
            if not st.releasing and st.delivered == st.committed and st.lease_until - margin > now
        )
        if not ready:
            return []
        db = self._db()
        marks = ",".join("?" * len(ready))
        heads: dict[int, tuple[int, int]] = {}
        marked: dict[int, int] = {}  # offsets below this were handed out before (maybe by the dead)
        for p, nxt, committed, delivered in db.execute(
            "SELECT partition, next_offset, committed, delivered FROM partitions"
            f" WHERE partition IN ({marks})",
            ready,
        ):
            heads[p] = (nxt, committed)
            marked[p] = delivered
        for p in ready:
            # Another consumer (a late ack after a takeover) may have committed past our view.
            st = state.owned[p]
            if heads[p][1] > st.committed:
                st.committed = st.delivered = heads[p][1]
        ready = [p for p in ready if heads[p][0] > state.owned[p].delivered]
        if not ready:
            return []
        start = state.rr % len(ready)
        state.rr += 1
        order = ready[start:] + ready[:start]
        # Bookkeeping is applied only once every read succeeded: a failed read hands out nothing.
        cursor = {p: state.owned[p].delivered for p in order}
        out: list[Delivery] = []
        gen = self._gen
        # Fill the batch from as few partitions as it takes, starting at a rotating one (no
        # partition starves): a partition with deliveries out is not handed out again until
        # they are acked, so a batch spread over every partition would leave nothing for the
        # worker's next batch in flight (`worker_pipeline`) while this one is written.
        for p in order:
            left = max_messages - len(out)
            if left <= 0:
                break
            if cursor[p] >= heads[p][0]:
                continue
            rows = db.execute(
                "SELECT id, key, value FROM messages WHERE id >= ? AND id <= ? ORDER BY id LIMIT ?",
                ((p << _SHIFT) | cursor[p], (p << _SHIFT) | _MAX_OFFSET, left),
            ).fetchall()
            for rid, key, value in rows:
                off = rid & _MAX_OFFSET
                count = 2 if off < marked[p] else 1
                d = Delivery(partition=p, offset=off, key=key, value=value, delivery_count=count, handle=gen)
                out.append(d)
                cursor[p] = off + 1
            if not rows:
                cursor[p] = heads[p][0]  # nothing there (trimmed meanwhile): skip for now
        # Persist how far we hand out before handing out: if this process dies handling them,
        # the next owner sees them as redelivered.
        marks_up = [(cursor[p], p) for p in order if cursor[p] > marked[p]]
        if marks_up:
            self._write(
                lambda db: db.executemany(
                    "UPDATE partitions SET delivered=MAX(delivered, ?) WHERE partition=?", marks_up
                ),
                "NORMAL",
            )
        for d in out:
            st = state.owned[d.partition]
            st.delivered = max(st.delivered, d.offset + 1)
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        await self._call(self._ack, deliveries)

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        offs = [(d.partition, d.offset) for d in deliveries if self._current(d)]
        if offs:
            apply = self._write(partial(self._ack_in_tx, offs), "NORMAL")
            apply()

    def _current(self, d: Delivery) -> bool:
        """Handed out from the file open now (on the queue thread, where `_gen` changes)."""
        return d.handle is None or d.handle == self._gen

    def _ack_in_tx(self, offs: Sequence[tuple[int, int]], db: sqlite3.Connection) -> Callable[[], None]:
        """Advance committed offsets over contiguous acknowledged runs and trim what they cover.

        Acks of a partition this consumer no longer owns still count (the work was done);
        `MAX` keeps a late ack from moving a newer owner's committed offset backwards. Returns
        the bookkeeping to apply once the transaction has committed.
        """
        state = self._state
        by_p: dict[int, set[int]] = defaultdict(set)
        for p, off in offs:
            by_p[p].add(off)
        marks = ",".join("?" * len(by_p))
        current = dict(
            db.execute(
                f"SELECT partition, committed FROM partitions WHERE partition IN ({marks})", list(by_p)
            )
        )
        updates: list[tuple[int, int]] = []
        trims: list[tuple[int, int]] = []
        results: dict[int, tuple[int, set[int]]] = {}
        for p, offsets in by_p.items():
            pending = state.acked.get(p, set()) | offsets
            st = state.owned.get(p)
            db_committed = int(current.get(p, 0))
            c = max(db_committed, st.committed if st else 0)
            while c in pending:
                c += 1
            results[p] = (c, {o for o in pending if o >= c})
            if c > db_committed:
                updates.append((c, p))
                trims.append(((p << _SHIFT), (p << _SHIFT) | c))
        if updates:
            db.executemany("UPDATE partitions SET committed=MAX(committed, ?) WHERE partition=?", updates)
            db.executemany("DELETE FROM messages WHERE id >= ? AND id < ?", trims)
            db.executemany("DELETE FROM attempts WHERE id >= ? AND id < ?", trims)

        def apply() -> None:
            for p, (c, pending) in results.items():
                if pending:
                    state.acked[p] = pending
                else:
                    state.acked.pop(p, None)
                st = state.owned.get(p)
                if st is not None:
                    st.committed = max(st.committed, c)
                    st.delivered = max(st.delivered, st.committed)

        return apply

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._call(self._dead_letter, delivery, reason)

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        def tx(db: sqlite3.Connection) -> Callable[[], None]:
            # The id is deterministic, so dead-lettering a redelivered message again is a no-op.
            db.execute(
                'INSERT OR REPLACE INTO dead_letters (id, partition, "offset", key, value, reason, failed_at)'
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (f"{d.partition}-{d.offset}", d.partition, d.offset, d.key, d.value, reason, time.time()),
            )
            # Kept either way; a delivery of a file that went has no offset to ack here.
            return self._ack_in_tx([(d.partition, d.offset)], db) if self._current(d) else lambda: None

        self._write(tx)()

    async def begin_attempt(self, delivery: Delivery) -> int:
        rid = (delivery.partition << _SHIFT) | delivery.offset

        def tx(db: sqlite3.Connection) -> int:
            if not self._current(delivery):
                return 1  # the new file's message at that offset is another one
            db.execute(
                "INSERT INTO attempts (id, n) VALUES (?, 1) ON CONFLICT(id) DO UPDATE SET n = n + 1", (rid,)
            )
            return int(db.execute("SELECT n FROM attempts WHERE id=?", (rid,)).fetchone()[0])

        # NORMAL sync: a committed write survives the process dying right after (what the count
        # is there for); only an OS crash may lose it, and then it counts one death less.
        return await self._call(self._write, tx, "NORMAL")

    async def forget_attempt(self, delivery: Delivery) -> None:
        rid = (delivery.partition << _SHIFT) | delivery.offset

        def tx(db: sqlite3.Connection) -> None:
            if self._current(delivery):
                db.execute("UPDATE attempts SET n = n - 1 WHERE id=? AND n > 0", (rid,))

        await self._call(self._write, tx, "NORMAL")

    # -- leases -------------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        said = 0.0  # when a failure was last logged: once a minute, not once a heartbeat
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            began = time.monotonic()
            try:
                await self._call(self._tick)
                self._heartbeat_failing = None
                if said:
                    log.warning("queue heartbeat of %s works again", self.path)
                    said = 0.0
            except BackendUnavailable as e:
                if self._heartbeat_failing is None:
                    # Since the failing try began: a lock waited out for busy_timeout is that
                    # long an outage already (timed from its end, /healthz said it 12 s after
                    # the log line: rev14).
                    self._heartbeat_failing = (began, str(e))
                if time.monotonic() - said >= 60.0:
                    log.warning("queue heartbeat of %s failed (retrying every %gs): %s", self.path,
                                self.heartbeat_interval, e)  # fmt: skip
                    said = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the heartbeat die silently
                log.exception("queue heartbeat failed")

    def _tick(self) -> None:
        self._write(self._rebalance, "NORMAL")()
        self._shrink()

    def _shrink(self) -> None:
        """Give pages freed by trimming back to the file system, a bounded chunk per heartbeat,
        once most of the file is free and the backlog is drained; steady use keeps reusing them.

        Not while a backlog is still being drained (half of it is enough to free half the file):
        the vacuum moves the remaining messages' pages on this queue's one thread, so fetches
        and acks waited for it, and it was the largest share of that thread's time while a
        worker drained 20k records (py-spy, bench/README.md)."""
        db = self._db()
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        page = self._page_size
        if free * page < _SHRINK_MIN_BYTES or free * 2 < db.execute("PRAGMA page_count").fetchone()[0]:
            return
        if (
            db.execute("SELECT coalesce(sum(next_offset - committed), 0) FROM partitions").fetchone()[0]
            > _SHRINK_MAX_LAG
        ):
            return
        # executescript steps the pragma to completion (execute() would free a single page)
        db.executescript(f"PRAGMA incremental_vacuum({_SHRINK_BYTES // page});")

    def _rebalance(self, db: sqlite3.Connection) -> Callable[[], None]:
        """Renew, release and claim partitions so each live consumer holds its fair share.

        Returns the bookkeeping to apply once the transaction has committed.
        """
        me = self.consumer_id
        now = time.time()
        owned = self._state.owned
        # Heartbeat and leases are written every other tick: each write is a few pages of WAL,
        # ~49 KB/s from an idle `llmtap up` (an outside soak). A lease written a quarter of its
        # time ago still has three quarters left, well above the fetch margin.
        quiet = now - self._state.beat < self.lease_timeout / 4
        live = [r[0] for r in db.execute("SELECT id FROM consumers ORDER BY id")]
        if not quiet or me not in live:
            quiet = False
            db.execute(
                "INSERT OR REPLACE INTO consumers (id, heartbeat, lease) VALUES (?, ?, ?)",
                (me, now, self.lease_timeout),
            )
            db.execute("DELETE FROM consumers WHERE heartbeat + lease < ?", (now,))
            live = [r[0] for r in db.execute("SELECT id FROM consumers ORDER BY id")]
        idx, n = live.index(me), len(live)
        lease_until = now + self.lease_timeout
        rows = db.execute("SELECT partition, committed, owner, lease_until FROM partitions").fetchall()
        renew: list[tuple[float, int]] = []
        releasing: list[int] = []
        release: list[int] = []
        lost: list[int] = []
        claim: dict[int, int] = {}
        for p, committed, owner, until in rows:
            mine = p % n == idx
            st = owned.get(p)
            if owner == me and st is not None:
                if mine:
                    renew.append((lease_until, p))
                elif st.delivered > st.committed:
                    releasing.append(p)  # finish what is out, then let go
                    renew.append((lease_until, p))
                else:
                    release.append(p)
                continue
            if st is not None:  # we thought we held it, but someone took it over: stop
                log.warning("lost partition %s to %s (lease expired)", p, owner)
                lost.append(p)
            if mine and (owner is None or owner == me or until < now):
                claim[p] = committed
            elif owner == me:
                release.append(p)
        if renew and not quiet:
            db.executemany("UPDATE partitions SET lease_until=? WHERE partition=?", renew)
        if release:
            db.executemany(
                "UPDATE partitions SET owner=NULL, lease_until=0 WHERE partition=?", [(p,) for p in release]
            )
        if claim:
            db.executemany(
                "UPDATE partitions SET owner=?, lease_until=? WHERE partition=?",
                [(me, lease_until, p) for p in claim],
            )

        def apply() -> None:
            if not quiet:
                self._state.beat = now
            for _, p in renew:
                st = owned[p]
                if not quiet:
                    st.lease_until = lease_until
                st.releasing = p in releasing
            for p in release + lost:
                owned.pop(p, None)
            for p, committed in claim.items():
                owned[p] = _Owned(lease_until=lease_until, committed=committed, delivered=committed)
                self._state.acked.pop(p, None)

        return apply

    # -- operations ---------------------------------------------------------------------------
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        def read() -> list[DeadLetter]:
            # As bytes: one letter written by hand with text that is not UTF-8 (or numbers that
            # are not numbers) must not fail the listing of all the others.
            rows = self._db().execute(
                'SELECT CAST(id AS BLOB), partition, "offset", CAST(key AS BLOB), value,'
                " CAST(reason AS BLOB), failed_at FROM dead_letters ORDER BY failed_at, id LIMIT ?",
                (limit,),
            )
            return [
                DeadLetter(
                    id=_text(i),
                    partition=letter_field(str(p), int, 0),
                    offset=letter_field(str(o), int, 0),
                    key=_text(k),
                    value=v if isinstance(v, bytes) else str(v).encode(),
                    reason=_text(r),
                    failed_at=letter_field(str(t), float, 0.0),
                )
                for i, p, o, k, v, r, t in rows
            ]

        return await self._call(read)

    async def replay_dead_letters(self, ids: Sequence[str] | None = None, *, publish: bool = True) -> int:
        def replay(db: sqlite3.Connection) -> int:
            what = "SELECT id, CAST(key AS BLOB), value FROM dead_letters"
            if ids is None:
                rows = db.execute(f"{what} ORDER BY failed_at, id").fetchall()
            else:
                rows = []
                for i in dict.fromkeys(ids):
                    rows += db.execute(f"{what} WHERE id=?", (i,)).fetchall()
            if not rows:
                return 0
            if publish:
                self._append([(_text(k), v) for _, k, v in rows], db)
            db.executemany("DELETE FROM dead_letters WHERE id=?", [(r[0],) for r in rows])
            return len(rows)

        return await self._call(self._write, replay)

    async def status(self) -> QueueStatus:
        def read() -> QueueStatus:
            db = self._db()
            now = time.time()
            parts = [
                PartitionStatus(partition=p, lag=nxt - committed, owner=owner if until >= now else None)
                for p, nxt, committed, owner, until in db.execute(
                    "SELECT partition, next_offset, committed, owner, lease_until FROM partitions"
                    " ORDER BY partition"
                )
            ]
            dead = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            return QueueStatus(backend="sqlite", partitions=parts, dead_letters=int(dead))

        return await self._call(read)


def _text(value: object) -> str:
    """A text column read as bytes, whatever was written into it."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
