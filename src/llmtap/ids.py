"""Request ids: time-ordered UUIDs (version 7, RFC 9562), cheap to make.

A request id is the second column of every store's primary key (tenant, id). Random (version 4)
ids put each insert on a random page of that index; a version 7 id starts with its millisecond,
so a batch lands on the few pages at the index's end, and ids sort by creation time. Measured
(bench/README, "Request ids"): no throughput difference yet at 2M rows on SQLite or 1M on
PostgreSQL, where the indexes stay in the OS page cache; the locality counts once an index
outgrows memory. 74 bits stay random (unguessable); the millisecond an id reveals is in the
record anyway.

About what `str(uuid.uuid4())` costs (3-4 us; it makes a getrandom syscall and a `UUID` object
per call): one `os.urandom` read serves 200 ids, and the text is cut straight from hex, which
pays for reading the clock. A forked child starts with an empty pool, never its parent's bits.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_POOL_IDS = 200
_HEX_PER_ID = 19  # rand_a 3, the variant digit 1 (2 of its bits random), rand_b 3 + 12
_VARIANT = "89ab"  # RFC 9562 variant bits 10xx: the first hex digit of the 4th group


class _Pool:
    __slots__ = ("hex", "lock", "pos")

    def __init__(self) -> None:
        self.hex = ""
        self.pos = 0
        self.lock = threading.Lock()

    def reset(self) -> None:
        self.hex, self.pos, self.lock = "", 0, threading.Lock()


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.reset)


def new_id() -> str:
    """A fresh version 7 UUID as text, e.g. `019ae4a2-7c1e-7d3a-9f0b-5e2c8a41d6b3`."""
    ms = time.time_ns() // 1_000_000
    pool = _pool
    with pool.lock:
        p = pool.pos
        if p >= len(pool.hex):
            pool.hex = os.urandom(_HEX_PER_ID * _POOL_IDS // 2).hex()
            p = 0
        pool.pos = p + _HEX_PER_ID
        r = pool.hex[p : p + _HEX_PER_ID]
    t = f"{ms & 0xFFFFFFFFFFFF:012x}"
    return f"{t[:8]}-{t[8:]}-7{r[:3]}-{_VARIANT[int(r[3], 16) & 3]}{r[4:7]}-{r[7:19]}"


def canonical_id(text: str) -> str | None:
    """A client's UUID in the one form records are keyed by (lowercase, hyphenated), or None if
    it is not one. `uuid.UUID` also takes braces, `urn:uuid:`, no hyphens and any Unicode
    digit (Arabic-Indic one is 1): only ASCII is accepted, so two spellings that read differently to a
    person never name one record."""
    if not text.isascii():
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None
