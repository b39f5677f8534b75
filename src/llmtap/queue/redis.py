"""Redis Streams queue: one stream per partition, one consumer group, and partition leases.

Why leases: a Redis consumer group hands the entries of ONE stream to whichever consumer asks
first, so two workers reading one stream would interleave a key's records and break per-key
order. Here each stream is read by exactly one live consumer at a time, the holder of its lease
(`SET NX PX`, renewed by a heartbeat). Live consumers heartbeat into a sorted set (score = expiry,
server clock) and split the partitions fairly: partition p belongs to the live consumer at index
`p % live` of the sorted member list. A consumer that must give a partition up stops reading it,
waits until its in-flight deliveries are acked, then deletes its lease, so the next owner never
overtakes records still being processed. A dead consumer's leases simply expire.

A new owner first claims what earlier owners left pending (XAUTOCLAIM with a min-idle time) and
re-reads its own pending entries, in stream order, before it reads new ones (`>`).

Trimming never drops an unacknowledged entry: Redis 7.0 has no `XTRIM ... ACKED`, so the owner
trims with `XTRIM MINID` below the oldest entry any group still needs (its oldest pending entry,
or the entry after its last-delivered-id).

Keys, with `prefix` (default `llmtap`): `<prefix>:p<N>` streams, `<prefix>:dlq` dead letters,
`<prefix>:meta` (partition count, fixed at creation), `<prefix>:<group>:members` heartbeats and
`<prefix>:<group>:lease:<N>` leases. Single Redis instance (not Redis Cluster).

Durability: `publish` returns once Redis holds the entries; configure Redis persistence
(`appendonly yes`) for them to survive a Redis crash, as for any Redis-backed queue.
Delivery is at least once; the idempotent store turns duplicates into one row.

URL: `redis://[:password@]host:port/db` (or `rediss://`) with optional query parameters
`prefix` (default `llmtap`), `session_timeout_ms` (lease and heartbeat lifetime: a dead
worker's partitions move after this; default 10000), `claim_idle_ms` (how long an entry left
pending by an earlier owner must be idle before it is claimed; default 1000) and
`redeliver_after_ms` (a delivery unacked this long is handed out again; default 60000).
Other query parameters go to redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llmtap.errors import BackendUnavailable, ConfigError, MessageRefused, QueueMissing, unknown_host
from llmtap.queue.base import (
    LOST,
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
from llmtap.redact import redact_dsn

log = logging.getLogger("llmtap.queue.redis")

#: Seconds between checks of Redis's eviction policy (`RedisQueue._watch_policy`).
POLICY_EVERY = 30.0

#: The smallest `proto-max-bulk-len` Redis takes: no shorter value is refused for its size.
_MIN_BULK_CAP = 1 << 20


# Heartbeat: renew our membership and leases, acquire the partitions that are ours by the fair
# share rule, and report which leases we hold that now belong to someone else. Server time, so
# consumers on hosts with skewed clocks agree on who is alive.
_REBALANCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl, parts, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZADD', KEYS[1], now + ttl, me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(live)
local n, idx = #live, 0
for i, m in ipairs(live) do if m == me then idx = i - 1 end end
local owned, release, fresh = {}, {}, {}
for p = 0, parts - 1 do
  local key = lease .. p
  local holder = redis.call('GET', key)
  local mine = (p % n) == idx
  if holder == me then
    redis.call('PEXPIRE', key, ttl)
    table.insert(owned, p)
    if not mine then table.insert(release, p) end
  elseif mine and not holder then
    redis.call('SET', key, me, 'PX', ttl)
    table.insert(owned, p)
    table.insert(fresh, p)
  end
end
return {owned, release, fresh}
"""

# Delete leases only if we still hold them. ARGV: me, lease key prefix, partitions...
_RELEASE = """
local n = 0
for i = 3, #ARGV do
  local key = ARGV[2] .. ARGV[i]
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key); n = n + 1 end
end
return n
"""

# Move dead letters back to their partition streams; XDEL-then-XADD in one script, so two
# concurrent replays never publish the same dead letter twice.
_REPLAY = """
local n = 0
for i = 2, #ARGV, 2 do
  local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #e > 0 then
    local f, k, v = e[1][2], '', ''
    for j = 1, #f, 2 do
      if f[j] == 'k' then k = f[j + 1] elseif f[j] == 'v' then v = f[j + 1] end
    end
    redis.call('XADD', ARGV[1] .. ARGV[i + 1], '*', 'k', k, 'v', v)
    redis.call('XDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

# Append a batch. ARGV: stream prefix, then (partition, key, value) per record.
# Entries trimmed before group ARGV[1] read them (XTRIM MAXLEN by hand): what was ever added,
# less what the group read, less what is still there to read. (An XDEL makes Redis 7.0 forget
# the group's read count once a read passes it: those are not found.) Said once: the group's
# read count is set past them, which also makes Redis's `lag` right again (it counted them as
# waiting for good). Returns {removed, last id the group read}; 0 where it cannot tell (a read
# count Redis lost, a group that read nothing yet, more than ARGV[2] entries left to count).
_REMOVED = """
local function field(arr, name)
  for i = 1, #arr, 2 do if arr[i] == name then return arr[i + 1] end end
end
local added = field(redis.call('XINFO', 'STREAM', KEYS[1]), 'entries-added')
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(g, 'name') == ARGV[1] then
    local last, read = field(g, 'last-delivered-id'), field(g, 'entries-read')
    if not added or not read or last == '0-0' then return {0, ''} end
    local rest = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[2])
    if rest >= tonumber(ARGV[2]) then return {0, ''} end
    local removed = added - read - rest
    if removed > 0 then
      redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', added - rest)
    end
    return {removed, last}
  end
end
return {0, ''}
"""

_PUBLISH = """
for i = 2, #ARGV, 3 do
  redis.call('XADD', ARGV[1] .. ARGV[i], '*', 'k', ARGV[i + 1], 'v', ARGV[i + 2])
end
return (#ARGV - 1) / 3
"""

_OUR_PARAMS = ("prefix", "session_timeout_ms", "claim_idle_ms", "redeliver_after_ms")


_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


#: Entries counted one by one at most, when counting what a deletion removed.
_COUNT_CAP = 100_000


def _parse_id(eid: bytes | str) -> tuple[int, int]:
    s = eid.decode() if isinstance(eid, bytes) else eid
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


def entry_offset(eid: bytes | str) -> int:
    """A stream entry id as one growing integer (`ms * 10**6 + seq`), for `Delivery.offset`.

    Fits in 63 bits until the year 2262, so stores may keep it in a BIGINT.
    """
    ms, seq = _parse_id(eid)
    return ms * 1_000_000 + seq


def _next_id(eid: bytes | str) -> str:
    ms, seq = _parse_id(eid)
    return f"{ms}-{seq + 1}"


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


@dataclass(slots=True)
class _Partition:
    """What this consumer knows about one partition it holds the lease of."""

    # claim: take over entries other consumers left pending; pel: re-read our own pending
    # entries from `cursor`; new: read entries never delivered (`>`).
    state: Literal["claim", "pel", "new"] = "claim"
    cursor: str = "0"
    inflight: dict[str, float] = field(default_factory=dict)  # entry id -> handed out (monotonic)
    buffer: deque[Delivery] = field(default_factory=deque)  # read from Redis, not handed out yet
    releasing: bool = False


class RedisQueue(Queue):
    """The `Queue` on Redis Streams, for scaled-out deployments without Kafka."""

    def __init__(
        self,
        url: str,
        partitions: int,
        group: str,
        *,
        consumer_id: str | None = None,
        session_timeout: float | None = None,
        claim_idle: float | None = None,
        redeliver_after: float | None = None,
        trim_interval: float = 10.0,
        op_timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        db = parts.path.strip("/")
        if parts.scheme not in ("redis", "rediss") or not parts.hostname or not (db == "" or db.isdigit()):
            # (redis-py reads `/abc` as database 0: a typo would share someone else's database)
            raise ConfigError(
                f"invalid setting LLMTAP_QUEUE: {redact_dsn(url)!r} is not redis://host:port/db"
                " (db: a database number)"
            )
        query = dict(parse_qsl(parts.query))
        if parts.scheme == "rediss":  # (on redis:// a TLS parameter is refused at connect)
            _check_tls_files(query, url)
        ours = {k: query.pop(k) for k in _OUR_PARAMS if k in query}
        try:
            ms = {k: float(v) / 1000 for k, v in ours.items() if k.endswith("_ms")}
        except ValueError:
            raise ConfigError(f"invalid setting LLMTAP_QUEUE: bad number in {redact_dsn(url)!r}") from None
        self.prefix = ours.get("prefix", "llmtap")
        self.group = group
        self.partitions = partitions
        self.session_timeout = session_timeout or ms.get("session_timeout_ms", 10.0)
        self.claim_idle = claim_idle if claim_idle is not None else ms.get("claim_idle_ms", 1.0)
        self.redeliver_after = redeliver_after or ms.get("redeliver_after_ms", 60.0)
        self.trim_interval = trim_interval
        self.op_timeout = op_timeout
        self.consumer_id = consumer_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._url = parts._replace(query=urlencode(query)).geturl()
        self._where = f"{parts.hostname}:{parts.port or 6379}"
        self.description = f"{redact_dsn(url)} (Redis Streams)"
        self._r: aioredis.Redis | None = None  # commands with a timeout
        self._rb: aioredis.Redis | None = None  # blocking XREADGROUP
        self._role: Role | None = None
        self._owned: dict[int, _Partition] = {}
        self._lease_deadline = 0.0  # monotonic; our leases are surely valid before this
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._reading: set[int] = set()  # partitions of the blocking read in flight
        self._heartbeat_error: BaseException | None = None
        self._rr = 0
        self._last_trim = 0.0
        self._policy_at = time.monotonic()  # checked by `connect`
        self._evicting: str | None = None
        self._scripts: dict[str, Any] = {}

    # -- keys ----------------------------------------------------------------------------------
    def stream(self, partition: int) -> str:
        return f"{self.prefix}:p{partition}"

    @property
    def dlq_key(self) -> str:
        return f"{self.prefix}:dlq"

    @property
    def _members_key(self) -> str:
        return f"{self.prefix}:{self.group}:members"

    @property
    def _lease_prefix(self) -> str:
        return f"{self.prefix}:{self.group}:lease:"

    def _partition_of(self, stream: bytes | str) -> int:
        return int(_s(stream).rsplit(":p", 1)[1])

    @property
    def r(self) -> aioredis.Redis:
        if self._r is None:
            raise RuntimeError("RedisQueue is not connected")
        return self._r

    def _unavailable(self, e: BaseException) -> BackendUnavailable:
        text = str(e)
        if "maxmemory" in text:  # OOM: Redis answers, it is full (`noeviction`, or nothing left to evict)
            return BackendUnavailable(
                f"Redis at {self._where} is full (used memory above its maxmemory): raise maxmemory; "
                "records go to the fallback meanwhile, and a worker cannot join until it is raised"
            )
        # Redis answered, and said no: "cannot reach" sent operators to the network (redis-py
        # drops the WRONGPASS/NOPERM/READONLY code from the text, its class keeps it).
        first = text.splitlines()[0][:300] if text else type(e).__name__
        if isinstance(e, AuthenticationError):
            return BackendUnavailable(f"Redis at {self._where} refuses our credentials: {first}")
        if isinstance(e, NoPermissionError):
            return BackendUnavailable(f"Redis at {self._where} refuses the command (ACL): {first}")
        if isinstance(e, ReadOnlyError):
            return BackendUnavailable(f"Redis at {self._where} is read-only (a replica?): {first}")
        if isinstance(e, ResponseError) and first.startswith("NOGROUP"):
            # Redis answered: a stream or its group is gone (deleted, or Redis restarted empty).
            return BackendUnavailable(f"Redis at {self._where} lost a consumer group; made again: {first}")
        if "111" in text or "refused" in text.lower():
            why = "connection refused"
        elif isinstance(e, TimeoutError | RedisTimeoutError):
            why = f"no answer within {self.op_timeout:g}s"
        else:
            why = text.splitlines()[0] if text else type(e).__name__
        return BackendUnavailable(f"cannot reach Redis at {self._where}: {why}")

    # -- lifecycle -----------------------------------------------------------------------------
    def _client(self, socket_timeout: float | None) -> aioredis.Redis:
        return aioredis.from_url(
            self._url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=min(self.op_timeout, 3.0),
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), 2),
            decode_responses=False,
        )

    async def connect(self, role: Role) -> None:
        self._role = role
        try:
            self._r = self._client(self.op_timeout)
            self._rb = self._client(None)
        except ValueError as e:  # redis-py's check of a URL parameter's value (`socket_timeout=abc`)
            raise ConfigError(f"invalid setting LLMTAP_QUEUE: {str(e).splitlines()[0][:200]}") from None
        scripts = (
            ("publish", _PUBLISH),
            ("rebalance", _REBALANCE),
            ("release", _RELEASE),
            ("replay", _REPLAY),
            ("removed", _REMOVED),
        )
        for name, src in scripts:
            self._scripts[name] = self._r.register_script(src)
        try:
            await asyncio.wait_for(self._r.ping(), self.op_timeout)
            if role == "inspect":
                await self._find_layout()
            else:
                evicts = await self._evicting_policy()
                if evicts is not None:
                    raise ConfigError(
                        f"invalid setting LLMTAP_QUEUE: Redis at {self._where} evicts keys when full "
                        f"(maxmemory-policy {evicts}): queued records would vanish without an error; "
                        "set maxmemory-policy noeviction (or a volatile-* policy) on it"
                    )
                await self._init_layout()
        except (QueueMissing, ConfigError):
            await self._close_clients()
            raise
        except TypeError as e:  # redis-py passes URL parameters on as arguments, unchecked
            await self._close_clients()
            m = re.search(r"unexpected keyword argument '([^']+)'", str(e))
            if m is None:
                raise
            hint = " (TLS parameters need a rediss:// URL)" if m[1].startswith("ssl") else ""
            raise ConfigError(
                f"invalid setting LLMTAP_QUEUE: Redis takes no URL parameter {m[1]!r}{hint}"
            ) from None
        except (RedisError, OSError, TimeoutError) as e:
            await self._close_clients()
            if isinstance(e, AuthenticationError) or "DB index is out of range" in str(e) or unknown_host(e):
                # Redis answered (or the DNS did): the URL is wrong, no outage to wait out.
                why = "unknown host" if unknown_host(e) else str(e).splitlines()[0]
                raise ConfigError(f"invalid setting LLMTAP_QUEUE: Redis at {self._where}: {why}") from None
            raise self._unavailable(e) from None
        if role in ("consumer", "both"):
            try:
                await self._heartbeat_once()
            except (RedisError, OSError, TimeoutError) as e:
                await self._close_clients()
                raise self._unavailable(e) from None
            self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="llmtap-redis-heartbeat")

    async def _evicting_policy(self) -> str | None:
        """Redis's `maxmemory-policy` when it may evict our streams (an `allkeys-*` policy: a
        Redis run as a cache), else None. Our keys have no TTL, so `volatile-*` never takes
        them; `noeviction` refuses writes when full, which the gateway sees and falls back on.
        A Redis that hides INFO (some managed ones) cannot be checked: None."""
        try:
            info = await asyncio.wait_for(self.r.info("memory"), self.op_timeout)
        except ResponseError:
            return None
        policy = _s(info.get("maxmemory_policy", ""))
        if not policy.startswith("allkeys") or not int(info.get("maxmemory") or 0):
            return None  # no memory limit: nothing is ever evicted, whatever the policy
        return policy

    async def _find_layout(self) -> None:
        """The partition count of an existing queue; `QueueMissing` when there is none."""
        stored = await self.r.hget(f"{self.prefix}:meta", "partitions")
        if stored is None and not await self.r.exists(self.stream(0)):
            raise QueueMissing(
                f"no queue {self.prefix!r} in Redis at {self._where}: nothing was published to it yet,"
                " or LLMTAP_QUEUE names another"
            )
        if stored is not None:
            self.partitions = int(stored)

    async def _init_layout(self) -> None:
        """Fix the partition count at creation and make sure every stream has our group."""
        meta = f"{self.prefix}:meta"
        await self.r.hsetnx(meta, "partitions", self.partitions)
        stored = int(await self.r.hget(meta, "partitions") or self.partitions)
        if stored != self.partitions:
            # Another count would send keys elsewhere and strand records in streams nobody reads.
            log.warning(
                "queue %s has %d partitions (created so); using %d, not %d",
                self.prefix,
                stored,
                stored,
                self.partitions,
            )
            self.partitions = stored
        pipe = self.r.pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.xgroup_create(self.stream(p), self.group, id="0", mkstream=True)
        for res in await pipe.execute(raise_on_error=False):
            if isinstance(res, ResponseError) and "BUSYGROUP" not in str(res):
                raise res
            if isinstance(res, Exception) and not isinstance(res, ResponseError):
                raise res

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await bounded(self._heartbeat_task, self.op_timeout, "redis queue: heartbeat stop")
            self._heartbeat_task = None
        if self._r is not None and self._role in ("consumer", "both"):
            # Leave now, so the others take our partitions at their next heartbeat instead of
            # waiting for our leases to expire. What we leave pending they claim.
            await bounded(self._leave(), self.op_timeout, "redis queue: leaving the group")
        self._owned.clear()
        await self._close_clients()

    async def _leave(self) -> None:
        await self.r.zrem(self._members_key, self.consumer_id)
        if self._owned:
            await self._release(list(self._owned))

    async def _close_clients(self) -> None:
        for c in (self._r, self._rb):
            if c is not None:
                await bounded(c.aclose(), self.op_timeout, "redis queue: client close")
        self._r = self._rb = None

    # -- producer ------------------------------------------------------------------------------
    async def _watch_policy(self) -> str | None:
        """The eviction policy checked at start, again every `POLICY_EVERY` seconds: a Redis
        switched to `allkeys-*` under a running gateway took 1,003 of 1,200 records and
        dropped them (an outside check). An ERROR when it starts evicting, a WARNING when it
        stops; the gateway publishes elsewhere (ingest, spool) meanwhile."""
        now = time.monotonic()
        if now - self._policy_at < POLICY_EVERY:
            return self._evicting
        self._policy_at = now
        try:
            evicts = await self._evicting_policy()
        except (RedisError, OSError, TimeoutError):
            return self._evicting  # an outage says itself elsewhere
        if evicts != self._evicting:
            if evicts is not None:
                log.error(
                    "redis queue: Redis at %s now evicts keys when full (maxmemory-policy %s): queued "
                    "records may vanish unread; publishing elsewhere until it is set to noeviction",
                    self._where,
                    evicts,
                )
            else:
                log.warning("redis queue: Redis at %s no longer evicts keys", self._where)
            self._evicting = evicts
        return evicts

    async def _refused_big(
        self, messages: Sequence[Message], args: list[str | bytes | int]
    ) -> Literal["refused", "published", "outage"]:
        """Whether a batch whose write broke the connection was refused for its size: it holds a
        value Redis may refuse, Redis answers a PING on a new connection, and the batch sent
        once more on it breaks the connection again. A restart, a failover or a blip (rev21:
        Redis loading its dataset answered PING a moment later) passes that second try: the
        batch is then "published" (at least once)."""
        if max(len(m.value) for m in messages) < _MIN_BULK_CAP:
            return "outage"
        try:
            await bounded(self.r.connection_pool.disconnect(), self.op_timeout, "redis queue: reconnect")
            if not await asyncio.wait_for(self.r.ping(), self.op_timeout):
                return "outage"
        except Exception:  # Redis is down, or the network: an outage after all
            return "outage"
        try:
            added = await asyncio.wait_for(self._scripts["publish"](args=args), self.op_timeout)
        except (RedisConnectionError, OSError) as e:
            if isinstance(e, BusyLoadingError | TimeoutError):
                raise self._unavailable(e) from None
            await bounded(self.r.connection_pool.disconnect(), self.op_timeout, "redis queue: reconnect")
            return "refused"
        except ResponseError as e:
            if "invalid bulk length" in str(e).lower():  # said this time
                await bounded(self.r.connection_pool.disconnect(), self.op_timeout, "redis queue: reconnect")
                return "refused"
            raise BackendUnavailable(f"Redis at {self._where} refused the batch: {e}") from None
        except (RedisError, TimeoutError) as e:
            raise self._unavailable(e) from None
        if added != len(messages):
            raise BackendUnavailable(f"Redis at {self._where} answered {str(added)[:60]} to a batch")
        return "published"

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        evicts = await self._watch_policy()
        if evicts is not None:
            raise BackendUnavailable(
                f"Redis at {self._where} evicts keys when full (maxmemory-policy {evicts}): not publishing"
                " to it (records would vanish unread)"
            )
        # One script call per batch, run by Redis in one step: one command to encode and one
        # reply to parse cost the gateway a sixth of the CPU of a pipeline of XADDs.
        n = self.partitions
        args: list[str | bytes | int] = [f"{self.prefix}:p"]
        for m in messages:
            args += (partition_for(m.key, n), m.key, m.value)
        try:
            added = await asyncio.wait_for(self._scripts["publish"](args=args), self.op_timeout)
        except ResponseError as e:
            biggest = max(len(m.value) for m in messages)
            if "invalid bulk length" in str(e).lower() and biggest >= _MIN_BULK_CAP:
                # A value past Redis's `proto-max-bulk-len` (1 MiB at the least, some managed
                # plans' cap): the batch is too large, not Redis down. Taken for an outage, the
                # spool waited on that record for ever, and every record spooled after it
                # (rev18a). Any other refusal stays an outage (rev19: a proxy's own "Protocol
                # error" made small records bare). Redis closes the connection: the next
                # publish connects anew.
                await bounded(self.r.connection_pool.disconnect(), self.op_timeout, "redis queue: reconnect")
                raise MessageRefused(f"Redis at {self._where} refused the batch as too large: {e}") from None
            raise BackendUnavailable(f"Redis at {self._where} refused the batch: {e}") from None
        except (RedisError, OSError, TimeoutError) as e:
            # A slow write (a timeout) or a Redis still loading its data is no refusal (rev21)
            maybe = isinstance(e, RedisConnectionError | OSError) and not isinstance(
                e, BusyLoadingError | TimeoutError
            )
            verdict = await self._refused_big(messages, args) if maybe else "outage"
            if verdict == "published":
                return  # the second try went through
            if verdict == "refused":
                # Redis refuses a value past `proto-max-bulk-len` and closes the connection
                # while a large one is still being written: the client sees a reset or a
                # broken pipe, not the refusal (rev20: 5 MB and batches of 1.2 MB records;
                # taken for an outage, they held the spool for ever). Redis answering at once
                # on a new connection says it was the batch.
                raise MessageRefused(
                    f"Redis at {self._where} closed the connection while a batch of"
                    f" {sum(len(m.value) for m in messages)} bytes was written ({e}): too large"
                ) from None
            raise self._unavailable(e) from None
        except Exception as e:  # the driver failed on what came back (redis-py 8.2 on an echo)
            await bounded(self.r.connection_pool.disconnect(), self.op_timeout, "redis queue: reconnect")
            raise BackendUnavailable(f"Redis at {self._where}: {type(e).__name__}: {e}") from None
        if added != len(messages):
            # Only Redis's count of the entries it added acknowledges the batch. Anything else is
            # not Redis answering: e.g. a reconnect to a dead local broker that landed on its own
            # port (a TCP self-connect) echoes the command back, which parses as a reply. Such a
            # socket never fails by itself, so its connections go: the next try connects anew.
            await bounded(self.r.connection_pool.disconnect(), self.op_timeout, "redis queue: reconnect")
            raise BackendUnavailable(
                f"Redis at {self._where} answered {str(added)[:60]} to a batch of {len(messages)}: "
                "not an acknowledgment"
            )

    # -- consumer ------------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        interval = self.session_timeout / 3
        said = 0.0  # when a failure was last logged: once a minute, not once a heartbeat
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat_once()
                await self._watch_policy()
                self._heartbeat_error = None
                if said:
                    log.warning("redis queue heartbeat to %s works again", self._where)
                    said = 0.0
                if time.monotonic() - self._last_trim > self.trim_interval:
                    self._last_trim = time.monotonic()
                    for p in list(self._owned):
                        await self._say_removed(p)
                        await self.trim_partition(p)
            except (RedisError, OSError, TimeoutError) as e:
                self._heartbeat_error = e
                if time.monotonic() - said >= 60.0:
                    log.warning("redis queue heartbeat to %s failed (retrying every %gs): %s",
                                self._where, interval, e)  # fmt: skip
                    said = time.monotonic()
            except Exception:  # never let the heartbeat die silently: leases would lapse
                log.exception("redis queue heartbeat failed")

    async def _heartbeat_once(self) -> None:
        t0 = time.monotonic()
        owned, release, fresh = await self._scripts["rebalance"](
            keys=[self._members_key],
            args=[self.consumer_id, int(self.session_timeout * 1000), self.partitions, self._lease_prefix],
        )
        # The leases were (re)set after t0, so they surely hold until t0 + ttl; keep a margin.
        self._lease_deadline = t0 + self.session_timeout * 0.8
        owned_set = {int(p) for p in owned}
        fresh_set = {int(p) for p in fresh}
        changed = False
        for p in list(self._owned):
            if p not in owned_set:  # lost it (we stalled past the lease): stop reading it now
                log.warning("redis queue: lease of partition %d lost", p)
                del self._owned[p]
                changed = True
        for p in owned_set:
            # Newly acquired, or re-acquired after our lease lapsed (someone may have held it
            # meanwhile): start over by claiming what is pending there.
            if p not in self._owned or p in fresh_set:
                self._owned[p] = _Partition()
                changed = True
        to_release = []
        now = time.monotonic()
        for p in (int(x) for x in release):
            part = self._owned[p]
            part.releasing = True
            part.buffer.clear()  # still pending to us; the next owner claims them
            if p not in self._reading and all(now - t > self.redeliver_after for t in part.inflight.values()):
                to_release.append(p)
        if to_release:
            await self._release(to_release)
            changed = True
        if changed:
            self._changed.set()

    async def _release(self, partitions: list[int]) -> None:
        await self._scripts["release"](args=[self.consumer_id, self._lease_prefix, *partitions])
        for p in partitions:
            self._owned.pop(p, None)

    def owned_partitions(self) -> list[int]:
        """Partitions this consumer holds the lease of (for tests and status)."""
        return sorted(self._owned)

    async def consume(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            blocked = False
            if now < self._lease_deadline:  # else our leases may have lapsed: hand out nothing
                self._expire_inflight(now)
                out = self._take(max_messages)
                if out:
                    return out
                try:
                    blocked = await self._refill(max_messages, max(0.0, deadline - now))
                except (RedisError, OSError) as e:
                    # A read may have reached Redis with its reply lost: those entries are
                    # pending to us unseen, so re-read our pending entries once Redis is back.
                    self._reread_pending()
                    if isinstance(e, ResponseError) and "NOGROUP" in str(e):
                        # Redis came back without our streams (restarted without persistence,
                        # or flushed): recreate the group, or we would never read again.
                        log.warning("redis queue %s lost its consumer group; recreating it", self.prefix)
                        with contextlib.suppress(RedisError, OSError):
                            await self._init_layout()
                    raise self._unavailable(e) from None
                out = self._take(max_messages)
                if out:
                    return out
            if now >= self._lease_deadline and self._heartbeat_error is not None:
                raise self._unavailable(self._heartbeat_error)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if not blocked:  # nothing to read yet (no partition, or a claim must wait): nap
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))

    def _expire_inflight(self, now: float) -> None:
        """Deliveries unacked for `redeliver_after` are handed out again, from the oldest one."""
        for part in self._owned.values():
            if part.inflight and not part.releasing:
                oldest = min(part.inflight.values())
                if now - oldest > self.redeliver_after:
                    part.inflight.clear()
                    part.buffer.clear()
                    part.state, part.cursor = "pel", "0"

    def _take(self, max_messages: int) -> list[Delivery]:
        """Hand out buffered deliveries, each partition's in order."""
        out: list[Delivery] = []
        now = time.monotonic()
        parts = list(self._owned.values())
        self._rr += 1  # a different first partition each time, so none is starved
        for i in range(len(parts)):
            part = parts[(self._rr + i) % len(parts)]
            if part.releasing:
                continue
            while part.buffer and len(out) < max_messages:
                d = part.buffer.popleft()
                part.inflight[d.handle] = now
                out.append(d)
        return out

    async def _refill(self, max_messages: int, timeout: float) -> bool:
        """Read into the buffers: claims and pending re-reads first, then new entries.

        Returns whether it waited on Redis for new entries.
        """
        for p, part in list(self._owned.items()):
            if part.releasing:
                continue
            if part.state == "claim":
                await self._claim(p, part)
            if part.state == "pel":
                await self._read_pending(p, part, max_messages)
        if any(p.buffer for p in self._owned.values()):
            return False
        new = [p for p, part in self._owned.items() if part.state == "new" and not part.releasing]
        if not new:
            return False
        assert self._rb is not None
        # Cap the block so ownership changes (heartbeat) are noticed while idle.
        block = int(min(timeout, self.session_timeout / 3) * 1000)
        # While this read is out, none of its partitions is released: an entry it delivers must
        # be in our pending list before the next owner looks there (it claims what it finds).
        self._reading = set(new)
        try:
            resp: Any = await asyncio.wait_for(
                self._rb.xreadgroup(
                    self.group,
                    self.consumer_id,
                    {self.stream(p): ">" for p in new},
                    count=max_messages,
                    block=block if block > 0 else None,
                ),
                block / 1000 + self.op_timeout,
            )
        except asyncio.CancelledError:
            self._reread_pending()  # the read may have delivered entries we will never see
            raise
        finally:
            self._reading = set()
        for stream, entries in resp or []:
            p = self._partition_of(stream)
            owner = self._owned.get(p)
            if owner is None or owner.releasing:  # pending to us: the next owner claims them
                continue
            for eid, fields in entries:
                self._buffer(p, owner, eid, fields, 1)
        await self._release_drained()
        return block > 0

    def _reread_pending(self) -> None:
        """After a read whose reply we may have missed: re-read our pending entries first."""
        for part in self._owned.values():
            part.buffer.clear()
            if part.state == "new":
                part.state, part.cursor = "pel", "0"

    def _buffer(
        self, p: int, part: _Partition, eid: bytes, fields: dict[bytes, bytes] | None, n: int
    ) -> None:
        if fields is None or _s(eid) in part.inflight:
            return  # deleted from the stream (acked by the caller), or handed out already
        key = fields.get(b"k", b"").decode(errors="replace")
        part.buffer.append(
            Delivery(p, entry_offset(eid), key, fields.get(b"v", b""), delivery_count=n, handle=_s(eid))
        )

    async def _claim(self, p: int, part: _Partition) -> None:
        """Take over what earlier owners of this partition left pending, once it is idle enough."""
        stream = self.stream(p)
        summary = await self.r.xpending(stream, self.group)
        others = [c for c in summary.get("consumers") or [] if _s(c["name"]) != self.consumer_id]
        if any(int(c["pending"]) for c in others):
            start: Any = "0-0"
            while True:
                # (Not JUSTID: redis-py drops the cursor from that reply.)
                res: Any = await self.r.xautoclaim(
                    stream, self.group, self.consumer_id, int(self.claim_idle * 1000), start, 500
                )
                if len(res) > 2 and res[2]:
                    log.error("redis queue: pending entries %s of %s were deleted", res[2], stream)
                start = res[0]
                if _s(start) == "0-0":
                    break
            summary = await self.r.xpending(stream, self.group)
            others = [c for c in summary.get("consumers") or [] if _s(c["name"]) != self.consumer_id]
            if any(int(c["pending"]) for c in others):
                return  # not idle long enough yet: keep the partition blocked (order), retry later
        members: Any = await self.r.zrange(self._members_key, 0, -1)
        live = {_s(m) for m in members}
        for c in others:  # tidy: consumers that left with nothing pending
            if _s(c["name"]) not in live:
                await self.r.xgroup_delconsumer(stream, self.group, c["name"])
        part.buffer.clear()  # the re-read of our pending entries brings these again, in order
        part.state, part.cursor = "pel", "0"

    async def _read_pending(self, p: int, part: _Partition, count: int) -> None:
        """Re-read our own pending entries, in order, before any new one."""
        stream = self.stream(p)
        resp: Any = await self.r.xreadgroup(self.group, self.consumer_id, {stream: part.cursor}, count=count)
        entries: list[Any] = resp[0][1] if resp else []
        if not entries:
            part.state = "new"
            return
        counts: dict[str, int] = {}
        info: Any = await self.r.xpending_range(
            stream,
            self.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) + 10,
            consumername=self.consumer_id,
        )
        for row in info:
            counts[_s(row["message_id"])] = int(row["times_delivered"])
        gone = []
        for eid, fields in entries:
            if fields is None:
                gone.append(eid)
                log.error("redis queue: pending entry %s of %s was deleted from the stream", _s(eid), stream)
            self._buffer(p, part, eid, fields, counts.get(_s(eid), 2))
        if gone:
            await self.r.xack(stream, self.group, *gone)
        part.cursor = _s(entries[-1][0])

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        by_part: dict[int, list[str]] = {}
        for d in deliveries:
            by_part.setdefault(d.partition, []).append(d.handle)
        pipe = self.r.pipeline(transaction=False)
        for p, ids in by_part.items():
            pipe.xack(self.stream(p), self.group, *ids)
        counted = [self._attempt_field(d) for d in deliveries if d.delivery_count > 1]
        if counted:  # only redelivered messages may have an attempt count to forget
            pipe.hdel(self._attempts_key, *counted)
        try:
            await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None
        for p, ids in by_part.items():
            part = self._owned.get(p)
            if part is not None:
                for i in ids:
                    part.inflight.pop(i, None)
        await self._release_drained()

    async def _release_drained(self) -> None:
        """Hand over at once a partition we were giving up as soon as its last delivery is done."""
        done = [
            p
            for p, part in self._owned.items()
            if part.releasing and not part.inflight and p not in self._reading
        ]
        if done:
            with contextlib.suppress(RedisError, OSError):
                await self._release(done)
                self._changed.set()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(
            self.dlq_key,
            {
                b"k": delivery.key.encode(),
                b"v": delivery.value,
                b"reason": reason.encode(),
                b"partition": str(delivery.partition).encode(),
                b"entry": str(delivery.handle).encode(),
                b"failed_at": repr(time.time()).encode(),
            },
        )
        pipe.xack(self.stream(delivery.partition), self.group, delivery.handle)
        pipe.hdel(self._attempts_key, self._attempt_field(delivery))
        try:
            await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None
        part = self._owned.get(delivery.partition)
        if part is not None:
            part.inflight.pop(delivery.handle, None)
        await self._release_drained()

    @property
    def _attempts_key(self) -> str:
        return f"{self.prefix}:{self.group}:attempts"

    @staticmethod
    def _attempt_field(d: Delivery) -> str:
        return f"{d.partition}:{d.handle}"

    async def begin_attempt(self, delivery: Delivery) -> int:
        """A per-message count in one hash (`<prefix>:<group>:attempts`), removed on ack.

        Redis's own delivery counter (XPENDING) says a message was redelivered, but it also
        counts hand-outs that were never handled (a batch cut short), so it cannot tell which
        message of a batch killed the worker; this counts handlings begun one by one.
        """
        try:
            return int(await self.r.hincrby(self._attempts_key, self._attempt_field(delivery), 1))
        except (RedisError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None

    async def forget_attempt(self, delivery: Delivery) -> None:
        try:
            await self.r.hincrby(self._attempts_key, self._attempt_field(delivery), -1)
        except (RedisError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None

    # -- operations ----------------------------------------------------------------------------
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        try:
            entries: Any = await self.r.xrange(self.dlq_key, "-", "+", count=limit)
        except (RedisError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None
        out = []
        for eid, f in entries:
            out.append(
                DeadLetter(
                    id=_s(eid),
                    partition=letter_field(f.get(b"partition"), int, 0),
                    offset=letter_field(f.get(b"entry"), entry_offset, 0),
                    key=f.get(b"k", b"").decode(errors="replace"),
                    value=f.get(b"v", b""),
                    reason=f.get(b"reason", b"").decode(errors="replace"),
                    failed_at=letter_field(f.get(b"failed_at"), float, entry_offset(eid) / 1e9),
                )
            )
        return out

    async def replay_dead_letters(self, ids: Sequence[str] | None = None, *, publish: bool = True) -> int:
        replayed = 0
        try:
            if ids is None:
                # Replay what is dead-lettered *now*: letters a running worker dead-letters again
                # during this call (a still-poisonous record) wait for the next replay.
                last: Any = await self.r.xrevrange(self.dlq_key, "+", "-", count=1)
                if not last:
                    return 0
                end = _s(last[0][0])
                start = "-"
                while True:
                    chunk: Any = await self.r.xrange(self.dlq_key, start, end, count=500)
                    if not chunk:
                        break
                    replayed += await self._replay(chunk, publish)
                    start = "(" + _s(chunk[-1][0])
            else:
                # A dead letter's id is a stream entry id (`1764941129000-0`); anything else names
                # no letter (Redis would answer "Invalid stream ID", which is no outage).
                ids = [eid for eid in ids if _ENTRY_ID.fullmatch(eid)]
                for i in range(0, len(ids), 500):
                    pipe = self.r.pipeline(transaction=False)
                    for eid in ids[i : i + 500]:
                        pipe.xrange(self.dlq_key, eid, eid)
                    entries = [e[0] for e in await pipe.execute() if e]
                    replayed += await self._replay(entries, publish)
        except (RedisError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None
        return replayed

    async def _replay(self, entries: list[Any], publish: bool = True) -> int:
        if not publish:
            return int(await self.r.xdel(self.dlq_key, *[eid for eid, _ in entries])) if entries else 0
        args: list[Any] = [f"{self.prefix}:p"]
        for eid, f in entries:
            args += [eid, partition_for(f.get(b"k", b"").decode(errors="replace"), self.partitions)]
        return int(await self._scripts["replay"](keys=[self.dlq_key], args=args))

    async def _say_removed(self, partition: int) -> None:
        """Log, loudly, and count entries trimmed before this group read them (`XTRIM MAXLEN`
        by hand, `MAXLEN` on another producer; not an `XDEL` a read passed): the worker read
        on past the hole and said nothing, 30 of 30 records lost, and `llmtap status` showed
        them as waiting for good (outside check). `_REMOVED` counts them and marks them said,
        for every process."""
        stream = self.stream(partition)
        try:
            n, last = await self._scripts["removed"](keys=[stream], args=[self.group, _COUNT_CAP])
        except ResponseError as e:
            if _no_such_key(e) or "unknown" in str(e).lower():  # no stream yet; Redis before 7
                return
            raise
        if int(n) > 0:
            LOST.labels("redis").inc(int(n))
            log.error(
                "redis queue: %d record(s) of %s were removed (trimmed or deleted) before any worker "
                "of group %s read them, after entry %s: their logs are lost (never trim llmtap's "
                "streams by length: llmtap trims what every group has acknowledged)",
                int(n), stream, self.group, _s(last),
            )  # fmt: skip

    async def trim_partition(self, partition: int, exact: bool = False) -> int:
        """Drop entries every group has acked; never one still pending or not yet delivered.

        Returns how many entries were removed. Approximate trimming (the default) only drops
        whole internal nodes, which is cheaper; `exact` removes every acked entry.
        """
        stream = self.stream(partition)
        groups = await self.r.xinfo_groups(stream)
        if not groups:
            return 0  # nobody reads it yet: keep everything
        floor: tuple[int, int] | None = None
        for g in groups:
            cand = _parse_id(_next_id(g["last-delivered-id"]))
            if int(g["pending"]):
                oldest = (await self.r.xpending(stream, g["name"]))["min"]
                if oldest is not None:
                    cand = min(cand, _parse_id(oldest))
            floor = cand if floor is None else min(floor, cand)
        assert floor is not None
        return int(await self.r.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=not exact))

    async def status(self) -> QueueStatus:
        try:
            pipe = self.r.pipeline(transaction=False)
            for p in range(self.partitions):
                pipe.xinfo_groups(self.stream(p))
                pipe.get(self._lease_prefix + str(p))
            pipe.xlen(self.dlq_key)
            res = await pipe.execute(raise_on_error=False)
            for r in res:
                if isinstance(r, Exception) and not _no_such_key(r):
                    raise r
            out = QueueStatus(backend="redis", dead_letters=int(res[-1]))
            evicts = await self._evicting_policy()
            if evicts is not None:
                out.notes.append(
                    f"Redis evicts keys when full (maxmemory-policy {evicts}): records may vanish;"
                    " set maxmemory-policy noeviction"
                )
            for p in range(self.partitions):
                groups, owner = res[2 * p], res[2 * p + 1]
                if isinstance(groups, Exception):  # the stream is gone (evicted, or deleted by hand)
                    out.notes.append(
                        f"stream {self.stream(p)} is missing (evicted or deleted?): records in it are lost"
                    )
                    out.partitions.append(PartitionStatus(p, 0, _s(owner) if owner else None))
                    continue
                g = next((g for g in groups if _s(g["name"]) == self.group), None)
                if g is None:
                    lag = int(await self.r.xlen(self.stream(p)))
                else:
                    undelivered: Any = g.get("lag")
                    if undelivered is None:  # unknown after deletions: count what is left
                        rest: Any = await self.r.xrange(self.stream(p), _next_id(g["last-delivered-id"]), "+")
                        undelivered = len(rest)
                    lag = int(undelivered) + int(g["pending"])
                out.partitions.append(PartitionStatus(p, lag, _s(owner) if owner else None))
            return out
        except (RedisError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None


def _check_tls_files(query: dict[str, str], url: str) -> None:
    """A TLS file the URL names must be readable now: redis-py opens it on each connection
    attempt, so a missing CA read as an unreachable Redis and was waited out for ever."""
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key not in query:
            continue
        try:
            with open(query[key], "rb"):
                pass
        except OSError as e:
            raise ConfigError(
                f"invalid setting LLMTAP_QUEUE: {key} of {redact_dsn(url)!r} cannot be read: "
                f"{e.strerror or e}"
            ) from None


def _no_such_key(e: Exception) -> bool:
    return isinstance(e, ResponseError) and "no such key" in str(e).lower()
