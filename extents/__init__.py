"""Extent maps: the data structure under every page-granular fact in memhp-emu.

A 16 TiB guest has 4 Gi pages, so nothing here stores anything per page. A
:class:`RangeMap` is a step function over PFNs: a sorted list of run starts and
the value of each run, with equal neighbours always merged. Setting a range
costs ``O(log n)`` to find it plus a list splice (a C ``memmove``); reading a
range costs the number of runs it crosses. It also keeps, for every value, how
many pages currently hold it, so totals (free pages, PageOffline pages, ...)
are O(1).

This is a leaf package: pure Python, no I/O and no import of the rest of the
project, so the guest memory model (``guest.mm``) and the hypervisor's
ground-truth backing (``hypervisor``) can both build on it without either
importing the other.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V", bound=Hashable)

__all__ = ["RangeMap", "RangeSet"]


class RangeMap(Generic[V]):
    """A map from every PFN in ``[0, limit)`` to a value, stored as runs."""

    __slots__ = ("_starts", "_totals", "_values", "default", "limit")

    def __init__(self, default: V, limit: int = 1 << 52) -> None:
        self.default = default
        self.limit = limit
        self._starts: list[int] = [0]
        self._values: list[V] = [default]
        self._totals: dict[V, int] = {default: limit}

    # -- reading ---------------------------------------------------------------

    def __len__(self) -> int:
        """Number of runs (the cost unit of this structure)."""
        return len(self._starts)

    def _index(self, pfn: int) -> int:
        return bisect_right(self._starts, pfn) - 1

    def _run_end(self, index: int) -> int:
        return self._starts[index + 1] if index + 1 < len(self._starts) else self.limit

    def get(self, pfn: int) -> V:
        self._check(pfn, pfn + 1)
        return self._values[self._index(pfn)]

    def run_at(self, pfn: int) -> tuple[int, int, V]:
        """The whole run (start, end, value) that holds ``pfn``."""
        self._check(pfn, pfn + 1)
        i = self._index(pfn)
        return self._starts[i], self._run_end(i), self._values[i]

    def runs(
        self, start: int = 0, end: int | None = None, *, clip: bool = True
    ) -> list[tuple[int, int, V]]:
        """The runs that overlap ``[start, end)`` in ascending order, clipped unless told.

        A list, not a generator: a snapshot, so the caller may change the map while it
        walks the runs (and a walk over one or two runs, the common case, costs less).
        """
        end = self.limit if end is None else end
        if start >= end:
            return []
        if start < 0 or end > self.limit:
            self._check(start, end)
        starts, values = self._starts, self._values
        n = len(starts)
        i = bisect_right(starts, start) - 1
        j = bisect_right(starts, end - 1, i)  # runs i .. j-1 overlap the range
        limit = self.limit
        out: list[tuple[int, int, V]] = []
        for k in range(i, j):
            s = starts[k]
            e = starts[k + 1] if k + 1 < n else limit
            if clip:
                out.append((s if s > start else start, e if e < end else end, values[k]))
            else:
                out.append((s, e, values[k]))
        return out

    def total(self, value: V) -> int:
        """How many pages in the whole map hold ``value``."""
        return self._totals.get(value, 0)

    def totals(self) -> dict[V, int]:
        return {v: n for v, n in self._totals.items() if n}

    def count(self, start: int, end: int, value: V) -> int:
        """How many pages in ``[start, end)`` hold ``value``."""
        return sum(e - s for s, e, v in self.runs(start, end) if v == value)

    def all_equal(self, start: int, end: int, value: V) -> bool:
        if start >= end:
            return True
        self._check(start, end)
        starts, values = self._starts, self._values
        i = bisect_right(starts, start) - 1
        n = len(starts)
        while True:
            if values[i] != value:
                return False
            i += 1
            if i >= n or starts[i] >= end:
                return True

    # -- writing ---------------------------------------------------------------

    def set(self, start: int, end: int, value: V) -> None:
        """Give every PFN in ``[start, end)`` the value ``value``."""
        if start >= end:
            return
        if start < 0 or end > self.limit:
            self._check(start, end)
        starts, values, totals = self._starts, self._values, self._totals
        n = len(starts)
        i = bisect_right(starts, start) - 1
        j = bisect_right(starts, end - 1, i) - 1
        # Account the pages that change value.
        if i == j:
            old = values[i]
            if old == value:
                return  # inside one run that already holds it: nothing changes
            totals[old] -= end - start
        else:
            totals[values[i]] -= starts[i + 1] - start
            for k in range(i + 1, j):
                totals[values[k]] -= starts[k + 1] - starts[k]
            totals[values[j]] -= end - starts[j]
        totals[value] = totals.get(value, 0) + (end - start)
        # Rebuild runs lo..hi-1: the runs i..j and one neighbour on each side, so that
        # merges with equal neighbours happen here. Piece starts strictly increase;
        # a piece whose value equals the one before it is dropped (merged).
        lo = i - 1 if i > 0 else 0
        hi = j + 2 if j + 2 < n else n
        new_starts: list[int] = []
        new_values: list[V] = []
        if i > 0:
            new_starts.append(starts[i - 1])
            new_values.append(values[i - 1])
        if starts[i] < start and (not new_values or new_values[-1] != values[i]):
            new_starts.append(starts[i])
            new_values.append(values[i])
        if not new_values or new_values[-1] != value:
            new_starts.append(start)
            new_values.append(value)
        tail_end = starts[j + 1] if j + 1 < n else self.limit
        if end < tail_end and new_values[-1] != values[j]:
            new_starts.append(end)
            new_values.append(values[j])
        if j + 1 < n and new_values[-1] != values[j + 1]:
            new_starts.append(starts[j + 1])
            new_values.append(values[j + 1])
        starts[lo:hi] = new_starts
        values[lo:hi] = new_values

    def _check(self, start: int, end: int) -> None:
        if start < 0 or end > self.limit:
            raise IndexError(f"PFN range [{start:#x}, {end:#x}) outside [0, {self.limit:#x})")


class RangeSet:
    """A set of PFNs stored as disjoint, merged ranges."""

    __slots__ = ("_map",)

    def __init__(self, limit: int = 1 << 52) -> None:
        self._map: RangeMap[bool] = RangeMap(False, limit)

    def add(self, start: int, end: int) -> None:
        self._map.set(start, end, True)

    def remove(self, start: int, end: int) -> None:
        self._map.set(start, end, False)

    def __contains__(self, pfn: object) -> bool:
        return isinstance(pfn, int) and 0 <= pfn < self._map.limit and self._map.get(pfn)

    def __len__(self) -> int:
        """Number of pages in the set."""
        return self._map.total(True)

    def __bool__(self) -> bool:
        return len(self) > 0

    def first(self) -> tuple[int, int] | None:
        """The lowest range of the set (None: empty), without looking at the others."""
        m = self._map
        starts, values = m._starts, m._values
        # Equal neighbours always merge, so runs alternate: the first True is run 0 or 1.
        for k in range(min(2, len(values))):
            if values[k]:
                return starts[k], starts[k + 1] if k + 1 < len(starts) else m.limit
        return None

    def ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """The set's ranges clipped to ``[start, end)``."""
        for s, e, v in self._map.runs(start, end):
            if v:
                yield s, e

    def extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The set's whole (unclipped) ranges that overlap ``[start, end)``."""
        for s, e, v in self._map.runs(max(start, 0), min(end, self._map.limit), clip=False):
            if v:
                yield s, e

    def holes(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The ranges of ``[start, end)`` that are *not* in the set."""
        for s, e, v in self._map.runs(start, end):
            if not v:
                yield s, e

    def count(self, start: int, end: int) -> int:
        return self._map.count(start, end, True)

    def covers(self, start: int, end: int) -> bool:
        return self._map.all_equal(start, end, True)

    def disjoint(self, start: int, end: int) -> bool:
        return self._map.all_equal(start, end, False)

    def copy(self) -> RangeSet:
        other = RangeSet(self._map.limit)
        for s, e in self.ranges():
            other.add(s, e)
        return other

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self.ranges()) == list(other.ranges())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "RangeSet(" + ", ".join(f"[{s:#x}, {e:#x})" for s, e in self.ranges()) + ")"
