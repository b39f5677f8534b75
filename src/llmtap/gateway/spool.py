"""The disk spool: the gateway's last resort when neither the queue nor the ingest endpoint
accepts a batch, and its overflow when the in-memory publish buffer is full.

Append-only segment files under `<data_dir>/spool/`. Each frame is `length (4 bytes) | crc32
(4 bytes) | payload`; a batch is written with one `write` and one `fsync`, so after `append`
returns the records survive a crash or a power loss. A torn last frame (crash mid-write) fails
its checksum and is dropped on read: it was never acknowledged as spooled, and its records
were still in the caller's hands (the caller only forgets a batch once `append` returned).
A corrupt frame elsewhere (a disk error) costs only its own records: the replay reads on from
the next intact frame and keeps the unreadable bytes in `corrupt/`.

Replay takes whole segments oldest first: the writer rotates to a new segment before a segment
is replayed, so a segment being replayed is never appended to. Several gateway processes on one
machine may share the directory: each writes its own segments (named with its pid) and a
segment is replayed under an exclusive `flock`, so no two processes replay the same one.
"""

from __future__ import annotations

import fcntl
import fnmatch
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtap.config import Settings

log = logging.getLogger("llmtap.gateway")

_HEADER = struct.Struct(">II")
#: No frame is empty: eight zero bytes (a crash can leave zeroed blocks) would read as an intact
#: empty frame, crc32(b"") being 0.
_MIN_FRAME = 1
SEGMENT_BYTES = 16 * 1024 * 1024


class SpoolFull(Exception):
    """The spool reached its size limit (`LLMTAP_SPOOL_MAX_BYTES`)."""


def spool_dir(settings: Settings) -> Path:
    return settings.data_dir / "spool"


#: A hidden segment this old was left by a process that died before naming it.
_ABANDONED_AFTER_S = 60.0


def spool_size(settings: Settings) -> int:
    """Bytes waiting in the spool (for `llmtap status`)."""
    return _segment_bytes(spool_dir(settings))


def spool_held(settings: Settings) -> int:
    """Bytes of the segments that hold records the queue refused, waiting for the ingest
    endpoint (`DiskSpool.write_segment`; part of `spool_size`)."""
    return _segment_bytes(spool_dir(settings), f"*{HELD_TAG}.spool")


def spool_unreadable(settings: Settings) -> int:
    """Bytes kept in `spool/corrupt/` (spans a replay could not read; for `llmtap status`)."""
    return _segment_bytes(spool_dir(settings) / "corrupt", "*.bin")


#: How a segment is opened to be read: never through a link, never waiting for a FIFO's writer.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK


def _files(directory: Path, pattern: str = "*.spool") -> Iterator[tuple[Path, os.stat_result]]:
    """The regular files in `directory` whose names match `pattern`, with their `stat`.

    Segments are only ever regular files we made: a link (a loop), a directory or a FIFO of the
    same name is no segment, and read as one it blocked the replay of every segment after it
    for ever, or (a FIFO) its thread and the process's stop (rev21). An entry gone between the
    listing and its `stat` (replayed meanwhile), or that cannot be read, is left out."""
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no spool directory (yet), or one we cannot list
        return
    for entry in entries:
        if not fnmatch.fnmatchcase(entry.name, pattern) or entry.name[:1] == "." != pattern[:1]:
            continue  # a hidden file (macOS's `._x.spool` on a shared volume) is none (rev22)
        try:
            if entry.is_file(follow_symlinks=False):
                yield Path(entry.path), entry.stat(follow_symlinks=False)
        except OSError:
            continue


def _segment_bytes(directory: Path, pattern: str = "*.spool") -> int:
    """Bytes in the segments (`_files`)."""
    return sum(st.st_size for _, st in _files(directory, pattern))


#: The name's end of a segment of records that wait (`DiskSpool.write_segment`).
HELD_TAG = "-held"


class DiskSpool:
    """Durable local overflow for encoded records. Blocking: call from a thread."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._path: Path | None = None
        self._written = 0
        self._seq = 0
        self._stamp = 0  # the newest segment name's stamp (`_next_stamp`)
        self._token = secrets.token_hex(4)  # this writer's, in its segments' names (`_rotate`)
        self._lock = threading.Lock()  # append (sink thread) vs close (replayer thread)
        self.unreadable_bytes = 0  # corrupt spans met on replay (their records are lost)
        self._unreadable_seen: set[str] = set()  # segments said to be unreadable, by name
        #: Spans already kept and said, as (segment name, start, end): a segment read again
        #: (its replay cut short by an outage) says them once, not at every try.
        self._kept: set[tuple[str, int, int]] = set()

    # -- writing ------------------------------------------------------------------------------
    def append(self, values: Sequence[bytes]) -> None:
        """Write the batch durably (one write, one fsync). Raises `SpoolFull` over the limit."""
        if not values:
            return
        frames = self._framed(values)
        with self._lock:
            self._room(len(frames), 0)
            if self._fd is None or self._written >= SEGMENT_BYTES:
                self._rotate()
            try:
                self._write_all(frames)
            except OSError:
                self._undo_write()
                raise
            self._written += len(frames)

    def write_segment(self, values: Sequence[bytes], freeing: int = 0) -> Path:
        """Write `values` durably to a closed segment of their own (records that wait:
        `SpoolReplayer`; its name ends in `HELD_TAG`, so every process sharing the spool knows
        to leave it alone a while), counting `freeing` bytes about to be deleted as free."""
        frames = self._framed(values)
        with self._lock:
            self._room(len(frames), freeing)
            self._rotate(HELD_TAG)
            path = self._path
            assert path is not None
            try:
                self._write_all(frames)
            except OSError:
                self._close()
                path.unlink(missing_ok=True)
                raise
            self._close()  # the next append begins another segment
            return path

    @staticmethod
    def _framed(values: Sequence[bytes]) -> bytes:
        return b"".join(_HEADER.pack(len(v), zlib.crc32(v)) + v for v in values)

    def _room(self, size: int, freeing: int) -> None:
        if self.size() - freeing + size > self.max_bytes:
            raise SpoolFull(f"spool at {self.dir} is full ({self.max_bytes} bytes)")

    def _write_all(self, frames: bytes) -> None:
        """One write (looping over partial writes) and one fsync of the open segment."""
        assert self._fd is not None
        view = memoryview(frames)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def _undo_write(self) -> None:
        """After a failed write (a full disk): cut off what part of the batch got written, so
        a later batch never follows a torn frame (a replay stops at one: what came after it
        would be lost), and remove a segment left empty (one per attempt piled up on a disk
        that stayed full)."""
        assert self._fd is not None and self._path is not None
        try:
            os.ftruncate(self._fd, self._written)
        except OSError:
            log.error("spool: cannot cut a failed write off %s; closing it", self._path)
            self._written = SEGMENT_BYTES  # the next batch goes to a new segment
            return
        if self._written == 0:
            path = self._path
            self._close()
            path.unlink(missing_ok=True)

    def _rotate(self, tag: str = "") -> None:
        self._close()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        # The pid alone is no writer's own: containers sharing a spool volume are all pid 1,
        # and two whose clocks lag the newest segment name the same stamp (deploy audit).
        name = f"{self._next_stamp():020d}-{os.getpid()}.{self._token}-{self._seq:06d}{tag}.spool"
        self._path = self.dir / name
        # Created under a name no replayer lists, locked, then named: a replayer never sees it
        # unlocked (it would take the empty file for one a failed write left, and delete it).
        hidden = self.dir / f".{name}.new"
        self._fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        # Held while we write it: a replayer in another process skips a segment still growing.
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.rename(hidden, self._path)
        self._written = 0
        # Make the new file's directory entry durable too.
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _next_stamp(self) -> int:
        """A new segment's name, which orders the replay: the clock, but always after every
        segment already there. A clock stepped back (NTP, a VM restored) named a new segment
        before older ones, and their records were replayed after its own: a request id logged
        twice kept the later copy, not the first."""
        newest = self._stamp
        for path, _ in _files(self.dir):
            head = path.name.partition("-")[0]
            if head.isdigit():
                newest = max(newest, int(head))
        self._stamp = max(time.time_ns(), newest + 1)
        return self._stamp

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._path = None

    def size(self) -> int:
        return _segment_bytes(self.dir)

    def stats(self) -> tuple[int, int, float]:
        """(bytes waiting, bytes of them held for the ingest endpoint, seconds since the oldest
        segment not held was last written: 0 when none waits), in one listing. That age growing
        while the queue takes records is a replay that makes no progress (rev18a: a record the
        queue refused held the spool for ever, and only its size said anything); held segments
        are rewritten at each try, so their bytes say they wait (rev19). Blocking: a thread."""
        total = held = 0
        oldest = None
        for path, st in _files(self.dir):  # one entry must not fail every metric (rev20)
            total += st.st_size
            if path.name.endswith(HELD_TAG + ".spool"):
                held += st.st_size
            else:
                oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        return total, held, 0.0 if oldest is None else max(0.0, time.time() - oldest)

    # -- replaying ----------------------------------------------------------------------------
    def pending(self) -> bool:
        return any(True for _ in _files(self.dir))

    def segments_for_replay(self) -> list[Path]:
        """Segments to replay, oldest first. Closes our own open segment so it is included."""
        self.close()
        for stale, _ in _files(self.dir, ".*.spool.new"):  # a process died between creating and naming one
            self._drop_if_abandoned(stale)
        return sorted(path for path, _ in _files(self.dir))

    @staticmethod
    def _drop_if_abandoned(path: Path) -> None:
        # Only an old one: a writer opens it, then locks it, and must find it there to name it.
        try:
            if time.time() - path.stat().st_mtime < _ABANDONED_AFTER_S:
                return
            fd = os.open(path, _READ_FLAGS)
        except OSError:  # gone, or replaced by what is no file since the listing
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its creator still holds it: alive
            if os.fstat(fd).st_size == 0:
                path.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)

    def replay(self, path: Path) -> Iterator[list[bytes]]:
        """Yield the segment's records in batches, under an exclusive lock.

        The caller deletes the segment with `done(path)` after publishing every batch; if it
        stops half-way the whole segment is replayed again later (at least once; the store
        keeps one row per request id).
        """
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            return
        except OSError as e:  # unreadable: the segments after it go on (rev21)
            self._unreadable_once(path, e)
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the listing
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process is replaying it, or still writing it
            size = os.fstat(fd).st_size
            if size == 0:  # nobody writes it (a writer holds the lock): left by a failed write
                path.unlink(missing_ok=True)
                return
            try:
                data = os.read(fd, size)
            except OSError as e:  # a disk error (EIO), NFS's ESTALE: the segments after it go on
                self._unreadable_once(path, e)
                return
            batch: list[bytes] = []
            bad: list[tuple[int, int]] = []
            torn: list[tuple[int, int]] = []
            for value in _frames(data, bad, torn):
                batch.append(value)
                if len(batch) >= 500:
                    yield batch
                    batch = []
            self._keep_unreadable(path, data, bad)
            self._keep_unreadable(path, data, torn, torn=True)
            if batch:
                yield batch
        finally:
            os.close(fd)

    def _unreadable_once(self, path: Path, e: OSError) -> None:
        """Say once per segment that it cannot be read: it stays where it is (its records may
        come back with the disk, or be read by hand) and the replay goes on without it."""
        if path.name in self._unreadable_seen:
            return
        if len(self._unreadable_seen) >= 10_000:
            self._unreadable_seen.clear()
        self._unreadable_seen.add(path.name)
        log.warning(
            "spool: cannot read segment %s (%s: %s): its records wait there; the others are replayed",
            path, type(e).__name__, e,
        )  # fmt: skip

    def _keep_unreadable(
        self, path: Path, data: bytes, bad: list[tuple[int, int]], torn: bool = False
    ) -> None:
        """Copy each unreadable span to `corrupt/` (the records in it may still be read by hand)
        and say so: the segment itself is deleted once its intact frames are replayed. A torn
        tail is said too: a crash mid-write (never acknowledged) leaves one, and so does a file
        cut short by hand or by a disk, which lost every frame after the cut without a word."""
        for a, b in bad:
            if (path.name, a, b) in self._kept:
                continue
            if len(self._kept) >= 10_000:
                self._kept.clear()
            self._kept.add((path.name, a, b))
            kept = self.dir / "corrupt" / f"{path.stem}.{a}.bin"
            try:
                kept.parent.mkdir(exist_ok=True)
                kept.write_bytes(data[a:b])
            except OSError as e:
                kept = Path(f"nowhere ({e})")
            self.unreadable_bytes += b - a
            if torn:
                log.warning(
                    "spool: %s ends in %d bytes that are not a whole record (a write cut short by a"
                    " crash, never acknowledged; or the file cut short: the records after the cut"
                    " are lost); the bytes are kept in %s",
                    path.name, b - a, kept,
                )  # fmt: skip
                continue
            log.error(
                "spool: %d unreadable bytes at byte %d of %s (a disk error?): the records in them are lost; "
                "the bytes are kept in %s, the frames after them replayed",
                b - a,
                a,
                path.name,
                kept,
            )

    @staticmethod
    def done(path: Path) -> None:
        path.unlink(missing_ok=True)


def _frames(
    data: bytes, bad: list[tuple[int, int]] | None = None, torn: list[tuple[int, int]] | None = None
) -> Iterator[bytes]:
    """The intact frames of a segment. Past a corrupt frame (a disk error, not a torn tail) the
    next intact one is found and reading goes on: one bad spot costs the frames in it, not every
    frame after it. Unreadable spans go to `bad` as (start, end); a torn tail (a crash mid-write,
    never acknowledged) is not one."""
    pos, end = 0, len(data)
    while pos + _HEADER.size <= end:
        length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        value = data[start : start + length]
        if length >= _MIN_FRAME and len(value) == length and zlib.crc32(value) == crc:
            yield value
            pos = start + length
            continue
        nxt = _next_frame(data, pos + 1)
        if nxt is None:
            if start + length < end or length < _MIN_FRAME:
                if bad is not None:
                    bad.append((pos, end))  # not the shape of a torn tail
            elif torn is not None:
                torn.append((pos, end))
            return
        if bad is not None:
            bad.append((pos, nxt))
        pos = nxt
    if pos < end and torn is not None:  # less than a frame's header left
        torn.append((pos, end))


def _next_frame(data: bytes, pos: int) -> int | None:
    """Where the next intact frame starts at or after `pos`, if anywhere. Payloads are a key and
    JSON text, which has no byte below 0x20, so a frame's length (at most the bytes left) starts
    with a byte no larger than `(bytes left) >> 24`: only such bytes are tried."""
    end = len(data)
    top = min(255, max(0, end - pos - _HEADER.size) >> 24)
    candidates = re.compile(b"[\\x00-" + re.escape(bytes([top])) + b"]")
    for m in candidates.finditer(data, pos, max(pos, end - _HEADER.size - _MIN_FRAME + 1)):
        p = m.start()
        length, crc = _HEADER.unpack_from(data, p)
        start = p + _HEADER.size
        if _MIN_FRAME <= length <= end - start and zlib.crc32(data[start : start + length]) == crc:
            return p
    return None
