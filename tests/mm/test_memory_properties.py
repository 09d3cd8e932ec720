"""A random hotplug workload against the memory model, checking invariants after each step."""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from guest.mm.errors import MemoryHotplugError
from guest.mm.memory import (
    MMOP_OFFLINE,
    MMOP_ONLINE,
    MMOP_ONLINE_KERNEL,
    MMOP_ONLINE_MOVABLE,
    ONLINE_TYPES,
    PHASE_CALLBACKS_DONE,
    PHASE_WINDOW,
    STATE_OFFLINE,
    STATE_ONLINE,
    ZONE_MOVABLE,
    ZONE_NORMAL,
    MemoryBlock,
    MemoryManager,
)
from guest.mm.notifier import MEM_GOING_OFFLINE, MEM_GOING_ONLINE, MemoryAction, NotifierErrorInject
from guest.mm.pages import ABSENT, ABSENT_PAGE, ALLOCATED, BUDDY, PAGE_OFFLINE, RESERVED, UNINIT
from tests.mm.helpers import BLOCK, GIB, ChunkCallback, RefcountDropper

SLOTS = 10  # hot-add candidates: the block ids right after boot memory
TAGS = ("a", "b", "c")


class MemoryMachine(RuleBasedStateMachine):
    mm: MemoryManager

    @initialize(
        boot_gib=st.integers(1, 4),
        memmap_on_memory=st.booleans(),
        movable_node=st.booleans(),
        auto=st.sampled_from(ONLINE_TYPES),
        inject_first=st.booleans(),
    )
    def setup(
        self,
        boot_gib: int,
        memmap_on_memory: bool,
        movable_node: bool,
        auto: str,
        inject_first: bool,
    ) -> None:
        self.boot_pages = boot_gib * GIB
        self.mm = MemoryManager(
            self.boot_pages,
            auto_online_blocks=auto,
            memmap_on_memory=memmap_on_memory,
            movable_node=movable_node,
        )
        self.first_slot = self.boot_pages // BLOCK
        self.groups: list[tuple[int, int]] = []  # (start_pfn, nr_blocks) as added
        self.allocated = dict.fromkeys(TAGS, 0)
        self.callback: ChunkCallback | None = None
        self.dropper = RefcountDropper(self.mm, priority=0)
        # The injector runs before or after the driver's notifier.
        self.inject = NotifierErrorInject(self.mm.notifier, priority=5 if inject_first else -5)
        self.steps = 0

    # -- helpers ---------------------------------------------------------------

    def armed(self, action: MemoryAction) -> bool:
        """Will the injector veto the next ``action``?"""
        return (
            bool(self.inject.actions.get(action)) and (self.inject.remaining.get(action) or 0) > 0
        )

    def blocks(self, state: str) -> list[MemoryBlock]:
        return sorted((b for b in self.mm.blocks.values() if b.state == state), key=lambda b: b.id)

    def counters(self) -> tuple[object, ...]:
        mm = self.mm
        return (
            mm.meminfo(),
            mm.present_pages,
            tuple(z.managed_pages for z in mm.zones.values()),
            tuple(z.free_area.allocatable_pages for z in mm.zones.values()),
            tuple((b.id, b.state, b.zone) for b in mm.blocks.values()),
        )

    def expected_zone(self, block: MemoryBlock, online_type: str) -> str:
        """contig-zones, re-derived from the zones of the online blocks."""
        if online_type == MMOP_ONLINE_KERNEL:
            return ZONE_NORMAL
        if online_type == MMOP_ONLINE_MOVABLE:
            return ZONE_MOVABLE

        def intersects(zone: str) -> bool:
            members = [b for b in self.mm.blocks.values() if b.zone == zone]
            if not members:
                return False
            lo = min(b.start_pfn for b in members)
            hi = max(b.end_pfn for b in members)
            return block.start_pfn < hi and lo < block.end_pfn

        normal, movable = intersects(ZONE_NORMAL), intersects(ZONE_MOVABLE)
        if normal != movable:
            return ZONE_NORMAL if normal else ZONE_MOVABLE
        return ZONE_MOVABLE if self.mm.movable_node else ZONE_NORMAL

    def _online_expect(
        self, block: MemoryBlock, online_type: str
    ) -> tuple[str, bool, tuple[object, ...]]:
        vetoed = self.armed(MEM_GOING_ONLINE)
        return self.expected_zone(block, online_type), vetoed, self.counters()

    def _online_check(
        self, block: MemoryBlock, zone: str, vetoed: bool, before: tuple[object, ...]
    ) -> None:
        if vetoed:
            assert block.state == STATE_OFFLINE and block.zone is None
            assert self.counters() == before
        else:
            assert block.state == STATE_ONLINE and block.zone == zone

    # -- rules -----------------------------------------------------------------------

    @rule(
        slot=st.integers(0, SLOTS - 1),
        nr_blocks=st.integers(1, 2),
        altmap=st.sampled_from([None, True, False]),
    )
    def add(self, slot: int, nr_blocks: int, altmap: bool | None) -> None:
        mm = self.mm
        start = (self.first_slot + slot) * BLOCK
        nr = nr_blocks * BLOCK
        overlap = not mm.pages.all_equal(start, start + nr, ABSENT_PAGE)
        before = self.counters()
        try:
            blocks = mm.add_memory(start, nr, memmap_on_memory=altmap)
        except MemoryHotplugError as exc:
            assert exc.errno in (errno.EEXIST, errno.ENOMEM)
            assert (exc.errno == errno.EEXIST) == overlap
            assert self.counters() == before
            return
        assert not overlap
        self.groups.append((start, nr_blocks))
        assert len(blocks) == nr_blocks
        for b in blocks:
            if mm.auto_online_blocks == MMOP_OFFLINE:
                assert b.state == STATE_OFFLINE
            elif b.state == STATE_ONLINE:
                assert b.zone is not None

    @rule(
        data=st.data(),
        online_type=st.sampled_from([MMOP_ONLINE, MMOP_ONLINE_KERNEL, MMOP_ONLINE_MOVABLE]),
    )
    def online(self, data: st.DataObject, online_type: str) -> None:
        offline = self.blocks(STATE_OFFLINE)
        if not offline:
            return
        block = data.draw(st.sampled_from(offline))
        zone, vetoed, before = self._online_expect(block, online_type)
        try:
            self.mm.online_block(block.id, online_type)
        except MemoryHotplugError as exc:
            assert vetoed and exc.errno == errno.EBUSY
        self._online_check(block, zone, vetoed, before)

    @rule(
        data=st.data(),
        online_type=st.sampled_from([MMOP_ONLINE, MMOP_ONLINE_MOVABLE]),
        order=st.integers(0, 10),
    )
    def online_with_racing_alloc(self, data: st.DataObject, online_type: str, order: int) -> None:
        """Allocate at both yield points: only in the window may the new pages be returned."""
        offline = self.blocks(STATE_OFFLINE)
        if not offline:
            return
        block = data.draw(st.sampled_from(offline))
        zone, vetoed, before = self._online_expect(block, online_type)
        steps = self.mm.online_pages_steps(block.id, online_type)
        try:
            assert next(steps) == PHASE_CALLBACKS_DONE
        except MemoryHotplugError as exc:
            assert vetoed and exc.errno == errno.EBUSY
            self._online_check(block, zone, vetoed, before)
            return
        assert not vetoed
        assert self.mm.pfn_to_online_page(block.start_pfn) is None
        for s, e in self._alloc(zone, order, 1, movable=True, tag="a"):
            assert e <= block.start_pfn or s >= block.end_pfn
        assert next(steps) == PHASE_WINDOW
        assert self.mm.pfn_to_online_page(block.end_pfn - 1) is not None
        self._alloc(zone, order, 1, movable=True, tag="b")
        for _ in steps:
            pass
        self._online_check(block, zone, vetoed, before)

    @rule(data=st.data())
    def offline(self, data: st.DataObject) -> None:
        online = self.blocks(STATE_ONLINE)
        if not online:
            return
        block = data.draw(st.sampled_from(online))
        vetoed = self.armed(MEM_GOING_OFFLINE)
        before = self.counters()
        try:
            self.mm.offline_block(block.id)
        except MemoryHotplugError as exc:
            assert exc.errno == errno.EBUSY
            assert block.state == STATE_ONLINE
            assert self.counters() == before
            return
        # An armed veto always fires once MEM_GOING_OFFLINE is sent.
        assert not vetoed
        assert block.state == STATE_OFFLINE and block.zone is None
        first = block.start_pfn + block.nr_vmemmap_pages
        assert self.mm.pages.all_equal(first, block.end_pfn, self.mm.page_state(first))
        assert self.mm.page_state(first).kind == UNINIT

    @precondition(lambda self: bool(self.groups))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        start, n = data.draw(st.sampled_from(self.groups))
        ids = range(start // BLOCK, start // BLOCK + n)
        all_offline = all(self.mm.blocks[i].state == STATE_OFFLINE for i in ids)
        before = self.counters()
        try:
            self.mm.remove_memory(start, n * BLOCK)
        except MemoryHotplugError as exc:
            assert not all_offline and exc.errno == errno.EBUSY
            assert self.counters() == before
            return
        assert all_offline
        self.groups.remove((start, n))
        assert all(i not in self.mm.blocks for i in ids)
        assert self.mm.pages.all_equal(start, start + n * BLOCK, ABSENT_PAGE)

    @precondition(lambda self: bool(self.groups))
    @rule(data=st.data())
    def offline_and_remove(self, data: st.DataObject) -> None:
        """``offline_and_remove_memory``: offline every block of a group, then remove it."""
        start, n = data.draw(st.sampled_from(self.groups))
        for block_id in range(start // BLOCK, start // BLOCK + n):
            block = self.mm.blocks[block_id]
            if block.state == STATE_ONLINE:
                try:
                    self.mm.offline_block(block_id)
                except MemoryHotplugError as exc:
                    assert exc.errno == errno.EBUSY and block.state == STATE_ONLINE
                    return
        self.mm.remove_memory(start, n * BLOCK)
        self.groups.remove((start, n))
        assert self.mm.pages.all_equal(start, start + n * BLOCK, ABSENT_PAGE)
        assert self.mm.present_sections.disjoint(start, start + n * BLOCK)

    def _alloc(
        self, zone: str, order: int, count: int, movable: bool, tag: str
    ) -> list[tuple[int, int]]:
        if zone == ZONE_MOVABLE:
            movable = True
        allocatable = self.mm.zones[zone].free_area.allocatable_pages
        taken = self.mm.alloc_pages(order, count, zone=zone, tag=tag, movable=movable)
        got = sum(e - s for s, e in taken)
        assert got <= count << order
        if got < count << order:
            assert got <= allocatable
        for s, _ in taken:
            assert s % (1 << order) == 0
            block = self.mm.block_of(s)
            assert block is not None and block.zone == zone
            assert (
                self.mm.page_state(s).kind == ALLOCATED and self.mm.page_state(s).movable == movable
            )
        self.allocated[tag] += got
        return taken

    @rule(
        zone=st.sampled_from([ZONE_NORMAL, ZONE_MOVABLE]),
        order=st.integers(0, 10),
        count=st.integers(1, 64),
        movable=st.booleans(),
        tag=st.sampled_from(TAGS),
    )
    def alloc(self, zone: str, order: int, count: int, movable: bool, tag: str) -> None:
        self._alloc(zone, order, count, movable, tag)

    @rule(tag=st.sampled_from(TAGS), nr=st.one_of(st.none(), st.integers(1, 5000)))
    def free(self, tag: str, nr: int | None) -> None:
        freed = self.mm.free_pages_of(tag, nr)
        expected = self.allocated[tag] if nr is None else min(nr, self.allocated[tag])
        assert freed == expected
        self.allocated[tag] -= freed

    @precondition(lambda self: self.callback is None)
    @rule(every=st.sampled_from([1, 2, 3, 7, 1000]))
    def install_callback(self, every: int) -> None:
        cb = ChunkCallback(self.mm, keep=lambda pfn, order: (pfn >> 10) % every == 0)
        self.mm.set_online_page_callback(cb)
        self.callback = cb

    @precondition(lambda self: self.callback is not None)
    @rule()
    def restore_callback(self) -> None:
        assert self.callback is not None
        self.mm.restore_online_page_callback(self.callback)
        self.callback = None

    @rule(data=st.data())
    def driver_plugs_kept_chunk(self, data: st.DataObject) -> None:
        """The owner hands one of its PageOffline chunks to the buddy (fake-online)."""
        mm = self.mm
        kept = [
            (s, e)
            for s, e, st_ in mm.pages.runs()
            if st_.kind == PAGE_OFFLINE and st_.owner == "drv"
        ]
        if not kept:
            return
        s, e = data.draw(st.sampled_from(kept))
        order = 10
        while order and (s % (1 << order) or s + (1 << order) > e):
            order -= 1
        chunk = s
        managed = mm.totalram_pages
        mm.generic_online_page(chunk, order)
        assert mm.totalram_pages == managed + (1 << order)
        assert mm.page_state(chunk).kind == BUDDY

    @rule(action=st.sampled_from([MEM_GOING_ONLINE, MEM_GOING_OFFLINE]))
    def arm_veto(self, action: MemoryAction) -> None:
        self.inject.set(action, -errno.EBUSY, count=1)

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def count_step(self) -> None:
        self.steps += 1

    @invariant()
    def model_is_consistent(self) -> None:
        mm = self.mm
        assert mm.check() == []
        assert mm.hotplug_lock_holder is None
        assert mm.warnings == []

    @invariant()
    def accounting(self) -> None:
        mm = self.mm
        assert mm.totalram_pages == sum(z.managed_pages for z in mm.zones.values())
        assert mm.free_pages == mm.count_pages(BUDDY)
        info = mm.meminfo()
        assert info["MemTotal"] == mm.totalram_pages * 4
        assert info["MemFree"] == mm.free_pages * 4
        assert 0 <= info["MemAvailable"] <= info["MemFree"] <= info["MemTotal"]
        boot_memmap = (self.boot_pages - self.boot_pages // 64, self.boot_pages)
        online = self.blocks(STATE_ONLINE)
        assert mm.present_pages == sum(b.nr_pages for b in online)
        for name, zone in mm.zones.items():
            managed = 0
            present = 0
            for b in online:
                if b.zone != name:
                    continue
                present += b.nr_pages
                for s, e, st_ in mm.pages.runs(b.start_pfn, b.end_pfn):
                    if st_.kind in (BUDDY, ALLOCATED):
                        managed += e - s
                    elif st_.kind == RESERVED and st_.owner == "memmap":
                        # memmap of hot-added memory came from the buddy: still managed
                        managed += max(
                            0, e - s - max(0, min(e, boot_memmap[1]) - max(s, boot_memmap[0]))
                        )
            assert zone.managed_pages == managed, name
            assert zone.present_pages == present, name
            assert zone.free_pages == sum(
                e - s
                for b in online
                if b.zone == name
                for s, e, st_ in mm.pages.runs(b.start_pfn, b.end_pfn)
                if st_.kind == BUDDY
            )
        for tag, n in self.allocated.items():
            assert mm.count_pages(ALLOCATED, tag) == n
            owned = mm.allocations.get(tag)
            assert (len(owned) if owned is not None else 0) == n

    @invariant()
    def page_kinds_follow_block_state(self) -> None:
        mm = self.mm
        online_ranges = []
        for b in mm.blocks.values():
            if b.state == STATE_ONLINE:
                assert b.zone is not None and not b.isolated
                online_ranges.append((b.start_pfn, b.end_pfn))
                for _, _, st_ in mm.pages.runs(b.start_pfn, b.end_pfn):
                    assert st_.kind in (BUDDY, ALLOCATED, RESERVED, PAGE_OFFLINE), st_
                    if st_.kind == PAGE_OFFLINE:
                        assert st_.owner == "drv" and st_.refcount == 1
            else:
                assert b.state == STATE_OFFLINE and b.zone is None
                assert mm.online_sections.disjoint(b.start_pfn, b.end_pfn)
                assert mm.pages.all_equal(
                    b.start_pfn + b.nr_vmemmap_pages, b.end_pfn, mm.page_state(b.end_pfn - 1)
                )
                assert mm.page_state(b.end_pfn - 1).kind == UNINIT
                if b.nr_vmemmap_pages:
                    assert mm.page_state(b.start_pfn).kind == RESERVED
        # Sections are online exactly for the online blocks.
        merged: list[tuple[int, int]] = []
        for s, e in sorted(online_ranges):
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        assert list(mm.online_sections.ranges()) == merged
        # No page is in the buddy outside an online block of a zone; no struct page
        # outside present memory.
        for s, e, st_ in mm.pages.runs():
            if st_.kind == BUDDY:
                for pfn in range(s - s % BLOCK, e, BLOCK):
                    block = mm.block_of(pfn)
                    assert (
                        block is not None and block.state == STATE_ONLINE and block.zone is not None
                    )
                assert mm.online_sections.covers(s, e)
            if st_.kind != ABSENT:
                assert mm.present_sections.covers(s, e)

    @invariant()
    def no_per_page_cost(self) -> None:
        mm = self.mm
        budget = 64 * (self.steps + 2)
        assert len(mm.pages) <= budget
        assert len(mm.online_sections._map) <= budget
        for zone in mm.zones.values():
            assert len(zone.free_area.free._map) <= budget
            assert sum(len(lst) for lst in zone.free_area.lists) <= budget
        for owned in mm.allocations.values():
            assert len(owned._map) <= budget
        # slot SLOTS - 1 with two blocks reaches one block past the slots
        assert len(mm.blocks) <= self.boot_pages // BLOCK + SLOTS + 1


MemoryMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMemoryMachine = MemoryMachine.TestCase
