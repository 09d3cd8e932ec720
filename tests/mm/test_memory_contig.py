"""What the memory model gained for virtio-mem: alloc_contig_range, free_contig_range,
offline_and_remove_memory, add_memory_driver_managed, the callback's owner."""

from __future__ import annotations

import errno

import pytest

from guest.mm.errors import MemoryHotplugError
from guest.mm.memory import (
    MMOP_ONLINE_KERNEL,
    MMOP_ONLINE_MOVABLE,
    STATE_OFFLINE,
    STATE_ONLINE,
    ZONE_MOVABLE,
    ZONE_NORMAL,
    HotplugLockBusy,
    MemoryManager,
)
from guest.mm.notifier import MEM_GOING_OFFLINE, notifier_from_errno
from guest.mm.pages import ABSENT_PAGE, ALLOCATED, BUDDY, RESERVED
from tests.mm.helpers import BLOCK, BOOT, HOT, HOT_ID, Events, RefcountDropper

SB = 1024  # a 4 MiB subblock


@pytest.fixture
def mm() -> MemoryManager:
    return MemoryManager(BOOT)


def online(mm: MemoryManager, zone: str, blocks: int = 1) -> None:
    mm.add_memory(HOT, blocks * BLOCK)
    kind = MMOP_ONLINE_MOVABLE if zone == ZONE_MOVABLE else MMOP_ONLINE_KERNEL
    for i in range(blocks):
        mm.online_block(HOT_ID + i, kind)


def managed(mm: MemoryManager) -> dict[str, int]:
    return {n: z.managed_pages for n, z in mm.zones.items()}


# -- alloc_contig_range ----------------------------------------------------------------


def test_alloc_contig_range_takes_free_pages_without_touching_managed(mm: MemoryManager) -> None:
    online(mm, ZONE_MOVABLE)
    before = managed(mm)
    free_before = mm.zones[ZONE_MOVABLE].free_area.free_pages
    mm.alloc_contig_range(HOT, HOT + SB, owner="virtio_mem")
    assert mm.pages.all_equal(HOT, HOT + SB, mm.page_state(HOT))
    assert mm.page_state(HOT).kind == RESERVED and mm.page_state(HOT).owner == "virtio_mem"
    assert managed(mm) == before  # the caller adjusts managed counts
    assert mm.zones[ZONE_MOVABLE].free_area.free_pages == free_before - SB
    assert mm.check() == []
    mm.free_contig_range(HOT, HOT + SB)
    assert mm.count_pages(BUDDY) >= SB and mm.page_state(HOT).kind == BUDDY
    assert mm.zones[ZONE_MOVABLE].free_area.free_pages == free_before
    assert managed(mm) == before
    assert mm.check() == []


def test_alloc_contig_range_migrates_movable_allocations(mm: MemoryManager) -> None:
    online(mm, ZONE_MOVABLE, blocks=2)
    taken = mm.alloc_pages(0, 3 * SB, zone=ZONE_MOVABLE, tag="anon")
    assert taken == [(HOT, HOT + 3 * SB)]
    mm.alloc_contig_range(HOT + SB, HOT + 2 * SB)
    owned = list(mm.allocations["anon"].ranges())
    assert sum(e - s for s, e in owned) == 3 * SB
    assert mm.allocations["anon"].disjoint(HOT + SB, HOT + 2 * SB)
    assert mm.count_pages(ALLOCATED, "anon") == 3 * SB
    assert mm.page_state(HOT + SB).kind == RESERVED
    assert mm.check() == []


def test_alloc_contig_range_fails_on_unmovable_kernel_memory(mm: MemoryManager) -> None:
    online(mm, ZONE_NORMAL)
    # Exhaust boot memory so the kernel allocation lands in the hot-added block.
    boot_free = mm.zones[ZONE_NORMAL].free_area.allocatable_pages - BLOCK
    mm.alloc_pages(0, boot_free, tag="boot-fill")
    taken = mm.alloc_pages(0, 1, tag="slab")
    assert HOT <= taken[0][0] < HOT + BLOCK
    pinned = taken[0][0]
    sb_start = pinned - pinned % SB
    before = list(mm.pages.runs(HOT, HOT + BLOCK))
    with pytest.raises(MemoryHotplugError) as exc:
        mm.alloc_contig_range(sb_start, sb_start + SB)
    assert exc.value.errno == errno.EBUSY
    assert "unmovable page" in exc.value.message
    assert list(mm.pages.runs(HOT, HOT + BLOCK)) == before
    assert mm.check() == []
    # Another subblock of the same block is free: it can be taken.
    other = HOT if sb_start != HOT else HOT + SB
    mm.alloc_contig_range(other, other + SB)
    assert mm.check() == []


def test_alloc_contig_range_enomem_without_migration_room(mm: MemoryManager) -> None:
    online(mm, ZONE_MOVABLE)
    mm.alloc_pages(0, mm.zones[ZONE_NORMAL].free_area.allocatable_pages, tag="pin")
    mm.alloc_pages(0, mm.zones[ZONE_MOVABLE].free_area.allocatable_pages, zone=ZONE_MOVABLE)
    runs_before = list(mm.pages.runs(HOT, HOT + BLOCK))
    free_before = {n: z.free_area.allocatable_pages for n, z in mm.zones.items()}
    with pytest.raises(MemoryHotplugError) as exc:
        mm.alloc_contig_range(HOT, HOT + SB)
    assert exc.value.errno == errno.ENOMEM
    assert list(mm.pages.runs(HOT, HOT + BLOCK)) == runs_before
    assert {n: z.free_area.allocatable_pages for n, z in mm.zones.items()} == free_before
    assert mm.check() == []


def test_alloc_contig_range_refuses_page_offline_and_offline_memory(mm: MemoryManager) -> None:
    mm.add_memory(HOT, BLOCK)
    with pytest.raises(MemoryHotplugError) as exc:
        mm.alloc_contig_range(HOT, HOT + SB)
    assert exc.value.errno == errno.EINVAL
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    mm.alloc_contig_range(HOT, HOT + SB)
    mm.set_page_offline(HOT, HOT + SB, "virtio_mem")
    with pytest.raises(MemoryHotplugError) as exc:
        mm.alloc_contig_range(HOT, HOT + SB)
    assert exc.value.errno == errno.EBUSY
    with pytest.raises(MemoryHotplugError):
        mm.free_contig_range(HOT + SB, HOT + 2 * SB)  # free pages are not the caller's


# -- offline_and_remove_memory ---------------------------------------------------------


def test_offline_and_remove_memory(mm: MemoryManager) -> None:
    online(mm, ZONE_MOVABLE, blocks=2)
    mm.alloc_pages(0, 100, zone=ZONE_MOVABLE, tag="anon")
    mm.offline_and_remove_memory(HOT, 2 * BLOCK)
    assert HOT_ID not in mm.blocks and HOT_ID + 1 not in mm.blocks
    assert mm.pages.all_equal(HOT, HOT + 2 * BLOCK, ABSENT_PAGE)
    assert mm.count_pages(ALLOCATED, "anon") == 100
    assert mm.check() == []


def test_offline_and_remove_memory_reonlines_on_failure(mm: MemoryManager) -> None:
    mm.add_memory(HOT, 2 * BLOCK)
    mm.online_block(HOT_ID, MMOP_ONLINE_MOVABLE)
    mm.online_block(HOT_ID + 1, MMOP_ONLINE_KERNEL)
    events = Events(mm)

    def veto_second(action: object, arg: object) -> int | None:
        if action == MEM_GOING_OFFLINE and getattr(arg, "start_pfn", 0) == HOT + BLOCK:
            return notifier_from_errno(-errno.EBUSY)
        return None

    events.hook = veto_second
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_and_remove_memory(HOT, 2 * BLOCK)
    assert exc.value.errno == errno.EBUSY
    # The first block went offline, then online again in its zone.
    assert mm.blocks[HOT_ID].state == STATE_ONLINE
    assert mm.blocks[HOT_ID].zone == ZONE_MOVABLE
    assert mm.blocks[HOT_ID + 1].state == STATE_ONLINE
    assert mm.blocks[HOT_ID + 1].zone == ZONE_NORMAL
    assert mm.check() == []


def test_offline_and_remove_memory_with_refcount_dropped_page_offline(mm: MemoryManager) -> None:
    online(mm, ZONE_NORMAL)
    RefcountDropper(mm, owner="virtio_mem")
    # A driver took the whole block (fake-offline), as virtio-mem does before removing it.
    mm.alloc_contig_range(HOT, HOT + BLOCK)
    mm.set_page_offline(HOT, HOT + BLOCK, "virtio_mem")
    mm.adjust_managed_range(HOT, HOT + BLOCK, -1)
    total = mm.totalram_pages
    mm.offline_and_remove_memory(HOT, BLOCK)
    assert HOT_ID not in mm.blocks
    assert mm.totalram_pages == total
    assert mm.check() == []


def test_offline_and_remove_memory_refuses(mm: MemoryManager) -> None:
    with pytest.raises(MemoryHotplugError) as exc:
        mm.offline_and_remove_memory(0, BLOCK)  # boot memory
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(MemoryHotplugError):
        mm.offline_and_remove_memory(HOT + 1, BLOCK)
    mm.add_memory(HOT, BLOCK)
    steps = mm.online_pages_steps(HOT_ID)
    next(steps)  # an onlining holds mem_hotplug_lock
    with pytest.raises(HotplugLockBusy):
        mm.offline_and_remove_memory(HOT, BLOCK)
    for _ in steps:
        pass
    assert mm.blocks[HOT_ID].state == STATE_ONLINE


# -- add_memory_driver_managed and the callback owner ---------------------------------


def test_add_memory_driver_managed(mm: MemoryManager) -> None:
    mm.memmap_on_memory = True
    (block,) = mm.add_memory_driver_managed(HOT, BLOCK, owner="virtio_mem")
    assert block.owner == "virtio_mem"
    assert block.nr_vmemmap_pages == 0  # never memmap_on_memory
    assert block.state == STATE_OFFLINE


def test_callback_owner_is_named_in_the_refusal(mm: MemoryManager) -> None:
    def cb(start: int, nr: int) -> None:
        mm.generic_online_pages(start, start + nr)

    assert mm.online_page_callback_owner is None
    mm.set_online_page_callback(cb, owner="hv_balloon")
    assert mm.online_page_callback_owner == "hv_balloon"
    with pytest.raises(MemoryHotplugError) as exc:
        mm.set_online_page_callback(cb, owner="virtio_mem")
    assert exc.value.errno == errno.EINVAL
    assert "(by hv_balloon)" in exc.value.message
    mm.restore_online_page_callback(cb)
    assert mm.online_page_callback_owner is None
