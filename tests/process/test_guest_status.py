"""A real ``memhp guest``: status reports, a ramp workload, access reports, clean exit.

``--status-interval`` paces the driver's own status thread (``--pressure-report-delay
0`` lets it report from the start); a ``ramp`` workload raises ``num_committed``
report after report, and its touched pages reach the host as coalesced access
reports. SIGTERM and SIGINT close the stream and exit 0.
"""

from __future__ import annotations

import itertools
import signal
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from memhp import dm
from tests.process.conftest_guest import (
    FakeHypervisor,
    GuestProcess,
    running_hypervisor,
    start_guest,
    wait_until,
)

MIB = 256  # pages


@pytest_asyncio.fixture
async def hv() -> AsyncIterator[FakeHypervisor]:
    async with running_hypervisor() as h:
        yield h


async def test_status_interval_and_ramp_workload(
    hv: FakeHypervisor, guest_processes: list[GuestProcess], tmp_path: Path
) -> None:
    guest = await start_guest(
        tmp_path,
        hv.address,
        "--status-interval",
        "0.2",
        "--pressure-report-delay",
        "0",
        "--workload",
        "ramp:0:256M:1.5",
        "--access-batch-ms",
        "100",
    )
    guest_processes.append(guest)
    stream = await hv.negotiated()
    await wait_until(lambda: len(stream.of(dm.StatusReport)) >= 11, timeout=10.0, what="reports")

    reports = stream.of(dm.StatusReport)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reports)]
    assert 0.15 <= statistics.median(gaps) <= 0.3, gaps
    committed = [m.num_committed for _, m in reports]
    # The ramp adds 256 MiB over 1.5 s: committed memory climbs with it.
    assert committed[-1] - committed[0] >= 200 * MIB, committed
    assert sum(1 for a, b in itertools.pairwise(committed) if b > a) >= 5, committed
    assert stream.host.committed_pages == committed[-1]

    # The touched pages went to the host, merged into few ranges per report.
    def touched() -> int:
        return sum(r.page_cnt for _, m in stream.of(dm.AccessReport) for r in m.ranges)

    await wait_until(lambda: touched() >= 256 * MIB, what="access reports of the workload")
    accesses = [m for _, m in stream.of(dm.AccessReport)]
    assert all(m.what == "allocate" for m in accesses)
    for m in accesses:
        ends = [(r.start_page, r.end_page) for r in m.ranges]
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ends)), "ranges not merged"
    assert stream.host.violations == [] and stream.host.protocol_errors == []

    mem = await guest.memory()
    assert mem.pages.allocated >= 256 * MIB
    assert list(mem.violations) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_stream_and_exits_zero(
    hv: FakeHypervisor, guest_processes: list[GuestProcess], tmp_path: Path, sig: int
) -> None:
    guest = await start_guest(tmp_path, hv.address)
    guest_processes.append(guest)
    stream = await hv.negotiated()
    assert await guest.signal_and_wait(sig) == 0
    await wait_until(lambda: stream.ended, what="the stream to end on the host")
    events = [line.get("event") for line in guest.log_lines()]
    assert events[-1] == "stopped"
    assert not any(line.get("level") in ("error", "critical") for line in guest.log_lines())
