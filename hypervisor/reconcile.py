"""Reattach: fold what a returning guest says it holds into the host's ground truth.

A guest agent whose stream broke (or whose hypervisor restarted) comes back with its
driver state intact: the regions it holds (``hv_hotadd_state``), how many pages it has
added, what it holds ballooned. The guest's layout wins for what it already added, and
nothing is offered twice:

- host regions the guest holds become ``guest_known`` (later backing may go out in the
  16-byte form); host regions it does not hold keep their addresses but take no more
  hot-add, and their added pages leave guest RAM;
- guest regions the host does not know become host regions (backed as far as the guest
  added, then closed to further hot-add);
- added pages the host never heard of (the answer to a request in flight when the
  stream broke) are placed first in that request's range, then in the backed but not
  added pages of held regions; pages the host counted but the guest does not hold are
  taken back from the top;
- the ballooned ranges the guest reports are ballooned in the host's truth.

A memhp guest also lists its regions one by one with the pages it added in each
(``GuestMemoryState.held``). Then the match is exact: each region the host did not know
is adopted on its own (neighbours stay apart), and every held region's added pages are
the guest's, page by page (what the host had not backed yet is backed: it was offered).
That is what a hypervisor killed in the middle of a batch needs, whose state file may
lack the last few milliseconds. Without the list, the rules above place the
``pages_added`` total.

Pure: works on :class:`GroundTruth`; :func:`reattach` applies it to a session through
its snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extents import RangeSet
from hypervisor.dm_host import DmHostSession
from hypervisor.ground_truth import GroundTruth, HotAddRegion


@dataclass(frozen=True)
class HeldRegion:
    """One region a reattaching guest holds (``HeldRegion``), with the pages it added."""

    start: int
    pages: int
    added: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class GuestState:
    """What a reattaching guest reports (``GuestMemoryState``), as ``(start, pages)`` pairs.

    ``held`` (empty from a guest that does not send it) lists the regions one by one with
    their added pages: then reconciling is exact, region by region and page by page.
    """

    regions: tuple[tuple[int, int], ...] = ()
    pages_added: int = 0
    ballooned: tuple[tuple[int, int], ...] = ()
    held: tuple[HeldRegion, ...] = ()


@dataclass
class ReconcileReport:
    """What reconciling changed, for the attach event and the log."""

    held_regions: int = 0
    adopted_regions: int = 0
    dropped_regions: int = 0
    added_placed: int = 0
    added_removed: int = 0
    ballooned: int = 0
    notes: list[str] = field(default_factory=list)

    def as_data(self) -> dict[str, object]:
        return {
            "held_regions": self.held_regions,
            "adopted_regions": self.adopted_regions,
            "dropped_regions": self.dropped_regions,
            "added_placed": self.added_placed,
            "added_removed": self.added_removed,
            "ballooned_pages": self.ballooned,
            "notes": list(self.notes),
        }


def _in_window(
    truth: GroundTruth, start: int, pages: int, what: str, report: ReconcileReport
) -> bool:
    """Whether ``[start, start+pages)`` lies in the hotplug window (noted when it does not)."""
    cfg = truth.config
    end = start + pages
    if pages <= 0 or start < cfg.boot_pages or end > cfg.max_pages:
        report.notes.append(
            f"{what} [{start:#x}, {end:#x}) ignored: outside the hotplug window "
            f"[{cfg.boot_pages:#x}, {cfg.max_pages:#x})"
        )
        return False
    return True


def _windows(
    truth: GroundTruth, pairs: tuple[tuple[int, int], ...], what: str, report: ReconcileReport
) -> RangeSet:
    out = RangeSet()
    for start, pages in pairs:
        if _in_window(truth, start, pages, what, report):
            out.add(start, start + pages)
    return out


def reconcile(
    truth: GroundTruth, state: GuestState, in_flight: tuple[int, int] | None = None
) -> ReconcileReport:
    """Make ``truth`` agree with ``state`` (see the module docstring); returns what changed.

    ``in_flight`` is the range of the hot-add request that had no answer when the
    stream broke: the first place unreported added pages go.
    """
    report = ReconcileReport()
    regions = _held_regions(truth, state.held, report) if state.held else None
    if regions is None:
        held = _windows(truth, state.regions, "guest region", report)
    else:
        held = RangeSet()
        for start, end, _ in regions:
            held.add(start, end)
    # 1. Host regions: held or not.
    for region in truth.regions:
        if held.disjoint(region.start, region.end):
            region.guest_known = False
            if not region.unusable:
                # A 16-byte request into it would find no hv_hotadd_state.
                region.unusable = True
                report.dropped_regions += 1
            for s, e in list(region.added.ranges()):
                _unadd(truth, region, s, e)
                report.added_removed += e - s
        else:
            region.guest_known = True
            report.held_regions += 1
    # 2. Guest regions the host never placed (one by one when the guest listed them so:
    # neighbours stay apart).
    adopted: list[HotAddRegion] = []
    spans = list(held.ranges()) if regions is None else [(s, e) for s, e, _ in regions]
    for start, end in spans:
        for s, e in list(truth.windows.holes(start, end)):
            region = truth.place_region(s, e - s)
            region.guest_known = True
            region.unusable = True
            adopted.append(region)
            report.adopted_regions += 1
            report.notes.append(f"adopted guest region [{s:#x}, {e:#x}) the host did not know")
    # 3. Added pages.
    if regions is not None:
        _match_added(truth, held, regions, report)
        extra = 0
    else:
        host_added = sum(r.added_pages for r in truth.regions)
        extra = state.pages_added - host_added
    if extra > 0:
        extra = _place_extra(truth, held, adopted, extra, in_flight, report)
        if extra:
            report.notes.append(f"{extra} added pages the guest reports have no place")
    elif extra < 0:
        _take_back(truth, -extra, report)
    # 4. Ballooned pages: the guest's word, where it is guest RAM.
    for start, pages in state.ballooned:
        end = start + pages
        if pages <= 0:
            continue
        for s, e in list(truth.ram.holes(start, end)):
            report.notes.append(f"ballooned [{s:#x}, {e:#x}) ignored: not guest RAM")
        for s, e in list(truth.ram.ranges(start, end)):
            for a, b in list(truth.ballooned.holes(s, e)):
                truth.balloon(a, b)
                report.ballooned += b - a
    return report


def _held_regions(
    truth: GroundTruth, held: tuple[HeldRegion, ...], report: ReconcileReport
) -> list[tuple[int, int, RangeSet]]:
    """The guest's regions that fit the hotplug window and none before them, each with its
    added pages clipped to it (what does not fit is noted and left out)."""
    out: list[tuple[int, int, RangeSet]] = []
    taken = RangeSet()
    for h in held:
        start, end = h.start, h.start + h.pages
        if not _in_window(truth, h.start, h.pages, "guest region", report):
            continue
        if not taken.disjoint(start, end):
            report.notes.append(f"guest region [{start:#x}, {end:#x}) ignored: overlaps another")
            continue
        taken.add(start, end)
        added = RangeSet()
        for a, n in h.added:
            if n <= 0:
                continue
            if a < start or a + n > end:
                report.notes.append(
                    f"added [{a:#x}, {a + n:#x}) ignored: outside its region [{start:#x}, {end:#x})"
                )
                continue
            added.add(a, a + n)
        out.append((start, end, added))
    return out


def _match_added(
    truth: GroundTruth,
    held: RangeSet,
    regions: list[tuple[int, int, RangeSet]],
    report: ReconcileReport,
) -> None:
    """Make every held host region's added pages exactly the guest's (backing what the
    guest added that the host's truth had not backed yet: the host offered it)."""
    guest_added = RangeSet()
    for _, _, added in regions:
        for s, e in added.ranges():
            guest_added.add(s, e)
    for region in truth.regions:
        if held.disjoint(region.start, region.end):
            continue
        for s, e in list(region.added.ranges()):
            for a, b in list(guest_added.holes(s, e)):
                _unadd(truth, region, a, b)
                report.added_removed += b - a
        for s, e in list(guest_added.ranges(region.start, region.end)):
            for a, b in list(region.added.holes(s, e)):
                for c, d in list(region.backed.holes(a, b)):
                    truth.back(region, c, d)
                truth.record_added(region, a, b)
                report.added_placed += b - a


def _unadd(truth: GroundTruth, region: HotAddRegion, start: int, end: int) -> None:
    region.added.remove(start, end)
    truth.ram.remove(start, end)
    # A page that is not RAM cannot stay ballooned.
    for s, e in list(truth.ballooned.ranges(start, end)):
        truth.unballoon(s, e)


def _place_extra(
    truth: GroundTruth,
    held: RangeSet,
    adopted: list[HotAddRegion],
    extra: int,
    in_flight: tuple[int, int] | None,
    report: ReconcileReport,
) -> int:
    """Mark up to ``extra`` pages added (the guest added them; the host missed the answer)."""
    candidates: list[tuple[HotAddRegion, int, int]] = []
    if in_flight is not None:
        region = truth.region_at(in_flight[0])
        if region is not None and not held.disjoint(region.start, region.end):
            candidates.append((region, in_flight[0], min(in_flight[1], region.end)))
    for region in truth.regions:
        if region in adopted or held.disjoint(region.start, region.end):
            continue
        candidates.append((region, region.start, region.end))
    for region, start, end in candidates:
        for s, e in list(region.backed.ranges(start, end)):
            for a, b in list(region.added.holes(s, e)):
                take = min(b - a, extra)
                truth.record_added(region, a, a + take)
                report.added_placed += take
                extra -= take
                if not extra:
                    return 0
    # Adopted regions: the host backs what the guest already uses, from the start.
    for region in adopted:
        take = min(region.size, extra)
        truth.back(region, region.start, region.start + take)
        truth.record_added(region, region.start, region.start + take)
        report.added_placed += take
        extra -= take
        if not extra:
            return 0
    return extra


def _take_back(truth: GroundTruth, pages: int, report: ReconcileReport) -> None:
    """The guest holds ``pages`` fewer added pages than the host counted: drop from the top."""
    for region in reversed(truth.regions):
        for s, e in reversed(list(region.added.ranges())):
            take = min(e - s, pages)
            _unadd(truth, region, e - take, e)
            report.added_removed += take
            pages -= take
            if not pages:
                report.notes.append("the guest holds fewer added pages than the host counted")
                return


def reattach(session: DmHostSession, state: GuestState | None) -> ReconcileReport:
    """A guest comes back on a new channel: reset the session, then reconcile with ``state``.

    The session resets as on a VMBus reset (the request in flight is abandoned, balloon
    tracking dropped, regions no longer guest-known) but keeps whether the guest
    disabled hot-add; queued commands are dropped. Without ``state`` the host's truth
    stands as the reset left it.
    """
    disabled = session.hot_add_disabled
    txn = session.in_flight
    in_flight = None
    if txn is not None and txn.kind == "hot_add" and txn.range is not None:
        in_flight = (txn.range.start_page, txn.range.end_page)
    session.reset()
    snap = session.snapshot()
    snap["hot_add_disabled"] = disabled
    report = ReconcileReport()
    if state is not None:
        truth = GroundTruth.from_snapshot(session.config, snap)
        report = reconcile(truth, state, in_flight)
        snap.update(truth.snapshot())
    session.restore(snap)
    return report
