"""guest.agent with ``protocol="virtio-mem"``: device messages that cannot be one.

The fake stream of test_agent.py carries VirtioMem messages; the host end is written by
hand (the test answers each request), with a real
:class:`hypervisor.virtio_mem_host.VirtioMemDevice` for the configs and answers.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from guest.agent import GuestAgent
from hypervisor.runtime import config_to_pb
from hypervisor.virtio_mem_host import VirtioMemDevice
from memhp import virtio_mem as vmem
from memhp.v1 import dm_pb2, virtio_mem_pb2
from tests.guest.test_agent import FakeLink, FakeTransport, debug_logs, options, running, wait_until

MIB = 1 << 20
GIB = 1 << 30
BLOCK_PAGES = 32_768  # 128 MiB
LAYOUT = dm_pb2.VmLayout(
    vm_id="vm1", boot_pages=GIB // 4096, max_pages=8 * GIB // 4096, block_pages=BLOCK_PAGES
)
#: node_id is 16 bits in struct virtio_mem_config: no config can hold this one.
BAD_NODE = 1 << 16


class FakeDevice:
    """The host end of one FakeLink on the VirtioMem channel; the test answers requests."""

    def __init__(self, link: FakeLink, device: VirtioMemDevice) -> None:
        # FakeLink's queues are typed for the DM channel; these carry VirtioMem messages.
        self.to_host = cast("asyncio.Queue[virtio_mem_pb2.GuestToDevice]", link.to_host)
        self.to_guest = cast("asyncio.Queue[virtio_mem_pb2.DeviceToGuest]", link.to_guest)
        self.device = device

    async def attach(self, config: virtio_mem_pb2.VirtioMemConfig | None = None) -> None:
        first = await asyncio.wait_for(self.to_host.get(), 5.0)
        assert first.WhichOneof("msg") == "attach"
        attached = virtio_mem_pb2.VirtioMemAttached(
            layout=LAYOUT, config=config if config is not None else config_to_pb(self.device.config)
        )
        self.to_guest.put_nowait(virtio_mem_pb2.DeviceToGuest(attached=attached))

    async def next_request(self) -> vmem.VirtioMemRequest:
        while True:
            msg = await asyncio.wait_for(self.to_host.get(), 5.0)
            if msg.WhichOneof("msg") == "request":
                r = msg.request
                return vmem.VirtioMemRequest(vmem.VirtioMemReqType(r.type), r.addr, r.nb_blocks)

    def respond(self, type_: int, config: virtio_mem_pb2.VirtioMemConfig | None = None) -> None:
        resp = virtio_mem_pb2.VirtioMemResponse(
            type=type_, config=config if config is not None else config_to_pb(self.device.config)
        )
        self.to_guest.put_nowait(virtio_mem_pb2.DeviceToGuest(response=resp))

    def answer(self, req: vmem.VirtioMemRequest) -> vmem.VirtioMemResponse:
        resp = self.device.request(req, time.monotonic())
        self.respond(int(resp.type))
        return resp

    def config_changed(self, config: virtio_mem_pb2.VirtioMemConfig) -> None:
        changed = virtio_mem_pb2.VirtioMemConfigChanged(config=config)
        self.to_guest.put_nowait(virtio_mem_pb2.DeviceToGuest(config_changed=changed))

    def resize(self, size: int) -> None:
        self.config_changed(config_to_pb(self.device.resize(size, time.monotonic()).config))


def new_device() -> VirtioMemDevice:
    return VirtioMemDevice(vmem.VirtioMemConfig(2 * MIB, 0, 4 * GIB, 4 * GIB, 0, 0, 0), vm_id="vm1")


async def next_device(transport: FakeTransport, device: VirtioMemDevice) -> FakeDevice:
    link = await asyncio.wait_for(transport.links.get(), 5.0)
    return FakeDevice(link, device)


def virtio_agent(transport: FakeTransport) -> GuestAgent:
    return GuestAgent(options(protocol="virtio-mem", auto_online="online_movable"), transport)


async def test_a_response_that_does_not_parse_is_a_failed_request_not_a_hang() -> None:
    transport = FakeTransport()
    agent = virtio_agent(transport)
    with debug_logs() as logs:
        async with running(agent) as task:
            host = await next_device(transport, new_device())
            await host.attach()
            await asyncio.wait_for(agent.attached.wait(), 5.0)
            host.resize(64 * MIB)
            req = await host.next_request()
            assert req.type == vmem.PLUG
            host.respond(99)  # no such VIRTIO_MEM_RESP_*
            assert agent.vm is not None
            driver = agent.vm.virtio_mem[0]
            # Delivered as ERROR: the plug failed (-EINVAL), the device is marked broken.
            await wait_until(lambda: driver.broken, what="the failed request")
            assert driver.request_in_flight is None and not driver.busy
            assert driver.plugged_size == 0
            assert not task.done()
    (bad,) = [e for e in logs if e["event"] == "bad_device_response"]
    assert bad["delivered"] == "VIRTIO_MEM_RESP_ERROR"


async def test_a_config_that_does_not_parse_breaks_the_stream_and_the_agent_reconnects() -> None:
    transport = FakeTransport()
    agent = virtio_agent(transport)
    device = new_device()
    async with running(agent) as task:
        # At attach: the agent reconnects instead of dying.
        bad = config_to_pb(device.config)
        bad.node_id = BAD_NODE
        host = await next_device(transport, device)
        await host.attach(bad)
        host = await next_device(transport, device)
        await host.attach()
        await asyncio.wait_for(agent.attached.wait(), 5.0)
        assert agent.attach_count == 1 and not task.done()
        # In a config interrupt: the same.
        host.config_changed(bad)
        host = await next_device(transport, device)
        await host.attach()
        await wait_until(lambda: agent.attach_count == 2, what="reattach")
        assert transport.opened == 3 and not task.done()
        # The device works on the new stream.
        host.resize(4 * MIB)
        req = await host.next_request()
        assert host.answer(req).type == vmem.ACK
        assert agent.vm is not None
        driver = agent.vm.virtio_mem[0]
        await wait_until(lambda: driver.plugged_size == 4 * MIB, what="plugged")
        assert not driver.broken
