"""The fallback sinks after the queue, and the task that brings spooled records back.

The publisher's chain in a scaled-out gateway is `QueueSink → IngestSink → SpoolSink`:

- `IngestSink` POSTs the batch to the llmtap server's `POST /api/v1/ingest`, which answers 2xx
  once the records are durable on the server (its ingest queue), and stores them right after.
- `SpoolSink` appends the batch to the local disk spool (fsynced): the last resort, and where
  records go when the in-memory buffer is over its bound.
- `SpoolReplayer` publishes spooled records into the queue once it accepts again, and at
  start-up (records spooled before a restart are not lost). The spool is also where a record
  waits whose body is above the inline limit while the body store is down (`bodies.offload`):
  the replayer writes such bodies to the body store before the records go into the queue.

Records keep the route they took (`record.route`): `ingest` for the fallback, `spool` for
records that went through the spool and were replayed, so an operator can see what an outage
did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from llmtap.bodies import offload
from llmtap.errors import BackendUnavailable, ConfigError, RecordError
from llmtap.gateway.publisher import Sink
from llmtap.gateway.spool import HELD_TAG, DiskSpool, SpoolFull
from llmtap.queue.base import Message, Queue
from llmtap.record import LogRecord, Route, decode, encode, encode_many, lightened, partition_key, stripped

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore

log = logging.getLogger("llmtap.gateway")

T = TypeVar("T")

_KEY_LEN = struct.Struct(">H")
REPLAY_CHUNK = 100  # records per publish while replaying the spool (see `replay_once`)


class IngestSink(Sink):
    """Fallback: the server's ingest endpoint, which answers once the batch is durable."""

    route: Route = "ingest"

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 10.0) -> None:
        self.url = base_url.rstrip("/") + "/api/v1/ingest"
        self.headers = {"content-type": "application/json"}
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        self._total = timeout
        self.timeout = aiohttp.ClientTimeout(total=timeout, connect=2.0)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self.timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, records: Sequence[LogRecord]) -> None:
        assert self._session is not None, "start() the sink first"
        for r in records:
            r.route = "ingest"
        body = encode_many(list(records))
        try:
            async with self._session.post(self.url, data=body, headers=self.headers) as resp:
                text = await resp.text()
                if resp.status < 300:
                    return
        except TimeoutError as e:
            raise BackendUnavailable(
                f"ingest endpoint {self.url} did not answer within {self._total:g}s ({describe(e)})"
            ) from e
        except (aiohttp.ClientError, OSError) as e:
            raise BackendUnavailable(f"ingest endpoint {self.url} unreachable: {describe(e)}") from e
        if resp.status >= 500 or resp.status in (401, 403, 404, 408, 429):
            # Down, overloaded, or misconfigured (wrong token): not the records' fault.
            raise BackendUnavailable(f"ingest endpoint {self.url} answered {resp.status}: {text[:200]}")
        raise ValueError(f"ingest endpoint refused the batch ({resp.status}): {text[:200]}")


def describe(e: BaseException) -> str:
    """`TimeoutError` rather than an empty string: many exceptions have no message."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _frame(key: str, value: bytes) -> bytes:
    k = key.encode()[:65535]
    return _KEY_LEN.pack(len(k)) + k + value


def _unframe(data: bytes) -> Message:
    (n,) = _KEY_LEN.unpack_from(data)
    # `replace`: a key cut at 64 KiB may end inside a UTF-8 sequence; it only picks a partition.
    return Message(key=data[2 : 2 + n].decode(errors="replace"), value=data[2 + n :])


class SpoolSink(Sink):
    """Last resort: append to the fsynced local spool (in a thread: the loop never blocks)."""

    route: Route = "spool"
    large_bodies = True  # the local place a body above the inline limit waits for the body store

    def __init__(self, spool: DiskSpool, partition_by: str = "tenant") -> None:
        self.spool = spool
        self.partition_by = partition_by

    async def send(self, records: Sequence[LogRecord]) -> None:
        by = self.partition_by
        frames = []
        for r in records:
            r.route = "spool"
            frames.append(_frame(partition_key(r, by), encode(r)))
        try:
            await asyncio.to_thread(self.spool.append, frames)
        except (SpoolFull, OSError) as e:
            raise BackendUnavailable(f"disk spool unusable: {describe(e)}") from e

    async def close(self) -> None:
        await asyncio.to_thread(self.spool.close)


class _LoopThread:
    """An event loop on a thread of its own, to run coroutines away from the caller's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llmtap-spool-replay", daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


#: How long a spooled record the queue refuses alone waits on disk for the ingest endpoint
#: before it is published bare (its numbers, without bodies and headers): from the first
#: refusal this process saw, on the monotonic clock (a gateway restarted meanwhile waits anew).
WHOLE_WAIT = 600.0
#: How often records that wait for the ingest endpoint try the queue and ingest again (their
#: segment is left alone in between: tried every second, it was rewritten and resent each time).
HELD_RETRY = 30.0
_wall = time.time  # a held segment's age from its mtime (a module name: tests replace `time`)


class _Tally:
    """What a segment's replay did: records published, sent whole to ingest, and held (frames
    that wait on disk for the ingest endpoint: written to a new segment, so the rest of their
    segment is done with)."""

    __slots__ = ("held", "published", "whole")

    def __init__(self) -> None:
        self.published = 0
        self.whole = 0
        self.held: list[bytes] = []


class SpoolReplayer:
    """Moves spooled records into the queue whenever the queue takes them.

    Runs at start-up and then every `interval` seconds while anything is spooled. A segment is
    deleted only after every batch in it was published; a replay cut short by an outage starts
    the segment over later (at least once: the store keeps one row per request id).

    A batch the queue refuses for another reason than an outage (a message too large) is sent
    record by record, so one record cannot block the spool for good. A record refused alone goes
    whole to the ingest endpoint (`whole`; it waits on disk while that is down, `WHOLE_WAIT` at
    most); failing that, it has every body moved to the body store (an SQS message takes 256
    KiB, less than a record with three inline bodies of up to the inline limit) and is sent
    again; only if that is refused too
    is it sent bare (`record.stripped`), and only if that is refused as well is it given up:
    counted in `dropped` and logged with its id. While the body store is down such a record's
    segment stays on disk.

    Spooled records holding a body above the inline limit (`bodies.offload`) have it written to
    `bodies` first; while the body store refuses, their segment is left as it is, untouched.
    """

    def __init__(
        self,
        spool: DiskSpool,
        queue: Queue,
        *,
        interval: float = 1.0,
        queue_factory: Callable[[], Queue] | None = None,
        bodies: BodyStore | None = None,
        inline_limit: int = 64 * 1024,
        whole: Sink | None = None,
    ) -> None:
        """With `queue_factory`, replays run on a thread of their own with their own queue
        connection (made by the factory): the gateway's event loop does none of the encoding
        or IO. Without it they run on the caller's loop, paced in chunks. `bodies` and `whole`
        (the ingest sink, which takes a record the queue refuses) are used on the caller's
        loop (their clients belong there)."""
        self.spool = spool
        self.whole = whole
        self.queue = queue
        self.bodies = bodies
        self.inline_limit = inline_limit
        self.bodies_stored = 0  # spooled bodies written to the body store before replay
        self._bodies_waiting = False
        self.interval = interval
        self.replayed = 0
        self.dropped = 0  # spooled records the queue refused even bare
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._factory = queue_factory
        self._thread: _LoopThread | None = None
        self._own: Queue | None = None  # the thread's queue, used on the thread's loop only
        self._home: asyncio.AbstractEventLoop | None = None  # the caller's loop (`bodies` lives there)
        #: Record id → when the queue first refused it while the ingest endpoint was down
        #: (monotonic): it waits on disk `WHOLE_WAIT` from then.
        self._held_since: dict[str, float] = {}
        #: Segments holding only records that wait (`spool.write_segment`) → when to try them.
        self._held_due: dict[str, float] = {}

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmtap-spool-replay")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop replaying; a replay still waiting on a queue that hangs is cut after `timeout`
        seconds (its segment stays on disk and is replayed again later, at least once)."""
        self._stop.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        thread, self._thread = self._thread, None
        if thread is not None:
            with contextlib.suppress(Exception):
                await thread.run(self._close_own())
            await asyncio.to_thread(thread.stop)

    async def replay_once(self) -> int:
        """Publish what is spooled now; returns records published. Stops at the first outage.

        Kept off the event loop it shares with the proxy: a queue client encodes each publish
        on its loop (redis-py packs ~8 ms of commands per 500 records), so 20k spooled
        records replayed on the gateway's loop held requests up by tens of milliseconds for
        seconds (bench/replay_lag.py). With a queue factory the replay runs on its own thread
        and loop; without one it is paced in chunks of `REPLAY_CHUNK` with yields between.
        """
        self._home = asyncio.get_running_loop()
        if self._factory is None:
            return await self._replay(self.queue, 0.0)
        if self._thread is None:
            self._thread = _LoopThread()
        return await self._thread.run(self._replay_on_thread())

    async def _replay_on_thread(self) -> int:
        if self._own is None:
            assert self._factory is not None
            q = self._factory()
            await q.connect("producer")  # raises BackendUnavailable while the queue is down
            self._own = q
        # A short sleep between chunks hands the GIL back to the proxy's thread for a while
        # (a busy thread keeps it for up to 5 ms at a time): 200 chunks cost 0.4 s per 20k.
        return await self._replay(self._own, 0.002)

    async def _close_own(self) -> None:
        q, self._own = self._own, None
        if q is not None:
            await q.close()

    async def _replay(self, queue: Queue, pause: float) -> int:
        done = 0
        segments = await asyncio.to_thread(self.spool.segments_for_replay)
        names = {p.name for p in segments}
        self._held_due = {n: d for n, d in self._held_due.items() if n in names}  # gone: forgotten
        for path in segments:
            due = self._due(path)
            if due is not None and time.monotonic() < due:
                continue  # records that wait for the ingest endpoint, tried again later
            frames = await asyncio.to_thread(self._read, path)
            if not frames:
                continue  # another process is replaying it, or it is empty
            # BackendUnavailable while the body store is down: the segment stays as it is.
            frames = await self._offload(frames)
            tally = _Tally()
            quiet = due is not None  # its records were refused before: said already
            for i in range(0, len(frames), REPLAY_CHUNK):
                await self._publish(queue, frames[i : i + REPLAY_CHUNK], tally, quiet)
                await asyncio.sleep(pause)  # let other work in between chunks
            if tally.held:
                # Written to a segment of their own before this one goes: a record that waits
                # holds neither its segment's other records (published again at every try:
                # 2,035 messages for 300 records in 80 s) nor the segments after it.
                try:
                    held = await asyncio.to_thread(self._hold, tally.held, path)
                except (SpoolFull, OSError) as e:
                    for frame in tally.held:
                        tally.published += await self._publish_bare(
                            queue, frame, RuntimeError(f"it could not wait on disk: {e}")
                        )
                    tally.held = []
                else:
                    self._held_due[held.name] = time.monotonic() + HELD_RETRY
            await asyncio.to_thread(DiskSpool.done, path)
            self._held_due.pop(path.name, None)
            n = tally.published + tally.whole
            done += n
            self.replayed += n
            log.log(
                logging.INFO if n else logging.DEBUG,  # not a line a second for a record that waits
                "replayed %d spooled record(s) from %s: %d into the queue, %d whole to the ingest"
                " endpoint, %d waiting on disk for it",
                n, path.name, tally.published, tally.whole, len(tally.held),
            )  # fmt: skip
        return done

    def _due(self, path: Path) -> float | None:
        """When records that wait may be tried again (monotonic): this process's own note, else,
        for a segment another gateway sharing the spool held, its age (rev15: two gateways
        rewrote each other's every second), never more than `HELD_RETRY` from now."""
        due = self._held_due.get(path.name)
        if due is not None or not path.name.endswith(HELD_TAG + ".spool"):
            return due
        try:
            age = max(0.0, _wall() - path.stat().st_mtime)
        except FileNotFoundError:
            return None
        due = time.monotonic() + max(0.0, HELD_RETRY - age)
        self._held_due[path.name] = due
        return due

    def _hold(self, frames: list[bytes], leaving: Path) -> Path:
        """Write records that wait to a segment of their own; the space of `leaving`, deleted
        right after, is theirs (counted, a spool half full held no record back: rev14)."""
        try:
            freeing = leaving.stat().st_size
        except FileNotFoundError:
            freeing = 0
        return self.spool.write_segment(frames, freeing=freeing)

    async def _offload(self, frames: list[bytes]) -> list[bytes]:
        """The frames, with every body above the inline limit moved to the body store (`bodies.offload`).

        A frame no longer than the limit cannot hold such a body (inline bytes travel as base64),
        so only longer ones are decoded. All of the segment's bodies go in one `put_many`.
        """
        limit = self.inline_limit
        big: list[tuple[int, str, LogRecord]] = []
        for n, frame in enumerate(frames):
            if len(frame) <= limit:
                continue
            msg = _unframe(frame)
            try:
                record = decode(msg.value)
            except RecordError:
                continue  # published as it is: `_publish` deals with what the queue refuses
            if not offload.fits(record, limit):
                big.append((n, msg.key, record))
        if not big:
            return frames
        try:
            if self.bodies is None:
                raise BackendUnavailable("no body store to take them")
            records = [r for _, _, r in big]
            stored = await self._on_home(offload.to_store(self.bodies, records, above=limit))
        except Exception as e:
            if not self._bodies_waiting:  # one line per outage, not one per try
                log.warning(
                    "spool: %d record(s) with bodies above the inline limit wait for the body store: %s",
                    len(big),
                    describe(e),
                )
            self._bodies_waiting = True
            raise BackendUnavailable(f"body store unavailable for spooled bodies: {describe(e)}") from e
        if self._bodies_waiting:
            log.warning("spool: the body store took the spooled bodies; replaying their records")
        self._bodies_waiting = False
        self.bodies_stored += stored
        out = list(frames)
        for n, key, record in big:
            out[n] = _frame(key, encode(record))
        return out

    async def _on_home(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the caller's loop (where the body store's client lives)."""
        home = self._home
        if home is None or home is asyncio.get_running_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, home))

    async def _publish(self, queue: Queue, frames: list[bytes], tally: _Tally, quiet: bool = False) -> None:
        try:
            await queue.publish([_unframe(f) for f in frames])
            tally.published += len(frames)
            return
        except BackendUnavailable:
            raise
        except Exception as e:
            if not isinstance(e, ValueError):
                # Not a refusal of these records (a queue refuses one as `MessageRefused`, a
                # ValueError): the driver failed, e.g. redis-py 8.2 on a reply it did not expect.
                # Taken for a refusal, every record went bare and then was dropped with its
                # segment (the packaging audit): an outage instead, and the segment waits.
                raise BackendUnavailable(f"the queue failed: {type(e).__name__}: {e}") from e
            if len(frames) == 1:
                outcome = await self._refused_alone(queue, frames[0], e)
                if outcome == "queued":
                    tally.published += 1
                elif outcome == "sent":
                    tally.whole += 1
                elif outcome == "held":
                    tally.held.append(frames[0])
                else:
                    tally.published += await self._publish_bare(queue, frames[0], e)
                return
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "the queue refused a spooled batch (%s: %s); replaying it record by record",
                type(e).__name__,
                e,
            )
        for frame in frames:
            await self._publish(queue, [frame], tally, quiet)

    async def _refused_alone(self, queue: Queue, frame: bytes, exc: Exception) -> str:
        """What becomes of a record the queue refuses alone (a broker's size limit lowered):
        "queued" with its bodies in the body store (nothing lost: their references travel),
        else "sent" whole to the ingest endpoint, else "held" while that is down (`_send_whole`),
        else "bare" (`_publish_bare`, which says what it lost)."""
        try:
            msg = _unframe(frame)
            record = decode(msg.value)
        except Exception:
            return "bare"  # not a record: the bare path says so
        try:
            if await self._bodies_out(record):
                await queue.publish([Message(key=msg.key, value=encode(record))])
                self._held_since.pop(record.id, None)
                return "queued"
        except BackendUnavailable:
            if self.whole is None:
                raise  # the queue down, or the body store: the record waits on disk whole
        except Exception:
            pass  # still too large without its bodies: whole to ingest, else bare
        return await self._send_whole(record, exc)

    async def _send_whole(self, record: LogRecord, exc: Exception) -> str:
        """A record the queue refuses alone goes to the ingest endpoint whole: published bare,
        it lost its bodies and headers for good over a setting (queue audit). While that is down
        too the record is "held": it waits on disk, `WHOLE_WAIT` seconds from the first refusal
        at most (then "bare", so one record never waits for ever)."""
        if self.whole is None:
            return "bare"
        try:
            await self._on_home(self.whole.send([record]))
        except BackendUnavailable as e:
            now = time.monotonic()
            first = self._held_since.get(record.id)
            if first is None:
                if len(self._held_since) >= 100_000:  # ids come from the spool: bound the map
                    self._held_since.clear()
                self._held_since[record.id] = first = now
                log.warning(
                    "the queue refuses spooled record %s (%s: %s) and %s is unavailable (%s): it"
                    " waits on disk for %s, %.0f s at most, then goes bare",
                    record.id, type(exc).__name__, exc, self.whole.route, e, self.whole.route, WHOLE_WAIT,
                )  # fmt: skip
            if now - first < WHOLE_WAIT:
                return "held"
            self._held_since.pop(record.id, None)
            return "bare"
        except Exception:
            self._held_since.pop(record.id, None)
            return "bare"
        self._held_since.pop(record.id, None)
        log.warning(
            "the queue refused spooled record %s (%s: %s); sent it whole to %s",
            record.id, type(exc).__name__, exc, self.whole.route,
        )  # fmt: skip
        return "sent"

    async def _publish_bare(self, queue: Queue, frame: bytes, exc: Exception) -> int:
        reason = f"{type(exc).__name__}: {exc}"
        rid = "?"
        try:
            msg = _unframe(frame)
            record = decode(msg.value)
            rid = record.id
            if await self._bodies_out(record):
                try:
                    await queue.publish([Message(key=msg.key, value=encode(record))])
                    return 1
                except BackendUnavailable:
                    raise
                except Exception as e:
                    reason = f"{reason}; without its bodies too: {type(e).__name__}: {e}"
            try:  # its numbers, without bodies and headers
                await queue.publish([Message(key=msg.key, value=encode(lightened(record, reason)))])
            except BackendUnavailable:
                raise
            except Exception:
                await queue.publish([Message(key=msg.key, value=encode(stripped(record, reason)))])
        except BackendUnavailable:
            raise
        except Exception as e:
            self.dropped += 1
            log.error(
                "gave up on spooled record %s: the queue refused it (%s), bare too (%s)", rid, reason, e
            )
            return 0
        log.error(
            "the queue refused spooled record %s (%s); published it bare, with that reason", rid, reason
        )
        return 1

    async def _bodies_out(self, record: LogRecord) -> bool:
        """Move every inline body of `record` to the body store; False when it has none there
        to move (or no body store). Raises `BackendUnavailable` while the body store is down:
        the record waits on disk whole rather than being published without its content."""
        if self.bodies is None or not any(
            (b := getattr(record, attr)) is not None and b.data is not None for attr, _ in offload.PARTS
        ):
            return False
        try:
            stored = await self._on_home(offload.to_store(self.bodies, [record], above=-1))
        except Exception as e:
            raise BackendUnavailable(f"body store unavailable for a spooled record: {describe(e)}") from e
        self.bodies_stored += stored
        return True

    def _read(self, path: Path) -> list[bytes]:
        return [f for batch in self.spool.replay(path) for f in batch]

    async def _run(self) -> None:
        """Replay while anything is spooled; an outage is logged when it begins and when it ends.

        A queue that refuses our settings now (`ConfigError`: Redis refusing a password changed
        under us) took them at start-up: an outage to wait out like any other, as for a worker
        (`runtime.open_when_back`). It was logged at every try, about every 1.3 s.
        """
        down: str | None = None  # why the replay waits, while it does
        while not self._stop.is_set():
            if await asyncio.to_thread(self.spool.pending):
                try:
                    await self.replay_once()
                except (BackendUnavailable, ConfigError) as e:  # the records stay on disk
                    if down is None:
                        log.warning("spool replay waits for the queue (records stay on disk): %s", e)
                    down = str(e)
                except Exception as e:  # never let the replayer die
                    log.warning("spool replay failed: %s: %s", type(e).__name__, e)
                else:
                    if down is not None:
                        log.warning("spool replay: the queue takes the spooled records again")
                    down = None
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass
