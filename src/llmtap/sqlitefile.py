"""A SQLite file watched for being removed or replaced at its path while open.

SQLite keeps using the file it opened: removed (`rm`) or replaced (a restore moved a copy in),
everything written since goes into a file nobody opens again, acknowledged all the same
(outside checks lost records this way, in the store and in the queue). The store and the queue
`check` the path after each commit (one `stat`), and open it again when it changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

#: How often a file missing from its path, its WAL still there, is said again (seconds).
AWAY_SAID_EVERY = 300.0


class FileGone(Exception):
    """The file was removed or replaced while open: what was written since went into a file
    nobody will open again."""


class FileAway(Exception):
    """The file is missing from its path, its WAL still beside the path: moved away (`mv`
    leaves the WAL), maybe for a moment. Nothing is made in its place while that WAL is there:
    a new file made there, and that WAL removed, lost what the file held when it was moved back,
    and another process (or another connection of ours, which SQLite ties to the same file)
    still writing through that WAL parted from it: records lost and a worker stuck for good
    (two outside checks, after 3 s and after 40 s away). The operator moves it back, or removes
    the WAL and shared memory to start anew."""


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

    def __init__(self, path: str | Path, what: str, log: logging.Logger) -> None:
        self.path = str(path)
        self.what = what  # "SQLite queue", for the log lines
        self.log = log
        self.opened: tuple[int, int] | None = None
        self._wal: tuple[tuple[int, int] | None, ...] = (None, None)
        self.away_since: float | None = None  # monotonic time it went missing (`FileAway`)
        self._away_said = 0.0

    def open(self) -> None:
        """Just after connecting: this is the file open."""
        self.opened = identity(self.path)
        self.away_since = None

    def wal_made(self) -> None:
        """After the first write: its WAL and shared memory are the ones at the path now."""
        self._wal = (identity_or_none(f"{self.path}-wal"), identity_or_none(f"{self.path}-shm"))

    def check(self) -> None:
        """Raise `FileGone` unless the file at the path is still the one opened; `FileAway`
        while it is missing and its WAL is still at the path."""
        if self.opened is None:
            return  # not opened yet
        try:
            now = identity(self.path)
        except FileNotFoundError:
            if not self._wal_left():
                raise FileGone("its file was removed") from None
            at = time.monotonic()
            if self.away_since is None or at - self._away_said >= AWAY_SAID_EVERY:
                self.away_since = self.away_since or at
                self._away_said = at
                self.log.error(
                    "%s %s: its file is missing from its path, its WAL still there (moved away?),"
                    " for %.0fs: writes are refused until it is back; to start a new, empty one"
                    " instead, remove %s-wal and %s-shm",
                    self.what, self.path, at - self.away_since, self.path, self.path,
                )  # fmt: skip
            raise FileAway(f"its file is missing from its path ({at - self.away_since:.0f}s)") from None
        except OSError:
            return  # cannot tell (a folder made unreadable): the file open is written and read
        if now != self.opened:
            raise FileGone("its file was replaced")
        if self.away_since is not None:
            self.log.warning("%s %s: its file is back at its path", self.what, self.path)
            self.away_since = None

    def _wal_left(self) -> bool:
        mine = self._wal[0]
        return mine is not None and identity_or_none(f"{self.path}-wal") == mine

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
            return  # moved away, maybe for a moment (or removed alone): its WAL stays with its name
        except OSError:
            return
        for suffix, mine in zip(("-wal", "-shm"), self._wal, strict=True):
            with contextlib.suppress(OSError):
                if mine is not None and identity_or_none(f"{self.path}{suffix}") == mine:
                    os.unlink(f"{self.path}{suffix}")
