"""The memory-hotplug core: add, online, offline, remove, callbacks, accounting."""

from __future__ import annotations

import errno

import pytest

from guest.mm.errors import MemoryHotplugError
from guest.mm.geometry import MAX_PFN, Geometry
from guest.mm.memory import (
    MMOP_OFFLINE,
    MMOP_ONLINE,
    MMOP_ONLINE_KERNEL,
    MMOP_ONLINE_MOVABLE,
    PHASE_CALLBACKS_DONE,
    PHASE_WINDOW,
    STATE_GOING_OFFLINE,
    STATE_OFFLINE,
    STATE_ONLINE,
    ZONE_MOVABLE,
    ZONE_NORMAL,
    HotplugLockBusy,
    MemoryManager,
)
from guest.mm.notifier import (
    MEM_CANCEL_OFFLINE,
    MEM_CANCEL_ONLINE,
    MEM_GOING_OFFLINE,
    MEM_GOING_ONLINE,
    MEM_OFFLINE,
    MEM_ONLINE,
    NOTIFY_BAD,
    MemoryAction,
    MemoryNotify,
    NotifierErrorInject,
)
from guest.mm.pages import (
    ABSENT_PAGE,
    ALLOCATED,
    BUDDY,
    CORE_OFFLINE_PAGE,
    PAGE_OFFLINE,
    RESERVED,
    UNINIT_PAGE,
)
from tests.mm.helpers import (
    BLOCK,
    BOOT,
    BOOT_MANAGED,
    BOOT_MEMMAP,
    GIB,
    HOT,
    HOT_ID,
    LOW_RESERVED,
    ChunkCallback,
    Events,
    RefcountDropper,
)


@pytest.fixture
def mm() -> MemoryManager:
    return MemoryManager(BOOT)


def snapshot(mm: MemoryManager) -> dict[str, object]:
    """Everything an online/offline failure must leave untouched."""
    return {
        "meminfo": mm.meminfo(),
        "present": mm.present_pages,
        "managed": {n: z.managed_pages for n, z in mm.zones.items()},
        "spans": {n: (z.span_start, z.span_end) for n, z in mm.zones.items()},
        "allocatable": {n: z.free_area.allocatable_pages for n, z in mm.zones.items()},
        "buddyinfo": {n: z.free_area.buddyinfo() for n, z in mm.zones.items()},
        "online_sections": list(mm.online_sections.ranges()),
        "states": {b.id: (b.state, b.zone, b.isolated) for b in mm.blocks.values()},
        "pages": list(mm.pages.runs(0, 64 * BLOCK)),
    }


def fill_zone(mm: MemoryManager, zone: str = ZONE_NORMAL, tag: str = "pin") -> int:
    """Allocate every allocatable page of a zone (unmovable in Normal)."""
    n = mm.zones[zone].free_area.allocatable_pages
    taken = mm.alloc_pages(0, n, zone=zone, tag=tag)
    assert sum(e - s for s, e in taken) == n
    return n


def pages_in(ranges: list[tuple[int, int]], start: int, end: int) -> int:
    return sum(max(0, min(e, end) - max(s, start)) for s, e in ranges)


# -- boot ---------------------------------------------------------------------------


def test_boot_memory(mm: MemoryManager) -> None:
    assert sorted(mm.blocks) == list(range(8))
    assert all(
        b.state == STATE_ONLINE and b.zone == ZONE_NORMAL and b.boot for b in mm.blocks.values()
    )
    assert mm.totalram_pages == BOOT_MANAGED
    assert mm.present_pages == BOOT
    assert mm.free_pages == BOOT_MANAGED
    assert mm.meminfo()["MemTotal"] == BOOT_MANAGED * 4 == 1031168
    assert mm.pfn_to_online_page(0) is not None
    assert mm.pfn_to_online_page(BOOT - 1) is not None
    assert mm.pfn_to_online_page(BOOT) is None  # nothing there
    assert mm.page_state(0).kind == RESERVED
    assert mm.page_state(BOOT - 1).kind == RESERVED  # memmap at the top
    assert mm.count_pages(RESERVED) == LOW_RESERVED + BOOT_MEMMAP
    assert mm.check() == []


def test_boot_size_must_be_block_multiple() -> None:
    with pytest.raises(MemoryHotplugError) as exc:
        MemoryManager(BOOT + 1)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(MemoryHotplugError):
        MemoryManager(0)
    big = MemoryManager(4 * GIB, Geometry(256 << 20))
    assert len(big.blocks) == 16
    assert all(b.nr_pages == 2 * BLOCK for b in big.blocks.values())


# -- add_memory ---------------------------------------------------------------------


def test_add_memory_misaligned_einval_with_kernel_message(mm: MemoryManager) -> None:
    before = snapshot(mm)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.add_memory(HOT + 4096, BLOCK)
    assert exc.value.errno == errno.EINVAL
    # check_hotplug_memory_range(): pr_err("Block size [%#lx] unaligned hotplug range:
    # start %#llx, size %#llx", ...)
    assert exc.value.message == (
        "Block size [0x8000000] unaligned hotplug range: start 0x41000000, size 0x8000000"
    )
    with pytest.raises(MemoryHotplugError) as exc:
        mm.add_memory(HOT, BLOCK + 1)
    assert exc.value.errno == errno.EINVAL
    assert exc.value.message.startswith("Block size [0x8000000] unaligned hotplug range:")
    with pytest.raises(MemoryHotplugError) as exc:
        mm.add_memory(HOT, 0)
    assert exc.value.errno == errno.EINVAL
    assert snapshot(mm) == before


def test_add_memory_misaligned_for_larger_blocks() -> None:
    mm = MemoryManager(2 * GIB, Geometry(1 << 30))
    with pytest.raises(MemoryHotplugError) as exc:
        mm.add_memory(2 * GIB + BLOCK, GIB)  # 128 MiB-aligned is not enough
    assert exc.value.errno == errno.EINVAL
    assert exc.value.message == (
        "Block size [0x40000000] unaligned hotplug range: start 0x88000000, size 0x40000000"
    )
    blocks = mm.add_memory(2 * GIB, GIB)
    assert [b.id for b in blocks] == [2]


def test_add_memory_overlap_eexist(mm: MemoryManager) -> None:
    with pytest.raises(MemoryHotplugError) as exc:
        mm.add_memory(BOOT - BLOCK, BLOCK)
    assert exc.value.errno == errno.EEXIST
    mm.add_memory(HOT, 2 * BLOCK)
    before = snapshot(mm)
    for start, n in ((HOT + BLOCK, BLOCK), (HOT - BLOCK, 2 * BLOCK), (HOT, BLOCK)):
        with pytest.raises(MemoryHotplugError) as exc:
            mm.add_memory(start, n)
        assert exc.value.errno == errno.EEXIST
    assert snapshot(mm) == before
    mm.add_memory(HOT + 2 * BLOCK, BLOCK)  # right after: fine


def test_add_memory_beyond_max_physmem_e2big(mm: MemoryManager) -> None:
    with pytest.raises(MemoryHotplugError) as exc:
        mm.add_memory(MAX_PFN, BLOCK)
    assert exc.value.errno == errno.E2BIG
    mm.add_memory(MAX_PFN - BLOCK, BLOCK)  # the last block is addressable


def test_add_memory_creates_offline_blocks(mm: MemoryManager) -> None:
    seen = []
    mm.block_added_hooks.append(lambda b: seen.append((b.id, b.state)))
    blocks = mm.add_memory(HOT, 3 * BLOCK, owner="dimm0")
    assert [b.id for b in blocks] == [HOT_ID, HOT_ID + 1, HOT_ID + 2]
    assert seen == [
        (HOT_ID, STATE_OFFLINE),
        (HOT_ID + 1, STATE_OFFLINE),
        (HOT_ID + 2, STATE_OFFLINE),
    ]
    for b in blocks:
        assert b.state == STATE_OFFLINE and b.zone is None and b.owner == "dimm0"
        assert mm.pfn_to_online_page(b.start_pfn) is None
        assert mm.valid_zones(b) == [ZONE_NORMAL, ZONE_MOVABLE]
    assert mm.pages.all_equal(HOT, HOT + 3 * BLOCK, UNINIT_PAGE)
    assert mm.present_sections.covers(HOT, HOT + 3 * BLOCK)
    # Hot-added but offline memory is neither present nor managed.
    assert mm.present_pages == BOOT
    assert mm.totalram_pages == BOOT_MANAGED
    assert mm.check() == []


def test_add_memory_memmap_costs_one_64th_of_free_memory(mm: MemoryManager) -> None:
    before = mm.meminfo()
    mm.add_memory(HOT, 4 * BLOCK)
    after = mm.meminfo()
    added_kb = 4 * BLOCK * 4
    # 64-byte struct page per 4 KiB page, allocated from existing memory.
    assert before["MemFree"] - after["MemFree"] == added_kb // 64 == 8192
    assert after["MemTotal"] == before["MemTotal"]  # allocated, still managed
    assert mm.count_pages(RESERVED, "memmap") == BOOT_MEMMAP + 4 * 512
    # The memmap lives in boot memory (Normal), not in the new range.
    for _, e in mm.blocks[HOT_ID].memmap_ranges:
        assert e <= BOOT
    assert mm.check() == []


def test_add_memory_memmap_on_memory_takes_it_from_the_block(mm: MemoryManager) -> None:
    before = mm.meminfo()
    blocks = mm.add_memory(HOT, 2 * BLOCK, memmap_on_memory=True)
    assert mm.meminfo() == before  # nothing taken from existing memory
    for b in blocks:
        assert b.nr_vmemmap_pages == 512
        assert b.memmap_ranges == []
        assert mm.pages.all_equal(b.start_pfn, b.start_pfn + 512, mm.page_state(b.start_pfn))
        assert mm.page_state(b.start_pfn).kind == RESERVED
        assert mm.page_state(b.start_pfn + 512) == UNINIT_PAGE
    events = Events(mm)
    cb = ChunkCallback(mm)
    mm.set_online_page_callback(cb)
    mm.online_block(HOT_ID)
    # The notifier and online_pages() see the range without the vmemmap pages.
    assert events.log[0] == (MEM_GOING_ONLINE, MemoryNotify(HOT + 512, BLOCK - 512))
    # First chunk: pageblock-aligned, order 9; then 31 order-10 chunks.
    assert cb.chunks[0] == (HOT + 512, 9)
    assert cb.chunks[1:] == [(HOT + 1024 * i, 10) for i in range(1, 32)]
    after = mm.meminfo()
    assert after["MemTotal"] - before["MemTotal"] == (BLOCK - 512) * 4
    assert after["MemFree"] - before["MemFree"] == (BLOCK - 512) * 4
    assert mm.present_pages == BOOT + BLOCK  # vmemmap pages count as present
    assert mm.page_state(HOT).kind == RESERVED
    mm.offline_block(HOT_ID)
    assert mm.meminfo() == before
    assert mm.present_pages == BOOT
    assert mm.check() == []


def test_memmap_on_memory_default_from_constructor() -> None:
    mm = MemoryManager(BOOT, memmap_on_memory=True)
    (block,) = mm.add_memory(HOT, BLOCK)
    assert block.nr_vmemmap_pages == 512
    (other,) = mm.add_memory(HOT + BLOCK, BLOCK, memmap_on_memory=False)
    assert other.nr_vmemmap_pages == 0 and other.memmap_ranges


def test_add_memory_enomem_without_room_for_memmap(mm: MemoryManager) -> None:
    fill_zone(mm)
    before = snapshot(mm)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.add_memory(HOT, BLOCK)
    assert exc.value.errno == errno.ENOMEM
    assert HOT_ID not in mm.blocks
    assert mm.page_state(HOT) == ABSENT_PAGE
    assert snapshot(mm) == before
    assert mm.check() == []
    # memmap_on_memory needs nothing from the full zone.
    mm.add_memory(HOT, BLOCK, memmap_on_memory=True)


def test_add_memory_memmap_falls_back_to_base_pages(mm: MemoryManager) -> None:
    fill_zone(mm)
    # Free four order-8 pieces that are not buddies of each other: 1024 free pages,
    # but no free 2 MiB block.
    for i in range(4):
        start = 2048 + i * 1024
        mm.free_range(start, start + 256)
    assert mm.free_pages == 1024
    assert mm.zones[ZONE_NORMAL].free_area.buddyinfo()[9:] == [0, 0]
    mm.add_memory(HOT, BLOCK)
    assert mm.free_pages == 1024 - 512


# -- online ---------------------------------------------------------------------------


def test_online_order_notifier_callbacks_sections(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    log: list[str] = []
    before_free = mm.free_pages
    before_managed = mm.totalram_pages
    at_going_online: dict[str, object] = {}
    at_online: dict[str, object] = {}

    def hook(action: MemoryAction, arg: MemoryNotify) -> None:
        end = arg.start_pfn + arg.nr_pages
        if action == MEM_GOING_ONLINE:
            at_going_online.update(
                all_page_offline=mm.pages.all_equal(arg.start_pfn, end, CORE_OFFLINE_PAGE),
                refcount=mm.page_state(arg.start_pfn).refcount,
                buddy=mm.pages.count(arg.start_pfn, end, mm.page_state(0)._replace(kind=BUDDY)),
                free=mm.free_pages,
                managed=mm.totalram_pages,
                section_online=mm.pfn_to_online_page(arg.start_pfn) is not None,
                zone=mm.blocks[HOT_ID].zone,
                state=mm.blocks[HOT_ID].state,
            )
        elif action == MEM_ONLINE:
            at_online.update(
                all_buddy=all(st.kind == BUDDY for _, _, st in mm.pages.runs(arg.start_pfn, end)),
                section_online=mm.pfn_to_online_page(arg.start_pfn) is not None,
                allocatable=mm.zones[ZONE_NORMAL].free_area.free.covers(arg.start_pfn, end),
            )

    events = Events(mm, hook=hook, shared=log)

    def on_chunk(pfn: int, order: int) -> None:
        log.append(f"chunk:{pfn}:{order}")
        # Every callback runs before the section is online.
        assert mm.pfn_to_online_page(pfn) is None
        assert not mm.online_section_nr(mm.pfn_to_section_nr(pfn))

    cb = ChunkCallback(mm, on_chunk=on_chunk)
    mm.set_online_page_callback(cb)
    mm.online_block(HOT_ID, MMOP_ONLINE)

    assert events.actions == [MEM_GOING_ONLINE, MEM_ONLINE]
    assert events.log[0][1] == MemoryNotify(HOT, BLOCK)
    assert log[0] == "notify:MEM_GOING_ONLINE"
    assert log[-1] == "notify:MEM_ONLINE"
    assert log[1:-1] == [f"chunk:{HOT + 1024 * i}:10" for i in range(32)]
    # At MEM_GOING_ONLINE: memmap initialised, every page PageOffline with refcount 1,
    # nothing in the buddy, zone associated, the section still offline.
    assert at_going_online == {
        "all_page_offline": True,
        "refcount": 1,
        "buddy": 0,
        "free": before_free,
        "managed": before_managed,
        "section_online": False,
        "zone": ZONE_NORMAL,
        "state": STATE_OFFLINE,  # there is no "going-online" state
    }
    assert at_online == {"all_buddy": True, "section_online": True, "allocatable": True}
    block = mm.blocks[HOT_ID]
    assert block.state == STATE_ONLINE and block.zone == ZONE_NORMAL
    assert mm.totalram_pages == before_managed + BLOCK
    assert mm.free_pages == before_free + BLOCK
    assert mm.present_pages == BOOT + BLOCK
    assert mm.stats.callback_chunks == 32
    assert mm.warnings == []
    assert mm.check() == []


def test_online_without_callback_uses_generic(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.online_block(HOT_ID)
    assert mm.stats.callback_chunks == 32
    assert mm.stats.generic_online_pages == BLOCK
    assert mm.count_pages(PAGE_OFFLINE) == 0
    assert mm.pages.count(HOT, HOT + BLOCK, mm.page_state(HOT)) == BLOCK
    assert mm.page_state(HOT).kind == BUDDY
    assert mm.stats.blocks_onlined == 1


def test_online_phases_sections_and_allocatability_movable(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    events = Events(mm)
    steps = mm.online_pages_steps(HOT_ID, MMOP_ONLINE_MOVABLE)
    assert next(steps) == PHASE_CALLBACKS_DONE
    # Pages went through generic_online_page (managed) but the pageblocks are still
    # isolated and the section is not online: PFN walkers and the allocator can't see them.
    movable = mm.zones[ZONE_MOVABLE]
    assert movable.managed_pages == BLOCK
    assert mm.pfn_to_online_page(HOT) is None
    assert mm.pfn_to_online_page(HOT + BLOCK - 1) is None
    assert mm.alloc_pages(0, 1, zone=ZONE_MOVABLE) == []
    assert movable.free_area.allocatable_pages == 0
    assert events.actions == [MEM_GOING_ONLINE]
    assert mm.blocks[HOT_ID].state == STATE_OFFLINE
    # The lock is held: nothing else can hot(un)plug meanwhile.
    with pytest.raises(HotplugLockBusy):
        mm.add_memory(HOT + BLOCK, BLOCK)
    with pytest.raises(HotplugLockBusy):
        mm.remove_memory(HOT, BLOCK)

    assert next(steps) == PHASE_WINDOW
    assert mm.pfn_to_online_page(HOT) is not None
    assert mm.online_section_nr(HOT_ID)
    assert events.actions == [MEM_GOING_ONLINE]  # MEM_ONLINE not sent yet
    taken = mm.alloc_pages(0, 1, zone=ZONE_MOVABLE, tag="early")
    assert len(taken) == 1 and HOT <= taken[0][0] < HOT + BLOCK

    with pytest.raises(StopIteration):
        next(steps)
    assert events.actions == [MEM_GOING_ONLINE, MEM_ONLINE]
    assert mm.blocks[HOT_ID].state == STATE_ONLINE
    assert mm.hotplug_lock_holder is None
    mm.add_memory(HOT + BLOCK, BLOCK)  # lock released
    assert mm.check() == []


def test_online_phases_normal_pages_not_allocatable_before_window(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    steps = mm.online_pages_steps(HOT_ID, MMOP_ONLINE_KERNEL)
    assert next(steps) == PHASE_CALLBACKS_DONE
    # Drain every order-10 block the zone will hand out: none may come from the new block.
    early = mm.alloc_pages(10, 10**6, tag="early")
    assert early and pages_in(early, HOT, HOT + BLOCK) == 0
    assert next(steps) == PHASE_WINDOW
    late = mm.alloc_pages(10, 1, tag="late")
    assert late and HOT <= late[0][0] < HOT + BLOCK
    for _ in steps:
        pass
    assert mm.check() == []


def test_memfree_excludes_isolated_pages_while_onlining(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    before = mm.meminfo()
    steps = mm.online_pages_steps(HOT_ID, MMOP_ONLINE)
    assert next(steps) == PHASE_CALLBACKS_DONE
    during = mm.meminfo()
    assert during["MemTotal"] == before["MemTotal"] + BLOCK * 4  # managed already
    assert during["MemFree"] == before["MemFree"]  # but not free until un-isolated
    assert next(steps) == PHASE_WINDOW
    assert mm.meminfo()["MemFree"] == before["MemFree"] + BLOCK * 4


def test_memfree_excludes_isolated_pages_while_offlining(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    before = mm.meminfo()["MemFree"]
    seen: list[int] = []

    def hook(action: MemoryAction, arg: MemoryNotify) -> None:
        if action == MEM_GOING_OFFLINE:
            seen.append(mm.meminfo()["MemFree"])

    Events(mm, hook=hook)
    mm.offline_block(HOT_ID)
    assert seen == [before - BLOCK * 4]


def test_online_veto_cancel_online_and_nothing_changes(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    inject = NotifierErrorInject(mm.notifier, priority=10)
    low = Events(mm, priority=0)
    inject.set(MEM_GOING_ONLINE, -errno.ENOMEM)
    cb = ChunkCallback(mm)
    mm.set_online_page_callback(cb)
    before = snapshot(mm)
    for online_type in (MMOP_ONLINE, MMOP_ONLINE_KERNEL, MMOP_ONLINE_MOVABLE):
        with pytest.raises(MemoryHotplugError) as exc:
            mm.online_block(HOT_ID, online_type)
        assert exc.value.errno == errno.ENOMEM  # echo -12 > .../error → ENOMEM
        assert snapshot(mm) == before
    # The vetoing injector stopped MEM_GOING_ONLINE before the low-priority notifier,
    # but MEM_CANCEL_ONLINE goes to the whole chain.
    assert low.actions == [MEM_CANCEL_ONLINE] * 3
    assert cb.chunks == []  # no page ever reached the callback
    block = mm.blocks[HOT_ID]
    assert block.state == STATE_OFFLINE and block.zone is None and not block.isolated
    assert mm.page_state(HOT) == UNINIT_PAGE
    assert mm.valid_zones(block) == [ZONE_NORMAL, ZONE_MOVABLE]
    assert mm.zones[ZONE_MOVABLE].spanned is False
    assert mm.hotplug_lock_holder is None
    assert mm.check() == []
    inject.set(MEM_GOING_ONLINE, 0)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    assert low.actions[-2:] == [MEM_GOING_ONLINE, MEM_ONLINE]
    assert mm.blocks[HOT_ID].zone == ZONE_MOVABLE


def test_online_veto_notify_bad_is_eperm(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK, memmap_on_memory=True)
    before = snapshot(mm)
    ev = Events(mm, hook=lambda a, arg: NOTIFY_BAD if a == MEM_GOING_ONLINE else None)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.online_block(HOT_ID)
    assert exc.value.errno == errno.EPERM
    assert ev.actions == [MEM_GOING_ONLINE, MEM_CANCEL_ONLINE]
    assert snapshot(mm) == before  # vmemmap present pages rolled back too
    with pytest.raises(MemoryHotplugError):
        next(mm.online_pages_steps(HOT_ID))
    assert mm.hotplug_lock_holder is None


def test_online_rejects_bad_type_and_state(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    for bad in (MMOP_OFFLINE, "online_foo", ""):
        with pytest.raises(MemoryHotplugError) as exc:
            mm.online_block(HOT_ID, bad)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(MemoryHotplugError) as exc:
        mm.online_block(HOT_ID + 5)
    assert exc.value.errno == errno.EINVAL
    mm.online_block(HOT_ID)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.online_block(HOT_ID)  # already online
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(MemoryHotplugError) as exc:
        mm.online_block(0)  # boot memory is online
    assert exc.value.errno == errno.EINVAL


# -- zones ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("online_type", "zone"),
    [
        (MMOP_ONLINE, ZONE_NORMAL),
        (MMOP_ONLINE_KERNEL, ZONE_NORMAL),
        (MMOP_ONLINE_MOVABLE, ZONE_MOVABLE),
    ],
)
def test_zone_choice_for_fresh_block(mm: MemoryManager, online_type: str, zone: str) -> None:
    (block,) = mm.add_memory(HOT, BLOCK)
    assert mm.valid_zones(block) == [ZONE_NORMAL, ZONE_MOVABLE]
    mm.online_block(HOT_ID, online_type)
    assert block.zone == zone
    assert mm.valid_zones(block) == [zone]
    assert mm.zones[zone].managed_pages >= BLOCK
    assert mm.zones[zone].present_pages >= BLOCK
    assert mm.zones[zone].span_start <= HOT and mm.zones[zone].span_end >= HOT + BLOCK


def test_contig_zones_inherits_intersecting_movable(mm: MemoryManager) -> None:
    mm.add_memory(HOT, 3 * BLOCK)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    # An adjacent block does not intersect the Movable span: default stays Normal.
    assert mm.valid_zones(mm.blocks[HOT_ID + 1]) == [ZONE_NORMAL, ZONE_MOVABLE]
    mm.online_block(HOT_ID + 2, MMOP_ONLINE_MOVABLE)
    # Now the middle block lies inside the Movable span: "online" inherits Movable.
    assert mm.valid_zones(mm.blocks[HOT_ID + 1]) == [ZONE_MOVABLE, ZONE_NORMAL]
    mm.online_block(HOT_ID + 1, MMOP_ONLINE)
    assert mm.blocks[HOT_ID + 1].zone == ZONE_MOVABLE
    # Offlining the outer Movable blocks shrinks the span again.
    mm.offline_block(HOT_ID + 2)
    mm.offline_block(HOT_ID + 1)
    movable = mm.zones[ZONE_MOVABLE]
    assert (movable.span_start, movable.span_end) == (HOT, HOT + BLOCK)
    assert mm.valid_zones(mm.blocks[HOT_ID + 1]) == [ZONE_NORMAL, ZONE_MOVABLE]
    mm.offline_block(HOT_ID)
    assert not movable.spanned
    assert movable.managed_pages == movable.present_pages == 0


def test_online_kernel_inside_movable_span_is_normal(mm: MemoryManager) -> None:
    mm.add_memory(HOT, 3 * BLOCK)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    mm.online_block(HOT_ID + 2, MMOP_ONLINE_MOVABLE)
    mm.online_block(HOT_ID + 1, MMOP_ONLINE_KERNEL)
    assert mm.blocks[HOT_ID + 1].zone == ZONE_NORMAL


def test_movable_node_defaults_to_movable() -> None:
    mm = MemoryManager(BOOT, movable_node=True)
    (block,) = mm.add_memory(HOT, BLOCK)
    assert mm.valid_zones(block) == [ZONE_MOVABLE, ZONE_NORMAL]
    mm.online_block(HOT_ID, MMOP_ONLINE)
    assert block.zone == ZONE_MOVABLE


def test_valid_zones_of_online_boot_block(mm: MemoryManager) -> None:
    assert mm.valid_zones(mm.blocks[0]) == [ZONE_NORMAL]
    mm.offline_block(3)  # a boot block with nothing reserved in it
    assert mm.valid_zones(mm.blocks[3]) == [ZONE_NORMAL, ZONE_MOVABLE]


# -- offline ------------------------------------------------------------------------------


def test_offline_success_counters(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    before = mm.meminfo()
    mm.online_block(HOT_ID)
    events = Events(mm)
    at: dict[str, object] = {}

    def hook(action: MemoryAction, arg: MemoryNotify) -> None:
        if action == MEM_GOING_OFFLINE:
            at["going_state"] = mm.blocks[HOT_ID].state
            at["going_section"] = mm.pfn_to_online_page(HOT) is not None
            at["going_allocatable"] = mm.zones[ZONE_NORMAL].free_area.free.disjoint(
                HOT, HOT + BLOCK
            )
        elif action == MEM_OFFLINE:
            at["offline_section"] = mm.pfn_to_online_page(HOT) is not None
            at["offline_free"] = mm.free_pages

    events.hook = hook
    mm.offline_block(HOT_ID)
    assert events.actions == [MEM_GOING_OFFLINE, MEM_OFFLINE]
    assert events.log[0][1] == MemoryNotify(HOT, BLOCK)
    assert at == {
        "going_state": STATE_GOING_OFFLINE,
        "going_section": True,  # still online while the notifiers run
        "going_allocatable": True,  # isolated: no free page of the block is allocatable
        "offline_section": False,  # sections offline before MEM_OFFLINE
        "offline_free": before["MemFree"] // 4,
    }
    block = mm.blocks[HOT_ID]
    assert block.state == STATE_OFFLINE and block.zone is None and not block.isolated
    assert mm.meminfo() == before
    assert mm.present_pages == BOOT
    assert mm.pages.all_equal(HOT, HOT + BLOCK, UNINIT_PAGE)
    assert mm.stats.blocks_offlined == 1
    assert mm.check() == []
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_block(HOT_ID)
    assert exc.value.errno == errno.EINVAL
    # Online again after offline: a full cycle restores everything.
    mm.online_block(HOT_ID)
    assert mm.meminfo()["MemTotal"] == before["MemTotal"] + BLOCK * 4
    assert mm.warnings == []


def test_offline_boot_block_with_reserved_pages_ebusy(mm: MemoryManager) -> None:
    events = Events(mm)
    before = snapshot(mm)
    for bid in (0, 7):  # low reserved pages / the boot memmap
        with pytest.raises(MemoryHotplugError) as exc:
            mm.offline_block(bid)
        assert exc.value.errno == errno.EBUSY
    assert events.actions == []  # isolation failed: no notifier event at all
    assert snapshot(mm) == before


def test_offline_with_unmovable_allocation_ebusy(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    fill_zone(mm)  # boot memory fully used: the next allocation lands in the new block
    mm.online_block(HOT_ID, MMOP_ONLINE_KERNEL)
    taken = mm.alloc_pages(0, 1, tag="slab")
    assert HOT <= taken[0][0] < HOT + BLOCK
    assert mm.page_state(taken[0][0]).movable is False
    events = Events(mm)
    before = snapshot(mm)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_block(HOT_ID)
    assert exc.value.errno == errno.EBUSY
    assert events.actions == []
    assert snapshot(mm) == before
    # Once freed, the block goes offline.
    assert mm.free_pages_of("slab") == 1
    mm.offline_block(HOT_ID)
    assert mm.check() == []


def test_offline_page_offline_refcount1_ebusy_after_going_offline(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    cb = ChunkCallback(mm, keep=lambda pfn, order: pfn == HOT)  # keeps the first 4 MiB
    mm.set_online_page_callback(cb)
    mm.online_block(HOT_ID)
    assert cb.kept == [(HOT, 10)]
    assert mm.totalram_pages == BOOT_MANAGED + BLOCK - 1024  # kept pages not managed
    assert mm.present_pages == BOOT + BLOCK  # but present
    assert mm.is_page_offline(HOT)
    state = mm.pfn_to_online_page(HOT)  # PFN walkers see a PageOffline page
    assert state is not None and state.kind == PAGE_OFFLINE and state.owner == "drv"
    events = Events(mm)
    before = snapshot(mm)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_block(HOT_ID)
    assert exc.value.errno == errno.EBUSY
    # v5.8+: PageOffline passes isolation; the reference it still holds fails the scan.
    assert events.actions == [MEM_GOING_OFFLINE, MEM_CANCEL_OFFLINE]
    assert snapshot(mm) == before
    assert mm.blocks[HOT_ID].state == STATE_ONLINE
    assert mm.check() == []


def test_offline_refcount_zero_trick_succeeds(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    keep = {HOT, HOT + 5 * 1024}
    cb = ChunkCallback(mm, keep=lambda pfn, order: pfn in keep)
    mm.set_online_page_callback(cb)
    before = mm.meminfo()
    mm.online_block(HOT_ID)
    assert mm.meminfo()["MemTotal"] - before["MemTotal"] == (BLOCK - 2048) * 4
    dropper = RefcountDropper(mm)
    events = Events(mm, priority=-1)
    at_going: list[int] = []

    def hook(action: MemoryAction, arg: MemoryNotify) -> None:
        if action == MEM_GOING_OFFLINE:  # runs after the dropper (lower priority)
            at_going.append(mm.page_state(HOT).refcount)

    events.hook = hook
    mm.offline_block(HOT_ID)
    assert at_going == [0]
    assert events.actions == [MEM_GOING_OFFLINE, MEM_OFFLINE]
    # Offlining only subtracts what was managed: the PageOffline pages never were.
    assert mm.meminfo() == before
    assert mm.present_pages == BOOT
    assert mm.pages.all_equal(HOT, HOT + BLOCK, UNINIT_PAGE)
    assert mm.warnings == []
    assert mm.check() == []
    # Re-online: the owner keeps its pages out of the buddy again.
    cb.kept.clear()
    mm.online_block(HOT_ID)
    assert [p for p, _ in cb.kept] == sorted(keep)
    assert dropper.calls == [MEM_GOING_OFFLINE, MEM_OFFLINE, MEM_GOING_ONLINE, MEM_ONLINE]


def test_offline_veto_after_refcount_drop_cancels(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.set_online_page_callback(ChunkCallback(mm, keep=lambda pfn, order: pfn == HOT))
    mm.online_block(HOT_ID)
    dropper = RefcountDropper(mm, priority=10)
    inject = NotifierErrorInject(mm.notifier, priority=0)
    inject.set(MEM_GOING_OFFLINE, -errno.EBUSY)
    before = snapshot(mm)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_block(HOT_ID)
    assert exc.value.errno == errno.EBUSY
    assert dropper.calls == [MEM_GOING_OFFLINE, MEM_CANCEL_OFFLINE]
    assert mm.page_state(HOT).refcount == 1  # reference re-taken on cancel
    assert snapshot(mm) == before
    assert mm.check() == []


def test_offline_veto_cancel_offline_restores_allocatable(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    inject = NotifierErrorInject(mm.notifier, priority=10)
    low = Events(mm)
    inject.set(MEM_GOING_OFFLINE, -errno.EAGAIN, count=1)
    before = snapshot(mm)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_block(HOT_ID)
    assert exc.value.errno == errno.EAGAIN
    assert low.actions == [MEM_CANCEL_OFFLINE]  # the vetoed event stopped before it
    assert snapshot(mm) == before
    assert mm.zones[ZONE_MOVABLE].free_area.allocatable_pages == BLOCK
    mm.offline_block(HOT_ID)  # the injection fired once only
    assert low.actions == [MEM_CANCEL_OFFLINE, MEM_GOING_OFFLINE, MEM_OFFLINE]


def test_offline_migrates_movable_allocations_in_movable_zone(mm: MemoryManager) -> None:
    mm.add_memory(HOT, 2 * BLOCK)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    mm.online_block(HOT_ID + 1, MMOP_ONLINE_MOVABLE)
    taken = mm.alloc_pages(0, 100, zone=ZONE_MOVABLE, tag="anon")
    assert pages_in(taken, HOT, HOT + BLOCK) == 100
    total_before = mm.totalram_pages
    mm.offline_block(HOT_ID)
    owned = list(mm.allocations["anon"].ranges())
    assert sum(e - s for s, e in owned) == 100
    assert pages_in(owned, HOT + BLOCK, HOT + 2 * BLOCK) == 100
    assert mm.count_pages(ALLOCATED, "anon") == 100
    for s, _ in owned:
        assert mm.page_state(s).movable
    assert mm.totalram_pages == total_before - BLOCK
    assert mm.check() == []


def test_offline_migrates_movable_allocations_in_normal_zone(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    pinned = fill_zone(mm)
    mm.online_block(HOT_ID, MMOP_ONLINE)
    taken = mm.alloc_pages(0, 300, tag="anon", movable=True)
    assert pages_in(taken, HOT, HOT + BLOCK) == 300
    events = Events(mm)
    # No room anywhere else: migration fails, the block stays online.
    before = snapshot(mm)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_block(HOT_ID)
    assert exc.value.errno == errno.EBUSY
    assert events.actions == [MEM_GOING_OFFLINE, MEM_CANCEL_OFFLINE]
    assert snapshot(mm) == before
    assert mm.free_pages_of("pin", 1024) == 1024  # make room in boot memory
    assert pinned > 1024
    mm.offline_block(HOT_ID)
    owned = list(mm.allocations["anon"].ranges())
    assert sum(e - s for s, e in owned) == 300 and all(e <= BOOT for _, e in owned)
    assert mm.check() == []


def test_offline_movable_block_migrates_into_normal(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    mm.alloc_pages(0, 100, zone=ZONE_MOVABLE, tag="anon")
    mm.offline_block(HOT_ID)  # Normal has ~1 GiB free
    owned = list(mm.allocations["anon"].ranges())
    assert sum(e - s for s, e in owned) == 100 and all(e <= BOOT for _, e in owned)


def test_offline_unknown_block_einval(mm: MemoryManager) -> None:
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_block(99)
    assert exc.value.errno == errno.EINVAL


# -- remove -------------------------------------------------------------------------------


def test_remove_memory_requires_offline(mm: MemoryManager) -> None:
    before = mm.meminfo()
    mm.add_memory(HOT, 2 * BLOCK)
    mm.online_block(HOT_ID + 1)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.remove_memory(HOT, 2 * BLOCK)
    assert exc.value.errno == errno.EBUSY
    assert HOT_ID in mm.blocks and HOT_ID + 1 in mm.blocks  # nothing removed
    mm.offline_block(HOT_ID + 1)
    mm.remove_memory(HOT, 2 * BLOCK)
    assert HOT_ID not in mm.blocks and HOT_ID + 1 not in mm.blocks
    assert mm.pages.all_equal(HOT, HOT + 2 * BLOCK, ABSENT_PAGE)
    assert mm.present_sections.disjoint(HOT, HOT + 2 * BLOCK)
    assert mm.meminfo() == before  # the memmap went back to the buddy
    assert mm.count_pages(RESERVED, "memmap") == BOOT_MEMMAP
    assert mm.check() == []
    mm.add_memory(HOT, BLOCK)  # the range can be added again


def test_remove_memory_rejects_boot_and_misaligned(mm: MemoryManager) -> None:
    mm.offline_block(3)
    for start, n, err in (
        (3 * BLOCK, BLOCK, errno.EINVAL),  # boot memory
        (HOT, BLOCK, errno.EINVAL),  # nothing there
        (HOT + 1, BLOCK, errno.EINVAL),
        (HOT, 0, errno.EINVAL),
    ):
        with pytest.raises(MemoryHotplugError) as exc:
            mm.remove_memory(start, n)
        assert exc.value.errno == err


def test_remove_memory_with_memmap_on_memory(mm: MemoryManager) -> None:
    before = mm.meminfo()
    mm.add_memory(HOT, BLOCK, memmap_on_memory=True)
    mm.online_block(HOT_ID)
    mm.offline_block(HOT_ID)
    mm.remove_memory(HOT, BLOCK)
    assert mm.pages.all_equal(HOT, HOT + BLOCK, ABSENT_PAGE)
    assert mm.meminfo() == before
    assert mm.count_pages(RESERVED, "vmemmap") == 0


def test_partial_remove_frees_that_blocks_memmap(mm: MemoryManager) -> None:
    before = mm.free_pages
    mm.add_memory(HOT, 2 * BLOCK)
    assert mm.free_pages == before - 1024
    mm.remove_memory(HOT, BLOCK)
    # The memmap is per section: removing one block frees exactly its 512 pages.
    assert mm.free_pages == before - 512
    assert mm.count_pages(RESERVED, "memmap") == BOOT_MEMMAP + 512
    mm.remove_memory(HOT + BLOCK, BLOCK)
    assert mm.free_pages == before
    assert mm.count_pages(RESERVED, "memmap") == BOOT_MEMMAP
    assert mm.check() == []


# -- online_page_callback -------------------------------------------------------------------


def test_set_restore_online_page_callback_rules(mm: MemoryManager) -> None:
    def cb1(start: int, nr: int) -> None:
        mm.generic_online_pages(start, start + nr)

    def cb2(start: int, nr: int) -> None:
        mm.generic_online_pages(start, start + nr)

    assert not mm.online_page_callback_installed
    with pytest.raises(MemoryHotplugError) as exc:
        mm.restore_online_page_callback(cb1)  # generic is installed, not cb1
    assert exc.value.errno == errno.EINVAL
    mm.set_online_page_callback(cb1)
    assert mm.online_page_callback_installed
    for cb in (cb2, cb1):  # only one non-generic callback at a time, even the same one
        with pytest.raises(MemoryHotplugError) as exc:
            mm.set_online_page_callback(cb)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(MemoryHotplugError) as exc:
        mm.restore_online_page_callback(cb2)
    assert exc.value.errno == errno.EINVAL
    mm.restore_online_page_callback(cb1)
    assert not mm.online_page_callback_installed
    mm.set_online_page_callback(cb2)  # free again


class _Driver:
    def __init__(self, mm: MemoryManager) -> None:
        self.mm = mm

    def online_page(self, start: int, nr: int) -> None:
        self.mm.generic_online_pages(start, start + nr)


def test_restore_online_page_callback_bound_method(mm: MemoryManager) -> None:
    drv = _Driver(mm)
    mm.set_online_page_callback(drv.online_page)
    mm.restore_online_page_callback(drv.online_page)
    assert not mm.online_page_callback_installed


def test_generic_online_page_double_call_warns(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.online_block(HOT_ID)
    assert mm.warnings == []
    before = snapshot(mm)
    mm.generic_online_page(HOT, 10)  # already in the buddy
    assert [w.what for w in mm.warnings] == ["generic_online_page-not-offline"]
    assert (mm.warnings[0].start_pfn, mm.warnings[0].end_pfn) == (HOT, HOT + 1024)
    assert snapshot(mm) == before  # no double accounting, buddy untouched
    mm.generic_online_page(HOT + 2 * BLOCK, 0)  # absent memory
    assert len(mm.warnings) == 2
    assert mm.check() == []
    with pytest.raises(ValueError):
        mm.generic_online_page(HOT + 1, 1)  # misaligned for its order


def test_generic_online_page_later_by_owner(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    cb = ChunkCallback(mm, keep=lambda pfn, order: pfn >= HOT + BLOCK // 2)
    mm.set_online_page_callback(cb)
    mm.online_block(HOT_ID)
    assert mm.totalram_pages == BOOT_MANAGED + BLOCK // 2
    assert mm.count_pages(PAGE_OFFLINE, "drv") == BLOCK // 2
    # The owner plugs one chunk later (virtio-mem fake-online).
    mm.generic_online_page(HOT + BLOCK // 2, 10)
    assert mm.totalram_pages == BOOT_MANAGED + BLOCK // 2 + 1024
    assert mm.count_pages(PAGE_OFFLINE, "drv") == BLOCK // 2 - 1024
    assert mm.warnings == []
    assert mm.check() == []


# -- meminfo / auto-online ------------------------------------------------------------------


def test_meminfo_consistency_through_a_cycle(mm: MemoryManager) -> None:
    def consistent() -> dict[str, int]:
        info = mm.meminfo()
        assert info["MemTotal"] == mm.totalram_pages * 4
        assert info["MemFree"] == mm.free_pages * 4
        assert 0 <= info["MemAvailable"] <= info["MemFree"] <= info["MemTotal"]
        return info

    boot = consistent()
    assert boot["MemTotal"] == 1031168
    mm.add_memory(HOT, 2 * BLOCK)
    mm.online_block(HOT_ID)
    mm.online_block(HOT_ID + 1, MMOP_ONLINE_MOVABLE)
    info = consistent()
    assert info["MemTotal"] == boot["MemTotal"] + 2 * BLOCK * 4
    assert info["MemFree"] == boot["MemFree"] + 2 * BLOCK * 4 - 2 * 2048
    mm.alloc_pages(3, 100, zone=ZONE_MOVABLE, tag="x")
    info2 = consistent()
    assert info2["MemFree"] == info["MemFree"] - 800 * 4
    assert info2["MemTotal"] == info["MemTotal"]
    text = mm.meminfo_text()
    assert f"MemTotal:       {info2['MemTotal']:>8} kB\n" in text
    assert text.startswith("MemTotal:")
    mm.free_pages_of("x")
    mm.offline_block(HOT_ID + 1)
    mm.offline_block(HOT_ID)
    mm.remove_memory(HOT, 2 * BLOCK)
    assert consistent() == boot


@pytest.mark.parametrize(
    ("policy", "state", "zone"),
    [
        (MMOP_OFFLINE, STATE_OFFLINE, None),
        (MMOP_ONLINE, STATE_ONLINE, ZONE_NORMAL),
        (MMOP_ONLINE_KERNEL, STATE_ONLINE, ZONE_NORMAL),
        (MMOP_ONLINE_MOVABLE, STATE_ONLINE, ZONE_MOVABLE),
    ],
)
def test_auto_online_blocks_policies(policy: str, state: str, zone: str | None) -> None:
    mm = MemoryManager(BOOT, auto_online_blocks=policy)
    events = Events(mm)
    blocks = mm.add_memory(HOT, 2 * BLOCK)
    assert [(b.state, b.zone) for b in blocks] == [(state, zone)] * 2
    expected = [] if state == STATE_OFFLINE else [MEM_GOING_ONLINE, MEM_ONLINE] * 2
    assert events.actions == expected
    assert mm.check() == []


def test_auto_online_policy_changes_affect_later_blocks_only(mm: MemoryManager) -> None:
    (first,) = mm.add_memory(HOT, BLOCK)
    mm.auto_online_blocks = MMOP_ONLINE_MOVABLE
    (second,) = mm.add_memory(HOT + BLOCK, BLOCK)
    assert first.state == STATE_OFFLINE
    assert (second.state, second.zone) == (STATE_ONLINE, ZONE_MOVABLE)


def test_auto_online_with_movable_node() -> None:
    mm = MemoryManager(BOOT, auto_online_blocks=MMOP_ONLINE, movable_node=True)
    (block,) = mm.add_memory(HOT, BLOCK)
    assert block.zone == ZONE_MOVABLE


def test_auto_online_failure_is_ignored_by_add_memory() -> None:
    mm = MemoryManager(BOOT, auto_online_blocks=MMOP_ONLINE)
    NotifierErrorInject(mm.notifier).set(MEM_GOING_ONLINE, -errno.ENOMEM, count=1)
    blocks = mm.add_memory(HOT, 2 * BLOCK)
    assert [b.state for b in blocks] == [STATE_OFFLINE, STATE_ONLINE]
    assert mm.check() == []


def test_auto_online_invalid_policy() -> None:
    with pytest.raises(MemoryHotplugError) as exc:
        MemoryManager(BOOT, auto_online_blocks="online_foo")
    assert exc.value.errno == errno.EINVAL


# -- mem_hotplug_lock -------------------------------------------------------------------------


def test_notifier_cannot_hotplug_during_going_online(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    got: list[str] = []

    def hook(action: MemoryAction, arg: MemoryNotify) -> None:
        if action == MEM_GOING_ONLINE:
            try:
                mm.add_memory(HOT + BLOCK, BLOCK)
                got.append("added")
            except HotplugLockBusy:
                got.append("busy")

    Events(mm, hook=hook)
    mm.online_block(HOT_ID)
    assert got == ["busy"]


def test_notifier_cannot_hotplug_during_going_offline(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.online_block(HOT_ID)
    got: list[str] = []

    def hook(action: MemoryAction, arg: MemoryNotify) -> None:
        if action == MEM_GOING_OFFLINE:
            try:
                mm.add_memory(HOT + BLOCK, BLOCK)
                got.append("added")
            except HotplugLockBusy:
                got.append("busy")

    Events(mm, hook=hook)
    mm.offline_block(HOT_ID)
    assert got == ["busy"]


# -- allocation details --------------------------------------------------------------------


def test_hotplugged_pages_go_to_the_tail(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.online_block(HOT_ID)
    # FPI_TO_TAIL / move_freepages_block to the tail: boot memory is used first.
    taken = mm.alloc_pages(10, 8)
    assert pages_in(taken, HOT, HOT + BLOCK) == 0


def test_alloc_pages_rules(mm: MemoryManager) -> None:
    with pytest.raises(MemoryHotplugError) as exc:
        mm.alloc_pages(0, 1, zone="DMA32")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(MemoryHotplugError) as exc:
        mm.alloc_pages(0, 1, zone=ZONE_MOVABLE, movable=False)
    assert exc.value.errno == errno.EINVAL
    assert mm.alloc_pages(0, 1, zone=ZONE_MOVABLE) == []  # empty zone
    taken = mm.alloc_pages(2, 3, tag="t")
    assert sum(e - s for s, e in taken) == 12
    assert all(s % 4 == 0 for s, _ in taken)
    assert mm.count_pages(ALLOCATED, "t") == 12
    assert mm.free_pages == BOOT_MANAGED - 12
    assert mm.totalram_pages == BOOT_MANAGED  # allocated pages stay managed
    with pytest.raises(MemoryHotplugError) as exc:
        mm.free_range(HOT - 1, HOT)  # not allocated
    assert exc.value.errno == errno.EINVAL


def test_free_pages_of_frees_highest_first(mm: MemoryManager) -> None:
    taken = mm.alloc_pages(0, 10, tag="t")
    pfns = sorted(p for s, e in taken for p in range(s, e))
    assert mm.free_pages_of("t", 3) == 3
    left = sorted(p for s, e in mm.allocations["t"].ranges() for p in range(s, e))
    assert left == pfns[:7]
    assert mm.free_pages_of("t") == 7
    assert mm.free_pages_of("t") == 0
    assert mm.free_pages_of("never") == 0
    assert mm.free_pages == BOOT_MANAGED
    assert (
        mm.zones[ZONE_NORMAL].free_area.buddyinfo()
        == MemoryManager(BOOT).zones[ZONE_NORMAL].free_area.buddyinfo()
    )


def test_take_free_pages_unmanages_them(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    mm.alloc_pages(0, 10, zone=ZONE_MOVABLE, tag="x")
    before = mm.meminfo()
    # alloc_contig_range-like: only the free pages of the range are taken.
    assert mm.take_free_pages(HOT, HOT + 2048) == 2048 - 10
    after = mm.meminfo()
    assert before["MemTotal"] - after["MemTotal"] == (2048 - 10) * 4
    assert before["MemFree"] - after["MemFree"] == (2048 - 10) * 4
    assert mm.check() == []


def test_memavailable_at_boot_follows_watermarks(mm: MemoryManager) -> None:
    import math

    managed = BOOT_MANAGED
    min_free_kbytes = min(max(math.isqrt(managed * 4 * 16), 128), 262144)
    wmark_min = min_free_kbytes // 4
    tmp = max(wmark_min // 4, managed * 10 // 10000)
    high = wmark_min + 2 * tmp
    assert (min_free_kbytes, high) == (4061, 1529)
    assert mm.meminfo()["MemAvailable"] == (managed - high) * 4


def test_two_online_operations_exclude_each_other(mm: MemoryManager) -> None:
    mm.add_memory(HOT, 2 * BLOCK)
    first = mm.online_pages_steps(HOT_ID)
    assert next(first) == PHASE_CALLBACKS_DONE
    second = mm.online_pages_steps(HOT_ID + 1)
    with pytest.raises(HotplugLockBusy):
        next(second)
    with pytest.raises(HotplugLockBusy):
        mm.offline_block(0)
    assert mm.blocks[HOT_ID + 1].state == STATE_OFFLINE
    assert mm.blocks[HOT_ID + 1].zone is None
    for _ in first:
        pass
    mm.online_block(HOT_ID + 1)
    assert mm.check() == []


def test_memmap_on_memory_offline_notifier_range(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK, memmap_on_memory=True)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    assert mm.pfn_to_online_page(HOT) is not None  # vmemmap pages are in the online section
    events = Events(mm)
    mm.offline_block(HOT_ID)
    assert [arg for _, arg in events.log] == [MemoryNotify(HOT + 512, BLOCK - 512)] * 2
    assert mm.page_state(HOT).kind == RESERVED  # the vmemmap stays until removal


def test_larger_block_geometry_end_to_end() -> None:
    geo = Geometry(256 << 20)
    mm = MemoryManager(4 * GIB, geo)
    blocks = mm.add_memory(4 * GIB, 2 * geo.block_pages, memmap_on_memory=True)
    assert [b.nr_vmemmap_pages for b in blocks] == [1024, 1024]
    cb = ChunkCallback(mm)
    mm.set_online_page_callback(cb)
    mm.online_block(blocks[0].id)
    # 256 MiB block, 4 MiB of vmemmap: the walk starts MAX_ORDER-aligned.
    assert cb.chunks[0] == (4 * GIB + 1024, 10)
    assert len(cb.chunks) == 63
    assert mm.present_pages == 4 * GIB + geo.block_pages
    assert mm.online_section_nr((4 * GIB) // BLOCK) and mm.online_section_nr((4 * GIB) // BLOCK + 1)
    assert not mm.online_section_nr((4 * GIB) // BLOCK + 2)
    assert mm.check() == []
