"""virtio-mem across processes: a real ``memhp hypervisor`` and real ``memhp guest`` children.

Plug by resizing up and unplug by resizing down (Sub Block Mode with 2 MiB device
blocks, and Big Block Mode), ``Control.Resize`` refusals, the ``VirtioMem.Connect``
rules, a hostile guest speaking raw requests on the real stream, a hypervisor restarted
on its state file keeping the plugged memory, and a guest with both drivers exiting 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from memhp.v1 import control_pb2, dm_pb2, virtio_mem_pb2, virtio_mem_pb2_grpc
from memhp.virtio_mem import VirtioMemReqType, VirtioMemRespType
from tests.process.conftest import RECV_TIMEOUT, HvProcess, StartHypervisor, watching
from tests.process.conftest_guest import REPO, GuestProcess, guest_children, start_guest, wait_until

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
PLUG = int(VirtioMemReqType.VIRTIO_MEM_REQ_PLUG)
UNPLUG = int(VirtioMemReqType.VIRTIO_MEM_REQ_UNPLUG)
STATE = int(VirtioMemReqType.VIRTIO_MEM_REQ_STATE)
ACK = int(VirtioMemRespType.VIRTIO_MEM_RESP_ACK)
NACK = int(VirtioMemRespType.VIRTIO_MEM_RESP_NACK)
ERROR = int(VirtioMemRespType.VIRTIO_MEM_RESP_ERROR)


async def create_virtio_vm(
    hv: HvProcess,
    vm_id: str,
    *,
    boot: int = 1 * GIB,
    region: int = 4 * GIB,
    device_block: int = 2 * MIB,
    requested: int = 0,
    addr: int | None = None,
) -> control_pb2.Vm:
    vmem = control_pb2.VirtioMemSpec(
        region_size_bytes=region, block_size_bytes=device_block, requested_bytes=requested
    )
    if addr is not None:
        vmem.addr = addr
    spec = control_pb2.VmSpec(
        vm_id=vm_id,
        boot_bytes=boot,
        block_size_bytes=128 * MIB,
        protocol="virtio-mem",
        virtio_mem=vmem,
    )
    vm: control_pb2.Vm = await hv.control.CreateVm(control_pb2.CreateVmRequest(spec=spec))
    return vm


async def resize(hv: HvProcess, vm_id: str, size: int) -> control_pb2.Vm:
    vm: control_pb2.Vm = await hv.control.Resize(
        control_pb2.ResizeRequest(vm_id=vm_id, requested_bytes=size)
    )
    return vm


async def _plugged(hv: HvProcess, vm_id: str, size: int) -> bool:
    vm = await hv.get_vm(vm_id)
    return vm.virtio_mem.plugged_bytes == size


async def _driver_settled(guest: GuestProcess, size: int) -> bool:
    memory = await guest.memory()
    v = memory.virtio_mem
    return v.plugged_size == size and v.requested_size == size and not v.busy


async def _truth_violations(hv: HvProcess, vm_id: str, guest: GuestProcess) -> list[Any]:
    """The guest's invariants against the device's plugged ranges (the host's truth)."""
    vm = await hv.get_vm(vm_id)
    from memhp.v1 import guest_pb2

    req = guest_pb2.GetMemoryRequest(
        host_truth=True,
        host_backed=[
            guest_pb2.PfnRange(start_pfn=r.start_page, end_pfn=r.start_page + r.page_cnt)
            for r in vm.virtio_mem.plugged
        ],
    )
    memory = await guest.stub.GetMemory(req)
    return list(memory.violations)


async def test_resize_up_and_down_in_sub_block_mode(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    hv = await start_hypervisor("--no-default-vm")
    vm = await create_virtio_vm(hv, "v", addr=4 * GIB)
    assert vm.spec.protocol == "virtio-mem" and vm.virtio_mem.region_size_bytes == 4 * GIB
    async with guest_children() as children, watching(hv, ("v",), ("size_change",)) as w:
        guest = await start_guest(
            tmp_path,
            hv.address,
            "--protocol",
            "virtio-mem",
            "--auto-online",
            "online_movable",
            vm_id="v",
        )
        children.append(guest)
        await wait_until(partial(_driver_settled, guest, 0), what="probe")
        boot_total = (await guest.memory()).meminfo["MemTotal"]

        # Up: 300 MiB is two whole 128 MiB blocks and 11 subblocks of 4 MiB of a third.
        after = await resize(hv, "v", 300 * MIB)
        assert after.virtio_mem.requested_bytes == 300 * MIB
        await wait_until(partial(_plugged, hv, "v", 300 * MIB), what="plugged")
        await wait_until(partial(_driver_settled, guest, 300 * MIB), what="driver plugged")
        memory = await guest.memory()
        assert memory.virtio_mem.mode == "sbm" and memory.virtio_mem.unit_size == 4 * MIB
        states = {b.id: (b.state, b.plugged_pages) for b in memory.virtio_mem.blocks}
        assert states == {
            32: ("movable", 128 * MIB // PAGE),
            33: ("movable", 128 * MIB // PAGE),
            34: ("movable_partial", 44 * MIB // PAGE),
        }
        assert memory.meminfo["MemTotal"] == boot_total + 300 * 1024
        event = await w.wait_for(lambda e: e.payload["plugged_size"] == 300 * MIB)
        assert event.payload["requested_size"] == 300 * MIB
        assert await _truth_violations(hv, "v", guest) == []

        # Down: the partial block goes first, then the highest whole one.
        await resize(hv, "v", 128 * MIB)
        await wait_until(partial(_plugged, hv, "v", 128 * MIB), what="unplugged")
        await wait_until(partial(_driver_settled, guest, 128 * MIB), what="driver unplugged")
        memory = await guest.memory()
        after_down = {b.id: b.state for b in memory.virtio_mem.blocks}
        assert after_down == {32: "movable", 33: "unused", 34: "unused"}
        assert memory.meminfo["MemTotal"] == boot_total + 128 * 1024
        assert await _truth_violations(hv, "v", guest) == []
        vm = await hv.get_vm("v")
        assert vm.virtio_mem.answered["plug:ack"] >= 3
        assert vm.virtio_mem.protocol_errors == 0 and vm.virtio_mem.violations == 0
        assert vm.attached and vm.dm_state == ""


async def test_resize_up_and_down_in_big_block_mode(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    hv = await start_hypervisor("--no-default-vm")
    await create_virtio_vm(hv, "b", device_block=1 * GIB, region=8 * GIB)
    async with guest_children() as children:
        guest = await start_guest(
            tmp_path,
            hv.address,
            "--protocol",
            "virtio-mem",
            "--auto-online",
            "online_movable",
            vm_id="b",
        )
        children.append(guest)
        await resize(hv, "b", 3 * GIB)
        await wait_until(partial(_driver_settled, guest, 3 * GIB), what="plugged")
        memory = await guest.memory()
        assert memory.virtio_mem.mode == "bbm" and memory.virtio_mem.unit_size == GIB
        assert [b.state for b in memory.virtio_mem.blocks].count("unused") == 0
        assert len(memory.virtio_mem.blocks) == 3
        assert await _truth_violations(hv, "b", guest) == []
        await resize(hv, "b", 1 * GIB)
        await wait_until(partial(_driver_settled, guest, 1 * GIB), what="unplugged")
        await wait_until(partial(_plugged, hv, "b", 1 * GIB), what="device unplugged")
        assert await _truth_violations(hv, "b", guest) == []


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_resize_refusals_name_the_field_and_change_nothing(hv: HvProcess) -> None:
    await create_virtio_vm(hv, "v", requested=64 * MIB)
    await hv.create_vm("dm")
    other = await create_virtio_vm(hv, "w", requested=32 * MIB)
    before = await hv.get_vm("v")

    code, details = await _status(resize(hv, "v", 3 * MIB))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("requested_bytes:") and "multiples of 'block_size'" in details
    code, details = await _status(resize(hv, "v", 8 * GIB))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("requested_bytes:") and "cannot exceed" in details
    code, details = await _status(resize(hv, "dm", 64 * MIB))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("vm_id:") and "no virtio-mem device" in details
    code, details = await _status(resize(hv, "nope", 64 * MIB))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("vm_id:")

    assert await hv.get_vm("v") == before
    assert (await hv.get_vm("w")).virtio_mem == other.virtio_mem
    # DM commands do not apply to a virtio-mem VM.
    code, details = await _status(
        hv.control.SetTarget(control_pb2.SetTargetRequest(vm_id="v", requested_bytes=GIB))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "virtio-mem" in details


async def test_create_vm_refusals_name_the_field(hv: HvProcess) -> None:
    cases = [
        (
            control_pb2.VirtioMemSpec(region_size_bytes=GIB, block_size_bytes=3 * MIB),
            "virtio_mem.block_size_bytes",
        ),
        (
            control_pb2.VirtioMemSpec(region_size_bytes=GIB + 2 * MIB, block_size_bytes=4 * MIB),
            "virtio_mem.region_size_bytes",
        ),
        (
            control_pb2.VirtioMemSpec(region_size_bytes=GIB, requested_bytes=2 * GIB),
            "virtio_mem.requested_bytes",
        ),
        (control_pb2.VirtioMemSpec(region_size_bytes=GIB, addr=GIB // 2), "virtio_mem.addr"),
        (control_pb2.VirtioMemSpec(), "virtio_mem.region_size_bytes"),
    ]
    for vmem, field in cases:
        spec = control_pb2.VmSpec(
            vm_id="bad", boot_bytes=GIB, protocol="virtio-mem", virtio_mem=vmem
        )
        code, details = await _status(hv.control.CreateVm(control_pb2.CreateVmRequest(spec=spec)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, details)
        assert details.startswith(f"{field}:"), (field, details)
    spec = control_pb2.VmSpec(vm_id="bad", boot_bytes=GIB, protocol="virtio-mem")
    code, details = await _status(hv.control.CreateVm(control_pb2.CreateVmRequest(spec=spec)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("virtio_mem:")
    spec = control_pb2.VmSpec(vm_id="bad", boot_bytes=GIB, protocol="xen")
    code, details = await _status(hv.control.CreateVm(control_pb2.CreateVmRequest(spec=spec)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("protocol:")
    vms = await hv.control.ListVms(control_pb2.ListVmsRequest())
    assert "bad" not in [v.spec.vm_id for v in vms.vms]


class RawDevice:
    """A hand-written virtio-mem guest on the real stream: every request is the test's."""

    def __init__(self, hv: HvProcess, vm_id: str) -> None:
        self.stub: Any = virtio_mem_pb2_grpc.VirtioMemStub(hv.channel)
        self.vm_id = vm_id
        self.call: Any = None

    async def attach(self) -> virtio_mem_pb2.VirtioMemAttached:
        self.call = self.stub.Connect()
        await self.call.write(
            virtio_mem_pb2.GuestToDevice(attach=virtio_mem_pb2.VirtioMemAttach(vm_id=self.vm_id))
        )
        msg = await self.recv()
        assert msg.WhichOneof("msg") == "attached", msg
        return msg.attached

    async def recv(self) -> virtio_mem_pb2.DeviceToGuest:
        msg = await asyncio.wait_for(self.call.read(), RECV_TIMEOUT)
        assert isinstance(msg, virtio_mem_pb2.DeviceToGuest), f"stream ended: {msg!r}"
        return msg

    async def request(
        self, type_: int, addr: int, nb_blocks: int
    ) -> virtio_mem_pb2.VirtioMemResponse:
        await self.call.write(
            virtio_mem_pb2.GuestToDevice(
                request=virtio_mem_pb2.VirtioMemRequest(type=type_, addr=addr, nb_blocks=nb_blocks)
            )
        )
        msg = await self.recv()
        assert msg.WhichOneof("msg") == "response", msg
        return msg.response

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()


async def test_connect_rules(hv: HvProcess) -> None:
    await hv.create_vm("dm")
    await create_virtio_vm(hv, "v")
    for vm_id, code, words in [
        ("nope", grpc.StatusCode.NOT_FOUND, "no VM 'nope'"),
        ("dm", grpc.StatusCode.FAILED_PRECONDITION, "VM 'dm' has no virtio-mem device"),
    ]:
        device = RawDevice(hv, vm_id)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await device.attach()
        assert info.value.code() == code and words in (info.value.details() or "")
        device.close()
    first = RawDevice(hv, "v")
    attached = await first.attach()
    assert attached.config.region_size == 4 * GIB and attached.layout.boot_pages == GIB // PAGE
    second = RawDevice(hv, "v")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await second.attach()
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    second.close()
    # The DM channel refuses a virtio-mem VM, naming it and its protocol.
    call = hv.dm.Connect()
    await call.write(dm_pb2.GuestToHost(attach=dm_pb2.Attach(vm_id="v")))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'v'" in (info.value.details() or "") and "virtio-mem" in (info.value.details() or "")
    # The first stream carries on (nothing is usable at requested_size 0: ERROR).
    resp = await first.request(STATE, attached.config.addr, 1)
    assert resp.type == ERROR and resp.config.usable_region_size == 0
    first.close()


async def test_a_hostile_guest_gets_answers_and_the_session_carries_on(hv: HvProcess) -> None:
    await create_virtio_vm(hv, "v", requested=8 * MIB, addr=4 * GIB)
    other = await create_virtio_vm(hv, "w", requested=4 * MIB)
    device = RawDevice(hv, "v")
    async with watching(hv, ("v", "w"), ("protocol_error",)) as w:
        attached = await device.attach()
        base, usable = attached.config.addr, attached.config.usable_region_size
        assert usable == 8 * MIB + 256 * MIB
        assert (await device.request(PLUG, base + 4096, 1)).type == ERROR  # misaligned
        assert (await device.request(PLUG, base + usable, 1)).type == ERROR  # outside usable
        assert (await device.request(PLUG, base - 2 * MIB, 1)).type == ERROR  # below the region
        assert (await device.request(PLUG, base, 0)).type == ERROR  # empty
        assert (await device.request(PLUG, base, 5)).type == NACK  # past requested_size
        assert (await device.request(UNPLUG, base, 1)).type == ERROR  # not plugged
        assert (await device.request(9, base, 1)).type == ERROR  # no such request
        ok = await device.request(PLUG, base, 2)
        assert ok.type == ACK and ok.config.plugged_size == 4 * MIB
        state = await device.request(STATE, base, 4)
        assert state.type == ACK and state.state == 2  # MIXED
        assert (await device.request(PLUG, base, 1)).type == ERROR  # plugged already
        await w.wait_for(lambda e: e.payload["kind"] == "virtio-mem-plug-of-plugged")
        kinds = [e.payload["kind"] for e in w.events if e.vm_id == "v"]
        assert kinds == [
            "virtio-mem-misaligned",
            "virtio-mem-out-of-range",
            "virtio-mem-out-of-range",
            "virtio-mem-size-zero",
            "virtio-mem-plug-past-requested",
            "virtio-mem-unplug-of-unplugged",
            "virtio-mem-unknown-request",
            "virtio-mem-plug-of-plugged",
        ]
        assert all(e.payload["action"] == "answered" for e in w.events)
    vm = await hv.get_vm("v")
    assert vm.virtio_mem.plugged_bytes == 4 * MIB and vm.virtio_mem.protocol_errors == 8
    assert vm.attached
    # Access to unplugged device memory on the side channel is a violation.
    start = (base + 4 * MIB) // PAGE
    async with watching(hv, ("v",), ("violation",)) as w:
        await device.call.write(
            virtio_mem_pb2.GuestToDevice(
                access=dm_pb2.AccessReport(
                    ranges=[dm_pb2.PageRange(start_page=start, page_cnt=16)], what="allocate"
                )
            )
        )
        event = await w.wait_for(lambda e: e.kind == "violation")
        assert event.payload["kind"] == "unplugged-access"
    assert (await hv.get_vm("w")).virtio_mem == other.virtio_mem
    device.close()


async def _detached(hv: HvProcess, vm_id: str) -> bool:
    return not (await hv.get_vm(vm_id)).attached


async def _lose_the_answer(hv: HvProcess, vm_id: str, type_: int, addr: int, nb: int) -> None:
    """Send a request, let the device apply it, drop the stream before the answer is read."""
    device = RawDevice(hv, vm_id)
    await device.attach()
    before = (await hv.get_vm(vm_id)).virtio_mem.plugged_bytes
    await device.call.write(
        virtio_mem_pb2.GuestToDevice(
            request=virtio_mem_pb2.VirtioMemRequest(type=type_, addr=addr, nb_blocks=nb)
        )
    )
    await wait_until(
        lambda: _changed(hv, vm_id, before), what="the request applied", timeout=RECV_TIMEOUT
    )
    device.close()
    await wait_until(partial(_detached, hv, vm_id), what="detach", timeout=RECV_TIMEOUT)


async def _changed(hv: HvProcess, vm_id: str, before: int) -> bool:
    return (await hv.get_vm(vm_id)).virtio_mem.plugged_bytes != before


async def test_a_request_resent_after_its_answer_was_lost_is_replayed(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    state = tmp_path / "hv.sqlite"
    hv = await start_hypervisor("--no-default-vm", state=state)
    await create_virtio_vm(hv, "v", requested=8 * MIB, addr=4 * GIB)
    base = 4 * GIB
    await _lose_the_answer(hv, "v", PLUG, base, 2)
    async with watching(hv, ("v",), ("protocol_error", "size_change")) as w:
        device = RawDevice(hv, "v")
        await device.attach()
        # The guest re-sends its request in flight: the answer, not a second plug.
        resp = await device.request(PLUG, base, 2)
        assert resp.type == ACK and resp.config.plugged_size == 4 * MIB
        # Only the first request of a stream is a resend: later the device applies it.
        assert (await device.request(PLUG, base, 2)).type == ERROR
        await w.wait_for(lambda e: e.kind == "protocol_error")
        assert [e.kind for e in w.events] == ["protocol_error"]
        # A different first request on a new stream is applied as usual.
        device.close()
        await wait_until(partial(_detached, hv, "v"), what="detach", timeout=RECV_TIMEOUT)
        device = RawDevice(hv, "v")
        await device.attach()
        ok = await device.request(PLUG, base + 4 * MIB, 1)
        assert ok.type == ACK and ok.config.plugged_size == 6 * MIB
        device.close()
        await wait_until(partial(_detached, hv, "v"), what="detach", timeout=RECV_TIMEOUT)
    vm = await hv.get_vm("v")
    assert vm.virtio_mem.plugged_bytes == 6 * MIB and vm.virtio_mem.protocol_errors == 1

    # The last acknowledged request outlives a hypervisor restart (the device's row).
    await _lose_the_answer(hv, "v", UNPLUG, base + 4 * MIB, 1)
    address = hv.address
    assert await hv.stop() == 0
    hv2 = await start_hypervisor("--no-default-vm", "--listen", address, state=state)
    device = RawDevice(hv2, "v")
    await device.attach()
    resp = await device.request(UNPLUG, base + 4 * MIB, 1)
    assert resp.type == ACK and resp.config.plugged_size == 4 * MIB
    device.close()
    vm = await hv2.get_vm("v")
    assert vm.virtio_mem.plugged_bytes == 4 * MIB and vm.virtio_mem.protocol_errors == 0


async def test_restart_on_the_state_file_keeps_plugged_memory(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    state = tmp_path / "hv.sqlite"
    hv = await start_hypervisor("--no-default-vm", state=state)
    await create_virtio_vm(hv, "v")
    async with guest_children() as children:
        guest = await start_guest(
            tmp_path,
            hv.address,
            "--protocol",
            "virtio-mem",
            "--auto-online",
            "online_movable",
            vm_id="v",
        )
        children.append(guest)
        await resize(hv, "v", 256 * MIB)
        await wait_until(partial(_driver_settled, guest, 256 * MIB), what="plugged")
        address = hv.address
        assert await hv.stop() == 0
        hv2 = await start_hypervisor("--no-default-vm", "--listen", address, state=state)
        vm = await hv2.get_vm("v")
        assert vm.virtio_mem.plugged_bytes == 256 * MIB
        assert vm.virtio_mem.requested_bytes == 256 * MIB
        assert vm.spec.virtio_mem.region_size_bytes == 4 * GIB
        # The guest reattaches and carries on from where it was.
        await wait_until(lambda: _attached(hv2, "v"), what="reattach")
        await resize(hv2, "v", 384 * MIB)
        await wait_until(partial(_driver_settled, guest, 384 * MIB), what="plugged more")
        assert await _truth_violations(hv2, "v", guest) == []


async def _attached(hv: HvProcess, vm_id: str) -> bool:
    return (await hv.get_vm(vm_id)).attached


async def test_a_guest_with_both_drivers_exits_1_with_the_probe_failure(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "memhp.cli",
        "guest",
        "--hypervisor",
        "127.0.0.1:1",
        "--vm-id",
        "x",
        "--protocol",
        "hyperv-dm+virtio-mem",
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert (
        "virtio_mem virtio0: probe failed with error -22 (EINVAL): only one "
        "online_page_callback system-wide: hv_balloon already installed it; virtio_mem cannot"
    ) in err.decode()


async def test_ctl_resize_and_show(hv: HvProcess) -> None:
    from tests.process.test_hypervisor_ctl import ctl

    await create_virtio_vm(hv, "v", addr=4 * GIB)
    rc, out, err = await ctl(hv, "resize", "v", "256M", "--json")
    assert rc == 0, err
    vm = json.loads(out)
    assert vm["virtio_mem"]["requested_bytes"] == 256 * MIB
    assert vm["virtio_mem"]["usable_region_size_bytes"] == 512 * MIB
    rc, out, err = await ctl(hv, "show", "v")
    assert rc == 0, err
    assert "protocol virtio-mem" in out
    assert "requested 256M, plugged 0B, block 2M, region 4G at 0x100000000 (usable 512M)" in out
    rc, out, err = await ctl(hv, "resize", "v", "3M")
    assert rc == 1 and err.startswith("memhp ctl: INVALID_ARGUMENT: requested_bytes:")
    rc, out, err = await ctl(hv, "vms")
    assert rc == 0 and out.splitlines()[1].split()[:5] == ["v", "no", "virtio-mem", "1G", "256M"]
