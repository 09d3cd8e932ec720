"""The live view over MQTT against a real mosquitto and real publishers.

A ``memhp hypervisor --mqtt`` with three VMs and a ``memhp guest --mqtt`` for two of
them: ``cb`` (callback) gets a hot-add with partial backing (512 MiB, 300 MiB backed,
so block 18 is unbacked in part), ``otr`` (online-then-reclaim) is ballooned, and
``lonely`` has no guest. Once the retained documents say what the processes say, the
view fed by :class:`MqttSource` must match each guest's ``GetMemory`` cells and the
hypervisor's ``GetVm`` sizes, and ``memhp watch --mqtt URL --once`` (started then)
must print every VM with the right cell counts and sizes, without waiting for a
guest that ``lonely`` does not have.

``--once`` waits for the documents of every VM it knows of: for a VM named with
``--vm`` that does not exist yet, until the hypervisor publishes it; for a guest that
does not publish, until ``--wait`` runs out, and then it says which document did not
come and exits 1.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest_asyncio

from memhp import events
from memhp.units import format_size
from memhp.v1 import control_pb2
from memhp.view.model import MAP_GUEST, Fleet, run_length
from memhp.view.mqtt_source import MqttSource
from tests.mosquitto import Mosquitto, Received, Subscriber, free_port
from tests.process.conftest import HvProcess, StartHypervisor
from tests.process.conftest_guest import GuestProcess, guest_children, start_guest, wait_until

MIB = 1 << 20
GIB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
COMMON = (
    *("--pressure-report-delay", "0", "--udev-online", "online_movable"),
    *("--onlining-delay", "0.05", "--listen", "127.0.0.1:0"),
)


@dataclass
class Fixture:
    broker: Mosquitto
    hv: HvProcess
    guests: dict[str, GuestProcess]


async def _settled(hv: HvProcess, vm_id: str) -> bool:
    vm = await hv.get_vm(vm_id)
    return vm.attached and not vm.busy and vm.dm_state == "IDLE"


async def _cells(guest: GuestProcess) -> list[tuple[int, int, str]]:
    memory = await guest.memory()
    return run_length((b.index, b.cell) for b in memory.blocks)


def _latest(messages: list[Received], topic: str) -> dict[str, Any] | None:
    docs = [m.json() for m in messages if m.topic == topic]
    return docs[-1] if docs else None


def _backed(vm: control_pb2.Vm) -> int:
    return sum(r.page_cnt for region in vm.regions for r in region.backed) << 12


async def _documents_agree(sub: Subscriber, hv: HvProcess, guests: dict[str, GuestProcess]) -> bool:
    """The latest documents of every VM say what GetVm and GetMemory say now."""
    for vm_id in ("cb", "otr", "lonely"):
        vm = await hv.get_vm(vm_id)
        state = _latest(sub.messages, events.state_topic(vm_id))
        if state is None or (state["dm_state"], state["busy"]) != (vm.dm_state, vm.busy):
            return False
        if state["attached"] != vm.attached or state["backed_bytes"] != _backed(vm):
            return False
        if (state["actual_bytes"], state["ballooned_bytes"]) != (
            vm.actual_bytes,
            vm.ballooned_bytes,
        ):
            return False
    for vm_id, guest in guests.items():
        doc = _latest(sub.messages, events.guest_topic(vm_id))
        if doc is None or [tuple(run) for run in doc["blocks"]] != await _cells(guest):
            return False
    return True


@pytest_asyncio.fixture
async def published(
    mosquitto: Mosquitto, start_hypervisor: StartHypervisor, tmp_path: Path
) -> AsyncIterator[Fixture]:
    """Everything settled, and the broker's retained documents say so."""
    async with Subscriber(mosquitto.port, events.ALL_VMS) as sub:
        hv = await start_hypervisor("--no-default-vm", "--mqtt", mosquitto.url)
        for vm_id in ("cb", "otr", "lonely"):
            await hv.create_vm(vm_id, boot=2 * GIB, max_bytes=8 * GIB)
        async with guest_children() as children:
            guests = {}
            for vm_id, strategy in (("cb", "callback"), ("otr", "online-then-reclaim")):
                guest = await start_guest(
                    tmp_path,
                    hv.address,
                    *COMMON,
                    "--strategy",
                    strategy,
                    "--mqtt",
                    mosquitto.url,
                    vm_id=vm_id,
                )
                children.append(guest)
                guests[vm_id] = guest
            for vm_id in guests:
                await wait_until(partial(_settled, hv, vm_id), what=f"{vm_id} idle")
            await hv.control.HotAdd(
                control_pb2.HotAddCommand(
                    vm_id="cb", region_bytes=512 * MIB, backed_bytes=300 * MIB
                )
            )
            await hv.control.Balloon(control_pb2.BalloonCommand(vm_id="otr", size_bytes=128 * MIB))

            async def cb_onlined() -> bool:
                cells = {first: cell for first, _, cell in await _cells(guests["cb"])}
                return await _settled(hv, "cb") and cells.get(18) == "unbacked"

            await wait_until(cb_onlined, timeout=20, what="cb's blocks 16-18 online")
            await wait_until(partial(_settled, hv, "otr"), what="otr ballooned")
            await wait_until(
                partial(_documents_agree, sub, hv, guests),
                timeout=10,
                what="the retained documents of the settled VMs",
            )
            yield Fixture(mosquitto, hv, guests)


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


async def test_the_model_from_mqtt_matches_the_processes(published: Fixture) -> None:
    hv, guests = published.hv, published.guests
    fleet = Fleet()
    source = MqttSource(fleet, published.broker.broker)
    assert await source.collect() == {}
    assert sorted(fleet.vms) == ["cb", "lonely", "otr"]
    assert source.documents == {
        "cb": {"state", "guest"},
        "otr": {"state", "guest"},
        "lonely": {"state"},
    }
    for vm_id, guest in guests.items():
        view = fleet.vms[vm_id]
        vm = await hv.get_vm(vm_id)
        assert view.cells == await _cells(guest)
        assert view.map_source == MAP_GUEST
        assert view.attached and view.dm_state == "IDLE"
        assert view.guest_address == vm.guest_address == guest.address
        assert view.actual_bytes == vm.actual_bytes
        assert view.backed_bytes == _backed(vm)
        assert view.ballooned_bytes == vm.ballooned_bytes
        assert view.regions == len(vm.regions)
        assert view.block_size_bytes == 128 * MIB
        assert view.violations == 0 and view.host_violations_partial
    cb, otr, lonely = fleet.vms["cb"], fleet.vms["otr"], fleet.vms["lonely"]
    assert cb.cell_counts() == {"offline": 0, "online": 18, "unbacked": 1, "ballooned": 0}
    assert (cb.regions, cb.backed_bytes) == (1, 300 * MIB)
    assert cb.strategy == "callback"
    assert otr.cell_counts()["ballooned"] >= 1
    assert otr.ballooned_bytes == 128 * MIB
    assert otr.strategy == "online-then-reclaim"
    assert not lonely.attached and lonely.cells == []
    assert lonely.map_note == "no guest attached"
    assert lonely.actual_bytes == 2 * GIB


async def test_watch_once_over_mqtt(published: Fixture) -> None:
    hv, guests, url = published.hv, published.guests, published.broker.url
    done = await asyncio.to_thread(memhp, "watch", "--mqtt", url, "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith(f"memhp {url}  3 VM(s)"), out
    for vm_id, guest in guests.items():
        vm = await hv.get_vm(vm_id)
        panel = out[out.index(f"─ {vm_id}  attached IDLE") :]
        counts = dict.fromkeys(("offline", "online", "unbacked", "ballooned"), 0)
        for _, n, cell in await _cells(guest):
            counts[cell] += n
        legend = (
            f"· offline {counts['offline']}  █ online {counts['online']}  "
            f"▒ unbacked (PageOffline) {counts['unbacked']}  ░ ballooned {counts['ballooned']}"
        )
        assert legend in panel.split("╰")[0], out
        sizes = (
            f"target -  actual {format_size(vm.actual_bytes)}  "
            f"hot-add backed {format_size(_backed(vm))}  "
            f"ballooned {format_size(vm.ballooned_bytes)}  regions {len(vm.regions)}"
        )
        assert sizes in panel.split("╰")[0], out
        assert f"guest {guest.address}" in panel
    assert "hot-add backed 300M  ballooned 0B  regions 1" in out
    assert "hot-add backed 0B  ballooned 128M  regions 0" in out
    assert "─ lonely  detached" in out
    assert "no block map yet: no guest attached" in out
    assert "violations 0 (host 0 seen, guest 0)" in out
    assert "\x1b[" not in out  # plain: no colour, no cursor movement
    assert done.stderr == ""

    only = await asyncio.to_thread(memhp, "watch", "--mqtt", url, "--once", "--vm", "otr")
    assert only.returncode == 0, only.stderr
    assert "─ otr " in only.stdout and "─ cb " not in only.stdout
    assert f"memhp {url}  1 VM(s)" in only.stdout


async def test_watch_once_waits_for_the_documents_and_says_what_did_not_come(
    mosquitto: Mosquitto, start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    hv = await start_hypervisor("--no-default-vm", "--mqtt", mosquitto.url)
    argv = [sys.executable, "-m", "memhp.cli", "watch", "--mqtt", mosquitto.url, "--once"]
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO)}
    # A VM asked for that does not exist yet: --once waits until the hypervisor has it.
    watcher = await asyncio.create_subprocess_exec(
        *argv,
        "--vm",
        "later",
        "--wait",
        "30",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(2.0)  # time to start and subscribe; then it must still wait
        assert watcher.returncode is None
        await hv.create_vm("later", boot=GIB, max_bytes=4 * GIB)
        out, err = await asyncio.wait_for(watcher.communicate(), 20)
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
    assert watcher.returncode == 0, (out + err).decode()
    assert "─ later  detached" in out.decode()
    assert "no block map yet: no guest attached" in out.decode()

    # A guest that does not publish: --once waits --wait seconds, prints what it has and
    # names what did not come.
    await hv.create_vm("quiet", boot=GIB, max_bytes=4 * GIB)
    async with guest_children() as children:
        children.append(await start_guest(tmp_path, hv.address, *COMMON, vm_id="quiet"))
        await wait_until(partial(_settled, hv, "quiet"), what="quiet idle")
        done = await asyncio.to_thread(
            memhp, "watch", "--mqtt", mosquitto.url, "--once", "--vm", "quiet", "--wait", "1.5"
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "─ quiet  attached IDLE" in done.stdout
    assert "no block map yet: waiting for the guest's retained document" in done.stdout
    assert done.stderr == (
        f"memhp watch: {mosquitto.url}: after 1.5 s, no guest document of VM quiet "
        "(does its memhp guest publish to this broker with --mqtt?)\n"
    )

    # Nothing at all about a VM, from a broker that has nothing.
    empty = Mosquitto(tmp_path / "empty")
    await empty.start()
    try:
        done = await asyncio.to_thread(
            memhp, "watch", "--mqtt", empty.url, "--once", "--vm", "nope", "--wait", "0.5"
        )
        everything = await asyncio.to_thread(memhp, "watch", "--mqtt", empty.url, "--once")
    finally:
        await empty.stop()
    assert done.returncode == 1
    assert done.stderr == (
        f"memhp watch: {empty.url}: after 0.5 s, no state document of VM nope (does memhp "
        "hypervisor publish to this broker with --mqtt?); no guest document of VM nope "
        "(does its memhp guest publish to this broker with --mqtt?)\n"
    )
    # No VM known: nothing to wait for.
    assert everything.returncode == 0, everything.stderr
    assert f"memhp {empty.url}  0 VM(s)" in everything.stdout
    assert "no VM yet" in everything.stdout


async def test_watch_once_without_a_broker() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    done = await asyncio.to_thread(memhp, "watch", "--mqtt", url, "--once")
    assert done.returncode == 1
    assert done.stderr.startswith(f"memhp watch: {url}: ")
    assert done.stdout == ""
    bad = await asyncio.to_thread(memhp, "watch", "--mqtt", "mqtt://127.0.0.1:0", "--once")
    assert bad.returncode == 2
    assert "the port must be a number in 1..65535" in bad.stderr
