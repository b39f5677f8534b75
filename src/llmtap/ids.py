"""Request ids: random (version 4) UUIDs without a system call each.

`str(uuid.uuid4())` reads 16 bytes from the kernel per call and builds a `UUID` object to
print it (~5 us); the gateway makes one per request. Here one `os.urandom` read serves 128 ids
and the text is cut straight from its hex: the same randomness source, the same 122 random
bits and the same format. A forked child starts with an empty pool, never its parent's ids.
"""

from __future__ import annotations

import os
import threading

_POOL_IDS = 128
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
    """A fresh random UUID (version 4) as text, e.g. `1b4e28ba-2fa1-41d2-883f-0016d3cca427`."""
    pool = _pool
    with pool.lock:
        p = pool.pos
        if p >= len(pool.hex):
            pool.hex = os.urandom(16 * _POOL_IDS).hex()
            p = 0
        pool.pos = p + 32
        h = pool.hex[p : p + 32]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
