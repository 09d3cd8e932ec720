"""Named invariants of a guest's virtio-mem driver (mm-model.md §5), checked on demand.

:func:`check_virtio_mem` looks at one :class:`guest.drivers.virtio_mem.VirtioMem`, the
memory model and, when given, the device's ground truth (which PFNs it has plugged,
and its ``plugged_size``). The memory model's own invariants (``mm-consistency``,
``online-section-state``, ``generic-online-twice``) come from
:func:`guest.invariants.check_guest`. Costs follow extents, never pages.

Names (stable: scenarios declare expected violations by them):

``unplugged-allocated``          a page of device memory the host has not plugged is in
                                 use: free in the buddy, allocated, or reserved
``virtio-mem-online-unplugged``  the same against the driver's own view: a page in use
                                 in a (sub)block the driver has not plugged
``virtio-mem-plugged-size``      no request in flight, yet the driver's ``plugged_size`` is
                                 not the device's, or not what its block states add up to
``virtio-mem-plugged-mismatch``  the blocks the driver holds plugged are not the ones the
                                 device has plugged
``virtio-mem-fake-offline``      an unplugged subblock of an online block (or the online
                                 memory of a FAKE_OFFLINE big block) is not fake-offline
``plugged-never-onlined``        a plugged page of an online block left fake-offline:
                                 nobody will online it
``virtio-mem-block-state``       a block's driver state disagrees with the memory block
                                 (added or not, online or not, zone, all subblocks plugged)
and the driver's own reports (``virtio-mem-bug``, ``virtio-mem-fake-online``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator

from extents import RangeSet
from guest.drivers.virtio_mem import (
    BB_ADDED,
    BB_FAKE_OFFLINE,
    BB_PLUGGED,
    BB_UNUSED,
    DRIVER,
    MB_KERNEL,
    MB_KERNEL_PARTIAL,
    MB_MOVABLE,
    MB_MOVABLE_PARTIAL,
    MB_OFFLINE,
    MB_OFFLINE_PARTIAL,
    MB_ONLINE_STATES,
    MB_PLUGGED,
    MB_UNUSED,
    OWNERS,
    VirtioMem,
)
from guest.invariants import Finding
from guest.mm.geometry import PAGE_SHIFT
from guest.mm.memory import STATE_OFFLINE, STATE_ONLINE, ZONE_MOVABLE, ZONE_NORMAL, MemoryManager
from guest.mm.pages import ALLOCATED, BUDDY, PAGE_OFFLINE, RESERVED

#: Page kinds that mean "in use by the guest": the memory behind them is touched.
IN_USE = (BUDDY, ALLOCATED, RESERVED)


def check_virtio_mem(
    mm: MemoryManager,
    driver: VirtioMem,
    host_plugged: RangeSet | None = None,
    device_plugged_size: int | None = None,
) -> list[Finding]:
    """Every virtio-mem invariant of one device's driver (host truth optional)."""
    out: list[Finding] = []
    lo, hi = driver.start_pfn, driver.end_pfn
    if host_plugged is not None:
        out += _unplugged_use(mm, lo, hi, host_plugged, "unplugged-allocated", "the host")
    if driver.probed:
        mine = RangeSet()
        for s, e in driver.plugged_ranges():
            mine.add(s, e)
        out += _unplugged_use(mm, lo, hi, mine, "virtio-mem-online-unplugged", "the driver")
        if not driver.request_in_flight:
            out += _plugged_size(driver, device_plugged_size)
            if host_plugged is not None:
                out += _plugged_mismatch(lo, hi, mine, host_plugged)
        out += _fake_offline(mm, driver)
        out += _block_states(mm, driver)
    for v in driver.violations:
        out.append(Finding(v.kind, v.start_pfn, v.end_pfn, v.message))
    return out


def _unplugged_use(
    mm: MemoryManager, lo: int, hi: int, plugged: RangeSet, name: str, who: str
) -> list[Finding]:
    out: list[Finding] = []
    for s, e, state in mm.pages.runs(lo, hi):
        if state.kind not in IN_USE:
            continue
        for hs, he in plugged.holes(s, e):
            what = "free in the buddy" if state.kind == BUDDY else f"{state.kind} ({state.owner})"
            out.append(Finding(name, hs, he, f"{he - hs} pages {who} has not plugged are {what}"))
    return out


def _plugged_size(driver: VirtioMem, device_plugged_size: int | None) -> list[Finding]:
    out: list[Finding] = []
    if device_plugged_size is not None and driver.plugged_size != device_plugged_size:
        out.append(
            Finding(
                "virtio-mem-plugged-size",
                0,
                0,
                f"driver plugged_size {driver.plugged_size:#x} != device plugged_size "
                f"{device_plugged_size:#x}",
            )
        )
    counted = driver.plugged_by_driver()
    if counted != driver.plugged_size:
        out.append(
            Finding(
                "virtio-mem-plugged-size",
                0,
                0,
                f"the driver's blocks hold {counted:#x} bytes plugged, its plugged_size "
                f"says {driver.plugged_size:#x}",
            )
        )
    return out


def _plugged_mismatch(lo: int, hi: int, mine: RangeSet, host: RangeSet) -> list[Finding]:
    out: list[Finding] = []
    for s, e in mine.ranges(lo, hi):
        for hs, he in host.holes(s, e):
            out.append(
                Finding(
                    "virtio-mem-plugged-mismatch",
                    hs,
                    he,
                    f"{he - hs} pages the driver holds plugged are unplugged on the device",
                )
            )
    for s, e in host.ranges(lo, hi):
        for hs, he in mine.holes(s, e):
            out.append(
                Finding(
                    "virtio-mem-plugged-mismatch",
                    hs,
                    he,
                    f"{he - hs} pages plugged on the device are unplugged for the driver",
                )
            )
    return out


def _online_ranges(mm: MemoryManager, driver: VirtioMem) -> Iterator[tuple[int, int, bool]]:
    """(start, end, plugged) runs of the driver's memory in online memory blocks."""
    if driver.in_sbm:
        for mb_id, state in driver.mb_states.items():
            if state in MB_ONLINE_STATES:
                yield from driver.sbm_subblock_runs(mb_id)
        return
    bb_pages = driver.bb_size >> PAGE_SHIFT
    for bb_id, bb_state in driver.bb_states.items():
        if bb_state not in (BB_ADDED, BB_FAKE_OFFLINE):
            continue
        for s, e in mm.online_sections.ranges(bb_id * bb_pages, (bb_id + 1) * bb_pages):
            yield s, e, bb_state == BB_ADDED


def _fake_offline(mm: MemoryManager, driver: VirtioMem) -> list[Finding]:
    out: list[Finding] = []
    for start, end, plugged in _online_ranges(mm, driver):
        for s, e, state in mm.pages.runs(start, end):
            ours = state.kind == PAGE_OFFLINE and state.owner in OWNERS
            if plugged and ours:
                out.append(
                    Finding(
                        "plugged-never-onlined",
                        s,
                        e,
                        f"{e - s} plugged pages of online memory{mm.geometry.block_id(s)} "
                        "left fake-offline",
                    )
                )
            elif not plugged and not ours:
                out.append(
                    Finding(
                        "virtio-mem-fake-offline",
                        s,
                        e,
                        f"{e - s} unplugged pages of online memory{mm.geometry.block_id(s)} "
                        f"are {state.kind}, not fake-offline",
                    )
                )
    return out


_SBM_EXPECT: dict[int, tuple[str | None, str | None, bool | None]] = {
    # state: (memory block state or None if not added, zone, all subblocks plugged)
    MB_UNUSED: (None, None, None),
    MB_PLUGGED: (None, None, None),
    MB_OFFLINE: (STATE_OFFLINE, None, True),
    MB_OFFLINE_PARTIAL: (STATE_OFFLINE, None, False),
    MB_KERNEL: (STATE_ONLINE, ZONE_NORMAL, True),
    MB_KERNEL_PARTIAL: (STATE_ONLINE, ZONE_NORMAL, False),
    MB_MOVABLE: (STATE_ONLINE, ZONE_MOVABLE, True),
    MB_MOVABLE_PARTIAL: (STATE_ONLINE, ZONE_MOVABLE, False),
}


def _block_states(mm: MemoryManager, driver: VirtioMem) -> list[Finding]:
    out: list[Finding] = []
    tracked: set[int] = set()

    def bad(block_id: int, pages: int, message: str) -> None:
        out.append(
            Finding("virtio-mem-block-state", block_id * pages, (block_id + 1) * pages, message)
        )

    if driver.in_sbm:
        pages = driver.memory_block_size >> PAGE_SHIFT
        full_mask = (1 << driver.sbs_per_mb) - 1
        for mb_id, state in driver.mb_states.items():
            want_state, want_zone, want_full = _SBM_EXPECT[state]
            block = mm.blocks.get(mb_id)
            bits = driver.sb_states.get(mb_id, 0)
            label = f"memory{mb_id} ({state.label})"
            if want_state is None:
                if block is not None:
                    bad(mb_id, pages, f"{label} is added to Linux")
                if state == MB_UNUSED and bits:
                    bad(mb_id, pages, f"{label} has plugged subblocks")
                if state == MB_PLUGGED and not bits:
                    bad(mb_id, pages, f"{label} has no plugged subblock")
                continue
            tracked.add(mb_id)
            if block is None:
                bad(mb_id, pages, f"{label} is not added to Linux")
                continue
            if block.state != want_state:
                bad(mb_id, pages, f"{label} is {block.state}")
            if want_zone is not None and block.zone != want_zone:
                bad(mb_id, pages, f"{label} is in zone {block.zone}")
            if want_full is not None and (bits == full_mask) != want_full:
                plugged = bin(bits).count("1")
                bad(mb_id, pages, f"{label} has {plugged}/{driver.sbs_per_mb} subblocks plugged")
    else:
        pages = driver.bb_size >> PAGE_SHIFT
        mb_pages = mm.geometry.block_pages
        for bb_id, bb_state in driver.bb_states.items():
            ids = range(bb_id * pages // mb_pages, (bb_id + 1) * pages // mb_pages)
            present = [i for i in ids if i in mm.blocks]
            label = f"big block {bb_id} ({bb_state.label})"
            if bb_state in (BB_UNUSED, BB_PLUGGED):
                if present:
                    bad(bb_id, pages, f"{label} has memory blocks added")
                continue
            tracked.update(ids)
            if len(present) != len(ids):
                bad(bb_id, pages, f"{label} has {len(present)}/{len(ids)} memory blocks added")
    lo, hi = driver.start_pfn, driver.end_pfn
    for block in mm.blocks.values():
        if block.owner == DRIVER and lo <= block.start_pfn < hi and block.id not in tracked:
            out.append(
                Finding(
                    "virtio-mem-block-state",
                    block.start_pfn,
                    block.end_pfn,
                    f"memory{block.id} of the device is added but the driver does not track it",
                )
            )
    return out
