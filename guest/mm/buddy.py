"""The buddy allocator of one zone, kept as free extents with per-order free lists.

Linux keeps ``free_area[order]`` lists of aligned ``2^order`` blocks and merges a
freed block with its buddy. Free memory here is a set of extents (neighbours
merge on free, which is what coalescing amounts to), and every extent is
decomposed on the fly into its maximal aligned buddy blocks
(:func:`guest.mm.geometry.buddy_blocks`). The per-order free lists hold
extents: ``lists[order]`` is the (ordered) list of extents that contain at least
one block of exactly that order, and ``nr_free[order]`` counts the blocks, as
``/proc/buddyinfo`` would.

Allocation follows ``__rmqueue_smallest``: the smallest order with a free block
wins, the block comes from the head of that list, ``expand()`` returns its low
end and puts the split-off upper parts back at the head of the lower lists.
Freeing puts the merged extent at the head of its lists, or at the tail with
``to_tail`` (``FPI_TO_TAIL``, what hotplug onlining uses). Two simplifications,
both deliberate: an extent's blocks of one order sit together on a list (so
bulk allocations take consecutive blocks of one extent in a single step), and
migratetypes other than "isolated" are not modelled.

Pages in isolated pageblocks (``MIGRATE_ISOLATE``, e.g. during onlining) are
free but not allocatable; they live in :attr:`FreeArea.isolated`.
"""

from __future__ import annotations

from collections import OrderedDict

from extents import RangeSet
from guest.mm.geometry import MAX_PAGE_ORDER, buddy_blocks

NR_PAGE_ORDERS = MAX_PAGE_ORDER + 1


class FreeArea:
    """Free pages of one zone."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.free = RangeSet()
        self.isolated = RangeSet()
        self.lists: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(NR_PAGE_ORDERS)]
        self.nr_free = [0] * NR_PAGE_ORDERS

    # -- counters --------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        """NR_FREE_PAGES: allocatable plus isolated free pages."""
        return len(self.free) + len(self.isolated)

    @property
    def allocatable_pages(self) -> int:
        return len(self.free)

    def buddyinfo(self) -> list[int]:
        """Free blocks per order (one line of ``/proc/buddyinfo``)."""
        return list(self.nr_free)

    # -- the order index -------------------------------------------------------

    def _unindex(self, start: int, end: int) -> None:
        for order, _, count in buddy_blocks(start, end):
            self.lists[order].pop(start, None)
            self.nr_free[order] -= count

    def _index(self, start: int, end: int, *, to_tail: bool) -> None:
        for order, _, count in buddy_blocks(start, end):
            lst = self.lists[order]
            lst[start] = None
            if not to_tail:
                lst.move_to_end(start, last=False)
            self.nr_free[order] += count

    def _extents_touching(self, start: int, end: int) -> list[tuple[int, int]]:
        """Whole free extents that overlap or border ``[start, end)``."""
        return list(self.free.extents(start - 1, end + 1))

    # -- free and take ---------------------------------------------------------

    def free_range(
        self, start: int, end: int, *, to_tail: bool = False, isolated: bool = False
    ) -> None:
        """Put ``[start, end)`` (not free now) into the buddy; merges with neighbours."""
        if isolated:
            self.isolated.add(start, end)
            return
        for s, e in self._extents_touching(start, end):
            self._unindex(s, e)
        self.free.add(start, end)
        for whole_start, whole_end in self.free.extents(start, start + 1):
            self._index(whole_start, whole_end, to_tail=to_tail)

    def take_range(self, start: int, end: int) -> None:
        """Remove specific free pages ``[start, end)`` from the allocatable lists."""
        touched = [(s, e) for s, e in self._extents_touching(start, end) if s < end and e > start]
        for s, e in touched:
            self._unindex(s, e)
        self.free.remove(start, end)
        for s, e in touched:
            if s < start:
                self._index(s, start, to_tail=False)
            if e > end:
                self._index(end, e, to_tail=False)

    def isolate(self, start: int, end: int) -> None:
        """``start_isolate_page_range``: free pages in the range stop being allocatable."""
        for s, e in list(self.free.ranges(start, end)):
            self.take_range(s, e)
            self.isolated.add(s, e)

    def unisolate(self, start: int, end: int, *, to_tail: bool = True) -> None:
        """``undo_isolate_page_range``: isolated free pages become allocatable."""
        for s, e in list(self.isolated.ranges(start, end)):
            self.isolated.remove(s, e)
            self.free_range(s, e, to_tail=to_tail)

    def drop_isolated(self, start: int, end: int) -> int:
        """Take isolated free pages out of the zone (offlining); returns how many."""
        n = self.isolated.count(start, end)
        self.isolated.remove(start, end)
        return n

    def alloc(self, order: int, count: int) -> list[tuple[int, int]]:
        """Allocate up to ``count`` blocks of ``order``; returns the ranges taken.

        Fewer blocks than asked means the zone ran out (the caller reports -ENOMEM).
        """
        taken: list[tuple[int, int]] = []
        need = count
        while need > 0:
            found = order
            while found < NR_PAGE_ORDERS and not self.lists[found]:
                found += 1
            if found == NR_PAGE_ORDERS:
                break
            extent_start = next(iter(self.lists[found]))
            extent_end = next(self.free.extents(extent_start, extent_start + 1))[1]
            first, blocks = next(
                (pfn, n) for o, pfn, n in buddy_blocks(extent_start, extent_end) if o == found
            )
            available = blocks << (found - order)
            n = min(need, available)
            start, end = first, first + (n << order)
            self.take_range(start, end)
            taken.append((start, end))
            need -= n
        return taken

    def check(self) -> list[str]:
        """Consistency of the order index with the free extents (for tests)."""
        problems: list[str] = []
        expected = [0] * NR_PAGE_ORDERS
        members: list[set[int]] = [set() for _ in range(NR_PAGE_ORDERS)]
        for s, e in self.free.ranges():
            for order, _, count in buddy_blocks(s, e):
                expected[order] += count
                members[order].add(s)
        if expected != self.nr_free:
            problems.append(f"{self.name}: nr_free {self.nr_free} != {expected}")
        for order in range(NR_PAGE_ORDERS):
            if set(self.lists[order]) != members[order]:
                problems.append(f"{self.name}: free list of order {order} out of sync")
        if any(True for _ in _overlap(self.free, self.isolated)):
            problems.append(f"{self.name}: page both free and isolated")
        return problems


def _overlap(a: RangeSet, b: RangeSet) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in a.ranges():
        out.extend(b.ranges(s, e))
    return out
