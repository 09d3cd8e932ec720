"""guest.invariants.check_guest: silent on healthy guests, each named finding on a broken one.

Broken states are made by hand through the model's internals (the way a buggy
driver or core would leave them), starting from a healthy guest with a partly
backed hot-add region, ballooned pages and an allocation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from extents import RangeSet
from guest.drivers.hv_balloon import DRIVER, DriverViolation, HvHotaddState
from guest.invariants import Finding, check_guest
from guest.mm.dump import walk_dump
from guest.mm.pages import ABSENT_PAGE, BUDDY, PAGE_OFFLINE, UNINIT_PAGE, reserved
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
BACKED = BLOCK + 40 * MIB  # block 32 full, block 33 partly backed
UNBACKED = (R + BACKED, R + 2 * BLOCK)


@dataclass
class World:
    g: GuestVm
    backed: RangeSet
    offered: RangeSet

    def findings(self, *, with_truth: bool = True) -> list[Finding]:
        if with_truth:
            return check_guest(self.g.mm, self.g.driver, self.backed, self.offered)
        return check_guest(self.g.mm, self.g.driver, None)

    def names(self, *, with_truth: bool = True) -> set[str]:
        return {f.invariant for f in self.findings(with_truth=with_truth)}

    @property
    def region(self) -> HvHotaddState:
        (has,) = self.g.driver.ha_regions
        return has


def hot_add(w: World, start: int, count: int, region: int | None) -> None:
    w.backed.add(start, start + count)
    w.offered.add(start, start + count)
    rg = PageRange(start, region) if region is not None else None
    w.g.deliver(HotAddRequest(1, PageRange(start, count), rg))
    while True:
        w.g.run_until(w.g.now)
        if any(isinstance(m, HotAddResponse) for m in w.g.drain_outbox()):
            return
        deadline = w.g.next_deadline()
        assert deadline is not None and deadline < 100
        w.g.run_until(deadline)


def world(**kw: Any) -> World:
    kw.setdefault("udev_online_type", "online")
    g = GuestVm(GuestConfig("vm", boot_pages=BOOT, pressure_report_delay=10**9, **kw))
    g.start()
    g.run_until(0)
    (ver,) = g.drain_outbox()
    g.deliver(VersionResponse(ver.trans_id, True))
    g.run_until(0)
    (caps,) = g.drain_outbox()
    g.deliver(CapabilitiesResponse(caps.trans_id, True))
    g.run_until(0)
    backed = RangeSet()
    backed.add(0, BOOT)
    w = World(g, backed, RangeSet())
    hot_add(w, R, BACKED, GIB_PAGES)
    g.deliver(BalloonRequest(2, 2048))
    g.run_until(g.now)
    for msg in g.drain_outbox():
        if isinstance(msg, BalloonResponse):
            for r in msg.ranges:
                backed.remove(r.start_page, r.end_page)
    assert g.driver.counters.num_pages_ballooned == 2048
    g.allocate(5000, tag="work")
    return w


GIB_PAGES = 1024 * MIB


# -- healthy -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["upstream", "fixed"])
@pytest.mark.parametrize("strategy", ["callback", "going-online", "online-then-reclaim"])
def test_healthy_guest_has_no_findings(mode: str, strategy: str) -> None:
    w = world(driver_mode=mode, strategy=strategy)
    assert w.findings() == []
    assert w.findings(with_truth=False) == []
    # Later backing, contiguous and then with a gap: still healthy.
    hot_add(w, R + BACKED, 60 * MIB, None)
    hot_add(w, R + BACKED + 100 * MIB, 20 * MIB, None)
    assert w.findings() == []
    assert w.g.driver.counters.num_pages_onlined == BACKED + 80 * MIB


def test_healthy_offline_blocks_have_no_findings() -> None:
    w = world(udev_online_type=None)
    assert w.g.mm.blocks[33].state == "offline"
    assert w.findings() == []


# -- each invariant ------------------------------------------------------------------------


def test_unbacked_in_buddy() -> None:
    w = world()
    s = UNBACKED[0] + 100
    assert w.g.mm.page_state(s).kind == PAGE_OFFLINE
    w.g.mm.generic_online_pages(s, s + 16)  # a driver that onlines what it must not
    found = w.findings()
    assert [(f.invariant, f.start_pfn, f.end_pfn) for f in found] == [
        ("unbacked-in-buddy", s, s + 16)
    ]
    # Without the host's ground truth the checker cannot know.
    assert w.findings(with_truth=False) == []


def test_unbacked_allocated() -> None:
    w = world()
    taken = w.g.mm.alloc_pages(0, 8, tag="victim", touch=False)
    for s, e in taken:
        w.backed.remove(s, e)  # the host dropped pages the guest uses
    found = w.findings()
    assert {f.invariant for f in found} == {"unbacked-allocated"}
    assert sorted((f.start_pfn, f.end_pfn) for f in found) == sorted(taken)
    assert all("victim" in f.message for f in found)


def test_online_section_state_absent() -> None:
    w = world()
    p = BOOT - 100  # boot memmap: reserved, in an online section
    w.g.mm.pages.set(p, p + 8, ABSENT_PAGE)
    found = w.findings()
    assert [(f.invariant, f.start_pfn, f.end_pfn) for f in found] == [
        ("online-section-state", p, p + 8)
    ]


def test_online_section_state_uninit_is_also_an_mm_inconsistency() -> None:
    w = world()
    p = BOOT - 100
    w.g.mm.pages.set(p, p + 8, UNINIT_PAGE)
    assert w.names() == {"online-section-state", "mm-consistency"}


def test_generic_online_twice() -> None:
    w = world()
    free = next(w.g.mm.zones["Normal"].free_area.free.ranges())
    s = free[0]
    w.g.mm.generic_online_pages(s, s + 4)  # pages already in the buddy
    found = w.findings()
    assert [(f.invariant, f.start_pfn, f.end_pfn) for f in found] == [
        ("generic-online-twice", s, s + 4)
    ]


def test_backed_never_onlined_by_ground_truth() -> None:
    w = world()
    # The host backs pages but the driver never hears of it: they stay PageOffline.
    w.backed.add(UNBACKED[0], UNBACKED[0] + 1000)
    found = w.findings()
    assert [(f.invariant, f.start_pfn, f.end_pfn) for f in found] == [
        ("backed-never-onlined", UNBACKED[0], UNBACKED[0] + 1000)
    ]
    assert w.findings(with_truth=False) == []


def test_backed_never_onlined_by_driver_bookkeeping() -> None:
    w = world()
    w.region.covered_end_pfn += 1000  # backed on paper, never onlined
    found = w.findings(with_truth=False)
    assert [(f.invariant, f.start_pfn, f.end_pfn) for f in found] == [
        ("backed-never-onlined", UNBACKED[0], UNBACKED[0] + 1000)
    ]


def test_backed_never_onlined_ignores_offline_blocks() -> None:
    w = world(udev_online_type=None)
    w.backed.add(*UNBACKED)
    w.region.covered_end_pfn = UNBACKED[1]
    assert "backed-never-onlined" not in w.names()


REGION_CORRUPTIONS: dict[str, tuple[Callable[[HvHotaddState], object], str]] = {
    "covered_end beyond ha_end": (
        lambda h: setattr(h, "covered_end_pfn", h.ha_end_pfn + 5),
        "beyond ha_end_pfn",
    ),
    "covered_start below start": (
        lambda h: setattr(h, "covered_start_pfn", h.start_pfn - 1),
        "below start_pfn",
    ),
    "ha_end beyond end": (lambda h: setattr(h, "end_pfn", h.ha_end_pfn - BLOCK), "beyond end_pfn"),
    "ha_end not whole chunks": (
        lambda h: setattr(h, "ha_end_pfn", h.ha_end_pfn - 1),
        "whole number of chunks",
    ),
    "inverted gap": (lambda h: h.gaps.append((R + 100, R + 50)), "inverted gap"),
    "gap outside covered": (
        lambda h: h.gaps.append((h.covered_end_pfn, h.covered_end_pfn + 10)),
        "outside the covered range",
    ),
    "overlapping gaps": (
        lambda h: h.gaps.extend([(R + 10, R + 30), (R + 20, R + 40)]),
        "overlapping gaps",
    ),
}


@pytest.mark.parametrize("name", list(REGION_CORRUPTIONS))
def test_region_bookkeeping(name: str) -> None:
    w = world()
    corrupt, message = REGION_CORRUPTIONS[name]
    corrupt(w.region)
    found = [f for f in w.findings(with_truth=False) if f.invariant == "region-bookkeeping"]
    assert len(found) == 1
    assert message in found[0].message
    assert (found[0].start_pfn, found[0].end_pfn) == (w.region.start_pfn, w.region.end_pfn)


def test_counter_onlined() -> None:
    w = world()
    w.g.driver.counters.num_pages_onlined += 1
    assert w.names() == {"counter-onlined"}
    w.g.driver.counters.num_pages_onlined -= 2
    assert w.names() == {"counter-onlined"}


def test_counter_onlined_catches_a_page_pulled_out_behind_the_drivers_back() -> None:
    w = world()
    s = R + 1000
    assert w.g.mm.page_state(s).kind == BUDDY
    w.g.mm.take_free_pages(s, s + 10)
    w.g.mm.set_page_offline(s, s + 10, DRIVER)
    # The pages are backed and in an online block but offline: never onlined, and counted.
    assert w.names() == {"counter-onlined", "backed-never-onlined"}


def test_counter_ballooned() -> None:
    w = world()
    w.g.driver.counters.num_pages_ballooned -= 1
    assert w.names() == {"counter-ballooned"}


def test_hot_add_page_count() -> None:
    w = world()
    w.g.driver.counters.num_pages_added += 100
    assert w.names() == {"hot-add-page-count"}
    # Only checked when the host's offered pages are given.
    assert check_guest(w.g.mm, w.g.driver, w.backed) == []


def test_unballoon_not_ballooned() -> None:
    w = world()
    w.g.driver.violations.append(
        DriverViolation("unballoon-not-ballooned", 10, 20, "host unballooned buddy pages")
    )
    found = w.findings()
    assert [(f.invariant, f.start_pfn, f.end_pfn) for f in found] == [
        ("unballoon-not-ballooned", 10, 20)
    ]


def test_mm_consistency() -> None:
    w = world()
    free = next(w.g.mm.zones["Normal"].free_area.free.ranges())
    w.g.mm.pages.set(free[0], free[0] + 3, reserved("stray"))  # marked used, still in the buddy
    found = w.findings()
    assert {f.invariant for f in found} == {"mm-consistency"}
    assert any("pages marked free" in f.message for f in found)


def test_dump_read_unbacked_comes_from_walk_dump() -> None:
    # check_guest lists dump-read-unbacked among its names, but the finding is made by a
    # dump walk (the scenario runner's dump step): check_guest reports the same broken
    # state as unbacked-in-buddy.
    w = world()
    s = UNBACKED[0]
    w.g.mm.generic_online_pages(s, s + 32)
    report = walk_dump(w.g.mm, w.backed)
    assert report.unbacked_read == [(s, s + 32)]
    assert w.names() == {"unbacked-in-buddy"}
