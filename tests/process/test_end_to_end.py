"""End to end: a real ``memhp hypervisor`` and real ``memhp guest`` processes over gRPC.

The partial-backing story with two guests side by side, deferred onlining by udev,
later backing, the live sysfs tree read by the real lsmem, a guest killed with
SIGKILL and started again, and the dynamic policy following a workload ramp.
"""

from __future__ import annotations

import asyncio
import subprocess
from functools import partial
from pathlib import Path

from memhp.v1 import control_pb2
from tests.process.conftest import HvProcess, StartHypervisor
from tests.process.conftest_guest import GuestProcess, guest_children, start_guest, wait_until

MIB = 1 << 20
GIB = 1 << 30
PAGES_PER_MIB = 256


async def _attached_and_idle(hv: HvProcess, vm_id: str) -> bool:
    vm = await hv.get_vm(vm_id)
    return vm.attached and vm.dm_state == "IDLE"


async def _added(hv: HvProcess, vm_id: str, pages: int) -> bool:
    vm = await hv.get_vm(vm_id)
    return sum(r.added_pages for r in vm.regions) == pages and not vm.HasField("in_flight")


async def _block_states(guest: GuestProcess) -> dict[int, tuple[str, str]]:
    memory = await guest.memory()
    return {b.index: (b.state, b.zone) for b in memory.blocks}


async def test_partial_backing_story_two_guests(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    hv = await start_hypervisor("--no-default-vm")
    for vm_id in ("cb", "otr"):
        await hv.create_vm(vm_id, boot=2 * GIB, max_bytes=8 * GIB)
    async with guest_children() as children:
        common = ("--pressure-report-delay", "0", "--udev-online", "online_movable")
        cb = await start_guest(
            tmp_path,
            hv.address,
            *common,
            "--strategy",
            "callback",
            "--onlining-delay",
            "0.3",
            "--sysfs-dir",
            str(tmp_path / "sysfs-cb"),
            vm_id="cb",
        )
        children.append(cb)
        otr = await start_guest(
            tmp_path, hv.address, *common, "--strategy", "online-then-reclaim", vm_id="otr"
        )
        children.append(otr)
        for vm_id in ("cb", "otr"):
            await wait_until(partial(_attached_and_idle, hv, vm_id), what=f"{vm_id} idle")

        # A 512 MiB region with 300 MiB backed, on both guests.
        for vm_id in ("cb", "otr"):
            await hv.control.HotAdd(
                control_pb2.HotAddCommand(
                    vm_id=vm_id, region_bytes=512 * MIB, backed_bytes=300 * MIB
                )
            )
        for vm_id in ("cb", "otr"):
            await wait_until(partial(_added, hv, vm_id, 300 * PAGES_PER_MIB), what="added")

        # hv_balloon added three 128 MiB blocks (2 GiB = block 16); udev onlined them
        # Movable; the 84 MiB nobody backs stay PageOffline.
        for guest in (cb, otr):
            states = await _block_states(guest)
            assert {i: states[i] for i in (16, 17, 18)} == {
                i: ("online", "Movable") for i in (16, 17, 18)
            }
            assert 19 not in states
            memory = await guest.memory()
            assert memory.counters.num_pages_added == 300 * PAGES_PER_MIB
            assert memory.counters.num_pages_onlined == 300 * PAGES_PER_MIB
            assert memory.pages.page_offline == 84 * PAGES_PER_MIB
            assert list(memory.violations) == []

        # 100 MiB more for cb: 84 MiB of block 18 go online at once, 16 MiB need block 19.
        await hv.control.Back(control_pb2.BackCommand(vm_id="cb", size_bytes=100 * MIB))
        await wait_until(lambda: _added(hv, "cb", 400 * PAGES_PER_MIB), what="backed")

        async def block_19_online() -> bool:
            return (await _block_states(cb)).get(19) == ("online", "Movable")

        await wait_until(block_19_online, what="udev onlined memory19")
        memory = await cb.memory()
        assert memory.counters.num_pages_onlined == 400 * PAGES_PER_MIB
        assert memory.pages.page_offline == 112 * PAGES_PER_MIB
        assert list(memory.violations) == []
        vm = await hv.get_vm("cb")
        assert vm.actual_bytes == 2 * GIB + 400 * MIB
        assert vm.regions[0].start_page == 2 * GIB // 4096

        # The live sysfs tree, read by the real lsmem (waits for the 100 ms write-back).
        async def lsmem_rows() -> list[str]:
            proc = subprocess.run(
                [
                    "lsmem",
                    "--sysroot",
                    str(tmp_path / "sysfs-cb"),
                    "-r",
                    "-n",
                    "-o",
                    "RANGE,STATE,BLOCK,ZONES",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            return proc.stdout.splitlines()

        # 400 MiB of the region are backed: blocks 16-19 (2 GiB .. 2.5 GiB) are added.
        expected = [
            "0x0000000000000000-0x000000007fffffff online 0-15 Normal",
            "0x0000000080000000-0x000000009fffffff online 16-19 Movable",
        ]

        async def lsmem_matches() -> bool:
            return await lsmem_rows() == expected

        await wait_until(lsmem_matches, what=f"lsmem shows {expected}")


async def test_guest_killed_and_restarted_reattaches(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    hv = await start_hypervisor("--no-default-vm")
    await hv.create_vm("g", boot=2 * GIB, max_bytes=8 * GIB)
    async with guest_children() as children:
        args = ("--pressure-report-delay", "0", "--auto-online", "online")
        guest = await start_guest(tmp_path, hv.address, *args, vm_id="g")
        children.append(guest)
        await wait_until(lambda: _attached_and_idle(hv, "g"), what="attached")
        await hv.control.HotAdd(
            control_pb2.HotAddCommand(vm_id="g", region_bytes=256 * MIB, backed_bytes=200 * MIB)
        )
        await wait_until(lambda: _added(hv, "g", 200 * PAGES_PER_MIB), what="added")

        guest.process.kill()  # SIGKILL: no goodbye on the stream
        await guest.process.wait()

        async def detached() -> bool:
            return not (await hv.get_vm("g")).attached

        await wait_until(detached, what="the hypervisor saw the stream end")

        # The same VM boots again: a fresh guest with only its boot memory.
        second = tmp_path / "second-boot"
        second.mkdir()
        again = await start_guest(second, hv.address, *args, vm_id="g")
        children.append(again)
        await wait_until(lambda: _attached_and_idle(hv, "g"), what="reattached")
        memory = await again.memory()
        assert memory.counters.num_pages_added == 0
        # Nothing the old guest had is offered again, and new memory still comes.
        await hv.control.HotAdd(
            control_pb2.HotAddCommand(vm_id="g", region_bytes=256 * MIB, backed_bytes=128 * MIB)
        )

        async def new_region_added() -> bool:
            m = await again.memory()
            return m.counters.num_pages_added == 128 * PAGES_PER_MIB

        await wait_until(new_region_added, what="hot-add after the restart")
        memory = await again.memory()
        assert list(memory.violations) == []
        assert memory.counters.num_pages_onlined == 128 * PAGES_PER_MIB


async def test_dynamic_policy_follows_a_workload_ramp(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    hv = await start_hypervisor("--no-default-vm")
    await hv.create_vm("w", boot=2 * GIB, max_bytes=8 * GIB)
    async with guest_children() as children:
        guest = await start_guest(
            tmp_path,
            hv.address,
            "--pressure-report-delay",
            "0",
            "--status-interval",
            "0.2",
            "--auto-online",
            "online",
            "--workload",
            "ramp:0:1536M:2",
            vm_id="w",
        )
        children.append(guest)
        await wait_until(lambda: _attached_and_idle(hv, "w"), what="attached")
        policy = control_pb2.Policy(
            dynamic=control_pb2.DynamicPolicy(
                buffer_percent=20, minimum_bytes=2 * GIB, maximum_bytes=8 * GIB
            )
        )
        await hv.control.SetPolicy(control_pb2.SetPolicyRequest(vm_id="w", policy=policy))

        async def grown() -> bool:
            vm = await hv.get_vm("w")
            return vm.requested_bytes > 2 * GIB and vm.actual_bytes > 2 * GIB

        await wait_until(grown, timeout=20.0, what="the policy grew the VM")
        vm = await hv.get_vm("w")
        # Hot-added memory follows committed memory plus the buffer, in whole blocks.
        assert vm.committed_bytes > 1 * GIB
        assert vm.requested_bytes % (128 * MIB) == 0
        assert vm.requested_bytes <= 8 * GIB
        memory = await guest.memory()
        assert memory.counters.num_pages_added > 0
        assert list(memory.violations) == []
        await asyncio.sleep(0)
