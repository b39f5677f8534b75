"""Bodies as files under a directory: the embedded body store (`LLMTAP_BODIES=file`).

Each body is one file at `<root>/<key>`. Writes go to a temporary file in the same directory
and are renamed over the target, so a reader (or a crash) never sees half a body; rewriting a
key (at-least-once redelivery) just replaces it with the same bytes. A batch is written in one
thread hop (`put_many` → one `to_thread`), and directories already created are remembered so
the common case is open-write-rename per body.

With `fsync=True` every file is fsynced before its rename and each touched directory after, so
bodies survive a power loss too (the worker acknowledges only after this returns). It is off by
default: it costs a disk flush per body, and the failure it covers (power loss, not a process
crash) at worst loses bodies of the last moments while their rows survive.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence

from llmtap.bodies.base import BodyStore
from llmtap.errors import BackendUnavailable, TransientError

_counter = itertools.count()
_THREADS = 4
_CHUNK_MIN = 64


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

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        paths = [(self._path(k), v) for k, v in items]  # validate before touching the disk
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
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            except FileNotFoundError:  # the directory went away (retention, an operator)
                os.makedirs(d, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
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
        path = self._path(key)

        def read() -> bytes | None:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        try:
            return await asyncio.to_thread(read)
        except OSError as e:
            raise TransientError(f"reading body {key} failed: {e}") from e

    async def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        paths = [self._path(k) for k in keys]

        def delete() -> None:
            for p in paths:
                _unlink(p)

        await asyncio.to_thread(delete)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
