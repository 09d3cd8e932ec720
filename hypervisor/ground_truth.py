"""The host's ground truth for one VM: which PFNs it backs, which are ballooned, where regions lie.

The hypervisor is the authority on backing (DESIGN.md): boot memory is backed from
the start, hot-add pages are backed *before* the guest is told about them, ballooned
pages are discarded (unbacked) until they are unballooned. Everything is extents
(:class:`extents.RangeSet`), so the cost follows the number of ranges, not pages.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from extents import RangeSet
from hypervisor.vm import VmConfig
from memhp.units import align_up


@dataclass(eq=False)
class HotAddRegion:
    """A hot-add region ``[start, start+size)`` the host handed to the guest (or reserved for it).

    ``backed`` holds the pages the host has backed *through hot-add requests*; ballooning
    them later does not remove them here (the VM-wide :attr:`GroundTruth.backed` is the live
    truth), so a region never offers the same page twice. ``pending`` holds pages an
    accepted operator command will back when its request goes out. ``added`` holds the
    pages the guest said it added (Σ ``page_count`` of its responses, placed from each
    request's start as Linux advances ``covered_end_pfn``).
    """

    start: int
    size: int
    backed: RangeSet = field(default_factory=RangeSet)
    pending: RangeSet = field(default_factory=RangeSet)
    added: RangeSet = field(default_factory=RangeSet)
    #: The guest answered short (or refused): no further hot-add into this region.
    unusable: bool = False
    #: The guest holds an ``hv_hotadd_state`` for the whole region (it got the 24-byte form).
    guest_known: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def backed_pages(self) -> int:
        return len(self.backed)

    @property
    def added_pages(self) -> int:
        return len(self.added)

    def contains(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end

    def snapshot(self) -> dict[str, Any]:
        """JSON-friendly: what outlives the process (``pending`` belongs to queued work)."""
        return {
            "start": self.start,
            "size": self.size,
            "backed": [[s, e] for s, e in self.backed.ranges()],
            "added": [[s, e] for s, e in self.added.ranges()],
            "unusable": self.unusable,
            "guest_known": self.guest_known,
        }

    @property
    def offered(self) -> bool:
        """The host backed part of it (always before telling the guest) or the guest holds it."""
        return bool(self.backed) or self.guest_known

    def fingerprint(self) -> tuple[int, int, bool, bool]:
        """Cheap change detector: backing and added pages only ever grow or shrink in count."""
        return (len(self.backed), len(self.added), self.unusable, self.guest_known)

    def offered_end(self) -> int:
        """End of the highest page backed or queued for backing (the region start if none)."""
        last = self.start
        for pages in (self.backed, self.pending):
            for _, end in pages.ranges(self.start, self.end):
                last = max(last, end)
        return last


class BalloonPiece(Enum):
    """How a page range the guest says it ballooned relates to the host's ground truth."""

    OK = "ok"
    DUPLICATE = "duplicate"
    UNBACKED = "unbacked"
    OUTSIDE_RAM = "outside-ram"


class GroundTruth:
    """Backed, ballooned and guest-RAM extents of one VM, and its hot-add regions."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.backed = RangeSet()
        self.backed.add(0, config.boot_pages)
        self.ballooned = RangeSet()
        #: Guest RAM: boot memory plus every page the guest reported as hot-added.
        self.ram = RangeSet()
        self.ram.add(0, config.boot_pages)
        #: The address windows of all regions (for telling "unbacked" from "not RAM").
        self.windows = RangeSet()
        self.regions: list[HotAddRegion] = []
        # Running totals and an index, so that placing or finding a region does not
        # walk every region (a guest grown to 1 TiB in 128 MiB steps has 8,160).
        self._regions_size = 0
        self._regions_end = 0
        self._hot_add_backed = 0
        self._starts: list[int] = []
        self._by_start: dict[int, HotAddRegion] = {}

    # -- reading ---------------------------------------------------------------

    @property
    def reserved_pages(self) -> int:
        """Boot memory plus every region's size: what counts against ``max_pages``."""
        return self.config.boot_pages + self._regions_size

    @property
    def hot_add_backed_pages(self) -> int:
        """Every page ever backed through hot-add (the regions' ``backed``, summed)."""
        return self._hot_add_backed

    @property
    def current_pages(self) -> int:
        """QEMU's "actual": boot + added - ballooned."""
        return len(self.ram) - len(self.ballooned)

    def next_region_start(self, align: int) -> int:
        return align_up(max(self._regions_end, self.config.boot_pages), align)

    def region_at(self, pfn: int) -> HotAddRegion | None:
        # Region windows never overlap (place_region's callers check), so the region
        # with the last start at or below pfn is the only candidate.
        i = bisect_right(self._starts, pfn) - 1
        if i < 0:
            return None
        region = self._by_start[self._starts[i]]
        return region if pfn < region.end else None

    def classify_balloon(self, start: int, end: int) -> Iterator[tuple[BalloonPiece, int, int]]:
        """Split ``[start, end)`` into pieces by what the host knows of them, ascending."""
        pieces: list[tuple[int, int, BalloonPiece]] = []
        for a, b in self.ballooned.ranges(start, end):
            pieces.append((a, b, BalloonPiece.DUPLICATE))
        for a, b in self.ballooned.holes(start, end):
            for c, d in self.ram.ranges(a, b):
                pieces.append((c, d, BalloonPiece.OK))
            for c, d in self.ram.holes(a, b):
                # Inside a region but never backed is the "unbacked hot-add area" case of
                # §5.4; backed-but-not-added or beyond every region is simply not RAM.
                for x, y in self.windows.ranges(c, d):
                    for p, q in self.backed.holes(x, y):
                        pieces.append((p, q, BalloonPiece.UNBACKED))
                    for p, q in self.backed.ranges(x, y):
                        pieces.append((p, q, BalloonPiece.OUTSIDE_RAM))
                for x, y in self.windows.holes(c, d):
                    pieces.append((x, y, BalloonPiece.OUTSIDE_RAM))
        pieces.sort(key=lambda p: p[0])
        for a, b, kind in pieces:
            yield kind, a, b

    def top_ballooned(self, pages: int, max_run: int) -> list[tuple[int, int]]:
        """Up to ``pages`` ballooned pages, highest range first from its top end (QEMU order)."""
        out: list[tuple[int, int]] = []
        for start, end in reversed(list(self.ballooned.ranges())):
            while pages > 0 and end > start:
                n = min(end - start, pages, max_run)
                out.append((end - n, end))
                end -= n
                pages -= n
            if pages == 0:
                break
        return out

    # -- writing ---------------------------------------------------------------

    def place_region(self, start: int, size: int) -> HotAddRegion:
        region = HotAddRegion(start, size)
        self.regions.append(region)
        self.windows.add(start, start + size)
        self._regions_size += size
        self._regions_end = max(self._regions_end, start + size)
        insort(self._starts, start)
        self._by_start[start] = region
        return region

    def back(self, region: HotAddRegion, start: int, end: int) -> None:
        """The host backs ``[start, end)`` of ``region`` (just before it tells the guest)."""
        region.pending.remove(start, end)
        before = len(region.backed)
        region.backed.add(start, end)
        self._hot_add_backed += len(region.backed) - before
        self.backed.add(start, end)

    def record_added(self, region: HotAddRegion, start: int, end: int) -> None:
        region.added.add(start, end)
        self.ram.add(start, end)

    def balloon(self, start: int, end: int) -> None:
        """The guest gave ``[start, end)`` back: the host discards (unbacks) it."""
        self.ballooned.add(start, end)
        self.backed.remove(start, end)

    def unballoon(self, start: int, end: int) -> None:
        """The host backs ``[start, end)`` again and hands it back to the guest."""
        self.ballooned.remove(start, end)
        self.backed.add(start, end)

    def forget_ballooned(self) -> None:
        """VMBus reset: balloon tracking is dropped and the pages are usable (backed) again."""
        for start, end in list(self.ballooned.ranges()):
            self.unballoon(start, end)

    # -- snapshot --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-friendly truth: regions and ballooned ranges (backed and RAM follow from them).

        Only regions that were offered count: one that only queued work reserved holds
        nothing once that work is gone (a snapshot never carries queued work).

        ``backed`` is boot memory plus every region's backed pages minus the ballooned
        ones, and guest RAM is boot memory plus every region's added pages, so neither is
        stored.
        """
        return {
            "ballooned": [[s, e] for s, e in self.ballooned.ranges()],
            "regions": [r.snapshot() for r in self.regions if r.offered],
        }

    @classmethod
    def from_snapshot(cls, config: VmConfig, data: Mapping[str, Any]) -> GroundTruth:
        """Rebuild the truth from :meth:`snapshot`; ValueError names what does not fit."""
        truth = cls(config)
        for i, raw in enumerate(data.get("regions", ())):
            what = f"regions[{i}]"
            if not isinstance(raw, Mapping):
                raise ValueError(f"{what}: must be a mapping, got {raw!r}")
            start = _int(raw.get("start"), f"{what}.start")
            size = _int(raw.get("size"), f"{what}.size")
            if start < config.boot_pages or size <= 0 or start + size > config.max_pages:
                raise ValueError(
                    f"{what}: [{start:#x}, {start + size:#x}) is not inside the hotplug "
                    f"window [{config.boot_pages:#x}, {config.max_pages:#x})"
                )
            if not truth.windows.disjoint(start, start + size):
                raise ValueError(f"{what}: [{start:#x}, {start + size:#x}) overlaps a region")
            region = truth.place_region(start, size)
            for s, e in _ranges(raw.get("backed", ()), f"{what}.backed"):
                if not region.contains(s, e):
                    raise ValueError(f"{what}.backed: [{s:#x}, {e:#x}) outside the region")
                truth.back(region, s, e)
            for s, e in _ranges(raw.get("added", ()), f"{what}.added"):
                if not region.backed.covers(s, e):
                    raise ValueError(f"{what}.added: [{s:#x}, {e:#x}) was never backed")
                truth.record_added(region, s, e)
            region.unusable = bool(raw.get("unusable", False))
            region.guest_known = bool(raw.get("guest_known", False))
        for s, e in _ranges(data.get("ballooned", ()), "ballooned"):
            if not truth.ram.covers(s, e):
                raise ValueError(f"ballooned: [{s:#x}, {e:#x}) is not guest RAM")
            truth.balloon(s, e)
        return truth


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}: must be a non-negative integer, got {value!r}")
    return value


def _ranges(raw: Iterable[Any], what: str) -> Iterator[tuple[int, int]]:
    for i, pair in enumerate(raw):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{what}[{i}]: must be a [start, end) pair, got {pair!r}")
        start, end = _int(pair[0], f"{what}[{i}]"), _int(pair[1], f"{what}[{i}]")
        if start >= end:
            raise ValueError(f"{what}[{i}]: empty range [{start:#x}, {end:#x})")
        yield start, end
