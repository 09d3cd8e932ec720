"""guest.workload: the ``--workload`` specs and their task on the guest's scheduler."""

from __future__ import annotations

from typing import Any

import pytest

from guest.mm.memory import ZONE_MOVABLE, ZONE_NORMAL
from guest.mm.pages import ALLOCATED
from guest.vm import GuestConfig, GuestVm
from guest.workload import TAG, Workload, WorkloadError, WorkloadSpec

MIB = 256
BLOCK = 128 * MIB
BOOT = 8 * BLOCK


def test_parse_steady_and_ramp() -> None:
    assert WorkloadSpec.parse("steady:512M") == WorkloadSpec("steady", 512 * MIB, 512 * MIB)
    assert WorkloadSpec.parse("ramp:0:2G:60") == WorkloadSpec("ramp", 0, 2048 * MIB, 60.0)
    assert WorkloadSpec.parse("ramp:1G:256M:0.5") == WorkloadSpec(
        "ramp", 1024 * MIB, 64 * 1024, 0.5
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "steady",
        "steady:",
        "steady:lots",
        "ramp:0:1G",
        "ramp:0:1G:x",
        "ramp:0:1G:-1",
        "ramp:0:1G:inf",
        "burst:1G",
        "steady:1G:2G",
        "steady:1000",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(WorkloadError, match="workload"):
        WorkloadSpec.parse(text)


def test_ramp_curve_is_linear_then_flat() -> None:
    spec = WorkloadSpec("ramp", 0, 1000, 10.0)
    assert [spec.target_pages(t) for t in (-1, 0, 2.5, 5, 10, 99)] == [0, 0, 250, 500, 1000, 1000]
    down = WorkloadSpec("ramp", 1000, 0, 4.0)
    assert down.target_pages(1.0) == 750
    assert WorkloadSpec("steady", 7, 7).target_pages(123.0) == 7


def vm(**kw: Any) -> tuple[GuestVm, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    g = GuestVm(GuestConfig("vm", boot_pages=BOOT, **kw))
    return g, events


def test_ramp_task_allocates_movable_over_time_and_touches_pages() -> None:
    g, _ = vm()
    w = Workload(g, WorkloadSpec("ramp", 0, 64 * MIB, 1.0))
    w.start()
    sizes = []
    for i in range(12):
        g.run_until(i * 0.1)
        sizes.append(w.allocated)
    assert sizes[0] == 0 and sizes[5] == 32 * MIB and sizes[-1] == 64 * MIB
    assert sizes == sorted(sizes)
    assert g.mm.count_pages(ALLOCATED) == 64 * MIB
    owned = g.mm.allocations[TAG]
    assert all(g.mm.page_state(s).movable for s, _ in owned.ranges())
    # Every allocation touched its pages: the driver reported them.
    reported = sum(r.page_cnt for m in g.drain_outbox() for r in getattr(m, "ranges", ()))
    assert reported == 64 * MIB


def test_movable_zone_first_then_normal() -> None:
    g, _ = vm()
    g.mm.add_memory(BOOT, BLOCK)
    g.mm.online_block(8, "online_movable")
    movable_free = g.mm.zones[ZONE_MOVABLE].free_area.allocatable_pages
    w = Workload(g, WorkloadSpec("steady", movable_free + 1000, movable_free + 1000))
    w.step()
    assert w.allocated == movable_free + 1000
    assert g.mm.zones[ZONE_MOVABLE].free_area.allocatable_pages == 0
    normal = [s for s, _ in g.mm.allocations[TAG].ranges() if s < BOOT]
    assert normal  # the rest came from ZONE_NORMAL


def test_short_allocation_is_reported_once_and_retried() -> None:
    events: list[str] = []
    g, _ = vm()
    g.allocate(g.mm.zones[ZONE_NORMAL].free_area.allocatable_pages, tag="hog")
    w = Workload(g, WorkloadSpec("steady", 10, 10), on_event=lambda k, d: events.append(k))
    w.step()
    w.step()
    assert w.short == 10 and events == ["workload_short"]
    g.free("hog", 100)
    w.step()
    assert w.short == 0 and w.allocated == 10
    assert events == ["workload_short", "workload_caught_up"]


def test_ramp_down_frees() -> None:
    g, _ = vm()
    w = Workload(g, WorkloadSpec("ramp", 1000, 0, 1.0))
    w.start()
    g.run_until(0)
    assert w.allocated == 1000
    g.run_until(1.05)
    assert w.allocated == 0


def test_period_must_be_positive() -> None:
    g, _ = vm()
    with pytest.raises(ValueError, match="period"):
        Workload(g, WorkloadSpec("steady", 1, 1), period=0)
