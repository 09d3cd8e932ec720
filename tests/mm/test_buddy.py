"""The buddy allocator model: __rmqueue_smallest, expand(), coalescing, isolation."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from guest.mm.buddy import NR_PAGE_ORDERS, FreeArea
from guest.mm.geometry import MAX_PAGE_ORDER


def ref_blocks(free: set[int]) -> list[tuple[int, int]]:
    """Maximal aligned buddy blocks (pfn, order) of a set of free pages, computed naively.

    A fully coalesced buddy allocator holds exactly these: a 2^o block is free as one
    piece iff all its pages are free and its parent block is not (or o is the max).
    """
    out: list[tuple[int, int]] = []
    pfns = sorted(free)
    i = 0
    while i < len(pfns):
        j = i
        while j + 1 < len(pfns) and pfns[j + 1] == pfns[j] + 1:
            j += 1
        start, end = pfns[i], pfns[j] + 1
        pfn = start
        while pfn < end:
            order = MAX_PAGE_ORDER
            while order > 0 and (pfn % (1 << order) or pfn + (1 << order) > end):
                order -= 1
            out.append((pfn, order))
            pfn += 1 << order
        i = j + 1
    return out


def ref_buddyinfo(free: set[int]) -> list[int]:
    info = [0] * NR_PAGE_ORDERS
    for _, order in ref_blocks(free):
        info[order] += 1
    return info


def pages(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for s, e in ranges for p in range(s, e)}


# -- allocation order ------------------------------------------------------------


def test_smallest_order_first_and_expand() -> None:
    area = FreeArea("Normal")
    area.free_range(1024, 2048)  # one order-10 block
    area.free_range(3, 4)  # one order-0 block
    area.free_range(6, 8)  # one order-1 block
    assert area.buddyinfo() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    # Order 0 is served from the order-0 list before anything is split.
    assert area.alloc(0, 1) == [(3, 4)]
    # Next order-0 request splits the order-1 block and returns its low half.
    assert area.alloc(0, 1) == [(6, 7)]
    assert area.buddyinfo() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    # An order-1 request must split the order-10 block: expand() leaves one block of
    # every order 1..9 behind (the upper halves), and we get the lowest 2 pages.
    assert area.alloc(1, 1) == [(1024, 1026)]
    assert area.buddyinfo() == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert area.check() == []
    # The split-off halves are real blocks: order 9 is at 1536, order 1 at 1026.
    assert area.alloc(9, 1) == [(1536, 2048)]
    assert area.alloc(1, 1) == [(1026, 1028)]
    assert area.free_pages == 1 + (1024 - 2 - 512 - 2)
    assert area.check() == []


def test_alloc_returns_aligned_blocks() -> None:
    area = FreeArea("Normal")
    area.free_range(3, 3000)
    for order in (0, 3, 7, 9, 2, 0, 1):
        for s, e in area.alloc(order, 2):
            assert s % (1 << order) == 0
            assert (e - s) % (1 << order) == 0
        assert area.check() == []


def test_alloc_reports_shortfall() -> None:
    area = FreeArea("Normal")
    area.free_range(0, 1024)
    taken = area.alloc(9, 5)
    assert taken == [(0, 1024)]  # only two order-9 blocks exist
    assert area.free_pages == 0
    assert area.alloc(0, 1) == []
    assert area.buddyinfo() == [0] * NR_PAGE_ORDERS


def test_alloc_larger_than_max_order_fails() -> None:
    area = FreeArea("Normal")
    area.free_range(0, 4096)
    assert area.alloc(MAX_PAGE_ORDER + 1, 1) == []
    assert area.free_pages == 4096


def test_free_head_is_lifo_and_to_tail_goes_last() -> None:
    area = FreeArea("Normal")
    area.free_range(0, 1024)
    area.free_range(4096, 5120)  # freed later, to the head: used first
    area.free_range(8192, 9216, to_tail=True)  # FPI_TO_TAIL: used last
    assert area.alloc(10, 1) == [(4096, 5120)]
    assert area.alloc(10, 1) == [(0, 1024)]
    assert area.alloc(10, 1) == [(8192, 9216)]


# -- coalescing ------------------------------------------------------------------


def test_two_buddies_coalesce_into_the_next_order() -> None:
    area = FreeArea("Normal")
    area.free_range(512, 1024)
    assert area.buddyinfo()[9] == 1
    area.free_range(0, 512)  # its buddy
    info = area.buddyinfo()
    assert info[9] == 0 and info[10] == 1
    assert area.check() == []


def test_non_buddies_do_not_coalesce() -> None:
    area = FreeArea("Normal")
    area.free_range(512, 1024)
    area.free_range(1024, 1536)  # adjacent but not buddies (different parents)
    info = area.buddyinfo()
    assert info[9] == 2 and info[10] == 0
    area.free_range(0, 512)
    info = area.buddyinfo()
    assert info[10] == 1 and info[9] == 1  # [0,1024) merged, [1024,1536) still order 9
    assert area.check() == []


def test_single_pages_coalesce_all_the_way_up() -> None:
    area = FreeArea("Normal")
    for pfn in range(1024):
        area.free_range(pfn, pfn + 1)
    assert area.buddyinfo() == [0] * 10 + [1]
    assert area.check() == []


# -- take / isolate ---------------------------------------------------------------


def test_take_range_splits_the_block() -> None:
    area = FreeArea("Normal")
    area.free_range(0, 1024)
    area.take_range(100, 200)
    assert area.free_pages == 924
    assert list(area.free.ranges()) == [(0, 100), (200, 1024)]
    assert area.buddyinfo() == ref_buddyinfo(set(range(100)) | set(range(200, 1024)))
    assert area.check() == []
    # Taking pages that are not free changes nothing.
    area.take_range(100, 200)
    assert area.free_pages == 924
    assert area.check() == []


def test_isolate_keeps_pages_free_but_not_allocatable() -> None:
    area = FreeArea("Movable")
    area.free_range(0, 4096)
    before = area.buddyinfo()
    area.isolate(1024, 3072)
    assert area.free_pages == 4096  # NR_FREE_PAGES model: isolated still counted
    assert area.allocatable_pages == 2048
    taken = area.alloc(0, 4096)
    assert pages(taken) == set(range(1024)) | set(range(3072, 4096))
    assert area.alloc(0, 1) == []
    for s, e in taken:
        area.free_range(s, e)
    area.unisolate(1024, 3072)
    assert area.allocatable_pages == 4096
    assert area.buddyinfo() == before  # everything coalesced back into 4 order-10 blocks
    assert len(area.isolated) == 0
    assert area.check() == []


def test_free_into_isolated_and_drop() -> None:
    area = FreeArea("Movable")
    area.free_range(0, 1024, isolated=True)
    assert area.allocatable_pages == 0 and area.free_pages == 1024
    assert area.buddyinfo() == [0] * NR_PAGE_ORDERS
    assert area.drop_isolated(0, 512) == 512
    assert area.free_pages == 512
    area.unisolate(0, 1024)
    assert area.buddyinfo()[9] == 1
    assert area.check() == []


# -- state machine against a per-page reference --------------------------------------

N = 8192  # eight order-10 blocks
pfn_st = st.integers(0, N - 1)
len_st = st.integers(1, 1500)


class BuddyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.area = FreeArea("Normal")
        self.free: set[int] = set()
        self.isolated: set[int] = set()

    def _owned_runs(self, s: int, e: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for p in range(s, e):
            if p in self.free or p in self.isolated:
                continue
            if runs and runs[-1][1] == p:
                runs[-1] = (runs[-1][0], p + 1)
            else:
                runs.append((p, p + 1))
        return runs

    @rule(start=pfn_st, length=len_st, to_tail=st.booleans(), isolated=st.booleans())
    def free_pages(self, start: int, length: int, to_tail: bool, isolated: bool) -> None:
        end = min(N, start + length)
        for s, e in self._owned_runs(start, end):
            self.area.free_range(s, e, to_tail=to_tail, isolated=isolated)
            (self.isolated if isolated else self.free).update(range(s, e))

    @rule(order=st.integers(0, MAX_PAGE_ORDER), count=st.integers(1, 4))
    def alloc(self, order: int, count: int) -> None:
        blocks = ref_blocks(self.free)
        candidates = [o for _, o in blocks if o >= order]
        taken = self.area.alloc(order, count)
        got = pages(taken)
        assert got <= self.free, "allocated pages that were not allocatable"
        assert sum(e - s for s, e in taken) == len(got)
        for s, e in taken:
            assert s % (1 << order) == 0 and (e - s) % (1 << order) == 0
        if not candidates:
            assert taken == []
            return
        # __rmqueue_smallest: the first block comes from the smallest order available.
        smallest = min(candidates)
        first = taken[0][0]
        assert any(pfn <= first < pfn + (1 << o) and o == smallest for pfn, o in blocks), (
            f"first block at {first} not taken from an order-{smallest} block"
        )
        self.free -= got
        if len(got) < count << order:
            # A shortfall only happens when no block of a big enough order is left.
            assert all(o < order for _, o in ref_blocks(self.free))

    @rule(start=pfn_st, length=len_st)
    def take(self, start: int, length: int) -> None:
        end = min(N, start + length)
        self.area.take_range(start, end)
        self.free -= set(range(start, end))

    @rule(start=pfn_st, length=len_st)
    def isolate(self, start: int, length: int) -> None:
        end = min(N, start + length)
        self.area.isolate(start, end)
        moved = self.free & set(range(start, end))
        self.free -= moved
        self.isolated |= moved

    @rule(start=pfn_st, length=len_st, to_tail=st.booleans())
    def unisolate(self, start: int, length: int, to_tail: bool) -> None:
        end = min(N, start + length)
        self.area.unisolate(start, end, to_tail=to_tail)
        moved = self.isolated & set(range(start, end))
        self.isolated -= moved
        self.free |= moved

    @rule(start=pfn_st, length=len_st)
    def drop_isolated(self, start: int, length: int) -> None:
        end = min(N, start + length)
        dropped = self.isolated & set(range(start, end))
        assert self.area.drop_isolated(start, end) == len(dropped)
        self.isolated -= dropped

    @invariant()
    def consistent(self) -> None:
        assert self.area.check() == []
        assert self.area.allocatable_pages == len(self.free)
        assert self.area.free_pages == len(self.free) + len(self.isolated)
        assert pages(list(self.area.free.ranges())) == self.free
        assert pages(list(self.area.isolated.ranges())) == self.isolated
        assert self.area.buddyinfo() == ref_buddyinfo(self.free)


TestBuddyMachine = BuddyMachine.TestCase
TestBuddyMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
