"""The embedded analytics store: one SQLite file in WAL mode.

sqlite3 calls block, so they never run on the event loop: all writes go through one dedicated
writer thread (one connection, one transaction per batch, `executemany` with
`ON CONFLICT(tenant, id) DO NOTHING`), and reads through one reader thread with its own
connection — WAL lets that reader see a consistent snapshot while a batch is being written, so
a slow stats query never holds up the worker. `synchronous=FULL` makes a committed batch
survive a power cut, which is what "acknowledged only once durable" needs; it costs one fsync
per batch, not per record.

Several processes may share the file (a worker and a server's ingest endpoint): writers wait up
to `busy_timeout` for each other, and a lock held longer becomes `TransientError` (retried).

Checkpoints (copying the WAL into the database file) run on a thread of their own after each
batch (`_Checkpointer`), not in the writer's COMMIT: in a store of millions of rows the pages a
batch touches are scattered over gigabytes, and copying them was a third of the writer's time,
during which no batch was written. The writer still checkpoints itself once the WAL passes
`WAL_CHECKPOINT_PAGES` (then it is mostly copied already), which bounds the WAL's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from llmtap.errors import BackendUnavailable, ConfigError, TransientError
from llmtap.sqlitefile import FileAway, FileGone, WatchedFile
from llmtap.store import rollup, search, sql
from llmtap.store.base import ApiKey, ListQuery, Page, StatsQuery, Store
from llmtap.store.migrations import SQLITE as MIGRATIONS
from llmtap.store.migrations import refuse_newer
from llmtap.store.query import (
    BUCKET_MICROS,
    MAX_BUCKETS,
    MAX_GROUPS,
    MAX_SESSION_REQUESTS,
    UserTotals,
    from_micros,
    iso,
    to_micros,
    validate_stats,
)
from llmtap.webhooks import outbox
from llmtap.webhooks.db import (
    INSERT_DELIVERY,
    SELECT_ENDPOINTS,
    Conn,
    WebhookDB,
    delivery_params,
    endpoint_from_row,
    now_us,
)

if TYPE_CHECKING:
    from llmtap.record import LogRecord

T = TypeVar("T")

log = logging.getLogger("llmtap.store.sqlite")

#: The writer's own automatic checkpoint (SQLite's default is 1000 pages): a backstop that bounds
#: the WAL (~64 MB of 4 KB pages) when the checkpoint thread falls behind or cannot finish.
WAL_CHECKPOINT_PAGES = 16384


#: SQLite result codes (primary) of a damaged store file.
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class _Checkpointer:
    """Copies the WAL into the database on its own thread and connection, kicked after a batch.

    A PASSIVE checkpoint runs beside the writer (it takes no write lock) and mostly waits on the
    disk, outside the GIL. At most one run is queued behind the current one.
    """

    def __init__(self, open_conn: Callable[[], sqlite3.Connection]) -> None:
        self._open = open_conn
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llmtap-store-c")
        self._lock = threading.Lock()
        self._queued = False
        self._closed = False

    async def start(self) -> None:
        """Open the connection now, on its thread: a store holds its handles from `connect`."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        if self._conn is None:
            self._conn = self._open()

    def kick(self) -> None:
        with self._lock:
            if self._queued or self._closed:
                return
            self._queued = True
        self._executor.submit(self._run)

    def _run(self) -> None:
        with self._lock:
            self._queued = False
        try:
            self._connect()
            assert self._conn is not None
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as e:  # the writer's own checkpoint still bounds the WAL
            log.debug("sqlite store: background checkpoint failed: %s", e)

    def close(self) -> None:
        with self._lock:
            self._closed = True

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._executor.submit(_close)
        self._executor.shutdown(wait=True)


def _json(v: Any) -> Any:
    return None if v is None else orjson.loads(v)


_GLOB_META = str.maketrans({"*": "[*]", "?": "[?]", "[": "[[]"})


def _text_match(p: sql.Params, q: str, text: str) -> str:
    """FTS5 trigram: GLOB `*q*` (case-folded text, so case-sensitive GLOB is right) finds a
    substring of 3+ characters through the index; shorter ones are looked for row by row."""
    folded = search.fold(q)
    if len(folded) >= 3:
        return f"{text} GLOB {p('*' + folded.translate(_GLOB_META) + '*')}"
    return f"instr({text}, {p(folded)}) > 0"


def _search(p: sql.Params, q: str) -> str:
    docs = f"SELECT rowid FROM request_text WHERE {_text_match(p, q, 'text')}"
    return f"(r.tenant, r.id) IN (SELECT s.tenant, s.id FROM request_search s WHERE s.docid IN ({docs}))"


def _search_row(p: sql.Params, q: str) -> str:
    # the text by rowid: the GLOB applies to the value, so FTS5 cannot take it as an index scan
    doc = "SELECT s.docid FROM request_search s WHERE s.tenant = r.tenant AND s.id = r.id"
    return _text_match(p, q, f"(SELECT t.text FROM request_text t WHERE t.rowid = ({doc}))")


def _search_count(p: sql.Params, q: str, cap: int) -> str:
    if len(search.fold(q)) < 3:  # no trigram: the index would read every text; walk the rows
        return f"SELECT {int(cap)}"
    docs = f"SELECT 1 FROM request_text WHERE {_text_match(p, q, 'text')} LIMIT {int(cap)}"
    return f"SELECT count(*) FROM ({docs})"


DIALECT = sql.Dialect(
    name="sqlite",
    placeholder=lambda n: f"?{n}",
    ts_param=lambda us: us,
    ts_value=int,
    bucket=lambda b: f"((r.created_at / {BUCKET_MICROS[b]}) * {BUCKET_MICROS[b]})",
    json_value=_json,
    # json_each compares the key as a bound value: any property name is safe, quotes included.
    prop_value=lambda ph: f"(SELECT j.value FROM json_each(r.properties) AS j WHERE j.key = {ph})",
    search=_search,
    search_row=_search_row,
    search_count=_search_count,
    unindexed=lambda column: f"+{column}",  # SQLite's unary + hides a column from its indexes
    add_up=lambda column: f"total({column})",
)


def _insert(columns: Sequence[str]) -> str:
    return (
        f"INSERT INTO requests ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        " ON CONFLICT(tenant, id) DO NOTHING"
    )


_INSERT = _insert(sql.COLUMNS)
#: How a request row binds NULL: Python's sqlite3 passes `None` (and every type but int, float,
#: str and bytearray) through its adapter protocol, a tuple, a dict lookup and two attribute
#: lookups per parameter, where a float is bound directly; and SQLite stores a bound NaN as NULL.
#: A chat record's row has ~16 NULLs of 42: the store's writer thread 5-9 us a record less
#: (`bench/worker_cpu.py`, 6 alternating pairs).
_NULL = float("nan")


def _bindable(row: Sequence[Any]) -> list[Any]:
    """A request row's parameters with NULL bound as NaN (`_NULL`)."""
    return [_NULL if v is None else v for v in row]


# A property row belongs to the row that won the insert: a reused request id with a different
# start time (a second request, not a redelivery) must not graft its properties onto the first.
_INSERT_PROP = (
    "INSERT INTO request_properties (tenant, request_id, created_at, name, value)"
    " SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS"
    " (SELECT 1 FROM requests WHERE tenant = ?1 AND id = ?2 AND created_at = ?3)"
    " ON CONFLICT DO NOTHING"
)


def qmarks(query: str) -> str:
    """`$1` placeholders (written for both stores) as SQLite's `?1`."""
    return re.sub(r"\$(\d+)", r"?\1", query)


_ENDPOINTS = qmarks(f"{SELECT_ENDPOINTS} WHERE disabled_at IS NULL")
_INSERT_DELIVERY = qmarks(INSERT_DELIVERY)


class _SQLiteConn:
    def __init__(self, conn: sqlite3.Connection, run: Callable[..., Any]) -> None:
        self._conn = conn
        self._run = run

    async def fetch(self, query: str, *args: Any) -> list[Sequence[Any]]:
        q = qmarks(query)
        rows: list[Sequence[Any]] = await self._run(lambda: self._conn.execute(q, args).fetchall())
        return rows

    async def execute(self, query: str, *args: Any) -> int:
        n: int = await self._run(lambda: self._conn.execute(qmarks(query), args).rowcount)
        return n


class SQLiteWebhooks(WebhookDB):
    """Webhook tables through a connection and thread of their own (the record writer's
    transactions are one call each on its thread; these span several awaits)."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="llmtap-webhooks")
        return await self._store._run(self._executor, fn)

    async def close(self) -> None:
        if self._executor is not None:
            conn, self._conn = self._conn, None
            if conn is not None:
                await self._run(conn.close)
            self._executor.shutdown(wait=True)
            self._executor = None

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[Conn]:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._run(lambda: self._store._open(readonly=False))
            conn = self._conn
            await self._run(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                yield _SQLiteConn(conn, self._run)
            except BaseException:
                await self._run(lambda: _rollback(conn))
                raise
            await self._run(lambda: conn.execute("COMMIT"))


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back what is open, without hiding why: SQLite has already rolled back after some
    errors ("database or disk is full"), and a ROLLBACK then raised "cannot rollback - no
    transaction is active" in place of the full disk's own message."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


#: Bytes the store's WAL file is truncated to after a checkpoint (as the queue's).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
#: Reader threads, each with its own connection (WAL readers do not block one another). With one,
#: a slow query (stats over raw rows: seconds at 1M rows) held the Requests list, the drawer and
#: the Overview's other calls behind it for as long (measured: a 19 ms page took 12.8 s).
READERS = 4
_ROLLUP_COLS = ", ".join(rollup.COLUMNS)
_ROLLUP_GET = (
    f"SELECT {', '.join(rollup.COLUMNS[5:])} FROM rollups"
    " WHERE tenant = ?1 AND grain = ?2 AND dim = ?4 AND bucket = ?3 AND key = ?5"
)
_ROLLUP_PUT = (
    f"INSERT OR REPLACE INTO rollups ({_ROLLUP_COLS}) VALUES ({', '.join('?' * len(rollup.COLUMNS))})"
)
_ROLLUP_ADD = rollup.add_totals_sql(["?"] * len(rollup.COLUMNS))
_ROLLUP_DEL = "DELETE FROM rollups WHERE tenant = ?1 AND grain = ?2 AND dim = ?4 AND bucket = ?3 AND key = ?5"


#: Fewer rows than this in a cost- or latency-sorted page's time range: sort them (see
#: `SQLiteStore._list_requests`).
SORT_INDEX_MIN_ROWS = 5000


def _api_key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(
        id=row[0],
        tenant=row[1],
        name=row[2],
        prefix=row[3],
        created_at=from_micros(row[4]),
        revoked_at=None if row[5] is None else from_micros(row[5]),
    )


class SQLiteStore(Store):
    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 10.0,
        rollup_properties: Sequence[str] | None = (),
    ) -> None:
        """`rollup_properties` None: an admin command's connection, which rolls up the
        properties the services registered and registers none itself (`open_store`)."""
        self.path = Path(path)
        self._admin = rollup_properties is None
        self.rollup_properties = tuple(sql.property_name(p) for p in rollup_properties or ())
        self._covered: dict[str, int] = {}
        self._rollups = False  # the schema has them (always, unless a test stops migrations early)
        self._search = False  # likewise, the search index
        self._project: tuple[int, ...] | None = None  # likewise, every column of `sql.COLUMNS`
        self._insert = _INSERT
        # The rollup cells the last batch wrote, decoded: the next batch mostly adds to the same
        # ones (its minute, hour and day), and reading them back was a third of what a small
        # batch's write cost. Valid while `_cells_mark` (data_version: no other connection
        # committed; total_changes: nothing else written on ours) is unchanged.
        self._cells: dict[rollup.RollupKey, rollup.Cell] = {}
        self._cells_mark: tuple[int, int] | None = None
        self._busy_ms = int(busy_timeout * 1000)
        self.description = f"sqlite {self.path}"
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._wconn: sqlite3.Connection | None = None
        self._local = threading.local()  # a reader thread's connection
        self._rconns: list[sqlite3.Connection] = []  # every reader thread's, to close
        self._rlock = threading.Lock()
        self._asked = 0  # reads asked for so far: a read's ticket
        self._cut = 0  # reads with a lower ticket are refused or interrupted (`cut_reads`)
        self._running: dict[int, sqlite3.Connection] = {}  # ticket: the reader's connection
        self._checkpointer: _Checkpointer | None = None
        self._hooks: SQLiteWebhooks | None = None
        self._outbox = False  # the webhook tables are there (not in a file migrated only part-way)
        self._file = WatchedFile(
            self.path, "SQLite store", log
        )  # removed or replaced while open (`FileGone`)
        self._lost: str | None = None  # why the file must be opened again
        self._reopening = asyncio.Lock()

    def webhooks(self) -> SQLiteWebhooks:
        if self._hooks is None:
            self._hooks = SQLiteWebhooks(self)
        return self._hooks

    # -- plumbing ---------------------------------------------------------------------------------
    def _open(self, readonly: bool, create: bool = False) -> sqlite3.Connection:
        # A reader is closed after its thread's pool has stopped, from the closing thread.
        # Only the writer, at `connect`, makes the file: a reader (or the webhook connection)
        # opened after it was removed made an empty one, with no tables, at its path.
        where = f"file:{urllib.parse.quote(str(self.path))}{'' if create else '?mode=rw'}"
        conn = sqlite3.connect(
            where,
            uri=True,
            timeout=self._busy_ms / 1000,
            isolation_level=None,
            check_same_thread=not readonly,
        )
        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA cache_size = -32000")
        if readonly:
            conn.execute("PRAGMA query_only = 1")
        else:
            # A WAL grown by a large purge (retention deletes 10,000 rows a transaction) is cut
            # back to this at the next checkpoint: it stayed at its largest until a restart.
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        return conn

    async def _run(self, executor: ThreadPoolExecutor | None, fn: Callable[..., T], *args: Any) -> T:
        if executor is None:
            raise TransientError(f"SQLite store {self.path} is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, fn, *args)
        except RuntimeError as e:  # the pool was shut down: `close()` has begun
            if "shutdown" not in str(e):
                raise
            raise TransientError(f"SQLite store {self.path} is closing") from None
        except sqlite3.OperationalError as e:
            if executor is not self._writer and "syntax error" in str(e):
                raise  # a query llmtap built wrong: a bug (500), not a store to wait for (503)
            # locked / busy / disk I/O / full disk: passing conditions, the caller retries.
            # (A write that can never succeed waits too: its records stay in the queue.)
            raise TransientError(f"SQLite store {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            # A damaged file ("database disk image is malformed", "file is not a database"): no
            # record causes it (every one was dead-lettered); they wait for a repair.
            if getattr(e, "sqlite_errorcode", 0) & 0xFF not in _DAMAGED:
                raise
            raise TransientError(f"SQLite store {self.path} is damaged ({e}): repair or restore it") from e

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._run(self._writer, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        ticket, self._asked = self._asked, self._asked + 1

        def read() -> T:
            self._file.check()
            conn = self._r()
            with self._rlock:
                self._running[ticket] = conn
            try:
                if ticket < self._cut:
                    raise sqlite3.OperationalError("interrupted: the server is stopping")
                if conn.in_transaction:  # a snapshot's end refused (interrupted): end it now
                    conn.execute("ROLLBACK")
                return fn(*args)
            finally:
                with self._rlock:
                    del self._running[ticket]

        try:
            return await self._run(self._reader, read)
        except FileAway as e:
            raise TransientError(f"SQLite store {self.path}: {e}") from None
        except FileGone as e:
            await self._file_gone(e)
            raise TransientError(f"SQLite store {self.path}: {e}; opened again") from None

    async def cut_reads(self) -> None:
        self._cut = self._asked
        # Again and again until none is left: a read may start its query just after one pass.
        while True:
            with self._rlock:
                cut = [conn for ticket, conn in self._running.items() if ticket < self._cut]
                for conn in cut:
                    conn.interrupt()
            if not cut:
                return
            await asyncio.sleep(0.05)

    def _w(self) -> sqlite3.Connection:
        assert self._wconn is not None
        return self._wconn

    def _r(self) -> sqlite3.Connection:
        """This reader thread's connection, opened at its first query."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open(readonly=True)
            with self._rlock:
                self._rconns.append(conn)
            self._local.conn = conn
        return conn

    # -- lifecycle --------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._writer is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BackendUnavailable(
                f"cannot create the SQLite store's directory {self.path.parent}: {e}"
            ) from e
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="llmtap-store-w")
        self._reader = ThreadPoolExecutor(READERS, thread_name_prefix="llmtap-store-r")
        self._local = threading.local()
        try:
            await self._write(self._connect_writer)
            await self._read(self._connect_reader)
            self._checkpointer = _Checkpointer(lambda: self._open(readonly=False))
            await self._checkpointer.start()
        except ConfigError:
            await self.close()
            raise
        except (TransientError, sqlite3.Error, OSError) as e:
            await self.close()
            cause = e.__cause__ or e
            raise BackendUnavailable(f"cannot open the SQLite store {self.path}: {cause}") from e

    def _connect_writer(self) -> None:
        self._wconn = conn = self._open(readonly=False, create=True)
        self._file.open()
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        conn.execute("BEGIN IMMEDIATE")  # one process migrates at a time
        try:
            self._migrate(conn, str(self.path))
            # The outbox as this code reads it (endpoints with a payload format, version 10).
            self._outbox = bool(
                conn.execute(
                    "SELECT 1 FROM pragma_table_info('webhook_endpoints') WHERE name = 'format'"
                ).fetchone()
            )
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'rollup_dims'").fetchone()
            self._rollups = found is not None
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'request_text'").fetchone()
            self._search = found is not None
            present = {str(row[1]) for row in conn.execute("PRAGMA table_info(requests)")}
            cols = sql.written_columns(present)
            self._project = None if cols is None else tuple(sql.COLUMNS.index(c) for c in cols)
            self._insert = _INSERT if cols is None else _insert(cols)
            if self._rollups:
                # Dimensions rolled up from now on (see `llmtap.store.rollup`: coverage).
                empty = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM requests)").fetchone()[0]
                now = to_micros(sql.now())
                registered = [row[0] for row in conn.execute("SELECT dim FROM rollup_dims")]
                if self._admin:  # the services' dimensions, as they registered them
                    self.rollup_properties = rollup.registered_properties(registered)
                    registered = list(rollup.dims_for(self.rollup_properties))
                if empty:
                    since = 0
                elif set(rollup.dims_for(self.rollup_properties)) - set(registered):
                    newest = conn.execute(
                        "SELECT max(created_at) FROM requests WHERE created_at >= ?", (now,)
                    )
                    since = rollup.coverage_start(now, newest.fetchone()[0])
                else:
                    since = rollup.coverage_start(now, None)  # nothing new: unused
                conn.executemany(
                    "DELETE FROM rollup_dims WHERE dim = ?",
                    [(d,) for d in rollup.uncovered(registered, self.rollup_properties)],
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO rollup_dims (dim, since) VALUES (?, ?)",
                    [(d, since) for d in rollup.dims_for(self.rollup_properties)],
                )
                self._covered = dict(conn.execute("SELECT dim, since FROM rollup_dims").fetchall())
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._file.wal_made()

    @staticmethod
    def _migrate(conn: sqlite3.Connection, where: str) -> None:
        """Apply every version not applied yet (a gap filled later included: see
        `llmtap.store.migrations`); `user_version` keeps the highest applied, as before."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(
            "CREATE TABLE IF NOT EXISTS llmtap_migrations"
            " (version integer PRIMARY KEY, description text NOT NULL, applied_at integer NOT NULL)"
        )
        done = {int(r[0]) for r in conn.execute("SELECT version FROM llmtap_migrations")}
        refuse_newer(MIGRATIONS, done, where)
        if not done and version:
            # A file migrated before this table existed: versions had no gaps, 1..user_version ran.
            done = {v for v, _, _ in MIGRATIONS if v <= version}
            conn.executemany(
                "INSERT INTO llmtap_migrations (version, description, applied_at) VALUES (?, ?, 0)",
                [(v, d) for v, d, _ in MIGRATIONS if v in done],
            )
        for v, desc, ddl in MIGRATIONS:
            if v in done:
                continue
            for stmt in ddl.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(
                "INSERT INTO llmtap_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (v, desc, to_micros(sql.now())),
            )
            done.add(v)
            version = max(version, v)
        conn.execute(f"PRAGMA user_version = {int(version)}")

    def _connect_reader(self) -> None:
        self._r()  # a file that cannot be read fails here, at start-up

    async def close(self) -> None:
        reader, self._reader = self._reader, None  # a read asked for from now on is told at once
        self._cells, self._cells_mark = {}, None  # another file may be opened next
        if self._hooks is not None:
            await self._hooks.close()
            self._hooks = None
        if self._checkpointer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.close)
            self._checkpointer = None
        if self._writer is not None:

            def _close() -> None:
                if self._wconn is not None:
                    self._wconn.close()
                    self._wconn = None

            await asyncio.get_running_loop().run_in_executor(self._writer, _close)
            self._writer.shutdown(wait=True)
        if reader is not None:
            # A read still running (stats over raw rows: seconds, a dashboard's call) is
            # interrupted, and so is any queued behind it, again and again until the pool has
            # stopped: a shutdown waits for no query (the callers get a 503).
            done = asyncio.get_running_loop().run_in_executor(None, reader.shutdown, True)
            while not done.done():
                with self._rlock:
                    for conn in self._rconns:
                        conn.interrupt()
                await asyncio.wait([done], timeout=0.05)
            with self._rlock:
                conns, self._rconns = self._rconns, []
            for conn in conns:
                conn.close()
        self._writer = None
        self._file.drop_stale_wal()

    # -- writes -----------------------------------------------------------------------------------
    async def write_batch(
        self, records: Sequence[LogRecord], texts: Sequence[str | None] | None = None
    ) -> int:
        if not records:
            return 0
        if self._lost is not None:
            await self._open_again()
        # Row building runs on the writer thread too: in `llmtap up` this event loop also
        # serves the gateway, which should not wait for a batch's JSON encoding.
        try:
            return await self._write(self._write_records, list(records), texts)
        except FileAway as e:  # committed into a file that may come back: written again then
            raise TransientError(f"SQLite store {self.path}: {e}") from None
        except FileGone as e:
            await self._file_gone(e)
            raise TransientError(f"SQLite store {self.path}: {e} (written again)") from None

    async def _file_gone(self, e: FileGone) -> None:
        if self._lost is None:
            self._lost = str(e)
            now = "a new, empty store" if "removed" in str(e) else "the file now there"
            log.error(
                "SQLite store %s: %s while open; opening %s and writing the batches since again",
                self.path, e, now,
            )  # fmt: skip
        await self._open_again()

    async def _open_again(self) -> None:
        async with self._reopening:
            if self._lost is None:
                return  # another batch did
            await self.close()
            try:
                await self.connect()
            except (BackendUnavailable, ConfigError) as e:
                raise TransientError(f"SQLite store {self.path} cannot be opened again: {e}") from None
            self._lost = None

    def _write_records(self, records: list[LogRecord], texts: Sequence[str | None] | None) -> int:
        if self._file.away_since is not None:
            self._file.check()  # nothing written into a file moved away, until it is back
        given = {id(r): t for r, t in zip(records, texts or (), strict=False)}
        kept = sql.dedupe(records)
        rows = [sql.record_values(r) for r in kept]
        found_text = {
            (row[0], row[1]): t
            for r, row in zip(kept, rows, strict=True)
            if (t := given.get(id(r)) or search.record_text(r))
        }
        conn = self._w()
        conn.execute("BEGIN IMMEDIATE")
        try:
            mark = (conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)
            cells = self._cells if mark == self._cells_mark else {}
            self._cells, self._cells_mark = {}, None  # until this transaction commits
            # Inside the write lock: the ids present now are exactly those this batch will not
            # insert, so only new rows count in the rollups (redelivery adds nothing).
            present: set[tuple[str, str]] = set()
            for i in range(0, len(rows), 500):
                chunk = rows[i : i + 500]
                for tenant in {r[0] for r in chunk}:
                    ids = [r[1] for r in chunk if r[0] == tenant]
                    found = conn.execute(
                        f"SELECT id FROM requests WHERE tenant = ? AND id IN ({', '.join('?' * len(ids))})",
                        (tenant, *ids),
                    ).fetchall()
                    present.update((tenant, f[0]) for f in found)
            fresh = [(r, row) for r, row in zip(kept, rows, strict=True) if (row[0], row[1]) not in present]
            rows = [row for _, row in fresh]
            before = conn.total_changes
            if self._project is not None:
                conn.executemany(self._insert, [_bindable([row[i] for i in self._project]) for row in rows])
            else:
                conn.executemany(_INSERT, [_bindable(row) for row in rows])
            inserted = conn.total_changes - before
            # Endpoints are read inside the transaction: the outbox rows commit with the records,
            # for the new ones only.
            eps = conn.execute(_ENDPOINTS).fetchall() if self._outbox else []
            endpoints = [endpoint_from_row(e) for e in eps]
            if endpoints:
                due = outbox.plan(endpoints, [r for r, _ in fresh], now_us())
                if due:
                    conn.executemany(_INSERT_DELIVERY, [delivery_params(d) for d in due])
            props = [p for row in rows for p in sql.property_rows(row)]
            if props:
                conn.executemany(_INSERT_PROP, props)
            if self._search:
                docs = [(r[0], r[1], t) for r in rows if (t := found_text.get((r[0], r[1])))]
                if docs:
                    # Docids numbered here, as SQLite would (max + 1; this transaction holds the
                    # write lock): two `executemany` instead of two statements per record.
                    top = conn.execute("SELECT coalesce(max(docid), 0) FROM request_search").fetchone()[0]
                    conn.executemany(
                        "INSERT INTO request_search (docid, tenant, id) VALUES (?, ?, ?)",
                        [(top + i, t, rid) for i, (t, rid, _) in enumerate(docs, 1)],
                    )
                    conn.executemany(
                        "INSERT INTO request_text (rowid, text) VALUES (?, ?)",
                        [(top + i, text) for i, (_, _, text) in enumerate(docs, 1)],
                    )
            if self._rollups:
                srcs = [rollup.source_values(row) for row in rows]
                sketched, totals = rollup.split_totals(rollup.contributions(srcs, self.rollup_properties))
                conn.executemany(_ROLLUP_ADD, totals)
                cells = self._apply_rollups(conn, sketched, cells)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if self._rollups:
            self._cells, self._cells_mark = cells, (mark[0], conn.total_changes)
        self._file.check()
        if self._checkpointer is not None:
            self._checkpointer.kick()
        return inserted

    def _apply_rollups(
        self,
        conn: sqlite3.Connection,
        deltas: dict[rollup.RollupKey, rollup.Cell],
        known: dict[rollup.RollupKey, rollup.Cell] | None = None,
    ) -> dict[rollup.RollupKey, rollup.Cell]:
        """Add `deltas` to the rollup rows in the caller's transaction; returns the cells as
        written. `known`: cells as the database holds them now, not read again (and changed)."""
        if not self._rollups:
            return {}
        existing = {}
        for key in deltas:
            cell = known.get(key) if known else None
            if cell is None:
                found = conn.execute(_ROLLUP_GET, key).fetchone()
                if found is None:
                    continue
                cell = rollup.Cell.from_row(found)
            existing[key] = cell
        upsert, delete = rollup.apply(existing, deltas)
        conn.executemany(_ROLLUP_PUT, upsert)
        conn.executemany(_ROLLUP_DEL, delete)
        return {k: c for k, c in existing.items() if c.count > 0}

    # -- reads ------------------------------------------------------------------------------------
    def _fetch(self, query: str, params: Sequence[Any]) -> list[Any]:
        return self._r().execute(query, params).fetchall()

    async def get_request(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        rows = await self._read(
            self._fetch,
            f"SELECT {sql.SELECT_COLUMNS} FROM requests r WHERE r.tenant = ?1 AND r.id = ?2",
            (tenant, request_id),
        )
        return sql.row_to_dict(DIALECT, rows[0]) if rows else None

    async def list_requests(self, tenant: str, query: ListQuery) -> Page:
        return await self._read(self._list_requests, tenant, query)

    def _list_requests(self, tenant: str, query: ListQuery) -> Page:
        # Sorted by cost or latency over a time range: walk the sort key's index unless the
        # range holds few rows (then sorting them is cheaper than walking the index past every
        # row outside the range; counting up to the bound costs at most that many index steps).
        sort_index = query.sort != "time"
        if sort_index and (query.since is not None or query.until is not None):
            q, params = sql.range_rows_sql(DIALECT, tenant, query, SORT_INDEX_MIN_ROWS)
            sort_index = self._fetch(q, params)[0][0] >= SORT_INDEX_MIN_ROWS
        if query.q:  # a common word: look for it row by row in the page's order (see search_scan_sql)
            q, params = sql.search_count_sql(DIALECT, query.q)
            if self._fetch(q, params)[0][0] >= sql.SEARCH_INDEX_MAX:
                q, params = sql.search_scan_sql(DIALECT, tenant, query, sort_index=sort_index)
                cur = self._r().execute(q, params)
                try:
                    rows = sql.first_hits(cur, query.limit + 1)
                finally:
                    cur.close()
                if len(rows) > query.limit:
                    items, cursor = sql.page_from_rows(DIALECT, rows, query.limit, query.sort)
                    return Page(items=items, next_cursor=cursor)
        through = sql.property_walk(DIALECT, tenant, query, self._fetch)
        q, params = sql.list_sql(DIALECT, tenant, query, sort_index=sort_index, through=through)
        items, cursor = sql.page_from_rows(DIALECT, self._fetch(q, params), query.limit, query.sort)
        return Page(items=items, next_cursor=cursor)

    async def stats(self, tenant: str, query: StatsQuery) -> dict[str, Any]:
        validate_stats(query)
        return await self._read(self._snapshot, self._stats, tenant, query)

    def _snapshot(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn`'s statements in one read transaction: an answer read in several statements
        (top groups then their rows, sums then latencies) sees the same rows in all of them, not
        a batch written between two."""
        conn = self._r()
        conn.execute("BEGIN")
        try:
            return fn(*args)
        finally:
            with contextlib.suppress(sqlite3.Error):  # refused: `_read` ends it before the next
                conn.execute("ROLLBACK")

    def _sums(
        self,
        tenant: str,
        query: StatsQuery,
        kind: sql.Kind,
        limit: int | None = None,
        through: str | None = None,
    ) -> list[tuple[Any, dict[str, Any]]]:
        q, params = sql.aggregate_sql(
            DIALECT, tenant, query, kind, limit=limit, percentiles=False, through=through
        )
        return [sql.aggregate_row(DIALECT, row, percentiles=False) for row in self._fetch(q, params)]

    def _stats(self, tenant: str, query: StatsQuery) -> dict[str, Any]:
        """From rollups when they answer the query exactly; else sums per kind in SQL and
        percentiles in Python over one scan of the same rows."""
        if self._rollups:  # another process may have ended a dimension's coverage since
            self._covered = dict(self._r().execute("SELECT dim, since FROM rollup_dims").fetchall())
        plan = rollup.plan(query, self.rollup_properties, self._covered)
        if plan is not None:
            users = None
            if plan.dim == rollup.USER_DIM:
                q, params = rollup.group_sql(DIALECT, tenant, plan)
                top = self._fetch(q, params)
                keys = [rollup.decode_key(plan.dim, row[0]) for row in top]
                q, params = sql.keyed_values_sql(DIALECT, tenant, query, plan.dim, keys)
                users = rollup.user_groups(top, self._fetch(q, params) if keys else [], int)
            edges = rollup.Edges()
            for kind, eq, eparams in rollup.edge_reads(DIALECT, tenant, query, plan):
                edges.add(DIALECT, query, kind, self._fetch(eq, eparams))
            listed = None
            if rollup.grouped(plan):
                top = self._fetch(*rollup.top_sql(DIALECT, tenant, plan))
                listed = rollup.listed(top)
            q, params = rollup.read_sql(DIALECT, tenant, plan, listed)
            return rollup.answer(query, plan, self._r().execute(q, params), users, edges, listed)
        return {**self._raw_stats(tenant, query), **rollup.RAW_SOURCE}

    def _raw_stats(self, tenant: str, query: StatsQuery) -> dict[str, Any]:
        through = sql.property_walk(DIALECT, tenant, query.filters, self._fetch, query.since, query.until)
        overall_rows = self._sums(tenant, query, "overall", through=through)
        if not overall_rows or not overall_rows[0][1]["count"]:
            return {"overall": sql.empty_totals(), "groups": [], "buckets": []}
        group_rows = self._sums(tenant, query, "group", MAX_GROUPS, through) if query.group_by else []
        bucket_rows = self._sums(tenant, query, "bucket", MAX_BUCKETS, through) if query.bucket else []
        # (latencies, TTFTs) per overall / group key / bucket key
        every: tuple[list[float], list[float]] = ([], [])
        per_g: dict[Any, tuple[list[float], list[float]]] = {key: ([], []) for key, _ in group_rows}
        per_b: dict[Any, tuple[list[float], list[float]]] = {key: ([], []) for key, _ in bucket_rows}
        q, params = sql.values_sql(DIALECT, tenant, query, through)
        cur = self._r().execute(q, params)
        while chunk := cur.fetchmany(10_000):
            for g, b, lat, first in chunk:
                for acc in (every, per_g.get(g), per_b.get(b)):
                    if acc is not None:
                        acc[0].append(lat)
                        if first is not None:
                            acc[1].append(first)

        def finish(totals: dict[str, Any], acc: tuple[list[float], list[float]]) -> dict[str, Any]:
            totals["latency_ms"] = sql.percentiles_of(acc[0])
            totals["time_to_first_token_ms"] = sql.percentiles_of(acc[1])
            return totals

        return {
            "overall": finish(overall_rows[0][1], every),
            "groups": [
                {"key": sql.group_value(DIALECT, query.group_by or "", key), **finish(totals, per_g[key])}
                for key, totals in group_rows
            ],
            "buckets": [
                {"start": iso(DIALECT.ts_value(key)), **finish(totals, per_b[key])}
                for key, totals in bucket_rows
            ],
        }

    async def sessions(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        return await self._read(self._session, tenant, session_id)

    def _session(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        totals = self._raw_stats(tenant, StatsQuery(filters=ListQuery(session_id=session_id)))["overall"]
        if not totals["count"]:
            return None
        lq = ListQuery(limit=MAX_SESSION_REQUESTS, session_id=session_id, order="asc")
        q, params = sql.list_sql(DIALECT, tenant, lq)
        return sql.session_result(DIALECT, session_id, totals, self._fetch(q, params))

    async def list_sessions(self, tenant: str, query: ListQuery) -> Page:
        return await self._read(self._list_sessions, tenant, query)

    def _list_sessions(self, tenant: str, query: ListQuery) -> Page:
        query, held = sql.sessions_walk(query)
        through = sql.property_walk(DIALECT, tenant, query, self._fetch)
        q, params = sql.sessions_sql(DIALECT, tenant, query, through)
        newest = self._fetch(q, params)
        ids = [row[0] for row in newest[: query.limit]]
        q, params = sql.session_totals_sql(DIALECT, tenant, query, ids)
        totals = self._fetch(q, params) if ids else []
        items, cursor = sql.sessions_page(DIALECT, newest, totals, query.limit, held)
        return Page(items=items, next_cursor=cursor)

    async def users(
        self,
        tenant: str,
        limit: int = 100,
        *,
        exact: bool = False,
        after: tuple[int, str] | None = None,
        sort: str = "time",
    ) -> list[UserTotals]:
        return await self._read(self._users, tenant, limit, exact, after, sort)

    def _users(
        self, tenant: str, limit: int, exact: bool, after: tuple[int, str] | None, sort: str
    ) -> list[UserTotals]:
        start = rollup.users_start(self._covered)
        if not exact and start is not None and (start == 0 or not self._older(tenant, start)):
            q, params = rollup.users_sql(DIALECT, tenant, limit, start, after, sort)
            return [rollup.user_result(row) for row in self._fetch(q, params)]
        q, params = sql.aggregate_sql(
            DIALECT, tenant, StatsQuery(), "users", limit=limit, percentiles=False, after=after, users_by=sort
        )
        return [sql.user_result(DIALECT, row) for row in self._fetch(q, params)]

    def _older(self, tenant: str, start: int) -> bool:
        return bool(self._fetch(*rollup.users_older_sql(DIALECT, tenant, start))[0][0])

    # -- retention --------------------------------------------------------------------------------
    async def delete_older_than(self, cutoff: datetime, limit: int = 10_000) -> list[str]:
        """Deletes in chunks of `limit` rows until some body refs are found or nothing is left.

        An empty list therefore means no row older than `cutoff` remains.
        """
        us = to_micros(cutoff)
        while True:
            refs, deleted = await self._write(self._delete_chunk, us, limit)
            if refs or deleted < limit:
                return refs

    async def erase(self, tenant: str, by: str, value: str, limit: int = 10_000) -> tuple[int, list[str]]:
        if by not in sql.ERASE_BY:
            raise ValueError(f"erase by {by!r}")
        refs, deleted = await self._write(
            self._delete_picked,
            f"SELECT rowid FROM requests WHERE tenant = ?1 AND {by} = ?2 LIMIT ?3",
            (tenant, value, limit),
            self._outbox,
        )
        return deleted, refs

    def _delete_chunk(self, cutoff_us: int, limit: int) -> tuple[list[str], int]:
        return self._delete_picked(
            "SELECT rowid FROM requests WHERE created_at < ?1 ORDER BY created_at LIMIT ?2",
            (cutoff_us, limit),
        )

    def _delete_picked(
        self, pick: str, params: Sequence[Any], deliveries: bool = False
    ) -> tuple[list[str], int]:
        """Delete the rows `pick` selects (rowids) with everything that names them: property
        rows, search text, their share of the rollups, and (`deliveries`: an erasure) their
        webhook deliveries, whose payloads carry the record. Returns their body refs and count."""
        conn = self._w()
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(
                f"DELETE FROM requests WHERE rowid IN ({pick})"
                " RETURNING request_body, response_body, response_events, tenant, id, created_at,"
                " properties, " + ", ".join(rollup.SOURCE_COLUMNS),
                params,
            ).fetchall()
            conn.executemany(
                "DELETE FROM request_properties"
                " WHERE tenant = ?1 AND name = ?4 AND value = ?5 AND created_at = ?3 AND request_id = ?2",
                [p for r in rows for p in sql.property_rows(r[3:7], positions=(0, 1, 2, 3))],
            )
            if deliveries and rows:  # one pass over the deliveries a chunk (no index by subject)
                conn.execute(
                    "DELETE FROM webhook_deliveries"
                    " WHERE tenant = ?1 AND subject IN (SELECT value FROM json_each(?2))",
                    (rows[0][3], orjson.dumps([r[4] for r in rows]).decode()),
                )
            # The same rows leave the rollups; first/last of what is left are read again.
            if self._search:
                for r in rows:
                    doc = conn.execute(
                        "DELETE FROM request_search WHERE tenant = ? AND id = ? RETURNING docid", (r[3], r[4])
                    ).fetchone()
                    if doc is not None:
                        conn.execute("DELETE FROM request_text WHERE rowid = ?", doc)
            deltas = rollup.retention_deltas((r[7:] for r in rows), self.rollup_properties, int)
            self._apply_rollups(conn, deltas)
            for key in deltas if self._rollups else ():
                cur = conn.execute(_ROLLUP_GET, key).fetchone()
                if cur is None:
                    continue
                q, params = rollup.recompute_sql(DIALECT, key)
                first, last = conn.execute(q, params).fetchone()
                conn.execute(
                    "UPDATE rollups SET first_at = ?6, last_at = ?7"
                    " WHERE tenant = ?1 AND grain = ?2 AND dim = ?4 AND bucket = ?3 AND key = ?5",
                    (*key, first, last),
                )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return [ref for r in rows for ref in sql.body_refs(r[:3])], len(rows)

    # -- API keys ---------------------------------------------------------------------------------
    async def create_key(self, tenant: str, name: str | None, key_hash: str, prefix: str) -> ApiKey:
        key = ApiKey(id=sql.new_key_id(), tenant=tenant, name=name, prefix=prefix,
                     created_at=from_micros(to_micros(sql.now())))  # fmt: skip

        def _insert() -> None:
            self._w().execute(
                "INSERT INTO api_keys (id, tenant, name, prefix, key_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key.id, tenant, name, prefix, key_hash, to_micros(key.created_at)),
            )

        await self._write(_insert)
        return key

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        rows = await self._read(
            self._fetch,
            "SELECT id, tenant, name, prefix, created_at, revoked_at, key_hash"
            " FROM api_keys WHERE key_hash = ?1",
            (key_hash,),
        )
        if not rows or not sql.keys_match(rows[0][6], key_hash):
            return None
        return _api_key(rows[0])

    async def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        q = "SELECT id, tenant, name, prefix, created_at, revoked_at FROM api_keys"
        params: tuple[Any, ...] = ()
        if tenant is not None:
            q += " WHERE tenant = ?1"
            params = (tenant,)
        rows = await self._read(self._fetch, q + " ORDER BY created_at, id", params)
        return [_api_key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        def _revoke() -> bool:
            cur = self._w().execute(
                "UPDATE api_keys SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
                (to_micros(sql.now()), key_id),
            )
            return cur.rowcount == 1

        return await self._write(_revoke)
