"""Queued operator work and the host-initiated transaction in flight, for the DM host session.

An operator command becomes a :class:`Command`: a small plan of what is left to do
(an explicit hot-add offer, pages to unballoon, to hot-add, to balloon). The session
runs one command at a time and turns it into transactions, one in flight at a time
(hyperv-dm.md §5.3): QEMU's ``balloon_diff`` / ``unballoon_diff`` / ``hot_add_diff``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypervisor.ground_truth import HotAddRegion
from memhp.dm import PageRange


@dataclass(frozen=True)
class Offer:
    """An explicit hot-add request to send: back ``[start, start+pages)`` of ``region``.

    ``with_region`` picks the 24-byte form (a new region for the guest) over the 16-byte
    form (more backing for a region the guest already holds).
    """

    region: HotAddRegion
    start: int
    pages: int
    with_region: bool


@dataclass(eq=False)
class Command:
    """One operator command, queued or running; what it still has to do."""

    name: str
    target: int | None = None
    offer: Offer | None = None
    #: A batch (``HotAdd`` with a count, ``Back`` of everything remaining): the offers
    #: after ``offer``, each its own transaction, in order.
    later: deque[Offer] = field(default_factory=deque)
    unballoon_diff: int = 0
    hot_add_diff: int = 0
    balloon_diff: int = 0
    #: ``set_target`` splits its target into diffs only when it starts (QEMU: in S_IDLE).
    planned: bool = True
    #: A newer ``set_target`` replaced this one; it stops at the next transaction boundary.
    superseded: bool = False

    def __post_init__(self) -> None:
        # Fixed at creation: the diffs shrink as the command runs.
        self.label = self._describe()

    def describe(self) -> str:
        return self.label

    def _describe(self) -> str:
        if self.name == "set_target":
            return f"set_target {self.target}"
        first = self.offer if self.offer is not None else (self.later[0] if self.later else None)
        if first is not None:
            n = (self.offer is not None) + len(self.later)
            end = first.start + first.pages
            more = f" and {n - 1} more" if n > 1 else ""
            return f"{self.name} [{first.start:#x}, {end:#x}){more}"
        pages = self.balloon_diff or self.unballoon_diff or self.hot_add_diff
        return f"{self.name} {pages}"


@dataclass(eq=False)
class Transaction:
    """The host-initiated transaction in flight: which, since when, what was asked and got."""

    kind: str  # "balloon" | "unballoon" | "hot_add"
    trans_id: int
    pages: int
    started: float
    command: Command
    #: Balloon: pages accepted so far over all responses.
    received: int = 0
    #: Hot-add: the request's range and region (None in the 16-byte form).
    range: PageRange | None = None
    region: PageRange | None = None
    target_region: HotAddRegion | None = None

    def describe(self) -> str:
        if self.kind == "hot_add" and self.range is not None:
            form = "24-byte" if self.region is not None else "16-byte"
            end = self.range.end_page
            return (
                f"hot_add trans_id={self.trans_id} [{self.range.start_page:#x}, {end:#x}) "
                f"{self.pages} pages ({form})"
            )
        if self.kind == "balloon":
            return f"balloon trans_id={self.trans_id} {self.pages} pages ({self.received} received)"
        return f"{self.kind} trans_id={self.trans_id} {self.pages} pages"
