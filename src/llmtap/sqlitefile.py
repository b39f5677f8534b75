"""A SQLite file watched for being removed or replaced at its path while open.

SQLite keeps using the file it opened: removed (`rm`) or replaced (a restore moved a copy in),
everything written since goes into a file nobody opens again, acknowledged all the same
(outside checks lost records this way, in the store and in the queue). The store and the queue
`check` the path after each commit (one `stat`), and open it again when it changed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class FileGone(Exception):
    """The file was removed or replaced while open: what was written since went into a file
    nobody will open again."""


def identity(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def identity_or_none(path: str | Path) -> tuple[int, int] | None:
    try:
        return identity(path)
    except OSError:
        return None


class WatchedFile:
    """The (device, inode) of a SQLite file as opened, and of its WAL and shared memory."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.opened: tuple[int, int] | None = None
        self._wal: tuple[tuple[int, int] | None, ...] = (None, None)

    def open(self) -> None:
        """Just after connecting: this is the file open."""
        self.opened = identity(self.path)

    def wal_made(self) -> None:
        """After the first write: its WAL and shared memory are the ones at the path now."""
        self._wal = (identity_or_none(f"{self.path}-wal"), identity_or_none(f"{self.path}-shm"))

    def check(self) -> None:
        """Raise `FileGone` unless the file at the path is still the one opened."""
        if self.opened is None:
            return  # not opened yet
        try:
            now = identity(self.path)
        except FileNotFoundError:
            raise FileGone("its file was removed") from None
        except OSError:
            return  # cannot tell (a folder made unreadable): the file open is written and read
        if now != self.opened:
            raise FileGone("its file was replaced")

    def drop_stale_wal(self) -> None:
        """After the last connection closed: a WAL and shared memory at the path that are the
        closed file's (it was replaced) are removed. SQLite leaves them when its file has
        moved, and replayed them onto the next file opened at the path: a restored copy came up
        with broken indexes (outside check)."""
        if self.opened is None:
            return
        try:
            if identity(self.path) == self.opened:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return
        for suffix, mine in zip(("-wal", "-shm"), self._wal, strict=True):
            with contextlib.suppress(OSError):
                if mine is not None and identity_or_none(f"{self.path}{suffix}") == mine:
                    os.unlink(f"{self.path}{suffix}")
