"""Allocation workloads of the guest agent: ``steady:SIZE`` and ``ramp:FROM:TO:SECONDS``.

A workload keeps the pages allocated under its tag at the size its curve gives for
the time since it started: ``steady`` at one size, ``ramp`` moving linearly from one
size to another over some seconds and holding there. It runs as a task on the
guest's :class:`guest.kernel.Scheduler` (no asyncio here), re-checking every
:data:`PERIOD` seconds, so an allocation that fell short (memory full) is retried
when memory arrives. Allocations are movable and go to ``ZONE_MOVABLE`` while it has
room, then to ``ZONE_NORMAL``; they touch their pages, so the driver reports them
to the host, and they count in the status report's ``num_committed``, which is what
a dynamic target policy reacts to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guest.kernel import Sleep, Task
from guest.mm.memory import ZONE_MOVABLE, ZONE_NORMAL
from guest.vm import GuestVm
from memhp.units import SizeError, parse_pages

#: The allocation tag of the workload's pages.
TAG = "workload"
#: Seconds between two adjustments.
PERIOD = 0.1

STEADY = "steady"
RAMP = "ramp"


class WorkloadError(ValueError):
    """A ``--workload`` value that cannot be understood."""


@dataclass(frozen=True)
class WorkloadSpec:
    """A size curve: ``start_pages`` at 0 s, linear to ``end_pages`` at ``seconds``, then flat."""

    kind: str
    start_pages: int
    end_pages: int
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> WorkloadSpec:
        """``steady:SIZE`` or ``ramp:FROM:TO:SECONDS`` (sizes like ``512M``, ``1G``)."""
        kind, _, rest = text.partition(":")
        parts = rest.split(":") if rest else []
        try:
            if kind == STEADY and len(parts) == 1:
                size = parse_pages(parts[0], what="workload size")
                return cls(STEADY, size, size)
            if kind == RAMP and len(parts) == 3:
                start = parse_pages(parts[0], what="workload FROM")
                end = parse_pages(parts[1], what="workload TO")
                seconds = float(parts[2])
                if not (math.isfinite(seconds) and seconds >= 0):
                    raise WorkloadError(
                        f"workload SECONDS must be a finite number >= 0, not {parts[2]!r}"
                    )
                return cls(RAMP, start, end, seconds)
        except (SizeError, ValueError) as err:
            if isinstance(err, WorkloadError):
                raise
            raise WorkloadError(f"workload {text!r}: {err}") from None
        raise WorkloadError(
            f"workload {text!r}: expected steady:SIZE or ramp:FROM:TO:SECONDS "
            "(e.g. steady:512M, ramp:0:2G:60)"
        )

    def target_pages(self, elapsed: float) -> int:
        """The size the workload wants ``elapsed`` seconds after it started."""
        if self.seconds <= 0 or elapsed >= self.seconds:
            return self.end_pages
        if elapsed <= 0:
            return self.start_pages
        share = elapsed / self.seconds
        return self.start_pages + round((self.end_pages - self.start_pages) * share)


class Workload:
    """One workload on one guest: :meth:`start` spawns its task."""

    def __init__(
        self,
        vm: GuestVm,
        spec: WorkloadSpec,
        *,
        tag: str = TAG,
        period: float = PERIOD,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, not {period!r}")
        self.vm = vm
        self.spec = spec
        self.tag = tag
        self.period = period
        self.started_at: float | None = None
        #: Pages the curve wants now, and how many it could not get at the last step.
        self.target = 0
        self.short = 0
        self._on_event = on_event

    @property
    def allocated(self) -> int:
        owned = self.vm.mm.allocations.get(self.tag)
        return len(owned) if owned is not None else 0

    def start(self) -> None:
        self.started_at = self.vm.now
        self.vm.scheduler.spawn(f"workload:{self.tag}", self._task())

    def _task(self) -> Task:
        while True:
            self.step()
            yield Sleep(self.period)

    def step(self) -> None:
        """Allocate or free toward the curve's size for now."""
        start = self.vm.now if self.started_at is None else self.started_at
        self.target = self.spec.target_pages(self.vm.now - start)
        have = self.allocated
        if self.target < have:
            self.vm.free(self.tag, have - self.target)
        elif self.target > have:
            self._grow(self.target - have)
        short = max(0, self.target - self.allocated)
        if short and not self.short:
            self._event("workload_short", target=self.target, short=short)
        elif self.short and not short:
            self._event("workload_caught_up", target=self.target)
        self.short = short

    def _grow(self, need: int) -> None:
        mm = self.vm.mm
        for zone in (ZONE_MOVABLE, ZONE_NORMAL):
            room = mm.zones[zone].free_area.allocatable_pages
            if need <= 0 or room <= 0:
                continue
            need -= self.vm.allocate(min(need, room), zone=zone, tag=self.tag, movable=True)

    def _event(self, kind: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(kind, data)
