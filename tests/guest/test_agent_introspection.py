"""guest.introspection: GetMemory and SetBlockState over a real in-process gRPC server.

The agent runs against the fake stream of test_agent.py; the servicer is served by
``grpc.aio`` on 127.0.0.1:0 and called through the generated stub.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from guest.agent import GuestAgent
from guest.introspection import GuestIntrospection, errno_status
from memhp import dm
from memhp.v1 import guest_pb2, guest_pb2_grpc
from tests.guest.test_agent import (
    BLOCK,
    CONFIG,
    FakeHost,
    FakeTransport,
    next_host,
    options,
    running,
    wait_until,
)


class Rig:
    def __init__(self, agent: GuestAgent, transport: FakeTransport, stub: object) -> None:
        self.agent = agent
        self.transport = transport
        self.stub: guest_pb2_grpc.GuestIntrospectionAsyncStub = stub  # type: ignore[assignment]
        self.host: FakeHost | None = None

    async def attach(self) -> FakeHost:
        self.host = await next_host(self.transport)
        await self.host.negotiated()
        return self.host

    async def memory(self) -> guest_pb2.GuestMemory:
        return await self.stub.GetMemory(guest_pb2.GetMemoryRequest())

    async def set_state(self, index: int, state: str) -> guest_pb2.MemoryBlock:
        req = guest_pb2.SetBlockStateRequest(index=index, state=state)
        return await self.stub.SetBlockState(req, timeout=5)


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    transport = FakeTransport()
    agent = GuestAgent(options(), transport)
    server = grpc.aio.server()
    guest_pb2_grpc.add_GuestIntrospectionServicer_to_server(
        GuestIntrospection(
            lambda: agent.vm, trace=lambda: tuple(agent.events), on_change=agent.state_changed
        ),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        async with running(agent):
            yield Rig(agent, transport, guest_pb2_grpc.GuestIntrospectionStub(channel))
    finally:
        await channel.close(None)
        await server.stop(None)


def test_errno_to_status() -> None:
    assert errno_status(errno.ENOENT) == grpc.StatusCode.NOT_FOUND
    assert errno_status(errno.EINVAL) == grpc.StatusCode.INVALID_ARGUMENT
    assert errno_status(errno.EBUSY) == grpc.StatusCode.FAILED_PRECONDITION
    assert errno_status(errno.ENOMEM) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errno_status(errno.EPERM) == grpc.StatusCode.FAILED_PRECONDITION


async def test_get_memory_before_attach_is_unavailable(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.memory()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_get_memory_shows_blocks_regions_counters_and_pages(rig: Rig) -> None:
    host = await rig.attach()
    host.send(host.session.hot_add(2 * BLOCK, BLOCK // 2, time.monotonic()))
    # Nobody onlines memory8: the driver waits (5 s) for it; look while it waits.
    await wait_until(lambda: rig.agent.vm and 8 in rig.agent.vm.mm.blocks, what="memory8")
    mem = await rig.memory()
    assert (mem.vm_id, mem.block_size_bytes, mem.auto_online_blocks) == (
        "vm1",
        128 << 20,
        "offline",
    )
    block8 = mem.blocks[-1]
    assert (block8.index, block8.state, block8.zone, block8.node) == (8, "offline", "", 0)
    assert list(block8.valid_zones) == ["Normal", "Movable"] and block8.removable
    (region,) = mem.regions
    assert (region.start_pfn, region.end_pfn) == (CONFIG.boot_pages, CONFIG.boot_pages + 2 * BLOCK)
    assert region.covered_end_pfn == CONFIG.boot_pages + BLOCK // 2
    assert mem.dm_state == "DM_HOT_ADD"
    assert mem.counters.num_pages_added == 0  # counted when the request is answered
    assert set(mem.meminfo) == {"MemTotal", "MemFree", "MemAvailable", "Balloon"}
    assert (mem.strategy, mem.driver_mode) == ("callback", "upstream")
    assert list(mem.violations) == []

    reply = await rig.set_state(8, "online_movable")
    assert (reply.state, reply.zone, list(reply.valid_zones)) == ("online", "Movable", ["Movable"])
    await wait_until(lambda: host.of(dm.HotAddResponse), what="hot-add response")
    mem = await rig.memory()
    assert mem.pages.page_offline == BLOCK // 2
    assert mem.counters.num_pages_onlined == BLOCK // 2


async def test_violations_carry_the_recent_events(rig: Rig) -> None:
    await rig.attach()
    vm = rig.agent.vm
    assert vm is not None
    # The host gives back pages that were never ballooned (upstream does not check: E6).
    vm.deliver(dm.UnballoonRequest(9, False, (dm.PageRange(4096, 16),)))
    mem = await rig.memory()
    (v,) = mem.violations
    assert v.invariant == "unballoon-not-ballooned"
    assert (v.pfn_start, v.pfn_end) == (4096, 4112)
    assert any("driver_violation" in line for line in v.trace)


@pytest.mark.parametrize(
    ("index", "value", "code", "errno_name"),
    [
        (99, "online", grpc.StatusCode.NOT_FOUND, "ENOENT"),
        (3, "sideways", grpc.StatusCode.INVALID_ARGUMENT, "EINVAL"),
        (3, "online", grpc.StatusCode.INVALID_ARGUMENT, "EINVAL"),
        (0, "offline", grpc.StatusCode.FAILED_PRECONDITION, "EBUSY"),
    ],
)
async def test_set_block_state_errors(
    rig: Rig, index: int, value: str, code: grpc.StatusCode, errno_name: str
) -> None:
    await rig.attach()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.set_state(index, value)
    assert info.value.code() == code
    assert f"-{errno_name}" in (info.value.details() or "")
    assert f"memory{index}/state" in (info.value.details() or "")


async def test_set_block_state_waits_for_mem_hotplug_lock_then_applies(rig: Rig) -> None:
    host = await rig.attach()
    host.send(host.session.hot_add(BLOCK, BLOCK, time.monotonic()))
    await wait_until(lambda: rig.agent.vm and 8 in rig.agent.vm.mm.blocks, what="memory8")
    vm = rig.agent.vm
    assert vm is not None
    # An onlining that pauses 0.3 s with mem_hotplug_lock held, memory8 still offline.
    vm.inject_slow_onlining(0.3, count=1)
    assert vm.online_block(8, "online_movable") is False
    rig.agent.wake()
    await wait_until(lambda: vm.mm.hotplug_lock_holder is not None, what="the lock")
    started = time.monotonic()
    # Written during the pause, "offline" would fail with -EINVAL (already offline);
    # it waits for the lock instead and then offlines the now online block.
    reply = await rig.set_state(8, "offline")
    assert time.monotonic() - started >= 0.2
    assert reply.state == "offline"
    assert vm.mm.blocks[8].state == "offline"


async def test_set_block_state_wakes_the_guest(rig: Rig) -> None:
    host = await rig.attach()
    host.send(host.session.hot_add(BLOCK, BLOCK, time.monotonic()))
    await wait_until(lambda: rig.agent.vm and 8 in rig.agent.vm.mm.blocks, what="memory8")
    await rig.set_state(8, "online")
    # The hot-add work waiting on the onlining answers at once, not at its 5 s timeout.
    await asyncio.wait_for(
        wait_until(lambda: host.of(dm.HotAddResponse), what="response"), timeout=1.0
    )
