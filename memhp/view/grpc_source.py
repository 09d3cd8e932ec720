"""Feed a :class:`~memhp.view.model.Fleet` from the hypervisor and the guest agents over gRPC.

* ``Control.WatchEvents`` (all VMs, or the ones asked for) for the recent events,
  reopened after a second when the stream breaks;
* every ``refresh`` seconds (2 Hz by default) ``Control.ListVms``, then ``GetVm`` for
  each VM shown, then ``GuestIntrospection.GetMemory`` at the VM's ``guest_address``
  for its block cells, checked against the host's ground truth from ``GetVm`` (as the
  scenario runner checks it). A VM whose guest announced no address, or cannot be
  reached, gets the map the host alone can draw, marked so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

from extents import RangeSet
from memhp.logs import get_logger
from memhp.v1 import control_pb2, control_pb2_grpc, dm_pb2, guest_pb2, guest_pb2_grpc
from memhp.view.model import Fleet

log = get_logger("memhp.view")

#: Seconds between two polls (2 Hz).
DEFAULT_REFRESH = 0.5
#: Seconds a single call may take.
CALL_TIMEOUT = 5.0
#: Seconds before a broken event stream is opened again.
REWATCH_DELAY = 1.0


class SourceError(Exception):
    """The hypervisor could not be asked."""


def _pfn_ranges(ranges: Iterable[tuple[int, int]]) -> list[guest_pb2.PfnRange]:
    return [guest_pb2.PfnRange(start_pfn=s, end_pfn=e) for s, e in ranges]


def _pages(ranges: Iterable[dm_pb2.PageRange]) -> list[tuple[int, int]]:
    return [(r.start_page, r.start_page + r.page_cnt) for r in ranges]


def memory_request(vm: control_pb2.Vm) -> guest_pb2.GetMemoryRequest:
    """``GetMemory`` checked against the host's ground truth in ``vm`` (a ``GetVm``)."""
    if vm.HasField("virtio_mem"):
        # A virtio-mem guest checks against what the device has plugged.
        return guest_pb2.GetMemoryRequest(
            host_truth=True, host_backed=_pfn_ranges(_pages(vm.virtio_mem.plugged))
        )
    offered = RangeSet()
    for region in vm.regions:
        for s, e in _pages(region.backed):
            offered.add(s, e)
    return guest_pb2.GetMemoryRequest(
        host_truth=True,
        host_backed=_pfn_ranges(_pages(vm.backed)),
        host_offered=_pfn_ranges(offered.ranges()),
    )


def _why(err: grpc.aio.AioRpcError) -> str:
    return f"{err.code().name}: {err.details() or ''}".rstrip(": ")


class GrpcSource:
    """See the module doc. ``guests`` maps a VM id to a guest address that overrides the
    one the guest announced. Use ``async with`` (it closes the channels)."""

    def __init__(
        self,
        fleet: Fleet,
        hypervisor: str,
        *,
        guests: Mapping[str, str] | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.fleet = fleet
        self.hypervisor = hypervisor
        self.guests = dict(guests or {})
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(hypervisor)
        self.control: Any = control_pb2_grpc.ControlStub(self.channel)
        #: One channel per VM, to the address its guest announced last.
        self._guest_channels: dict[str, tuple[str, grpc.aio.Channel]] = {}
        #: Set once the hypervisor has the event subscription (cleared while it is broken).
        self.subscribed = asyncio.Event()
        fleet.source = f"hypervisor {hypervisor}"

    async def __aenter__(self) -> GrpcSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in [*(c for _, c in self._guest_channels.values()), self.channel]:
            with contextlib.suppress(Exception):
                await channel.close(None)
        self._guest_channels.clear()

    async def _guest(self, vm_id: str, address: str) -> Any:
        """The VM's guest at ``address``; a guest that moved (a restart on another port)
        gets a new channel and the old one is closed, so a long watch does not pile them up."""
        known = self._guest_channels.get(vm_id)
        if known is not None and known[0] == address:
            channel = known[1]
        else:
            if known is not None:
                with contextlib.suppress(Exception):
                    await known[1].close(None)
            channel = grpc.aio.insecure_channel(address)
            self._guest_channels[vm_id] = (address, channel)
        return guest_pb2_grpc.GuestIntrospectionStub(channel)

    # -- polling ---------------------------------------------------------------------------

    async def poll(self) -> None:
        """Ask the hypervisor (and every guest) once; :class:`SourceError` if it cannot be."""
        try:
            reply = await self.control.ListVms(control_pb2.ListVmsRequest(), timeout=self.timeout)
            ids = [vm.spec.vm_id for vm in reply.vms if self.fleet.wants(vm.spec.vm_id)]
            await asyncio.gather(*(self._poll_vm(vm_id) for vm_id in ids))
        except grpc.aio.AioRpcError as err:
            self.fleet.error = f"hypervisor {self.hypervisor}: {_why(err)}"
            raise SourceError(self.fleet.error) from None
        self.fleet.error = ""

    async def _poll_vm(self, vm_id: str) -> None:
        try:
            vm: control_pb2.Vm = await self.control.GetVm(
                control_pb2.GetVmRequest(vm_id=vm_id), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return  # gone between ListVms and GetVm
            raise
        address = self.guests.get(vm_id) or vm.guest_address
        if not address:
            why = "no guest attached" if not vm.attached else "the guest announced no address"
            self.fleet.apply_host_map(vm, f"{why}: the host's backing, not the guest's blocks")
            return
        try:
            guest = await self._guest(vm_id, address)
            memory = await guest.GetMemory(memory_request(vm), timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            self.fleet.apply_host_map(
                vm,
                f"guest {address}: {_why(err)}: the host's backing, not the guest's blocks",
            )
            return
        self.fleet.apply_vm(vm)
        self.fleet.apply_memory(vm_id, memory)

    # -- events ----------------------------------------------------------------------------

    async def watch_events(self, on_event: Callable[[], None] | None = None) -> None:
        """Follow ``WatchEvents`` until cancelled, reopening it when it breaks."""
        request = control_pb2.WatchEventsRequest(vm_ids=sorted(self.fleet.only))
        while True:
            call = self.control.WatchEvents(request)
            try:
                await call.initial_metadata()
                self.subscribed.set()
                async for event in call:
                    self.fleet.apply_event(event)
                    if on_event is not None:
                        on_event()
            except grpc.aio.AioRpcError as err:
                log.debug("event stream broke", error=_why(err))
            finally:
                self.subscribed.clear()
                call.cancel()
            await asyncio.sleep(REWATCH_DELAY)

    async def run(self, refresh: float = DEFAULT_REFRESH) -> None:
        """Poll every ``refresh`` seconds and follow the events, until cancelled."""
        events = asyncio.create_task(self.watch_events(), name="view-watch-events")
        try:
            while True:
                with contextlib.suppress(SourceError):
                    await self.poll()
                await asyncio.sleep(refresh)
        finally:
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events
