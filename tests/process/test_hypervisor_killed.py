"""A hypervisor SIGKILLed in the middle of a batch, restarted on its state file.

The state file may lag the last few milliseconds of a batch (``STATE_WRITE_DELAY``):
the real guest, which reattaches with what it holds, must bring the host's truth back
to what it has, with nothing offered twice, nothing lost and no violation on either
side, and the VM must take new hot-adds afterwards.
"""

from __future__ import annotations

from pathlib import Path

from memhp.v1 import control_pb2
from tests.process.conftest import GIB, MIB, StartHypervisor, wait_vm
from tests.process.conftest_guest import GuestProcess, start_guest

PAGE = 4096
BLOCK = 128 * MIB
BATCH = 1500


async def test_killed_mid_batch_restarted_on_its_state_file_loses_nothing(
    start_hypervisor: StartHypervisor, guest_processes: list[GuestProcess], tmp_path: Path
) -> None:
    state = tmp_path / "hv.sqlite"
    hv = await start_hypervisor(state=state)
    port = hv.address.rsplit(":", 1)[1]
    await hv.create_vm("k", boot=4 * GIB, max_bytes=256 * GIB, block=BLOCK)
    guest = await start_guest(tmp_path, hv.address, "--auto-online", "online", vm_id="k")
    guest_processes.append(guest)
    await wait_vm(hv, "k", lambda v: v.dm_state == "IDLE", timeout=30.0)
    await hv.control.HotAdd(
        control_pb2.HotAddCommand(vm_id="k", region_bytes=BLOCK, backed_bytes=96 * MIB, count=BATCH)
    )
    mid = await wait_vm(hv, "k", lambda v: v.transactions.completed >= 200, timeout=30.0)
    assert mid.busy
    hv.child.process.kill()  # SIGKILL: no shutdown write
    await hv.child.process.wait()

    hv2 = await start_hypervisor("--listen", f"127.0.0.1:{port}", state=state)
    vm = await wait_vm(hv2, "k", lambda v: v.attached and v.dm_state == "IDLE", timeout=60.0)
    held = await guest.memory()
    held_regions = [(r.start_pfn, r.end_pfn - r.start_pfn) for r in held.regions]
    assert len(held_regions) >= 200
    # The host knows every region the guest holds, as the guest holds it: the same
    # extent, and backed and added exactly where the guest has it (its covered range).
    known = {r.start_page: r for r in vm.regions}
    for r in held.regions:
        host = known[r.start_pfn]
        assert host.page_count == r.end_pfn - r.start_pfn
        assert [(b.start_page, b.page_cnt) for b in host.backed] == [
            (r.covered_start_pfn, r.covered_end_pfn - r.covered_start_pfn)
        ]
        assert host.added_pages == r.covered_end_pfn - r.covered_start_pfn
    # Pages: what the host counts as added is what the guest added.
    assert sum(r.added_pages for r in vm.regions) == held.counters.num_pages_added
    assert list(held.violations) == []

    # The VM takes new work, and nothing is offered twice (the guest would flag it).
    await hv2.control.HotAdd(
        control_pb2.HotAddCommand(vm_id="k", region_bytes=BLOCK, backed_bytes=BLOCK, count=5)
    )
    after = await wait_vm(
        hv2, "k", lambda v: not v.busy and v.transactions.completed >= 5, timeout=30.0
    )
    final = await guest.memory()
    assert len(final.regions) == len(held_regions) + 5
    assert final.counters.num_pages_added == held.counters.num_pages_added + 5 * BLOCK // PAGE
    assert sum(r.added_pages for r in after.regions) == final.counters.num_pages_added
    assert list(final.violations) == []
    assert after.violation_events == 0
