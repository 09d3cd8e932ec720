"""The host's ground truth for one VM: which PFNs it backs, which are ballooned, where regions lie.

The hypervisor is the authority on backing (DESIGN.md): boot memory is backed from
the start, hot-add pages are backed *before* the guest is told about them, ballooned
pages are discarded (unbacked) until they are unballooned. Everything is extents
(:class:`extents.RangeSet`), so the cost follows the number of ranges, not pages.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

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

    # -- reading ---------------------------------------------------------------

    @property
    def reserved_pages(self) -> int:
        """Boot memory plus every region's size: what counts against ``max_pages``."""
        return self.config.boot_pages + sum(r.size for r in self.regions)

    @property
    def current_pages(self) -> int:
        """QEMU's "actual": boot + added - ballooned."""
        return len(self.ram) - len(self.ballooned)

    def next_region_start(self, align: int) -> int:
        end = max((r.end for r in self.regions), default=self.config.boot_pages)
        return align_up(max(end, self.config.boot_pages), align)

    def region_at(self, pfn: int) -> HotAddRegion | None:
        for region in self.regions:
            if region.start <= pfn < region.end:
                return region
        return None

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
        return region

    def back(self, region: HotAddRegion, start: int, end: int) -> None:
        """The host backs ``[start, end)`` of ``region`` (just before it tells the guest)."""
        region.pending.remove(start, end)
        region.backed.add(start, end)
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
