"""Statistics for the benchmark: a log-linear latency histogram and throughput summaries.

Latencies are recorded as non-negative integers (nanoseconds) into a histogram whose buckets are
linear below ``2**sub_bits`` (one bucket per value: exact) and then log-linear: every power-of-two
range ``[2**k, 2**(k+1))`` above that is cut into ``2**(sub_bits-1)`` equal buckets, so a bucket's
width never exceeds ``1/2**(sub_bits-1)`` of its values (0.2 % with the default ``sub_bits=10``).
Count, sum, minimum and maximum are kept exactly beside the buckets.

Percentiles use the nearest-rank definition: the value at percentile ``p`` of ``n`` samples is the
sample of rank ``ceil(p/100 * n)`` in sorted order (rank at least 1).  The histogram returns the
middle of that sample's bucket (the sample itself in the exact range), clamped to the exact
minimum and maximum, so a percentile is exact whenever its bucket has width one and otherwise off
by at most half a bucket.  The maximum is always exact.
"""
from __future__ import annotations

import statistics
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Histogram",
    "PERCENTILES",
    "percentile_key",
    "summarize_rates",
    "ratio",
    "spread",
]

# The percentiles every latency figure reports, and the keys they get in results and JSON.
PERCENTILES: Tuple[float, ...] = (50.0, 99.0, 99.9)


def percentile_key(p: float) -> str:
    """``50.0 -> "p50"``, ``99.9 -> "p99_9"`` (a JSON- and identifier-friendly name)."""
    text = ("%g" % p).replace(".", "_")
    return "p" + text


class Histogram:
    """HDR-style log-linear histogram of non-negative integers (nanoseconds by convention)."""

    __slots__ = ("sub_bits", "_counts", "count", "total", "min", "max")

    def __init__(self, sub_bits: int = 10) -> None:
        if not isinstance(sub_bits, int) or not 2 <= sub_bits <= 24:
            raise ValueError(f"sub_bits must be an integer in 2..24, not {sub_bits!r}")
        self.sub_bits = sub_bits
        self._counts: Dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min: Optional[int] = None
        self.max: Optional[int] = None

    # -- bucket arithmetic -------------------------------------------------------------------
    def index_of(self, value: int) -> int:
        """The bucket index holding ``value``."""
        s = self.sub_bits
        if value < (1 << s):
            return value
        shift = value.bit_length() - s
        half = 1 << (s - 1)
        return (1 << s) + (shift - 1) * half + ((value >> shift) - half)

    def bucket_bounds(self, index: int) -> Tuple[int, int]:
        """``(low, high)``: the bucket holds the integers ``low <= v < high``."""
        s = self.sub_bits
        if index < (1 << s):
            return index, index + 1
        half = 1 << (s - 1)
        rel = index - (1 << s)
        shift = rel // half + 1
        low = (half + rel % half) << shift
        return low, low + (1 << shift)

    # -- recording -----------------------------------------------------------------------------
    def record(self, value: int, count: int = 1) -> None:
        """Add ``count`` samples of ``value``."""
        value = int(value)
        if value < 0:
            raise ValueError(f"a histogram records non-negative values, not {value}")
        if count <= 0:
            if count == 0:
                return
            raise ValueError(f"count must be positive, not {count}")
        idx = self.index_of(value)
        self._counts[idx] = self._counts.get(idx, 0) + count
        self.count += count
        self.total += value * count
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def record_many(self, values: Iterable[int]) -> None:
        """Add every value of ``values`` (fast for large arrays: counts distinct values first)."""
        for value, n in Counter(values).items():
            self.record(value, n)

    def merge(self, other: "Histogram") -> None:
        """Add all of ``other``'s samples (same ``sub_bits`` required)."""
        if other.sub_bits != self.sub_bits:
            raise ValueError(
                f"cannot merge histograms with sub_bits {other.sub_bits} and {self.sub_bits}"
            )
        for idx, n in other._counts.items():
            self._counts[idx] = self._counts.get(idx, 0) + n
        self.count += other.count
        self.total += other.total
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max

    # -- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.count

    def buckets(self) -> List[Tuple[int, int, int]]:
        """Non-empty buckets in increasing order as ``(low, high, count)``."""
        return [(*self.bucket_bounds(i), self._counts[i]) for i in sorted(self._counts)]

    def value_at_percentile(self, p: float) -> int:
        """The nearest-rank value at percentile ``p`` (0 < p <= 100), see the module doc."""
        if not 0.0 < p <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], not {p}")
        if self.count == 0 or self.min is None or self.max is None:
            raise ValueError("percentile of an empty histogram")
        if p == 100.0:
            return self.max
        # Exact rational rank: ceil(p * n / 100) computed on integers where p has few decimals.
        rank = max(1, -(-(round(p * 1_000_000) * self.count) // 100_000_000))
        seen = 0
        for idx in sorted(self._counts):
            seen += self._counts[idx]
            if seen >= rank:
                low, high = self.bucket_bounds(idx)
                value = low if high - low == 1 else low + (high - low - 1) // 2
                return min(max(value, self.min), self.max)
        return self.max  # not reached: counts add up to self.count

    def mean(self) -> float:
        if self.count == 0:
            raise ValueError("mean of an empty histogram")
        return self.total / self.count

    def summary(self) -> Dict[str, Any]:
        """``count, min, p50, p99, p99_9, max, mean`` (integers in the recorded unit; mean float)."""
        out: Dict[str, Any] = {"count": self.count}
        if self.count == 0:
            out.update({"min": None, "max": None, "mean": None})
            for p in PERCENTILES:
                out[percentile_key(p)] = None
            return out
        out["min"] = self.min
        for p in PERCENTILES:
            out[percentile_key(p)] = self.value_at_percentile(p)
        out["max"] = self.max
        out["mean"] = self.mean()
        return out

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "sub_bits": self.sub_bits,
            "count": self.count,
            "sum": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": [list(b) for b in self.buckets()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Histogram":
        """Rebuild from :meth:`to_dict` output; checks that the buckets are consistent."""
        h = cls(int(data["sub_bits"]))
        total = 0
        for low, high, n in data["buckets"]:
            idx = h.index_of(int(low))
            if h.bucket_bounds(idx) != (int(low), int(high)) or int(n) <= 0:
                raise ValueError(f"bucket [{low}, {high}) x {n} does not fit sub_bits {h.sub_bits}")
            h._counts[idx] = h._counts.get(idx, 0) + int(n)
            total += int(n)
        if total != int(data["count"]):
            raise ValueError(f"bucket counts add up to {total}, not {data['count']}")
        h.count = total
        h.total = int(data["sum"])
        h.min = None if data["min"] is None else int(data["min"])
        h.max = None if data["max"] is None else int(data["max"])
        return h

    def __repr__(self) -> str:
        if not self.count:
            return "Histogram(empty)"
        s = self.summary()
        return f"Histogram(n={s['count']}, p50={s['p50']}, p99={s['p99']}, max={s['max']})"


def summarize_rates(rates: Sequence[float]) -> Dict[str, Any]:
    """Several trials of one throughput figure: the median is the figure, min/max its spread."""
    if not rates:
        raise ValueError("no trials to summarise")
    values = [float(r) for r in rates]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "trials": values,
    }


def ratio(ours: Optional[float], theirs: Optional[float], higher_is_better: bool) -> Optional[float]:
    """How many times better ``ours`` is than ``theirs`` (>1: pyivshmem is better); None if unknown."""
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return None
    return ours / theirs if higher_is_better else theirs / ours


def spread(values: Sequence[float]) -> Optional[float]:
    """How much the trials of one figure disagree: ``(max - min) / median``; None below two
    trials or when the median is not positive."""
    if len(values) < 2:
        return None
    med = statistics.median(values)
    if not med > 0:
        return None
    return (max(values) - min(values)) / med
