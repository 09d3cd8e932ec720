"""The guest agent's ``GuestIntrospection`` service: sysfs and meminfo over gRPC.

``GetMemory`` answers what ``/sys/devices/system/memory``, ``/proc/meminfo`` and the
driver's ``hv_hotadd_state`` list would show, plus page counts and the guest-only
invariant findings (:func:`guest.invariants.check_guest` without the host's ground
truth). ``SetBlockState`` is ``echo VALUE > memoryN/state`` with the kernel's
semantics (:func:`guest.sysfs.sysfs_state_write`); its errno becomes a gRPC status:

========  =====================  =====================================================
errno     status                 when
========  =====================  =====================================================
ENOENT    NOT_FOUND              no ``memoryN``
EINVAL    INVALID_ARGUMENT       unknown value, or the block is already in that state
EBUSY     FAILED_PRECONDITION    the block cannot go offline (unmovable pages), ...
ENOMEM    RESOURCE_EXHAUSTED     no memory to migrate to while offlining
other     FAILED_PRECONDITION    e.g. a notifier refused the change
========  =====================  =====================================================

The message names the block, the errno (``-EINVAL``) and the reason. A write while
an onlining holds ``mem_hotplug_lock`` waits for it (the kernel restarts the
syscall) and then applies. Everything runs on the agent's event loop, so the model
is never read while it changes.
"""

from __future__ import annotations

import asyncio
import errno as _errno
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from guest.invariants import check_guest
from guest.mm.errors import MemoryHotplugError
from guest.mm.memory import HotplugLockBusy, MemoryBlock
from guest.mm.pages import ALLOCATED, BUDDY, OWNER_BALLOON, PAGE_OFFLINE, RESERVED
from guest.sysfs import block_files, sysfs_state_write
from guest.vm import GuestVm
from memhp.logs import get_logger
from memhp.v1 import guest_pb2, guest_pb2_grpc

log = get_logger("guest.introspection")

#: Seconds between two attempts of a sysfs write that waits for ``mem_hotplug_lock``.
LOCK_POLL_SECONDS = 0.005

_ERRNO_STATUS = {
    _errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    _errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    _errno.EBUSY: grpc.StatusCode.FAILED_PRECONDITION,
    _errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def errno_status(errno: int) -> grpc.StatusCode:
    """The gRPC status a failed sysfs write answers with."""
    return _ERRNO_STATUS.get(errno, grpc.StatusCode.FAILED_PRECONDITION)


def block_pb(vm: GuestVm, block: MemoryBlock) -> guest_pb2.MemoryBlock:
    files = block_files(vm.mm, block)
    return guest_pb2.MemoryBlock(
        index=block.id,
        state=block.state,
        zone=block.zone or "",
        valid_zones=vm.mm.valid_zones(block),
        node=block.nid,
        removable=files["removable"] == "1\n",
    )


def guest_memory_pb(vm: GuestVm, trace: Iterable[str] = ()) -> guest_pb2.GuestMemory:
    """The whole ``GetMemory`` answer; ``trace`` (recent events) goes with each violation."""
    mm, driver = vm.mm, vm.driver
    recent = list(trace)
    c = driver.counters
    return guest_pb2.GuestMemory(
        vm_id=vm.config.vm_id,
        block_size_bytes=mm.geometry.block_size_bytes,
        auto_online_blocks=mm.auto_online_blocks,
        blocks=[block_pb(vm, mm.blocks[i]) for i in sorted(mm.blocks)],
        meminfo=mm.meminfo(),
        counters=guest_pb2.DriverCounters(
            num_pages_added=c.num_pages_added,
            num_pages_onlined=c.num_pages_onlined,
            num_pages_ballooned=c.num_pages_ballooned,
        ),
        regions=[
            guest_pb2.HotAddState(
                start_pfn=has.start_pfn,
                end_pfn=has.end_pfn,
                ha_end_pfn=has.ha_end_pfn,
                covered_start_pfn=has.covered_start_pfn,
                covered_end_pfn=has.covered_end_pfn,
                gaps=[guest_pb2.Gap(start_pfn=s, end_pfn=e) for s, e in has.gaps],
            )
            for has in driver.ha_regions
        ],
        # The same counts as the scenario result's ``pages`` (memhp/scenario/result.py).
        pages=guest_pb2.PageCounts(
            buddy=mm.count_pages(BUDDY),
            allocated=mm.count_pages(ALLOCATED),
            page_offline=mm.count_pages(PAGE_OFFLINE),
            ballooned=mm.count_pages(PAGE_OFFLINE, OWNER_BALLOON),
            reserved=mm.count_pages(RESERVED),
        ),
        violations=[
            guest_pb2.Violation(
                invariant=f.invariant,
                pfn_start=f.start_pfn,
                pfn_end=f.end_pfn,
                message=f.message,
                trace=recent,
            )
            for f in check_guest(mm, driver, None)
        ],
        strategy=vm.config.strategy,
        driver_mode=vm.config.driver_mode,
        dm_state=driver.state,
    )


async def set_block_state(vm: GuestVm, index: int, value: str) -> MemoryBlock:
    """``echo value > memory<index>/state``, waiting out a held ``mem_hotplug_lock``.

    Raises :class:`MemoryHotplugError` like the write would fail.
    """
    while True:
        try:
            sysfs_state_write(vm.mm, index, value)
        except HotplugLockBusy:
            await asyncio.sleep(LOCK_POLL_SECONDS)
            continue
        return vm.mm.blocks[index]


class GuestIntrospection(guest_pb2_grpc.GuestIntrospectionServicer):
    """The servicer; ``get_vm`` gives the guest once the first attach built it."""

    def __init__(
        self,
        get_vm: Callable[[], GuestVm | None],
        *,
        trace: Callable[[], Iterable[str]] = tuple,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._get_vm = get_vm
        self._trace = trace
        self._on_change = on_change

    async def _vm(self, context: grpc.aio.ServicerContext[Any, Any]) -> GuestVm:
        vm = self._get_vm()
        if vm is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the guest has no memory layout yet: it has not attached to the hypervisor",
            )
        return vm

    async def GetMemory(
        self,
        request: guest_pb2.GetMemoryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> guest_pb2.GuestMemory:
        vm = await self._vm(context)
        return guest_memory_pb(vm, self._trace())

    async def SetBlockState(
        self,
        request: guest_pb2.SetBlockStateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> guest_pb2.MemoryBlock:
        vm = await self._vm(context)
        before = vm.mm.blocks.get(request.index)
        old_state = before.state if before is not None else None
        try:
            block = await set_block_state(vm, request.index, request.state)
        except MemoryHotplugError as err:
            log.info(
                "block_state_write_failed",
                block=request.index,
                value=request.state,
                errno=err.name,
                reason=err.message,
            )
            await context.abort(
                errno_status(err.errno),
                f"memory{request.index}/state: write {request.state!r} failed with "
                f"-{err.name}: {err.message}",
            )
        self._on_change()
        log.info(
            "block_state_written",
            block=block.id,
            value=request.state,
            old_state=old_state,
            state=block.state,
            zone=block.zone,
        )
        return block_pb(vm, block)
