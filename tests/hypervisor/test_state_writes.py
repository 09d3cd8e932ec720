"""When the runtime writes the state file: a batch shares writes, a finished one is all there.

A step that leaves a transaction in flight may wait up to ``STATE_WRITE_DELAY`` for its
write (the steps of a batch in that time share one); a step that leaves the session
idle writes at once with everything that waited, and so does a stopping hypervisor.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from hypervisor.runtime import STATE_WRITE_DELAY, Defaults, Hypervisor, VmHandle
from hypervisor.store import StateStore
from memhp import wire
from memhp.dm import (
    DYNMEM_PROTOCOL_VERSION_3,
    CapabilitiesReport,
    DmMessage,
    HotAddResponse,
    VersionRequest,
)
from tests.hypervisor.helpers import BLOCK, BOOT, MAX, tid


def stored_regions(hv: Hypervisor) -> list[dict[str, Any]]:
    (vm,) = hv.store.load()
    assert vm.snapshot is not None
    regions: list[dict[str, Any]] = vm.snapshot["regions"]
    return regions


async def attached() -> tuple[Hypervisor, VmHandle]:
    hv = Hypervisor(StateStore(None), defaults=Defaults(BOOT, MAX, BLOCK))
    handle = hv.attach("g1", None)
    await frame(hv, handle, VersionRequest(tid(), DYNMEM_PROTOCOL_VERSION_3))
    await frame(
        hv, handle, CapabilitiesReport(tid(), balloon=True, hot_add=True, hot_add_alignment=0)
    )
    return hv, handle


async def frame(hv: Hypervisor, handle: VmHandle, msg: DmMessage) -> None:
    hv.guest_frame(handle, wire.to_frame(msg))
    await asyncio.sleep(0)  # the deferred rest of the step


async def test_a_batch_is_in_the_file_once_it_is_done_without_waiting() -> None:
    hv, handle = await attached()
    hv.command("g1", lambda s, now: s.hot_add(BLOCK, BLOCK, now, count=3))
    # The first request is out; its write waits, but not longer than the delay.
    assert handle.write_timer is not None
    await asyncio.sleep(4 * STATE_WRITE_DELAY)
    assert [(r["backed"], r["added"]) for r in stored_regions(hv)] == [([[BOOT, BOOT + BLOCK]], [])]
    for _ in range(3):
        await frame(hv, handle, HotAddResponse(tid(), page_count=BLOCK, result=1))
    assert not handle.session.busy
    # Idle: everything is written at once, no timer to wait for.
    assert handle.write_timer is None
    regions = stored_regions(hv)
    assert [r["added"] for r in regions] == [
        [[BOOT + i * BLOCK, BOOT + (i + 1) * BLOCK]] for i in range(3)
    ]


async def test_shutdown_writes_what_waits() -> None:
    hv, handle = await attached()
    hv.command("g1", lambda s, now: s.hot_add(BLOCK, BLOCK, now, count=2))
    await frame(hv, handle, HotAddResponse(tid(), page_count=BLOCK, result=1))
    assert handle.session.in_flight is not None
    hv.shutdown()
    assert handle.write_timer is None
    assert [(r["backed"], r["added"]) for r in stored_regions(hv)] == [
        ([[BOOT, BOOT + BLOCK]], [[BOOT, BOOT + BLOCK]]),
        ([[BOOT + BLOCK, BOOT + 2 * BLOCK]], []),
    ]


def test_without_a_running_loop_every_step_writes_at_once() -> None:
    hv = Hypervisor(StateStore(None), defaults=Defaults(BOOT, MAX, BLOCK))
    handle = hv.attach("g1", None)
    for msg in (
        VersionRequest(tid(), DYNMEM_PROTOCOL_VERSION_3),
        CapabilitiesReport(tid(), balloon=True, hot_add=True, hot_add_alignment=0),
    ):
        hv.guest_frame(handle, wire.to_frame(msg))
    hv.command("g1", lambda s, now: s.hot_add(BLOCK, BLOCK, now, count=2))
    assert [r["backed"] for r in stored_regions(hv)] == [[[BOOT, BOOT + BLOCK]]]


async def test_a_deferred_write_that_fails_is_logged_and_the_next_write_has_it_all() -> None:
    hv, handle = await attached()
    hv.command("g1", lambda s, now: s.hot_add(BLOCK, BLOCK, now, count=3))
    await asyncio.sleep(4 * STATE_WRITE_DELAY)
    real = hv.store.write_truth
    failures: list[str] = []

    def failing(*args: Any, **kwargs: Any) -> None:
        failures.append("disk full")
        raise OSError("disk full")

    hv.store.write_truth = failing  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        # The first response: its write waits for the timer, which fails.
        await frame(hv, handle, HotAddResponse(tid(), page_count=BLOCK, result=1))
        await asyncio.sleep(4 * STATE_WRITE_DELAY)
    assert failures and handle.write_timer is None
    assert any(e["event"] == "state_write_failed" for e in logs)
    hv.store.write_truth = real  # type: ignore[method-assign]
    for _ in range(2):
        await frame(hv, handle, HotAddResponse(tid(), page_count=BLOCK, result=1))
    assert not handle.session.busy
    # The failed write's region (the first, now added) is in the file with the rest.
    regions = stored_regions(hv)
    assert [r["added"] for r in regions] == [
        [[BOOT + i * BLOCK, BOOT + (i + 1) * BLOCK]] for i in range(3)
    ]
