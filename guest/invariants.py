"""Named invariants of the guest (hyperv-dm.md §5, mm-model.md §7), checked on demand.

:func:`check_guest` looks at a :class:`guest.vm.GuestVm` and, when given, the
host's ground truth of which guest pages are backed. Every finding is a
:class:`Finding` with the invariant's name and the PFN range; the scenario
runner adds the step and a trace. Costs follow extents, never pages.

Names (stable: scenarios declare expected violations by them):

``unbacked-in-buddy``       a free page the host does not back (inv. 9)
``unbacked-allocated``      an allocated page the host does not back (inv. 9)
``online-section-state``    a page of an online section that is neither free, allocated,
                            reserved nor PageOffline (inv. 10)
``generic-online-twice``    ``generic_online_page`` twice, or on a page not PageOffline (inv. 11)
``backed-never-onlined``    a backed page of an online block still PageOffline: nobody will
                            online it (inv. 12; E2, E3)
``region-bookkeeping``      an ``hv_hotadd_state`` breaks its own rules (inv. 13; E1, E2)
``counter-onlined``         ``num_pages_onlined`` is not the number of backed pages that went
                            online (inv. 15)
``counter-ballooned``       ``num_pages_ballooned`` is not the number of ballooned pages (inv. 16)
``dump-read-unbacked``      a dump walk would read an unbacked page (PageOffline missing);
                            reported by whoever runs :func:`guest.mm.dump.walk_dump`
``hot-add-page-count``      ``num_pages_added`` (the sum of the responses' ``page_count``) is not
                            the number of offered pages the guest really added (inv. 7; E1)
``unballoon-not-ballooned`` the host unballooned pages that were not ballooned (E6)
``mm-consistency``          the model's own bookkeeping disagrees with itself (a model bug)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from extents import RangeSet
from guest.drivers.hv_balloon import DRIVER, HvBalloon
from guest.mm.memory import MemoryManager
from guest.mm.pages import (
    ABSENT,
    ALLOCATED,
    BUDDY,
    OWNER_BALLOON,
    OWNER_CORE,
    PAGE_OFFLINE,
    UNINIT,
    VMEMMAP_PAGE,
)


@dataclass(frozen=True)
class Finding:
    invariant: str
    start_pfn: int
    end_pfn: int
    message: str


def check_guest(
    mm: MemoryManager,
    driver: HvBalloon | None,
    host_backed: RangeSet | None,
    host_offered: RangeSet | None = None,
) -> list[Finding]:
    """Every invariant; ``host_backed`` is the host's live ground truth, ``host_offered``
    every page it ever backed through hot-add (both optional: guest-only checks without).

    Without an hv_balloon ``driver`` (a virtio-mem guest) only the memory model's own
    invariants are checked here; :mod:`guest.virtio_mem_invariants` has the driver's.
    """
    out: list[Finding] = []
    for problem in mm.check():
        out.append(Finding("mm-consistency", 0, 0, problem))
    if host_backed is not None:
        out += _check_backing(mm, host_backed)
    out += _check_online_sections(mm)
    for w in mm.warnings:
        out.append(Finding("generic-online-twice", w.start_pfn, w.end_pfn, w.message))
    if driver is None:
        return out
    out += _check_regions(driver)
    out += _check_never_onlined(mm, driver, host_backed)
    out += _check_counters(mm, driver)
    if host_offered is not None:
        out += _check_added(mm, driver, host_offered)
    for v in driver.violations:
        out.append(Finding(v.kind, v.start_pfn, v.end_pfn, v.message))
    return out


def _check_backing(mm: MemoryManager, backed: RangeSet) -> list[Finding]:
    out: list[Finding] = []
    for zone in mm.zones.values():
        for free in (zone.free_area.free, zone.free_area.isolated):
            for s, e in free.ranges():
                for hs, he in backed.holes(s, e):
                    out.append(
                        Finding(
                            "unbacked-in-buddy",
                            hs,
                            he,
                            f"{he - hs} unbacked pages free in the buddy of zone {zone.name}",
                        )
                    )
    for tag, owned in mm.allocations.items():
        for s, e in owned.ranges():
            for hs, he in backed.holes(s, e):
                out.append(
                    Finding(
                        "unbacked-allocated",
                        hs,
                        he,
                        f"{he - hs} unbacked pages allocated by {tag!r}",
                    )
                )
    return out


def _check_online_sections(mm: MemoryManager) -> list[Finding]:
    out: list[Finding] = []
    for s, e in mm.online_sections.ranges():
        for rs, re_, state in mm.pages.runs(s, e):
            if state.kind in (ABSENT, UNINIT):
                out.append(
                    Finding(
                        "online-section-state",
                        rs,
                        re_,
                        f"{state.kind} pages in an online section",
                    )
                )
    return out


def _check_regions(driver: HvBalloon) -> list[Finding]:
    out: list[Finding] = []
    chunk = driver.ha_pages_in_chunk
    for has in driver.ha_regions:
        problems: list[str] = []
        if not has.start_pfn <= has.covered_start_pfn:
            problems.append(
                f"covered_start_pfn {has.covered_start_pfn:#x} below start_pfn {has.start_pfn:#x}"
            )
        if not has.covered_end_pfn <= has.ha_end_pfn:
            problems.append(
                f"covered_end_pfn {has.covered_end_pfn:#x} beyond ha_end_pfn {has.ha_end_pfn:#x}: "
                f"{has.covered_end_pfn - has.ha_end_pfn} pages counted as added that were never "
                "added (E1)"
            )
        if not has.ha_end_pfn <= has.end_pfn:
            problems.append(f"ha_end_pfn {has.ha_end_pfn:#x} beyond end_pfn {has.end_pfn:#x}")
        if (has.ha_end_pfn - has.start_pfn) % chunk:
            problems.append("ha_end_pfn - start_pfn is not a whole number of chunks")
        for gs, ge in has.gaps:
            if gs >= ge:
                problems.append(f"inverted gap [{gs:#x}, {ge:#x}) (E2)")
            elif gs < has.covered_start_pfn or ge > has.covered_end_pfn:
                problems.append(f"gap [{gs:#x}, {ge:#x}) outside the covered range")
        valid = sorted((gs, ge) for gs, ge in has.gaps if gs < ge)
        for (_, e1), (s2, _) in itertools.pairwise(valid):
            if s2 < e1:
                problems.append("overlapping gaps")
        out += [Finding("region-bookkeeping", has.start_pfn, has.end_pfn, p) for p in problems]
    return out


def _check_never_onlined(
    mm: MemoryManager, driver: HvBalloon, host_backed: RangeSet | None
) -> list[Finding]:
    """Backed pages of online blocks that stay PageOffline (no one will online them)."""
    out: list[Finding] = []
    for has in driver.ha_regions:
        for s, e in mm.online_sections.ranges(has.start_pfn, has.end_pfn):
            for rs, re_, state in mm.pages.runs(s, e):
                if state.kind != PAGE_OFFLINE or state.owner not in (OWNER_CORE, DRIVER):
                    continue
                block = mm.block_of(rs)
                if block is None or block.state != "online":
                    continue
                candidates = (
                    list(host_backed.ranges(rs, re_))
                    if host_backed is not None
                    else list(has.backed_ranges(rs, re_))
                )
                for bs, be in candidates:
                    out.append(
                        Finding(
                            "backed-never-onlined",
                            bs,
                            be,
                            f"{be - bs} backed pages of online memory{block.id} left PageOffline",
                        )
                    )
    return out


def _check_counters(mm: MemoryManager, driver: HvBalloon) -> list[Finding]:
    out: list[Finding] = []
    onlined = 0
    for has in driver.ha_regions:
        for s, e in has.backed_ranges(has.start_pfn, has.end_pfn):
            for rs, re_, state in mm.pages.runs(s, e):
                if state.kind in (ABSENT, UNINIT) or state == VMEMMAP_PAGE:
                    # memmap_on_memory pages hold the block's own memmap: never onlined.
                    continue
                if state.kind == PAGE_OFFLINE and state.owner in (OWNER_CORE, DRIVER):
                    continue
                if rs not in mm.online_sections and state.kind not in (BUDDY, ALLOCATED):
                    continue
                onlined += re_ - rs
    c = driver.counters
    if c.num_pages_onlined != onlined:
        out.append(
            Finding(
                "counter-onlined",
                0,
                0,
                f"num_pages_onlined {c.num_pages_onlined} but {onlined} backed pages went online",
            )
        )
    ballooned = mm.count_pages(PAGE_OFFLINE, OWNER_BALLOON)
    if c.num_pages_ballooned != ballooned:
        out.append(
            Finding(
                "counter-ballooned",
                0,
                0,
                f"num_pages_ballooned {c.num_pages_ballooned} but {ballooned} pages are ballooned",
            )
        )
    return out


def _check_added(mm: MemoryManager, driver: HvBalloon, offered: RangeSet) -> list[Finding]:
    """Inv. 7: the pages reported added are offered pages that really are present."""
    present = 0
    for s, e in offered.ranges():
        present += sum(re_ - rs for rs, re_, st in mm.pages.runs(s, e) if st.kind != ABSENT)
    claimed = driver.counters.num_pages_added
    if claimed == present:
        return []
    return [
        Finding(
            "hot-add-page-count",
            0,
            0,
            f"responses reported {claimed} pages added, but only {present} offered pages "
            "are present in the guest",
        )
    ]
