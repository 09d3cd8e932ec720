"""The live view against real processes: a ``memhp hypervisor`` and two ``memhp guest``s.

The view model fed over gRPC must show what the guests and the hypervisor say (block
cells from each guest's ``GetMemory`` at the address it announced, sizes from
``GetVm``, events from ``WatchEvents``); ``memhp watch --once`` prints a panel per VM
with the right cell counts; ``memhp map VM --svg`` draws the guest's blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest_asyncio

from memhp.v1 import control_pb2
from memhp.view.grpc_source import GrpcSource, SourceError
from memhp.view.model import MAP_GUEST, MAP_HOST, Fleet, run_length
from tests.process.conftest import HvProcess, StartHypervisor
from tests.process.conftest_guest import GuestProcess, guest_children, start_guest, wait_until

MIB = 1 << 20
GIB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
NS = {"svg": "http://www.w3.org/2000/svg"}


@dataclass
class Fixture:
    hv: HvProcess
    guests: dict[str, GuestProcess]


async def _settled(hv: HvProcess, vm_id: str) -> bool:
    vm = await hv.get_vm(vm_id)
    return vm.attached and not vm.busy and vm.dm_state == "IDLE"


async def _cells(guest: GuestProcess) -> list[tuple[int, int, str]]:
    memory = await guest.memory()
    return run_length((b.index, b.cell) for b in memory.blocks)


@pytest_asyncio.fixture
async def two_guests(start_hypervisor: StartHypervisor, tmp_path: Path) -> AsyncIterator[Fixture]:
    """``cb`` (callback): 512 MiB hot-added, 300 MiB backed, so block 18 is unbacked in
    part; ``otr`` (online-then-reclaim): 128 MiB ballooned. Both settled."""
    hv = await start_hypervisor("--no-default-vm")
    for vm_id in ("cb", "otr"):
        await hv.create_vm(vm_id, boot=2 * GIB, max_bytes=8 * GIB)
    async with guest_children() as children:
        common = ["--pressure-report-delay", "0", "--udev-online", "online_movable"]
        common += ["--onlining-delay", "0.05", "--listen", "127.0.0.1:0"]
        guests = {}
        for vm_id, strategy in (("cb", "callback"), ("otr", "online-then-reclaim")):
            guest = await start_guest(
                tmp_path, hv.address, *common, "--strategy", strategy, vm_id=vm_id
            )
            children.append(guest)
            guests[vm_id] = guest
        for vm_id in guests:
            await wait_until(partial(_settled, hv, vm_id), what=f"{vm_id} idle")
        await hv.control.HotAdd(
            control_pb2.HotAddCommand(vm_id="cb", region_bytes=512 * MIB, backed_bytes=300 * MIB)
        )
        await hv.control.Balloon(control_pb2.BalloonCommand(vm_id="otr", size_bytes=128 * MIB))

        async def cb_onlined() -> bool:
            cells = dict((first, cell) for first, _, cell in await _cells(guests["cb"]))
            return await _settled(hv, "cb") and cells.get(18) == "unbacked"

        await wait_until(cb_onlined, what="cb's blocks 16-18 online")
        await wait_until(partial(_settled, hv, "otr"), what="otr ballooned")
        yield Fixture(hv, guests)


def memhp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memhp.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO)},
    )


async def test_the_model_from_grpc_matches_the_processes(two_guests: Fixture) -> None:
    hv, guests = two_guests.hv, two_guests.guests
    fleet = Fleet()
    async with GrpcSource(fleet, hv.address) as source:
        await source.poll()
        assert sorted(fleet.vms) == ["cb", "otr"]
        for vm_id, guest in guests.items():
            view = fleet.vms[vm_id]
            vm = await hv.get_vm(vm_id)
            assert view.cells == await _cells(guest)
            assert view.map_source == MAP_GUEST
            assert view.guest_address == vm.guest_address == guest.address
            assert view.actual_bytes == vm.actual_bytes
            backed = sum(r.page_cnt for region in vm.regions for r in region.backed)
            assert view.backed_bytes == backed << 12
            assert view.ballooned_bytes == vm.ballooned_bytes
            assert view.violations == 0
        cb, otr = fleet.vms["cb"], fleet.vms["otr"]
        assert cb.cell_counts() == {"offline": 0, "online": 18, "unbacked": 1, "ballooned": 0}
        assert cb.regions == 1
        assert cb.backed_bytes == 300 * MIB
        assert cb.strategy == "callback"
        assert otr.cell_counts()["ballooned"] >= 1
        assert otr.ballooned_bytes == 128 * MIB
        assert otr.strategy == "online-then-reclaim"

        # Events stream in; the poll after the backing shows block 18 whole.
        watcher = asyncio.create_task(source.watch_events())
        try:
            await asyncio.wait_for(source.subscribed.wait(), 10)
            await hv.control.Back(control_pb2.BackCommand(vm_id="cb", size_bytes=84 * MIB))
            await wait_until(
                lambda: any(e.kind == "command_done" for e in cb.events), what="events"
            )
            kinds = [e.kind for e in cb.events]
            assert "hot_add_request" in kinds
            assert "hot_add_response" in kinds
            await wait_until(partial(_settled, hv, "cb"), what="cb settled")

            async def whole() -> bool:
                await source.poll()
                return cb.cell_counts()["unbacked"] == 0

            await wait_until(whole, what="block 18 backed")
            assert cb.cell_counts()["online"] == 19
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_watch_once_and_map_svg(two_guests: Fixture, tmp_path: Path) -> None:
    hv, guests = two_guests.hv, two_guests.guests
    done = await asyncio.to_thread(memhp, "watch", "--hypervisor", hv.address, "--once")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"memhp hypervisor {hv.address}  2 VM(s)")
    for vm_id, guest in guests.items():
        assert f"─ {vm_id}  attached IDLE" in out
        counts = dict.fromkeys(("offline", "online", "unbacked", "ballooned"), 0)
        for _, n, cell in await _cells(guest):
            counts[cell] += n
        legend = (
            f"· offline {counts['offline']}  █ online {counts['online']}  "
            f"▒ unbacked (PageOffline) {counts['unbacked']}  ░ ballooned {counts['ballooned']}"
        )
        assert legend in out, out
    assert "\x1b[" not in out  # plain: no colour, no cursor movement

    only = await asyncio.to_thread(
        memhp, "watch", "--hypervisor", hv.address, "--once", "--vm", "otr"
    )
    assert "─ otr " in only.stdout and "─ cb " not in only.stdout
    assert "1 VM(s)" in only.stdout

    path = tmp_path / "cb.svg"
    done = await asyncio.to_thread(memhp, "map", "cb", "--hypervisor", hv.address, "--svg", path)
    assert done.returncode == 0, done.stderr
    assert "from the guest" in done.stdout
    root = ET.fromstring(path.read_text())
    squares = {
        int(r.attrib["data-index"]): r.attrib["data-cell"]
        for r in root.iterfind(".//svg:rect[@class='cell']", NS)
    }
    memory = await guests["cb"].memory()
    assert squares == {b.index: b.cell for b in memory.blocks}
    assert squares[18] == "unbacked"


async def test_a_vm_without_a_guest_gets_the_host_map(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    hv = await start_hypervisor("--no-default-vm")
    await hv.create_vm("lonely", boot=GIB, max_bytes=4 * GIB)
    fleet = Fleet()
    async with GrpcSource(fleet, hv.address) as source:
        await source.poll()
    view = fleet.vms["lonely"]
    assert view.map_source == MAP_HOST
    assert "no guest attached" in view.map_note
    assert view.cells == [(0, 8, "online")]
    path = tmp_path / "lonely.svg"
    done = await asyncio.to_thread(
        memhp, "map", "lonely", "--hypervisor", hv.address, "--svg", path
    )
    assert done.returncode == 0, done.stderr
    assert "from the host only" in done.stdout
    assert "host-only map" in path.read_text()

    missing = await asyncio.to_thread(memhp, "map", "nope", "--hypervisor", hv.address)
    assert missing.returncode == 1
    assert "has no VM 'nope'" in missing.stderr


async def test_an_unreachable_hypervisor(start_hypervisor: StartHypervisor) -> None:
    hv = await start_hypervisor()
    address = hv.address
    await hv.stop()
    fleet = Fleet()
    async with GrpcSource(fleet, address, timeout=2.0) as source:
        try:
            await source.poll()
        except SourceError as err:
            assert "UNAVAILABLE" in str(err)
        else:
            raise AssertionError("poll of a stopped hypervisor succeeded")
    assert "UNAVAILABLE" in fleet.error
    done = await asyncio.to_thread(memhp, "watch", "--hypervisor", address, "--once")
    assert done.returncode == 1
    assert "memhp watch: hypervisor" in done.stderr
