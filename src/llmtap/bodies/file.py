"""Bodies as files under a directory: the embedded body store (`LLMTAP_BODIES=file`).

Small bodies (the common case) are written *packed*: one `put_many` writes, per key
directory (tenant and day), a single `.pack` file holding the batch's bodies back to back, and
returns refs of the form `<dir>/<pack>.pack#<offset>+<length>`. Creating a file costs ~50 µs of
kernel time; two or three bodies per request made that the largest cost of logging a request,
and one file per batch makes it negligible. Retention removes whole packs (all of one tenant's
day), so it is day-granular for packed bodies.

A body of `PACK_MAX` bytes or more is one file at `<root>/<key>` (its ref is the key).
Every file (pack or single) goes to a temporary file in the same directory and is renamed
into place, so a reader (or a crash) never sees half a body; a redelivered batch writes a new
pack and its rows point at whichever pack was written when the row was first stored. A batch is
written in one thread hop, and directories already created are remembered.

With `fsync=True` every file is fsynced before its rename and each touched directory after, so
bodies survive a power loss too (the worker acknowledges only after this returns). It is off by
default: it costs a disk flush per body, and the failure it covers (power loss, not a process
crash) at worst loses bodies of the last moments while their rows survive.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import shutil
import time
from collections.abc import Sequence
from datetime import date

from llmtap.bodies.base import BodyStore
from llmtap.errors import BackendUnavailable, TransientError

_counter = itertools.count()
_THREADS = 4
_CHUNK_MIN = 64
#: Bodies at least this large get a file of their own; smaller ones are packed.
PACK_MAX = 256 * 1024


class FileBodyStore(BodyStore):
    def __init__(self, root: str, *, fsync: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self.description = f"files in {self.root}"
        self._dirs: set[str] = set()

    async def connect(self) -> None:
        try:
            await asyncio.to_thread(self._check)
        except OSError as e:
            raise BackendUnavailable(f"cannot use {self.root} for bodies: {e.strerror or e}") from None

    def _check(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        probe = os.path.join(self.root, f".probe.{os.getpid()}.{next(_counter)}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
        self._dirs.add(self.root)

    async def close(self) -> None:
        return None

    def _path(self, key: str) -> str:
        """The file for a key; refuses keys that would leave the root."""
        if not key or key.startswith("/") or "\\" in key or "\0" in key:
            raise ValueError(f"invalid body key {key!r}")
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid body key {key!r}")
        return os.path.join(self.root, *parts)

    def _check_key(self, key: str, dirs: set[str]) -> None:
        """`_path`'s checks at a fraction of the cost: each directory once per batch."""
        directory, _, name = key.rpartition("/")
        if name in ("", ".", "..") or "\\" in name or "\0" in name:
            raise ValueError(f"invalid body key {key!r}")
        if directory not in dirs:
            if directory:
                self._path(directory)
            dirs.add(directory)

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        if not items:
            return []
        checked: set[str] = set()
        for k, _ in items:
            self._check_key(k, checked)  # validate every key before touching the disk
        refs: list[str] = [""] * len(items)
        packs: dict[str, list[int]] = {}
        singles: list[int] = []
        for i, (key, data) in enumerate(items):
            if len(data) >= PACK_MAX:
                singles.append(i)
                refs[i] = key
            else:
                packs.setdefault(key.rpartition("/")[0], []).append(i)
        writes: list[tuple[str, bytes]] = [(self._path(items[i][0]), items[i][1]) for i in singles]
        for directory, idx in packs.items():
            name = f"{time.time_ns():x}-{os.getpid()}-{next(_counter)}.pack"
            pack_key = f"{directory}/{name}" if directory else name
            offset = 0
            for i in idx:
                n = len(items[i][1])
                refs[i] = f"{pack_key}#{offset}+{n}"
                offset += n
            writes.append((self._path(pack_key), b"".join(items[i][1] for i in idx)))
        await self._write(writes)
        return refs

    async def _write(self, paths: list[tuple[str, bytes]]) -> None:
        # File creation is syscall-bound and releases the GIL: a few threads per large batch
        # overlap the kernel's work (~1.5x on ext4); small batches stay a single thread hop.
        n = max(1, min(_THREADS, len(paths) // _CHUNK_MIN))
        try:
            if n == 1:
                await asyncio.to_thread(self._write_all, paths)
            else:
                await asyncio.gather(*(asyncio.to_thread(self._write_all, paths[i::n]) for i in range(n)))
        except OSError as e:
            # Disk full, read-only, permissions: an outage of the body store, not the record's fault.
            raise TransientError(f"writing bodies under {self.root} failed: {e}") from e

    def _write_all(self, items: Sequence[tuple[str, bytes]]) -> None:
        pid = os.getpid()
        touched: set[str] = set()
        for path, data in items:
            d = os.path.dirname(path)
            if d not in self._dirs:
                os.makedirs(d, exist_ok=True)
                self._dirs.add(d)
            tmp = f"{path}.{pid}.{next(_counter)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            except FileNotFoundError:  # the directory went away (retention, an operator)
                os.makedirs(d, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fdatasync(fd)
            except BaseException:
                os.close(fd)
                _unlink(tmp)
                raise
            os.close(fd)
            try:
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
            touched.add(d)
        if self.fsync:
            for d in touched:
                dfd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    async def get(self, key: str) -> bytes | None:
        key, _, span = key.partition("#")
        path = self._path(key)
        offset, length = _span(span) if span else (0, -1)
        if length >= PACK_MAX:  # no pack holds one (a hand-made ref: the read allocated it all)
            raise ValueError(f"body ref {key[:200]!r}#{span[:40]} spans more than a pack's body")

        def read() -> bytes | None:
            try:
                with open(path, "rb") as f:
                    if length < 0:
                        return f.read()
                    data = os.pread(f.fileno(), length, offset)
                    return data if len(data) == length else None
            except FileNotFoundError:
                return None

        try:
            return await asyncio.to_thread(read)
        except OSError as e:
            if self._names_no_file(e):
                # A ref no retry can read (a folder, a path through a file, a name too long:
                # a hand-made record). Every other failure is the store's, and passes.
                raise ValueError(f"body ref {key[:200]!r} names no body file: {e.strerror}") from None
            raise TransientError(f"reading body {key} failed: {e}") from e

    def _names_no_file(self, e: OSError) -> bool:
        if e.errno in (errno.EISDIR, errno.ENAMETOOLONG):
            return True
        # Not a directory on the way: the ref goes through a file, unless the root itself is
        # gone (a lost mount replaced by a file): that is an outage.
        return e.errno == errno.ENOTDIR and os.path.isdir(self.root)

    async def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        # A pack ref removes its whole pack (retention deletes a tenant's day at once).
        paths = list(dict.fromkeys(self._path(k.partition("#")[0]) for k in keys))

        def delete() -> None:
            for p in paths:
                _unlink(p)
            # Day, month, year and tenant folders left empty go too (retention left one empty
            # folder a day behind). A writer that finds its folder gone makes it again.
            for d in dict.fromkeys(os.path.dirname(p) for p in paths):
                while d.startswith(self.root + os.sep):
                    self._dirs.discard(d)
                    try:
                        os.rmdir(d)
                    except OSError:  # not empty (or gone): its parents are not empty either
                        break
                    d = os.path.dirname(d)

        await asyncio.to_thread(delete)

    async def erase_many(self, keys: Sequence[str]) -> None:
        """A body of its own goes with its file; a packed one is overwritten with zeros in its
        pack, whose other bodies (other users' requests of that batch) stay readable."""
        spans: dict[str, list[tuple[int, int]]] = {}
        whole: list[str] = []
        for key in keys:
            name, _, span = key.partition("#")
            if span:
                spans.setdefault(self._path(name), []).append(_span(span))
            else:
                whole.append(key)

        def zero() -> None:
            for path, parts in spans.items():
                try:
                    fd = os.open(path, os.O_WRONLY)
                except FileNotFoundError:
                    continue  # gone already (retention)
                try:
                    for offset, length in parts:
                        os.pwrite(fd, bytes(min(length, PACK_MAX)), offset)
                    if self.fsync:
                        os.fdatasync(fd)
                finally:
                    os.close(fd)

        await asyncio.to_thread(zero)
        await self.delete_many(whole)

    async def delete_days_before(self, day: date) -> int:
        def sweep() -> int:
            gone = 0
            for when, path in _day_folders(self.root):
                if when < day:
                    shutil.rmtree(path, ignore_errors=True)
                    self._dirs.discard(path)
                    gone += 1
                    for parent in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
                        try:  # the month and year left empty go too
                            os.rmdir(parent)
                            self._dirs.discard(parent)
                        except OSError:
                            break
            return gone

        return await asyncio.to_thread(sweep)


def _day_folders(root: str) -> list[tuple[date, str]]:
    """(day, path) of every `<tenant>/<yyyy>/<mm>/<dd>` folder under `root`."""
    out: list[tuple[date, str]] = []
    for tenant in _folders(root):
        for year in _folders(tenant.path, 4):
            for month in _folders(year.path, 2):
                for day in _folders(month.path, 2):
                    try:
                        out.append((date(int(year.name), int(month.name), int(day.name)), day.path))
                    except ValueError:
                        continue
    return out


def _folders(path: str, digits: int | None = None) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return [
                e
                for e in it
                if e.is_dir(follow_symlinks=False)
                and (digits is None or (len(e.name) == digits and e.name.isdigit()))
            ]
    except FileNotFoundError:
        return []


def _span(span: str) -> tuple[int, int]:
    offset, _, length = span.partition("+")
    if not (offset.isdigit() and length.isdigit()):
        raise ValueError(f"invalid body ref span {span!r}")
    return int(offset), int(length)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
