"""Amazon SQS queue (aiobotocore): a FIFO queue for order per partition, or a standard queue.

FIFO queues (`name.fifo`) give the contract's order: every message carries `MessageGroupId` =
its partition key's partition (`p<N>` of `LLMTAP_PARTITIONS`), and SQS hands out nothing more of
a group while a message of it is in flight (received, not yet deleted or visible again), so a
partition's records are processed in publish order whichever worker receives them. Workers need
no partition assignment: any worker takes any group that is free. A group hands out at most 10
records per receive and then waits for their deletion, so the partitions are the parallelism:
raise `LLMTAP_PARTITIONS` for more (the same value on every gateway).
`MessageDeduplicationId` is a hash of the tenant and request id (SQS drops a repeat within its
5-minute window; the store's one-row-per-id rule holds beyond it).

Standard queues work too, but SQS orders them best-effort only (and may deliver twice even
without a crash); that is said at start-up, in the queue's description and in `llmtap status`.

Publishing: `SendMessageBatch`, at most 10 entries and `MaximumMessageSize` bytes (the queue's
own limit, 256 KiB unless set otherwise) per request. On a FIFO queue one group's messages are
sent by one sequence of requests, each awaited before the next, so concurrency never reorders
them; different groups go in parallel. A message over the limit (bodies above the inline limit
are in the body store, or wait in the gateway's spool while it is down: `bodies.offload`; this
is three bodies just under it, or a huge `LLMTAP_INLINE_BODY_BYTES`) is refused with
`MessageRefused` before anything of the batch is sent, so the gateway's next sink (the ingest
endpoint, then the spool) takes the whole batch.

Consuming: long polling (`WaitTimeSeconds`), several receives per `consume` up to the batch
size. Received messages stay invisible while held: a background task renews their visibility
timeout (`ChangeMessageVisibilityBatch`) until they are acked (deleted only after the handler
chain succeeded), dead-lettered, or released at `close` (visible again at once). Whatever a
`consume` received is handed out, even when another of its receives failed; if the call itself
fails or is cancelled, what it had received is released, never held unseen (that blocked a
message group for as long as the worker lived). A consumer that dies stops renewing, so its
messages come back after `visibility_timeout` seconds: that is the takeover.

Dead letters: llmtap's own dead-letter queue `<name>-dlq` (`<name>-dlq.fifo`) holds them, with
the reason, source offset and time as message attributes. The main queue is created with a
redrive policy to the same queue (`maxReceiveCount`, default 10): a message that makes the
worker process crash again and again is moved there by SQS itself (its reason then says so).
Listing dead letters receives them and makes them visible again; replaying publishes them to the
main queue (a fresh deduplication id) and deletes them. Each replay marks what it published, so
letters that fail again during the replay are not replayed twice by it.

URL: `sqs://<queue-name>` with optional query parameters `endpoint` (an SQS-compatible server;
else `AWS_ENDPOINT_URL_SQS`), `region` (else the AWS configuration chain), `visibility_timeout`
(seconds; default 30), `max_receives` (the redrive policy of a queue llmtap creates; default 10)
and `wait_seconds` (the longest long poll; default 20). Credentials come from the standard AWS
chain (environment, config files, instance or task role).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from llmtap.errors import BackendUnavailable, ConfigError, MessageRefused, QueueMissing, unknown_host
from llmtap.queue.base import (
    DeadLetter,
    Delivery,
    Message,
    Queue,
    QueueStatus,
    Role,
    bounded,
    letter_field,
    partition_for,
)
from llmtap.redact import redact_dsn, redact_text

log = logging.getLogger("llmtap.queue.sqs")

T = TypeVar("T")

DEFAULT_MAX_BYTES = 256 * 1024
_BATCH = 10  # SQS's entries per batch request
_FIFO_LANES = 16  # parallel request sequences per publish on a FIFO queue
_CONCURRENCY = 16  # requests in flight per operation
_RETENTION = str(14 * 24 * 3600)  # SQS's maximum: logs may wait out a long store outage
_RETENTION_WARN = 7 * 24 * 3600  # less than a week kept: said at start
_CHECKED = ("MaximumMessageSize", "RedrivePolicy", "MessageRetentionPeriod")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
# Characters SQS accepts in a message body or string attribute (XML 1.0's).
_BAD_CHARS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_MISSING = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
#: Seconds between two attempts to create a queue deleted while running again: each process
#: tries at most this often, however many of its requests meet the missing queue.
_RECREATE_EVERY = 5.0
_DENIED = ("AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "UnrecognizedClientException")

A_KEY = "llmtap-key"
A_B64 = "llmtap-b64"
A_REPLAY = "llmtap-replay"
A_REASON = "llmtap-reason"
A_OFFSET = "llmtap-offset"
A_FAILED_AT = "llmtap-failed-at"


@dataclass(slots=True)
class _Handle:
    """Backend-private part of a `Delivery`."""

    receipt: str
    message_id: str
    replay: str | None


@dataclass(slots=True)
class _Entry:
    """A message ready for SendMessageBatch, and its size as SQS counts it."""

    body: str
    attrs: dict[str, dict[str, Any]]
    size: int
    group: str | None
    dedup: str | None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def group_id(key: str, partitions: int) -> str:
    """The MessageGroupId of a key: its partition, `p<N>`.

    One group per partition, not per key: the ordering domain is the one every backend has,
    and the number of groups stays bounded (`LLMTAP_PARTITIONS`), as SQS-compatible servers
    need (ElasticMQ's FIFO receive slows down with the number of groups in flight).
    """
    return f"p{partition_for(key, partitions)}"


def _clean(text: str, limit: int = 1024) -> str:
    """A string attribute value SQS accepts."""
    return _BAD_CHARS.sub("?", text[:limit]) or "-"


def _chunks(entries: Sequence[_Entry], max_bytes: int) -> Iterator[list[_Entry]]:
    """Consecutive runs of at most 10 entries and `max_bytes` bytes."""
    chunk: list[_Entry] = []
    size = 0
    for e in entries:
        if chunk and (len(chunk) == _BATCH or size + e.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(e)
        size += e.size
    if chunk:
        yield chunk


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class SQSQueue(Queue):
    """The `Queue` on Amazon SQS (or an SQS-compatible server)."""

    def __init__(
        self,
        url: str,
        partitions: int,
        group: str = "llmtap-workers",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        visibility_timeout: float | None = None,
        max_receives: int | None = None,
        wait_seconds: int | None = None,
        op_timeout: float = 10.0,
        inline_body_bytes: int | None = None,
    ) -> None:
        parts = urlsplit(url)
        name = parts.netloc
        shown = redact_dsn(url)  # an endpoint's password, a name that is one (rev25: quoted whole)
        bad = f"invalid setting LLMTAP_QUEUE: {shown!r} is not sqs://<queue-name>[?endpoint=...&region=...]"
        if parts.scheme != "sqs" or not name or parts.path.strip("/"):
            raise ConfigError(bad)
        self.fifo = name.endswith(".fifo")
        base = name.removesuffix(".fifo")
        suffix = ".fifo" if self.fifo else ""
        if not _NAME.match(name.removesuffix(".fifo")) or len(f"{base}-dlq{suffix}") > 80:
            named = redact_dsn(name)
            raise ConfigError(
                f"invalid setting LLMTAP_QUEUE: SQS queue name {named!r} must be letters, digits, '-' or "
                f"'_' (at most {76 - len(suffix)} characters, then '.fifo' for a FIFO queue)"
            )
        query = dict(parse_qsl(parts.query))
        unknown = set(query) - {"endpoint", "region", "visibility_timeout", "max_receives", "wait_seconds"}
        if unknown:
            raise ConfigError(f"invalid setting LLMTAP_QUEUE: unknown parameter(s) {sorted(unknown)} for SQS")
        try:
            vis = visibility_timeout or float(query.get("visibility_timeout", 30))
            self.max_receives = max_receives or int(query.get("max_receives", 10))
            self.wait_seconds = (
                wait_seconds if wait_seconds is not None else int(query.get("wait_seconds", 20))
            )
        except ValueError:
            raise ConfigError(f"invalid setting LLMTAP_QUEUE: bad number in {shown!r}") from None
        if not 1 <= vis <= 43200 or not 1 <= self.max_receives <= 1000 or not 0 <= self.wait_seconds <= 20:
            raise ConfigError(
                "invalid setting LLMTAP_QUEUE: SQS allows visibility_timeout 1..43200 s, "
                "max_receives 1..1000 and wait_seconds 0..20"
            )
        self.visibility = math.ceil(vis)
        self.name = name
        self.dlq_name = f"{base}-dlq{suffix}"
        self.partitions = partitions
        self.group = group  # SQS has no consumer groups: every consumer of a queue shares it
        self.endpoint = endpoint or query.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_SQS") or None
        self.region = region or query.get("region")
        self.op_timeout = op_timeout
        self.inline_body_bytes = inline_body_bytes
        self.max_bytes = DEFAULT_MAX_BYTES
        where = f" at {redact_dsn(self.endpoint)}" if self.endpoint else ""
        kind = "SQS FIFO" if self.fifo else "SQS standard queue: order best-effort"
        self.description = f"sqs://{name}{where} ({kind})"
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._role: Role = "inspect"
        self._url = ""
        self._dlq_url = ""
        self._recreating = asyncio.Lock()
        self._recreate_at = 0.0  # monotonic time before which no new attempt is made
        self._gone = False  # a queue was found missing and no request has worked since
        self._held: dict[str, float] = {}  # receipt handle -> monotonic time it becomes visible
        self._delete_failures: Counter[str] = Counter()  # since the last line (`_say_delete_failed`)
        self._delete_failed_said = -math.inf
        self._renewer: asyncio.Task[None] | None = None
        self._sem = asyncio.Semaphore(_CONCURRENCY)

    # -- errors ---------------------------------------------------------------------------------
    def _unavailable(self, e: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"cannot reach SQS queue {self.name} at {self._where()}: {self._why(e)}")

    def _why(self, e: BaseException) -> str:
        if isinstance(e, ClientError):
            return f"{_code(e)}: {e.response.get('Error', {}).get('Message', '')}".rstrip(": ")
        if isinstance(e, TimeoutError):
            return f"no answer within {self.op_timeout:g}s"
        return redact_text(str(e)) or type(e).__name__

    def _where(self) -> str:
        return redact_dsn(self.endpoint) if self.endpoint else f"AWS region {self.region}"

    async def _call(self, fn: Callable[..., Awaitable[T]], *, wait: float = 0, **kwargs: Any) -> T:
        """One SQS request, bounded (`wait`: a long poll's own seconds), every failure as
        `BackendUnavailable`. A queue that does not exist any more is created again first."""
        try:
            async with self._sem, asyncio.timeout(self.op_timeout + wait):
                got = await fn(**kwargs)
        except (ClientError, BotoCoreError, OSError, TimeoutError) as e:
            if isinstance(e, ClientError) and _code(e) in _MISSING and self._role != "inspect":
                raise BackendUnavailable(
                    f"SQS queue {self.name} or {self.dlq_name} at {self._where()} does not exist "
                    f"(deleted while running?): {await self._recreate()}"
                ) from None
            raise self._unavailable(e) from None
        self._gone = False
        return got

    async def _recreate(self) -> str:
        """Create the queue and its dead-letter queue again, as `connect` does, after one of them
        was deleted while running (by hand, or by a tool that tears down what it did not make).

        Without this the gateway sent every record to its fallback and the worker waited for ever,
        until a restart. The request that met the missing queue still fails (an outage: nothing
        was sent, received or deleted); the next one uses the new queue. Concurrent requests
        make one attempt, and a process makes at most one per `_RECREATE_EVERY` seconds (SQS
        refuses to create a queue under a name deleted less than 60 s ago: that is retried).
        Returns what became of it, for the request's error.
        """
        async with self._recreating:
            if time.monotonic() < self._recreate_at:
                return "being created again"
            if not self._gone:
                log.warning(
                    "sqs queue %s or its dead-letter queue %s does not exist any more (deleted while "
                    "running?): creating what is missing again as at start; what it held is lost",
                    self.name,
                    self.dlq_name,
                )
            self._gone = True
            try:
                await self._create_queues()
                attrs = await self._attributes(self._url, "MaximumMessageSize")
            except (ClientError, BotoCoreError, OSError, TimeoutError) as e:
                return f"creating it again failed (retried in {_RECREATE_EVERY:g}s): {self._why(e)}"
            finally:
                self._recreate_at = time.monotonic() + _RECREATE_EVERY
            self.max_bytes = int(attrs.get("MaximumMessageSize") or DEFAULT_MAX_BYTES)
            return "created again"

    # -- lifecycle ------------------------------------------------------------------------------
    async def connect(self, role: Role) -> None:
        self._role = role
        session = get_session()
        if self.region is None:
            self.region = session.get_config_variable("region") or ("us-east-1" if self.endpoint else None)
        if self.region is None:
            raise ConfigError(
                "invalid setting LLMTAP_QUEUE: no AWS region for SQS (set AWS_REGION or add ?region=...)"
            )
        config = AioConfig(
            connect_timeout=min(5.0, self.op_timeout),
            read_timeout=self.op_timeout + self.wait_seconds,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=4 * _CONCURRENCY,
        )
        try:
            self._client = await self._stack.enter_async_context(
                session.create_client(
                    "sqs", region_name=self.region, endpoint_url=self.endpoint, config=config
                )
            )
        except ValueError as e:  # e.g. an endpoint that is not a URL
            where, why = redact_dsn(self.endpoint or ""), redact_text(str(e))
            raise ConfigError(f"invalid setting LLMTAP_QUEUE: SQS endpoint {where!r}: {why}") from None
        try:
            if role == "inspect":  # read-only commands create nothing
                self._url = await self._find_queue(self.name)
                self._dlq_url = await self._find_queue(self.dlq_name)
                attrs = await self._attributes(self._url, *_CHECKED)
            else:
                await self._create_queues()
                attrs = await self._attributes(self._url, *_CHECKED)
        except QueueMissing:
            await self.close()
            raise
        except NoCredentialsError:
            await self.close()
            raise ConfigError(
                "no AWS credentials for the SQS queue (LLMTAP_QUEUE): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance/task role"
            ) from None
        except NoRegionError:
            await self.close()
            raise ConfigError("no AWS region for the SQS queue (set AWS_REGION)") from None
        except ClientError as e:
            await self.close()
            if _code(e) in _DENIED:
                raise ConfigError(
                    f"SQS refused access to queue {self.name} ({_code(e)}): check the credentials and "
                    "the IAM permissions listed in the README"
                ) from None
            raise self._unavailable(e) from None
        except (BotoCoreError, OSError, TimeoutError) as e:
            await self.close()
            if unknown_host(e):  # the DNS says no such name: a setting to fix, not an outage
                where = redact_dsn(self.endpoint or f"sqs.{self.region}.amazonaws.com")
                raise ConfigError(
                    f"invalid setting LLMTAP_QUEUE: unknown host in SQS endpoint {where}"
                ) from None
            raise self._unavailable(e) from None
        self.max_bytes = int(attrs.get("MaximumMessageSize") or DEFAULT_MAX_BYTES)
        kept = attrs.get("MessageRetentionPeriod")
        if kept is not None and kept.isdigit() and int(kept) < _RETENTION_WARN:
            # SQS deletes an older message unread and says so nowhere: a worker or store outage
            # longer than this loses logs, undetectable afterwards (a queue made by hand keeps
            # AWS's default, 4 days).
            log.warning(
                "sqs queue %s keeps messages %.1f days (MessageRetentionPeriod=%s): a worker or store "
                "outage longer than that loses their logs without a trace; set it to 1209600 (14 days)",
                self.name,
                int(kept) / 86400,
                kept,
            )
        if "RedrivePolicy" not in attrs:
            log.info(
                "sqs queue %s has no redrive policy: a message that crashes workers is retried forever",
                self.name,
            )
        if not self.fifo:
            log.warning(
                "sqs queue %s is a standard queue: records are processed in best-effort order and may be "
                "delivered twice; use a .fifo queue for order per partition key",
                self.name,
            )
        if (
            self.inline_body_bytes is not None
            and 2 * self.inline_body_bytes * 4 // 3 + 16384 > self.max_bytes
        ):
            log.warning(
                "LLMTAP_INLINE_BODY_BYTES=%d lets a record with two inline bodies exceed SQS's %d-byte "
                "message limit; such records go to the ingest endpoint instead",
                self.inline_body_bytes,
                self.max_bytes,
            )
        if role in ("consumer", "both"):
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="llmtap-sqs-renew"
            )

    async def _create_queues(self) -> None:
        """The dead-letter queue, then the queue with a redrive policy to it, made if missing."""
        self._dlq_url = await self._ensure_queue(self.dlq_name, {"MessageRetentionPeriod": _RETENTION})
        arn = (await self._attributes(self._dlq_url, "QueueArn"))["QueueArn"]
        redrive = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(self.max_receives)})
        self._url = await self._ensure_queue(
            self.name,
            {
                "MessageRetentionPeriod": _RETENTION,
                "VisibilityTimeout": str(self.visibility),
                "RedrivePolicy": redrive,
            },
        )

    async def _existing_url(self, name: str) -> str | None:
        """The URL of the queue `name`, or None when there is no such queue."""
        async with asyncio.timeout(self.op_timeout):
            try:
                return str((await self._client.get_queue_url(QueueName=name))["QueueUrl"])
            except ClientError as e:
                if _code(e) not in _MISSING:
                    raise
        return None

    async def _find_queue(self, name: str) -> str:
        """The URL of an existing queue; `QueueMissing` when there is none."""
        url = await self._existing_url(name)
        if url is None:
            raise QueueMissing(
                f"no SQS queue {name!r} at {self._where()}: nothing was published to it yet,"
                " or LLMTAP_QUEUE names another"
            )
        return url

    async def _ensure_queue(self, name: str, attrs: dict[str, str]) -> str:
        """The queue's URL; created (with `attrs`) when missing. An existing queue is used as is."""
        url = await self._existing_url(name)
        if url is not None:
            return url
        async with asyncio.timeout(self.op_timeout):
            if name.endswith(".fifo"):
                attrs = {**attrs, "FifoQueue": "true", "ContentBasedDeduplication": "false"}
            log.info("creating SQS queue %s", name)
            return str((await self._client.create_queue(QueueName=name, Attributes=attrs))["QueueUrl"])

    async def _attributes(self, url: str, *names: str) -> dict[str, str]:
        async with asyncio.timeout(self.op_timeout):
            got = await self._client.get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
        return dict(got.get("Attributes", {}))

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._held and self._client is not None:
            # Visible again now: another consumer takes them at once instead of after the timeout.
            with contextlib.suppress(Exception):
                await self._change_visibility(self._url, list(self._held), 0)
        self._held.clear()
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        self._client = None

    # -- encoding -------------------------------------------------------------------------------
    def _entry(
        self, key: str, value: bytes, dedup: str | None, extra: dict[str, str] | None = None
    ) -> _Entry:
        try:
            body = value.decode()
            b64 = _BAD_CHARS.search(body) is not None
            size = len(value)
        except UnicodeDecodeError:
            b64 = True
        if b64:  # SQS bodies are XML text: anything else travels in base64
            body = base64.b64encode(value).decode()
            size = len(body)
        attrs: dict[str, dict[str, Any]] = {}
        if key:
            attrs[A_KEY] = {"DataType": "Binary", "BinaryValue": key.encode()}
        if b64:
            attrs[A_B64] = {"DataType": "String", "StringValue": "1"}
        for name, v in (extra or {}).items():
            attrs[name] = {"DataType": "String", "StringValue": v}
        for name, a in attrs.items():
            v = a.get("BinaryValue", a.get("StringValue", ""))
            size += len(name) + len(a["DataType"]) + len(v if isinstance(v, bytes) else v.encode())
        return _Entry(body, attrs, size, group_id(key, self.partitions) if self.fifo else None, dedup)

    @staticmethod
    def _decode(m: dict[str, Any]) -> tuple[str, bytes, dict[str, Any]]:
        attrs = m.get("MessageAttributes") or {}
        key_attr = attrs.get(A_KEY, {}).get("BinaryValue", b"")
        key = key_attr.decode(errors="replace") if isinstance(key_attr, bytes) else str(key_attr)
        body = m.get("Body", "")
        value = body.encode()
        if A_B64 in attrs:
            # A foreign message with a bad base64 body goes to the worker as it is, which
            # dead-letters it with its reason, instead of failing every receive that meets it.
            with contextlib.suppress(binascii.Error, ValueError):
                value = base64.b64decode(body, validate=True)
        return key, value, attrs

    def _offset(self, m: dict[str, Any]) -> int:
        seq = m.get("Attributes", {}).get("SequenceNumber")
        if seq:
            return int(seq)
        return int.from_bytes(hashlib.sha1(m["MessageId"].encode()).digest()[:8]) >> 1

    # -- producer -------------------------------------------------------------------------------
    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        entries = [
            self._entry(
                m.key, m.value, _sha(m.id) if m.id is not None else hashlib.sha256(m.value).hexdigest()
            )
            for m in messages
        ]
        await self._send_entries(self._url, entries)

    async def _send_entries(self, url: str, entries: Sequence[_Entry]) -> None:
        too_big = [e.size for e in entries if e.size > self.max_bytes]
        if too_big:
            raise MessageRefused(
                f"SQS queue {self.name} takes messages up to {self.max_bytes} bytes; {len(too_big)} "
                f"record(s) of the batch are larger ({max(too_big)} bytes), so the batch goes elsewhere"
            )
        if self.fifo:
            # One group's messages in one lane, sent request after request: never reordered.
            lanes: dict[int, list[_Entry]] = {}
            for e in entries:
                lanes.setdefault(hash(e.group) % _FIFO_LANES, []).append(e)
            jobs = [self._send_lane(url, lane) for lane in lanes.values()]
        else:
            jobs = [self._send_batch(url, chunk) for chunk in _chunks(entries, self.max_bytes)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _send_lane(self, url: str, entries: Sequence[_Entry]) -> None:
        for chunk in _chunks(entries, self.max_bytes):
            await self._send_batch(url, chunk)

    async def _send_batch(self, url: str, chunk: Sequence[_Entry]) -> None:
        batch = []
        for i, e in enumerate(chunk):
            entry: dict[str, Any] = {"Id": str(i), "MessageBody": e.body}
            if e.attrs:
                entry["MessageAttributes"] = e.attrs
            if e.group is not None:
                entry["MessageGroupId"] = e.group
                entry["MessageDeduplicationId"] = e.dedup or uuid.uuid4().hex
            batch.append(entry)
        resp = await self._call(self._client.send_message_batch, QueueUrl=url, Entries=batch)
        failed = resp.get("Failed") or []
        if failed:
            f = failed[0]
            why = (
                f"{len(failed)} of {len(batch)} messages failed, e.g. {f.get('Code')}: {f.get('Message', '')}"
            )
            if any(x.get("SenderFault") for x in failed):
                raise MessageRefused(f"SQS queue {self.name} refused a batch: {why}")
            raise BackendUnavailable(f"SQS queue {self.name}: {why}")

    # -- consumer -------------------------------------------------------------------------------
    async def _receive(self, url: str, n: int, wait: int, visibility: int) -> list[dict[str, Any]]:
        resp = await self._call(
            self._client.receive_message,
            wait=wait,
            QueueUrl=url,
            MaxNumberOfMessages=n,
            WaitTimeSeconds=wait,
            VisibilityTimeout=visibility,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return list(resp.get("Messages") or [])

    async def consume(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._renewer is None:
            raise RuntimeError("SQSQueue is not connected as a consumer")
        wait = 0 if timeout <= 0 else max(1, min(self.wait_seconds, math.ceil(timeout)))
        t0 = time.monotonic()
        got: list[dict[str, Any]] = []
        try:
            got += await self._receive_held(min(_BATCH, max_messages), wait)
            # More than 10 wanted: further receives, in parallel, while they come back full, and
            # not for long: what was received is held (renewed) meanwhile, but not yet worked on.
            last_full = len(got) == _BATCH
            while last_full and len(got) < max_messages and time.monotonic() - t0 < self.visibility / 4:
                want = max_messages - len(got)
                sizes = [min(_BATCH, want - i * _BATCH) for i in range(min(math.ceil(want / _BATCH), 8))]
                tasks = [asyncio.ensure_future(self._receive_held(s, 0)) for s in sizes]
                try:
                    await asyncio.wait(tasks)
                finally:
                    # What the receives that finished brought is held: it joins `got` even when
                    # another receive failed or this call is cancelled, so it is handed out or
                    # released below, never left invisible (renewed) blocking its message group.
                    for t in tasks:
                        if not t.done():
                            t.cancel()
                        elif not t.cancelled() and t.exception() is None:
                            got += t.result()
                errors = [e for t in tasks if (e := t.exception()) is not None]
                if any(not isinstance(e, BackendUnavailable) for e in errors):
                    raise next(e for e in errors if not isinstance(e, BackendUnavailable))
                if errors:
                    break  # keep what we have; the next call reports the outage
                last_full = all(len(t.result()) == s for t, s in zip(tasks, sizes, strict=True))
            return [self._delivery(m) for m in got]
        except BaseException:
            await self._release([m["ReceiptHandle"] for m in got])
            raise

    def _delivery(self, m: dict[str, Any]) -> Delivery:
        key, value, attrs = self._decode(m)
        replay = attrs.get(A_REPLAY, {}).get("StringValue")
        return Delivery(
            partition_for(key, self.partitions),
            self._offset(m),
            key,
            value,
            delivery_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
            handle=_Handle(m["ReceiptHandle"], m["MessageId"], replay),
        )

    async def _release(self, receipts: Sequence[str]) -> None:
        """Give back messages received but never handed out (a `consume` that failed or was
        cancelled half-way): no longer renewed, and visible again at once if SQS answers."""
        for r in receipts:
            self._held.pop(r, None)
        if receipts:
            await bounded(self._change_visibility(self._url, receipts, 0), self.op_timeout, "releasing")

    async def _receive_held(self, n: int, wait: int) -> list[dict[str, Any]]:
        """Receive from the main queue; the messages are held (renewed) from now on."""
        t0 = time.monotonic()
        got = await self._receive(self._url, n, wait, self.visibility)
        for m in got:
            self._held[m["ReceiptHandle"]] = t0 + self.visibility
        return got

    async def _renew_loop(self) -> None:
        """Keep held messages invisible: renew each well before its visibility timeout ends."""
        while True:
            await asyncio.sleep(self.visibility / 6)
            now = time.monotonic()
            due = [r for r, at in self._held.items() if at - now < self.visibility * 2 / 3]
            if not due:
                continue
            try:
                ok = await self._change_visibility(self._url, due, self.visibility)
            except Exception as e:
                log.warning("sqs queue %s: renewing visibility failed (may be redelivered): %s", self.name, e)
                continue
            for r in ok:
                if r in self._held:
                    self._held[r] = now + self.visibility

    async def _change_visibility(self, url: str, receipts: Sequence[str], seconds: int) -> set[str]:
        """Set the visibility of these messages; returns the receipts that took it."""

        async def one(chunk: Sequence[str]) -> set[str]:
            entries = [
                {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": seconds} for i, r in enumerate(chunk)
            ]
            resp = await self._call(
                self._client.change_message_visibility_batch, QueueUrl=url, Entries=entries
            )
            failed = {int(f["Id"]) for f in resp.get("Failed") or []}
            for i in failed:  # deleted meanwhile, or received again elsewhere: not ours any more
                self._held.pop(chunk[i], None)
            return {r for i, r in enumerate(chunk) if i not in failed}

        chunks = [receipts[i : i + _BATCH] for i in range(0, len(receipts), _BATCH)]
        done: set[str] = set()
        for part in await asyncio.gather(*(one(c) for c in chunks)):
            done |= part
        return done

    async def _delete(self, url: str, receipts: Sequence[str]) -> None:
        failed: Counter[str] = Counter()

        async def one(chunk: Sequence[str]) -> None:
            entries = [{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(chunk)]
            resp = await self._call(self._client.delete_message_batch, QueueUrl=url, Entries=entries)
            for f in resp.get("Failed") or []:
                failed[str(f.get("Code"))] += 1

        chunks = [receipts[i : i + _BATCH] for i in range(0, len(receipts), _BATCH)]
        results = await asyncio.gather(*(one(c) for c in chunks), return_exceptions=True)
        if failed:
            self._say_delete_failed(failed)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _say_delete_failed(self, failed: Counter[str]) -> None:
        """Deletes SQS refused: the message is gone already (received again elsewhere after a
        lapse, and deleted there: at least once either way) or the queue was purged, and then
        every record not yet read went with it, without a trace (an audit lost 122 of 600 that
        way, with one INFO line per message in flight). Said once a minute, counted."""
        self._delete_failures.update(failed)
        now = time.monotonic()
        if now - self._delete_failed_said < 60.0:
            return
        self._delete_failed_said = now
        counts = ", ".join(f"{n} {code}" for code, n in self._delete_failures.most_common())
        self._delete_failures.clear()
        log.warning(
            "sqs queue %s: deletes refused (%s): those messages were gone already, received again"
            " elsewhere or purged; a purge also removed every record not read yet (never purge"
            " llmtap's queue)",
            self.name, counts,
        )  # fmt: skip

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        receipts = [d.handle.receipt for d in deliveries if isinstance(d.handle, _Handle)]
        if not receipts:
            return
        await self._delete(self._url, receipts)
        for r in receipts:
            self._held.pop(r, None)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        handle = delivery.handle
        assert isinstance(handle, _Handle), "not a delivery of this queue"
        extra = {
            A_REASON: _clean(reason),
            A_OFFSET: str(delivery.offset),
            A_FAILED_AT: repr(time.time()),
        }
        if handle.replay:
            extra[A_REPLAY] = handle.replay
        entry = self._entry(delivery.key, delivery.value, _sha("dlq:" + handle.message_id), extra)
        if self.fifo:
            entry.group = uuid.uuid4().hex  # dead letters need no order: each its own group, so all list
        await self._send_entries(self._dlq_url, [entry])
        await self.ack([delivery])

    # -- operations -----------------------------------------------------------------------------
    def _letter(self, m: dict[str, Any]) -> DeadLetter:
        key, value, attrs = self._decode(m)
        sys_attrs = m.get("Attributes", {})
        reason = attrs.get(A_REASON, {}).get("StringValue")
        if reason is None:
            reason = (
                f"moved by SQS after {sys_attrs.get('ApproximateReceiveCount', '?')} receives without an "
                f"acknowledgement (redrive policy, maxReceiveCount {self.max_receives}): did a worker crash?"
            )
        sent = int(sys_attrs.get("SentTimestamp", 0)) / 1000
        failed_at = letter_field(attrs.get(A_FAILED_AT, {}).get("StringValue"), float, sent)
        offset = letter_field(attrs.get(A_OFFSET, {}).get("StringValue"), int, None)
        return DeadLetter(
            id=m["MessageId"],
            partition=partition_for(key, self.partitions),
            offset=self._offset(m) if offset is None else offset,
            key=key,
            value=value,
            reason=reason,
            failed_at=failed_at,
        )

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        seen: list[dict[str, Any]] = []
        try:
            while len(seen) < limit:
                got = await self._receive(self._dlq_url, min(_BATCH, limit - len(seen)), 1, 30)
                if not got:
                    break
                seen += got
        finally:
            if seen:
                await self._change_visibility(self._dlq_url, [m["ReceiptHandle"] for m in seen], 0)
        letters = [self._letter(m) for m in seen]
        return sorted(letters, key=lambda d: d.failed_at)

    async def replay_dead_letters(self, ids: Sequence[str] | None = None, *, publish: bool = True) -> int:
        wanted = set(ids) if ids is not None else None
        token = uuid.uuid4().hex  # what this replay publishes carries it: skip it if it comes back
        skipped: list[str] = []
        replayed = 0
        try:
            while wanted is None or wanted:
                got = await self._receive(self._dlq_url, _BATCH, 1, 120)
                if not got:
                    break
                chosen = []
                for m in got:
                    _, _, attrs = self._decode(m)
                    mine = attrs.get(A_REPLAY, {}).get("StringValue") == token
                    if not mine and (wanted is None or m["MessageId"] in wanted):
                        chosen.append(m)
                    else:
                        skipped.append(m["ReceiptHandle"])
                if not chosen:
                    continue
                entries = []
                for m in chosen if publish else ():
                    letter = self._letter(m)
                    entries.append(
                        self._entry(
                            letter.key, letter.value, _sha("replay:" + m["MessageId"]), {A_REPLAY: token}
                        )
                    )
                if entries:
                    await self._send_entries(self._url, entries)
                await self._delete(self._dlq_url, [m["ReceiptHandle"] for m in chosen])
                replayed += len(chosen)
                if wanted is not None:
                    wanted -= {m["MessageId"] for m in chosen}
        finally:
            if skipped:
                await self._change_visibility(self._dlq_url, skipped, 0)
        return replayed

    async def status(self) -> QueueStatus:
        names = (
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        )
        try:
            main, dlq = await asyncio.gather(
                self._attributes(self._url, *names), self._attributes(self._dlq_url, *names)
            )
        except (ClientError, BotoCoreError, OSError, TimeoutError) as e:
            raise self._unavailable(e) from None

        def n(attrs: dict[str, str], name: str) -> int:
            return int(attrs.get(name, 0))

        notes = ["approximate counts (SQS estimates them)"]
        if not self.fifo:
            notes.append("standard queue: order best-effort, a record may be delivered twice")
        return QueueStatus(
            backend="sqs",
            dead_letters=sum(n(dlq, x) for x in names),
            waiting=n(main, names[0]) + n(main, names[2]),
            in_flight=n(main, names[1]),
            notes=notes,
        )
