"""The scaled-out analytics store: PostgreSQL through an asyncpg pool.

Writes: a batch is COPYed (binary) into a per-connection temporary staging table and moved with
one `INSERT ... SELECT ... ON CONFLICT DO NOTHING` statement — COPY is PostgreSQL's fastest bulk
path, and the single statement keeps the batch atomic. Uniqueness of (tenant, id) is enforced by
`request_keys` (a partitioned table cannot have a unique index without its partition key); only
rows whose key was new are inserted into `requests` and `request_properties`.

Scale: `requests` and `request_properties` are range-partitioned by month on `created_at`.
Recent-data queries touch only recent partitions, indexes stay small, and retention drops whole
months (`DROP TABLE`) instead of deleting and vacuuming rows. Partitions are created on demand
by the writer (and the current and next month at connect), serialized across processes by an
advisory lock.

Migrations are versioned and forward-only (`llmtap.store.migrations.POSTGRES`) and applied at
connect under `pg_advisory_lock`, so two workers starting at once do not race.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import orjson

from llmtap.errors import BackendUnavailable, ConfigError, TransientError, unknown_host
from llmtap.redact import redact_dsn
from llmtap.store import rollup, search, sql
from llmtap.store.base import ApiKey, ListQuery, Page, StatsQuery, Store
from llmtap.store.migrations import POSTGRES as MIGRATIONS
from llmtap.store.migrations import refuse_newer
from llmtap.store.query import (
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


def _json(v: Any) -> Any:
    return None if v is None else orjson.loads(v)


DIALECT = sql.Dialect(
    name="postgresql",
    placeholder=lambda n: f"${n}",
    ts_param=from_micros,
    ts_value=to_micros,
    bucket=lambda b: f"date_trunc('{b}', r.created_at, 'UTC')",
    json_value=_json,
    prop_value=lambda ph: f'((r.properties ->> {ph}) COLLATE "C")',
    hashed=lambda expr: f"llmtap_hash({expr})",
    # pg_trgm answers LIKE through the GIN index for patterns of 3+ characters.
    search=lambda p, q: f"r.search_text LIKE {p(search.like_pattern(q))}",
    search_row=lambda p, q: f"r.search_text LIKE {p(search.like_pattern(q))}",  # as a column
    search_count=lambda p, q, cap: (
        f"SELECT {int(cap)}"  # no trigram: the index would read every text; walk the rows
        if len(search.fold(q)) < 3
        else "SELECT count(*) FROM (SELECT 1 FROM requests"
        f" WHERE search_text LIKE {p(search.like_pattern(q))} LIMIT {int(cap)}) AS c"
    ),
)

log = logging.getLogger(__name__)

#: Live stores, so a log record of asyncpg's pool finds the store it concerns.
_STORES: weakref.WeakSet[PostgresStore] = weakref.WeakSet()
_FLOOR = "Failed to restore the pool connection floor"


class _PoolFloorLog(logging.Filter):
    """Turns asyncpg's pool-floor warnings into the store's outage state.

    While PostgreSQL is down, asyncpg's pool retries its minimum size 1 s, 2 s, ... 60 s apart
    and logs each failure as a warning with a full traceback, in every worker and server. The
    record is dropped here and the store logs one line when the outage starts and one when it
    ends (`PostgresStore._down` / `_up`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(_FLOOR)):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        store = _store_of_current_task()
        if store is not None:
            store._down(exc or record.getMessage())
            return False
        # A pool we do not know (not a PostgresStore's): still no traceback.
        record.msg = f"{_FLOOR}: {_reason(exc) if exc else '?'}; retrying"
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _store_of_current_task() -> PostgresStore | None:
    """The store whose pool runs the current task (asyncpg's `_maintain_min_size(self)`)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    pool = frame.f_locals.get("self") if frame is not None else None
    if not isinstance(pool, asyncpg.Pool):
        return None
    return next((s for s in list(_STORES) if s._pool is pool), None)


logging.getLogger("asyncpg.pool").addFilter(_PoolFloorLog())

# Advisory-lock keys (arbitrary constants, namespaced by their value).
_MIGRATION_LOCK = 0x6C6C6D74_0001
_PARTITION_LOCK = 0x6C6C6D74_0002
#: Held shared (by its session) through each call of a purge: a server that
#: finds the retention floor above its own purge's can tell a purge under way (the floor
#: stands) from one that stopped (its released rows are finished, the floor lowered).
_PURGE_LOCK = 0x6C6C6D74_0003

_STAGING = "llmtap_staging"


def _move_sql(columns: Sequence[str], floor: bool = True) -> str:
    """One statement: claim keys, insert the rows whose key was new, and their properties.
    `columns`: what the staging table is given (`sql.COLUMNS`, and `search_text` once migration
    5 made it); `floor`: migration 14's `retention_floor` is there."""
    cols = ", ".join(columns)
    s_cols = ", ".join(f"s.{c}" for c in columns)
    above = "WHERE created_at >= coalesce((SELECT before FROM retention_floor), '-infinity')" if floor else ""
    return f"""
WITH k AS (
    INSERT INTO request_keys (tenant, id, created_at)
    SELECT tenant, id, created_at FROM {_STAGING}
    {above}
    ON CONFLICT DO NOTHING
    RETURNING tenant, id
), ins AS (
    INSERT INTO requests ({cols})
    SELECT {s_cols} FROM {_STAGING} s JOIN k ON k.tenant = s.tenant AND k.id = s.id
    RETURNING id, {", ".join(rollup.SOURCE_COLUMNS)}
), props AS (
    INSERT INTO request_properties (tenant, request_id, created_at, name, value)
    SELECT s.tenant, s.id, s.created_at, p.key, p.value
    FROM {_STAGING} s JOIN k ON k.tenant = s.tenant AND k.id = s.id
    CROSS JOIN LATERAL jsonb_each_text(s.properties) AS p
    RETURNING 1
)
SELECT id, {", ".join(rollup.SOURCE_COLUMNS)} FROM ins
"""


# Per partition (migration 11 says why): a property's value decides its hash, so the planner
# must not multiply their selectivities.
_PROPERTY_STATS = (
    "CREATE STATISTICS IF NOT EXISTS {t}_deps (dependencies)"
    " ON name, value, llmtap_hash(name), llmtap_hash(value) FROM {t}"
)
_PROPERTY_STATS_SINCE = 11
_WRITTEN = (*sql.COLUMNS, "search_text")
_MOVE = _move_sql(_WRITTEN)
_R_KEY_ARRAYS = "$1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[]"
# Claim every rollup row the batch touches (zeros where new), then lock them in key order: two
# workers adding to the same row serialize here, and neither loses the other's addition.
_ROLLUP_CLAIM = f"""
INSERT INTO rollups ({", ".join(rollup.COLUMNS)})
SELECT u.t, u.g, u.b, u.d, u.k, {", ".join(["0"] * 10)}, NULL, NULL, NULL, NULL
FROM unnest({_R_KEY_ARRAYS}) AS u(t, g, b, d, k)
ON CONFLICT DO NOTHING
"""
_ROLLUP_LOCK = f"""
SELECT {", ".join("r." + c for c in rollup.COLUMNS)}
FROM rollups r JOIN unnest({_R_KEY_ARRAYS}) AS u(t, g, b, d, k)
  ON r.tenant = u.t AND r.grain = u.g AND r.dim = u.d AND r.bucket = u.b
  AND llmtap_hash(r.key) = llmtap_hash(u.k) AND r.key = u.k
ORDER BY r.tenant, r.grain, r.dim, r.bucket, r.key
FOR UPDATE OF r
"""
_R_WHERE = (
    "tenant = $1 AND grain = $2 AND bucket = $3 AND dim = $4"
    " AND llmtap_hash(key) = llmtap_hash($5) AND key = $5"
)
_R_TYPES = ("text", "text", "bigint", "text", "text", *(["bigint"] * 12), "bytea", "bytea")
# One statement for every row of a batch (arrays, one per column): far fewer round trips and
# executor starts than a statement per row.
_ROLLUP_PUT = (
    "UPDATE rollups r SET "
    + ", ".join(f"{c} = u.{c}" for c in rollup.COLUMNS[5:])
    + " FROM unnest("
    + ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_R_TYPES))
    + f") AS u({', '.join(rollup.COLUMNS)})"
    " WHERE r.tenant = u.tenant AND r.grain = u.grain AND r.bucket = u.bucket AND r.dim = u.dim"
    " AND llmtap_hash(r.key) = llmtap_hash(u.key) AND r.key = u.key"
)
_ROLLUP_DEL = f"DELETE FROM rollups WHERE {_R_WHERE}"
_SRC_R = ", ".join("r." + c for c in rollup.SOURCE_COLUMNS)
_SRC_NULL = ", ".join("NULL" for _ in rollup.SOURCE_COLUMNS)
# Retention: release up to $2 keys older than $1; delete their rows in the month straddling the
# cutoff ($3 is that month's start; older months are dropped whole afterwards). Returns the count
# of released keys, then per row its body columns and its rollup source columns.
_RETENTION = f"""
WITH gone AS (
    DELETE FROM request_keys k USING (
        SELECT tenant, id FROM request_keys WHERE created_at < $1 ORDER BY created_at LIMIT $2
    ) AS pick
    WHERE k.tenant = pick.tenant AND llmtap_hash(k.id) = llmtap_hash(pick.id) AND k.id = pick.id
    RETURNING k.tenant, k.id, k.created_at
), dr AS (
    DELETE FROM requests r USING gone g
    WHERE r.tenant = g.tenant AND r.id = g.id AND r.created_at = g.created_at AND r.created_at >= $3
    RETURNING r.request_body, r.response_body, r.response_events, {_SRC_R}
), dp AS (
    DELETE FROM request_properties p USING gone g
    WHERE p.tenant = g.tenant AND p.request_id = g.id AND p.created_at = g.created_at
      AND p.created_at >= $3
)
SELECT (SELECT count(*) FROM gone), r.* FROM dr r
UNION ALL
SELECT (SELECT count(*) FROM gone), r.request_body, r.response_body, r.response_events, {_SRC_R}
FROM requests r JOIN gone g ON r.tenant = g.tenant AND r.id = g.id AND r.created_at = g.created_at
WHERE r.created_at < $3
UNION ALL
SELECT (SELECT count(*) FROM gone), NULL, NULL, NULL, {_SRC_NULL}
"""

#: Rows of [$1, $2) whose keys a purge released (every stored row has its key until then),
#: with their property rows: their rollup share and bodies went when they were released.
#: Returns their rollup sources: the first/last times of what they shared are read again.
_RELEASED = f"""
WITH gone AS (
    DELETE FROM requests r WHERE r.created_at >= $1 AND r.created_at < $2 AND NOT EXISTS (
        SELECT 1 FROM request_keys k
        WHERE k.tenant = r.tenant AND llmtap_hash(k.id) = llmtap_hash(r.id) AND k.id = r.id
    )
    RETURNING r.id, {_SRC_R}
), dp AS (
    DELETE FROM request_properties p USING gone g
    WHERE p.tenant = g.tenant AND p.request_id = g.id AND p.created_at = g.created_at
)
SELECT {", ".join("g." + c for c in rollup.SOURCE_COLUMNS)} FROM gone g
"""

#: `Store.erase`: one tenant's rows by a column of `sql.ERASE_BY` (formatted in, never input),
#: their keys and property rows, in one statement; returns the rows' body columns, rollup
#: sources and whether the row still had its key (a row a stopped purge released has left the
#: rollups already).
_ERASE = """
WITH pick AS (
    SELECT tenant, id, created_at FROM requests WHERE tenant = $1 AND {match} LIMIT $3
), gone AS (
    DELETE FROM request_keys k USING pick g
    WHERE k.tenant = g.tenant AND llmtap_hash(k.id) = llmtap_hash(g.id) AND k.id = g.id
    RETURNING k.tenant, k.id, k.created_at
), dp AS (
    DELETE FROM request_properties p USING pick g
    WHERE p.tenant = g.tenant AND p.request_id = g.id AND p.created_at = g.created_at
){deliveries}
DELETE FROM requests r USING pick g
WHERE r.tenant = g.tenant AND r.id = g.id AND r.created_at = g.created_at
RETURNING r.request_body, r.response_body, r.response_events, {src}, EXISTS (
    SELECT 1 FROM gone k WHERE k.tenant = r.tenant AND k.id = r.id AND k.created_at = r.created_at
)
"""

_ENDPOINTS = f"{SELECT_ENDPOINTS} WHERE disabled_at IS NULL"


class _PGConn:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, query: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._conn.fetch(query, *args))

    async def execute(self, query: str, *args: Any) -> int:
        status: str = await self._conn.execute(query, *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0


class PostgresWebhooks(WebhookDB):
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[Conn]:
        with self._store._errors():
            async with self._store._p().acquire() as conn, conn.transaction():
                yield _PGConn(conn)


# Errors that mean "the database is not reachable or not accepting work right now".
#: `synchronous_commit` on whatever the server's default: a worker acknowledges records once
#: their transaction commits, and with it off a crash loses the last commits (~200 ms) already
#: acknowledged (an outside chaos check lost 7 records to `pg_ctl stop -m immediate` that way).
_SESSION = {"timezone": "UTC", "application_name": "llmtap", "synchronous_commit": "on"}
#: What a server answers to a URL naming a database or role it does not have, or a wrong
#: password: a setting to fix, not an outage to wait out.
_WRONG_URL: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
)
_TRANSIENT: tuple[type[BaseException], ...] = (
    # Once connected, a database that is gone (dropped, about to be made again) or a login
    # refused (a password rotated under a running worker) is an outage, not the record's
    # fault: at start-up `_WRONG_URL` reads them as a wrong setting first.
    *_WRONG_URL,
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a connection left in a broken state by a loss
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, query cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # disk full, out of memory, too many clients
    asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a failover in progress
    # A database closed to new connections (`ALLOW_CONNECTIONS false`: maintenance), and the
    # rest of SQLSTATE class 55 (a lock not available, an object in use): states that pass,
    # not a record's fault (it was dead-lettered).
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
    # The database's own failures: a corrupted table or index, an I/O error (XX001, XX002,
    # class 58). No record causes them; an operator repairs them (every record was dead-lettered).
    asyncpg.exceptions.DataCorruptedError,
    asyncpg.exceptions.IndexCorruptedError,
    asyncpg.exceptions.PostgresSystemError,
    # A statement prepared before a schema change (a rolling upgrade): prepared again next try.
    asyncpg.exceptions.InvalidCachedStatementError,
)
#: A role that may not make llmtap's tables: no privilege (42501), or no schema it may create in
#: (3F000: USAGE on public revoked, an empty search_path).
_NO_RIGHTS = (asyncpg.exceptions.InsufficientPrivilegeError, asyncpg.exceptions.InvalidSchemaNameError)
#: Connection losses: any statement that works again ends such an outage. Others (a full disk,
#: a read-only database, privileges revoked) end when a write works: reads may work throughout.
_LOST: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
)


def _wrong_setting(e: Exception) -> str | None:
    """What is wrong with the URL when connecting failed for a reason no waiting cures: a
    parameter asyncpg refuses (`sslmode=bogus`, `verify-full` without a CA file), a file it
    names that cannot be read (`sslrootcert`, `sslcert`, `sslkey`), or an error the server
    answered (an unknown parameter) that is no outage. None: an outage, waited out."""
    if isinstance(e, asyncpg.exceptions.ClientConfigurationError):
        return _reason(e)
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"a file it names (sslrootcert, sslcert, sslkey) cannot be read: {e.strerror or e}"
    # A server parameter in the URL that only a restart sets (55P02) is in class 55, which is
    # otherwise a passing state: it never passes.
    if isinstance(e, asyncpg.exceptions.CantChangeRuntimeParamError) or (
        isinstance(e, asyncpg.PostgresError) and not isinstance(e, _TRANSIENT)
    ):
        return f"PostgreSQL says: {_reason(e)}"
    return None


def _servers(url: str) -> str:
    """The server(s) a URL names, for messages: `host:port`, or the hosts as written when it names
    several (`h1:5432,h2:5433`, which asyncpg tries in turn; urllib reads no port there)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    if "," in hosts:
        return hosts
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


_PART_RE = re.compile(r"^requests_p(\d{4})(\d{2})$")


def _month_start(year: int, month: int) -> datetime:
    while month > 12:
        year, month = year + 1, month - 12
    return datetime(year, month, 1, tzinfo=UTC)


def _month_of(us: int) -> tuple[int, int]:
    dt = from_micros(us)
    return dt.year, dt.month


T = TypeVar("T")


async def _all_or_none(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Every result, or the first error with the others cancelled and ended: `asyncio.gather`
    left them running (their queries held connections a stop then waited on)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _api_key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(id=row[0], tenant=row[1], name=row[2], prefix=row[3], created_at=row[4], revoked_at=row[5])


class PostgresStore(Store):
    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        rollup_properties: Sequence[str] | None = (),
    ) -> None:
        """`rollup_properties` None: an admin command's connection (see `SQLiteStore`)."""
        self.url = url
        self._admin = rollup_properties is None
        self.rollup_properties = tuple(sql.property_name(p) for p in rollup_properties or ())
        self._covered: dict[str, int] = {}
        self._rollups = False  # the schema has them (always, unless a test stops migrations early)
        self._search = False  # likewise, requests.search_text
        self._project: tuple[int, ...] | None = None  # likewise, every column of `sql.COLUMNS`
        self._written: tuple[str, ...] = _WRITTEN
        self._move = _MOVE
        self._floor = True  # migration 14's `retention_floor` (an older schema has none)
        self.description = f"postgresql {redact_dsn(url)}"
        self._where = _servers(url)
        self._min, self._max = min_size, max_size
        self._pool: asyncpg.Pool | None = None
        self._months: set[tuple[int, int]] = set()
        self._schema_lost = False  # an UndefinedTableError was seen: `_restore` before writing
        self._outbox = False  # the webhook tables exist (not in a database migrated part-way)
        self._partition_mutex = asyncio.Lock()
        self._claim = asyncio.Lock()  # taking a set of connections (`_at_once`)
        self._outage: str | None = None  # the reason, while PostgreSQL is unavailable
        self._outage_lost = True  # that outage is a lost connection (`_LOST`)
        self._outage_at = 0.0  # when it began (monotonic)
        self._outage_said = False  # logged: a lost connection is an outage at its second failure
        self._reads: set[asyncio.Timeout] = set()  # reads running: `cut_reads` ends them

    # -- outage state: one log line when it starts, one when it ends ------------------------------
    def _down(self, cause: BaseException | str, lost: bool | None = None) -> None:
        if self._outage is None:
            self._outage = _reason(cause) if isinstance(cause, BaseException) else cause
            self._outage_lost = isinstance(cause, _LOST) if lost is None else lost
            self._outage_at = time.monotonic()
            self._outage_said = False
            if not self._outage_lost:  # a refusal (a full disk, privileges): an outage at once
                self._say_down()
        elif not self._outage_said:
            # A second failure: an outage. One connection lost alone (killed by an operator or
            # an idle timeout) is not one: each made a pair of lines (46 pairs in 40 s, review).
            self._say_down()

    def _say_down(self) -> None:
        self._outage_said = True
        log.warning("PostgreSQL at %s is unavailable (%s); retrying", self._where, self._outage)

    def _up(self, wrote: bool = False) -> None:
        # A full disk still answers reads: each one ended the outage it had just begun (a pair
        # of lines a second). An outage that was not a lost connection ends with a write, or
        # with any statement a minute on (a process that only reads).
        if self._outage is not None and (
            wrote or self._outage_lost or time.monotonic() - self._outage_at > 60
        ):
            reason, self._outage = self._outage, None
            if self._outage_said:
                log.warning("PostgreSQL at %s is available again", self._where)
            else:
                log.debug(
                    "PostgreSQL at %s: a connection was lost (%s); the next call worked", self._where, reason
                )

    def webhooks(self) -> PostgresWebhooks:
        return PostgresWebhooks(self)

    # -- plumbing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except _TRANSIENT as e:
            self._down(e)
            raise TransientError(f"PostgreSQL at {self._where} unavailable: {_reason(e)}") from e
        except asyncpg.exceptions.UndefinedTableError as e:
            # Not the record's fault: the schema is gone. An outage until `_restore` ran.
            if not self._schema_lost:
                self._schema_lost = True
                log.warning("PostgreSQL at %s lost llmtap's tables (%s); making them again", self._where, e)
            raise TransientError(f"PostgreSQL at {self._where} has no llmtap tables: {_reason(e)}") from e
        except asyncpg.exceptions.PostgresSyntaxError:
            raise  # a statement llmtap built wrong: a bug, not a database to wait for
        except (asyncpg.exceptions.SyntaxOrAccessError, asyncpg.exceptions.InvalidSchemaNameError) as e:
            # Privileges revoked, a column renamed by hand (class 42): the statements are
            # llmtap's and records travel as COPY data, so no record causes these (every
            # record was dead-lettered). An outage until an operator puts it right.
            self._down(e)
            raise TransientError(f"PostgreSQL at {self._where} refuses llmtap: {_reason(e)}") from e
        self._up()

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise TransientError(f"PostgreSQL store at {self._where} is not connected")
        return self._pool

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[None]:
        """A read `cut_reads` can end: its deadline, none until then, is moved to now (asyncpg
        cancels the query on the server), and its caller is told the store is unavailable."""
        deadline = asyncio.timeout(None)
        try:
            async with deadline:
                self._reads.add(deadline)
                try:
                    yield
                finally:
                    self._reads.discard(deadline)
        except TimeoutError:
            if not deadline.expired():
                raise  # not the cut's (outside `_errors`, which reads a timeout as an outage)
            raise TransientError(f"PostgreSQL store at {self._where}: the server is stopping") from None

    async def cut_reads(self) -> None:
        for deadline in list(self._reads):
            if not deadline.expired():
                deadline.reschedule(asyncio.get_running_loop().time())

    async def _first_hits(self, query: str, params: Sequence[Any], n: int) -> list[Sequence[Any]]:
        """`sql.first_hits` through a cursor: the server stops where the page is full (or the
        walk gives up)."""
        out: list[Sequence[Any]] = []
        async with self._read():
            with self._errors():
                async with self._p().acquire() as conn, conn.transaction(readonly=True):
                    walked = 0
                    async for row in conn.cursor(query, *params, prefetch=200):
                        walked += 1
                        if row[-1]:  # the hit mark of `sql.search_scan_sql`
                            out.append(tuple(row)[:-1])
                            if len(out) >= n:
                                break
                        if walked in sql.SEARCH_PACE_AT and sql.walk_is_hopeless(len(out), walked, n):
                            break
        return out

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """A read (`cut_reads` ends it)."""
        async with self._read():
            return await self._change(query, *args)

    async def _change(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """A statement that writes: once sent, it is let finish."""
        with self._errors():
            rows: list[asyncpg.Record] = await self._p().fetch(query, *args)
            return rows

    # -- lifecycle --------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._pool is not None:
            return
        settings = _SESSION
        try:
            conn = await asyncpg.connect(self.url, timeout=10, server_settings=settings)
        except _WRONG_URL as e:  # the server answered: this database or role is not there
            raise ConfigError(
                f"invalid setting LLMTAP_STORE: PostgreSQL at {self._where} says: {_reason(e)}"
            ) from None
        except Exception as e:  # asyncpg raises many kinds; all mean the same to the user
            if unknown_host(e):
                raise ConfigError(f"invalid setting LLMTAP_STORE: unknown host in {self._where}") from None
            wrong = _wrong_setting(e)
            if wrong is not None:  # waited out as an outage, it would have been waited for ever
                raise ConfigError(f"invalid setting LLMTAP_STORE: {wrong}") from None
            raise BackendUnavailable(f"cannot connect to PostgreSQL at {self._where}: {_reason(e)}") from None
        try:
            await self._migrate(conn)
        except _TRANSIENT as e:
            raise BackendUnavailable(f"cannot connect to PostgreSQL at {self._where}: {_reason(e)}") from None
        except _NO_RIGHTS as e:
            raise ConfigError(
                f"invalid setting LLMTAP_STORE: its role cannot make llmtap's tables ({_reason(e)}); "
                "connect as the database's owner (llmtap makes its tables and the pg_trgm extension "
                "at start)"
            ) from None
        finally:
            await conn.close()
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min,
                max_size=self._max,
                timeout=10,
                command_timeout=120,
                server_settings=settings,
                init=self._init_connection,
            )
            _STORES.add(self)
        except Exception as e:
            raise BackendUnavailable(f"cannot connect to PostgreSQL at {self._where}: {_reason(e)}") from None
        with self._errors():
            await self._load_schema()

    async def _load_schema(self) -> None:
        """What this store reads from the schema once connected (and again after `_restore`)."""
        now = sql.now()
        # A database migrated only part-way (tests of old versions) has no outbox yet, or not
        # as this code reads it (endpoints with a payload format, version 9).
        self._outbox = bool(
            await self._p().fetchval(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema ="
                " current_schema() AND table_name = 'webhook_endpoints' AND column_name = 'format')"
            )
        )
        await self._load_partitions()
        await self._ensure_partitions(
            {(now.year, now.month), _month_of(to_micros(_month_start(now.year, now.month + 1)))}
        )

    async def _restore(self) -> None:
        """The tables went away under a running store (the database dropped and made again, a
        restore from an empty dump): migrate again, so work resumes without a restart and
        without dead-lettering every record as if it were at fault."""
        with self._errors():
            # Not through the pool: its connections make their staging table from `requests`.
            conn = await asyncpg.connect(self.url, timeout=10, server_settings=_SESSION)
            try:
                await self._migrate(conn)
            finally:
                await conn.close()
            await self._load_schema()
        self._schema_lost = False
        log.warning("PostgreSQL at %s: llmtap's tables made again; storing resumes", self._where)

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS llmtap_migrations"
                " (version integer PRIMARY KEY, description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM llmtap_migrations")}
            refuse_newer(MIGRATIONS, done, self._where)
            for version, description, ddl in MIGRATIONS:
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(ddl)
                    await conn.execute(
                        "INSERT INTO llmtap_migrations (version, description) VALUES ($1, $2)",
                        version,
                        description,
                    )
            self._rollups = await conn.fetchval("SELECT to_regclass('rollup_dims') IS NOT NULL")
            present = {
                str(r[0])
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = 'requests'"
                )
            }
            self._search = "search_text" in present
            cols = sql.written_columns(present)
            self._project = None if cols is None else tuple(sql.COLUMNS.index(c) for c in cols)
            self._written = (*(cols or sql.COLUMNS), *(("search_text",) if self._search else ()))
            self._floor = await conn.fetchval("SELECT to_regclass('retention_floor') IS NOT NULL")
            fresh = self._written == _WRITTEN and self._floor
            self._move = _MOVE if fresh else _move_sql(self._written, self._floor)
            if self._rollups:
                await self._cover_dims(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def _cover_dims(self, conn: asyncpg.Connection) -> None:
        """Register the rolled-up dimensions (see `llmtap.store.rollup`: coverage)."""
        empty = not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM request_keys)")
        now = to_micros(sql.now())
        registered = [r[0] for r in await conn.fetch("SELECT dim FROM rollup_dims")]
        if self._admin:  # the services' dimensions, as they registered them
            self.rollup_properties = rollup.registered_properties(registered)
            registered = list(rollup.dims_for(self.rollup_properties))
        if empty:
            since = 0
        elif set(rollup.dims_for(self.rollup_properties)) - set(registered):
            # Rows stamped after now (a gateway clock ahead): this month's and later partitions,
            # read through the BRIN index.
            newest = await conn.fetchval(
                "SELECT max(created_at) FROM requests WHERE created_at >= $1", from_micros(now)
            )
            since = rollup.coverage_start(now, None if newest is None else to_micros(newest))
        else:
            since = rollup.coverage_start(now, None)  # nothing new: unused
        await conn.executemany(
            "DELETE FROM rollup_dims WHERE dim = $1",
            [(d,) for d in rollup.uncovered(registered, self.rollup_properties)],
        )
        await conn.executemany(
            "INSERT INTO rollup_dims (dim, since) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(d, since) for d in rollup.dims_for(self.rollup_properties)],
        )
        self._covered = {r[0]: int(r[1]) for r in await conn.fetch("SELECT dim, since FROM rollup_dims")}

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        # Per-connection staging table for COPY; emptied at every commit. `LIKE requests` waits
        # for a lock on it: behind a long ALTER or VACUUM FULL a start hung silently for the
        # command timeout (120 s). Past 10 s the connection fails, and start-up says it waits.
        await conn.execute(
            "SET lock_timeout = '10s';"
            f" CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE requests) ON COMMIT DELETE ROWS;"
            " RESET lock_timeout"
        )
        self._up()  # a new connection (the pool restoring its floor, too) means it is back

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except _TRANSIENT:
                pool.terminate()

    # -- partitions -------------------------------------------------------------------------------
    async def _load_partitions(self) -> None:
        rows = await self._p().fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'requests'::regclass"
        )
        months = set()
        for (name,) in rows:
            m = _PART_RE.match(name)
            if m:
                months.add((int(m.group(1)), int(m.group(2))))
        self._months = months

    async def _ensure_partitions(self, months: set[tuple[int, int]]) -> None:
        missing = months - self._months
        if not missing:
            return
        async with self._partition_mutex, self._p().acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
            for year, month in sorted(missing):
                lo, hi = _month_start(year, month), _month_start(year, month + 1)
                bounds = f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
                for table in ("requests", "request_properties"):
                    await conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {table}_p{year:04d}{month:02d}"
                        f" PARTITION OF {table} {bounds}"
                    )
                if MIGRATIONS[-1][0] >= _PROPERTY_STATS_SINCE:  # a schema without llmtap_hash: none
                    await conn.execute(_PROPERTY_STATS.format(t=f"request_properties_p{year:04d}{month:02d}"))
        self._months |= missing

    # -- writes -----------------------------------------------------------------------------------
    async def write_batch(
        self, records: Sequence[LogRecord], texts: Sequence[str | None] | None = None
    ) -> int:
        rows = []
        months = set()
        by_key: dict[tuple[str, str], LogRecord] = {}
        given = {id(r): t for r, t in zip(records, texts or (), strict=False)}
        for r in sql.dedupe(records):
            v = list(sql.record_values(r))
            by_key[(v[0], v[1])] = r
            if self._search:
                v.append(given.get(id(r)) or search.record_text(r))
            months.add(_month_of(v[2]))
            for i in sql.TS_POSITIONS:
                if v[i] is not None:
                    v[i] = from_micros(v[i])
            if self._project is not None:  # a schema stopped early (tests): its columns only
                v = [v[i] for i in self._project] + v[len(sql.COLUMNS) :]
            rows.append(tuple(v))
        if not rows:
            return 0
        if self._schema_lost:
            await self._restore()
        with self._errors():
            for attempt in range(2):
                await self._ensure_partitions(months)
                try:
                    async with self._p().acquire() as conn, conn.transaction():
                        await conn.copy_records_to_table(_STAGING, records=rows, columns=self._written)
                        new = await conn.fetch(self._move)
                        srcs = []
                        for row in new:  # only rows whose key was new: redelivery adds nothing
                            src = list(row[1:])
                            src[1] = to_micros(src[1])
                            srcs.append(src)
                        await self._apply_rollups(conn, rollup.contributions(srcs, self.rollup_properties))
                        # The outbox rows commit with the records, for the new ones only.
                        eps = await conn.fetch(_ENDPOINTS) if self._outbox else []
                        endpoints = [endpoint_from_row(e) for e in eps]
                        if endpoints:
                            fresh = [by_key[(k[1], k[0])] for k in new]
                            due = outbox.plan(endpoints, fresh, now_us())
                            if due:
                                await conn.executemany(INSERT_DELIVERY, [delivery_params(d) for d in due])
                    self._up(wrote=True)
                    return len(new)
                except asyncpg.exceptions.CheckViolationError as e:
                    # "no partition found for row": another process dropped a month we had
                    # cached (retention, then a late record). Re-read and create it again.
                    if attempt and "no partition" in str(e):
                        # Making it did nothing: a table of that name is there, not attached
                        # (detached by hand). Not the record's fault: wait for an operator.
                        msg = f"no partition of requests for a month of this batch ({_reason(e)}); "
                        msg += "is a requests_pYYYYMM table detached? attach it again"
                        self._down(msg, lost=False)
                        raise TransientError(f"PostgreSQL at {self._where}: {msg}") from e
                    if attempt:
                        raise
                    await self._load_partitions()
        raise AssertionError("unreachable")

    async def _apply_rollups(
        self, conn: asyncpg.Connection, deltas: dict[rollup.RollupKey, rollup.Cell]
    ) -> list[rollup.RollupKey]:
        """Add `deltas` to the rollups (in the caller's transaction); returns the keys still alive."""
        if not deltas or not self._rollups:
            return []
        keys = sorted(deltas)
        arrays = [list(col) for col in zip(*keys, strict=True)]
        await conn.execute(_ROLLUP_CLAIM, *arrays)
        existing = {}
        for row in await conn.fetch(_ROLLUP_LOCK, *arrays):
            existing[tuple(row[:5])] = rollup.Cell.from_row(row[5:])
        upsert, delete = rollup.apply(existing, deltas)
        if upsert:
            await conn.execute(_ROLLUP_PUT, *(list(col) for col in zip(*upsert, strict=True)))
        if delete:
            await conn.executemany(_ROLLUP_DEL, delete)
        return [tuple(r[:5]) for r in upsert]

    # -- reads ------------------------------------------------------------------------------------
    async def get_request(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(
            f"SELECT {sql.SELECT_COLUMNS} FROM requests r WHERE r.tenant = $1 AND r.id = $2"
            " AND r.created_at = (SELECT k.created_at FROM request_keys k WHERE k.tenant = $1"
            " AND llmtap_hash(k.id) = llmtap_hash($2) AND k.id = $2)",
            tenant,
            request_id,
        )
        return sql.row_to_dict(DIALECT, rows[0]) if rows else None

    async def list_requests(self, tenant: str, query: ListQuery) -> Page:
        if query.q:  # a common word: look for it row by row in the page's order (see search_scan_sql)
            q, params = sql.search_count_sql(DIALECT, query.q)
            if (await self._fetch(q, *params))[0][0] >= sql.SEARCH_INDEX_MAX:
                q, params = sql.search_scan_sql(DIALECT, tenant, query)
                rows = await self._first_hits(q, params, query.limit + 1)
                if len(rows) > query.limit:
                    items, cursor = sql.page_from_rows(DIALECT, rows, query.limit, query.sort)
                    return Page(items=items, next_cursor=cursor)
        q, params = sql.list_sql(DIALECT, tenant, query)
        rows = await self._fetch(q, *params)
        items, cursor = sql.page_from_rows(DIALECT, rows, query.limit, query.sort)
        return Page(items=items, next_cursor=cursor)

    async def _aggregate(
        self, tenant: str, query: StatsQuery, kind: sql.Kind, limit: int | None = None
    ) -> list[Any]:
        q, params = sql.aggregate_sql(DIALECT, tenant, query, kind, limit=limit)
        return await self._analytic(q, params)

    async def _analytic(self, q: str, params: Sequence[Any]) -> list[Any]:
        async with self._read():
            with self._errors():
                async with self._p().acquire() as conn, conn.transaction(readonly=True):
                    # Percentiles and grouping sort or hash in memory: give them room rather
                    # than spill to disk (the per-user sums of 30 days of thousands of users
                    # need ~20 MB). JIT compilation costs more than it saves on these one-pass
                    # queries.
                    await conn.execute("SET LOCAL work_mem = '128MB'; SET LOCAL jit = off")
                    rows: list[Any] = await conn.fetch(q, *params)
                    return rows

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Callable[[str, Sequence[Any]], Awaitable[list[Any]]]]:
        """Reads that make one answer, on one connection in one REPEATABLE READ transaction:
        they see the same rows (top groups then their rows; a batch written between two would
        count in one and not the other)."""
        async with self._read():
            with self._errors():
                async with (
                    self._p().acquire() as conn,
                    conn.transaction(isolation="repeatable_read", readonly=True),
                ):
                    await conn.execute("SET LOCAL work_mem = '128MB'; SET LOCAL jit = off")

                    async def read(q: str, params: Sequence[Any]) -> list[Any]:
                        return list(await conn.fetch(q, *params))

                    yield read

    async def _at_once(self, reads: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """`reads` at once, each on its own connection, all in the snapshot the first exports.

        The connections are taken together under `_claim`: two calls each holding part of a
        set would wait on each other for ever. Other callers take one at a time, so a pool
        with two to spare cannot run dry (kept as a margin); a smaller one reads the parts one
        after another in one transaction instead."""
        if len(reads) == 1 or self._max < len(reads) + 2:
            async with self._snapshot() as read:
                return [await read(q, params) for q, params in reads]
        async with self._read():
            with self._errors():
                async with contextlib.AsyncExitStack() as stack:
                    async with self._claim:
                        conns = [await stack.enter_async_context(self._p().acquire()) for _ in reads]
                    snapshot = None
                    for conn in conns:
                        await stack.enter_async_context(
                            conn.transaction(isolation="repeatable_read", readonly=True)
                        )
                        if snapshot is None:
                            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
                        else:  # a string the server made: '0000000A-0000001B-1'
                            await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                        await conn.execute("SET LOCAL work_mem = '128MB'; SET LOCAL jit = off")
                    return await _all_or_none(
                        c.fetch(q, *params) for c, (q, params) in zip(conns, reads, strict=True)
                    )

    async def stats(self, tenant: str, query: StatsQuery) -> dict[str, Any]:
        """Overall, groups and buckets as separate queries on separate connections, run at once.

        Ordered-set aggregates (percentile_cont) cannot use parallel query, so this is how the
        sorts of a stats call spread over the server's cores: wall time is the slowest query's,
        not the sum. (One GROUPING SETS query reads the rows once but sorts as much, serially.)
        The parts share one snapshot (`_at_once`), as an answer from rollups reads in one
        (`_snapshot`): a batch written meanwhile counts in all of them or in none.
        """
        validate_stats(query)
        async with self._snapshot() as read:
            if self._rollups:  # another process may have ended a dimension's coverage since
                covered = await read("SELECT dim, since FROM rollup_dims", ())
                self._covered = {r[0]: int(r[1]) for r in covered}
            plan = rollup.plan(query, self.rollup_properties, self._covered)
            if plan is not None:
                users = None
                if plan.dim == rollup.USER_DIM:
                    top = await read(*rollup.group_sql(DIALECT, tenant, plan))
                    keys = [rollup.decode_key(plan.dim, row[0]) for row in top]
                    q, params = sql.keyed_values_sql(DIALECT, tenant, query, plan.dim, keys)
                    users = rollup.user_groups(top, await read(q, params) if keys else [], to_micros)
                edges = rollup.Edges()
                for kind, eq, eparams in rollup.edge_reads(DIALECT, tenant, query, plan):
                    edges.add(DIALECT, query, kind, await read(eq, eparams))
                listed = None
                if rollup.grouped(plan):
                    listed = rollup.listed(await read(*rollup.top_sql(DIALECT, tenant, plan)))
                q, params = rollup.read_sql(DIALECT, tenant, plan, listed)
                return rollup.answer(query, plan, await read(q, params), users, edges, listed)
        parts: list[tuple[sql.Kind, int | None]] = [("overall", None)]
        if query.group_by:
            parts.append(("group", MAX_GROUPS))
        if query.bucket:
            parts.append(("bucket", MAX_BUCKETS))
        results = await self._at_once(
            [sql.aggregate_sql(DIALECT, tenant, query, k, limit=lim) for k, lim in parts]
        )
        found = dict(zip((k for k, _ in parts), results, strict=True))
        rows = found["overall"]
        overall = sql.aggregate_row(DIALECT, rows[0])[1] if rows and rows[0][1] else sql.empty_totals()
        groups = [
            {"key": sql.group_value(DIALECT, query.group_by or "", key), **totals}
            for key, totals in (sql.aggregate_row(DIALECT, row) for row in found.get("group", []))
        ]
        buckets = [
            {"start": iso(DIALECT.ts_value(key)), **totals}
            for key, totals in (sql.aggregate_row(DIALECT, row) for row in found.get("bucket", []))
        ]
        return {"overall": overall, "groups": groups, "buckets": buckets, **rollup.RAW_SOURCE}

    async def sessions(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        rows = await self._aggregate(tenant, StatsQuery(filters=ListQuery(session_id=session_id)), "overall")
        if not rows or not rows[0][1]:
            return None
        totals = sql.aggregate_row(DIALECT, rows[0])[1]
        lq = ListQuery(limit=MAX_SESSION_REQUESTS, session_id=session_id, order="asc")
        q, params = sql.list_sql(DIALECT, tenant, lq)
        return sql.session_result(DIALECT, session_id, totals, await self._fetch(q, *params))

    async def list_sessions(self, tenant: str, query: ListQuery) -> Page:
        query, held = sql.sessions_walk(query)
        q, params = sql.sessions_sql(DIALECT, tenant, query)
        newest = await self._fetch(q, *params)
        ids = [row[0] for row in newest[: query.limit]]
        q, params = sql.session_totals_sql(DIALECT, tenant, query, ids)
        totals = await self._fetch(q, *params) if ids else []
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
        start = rollup.users_start(self._covered)
        if not exact and start is not None and (start == 0 or not await self._older(tenant, start)):
            q, params = rollup.users_sql(DIALECT, tenant, limit, start, after, sort)
            return [rollup.user_result(row) for row in await self._analytic(q, params)]
        q, params = sql.aggregate_sql(
            DIALECT, tenant, StatsQuery(), "users", limit=limit, percentiles=False, after=after, users_by=sort
        )
        return [sql.user_result(DIALECT, row) for row in await self._fetch(q, *params)]

    async def _older(self, tenant: str, start: int) -> bool:
        q, params = rollup.users_older_sql(DIALECT, tenant, start)
        return bool((await self._fetch(q, *params))[0][0])

    # -- retention --------------------------------------------------------------------------------
    async def delete_older_than(self, cutoff: datetime, limit: int = 10_000) -> list[str]:
        """Delete rows older than `cutoff`, `limit` keys per chunk; returns their body refs.

        Chunks continue until some refs are found or nothing is left, so an empty list means
        done. Rows in months wholly before the cutoff are not deleted one by one: their keys are
        released (which hides them from `get_request`) and their bodies collected, and once a
        month has no key left its partitions are dropped. Only the month straddling the cutoff
        is deleted row by row.
        """
        cutoff_us = to_micros(cutoff)
        y, m = _month_of(cutoff_us)
        boundary = _month_start(y, m)  # rows before it live in wholly expired months
        with self._errors():
            # No record of those months is stored while their rows are released but not yet
            # dropped (migration 14): it would take a released key again.
            held = await self._purge_begins(boundary) if self._floor else None
            try:
                while True:
                    # On the session that holds `_PURGE_LOCK`: killed, it takes the lock with
                    # it, and no key is released after (another server may then settle what
                    # this purge released; outside check: on a pool connection the chunks
                    # went on under no lock and no floor, and redelivered records were stored
                    # twice).
                    async with contextlib.AsyncExitStack() as stack:
                        conn = held or await stack.enter_async_context(self._p().acquire())
                        refs, deleted = await self._purge_chunk(conn, cutoff, limit, boundary)
                    if refs or deleted < limit:
                        break
                await self._drop_expired_partitions(boundary, held)
            finally:
                if held is not None:
                    await self._purge_ends(held)
        return refs

    async def _purge_chunk(
        self, conn: asyncpg.Connection, cutoff: datetime, limit: int, boundary: datetime
    ) -> tuple[list[str], int]:
        """One transaction of `delete_older_than`: its body refs and how many rows went."""
        async with conn.transaction():
            rows = await conn.fetch(_RETENTION, cutoff, limit, boundary)
            # The same rows leave the rollups (same transaction); first/last of what is left
            # are read again.
            gone = (row[4:] for row in rows if row[4] is not None)
            await self._leave_rollups(conn, rollup.retention_deltas(gone, self.rollup_properties, to_micros))
        return [ref for row in rows for ref in sql.body_refs(row[1:4])], int(rows[0][0])

    async def erase(self, tenant: str, by: str, value: str, limit: int = 10_000) -> tuple[int, list[str]]:
        if by not in sql.ERASE_BY:
            raise ValueError(f"erase by {by!r}")
        # Webhook deliveries carry the record in their payload (pending and logged ones).
        deliveries = (
            ", dw AS (DELETE FROM webhook_deliveries w USING pick g"
            " WHERE w.tenant = g.tenant AND w.subject = g.id)"
            if self._outbox
            else ""
        )
        # Through the indexes (`llmtap_hash` of the column): a plain `= $2` read every partition.
        if by == "id":
            match = (
                "id = $2 AND created_at IN (SELECT k.created_at FROM request_keys k"
                " WHERE k.tenant = $1 AND llmtap_hash(k.id) = llmtap_hash($2) AND k.id = $2)"
            )
        else:
            match = f"llmtap_hash({by}) = llmtap_hash($2) AND {by} = $2"
        query = _ERASE.format(match=match, src=_SRC_R, deliveries=deliveries)
        with self._errors():
            async with self._p().acquire() as conn, conn.transaction():
                rows = await conn.fetch(query, tenant, value, limit)
                keyed = (row[3:-1] for row in rows if row[-1])
                deltas = rollup.retention_deltas(keyed, self.rollup_properties, to_micros)
                await self._leave_rollups(conn, deltas)
        return len(rows), [ref for row in rows for ref in sql.body_refs(row[:3])]

    async def _leave_rollups(
        self, conn: asyncpg.Connection, deltas: dict[rollup.RollupKey, rollup.Cell]
    ) -> None:
        """Take deleted rows' `deltas` out of the rollups (in the caller's transaction); the
        first/last times of what is left are read again."""
        await self._reread_times(conn, await self._apply_rollups(conn, deltas))

    async def _reread_times(self, conn: asyncpg.Connection, keys: Iterable[rollup.RollupKey]) -> None:
        for key in keys:
            q, params = rollup.recompute_sql(DIALECT, key)
            first, last = (await conn.fetch(q, *params))[0]
            await conn.execute(
                f"UPDATE rollups SET first_at = $6, last_at = $7 WHERE {_R_WHERE}",
                *key,
                None if first is None else to_micros(first),
                None if last is None else to_micros(last),
            )

    async def _purge_begins(self, boundary: datetime) -> Any:
        """Before a call's chunks: what an earlier purge that stopped part-way left is settled
        (`_settle_floor`), `_PURGE_LOCK` taken (shared, on the connection returned, released by
        `_purge_ends`), and the retention floor raised to at least `boundary`: nothing is
        released before the floor covers it. Between calls (the caller deletes bodies) another
        server may settle what this purge released so far: rows past its cutoff, and the floor
        is raised again before more are released."""
        await self._settle_floor(boundary)
        conn = await self._p().acquire()
        try:
            await conn.execute("SELECT pg_advisory_lock_shared($1)", _PURGE_LOCK)
            await conn.execute(
                "INSERT INTO retention_floor (one, before) VALUES (true, $1) ON CONFLICT (one)"
                " DO UPDATE SET before = greatest(retention_floor.before, EXCLUDED.before)",
                boundary,
            )
        except BaseException:
            await self._purge_ends(conn)
            raise
        return conn

    async def _purge_ends(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # a connection lost has let the lock go
            await conn.execute("SELECT pg_advisory_unlock_shared($1)", _PURGE_LOCK)
        with contextlib.suppress(Exception):
            await self._p().release(conn)

    async def _settle_floor(self, boundary: datetime) -> None:
        """A floor above `boundary` with no purge under way (none holds `_PURGE_LOCK`) is an
        earlier purge with a later cutoff that stopped part-way (retention days raised since,
        or another server's setting): the rows whose keys it released are gone from every read
        but the list and the export, and nothing would ever drop them, nor clear the floor that
        refuses their months' records (outside check). Those rows are deleted, and the floor
        comes down to `boundary`. A purge under way keeps its floor: it is still releasing keys
        under it (a rolling deploy that raised the retention days; outside check)."""
        async with self._p().acquire() as conn, conn.transaction():
            floor = await conn.fetchval("SELECT before FROM retention_floor FOR UPDATE")
            if floor is None or floor <= boundary:
                return
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PURGE_LOCK):
                return
            gone = await conn.fetch(_RELEASED, boundary, floor)
            # Released, they still counted in the first/last times read then.
            shared = rollup.retention_deltas(gone, self.rollup_properties, to_micros)
            await self._reread_times(conn, shared)
            await conn.execute("UPDATE retention_floor SET before = $1", boundary)

    async def _drop_expired_partitions(self, boundary: datetime, held: Any = None) -> None:
        """Drop the months wholly before `boundary` whose keys are all released (on `held`, the
        purge's session, when there is one: its floor is cleared only while it holds the lock)."""
        await self._load_partitions()
        expired = sorted(ym for ym in self._months if _month_start(ym[0], ym[1] + 1) <= boundary)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._partition_mutex)
            conn = held or await stack.enter_async_context(self._p().acquire())
            await stack.enter_async_context(conn.transaction())
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
            for year, month in expired:
                end = _month_start(year, month + 1)
                if await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM request_keys WHERE created_at < $1)", end
                ):
                    return  # a purge under way: the floor stays
                for table in ("requests", "request_properties"):
                    await conn.execute(f"DROP TABLE IF EXISTS {table}_p{year:04d}{month:02d}")
                self._months.discard((year, month))
            # Released rows live only in months wholly before the floor that are not dropped yet
            # (another server's purge may have a later boundary): with none left, an old record
            # arriving late is stored again and goes at the next purge, key and row together.
            floor = await conn.fetchval("SELECT before FROM retention_floor") if self._floor else None
            if floor is not None and not any(_month_start(y, m + 1) <= floor for y, m in self._months):
                await conn.execute("DELETE FROM retention_floor WHERE before = $1", floor)

    # -- API keys ---------------------------------------------------------------------------------
    async def create_key(self, tenant: str, name: str | None, key_hash: str, prefix: str) -> ApiKey:
        row = await self._change(
            "INSERT INTO api_keys (id, tenant, name, prefix, key_hash, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)"
            " RETURNING id, tenant, name, prefix, created_at, revoked_at",
            sql.new_key_id(),
            tenant,
            name,
            prefix,
            key_hash,
            sql.now(),
        )
        return _api_key(row[0])

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        rows = await self._fetch(
            "SELECT id, tenant, name, prefix, created_at, revoked_at, key_hash"
            " FROM api_keys WHERE key_hash = $1",
            key_hash,
        )
        if not rows or not sql.keys_match(rows[0][6], key_hash):
            return None
        return _api_key(rows[0])

    async def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        q = "SELECT id, tenant, name, prefix, created_at, revoked_at FROM api_keys"
        if tenant is not None:
            rows = await self._fetch(q + " WHERE tenant = $1 ORDER BY created_at, id", tenant)
        else:
            rows = await self._fetch(q + " ORDER BY created_at, id")
        return [_api_key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        rows = await self._change(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL RETURNING id",
            sql.now(),
            key_id,
        )
        return bool(rows)


def _reason(e: BaseException) -> str:
    """A short human reason for a connection failure."""
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return "unknown host"
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text
