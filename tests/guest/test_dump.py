"""guest.mm.dump.walk_dump: a makedumpfile-like PFN walker over online sections."""

from __future__ import annotations

from typing import Any

import pytest

from extents import RangeSet
from guest.mm.dump import DumpReport, walk_dump
from guest.mm.memory import PHASE_WINDOW, MemoryBlock
from guest.vm import GuestConfig, GuestVm
from memhp.dm import (
    BalloonRequest,
    BalloonResponse,
    CapabilitiesResponse,
    HotAddRequest,
    HotAddResponse,
    PageRange,
    VersionResponse,
)

MIB = 256
BLOCK = 128 * MIB
BOOT = 32 * BLOCK
R = BOOT
RESERVED = 256 + BOOT // 64  # low memblock pages + the boot memmap


def guest(boot_pages: int = BOOT, **kw: Any) -> tuple[GuestVm, RangeSet]:
    g = GuestVm(GuestConfig("vm", boot_pages=boot_pages, pressure_report_delay=10**9, **kw))
    g.start()
    g.run_until(0)
    (ver,) = g.drain_outbox()
    g.deliver(VersionResponse(ver.trans_id, True))
    g.run_until(0)
    (caps,) = g.drain_outbox()
    g.deliver(CapabilitiesResponse(caps.trans_id, True))
    g.run_until(0)
    backed = RangeSet()
    backed.add(0, boot_pages)
    return g, backed


def hot_add(g: GuestVm, backed: RangeSet, start: int, count: int, region: int) -> None:
    backed.add(start, start + count)
    g.deliver(HotAddRequest(1, PageRange(start, count), PageRange(start, region)))
    while True:
        g.run_until(g.now)
        if any(isinstance(m, HotAddResponse) for m in g.drain_outbox()):
            return
        deadline = g.next_deadline()
        assert deadline is not None and deadline < 100
        g.run_until(deadline)


def test_boot_memory_is_read_in_full() -> None:
    g, backed = guest()
    rep = walk_dump(g.mm)
    assert (rep.pages_read, rep.pages_skipped_offline, rep.pages_skipped_free) == (BOOT, 0, 0)
    assert rep.unbacked_read == [] and rep.unbacked_pages == 0
    assert walk_dump(g.mm, backed).unbacked_read == []


def test_skip_free_reads_only_used_pages() -> None:
    g, _ = guest()
    g.allocate(1000, tag="w")
    rep = walk_dump(g.mm, skip_free=True)
    assert rep.pages_read == RESERVED + 1000
    assert rep.pages_skipped_free == BOOT - RESERVED - 1000 == g.mm.free_pages


def test_unbacked_reads_are_reported_with_their_ranges() -> None:
    g, backed = guest()
    backed.remove(0x1000, 0x1010)  # free boot pages the host does not back
    backed.remove(0, 4)  # reserved low pages
    rep = walk_dump(g.mm, backed)
    assert rep.unbacked_read == [(0, 4), (0x1000, 0x1010)]
    assert rep.unbacked_pages == 20
    # Free pages are not read with skip_free; the reserved ones still are.
    rep = walk_dump(g.mm, backed, skip_free=True)
    assert rep.unbacked_read == [(0, 4)]


def test_page_offline_is_skipped_offline_blocks_are_not_walked() -> None:
    g, backed = guest(udev_online_type="online")
    backed_pages = BLOCK + 40 * MIB
    hot_add(g, backed, R, backed_pages, 4 * BLOCK)  # two blocks, the second partly backed
    rep = walk_dump(g.mm, backed)
    assert rep.pages_skipped_offline == 2 * BLOCK - backed_pages
    assert rep.pages_read == BOOT + backed_pages
    assert rep.unbacked_read == []
    # A block added but left offline is not walked at all.
    g2, backed2 = guest()
    hot_add(g2, backed2, R, BLOCK, BLOCK)
    assert g2.mm.blocks[32].state == "offline"
    rep2 = walk_dump(g2.mm, RangeSet())
    assert rep2.pages_read == BOOT
    # (One entry per page-state run: compare the union.)
    union = RangeSet()
    for s, e in rep2.unbacked_read:
        union.add(s, e)
    assert list(union.ranges()) == [(0, BOOT)]
    assert rep2.unbacked_pages == BOOT


def test_ballooned_pages_are_skipped() -> None:
    g, backed = guest()
    g.deliver(BalloonRequest(1, 4096))
    g.run_until(0)
    for msg in g.drain_outbox():
        if isinstance(msg, BalloonResponse):
            for r in msg.ranges:
                backed.remove(r.start_page, r.end_page)
    rep = walk_dump(g.mm, backed)
    assert rep.pages_skipped_offline == 4096
    assert rep.pages_read == BOOT - 4096
    assert rep.unbacked_read == []


def test_sections_of_a_block_being_onlined_are_not_walked() -> None:
    g, backed = guest()
    g.mm.add_memory(R, BLOCK)
    backed.add(R, R + BLOCK)
    g.inject_slow_onlining(1.0, count=1)
    g.online_block(32)
    g.run_until(0)
    assert g.mm.blocks[32].state == "offline"
    assert walk_dump(g.mm, backed).pages_read == BOOT
    g.run_until(1)
    assert walk_dump(g.mm, backed).pages_read == BOOT + BLOCK


# Two-GiB guest, 384 MiB region, 320 MiB backed, online_movable: block 18 is partly backed.
S_BOOT = 16 * BLOCK
UNBACKED = (S_BOOT + 320 * MIB, S_BOOT + 384 * MIB)


def window_dumps(
    strategy: str, racer: bool
) -> tuple[GuestVm, RangeSet, DumpReport, DumpReport, DumpReport]:
    g, backed = guest(S_BOOT, strategy=strategy, udev_online_type="online_movable")
    seen: list[DumpReport] = []

    def observer(block: MemoryBlock, phase: str) -> None:
        if block.id == 18 and phase == PHASE_WINDOW:
            seen.append(walk_dump(g.mm, backed))
            seen.append(walk_dump(g.mm, backed, skip_free=True))

    g.phase_observers.append(observer)
    if racer:
        g.allocate_in_window(384 * MIB, zone="Movable", tag="racer", block=18)
    hot_add(g, backed, S_BOOT, 320 * MIB, 384 * MIB)
    after = walk_dump(g.mm, backed, skip_free=True)
    window, window_nofree = seen
    return g, backed, window, window_nofree, after


@pytest.mark.parametrize("strategy", ["callback", "going-online"])
def test_safe_strategies_never_expose_unbacked_pages(strategy: str) -> None:
    for racer in (False, True):
        _, _, window, window_nofree, after = window_dumps(strategy, racer)
        assert window.unbacked_read == []
        assert window.pages_skipped_offline == UNBACKED[1] - UNBACKED[0]
        assert window_nofree.unbacked_read == []
        assert after.unbacked_read == []


def test_online_then_reclaim_window_reads_unbacked_pages() -> None:
    _, _, window, window_nofree, after = window_dumps("online-then-reclaim", racer=False)
    # In the window the unbacked pages are free in the buddy: a full dump reads them.
    assert window.unbacked_read == [UNBACKED]
    assert window.pages_skipped_offline == 0
    assert window_nofree.unbacked_read == []
    # After MEM_ONLINE they are reclaimed (PageOffline again).
    assert after.unbacked_read == []
    assert after.pages_skipped_offline == UNBACKED[1] - UNBACKED[0]


def test_online_then_reclaim_with_racer_leaves_unbacked_pages_in_use() -> None:
    _, _, _, _, after = window_dumps("online-then-reclaim", racer=True)
    # Allocated in the window: even a dump that skips free pages reads them.
    assert after.unbacked_read == [UNBACKED]
    assert after.unbacked_pages == UNBACKED[1] - UNBACKED[0]
