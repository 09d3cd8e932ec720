"""A real ``memhp hypervisor`` process: health, reflection, Control, and the DM channel.

The guests here are :class:`FakeGuest` streams written in the test, so each message a
guest sends (including broken ones) is chosen on purpose; the multi-process tests
with real guest agents live beside the guest agent's tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memhp import codec, dm
from memhp.v1 import control_pb2, dm_pb2
from tests.process.conftest import (
    BLOCK_PAGES,
    GIB,
    MIB,
    FakeGuest,
    HvProcess,
    StartHypervisor,
    tid,
    wait_vm,
    watching,
)

BOOT_PAGES = 4 * GIB // 4096  # the default VM: 4 GiB boot memory
SERVICES = ("memhp.v1.DynamicMemory", "memhp.v1.Control")


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, field: str, rule: str = ""
) -> str:
    """The call fails with ``code`` and a message ``field: rule...``."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    details = err.value.details() or ""
    assert err.value.code() == code, details
    assert details.startswith(f"{field}: "), details
    assert rule in details, details
    return details


async def attached_guest(hv: HvProcess, guests: list[FakeGuest], vm_id: str) -> FakeGuest:
    guest = FakeGuest(hv, vm_id)
    guests.append(guest)
    await guest.attach()
    await guest.negotiate()
    return guest


# -- serving -------------------------------------------------------------------


async def test_health_serving_and_reflection_lists_the_services(hv: HvProcess) -> None:
    health = health_pb2_grpc.HealthStub(hv.channel)
    for name in ("", *SERVICES):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    refl = reflection_pb2_grpc.ServerReflectionStub(hv.channel)
    call = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for reply in call:
        names |= {s.name for s in reply.list_services_response.service}
    assert {
        *SERVICES,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


async def test_sigterm_stops_gracefully_with_status_0(
    start_hypervisor: StartHypervisor, guests: list[FakeGuest]
) -> None:
    hv = await start_hypervisor()
    guest = await attached_guest(hv, guests, "bye")
    assert await hv.child.stop() == 0
    # The guest's stream ended (cleanly or cancelled), it did not hang.
    with pytest.raises((AssertionError, grpc.aio.AioRpcError)):
        await guest.recv(timeout=5)


# -- VM definitions ------------------------------------------------------------


async def test_create_list_get(hv: HvProcess) -> None:
    vm = await hv.create_vm("g1", boot=2 * GIB, max_bytes=8 * GIB, block=256 * MIB)
    assert (vm.spec.vm_id, vm.spec.boot_bytes, vm.spec.max_bytes, vm.spec.block_size_bytes) == (
        "g1",
        2 * GIB,
        8 * GIB,
        256 * MIB,
    )
    assert not vm.attached and vm.dm_state == "VERSION" and vm.actual_bytes == 2 * GIB
    assert vm.policy.WhichOneof("policy") == "manual" and vm.requested_bytes == 0
    # block_size_bytes 0 means 128 MiB.
    spec = control_pb2.VmSpec(vm_id="g2", boot_bytes=GIB, max_bytes=GIB)
    vm2 = await hv.control.CreateVm(control_pb2.CreateVmRequest(spec=spec))
    assert vm2.spec.block_size_bytes == 128 * MIB
    listed = await hv.control.ListVms(control_pb2.ListVmsRequest())
    assert [v.spec.vm_id for v in listed.vms] == ["g1", "g2"]
    assert (await hv.get_vm("g1")).spec == vm.spec
    await expect_error(hv.create_vm("g1"), grpc.StatusCode.ALREADY_EXISTS, "vm_id", "exists")
    await expect_error(hv.get_vm("nope"), grpc.StatusCode.NOT_FOUND, "vm_id", "nope")


async def test_create_vm_bad_sizes_name_the_field(hv: HvProcess) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"boot_bytes": 4 * GIB + 1}, "boot_bytes", "4 KiB page"),
        ({"boot_bytes": 0}, "boot_bytes", "> 0"),
        ({"boot_bytes": 4 * GIB + 64 * MIB}, "boot_bytes", "multiple of block_pages"),
        ({"max_bytes": 2 * GIB}, "max_bytes", ">= boot_pages"),
        ({"max_bytes": 16 * GIB + 4096}, "max_bytes", "multiple of block_pages"),
        ({"block_size_bytes": 64 * MIB}, "block_size_bytes", "power of two"),
        ({"block_size_bytes": 384 * MIB}, "block_size_bytes", "power of two"),
        ({"vm_id": ""}, "vm_id", ""),
        ({"vm_id": "a b/c"}, "vm_id", "letters"),
    ]
    for change, field, rule in cases:
        spec: dict[str, Any] = {
            "vm_id": "bad",
            "boot_bytes": 4 * GIB,
            "max_bytes": 16 * GIB,
            "block_size_bytes": 128 * MIB,
            **change,
        }
        req = control_pb2.CreateVmRequest(spec=control_pb2.VmSpec(**spec))
        await expect_error(hv.control.CreateVm(req), bad, field, rule)
    await expect_error(hv.control.CreateVm(control_pb2.CreateVmRequest()), bad, "spec", "required")
    listed = await hv.control.ListVms(control_pb2.ListVmsRequest())
    assert not listed.vms


def commands(vm_id: str) -> list[tuple[str, Callable[[Any], Awaitable[Any]]]]:
    return [
        ("SetTarget", lambda c: c.SetTarget(
            control_pb2.SetTargetRequest(vm_id=vm_id, requested_bytes=8 * GIB))),
        ("HotAdd", lambda c: c.HotAdd(
            control_pb2.HotAddCommand(vm_id=vm_id, region_bytes=GIB, backed_bytes=GIB))),
        ("Back", lambda c: c.Back(control_pb2.BackCommand(vm_id=vm_id, size_bytes=GIB))),
        ("Balloon", lambda c: c.Balloon(
            control_pb2.BalloonCommand(vm_id=vm_id, size_bytes=GIB))),
        ("Unballoon", lambda c: c.Unballoon(
            control_pb2.UnballoonCommand(vm_id=vm_id, size_bytes=GIB))),
    ]  # fmt: skip


async def test_commands_for_unknown_and_detached_vms(hv: HvProcess) -> None:
    for name, run in commands("ghost"):
        details = await expect_error(run(hv.control), grpc.StatusCode.NOT_FOUND, "vm_id")
        assert "ghost" in details, name
    policy = control_pb2.Policy(manual=control_pb2.ManualPolicy())
    await expect_error(
        hv.control.SetPolicy(control_pb2.SetPolicyRequest(vm_id="ghost", policy=policy)),
        grpc.StatusCode.NOT_FOUND,
        "vm_id",
    )
    await hv.create_vm("idle")
    for _name, run in commands("idle"):
        await expect_error(
            run(hv.control), grpc.StatusCode.FAILED_PRECONDITION, "vm_id", "no attached guest"
        )
    # A policy is the VM's, attached or not.
    vm = await hv.control.SetPolicy(control_pb2.SetPolicyRequest(vm_id="idle", policy=policy))
    assert vm.policy.WhichOneof("policy") == "manual"


async def test_command_bad_input_on_an_attached_vm(hv: HvProcess, guests: list[FakeGuest]) -> None:
    await attached_guest(hv, guests, "b1")
    c = hv.control
    bad = grpc.StatusCode.INVALID_ARGUMENT

    def hot_add(region: int, backed: int, offset: int = 0) -> Any:
        return c.HotAdd(
            control_pb2.HotAddCommand(
                vm_id="b1", region_bytes=region, backed_bytes=backed, offset_bytes=offset
            )
        )

    await expect_error(hot_add(0, 0), bad, "region_bytes", "> 0")
    await expect_error(hot_add(GIB + 1000, GIB), bad, "region_bytes", "4 KiB page")
    await expect_error(hot_add(GIB, GIB + 4096), bad, "backed_bytes", "exceeds region_bytes")
    await expect_error(hot_add(GIB, 512 * MIB, 768 * MIB), bad, "offset_bytes", "past")
    await expect_error(hot_add(GIB + 4096, 4096), bad, "region_bytes", "alignment")
    await expect_error(
        hot_add(16 * GIB, GIB), grpc.StatusCode.RESOURCE_EXHAUSTED, "region_bytes", "max_pages"
    )
    await expect_error(
        c.Back(control_pb2.BackCommand(vm_id="b1", size_bytes=GIB)),
        grpc.StatusCode.NOT_FOUND,
        "vm_id",
        "no hot-add region",
    )
    await expect_error(
        c.Back(control_pb2.BackCommand(vm_id="b1", size_bytes=0)), bad, "size_bytes", "> 0"
    )
    await expect_error(
        c.SetTarget(control_pb2.SetTargetRequest(vm_id="b1", requested_bytes=32 * GIB)),
        bad,
        "requested_bytes",
        "<=",
    )
    await expect_error(
        c.SetTarget(control_pb2.SetTargetRequest(vm_id="b1", requested_bytes=GIB + 1)),
        bad,
        "requested_bytes",
        "4 KiB page",
    )
    await expect_error(
        c.Balloon(control_pb2.BalloonCommand(vm_id="b1", size_bytes=8 * GIB)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "size_bytes",
        "current",
    )
    await expect_error(
        c.Unballoon(control_pb2.UnballoonCommand(vm_id="b1", size_bytes=MIB)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "size_bytes",
        "ballooned",
    )

    def policy(**kw: int) -> Any:
        p = control_pb2.Policy(dynamic=control_pb2.DynamicPolicy(**kw))
        return c.SetPolicy(control_pb2.SetPolicyRequest(vm_id="b1", policy=p))

    await expect_error(policy(buffer_percent=5000), bad, "buffer_percent", "0..2000")
    await expect_error(policy(maximum_bytes=32 * GIB), bad, "maximum_bytes", "max_pages")
    await expect_error(
        policy(minimum_bytes=8 * GIB, maximum_bytes=4 * GIB), bad, "minimum_bytes", "exceeds"
    )
    await expect_error(policy(minimum_bytes=100), bad, "minimum_bytes", "4 KiB page")
    await expect_error(
        c.SetPolicy(control_pb2.SetPolicyRequest(vm_id="b1")), bad, "policy", "manual or dynamic"
    )

    # A request while one is in flight is queued; a back into pages already backed is not.
    vm = await c.HotAdd(
        control_pb2.HotAddCommand(vm_id="b1", region_bytes=128 * MIB, backed_bytes=128 * MIB)
    )
    assert vm.HasField("in_flight") and vm.in_flight.kind == "hot_add"
    await expect_error(
        c.Back(control_pb2.BackCommand(vm_id="b1", size_bytes=MIB, start_page=BOOT_PAGES)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "start_page",
        "already backed",
    )
    small = control_pb2.HotAddCommand(vm_id="b1", region_bytes=128 * MIB, backed_bytes=MIB)
    for _ in range(16):
        await c.HotAdd(small)
    await expect_error(c.HotAdd(small), grpc.StatusCode.RESOURCE_EXHAUSTED, "vm_id", "16 commands")
    vm = await hv.get_vm("b1")
    assert vm.in_flight.trans_id == 0 and len(vm.regions) == 17


# -- the DM channel ------------------------------------------------------------


async def test_connect_rules(hv: HvProcess, guests: list[FakeGuest]) -> None:
    # The first message must be attach.
    call = hv.dm.Connect()
    await call.write(dm_pb2.GuestToHost(frame=dm_pb2.DmFrame(trans_id=1)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.value.details() or "").startswith("attach: the first message")

    # A second Connect for an attached VM is refused; the first keeps working.
    first = await attached_guest(hv, guests, "dup")
    second = FakeGuest(hv, "dup")
    guests.append(second)
    await second.connect()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await second.call.read()
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (err.value.details() or "").startswith("vm_id: ")
    await hv.control.HotAdd(
        control_pb2.HotAddCommand(vm_id="dup", region_bytes=128 * MIB, backed_bytes=128 * MIB)
    )
    await first.answer_hot_add()
    vm = await wait_vm(hv, "dup", lambda v: v.regions and v.regions[0].added_pages)
    assert vm.attached and vm.actual_bytes == 4 * GIB + 128 * MIB

    # An introspection address that is not HOST:PORT is refused; nothing is made.
    for bad in ("no-port", "host:0", "host:99999", "a b:1", "x" * 300 + ":1"):
        call = hv.dm.Connect()
        await call.write(
            dm_pb2.GuestToHost(attach=dm_pb2.Attach(vm_id="addr", introspection_address=bad))
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert (err.value.details() or "").startswith("introspection_address: "), bad
    listed = await hv.control.ListVms(control_pb2.ListVmsRequest())
    assert "addr" not in [v.spec.vm_id for v in listed.vms]


async def test_config_file_and_no_default_vm(
    start_hypervisor: StartHypervisor, guests: list[FakeGuest], tmp_path: Path
) -> None:
    config = tmp_path / "vms.yaml"
    config.write_text("- {vm_id: cfg1, boot_memory: 1G, max_memory: 2G, block_size: 256M}\n")
    hv = await start_hypervisor("--config", str(config), "--no-default-vm")
    ghost = FakeGuest(hv, "ghost")
    guests.append(ghost)
    await ghost.connect()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ghost.call.read()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (err.value.details() or "").startswith("vm_id: ")
    guest = FakeGuest(hv, "cfg1")
    guests.append(guest)
    layout = await guest.attach()
    assert (layout.vm_id, layout.boot_pages, layout.max_pages, layout.block_pages) == (
        "cfg1",
        GIB // 4096,
        2 * GIB // 4096,
        256 * MIB // 4096,
    )


async def test_default_vm_made_on_first_attach(hv: HvProcess, guests: list[FakeGuest]) -> None:
    async with watching(hv, vm_ids=("fresh",)) as events:
        guest = FakeGuest(hv, "fresh")
        guests.append(guest)
        layout = await guest.attach()
        assert (layout.boot_pages, layout.max_pages, layout.block_pages) == (
            BOOT_PAGES,
            4 * BOOT_PAGES,
            BLOCK_PAGES,
        )
        attach = await events.wait_for(lambda e: e.kind == "attach")
        assert attach.payload["created"] is True and attach.source == "host"
        assert attach.version == 1 and attach.timestamp > 0
        await guest.close()
        await events.wait_for(lambda e: e.kind == "detach")
    vm = await wait_vm(hv, "fresh", lambda v: not v.attached)
    assert vm.spec.max_bytes == 16 * GIB


async def test_partial_backing_24_then_16_byte_form(hv: HvProcess, guests: list[FakeGuest]) -> None:
    guest = await attached_guest(hv, guests, "pb")
    async with watching(hv, vm_ids=("pb",), kinds=("hot_add_request",)) as events:
        await hv.control.HotAdd(
            control_pb2.HotAddCommand(vm_id="pb", region_bytes=GIB, backed_bytes=256 * MIB)
        )
        req = await guest.answer_hot_add()
        assert req.region == dm.PageRange(BOOT_PAGES, GIB // 4096)
        assert req.range == dm.PageRange(BOOT_PAGES, 256 * MIB // 4096)
        # The 24-byte form on the wire: header, range, region.
        assert len(codec.encode(req)) == 24
        event = await events.wait_for(lambda e: True)
        assert event.payload["form"] == 24
    vm = await wait_vm(hv, "pb", lambda v: v.regions[0].added_pages)
    (region,) = vm.regions
    assert (region.start_page, region.page_count, region.added_pages) == (
        BOOT_PAGES,
        GIB // 4096,
        65536,
    )
    assert [(b.start_page, b.page_cnt) for b in region.backed] == [(BOOT_PAGES, 65536)]
    assert vm.actual_bytes == 4 * GIB + 256 * MIB and not vm.HasField("in_flight")

    # Later backing continues the region in the 16-byte form (range only).
    await hv.control.Back(control_pb2.BackCommand(vm_id="pb", size_bytes=256 * MIB))
    req = await guest.answer_hot_add()
    assert req.region is None and req.range == dm.PageRange(BOOT_PAGES + 65536, 65536)
    assert len(codec.encode(req)) == 16
    vm = await wait_vm(hv, "pb", lambda v: v.regions[0].added_pages == 131072)
    assert [(b.start_page, b.page_cnt) for b in vm.regions[0].backed] == [(BOOT_PAGES, 131072)]


async def test_protocol_errors_reset_only_that_guest(
    hv: HvProcess, guests: list[FakeGuest]
) -> None:
    bad = await attached_guest(hv, guests, "bad")
    good = await attached_guest(hv, guests, "good")
    async with watching(hv, kinds=("protocol_error", "reset")) as events:
        # A response without a request.
        await bad.send(dm.HotAddResponse(tid(), page_count=1, result=1))
        notice = await bad.recv_notice()
        assert (notice.kind, notice.action) == ("response-without-request", "reset")
        err = await events.wait_for(lambda e: e.kind == "protocol_error")
        assert err.vm_id == "bad" and err.payload["kind"] == "response-without-request"
        assert err.payload["action"] == "reset"
        await events.wait_for(lambda e: e.kind == "reset" and e.vm_id == "bad")
        assert (await hv.get_vm("bad")).dm_state == "VERSION"

        # The other VM never noticed.
        await hv.control.HotAdd(
            control_pb2.HotAddCommand(vm_id="good", region_bytes=GIB, backed_bytes=GIB)
        )
        await good.answer_hot_add()
        vm = await wait_vm(hv, "good", lambda v: v.regions and v.regions[0].added_pages)
        assert vm.dm_state == "IDLE"

        # The broken guest renegotiates on the same stream; a page count above the
        # request is the next error.
        await bad.negotiate()
        await hv.control.HotAdd(
            control_pb2.HotAddCommand(vm_id="bad", region_bytes=128 * MIB, backed_bytes=MIB)
        )
        await bad.answer_hot_add(page_count=256 + 1)
        notice = await bad.recv_notice()
        assert notice.kind == "hot-add-page-count-above-request" and notice.action == "reset"

        # A frame that is no DM message at all.
        await bad.negotiate()
        await bad.send_raw(dm_pb2.GuestToHost(frame=dm_pb2.DmFrame(trans_id=tid())))
        notice = await bad.recv_notice()
        assert notice.kind == "malformed-frame" and "dm_frame.body" in notice.message
        await bad.negotiate()
        assert [e.payload["kind"] for e in events.events if e.kind == "protocol_error"] == [
            "response-without-request",
            "hot-add-page-count-above-request",
            "malformed-frame",
        ]
        assert all(e.vm_id == "bad" for e in events.events)
    assert (await hv.get_vm("good")).dm_state == "IDLE"
    assert (await hv.get_vm("bad")).dm_state == "IDLE"


async def test_restart_with_state_keeps_vms_and_regions(
    start_hypervisor: StartHypervisor, guests: list[FakeGuest], tmp_path: Path
) -> None:
    state = tmp_path / "hv.db"
    hv = await start_hypervisor(state=state)
    await hv.create_vm("keep", boot=2 * GIB, max_bytes=8 * GIB)
    guest = await attached_guest(hv, guests, "keep")
    await hv.control.HotAdd(
        control_pb2.HotAddCommand(vm_id="keep", region_bytes=GIB, backed_bytes=256 * MIB)
    )
    await guest.answer_hot_add()
    dyn = control_pb2.Policy(
        dynamic=control_pb2.DynamicPolicy(buffer_percent=30, minimum_bytes=2 * GIB)
    )
    await hv.control.SetPolicy(control_pb2.SetPolicyRequest(vm_id="keep", policy=dyn))
    before = await wait_vm(hv, "keep", lambda v: v.regions and v.regions[0].added_pages)
    await guest.close()
    assert await hv.stop() == 0

    hv2 = await start_hypervisor(state=state)
    after = await hv2.get_vm("keep")
    assert after.spec == before.spec and not after.attached
    assert list(after.regions) == list(before.regions)
    assert after.actual_bytes == 2 * GIB + 256 * MIB
    assert after.policy.dynamic.buffer_percent == 30
    assert after.policy.dynamic.minimum_bytes == 2 * GIB

    # The guest comes back with what it holds: nothing is offered twice.
    back = FakeGuest(hv2, "keep")
    guests.append(back)
    held = dm_pb2.GuestMemoryState(
        regions=[dm_pb2.PageRange(start_page=2 * GIB // 4096, page_cnt=GIB // 4096)],
        pages_added=65536,
    )
    await back.attach(held)
    await back.negotiate()
    await hv2.control.Back(control_pb2.BackCommand(vm_id="keep", size_bytes=256 * MIB))
    req = await back.answer_hot_add()
    assert req.region is None and req.range == dm.PageRange(2 * GIB // 4096 + 65536, 65536)
    vm = await wait_vm(hv2, "keep", lambda v: v.regions[0].added_pages == 131072)
    assert len(vm.regions) == 1


async def test_dynamic_policy_sets_targets_from_status_reports(
    hv: HvProcess, guests: list[FakeGuest]
) -> None:
    guest = await attached_guest(hv, guests, "dyn")
    dyn = control_pb2.Policy(
        dynamic=control_pb2.DynamicPolicy(
            buffer_percent=20, minimum_bytes=GIB, maximum_bytes=16 * GIB
        )
    )
    vm = await hv.control.SetPolicy(control_pb2.SetPolicyRequest(vm_id="dyn", policy=dyn))
    assert vm.policy.dynamic.maximum_bytes == 16 * GIB
    async with watching(hv, vm_ids=("dyn",), kinds=("policy_decision", "target")) as events:
        # 5 GiB committed + 20 % = 6 GiB: grow by 2 GiB.
        await guest.status(5 * GIB // 4096)
        decision = await events.wait_for(lambda e: e.kind == "policy_decision")
        assert decision.payload["target_pages"] == 6 * GIB // 4096
        assert decision.payload["committed_pages"] == 5 * GIB // 4096
        req = await guest.answer_hot_add()
        assert req.range.page_cnt == 2 * GIB // 4096 and req.region == req.range
        vm = await wait_vm(hv, "dyn", lambda v: v.actual_bytes == 6 * GIB)
        assert vm.requested_bytes == 6 * GIB and vm.committed_bytes == 5 * GIB
        # Less than a block of change: no new decision.
        await guest.status(5 * GIB // 4096 - 100)
        await asyncio.sleep(0.3)
        assert events.kinds().count("policy_decision") == 1
        # Pressure drops: 2 GiB committed -> 2.4 GiB, rounded up to 2.5 GiB; balloon.
        await guest.status(2 * GIB // 4096)
        decision = await events.wait_for(
            lambda e: e.kind == "policy_decision" and e.payload["target_pages"] != 6 * GIB // 4096
        )
        assert decision.payload["target_pages"] == 20 * BLOCK_PAGES
        req2 = await guest.recv_frame()
        assert isinstance(req2, dm.BalloonRequest)
        # 3.5 GiB to give back, asked for in QEMU-sized requests.
        assert req2.num_pages == min(
            6 * GIB // 4096 - 20 * BLOCK_PAGES, dm.HV_BALLOON_HR_CHUNK_PAGES
        )


async def test_qemu_profile_waits_after_negotiation(
    start_hypervisor: StartHypervisor, guests: list[FakeGuest]
) -> None:
    hv = await start_hypervisor("--profile", "qemu")
    await attached_guest(hv, guests, "q")
    vm = await hv.get_vm("q")
    assert vm.dm_state == "POST_INIT_WAIT"
    # A command is accepted and waits for the 50 s post-init delay to pass.
    vm = await hv.control.HotAdd(
        control_pb2.HotAddCommand(vm_id="q", region_bytes=GIB, backed_bytes=GIB)
    )
    assert vm.dm_state == "POST_INIT_WAIT" and not vm.HasField("in_flight")
    await asyncio.sleep(0.3)  # a few ticks
    assert (await hv.get_vm("q")).dm_state == "POST_INIT_WAIT"


async def test_batched_hot_add_and_back_remaining(hv: HvProcess, guests: list[FakeGuest]) -> None:
    guest = await attached_guest(hv, guests, "batch")
    await hv.control.HotAdd(
        control_pb2.HotAddCommand(
            vm_id="batch", region_bytes=256 * MIB, backed_bytes=128 * MIB, count=3
        )
    )
    vm = await hv.control.GetVm(control_pb2.GetVmRequest(vm_id="batch"))
    assert vm.queued_commands == 0 and vm.busy  # one command, running
    regions = [await guest.answer_hot_add() for _ in range(3)]
    assert [r.region.start_page if r.region else None for r in regions] == [
        BOOT_PAGES + i * 256 * MIB // 4096 for i in range(3)
    ]
    vm = await wait_vm(hv, "batch", lambda v: not v.busy)
    assert [r.added_pages for r in vm.regions] == [128 * MIB // 4096] * 3
    assert vm.transactions.completed == 3 and vm.transactions.window == 3
    assert 0 < vm.transactions.p50_ms <= vm.transactions.p99_ms <= vm.transactions.max_ms

    # Back everything remaining: one 16-byte request per region, lowest first.
    await hv.control.Back(control_pb2.BackCommand(vm_id="batch", remaining=True))
    backs = [await guest.answer_hot_add() for _ in range(3)]
    assert [(b.range.start_page, b.region) for b in backs] == [
        (BOOT_PAGES + i * 256 * MIB // 4096 + 128 * MIB // 4096, None) for i in range(3)
    ]
    vm = await wait_vm(hv, "batch", lambda v: not v.busy)
    assert vm.transactions.completed == 6
    assert vm.actual_bytes == 4 * GIB + 768 * MIB

    # Nothing left, both fields at once, a count that does not fit: refused, nothing changed.
    await expect_error(
        hv.control.Back(control_pb2.BackCommand(vm_id="batch", remaining=True)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "remaining",
        "already backed",
    )
    await expect_error(
        hv.control.Back(control_pb2.BackCommand(vm_id="batch", remaining=True, size_bytes=MIB)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "remaining",
        "leave size_bytes",
    )
    await expect_error(
        hv.control.HotAdd(
            control_pb2.HotAddCommand(
                vm_id="batch", region_bytes=128 * MIB, backed_bytes=128 * MIB, count=100_000
            )
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "region_bytes",
        "100000 regions of",
    )
    after = await hv.control.GetVm(control_pb2.GetVmRequest(vm_id="batch"))
    assert after.regions == vm.regions and not after.busy
