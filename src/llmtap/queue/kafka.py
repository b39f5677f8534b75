"""Kafka queue (aiokafka): a partitioned topic, one consumer group, and a dead-letter topic.

Producer: idempotent (`acks=all`), batched with a small linger, records keyed and placed with
`partition_for` (the same key → partition rule as every other backend), so one key's records
stay in one partition, in publish order. `publish` hands the whole batch to the producer and
awaits every send future; errors and timeouts (a few seconds: an outage must be noticed while
the gateway still has room to buffer) become `BackendUnavailable`.

Consumer: group membership and partition assignment are Kafka's; offsets are committed by hand
and only over contiguous progress: the committed offset of a partition is its oldest delivered
but unacknowledged offset (or the one after the last delivery when all are acked), so an
unacknowledged record is never skipped. On a rebalance (a worker joins, leaves or dies) the
revoked partitions' in-flight deliveries get a short grace to be acked, progress is committed,
and the rest is dropped: the next owner starts from the committed offset, so a record is
redelivered rather than lost. Delivery is at least once; the idempotent store keeps exactly one
ROW per request id.

Dead letters go to `<topic>.dlq` (one partition, no retention limit) with their reason, source
partition/offset and time in headers. Which dead letters have been replayed is remembered as
the committed offset of the group `<group>-dlq-replay` on that topic (everything below it is
replayed) plus the replayed offsets above it in the commit's metadata, so nothing is replayed
twice and the dead-letter count stays right.

URL: `kafka://host:port[,host:port]/topic` with optional query parameters `partitions`
(of a topic llmtap creates), `replication` (default: min(3, brokers)), `compression`
(`zstd`/`lz4`/`gzip`/`none`; default zstd or lz4 when aiokafka has the codec, else none),
`session_timeout_ms` (a dead worker's partitions move after this; default 10000),
`request_timeout_ms` (outage detection; default 5000), `redeliver_after_ms` (a delivery
unacked this long is handed out again; default 60000) and `group` (the workers' consumer
group, default `llmtap-workers`: give each deployment on a shared cluster its own, or a worker
starting in one makes every other one's group rebalance). Managed Kafka: `security_protocol`
(`SSL`, `SASL_SSL`, `SASL_PLAINTEXT`), `sasl_mechanism` (`PLAIN`, `SCRAM-SHA-256`,
`SCRAM-SHA-512`) with the user and percent-encoded password in the URL's userinfo, and
`ssl_cafile` / `ssl_certfile` / `ssl_keyfile`; any other parameter is refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.codec import has_lz4, has_zstd
from aiokafka.conn import create_conn
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import OffsetAndMetadata

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

log = logging.getLogger("llmtap.queue.kafka")
#: How long aiokafka may go without a group coordinator before a consume says it is an outage
#: (a rebalance or a coordinator moving takes a second or two).
COORDINATOR_GRACE = 10.0

_METADATA_MAX = 3500  # below the broker's offset.metadata.max.bytes (4096 by default)


def default_compression() -> str | None:
    """zstd (best ratio for its speed) or lz4 when aiokafka has the codec (it needs cramjam).

    Without it: no compression. gzip is the only codec left and at aiokafka's fixed level 9 it
    would cost more CPU than the bytes it saves, since bodies already travel zstd-compressed.
    """
    if has_zstd():
        return "zstd"
    if has_lz4():
        return "lz4"
    return None


def _encode_offsets(offsets: Sequence[int]) -> str:
    """Sorted offsets as compact ranges: `3-7,9`."""
    out: list[str] = []
    it = sorted(set(offsets))
    i = 0
    while i < len(it):
        j = i
        while j + 1 < len(it) and it[j + 1] == it[j] + 1:
            j += 1
        out.append(str(it[i]) if i == j else f"{it[i]}-{it[j]}")
        i = j + 1
    return ",".join(out)


def _decode_offsets(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, (text or "").split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


_DAY_MS = 86_400_000
#: The URL's query parameters (anything else is refused: it used to be ignored).
_PARAMS = frozenset(
    {
        "partitions", "replication", "group", "compression", "session_timeout_ms",
        "request_timeout_ms", "redeliver_after_ms", "security_protocol", "sasl_mechanism",
        "ssl_cafile", "ssl_certfile", "ssl_keyfile",
    }
)  # fmt: skip
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _security(parts: SplitResult, query: dict[str, str]) -> dict[str, Any]:
    """aiokafka's TLS and SASL arguments from the URL: `kafka://user:password@host/topic?
    security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512&ssl_cafile=/ca.pem` (managed Kafka:
    MSK, Confluent Cloud, Aiven). The password is percent-encoded in the URL; a mistake is one
    sentence at start, never a connection made in plain text."""
    where = "invalid setting LLMTAP_QUEUE: "
    protocol = query.get("security_protocol", "").upper()
    user = unquote(parts.username) if parts.username else None
    if not protocol:
        if user is not None or "sasl_mechanism" in query:
            raise ConfigError(
                where + "a Kafka user and password need security_protocol=SASL_SSL (or SASL_PLAINTEXT)"
            )
        protocol = "SSL" if any(k.startswith("ssl_") for k in query) else "PLAINTEXT"
    if protocol not in _PROTOCOLS:
        raise ConfigError(
            where + f"security_protocol must be one of {', '.join(_PROTOCOLS)}, not {protocol!r}"
        )
    out: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        mechanism = query.get("sasl_mechanism", "PLAIN").upper()
        if mechanism not in _MECHANISMS:
            raise ConfigError(
                where + f"sasl_mechanism must be one of {', '.join(_MECHANISMS)}, not {mechanism!r}"
            )
        if user is None or parts.password is None:
            raise ConfigError(where + f"security_protocol={protocol} needs kafka://user:password@host/topic")
        out.update(
            sasl_mechanism=mechanism,
            sasl_plain_username=user,
            sasl_plain_password=unquote(parts.password),
        )
    elif user is not None:
        raise ConfigError(where + f"a Kafka user and password need a SASL security_protocol, not {protocol}")
    if protocol.endswith("SSL"):
        files = {}
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if key in query:
                path = query[key]
                if not os.access(path, os.R_OK) or os.path.isdir(path):
                    raise ConfigError(where + f"{key} {path!r} cannot be read")
                files[key.removeprefix("ssl_")] = path
        try:
            out["ssl_context"] = create_ssl_context(**files)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise ConfigError(where + f"the TLS files do not load: {e}") from None
    elif any(k.startswith("ssl_") for k in query):
        raise ConfigError(where + f"ssl_* parameters need security_protocol=SSL or SASL_SSL, not {protocol}")
    return out


#: What the broker (or the producer, against `max_request_size`) says of a message too large.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)


@dataclass(slots=True)
class _Assigned:
    """Progress of one partition in the current assignment."""

    epoch: int
    pending: dict[int, float] = field(default_factory=dict)  # delivered, unacked: offset -> when
    next_offset: int | None = None  # the offset after the last delivered record
    #: The offset the partition's next record should have (its commit, then each record's
    #: successor): a record beyond it means the broker removed those between, unread.
    expect: int | None = None
    handed: int = -1  # the offset after the last one ever handed out here (rewinds keep it)
    committed: int = -1
    mark: int = -1  # persisted: every offset below it was handed out before (maybe by the dead)
    attempt: tuple[int, int] | None = None  # persisted: (offset, handlings begun) of one record

    def metadata(self) -> str:
        """What rides along each commit of this partition (see `_parse_metadata`)."""
        out = f"d={self.mark}"
        if self.attempt is not None:
            out += f";a={self.attempt[0]}:{self.attempt[1]}"
        return out

    def commit_point(self) -> int | None:
        if self.pending:
            return min(self.pending)
        return self.next_offset


def _parse_metadata(text: str) -> tuple[int, tuple[int, int] | None]:
    """`d=<mark>;a=<offset>:<count>` from a commit's metadata; unknown parts are ignored."""
    mark, attempt = -1, None
    for part in (text or "").split(";"):
        k, _, v = part.partition("=")
        try:
            if k == "d":
                mark = int(v)
            elif k == "a":
                off, _, n = v.partition(":")
                attempt = (int(off), int(n))
        except ValueError:
            continue
    return mark, attempt


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, queue: KafkaQueue) -> None:
        self.queue = queue

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.queue._on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.queue._on_assigned({tp.partition for tp in assigned})


class KafkaQueue(Queue):
    """The `Queue` on Kafka, for scaled-out deployments."""

    def __init__(
        self,
        url: str,
        partitions: int,
        group: str,
        *,
        session_timeout: float | None = None,
        op_timeout: float | None = None,
        redeliver_after: float | None = None,
        revoke_grace: float = 5.0,
        compression: str | None = "default",
        linger_ms: int = 5,
    ) -> None:
        parts = urlsplit(url)
        topic = parts.path.strip("/")
        if parts.scheme != "kafka" or not parts.netloc or not topic or "/" in topic:
            raise ConfigError(
                f"invalid setting LLMTAP_QUEUE: {redact_dsn(url)!r} is not kafka://host:port[,host:port]/topic"
            )
        query = dict(parse_qsl(parts.query))
        unknown = sorted(set(query) - _PARAMS)
        if unknown:  # was ignored: `?security_protocol=SASL_SSL` connected in plain text, unauthenticated
            raise ConfigError(
                f"invalid setting LLMTAP_QUEUE: Kafka takes no URL parameter {unknown[0]!r} "
                f"(it takes {', '.join(sorted(_PARAMS))})"
            )
        security = _security(parts, query)
        try:
            self.partitions = int(query.get("partitions", partitions))
            self.replication = int(query["replication"]) if "replication" in query else None
            ms = {k: int(v) / 1000 for k, v in query.items() if k.endswith("_ms")}
        except ValueError:
            raise ConfigError(f"invalid setting LLMTAP_QUEUE: bad number in {redact_dsn(url)!r}") from None
        self.bootstrap = parts.netloc.rsplit("@", 1)[-1]
        self.topic = topic
        self.dlq_topic = f"{topic}.dlq"
        self.group = query.get("group", group)
        if not self.group or len(self.group) > 200:
            raise ConfigError(f"invalid setting LLMTAP_QUEUE: bad group in {redact_dsn(url)!r}")
        self.replay_group = f"{self.group}-dlq-replay"
        self.session_timeout = session_timeout or ms.get("session_timeout_ms", 10.0)
        self.op_timeout = op_timeout or ms.get("request_timeout_ms", 5.0)
        self.redeliver_after = redeliver_after or ms.get("redeliver_after_ms", 60.0)
        self.revoke_grace = revoke_grace
        self.linger_ms = linger_ms
        self.compression = default_compression() if compression == "default" else compression
        if "compression" in query:
            self.compression = None if query["compression"] == "none" else query["compression"]
        codecs = {"gzip": lambda: True, "lz4": has_lz4, "zstd": has_zstd}
        if self.compression is not None and not codecs.get(self.compression, lambda: False)():
            raise ConfigError(
                f"invalid setting LLMTAP_QUEUE: compression {self.compression!r} is not available "
                "(gzip always is; lz4 and zstd need the cramjam package)"
            )
        self.client_id = f"llmtap-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        #: What every client of this queue is made with: the brokers, and TLS and SASL if set.
        self._client_kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            **security,
        }
        self._sasl = security.get("sasl_mechanism")
        self.description = f"{redact_dsn(url)} (Kafka)"
        self._admin: AIOKafkaAdminClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._meta: AIOKafkaConsumer | None = None  # group-less, for offsets and the DLQ
        self._assigned: dict[int, _Assigned] = {}
        self._unmarked: set[int] = set()  # assigned without a committed offset: commit their start
        self._epoch = 0
        self._rebalancing = False
        self._acked = asyncio.Event()
        self._redelivered: dict[tuple[int, int], int] = {}
        self._producer_broken = False
        self._producer_lock = asyncio.Lock()
        self._no_coordinator_at: float | None = None  # since when (`_check_coordinator`)
        self._retiring: set[asyncio.Task[None]] = set()

    def _unavailable(self, e: BaseException) -> BackendUnavailable:
        if isinstance(e, KafkaConnectionError) and "bootstrap" in str(e):
            why = "no broker answered"
        elif isinstance(e, TimeoutError | KafkaTimeoutError):
            why = f"no answer within {self.op_timeout:g}s"
        else:
            why = str(e) or type(e).__name__
        return BackendUnavailable(f"cannot reach Kafka at {self.bootstrap}: {why}")

    def _check_coordinator(self, idle: bool) -> None:
        """An outage while aiokafka has no group coordinator for `COORDINATOR_GRACE` seconds:
        with the broker down, `getmany` returns nothing rather than failing, so a worker's
        `/healthz` said ok and its log said nothing for the whole outage (queue audit). Reads
        aiokafka's coordinator state; an aiokafka without it is never taken for an outage.

        Checked at every poll, raised only by an `idle` one (a poll that returned records is no
        outage): checked at empty polls only, a blip before a busy spell (a backlog draining)
        stayed on the clock, and the first empty poll after it was an outage at once (rev13)."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        if getattr(coordinator, "coordinator_id", 0) is not None:
            self._no_coordinator_at = None
            return
        now = time.monotonic()
        if self._no_coordinator_at is None:
            self._no_coordinator_at = now
        elif idle and now - self._no_coordinator_at >= COORDINATOR_GRACE:
            raise BackendUnavailable(
                f"cannot reach Kafka at {self.bootstrap}: no group coordinator for"
                f" {now - self._no_coordinator_at:.0f}s (the brokers are down or unreachable)"
            )

    # -- lifecycle -----------------------------------------------------------------------------
    async def connect(self, role: Role) -> None:
        try:
            self._admin = AIOKafkaAdminClient(
                **self._client_kw,
                request_timeout_ms=int(self.op_timeout * 1000),
            )
            await asyncio.wait_for(self._admin.start(), self.op_timeout)
            await asyncio.wait_for(self._ensure_topics(create=role != "inspect"), self.op_timeout * 3)
            await self._start_producer()
            if role in ("consumer", "both"):
                self._consumer = AIOKafkaConsumer(
                    **self._client_kw,
                    group_id=self.group,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    session_timeout_ms=int(self.session_timeout * 1000),
                    heartbeat_interval_ms=int(self.session_timeout * 1000 / 3),
                    request_timeout_ms=max(
                        int(self.op_timeout * 1000), int(self.session_timeout * 1000) + 5000
                    ),
                    fetch_max_wait_ms=100,
                    max_partition_fetch_bytes=4 * 1024 * 1024,
                )
                await asyncio.wait_for(self._consumer.start(), self.op_timeout)
                # Subscribing after start: joining the group may wait for a rebalance (others
                # finishing their batches), which `consume` can wait for, `connect` should not.
                self._consumer.subscribe([self.topic], listener=_Rebalance(self))
                LOST.labels("kafka")  # at 0 from the start: `increase()` sees the first loss
        except QueueMissing:
            await self.close()
            raise
        except (KafkaError, OSError, TimeoutError) as e:
            await self.close()
            await self._check_hosts()  # aiokafka's "unable to bootstrap" hides a mistyped host
            await self._check_login(e)  # ... and a login the broker refused
            raise self._unavailable(e) from None

    async def _check_login(self, e: BaseException) -> None:
        """`ConfigError` when the broker refused the SASL login (a wrong password, a mechanism
        it does not enable): aiokafka only logs that and reports "unable to bootstrap", which
        read as an outage and was waited out for ever."""
        if self._sasl is None:
            return
        if not isinstance(e, SaslAuthenticationFailed | UnsupportedSaslMechanismError):
            host, _, port = self.bootstrap.split(",")[0].strip().rpartition(":")
            kw = {k: v for k, v in self._client_kw.items() if k != "bootstrap_servers"}
            try:
                conn = await asyncio.wait_for(
                    create_conn(
                        host.strip("[]"),
                        int(port or 9092),
                        request_timeout_ms=int(self.op_timeout * 1000),
                        **kw,
                    ),
                    self.op_timeout,
                )
            except (SaslAuthenticationFailed, UnsupportedSaslMechanismError) as refused:
                e = refused
            except Exception:  # unreachable, or anything else: the outage it looks like
                return
            else:
                conn.close()
                return
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"invalid setting LLMTAP_QUEUE: Kafka at {self.bootstrap} refused the {self._sasl} login ({why})"
        ) from None

    async def _check_hosts(self) -> None:
        """`ConfigError` when a bootstrap host is a name the DNS does not know."""
        loop = asyncio.get_running_loop()
        for server in self.bootstrap.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                await loop.getaddrinfo(host.strip("[]") or server, port or None)
            except OSError as e:
                if unknown_host(e):
                    raise ConfigError(
                        f"invalid setting LLMTAP_QUEUE: unknown host {host!r} in {self.description}"
                    ) from None

    async def _ensure_topics(self, create: bool = True) -> None:
        """Create the topic (with `partitions`) and its dead-letter topic when missing (without
        `create`: raise `QueueMissing` instead)."""
        assert self._admin is not None
        # Describe only topics that exist: a metadata request naming a missing topic makes a
        # broker with auto.create.topics.enable create it, with its default partition count.
        existing = set(await self._admin.list_topics()) & {self.topic, self.dlq_topic}
        if not create and self.topic not in existing:
            raise QueueMissing(
                f"no topic {self.topic!r} at {self.bootstrap}: nothing was published to it yet,"
                " or LLMTAP_QUEUE names another"
            )
        described = await self._admin.describe_topics(sorted(existing)) if existing else []
        meta = {t["topic"]: t for t in described}
        replication = self.replication
        if replication is None:
            brokers = (await self._admin.describe_cluster())["brokers"]
            replication = min(3, len(brokers))
        wanted = []
        for name, n, configs in (
            (self.topic, self.partitions, {}),
            (self.dlq_topic, 1, {"retention.ms": "-1"}),  # dead letters wait for a human
        ):
            t = meta.get(name)
            if t is not None and t["error_code"] == 0 and t["partitions"]:
                if name == self.topic and len(t["partitions"]) != self.partitions:
                    log.warning(
                        "topic %s has %d partitions (created so), not %d; using them all",
                        name,
                        len(t["partitions"]),
                        self.partitions,
                    )
                    self.partitions = len(t["partitions"])
                continue
            if create:
                wanted.append(NewTopic(name, n, replication, topic_configs=configs))
        if self.topic in existing and create:  # `status` and `dlq` still show a compacted one
            await self._check_topic_configs()
        if wanted:
            resp = await self._admin.create_topics(wanted)
            for name, code, *rest in resp.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    msg = rest[0] if rest and rest[0] else f"error code {code}"
                    raise ConfigError(f"cannot create Kafka topic {name}: {msg}")
            # Wait for partition leaders, so the first publish does not bounce off a new topic.
            names = [t.name for t in wanted]
            while True:
                described = await self._admin.describe_topics(names)
                if all(
                    t["error_code"] == 0
                    and t["partitions"]
                    and all(p["leader"] >= 0 for p in t["partitions"])
                    for t in described
                ):
                    break
                await asyncio.sleep(0.05)

    async def _check_topic_configs(self) -> None:
        """Refuse a compacted topic (Kafka keeps only the newest record of each key, here a
        session's: every other record of it vanishes unread) and warn of a retention shorter
        than a day (a worker or store outage longer than it loses logs)."""
        assert self._admin is not None
        try:
            found = await self._admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, self.topic)])
            configs = {c[0]: c[1] for c in found[0].resources[0][4]}
        except Exception as e:  # only a check: an ACL without DescribeConfigs is no reason to stop
            log.info("kafka queue: cannot read the configs of topic %s (%s); not checked", self.topic, e)
            return
        if "compact" in (configs.get("cleanup.policy") or ""):
            raise ConfigError(
                f"invalid setting LLMTAP_QUEUE: topic {self.topic!r} has cleanup.policy="
                f"{configs['cleanup.policy']}: Kafka would keep only the newest record of each session "
                "and the others' logs would vanish unread; use cleanup.policy=delete"
            )
        try:
            retention_ms = int(configs.get("retention.ms") or -1)
        except ValueError:
            return
        if 0 <= retention_ms < _DAY_MS:
            log.warning(
                "kafka queue: topic %s keeps records %g s (retention.ms=%d): a worker or store outage "
                "longer than that loses their logs; a week (604800000) is safer",
                self.topic,
                retention_ms / 1000,
                retention_ms,
            )

    def _retire(self, producer: AIOKafkaProducer) -> None:
        """Stop an old producer in the background, to the end: cancelling `stop()` half-way
        leaves its client retrying metadata forever (a leak seen in the outage benchmark)."""

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await producer.stop()

        task = asyncio.get_running_loop().create_task(stop())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _start_producer(self) -> None:
        producer = AIOKafkaProducer(
            **self._client_kw,
            enable_idempotence=True,
            linger_ms=self.linger_ms,
            compression_type=self.compression,
            max_batch_size=512 * 1024,
            max_request_size=4 * 1024 * 1024,
            request_timeout_ms=int(self.op_timeout * 1000),
            retry_backoff_ms=50,
        )
        try:
            await asyncio.wait_for(producer.start(), self.op_timeout)
        except BaseException:
            self._retire(producer)
            raise
        self._producer = producer
        self._producer_broken = False

    async def close(self) -> None:
        if self._consumer is not None:
            # Commit what was acked; what was not is redelivered to the next owner.
            await bounded(self._commit(set(self._assigned)), self.op_timeout, "kafka queue: final commit")
            await bounded(self._consumer.stop(), self.op_timeout * 2, "kafka queue: consumer stop")
        for c in (self._producer, self._meta, self._admin):
            if c is not None:
                stop = c.stop() if not isinstance(c, AIOKafkaAdminClient) else c.close()
                await bounded(stop, 5, f"kafka queue: {type(c).__name__} stop")
        self._consumer = self._producer = self._meta = self._admin = None
        self._assigned.clear()
        if self._retiring:  # old producers still stopping: give them a moment to finish
            await asyncio.wait(set(self._retiring), timeout=5)

    # -- producer ------------------------------------------------------------------------------
    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        await self._send(self.topic, [(m.key, m.value, None) for m in messages])

    async def _send(
        self, topic: str, records: Sequence[tuple[str, bytes, list[tuple[str, bytes]] | None]]
    ) -> None:
        """Hand every record to the producer (it batches them), then await all their acks."""
        futures: list[asyncio.Future[Any]] = []
        try:
            # One (re)start at a time: the publisher and the spool replayer both send, and two
            # racing restarts would each replace the producer, leaking the other's.
            async with self._producer_lock:
                if self._producer is None or self._producer_broken:
                    if self._producer is not None:
                        self._retire(self._producer)
                    self._producer = None
                    await self._start_producer()
            producer = self._producer
            assert producer is not None
            n = self.partitions if topic == self.topic else 1
            async with asyncio.timeout(self.op_timeout):
                for key, value, headers in records:
                    fut = await producer.send(
                        topic, value, key=key.encode(), partition=partition_for(key, n), headers=headers
                    )
                    futures.append(fut)
                for fut in futures:  # in order; most are done by the time their turn comes
                    await fut
        except (KafkaError, OSError, TimeoutError) as e:
            # After expired batches an idempotent producer's sequence numbers are in doubt:
            # start a fresh one (a new producer id) for the next batch.
            self._producer_broken = True
            for f in futures:  # fail later, unobserved: retrieve so asyncio does not log them
                f.add_done_callback(lambda f: f.cancelled() or f.exception())
            if isinstance(e, _TOO_LARGE):
                # The record, not the broker: an outage would keep it (and every record spooled
                # after it) waiting forever. Refused, the sender splits the batch down to it.
                size = max((len(v) for _, v, _ in records), default=0)
                raise MessageRefused(
                    f"Kafka topic {topic} refused a message as too large ({type(e).__name__}; "
                    f"the largest of the batch is {size} bytes)"
                ) from None
            raise self._unavailable(e) from None

    # -- consumer ------------------------------------------------------------------------------
    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaQueue is not connected as a consumer")
        return self._consumer

    def owned_partitions(self) -> list[int]:
        """Partitions assigned to this consumer now (for tests and status)."""
        return sorted(self._assigned)

    async def _on_revoked(self, revoked: set[int]) -> None:
        self._rebalancing = True
        mine = revoked & set(self._assigned)
        # Give in-flight deliveries a moment to be acked: fewer duplicates, and the next owner
        # does not overtake records still being processed here.
        deadline = time.monotonic() + self.revoke_grace
        while any(self._assigned[p].pending for p in mine) and time.monotonic() < deadline:
            self._acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), deadline - time.monotonic())
        try:
            await asyncio.wait_for(self._commit(mine, force=True), self.op_timeout)
        except Exception as e:
            log.warning("kafka queue: commit before rebalance failed (records will be redelivered): %s", e)
        for p in mine:
            del self._assigned[p]

    def _say_lost(self, partition: int, first: int, upto: int) -> None:
        """Log, loudly, and count records the broker removed (offsets `first`..`upto - 1`)."""
        LOST.labels("kafka").inc(upto - first)
        log.error(
            "kafka queue: %d record(s) of %s partition %d (offsets %d-%d) were removed by the "
            "topic's retention before any worker stored them: their logs are lost "
            "(raise retention.ms on the topic above your longest worker or store outage)",
            upto - first,
            self.topic,
            partition,
            first,
            upto - 1,
        )

    async def _say_expired(self, committed: dict[TopicPartition, Any], fresh: dict[int, _Assigned]) -> None:
        """Log, loudly, records the topic's retention removed before any worker stored them, and
        set where each partition's next record is expected (`_Assigned.expect`).

        The consumer then starts at the oldest record left (`auto_offset_reset`) and says
        nothing: a worker (or store) outage longer than `retention.ms` cost those logs. A
        partition the group never committed starts at its oldest record, which is committed at
        once: a later loss there is measured from it, not passed over for want of a commit."""
        try:
            meta = await self._meta_consumer()
            begin = await meta.beginning_offsets(list(committed))
        except Exception:  # only a diagnosis: the assignment goes on without it
            return
        unmarked: set[int] = set()
        for tp, om in committed.items():
            st = fresh.get(tp.partition)
            if st is None:
                continue
            if om is None or om.offset < 0:
                st.expect = st.next_offset = begin.get(tp, 0)
                unmarked.add(tp.partition)
                if st.expect > 0:
                    log.error(
                        "kafka queue: %s partition %d has no committed offset for group %s and starts at "
                        "offset %d: records 0-%d were removed by the topic's retention before this group "
                        "read them (lost, unless another group stored them; or the group's offsets "
                        "expired: offsets.retention.minutes)",
                        self.topic,
                        tp.partition,
                        self.group,
                        st.expect,
                        st.expect - 1,
                    )
                continue
            st.expect = max(om.offset, begin.get(tp, 0))  # a loss said here is not said again
            if begin.get(tp, 0) > om.offset:
                self._say_lost(tp.partition, om.offset, begin[tp])
        self._unmarked = unmarked

    async def _on_assigned(self, assigned: set[int]) -> None:
        self._epoch += 1
        # A new Assignment restarts every partition from its committed offset.
        fresh = {p: _Assigned(self._epoch) for p in assigned}
        # ...and from what the commit's metadata remembers: how far earlier owners handed out,
        # and a record's count of handlings begun (a worker process that died mid-record).
        if assigned and self._admin is not None:
            tps = [TopicPartition(self.topic, p) for p in assigned]
            try:
                got = await asyncio.wait_for(
                    self._admin.list_consumer_group_offsets(self.group, partitions=tps), self.op_timeout
                )
                for tp, om in got.items():
                    if tp.partition in fresh and om is not None and om.offset >= 0:
                        fresh[tp.partition].mark, fresh[tp.partition].attempt = _parse_metadata(om.metadata)
            except Exception as e:  # the counts restart: a crashing record takes longer to isolate
                log.warning("kafka queue: cannot read delivery marks (%s); counting afresh", e)
            else:
                await self._say_expired(got, fresh)
        self._assigned = fresh
        self._rebalancing = False
        unmarked, self._unmarked = self._unmarked & set(fresh), set()
        if unmarked:
            try:
                await asyncio.wait_for(self._commit(unmarked, force=True), self.op_timeout)
            except Exception as e:  # committed with its first record instead
                log.warning("kafka queue: cannot commit the start of partitions %s: %s", sorted(unmarked), e)
        log.info("kafka queue %s: assigned partitions %s", self.topic, sorted(assigned))

    async def consume(self, max_messages: int, timeout: float) -> list[Delivery]:
        consumer = self.consumer
        self._rewind_stale()
        try:
            data = await consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_messages)
        except KafkaError as e:
            raise self._unavailable(e) from None
        self._check_coordinator(idle=not data)
        now = time.monotonic()
        out: list[Delivery] = []
        records: list[ConsumerRecord[bytes, bytes]]
        for tp, records in data.items():
            st = self._assigned.get(tp.partition)
            if st is not None and records and st.expect is not None and records[0].offset > st.expect:
                # aiokafka met an offset the retention (or compaction) had removed and went on
                # from the oldest record left (`auto_offset_reset`) without a word. Records this
                # consumer handed out before (a rewind of a hung batch) may still be stored by
                # that handling: said apart, not counted.
                held = min(max(st.handed, st.expect), records[0].offset)
                if held > st.expect:
                    log.warning(
                        "kafka queue: %s partition %d offsets %d-%d were removed by the topic's retention "
                        "while a worker still handled them: lost unless that handling stores them",
                        self.topic, tp.partition, st.expect, held - 1,
                    )  # fmt: skip
                if records[0].offset > held:
                    self._say_lost(tp.partition, held, records[0].offset)
            if st is None:
                # aiokafka fetches a new assignment before our listener has set it up: these
                # come again from here once it has. Dropped instead, a later commit would
                # pass over them: lost.
                if records:
                    with contextlib.suppress(IllegalStateError):  # no longer ours: fine too
                        consumer.seek(tp, records[0].offset)
                continue
            for r in records:
                st.pending[r.offset] = now
                st.next_offset = st.expect = r.offset + 1
                st.handed = max(st.handed, st.expect)
                count = self._redelivered.get((tp.partition, r.offset), 0) + 1
                if r.offset < st.mark:
                    count = max(count, 2)  # handed out before, maybe by a process that died
                out.append(
                    Delivery(
                        tp.partition,
                        r.offset,
                        (r.key or b"").decode(errors="replace"),
                        r.value or b"",
                        delivery_count=count,
                        handle=st.epoch,
                    )
                )
        await self._persist_marks(out)
        return out

    async def _persist_marks(self, out: list[Delivery]) -> None:
        """Commit how far each partition is handed out (in the commit's metadata) before the
        deliveries leave: if this process dies handling them, the next owner sees them as
        redelivered. Kafka keeps no delivery count; the group's committed offsets are its
        compacted, replicated side store, so this costs one commit per fetch and no topic."""
        ends: dict[int, int] = {}
        for d in out:
            ends[d.partition] = max(ends.get(d.partition, -1), d.offset + 1)
        moved = {p: e for p, e in ends.items() if p in self._assigned and e > self._assigned[p].mark}
        if not moved:
            return
        old = {p: self._assigned[p].mark for p in moved}
        for p, e in moved.items():
            self._assigned[p].mark = e
        try:
            await self._commit(set(moved), force=True)
        except BackendUnavailable:
            # Not persisted: take these deliveries back (they come again once Kafka answers).
            for p in moved:
                st = self._assigned.get(p)
                if st is None:
                    continue
                st.mark = old[p]
                first = min((d.offset for d in out if d.partition == p), default=None)
                if first is not None:
                    for off in [o for o in st.pending if o >= first]:
                        del st.pending[off]
                    st.next_offset = st.expect = first
                    self.consumer.seek(TopicPartition(self.topic, p), first)
            out.clear()
            raise

    def _rewind_stale(self) -> None:
        """Deliveries unacked for `redeliver_after` are handed out again, from the oldest one."""
        now = time.monotonic()
        for p, st in self._assigned.items():
            if st.pending and now - min(st.pending.values()) > self.redeliver_after:
                first = min(st.pending)
                for off in st.pending:
                    self._redelivered[(p, off)] = self._redelivered.get((p, off), 0) + 1
                if len(self._redelivered) > 100_000:
                    self._redelivered.clear()
                self.consumer.seek(TopicPartition(self.topic, p), first)
                st.pending.clear()
                st.next_offset = st.expect = first

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        touched = set()
        for d in deliveries:
            st = self._assigned.get(d.partition)
            if st is None or st.epoch != d.handle:
                continue  # from an earlier assignment: the partition restarted from its commit
            st.pending.pop(d.offset, None)
            if st.attempt is not None and st.attempt[0] == d.offset:
                st.attempt = None  # done: the count is not needed any more
            touched.add(d.partition)
        self._acked.set()
        if touched and not self._rebalancing:  # while rebalancing the listener commits
            await self._commit(touched)

    async def _commit(self, partitions: set[int], force: bool = False) -> None:
        """Commit progress (and the delivery marks riding in the metadata); `force` commits
        even when the offset did not move, for the marks."""
        offsets = {}
        for p in partitions:
            st = self._assigned.get(p)
            point = st.commit_point() if st is not None else None
            if st is not None and point is not None and (point > st.committed or force):
                offsets[TopicPartition(self.topic, p)] = (st, point)
        if not offsets:
            return
        try:
            await asyncio.wait_for(
                self.consumer.commit(
                    {tp: OffsetAndMetadata(point, st.metadata()) for tp, (st, point) in offsets.items()}
                ),
                self.op_timeout,
            )
        except (CommitFailedError, IllegalStateError) as e:
            # The group moved on: these partitions are someone else's and restart from the last
            # commit there, so the records are redelivered, not lost.
            log.info("kafka queue: commit skipped after a rebalance: %s", e)
            return
        except (KafkaError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None
        for st, point in offsets.values():
            st.committed = max(st.committed, point)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = [
            ("reason", reason.encode()),
            ("partition", str(delivery.partition).encode()),
            ("offset", str(delivery.offset).encode()),
            ("failed_at", repr(time.time()).encode()),
        ]
        await self._send(self.dlq_topic, [(delivery.key, delivery.value, headers)])
        await self.ack([delivery])

    async def begin_attempt(self, delivery: Delivery) -> int:
        """Count in the partition's commit metadata (`a=<offset>:<n>`); committed before the
        handling begins, so a process that dies in it leaves the count behind."""
        st = self._assigned.get(delivery.partition)
        if st is None or st.epoch != delivery.handle:
            return delivery.delivery_count  # no longer ours: its ack would be ignored anyway
        before = st.attempt[1] if st.attempt is not None and st.attempt[0] == delivery.offset else 0
        st.attempt = (delivery.offset, before + 1)
        await self._commit({delivery.partition}, force=True)
        return before + 1

    async def forget_attempt(self, delivery: Delivery) -> None:
        st = self._assigned.get(delivery.partition)
        if st is not None and st.attempt is not None and st.attempt[0] == delivery.offset:
            st.attempt = (delivery.offset, max(0, st.attempt[1] - 1))
            await self._commit({delivery.partition}, force=True)

    # -- operations ----------------------------------------------------------------------------
    async def _meta_consumer(self) -> AIOKafkaConsumer:
        if self._meta is None:
            meta = AIOKafkaConsumer(
                **self._client_kw,
                group_id=None,
                enable_auto_commit=False,
                request_timeout_ms=int(self.op_timeout * 1000),
            )
            await asyncio.wait_for(meta.start(), self.op_timeout)
            self._meta = meta
        return self._meta

    async def _replay_state(self) -> tuple[int, set[int], int, int]:
        """(watermark, replayed offsets above it, DLQ start offset, DLQ end offset)."""
        assert self._admin is not None
        tp = TopicPartition(self.dlq_topic, 0)
        meta = await self._meta_consumer()
        begin = (await meta.beginning_offsets([tp]))[tp]
        end = (await meta.end_offsets([tp]))[tp]
        got = await self._admin.list_consumer_group_offsets(self.replay_group, partitions=[tp])
        mark = got.get(tp)
        watermark, replayed = begin, set()
        if mark is not None and mark.offset >= 0:
            watermark = max(begin, mark.offset)
            replayed = {o for o in _decode_offsets(mark.metadata) if o >= watermark}
        return watermark, replayed, begin, end

    async def _read_dlq(
        self,
        start: int,
        end: int,
        limit: int | None,
        skip: set[int],
        copies: dict[str, list[int]] | None = None,
    ) -> list[DeadLetter]:
        """Dead letters with offsets in [start, end), oldest first, without the `skip` ones.

        A letter is written before its message's commit; a commit that failed (or a rebalance in
        between) has the message dead-lettered again. Letters of the same source partition and
        offset are one delivery: the first is listed (and replayed), its copies passed over
        (`copies`: the first's id -> the copies' offsets, to be marked replayed with it)."""
        out: list[DeadLetter] = []
        sources: dict[tuple[int, int], str] = {}
        if start >= end:
            return out
        reader = AIOKafkaConsumer(
            **self._client_kw,
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=int(self.op_timeout * 1000),
        )
        await asyncio.wait_for(reader.start(), self.op_timeout)
        try:
            tp = TopicPartition(self.dlq_topic, 0)
            reader.assign([tp])
            reader.seek(tp, start)
            deadline = time.monotonic() + self.op_timeout * 2
            position = start
            while position < end and (limit is None or len(out) < limit):
                if time.monotonic() > deadline:
                    raise TimeoutError("reading the dead-letter topic timed out")
                batch = await reader.getmany(tp, timeout_ms=500, max_records=1000)
                for r in batch.get(tp, []):
                    position = r.offset + 1
                    if r.offset >= end:
                        break
                    h = {k: v.decode(errors="replace") for k, v in r.headers}
                    source = (
                        letter_field(h.get("partition"), int, None),
                        letter_field(h.get("offset"), int, None),
                    )
                    if source[0] is not None and source[1] is not None:
                        first = sources.get((source[0], source[1]))
                        if first is not None:
                            if copies is not None:
                                copies.setdefault(first, []).append(r.offset)
                            continue
                        sources[(source[0], source[1])] = str(r.offset)
                    if r.offset in skip:  # replayed already (its copies with it)
                        continue
                    out.append(
                        DeadLetter(
                            id=str(r.offset),
                            partition=source[0] or 0,
                            offset=source[1] or 0,
                            key=(r.key or b"").decode(errors="replace"),
                            value=r.value or b"",
                            reason=h.get("reason", ""),
                            failed_at=letter_field(h.get("failed_at"), float, r.timestamp / 1000),
                        )
                    )
                    if limit is not None and len(out) >= limit:
                        break
        finally:
            with contextlib.suppress(Exception):
                await reader.stop()
        return out

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        try:
            watermark, replayed, _, end = await self._replay_state()
            return await self._read_dlq(watermark, end, limit, replayed)
        except (KafkaError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None

    async def replay_dead_letters(self, ids: Sequence[str] | None = None, *, publish: bool = True) -> int:
        try:
            watermark, replayed, _, end = await self._replay_state()
            copies: dict[str, list[int]] = {}
            letters = await self._read_dlq(watermark, end, None, replayed, copies)
            wanted = set(ids) if ids is not None else None
            chosen = [d for d in letters if wanted is None or d.id in wanted]
            if not chosen:
                return 0
            if publish:
                await self._send(self.topic, [(d.key, d.value, None) for d in chosen])
            # Remember what was replayed (discarded: the same; the topic keeps its bytes until
            # its retention.ms, unlisted) (and the copies of it): the watermark passes every
            # replayed (or vanished) offset from its old place up to the first letter waiting.
            done = replayed | {int(d.id) for d in chosen}
            done |= {o for d in chosen for o in copies.get(d.id, ())}
            waiting = sorted(int(d.id) for d in letters if int(d.id) not in done)
            new_mark = waiting[0] if waiting else end
            above = _encode_offsets([o for o in done if o >= new_mark])
            if len(above) > _METADATA_MAX:
                raise BackendUnavailable(
                    "too many dead letters replayed out of order to remember; replay them all instead"
                )
            await self._commit_replay_mark(new_mark, above)
            return len(chosen)
        except (KafkaError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None

    async def _commit_replay_mark(self, offset: int, metadata: str) -> None:
        marker = AIOKafkaConsumer(
            **self._client_kw,
            group_id=self.replay_group,
            enable_auto_commit=False,
            request_timeout_ms=int(self.op_timeout * 1000),
        )
        await asyncio.wait_for(marker.start(), self.op_timeout)
        try:
            tp = TopicPartition(self.dlq_topic, 0)
            marker.assign([tp])
            await asyncio.wait_for(marker.commit({tp: OffsetAndMetadata(offset, metadata)}), self.op_timeout)
        finally:
            with contextlib.suppress(Exception):
                await marker.stop()

    async def status(self) -> QueueStatus:
        assert self._admin is not None
        try:
            meta = await self._meta_consumer()
            tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            begin = await meta.beginning_offsets(tps)
            end = await meta.end_offsets(tps)
            committed = await self._admin.list_consumer_group_offsets(self.group, partitions=tps)
            watermark, replayed, _, dlq_end = await self._replay_state()
            owners = await self._group_owners()
        except (KafkaError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None
        out = QueueStatus(backend="kafka", dead_letters=max(0, dlq_end - watermark - len(replayed)))
        for tp in tps:
            c = committed.get(tp)
            start = c.offset if c is not None and c.offset >= 0 else begin[tp]
            if start < begin[tp]:  # removed by retention, never stored: no longer waiting
                out.notes.append(
                    f"partition {tp.partition}: {begin[tp] - start} record(s) removed by the topic's "
                    "retention before any worker stored them (lost; raise retention.ms)"
                )
                start = begin[tp]
            owner = owners.get(tp.partition)
            if owner is None and tp.partition in self._assigned:
                owner = self.client_id
            out.partitions.append(PartitionStatus(tp.partition, max(0, end[tp] - start), owner))
        return out

    async def _group_owners(self) -> dict[int, str]:
        """partition → the client id of the group member the broker assigned it to.

        The group coordinator knows every worker's assignment; `llmtap status` runs in a process
        of its own, so its own assignment (none) says nothing about who consumes.
        """
        assert self._admin is not None
        try:
            described = await asyncio.wait_for(
                self._admin.describe_consumer_groups([self.group]), self.op_timeout
            )
        except KafkaError:
            return {}  # e.g. the group was never created: nobody owns anything
        owners: dict[int, str] = {}
        for response in described:
            for group in response.groups:
                for member in group[5]:
                    client_id, assignment = member[-4], member[-1]  # v4 adds a field after the id
                    if not assignment:
                        continue  # joined, not yet assigned (a rebalance in progress)
                    for topic, partitions in ConsumerProtocolMemberAssignment.decode(assignment).assignment:
                        if topic == self.topic:
                            owners.update(dict.fromkeys(partitions, client_id))
        return owners
