"""Mergeable latency sketches for the rollups: DDSketch bins, serialized compactly.

The bucket mapping is the `ddsketch` library's `LogarithmicMapping` at 1% relative accuracy:
every positive value `x` lands in a bin whose representative value `v` has `|v - x| <= 0.01 x`.
Two sketches merge by adding bin counts, so a minute's sketch, an hour's and a month's are the
same object, and subtracting a deleted row's bin (retention) is exact.

Quantiles follow PostgreSQL's `percentile_cont` (the raw path's definition): the values at ranks
floor(q (n - 1)) and that + 1 are read from the bins and interpolated. Each is within 1% of the
true value at its rank, and interpolation with non-negative weights keeps that bound, so a
rollup percentile is within `RELATIVE_ACCURACY` of the exact one (zero is exact).

Wire format (a BLOB / bytea): `u32 zero_count`, `u32 n`, then `n` int32 bin keys ascending and
`n` uint32 counts, little-endian: 8 bytes per non-empty bin; latencies between 1 ms and 10 min
span at most ~660 bins.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Iterable

from ddsketch.mapping import LogarithmicMapping

RELATIVE_ACCURACY = 0.01
MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)
_HEAD = struct.Struct("<II")
_LITTLE = sys.byteorder == "little"


def key_of(value: float) -> int | None:
    """The bin of a value (None: the zero bin)."""
    return MAPPING.key(value) if value > MAPPING.min_possible else None


class Sketch:
    """Bin counts of non-negative values (`bins`: key -> count; `zeros`: values ~0)."""

    __slots__ = ("bins", "zeros")

    def __init__(self) -> None:
        self.bins: dict[int, int] = {}
        self.zeros = 0

    @property
    def count(self) -> int:
        return self.zeros + sum(self.bins.values())

    def add(self, value: float, times: int = 1, key: int | None = None) -> None:
        """Count `value` `times` times (a negative `times` removes it: retention); `key` is
        `key_of(value)` when the caller has it already."""
        if value > MAPPING.min_possible:
            if key is None:
                key = MAPPING.key(value)
            n = self.bins.get(key, 0) + times
            if n:
                self.bins[key] = n
            else:
                del self.bins[key]
        else:
            self.zeros += times

    def add_all(self, values: list[float]) -> None:
        """Count every value of `values` (sorted in place). Equal to `add` for each, but with a
        key computed per bin probed, not per value: the values sorted, each bin's end is found
        by galloping then bisecting on `key_of` itself (monotone), so a minute of 100k raw rows
        costs a sort and a few thousand keys."""
        n = len(values)
        if n < 64:  # too few for the probes to pay
            for v in values:
                self.add(v)
            return
        values.sort()
        i = 0
        while i < n and values[i] <= MAPPING.min_possible:
            i += 1
        self.zeros += i
        bins = self.bins
        while i < n:
            k = MAPPING.key(values[i])
            lo, step = i, 1  # values[lo] is in bin k; find the first index past it
            while lo + step < n and MAPPING.key(values[lo + step]) == k:
                lo += step
                step *= 2
            hi = min(lo + step, n)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if MAPPING.key(values[mid]) == k:
                    lo = mid
                else:
                    hi = mid
            c = bins.get(k, 0) + hi - i
            if c:
                bins[k] = c
            else:
                del bins[k]
            i = hi

    def merge(self, other: Sketch) -> None:
        self.zeros += other.zeros
        bins = self.bins
        for k, c in other.bins.items():
            n = bins.get(k, 0) + c
            if n:
                bins[k] = n
            else:
                del bins[k]

    def encode(self) -> bytes:
        bins = self.bins
        keys = sorted(bins)  # `add` and `merge` keep no zero count
        try:  # an unsigned array refuses a negative count
            ks, cs = array("i", keys), array("I", map(bins.__getitem__, keys))
        except OverflowError:
            raise ValueError("a sketch cannot hold a negative count") from None
        if self.zeros < 0:
            raise ValueError("a sketch cannot hold a negative count")
        if not _LITTLE:
            ks.byteswap()
            cs.byteswap()
        return _HEAD.pack(self.zeros, len(keys)) + ks.tobytes() + cs.tobytes()

    @classmethod
    def decode(cls, raw: bytes | None) -> Sketch:
        s = cls()
        if not raw:
            return s
        zeros, n = _HEAD.unpack_from(raw)
        ks, cs = array("i"), array("I")
        ks.frombytes(raw[8 : 8 + 4 * n])
        cs.frombytes(raw[8 + 4 * n : 8 + 8 * n])
        if not _LITTLE:
            ks.byteswap()
            cs.byteswap()
        s.zeros = zeros
        s.bins = dict(zip(ks, cs, strict=True))
        return s

    def quantiles(self, fractions: Iterable[float]) -> list[float | None]:
        """`percentile_cont`-style quantiles (see the module docstring)."""
        n = self.count
        fracs = list(fractions)
        if n <= 0:
            return [None] * len(fracs)
        keys = sorted(self.bins)
        out: list[float | None] = []
        for q in fracs:
            pos = q * (n - 1)
            lo = math.floor(pos)
            v_lo = self._at_rank(keys, lo)
            if lo == pos or lo + 1 >= n:
                out.append(v_lo)
                continue
            v_hi = self._at_rank(keys, lo + 1)
            out.append(v_lo + (v_hi - v_lo) * (pos - lo))
        return out

    def _at_rank(self, keys: list[int], rank: int) -> float:
        """The representative value of the element at 0-based `rank` (as DDSketch reads it)."""
        if rank < self.zeros:
            return 0.0
        seen = self.zeros
        for k in keys:
            seen += self.bins[k]
            if seen > rank:
                return float(MAPPING.value(k))
        return float(MAPPING.value(keys[-1]))
