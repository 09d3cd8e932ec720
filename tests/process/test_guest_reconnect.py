"""A real ``memhp guest`` survives a hypervisor restart: backoff, reattach with its state.

The fake hypervisor is stopped (the stream breaks) and started again on the same port;
the guest reconnects, reattaches with a ``GuestMemoryState`` (the region it holds,
``pages_added``, the ballooned ranges) and renegotiates on the new stream, while its
memory model is exactly what it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from memhp import dm
from tests.process.conftest_guest import (
    BLOCK,
    FakeHypervisor,
    GuestProcess,
    running_hypervisor,
    start_guest,
    wait_until,
)

REGION_START = 8 * BLOCK


@pytest_asyncio.fixture
async def hv() -> AsyncIterator[FakeHypervisor]:
    async with running_hypervisor() as h:
        yield h


async def test_reconnect_after_hypervisor_restart_reattaches_with_state(
    hv: FakeHypervisor, guest_processes: list[GuestProcess], tmp_path: Path
) -> None:
    guest = await start_guest(tmp_path, hv.address, "--udev-online", "online_movable")
    guest_processes.append(guest)
    stream = await hv.negotiated()
    hv.command(lambda h, now: h.hot_add(4 * BLOCK, 3 * BLOCK // 2, now))
    await wait_until(lambda: stream.of(dm.HotAddResponse), what="hot-add response")
    await wait_until(lambda: stream.host.state == "IDLE", what="idle after hot-add")
    hv.command(lambda h, now: h.balloon(1024, now))
    await wait_until(lambda: stream.of(dm.BalloonResponse), what="balloon response")
    before = await guest.memory()
    assert before.counters.num_pages_ballooned == 1024

    await hv.stop()
    await asyncio.sleep(0.3)  # the guest backs off and retries against a closed port
    await hv.start()
    await wait_until(lambda: len(hv.streams) == 2, timeout=10.0, what="reattach")
    again = await hv.negotiated()
    assert again is not stream

    state = again.attach.state
    assert again.attach.HasField("state")
    assert [(r.start_page, r.page_cnt) for r in state.regions] == [(REGION_START, 4 * BLOCK)]
    assert state.pages_added == 3 * BLOCK // 2
    assert sum(r.page_cnt for r in state.ballooned) == 1024
    # The new stream starts with a fresh negotiation (no answer for the old channel).
    assert isinstance(again.received[0][1], dm.VersionRequest)

    after = await guest.memory()
    assert list(after.blocks) == list(before.blocks)
    assert after.counters == before.counters
    assert list(after.regions) == list(before.regions)
    assert after.pages == before.pages
    assert after.dm_state == "DM_INITIALIZED"
    assert list(after.violations) == []
    events = [line.get("event") for line in guest.log_lines()]
    assert "disconnected" in events and "reconnect_backoff" in events
