"""The guest agent's ``GuestIntrospection`` and ``GuestControl`` services over gRPC.

``GetMemory`` answers what ``/sys/devices/system/memory``, ``/proc/meminfo`` and the
driver's ``hv_hotadd_state`` list would show, plus page counts, the invariant findings
(:func:`guest.invariants.check_guest`: guest-only, or against the host's ground truth
when the request carries it), whether driver work is pending and how far the DM stream
is. ``SetBlockState`` is ``echo VALUE > memoryN/state`` with the kernel's
semantics (:func:`guest.sysfs.sysfs_state_write`, through :meth:`GuestVm.write_block_state`
so the block event names the online type); its errno becomes a gRPC status:

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
syscall) and then applies; so does one a virtio-mem work holds its ``hotplug_mutex``
over (the kernel's writer blocks in the driver's memory notifier). Everything runs on
the agent's event loop, so the model is never read while it changes.

``GuestControl``, served next to it, is what a process in the guest does (``memhp
scenario run --processes`` uses it for its allocate, free, inject and dump steps):
allocate (now, or armed for the next onlining window), free by tag, notifier-error and
slow-onlining injection, and a dump walk. A bad argument is INVALID_ARGUMENT, a
failure with an errno maps as above; the status message is the guest's error text.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import grpc

from extents import RangeSet
from guest.agent import agent_of
from guest.blockmap import block_cell
from guest.drivers.virtio_mem import VirtioMem
from guest.invariants import check_guest
from guest.mm.dump import walk_dump
from guest.mm.errors import MemoryHotplugError
from guest.mm.memory import HotplugLockBusy, MemoryBlock
from guest.mm.pages import ALLOCATED, BUDDY, OWNER_BALLOON, PAGE_OFFLINE, RESERVED
from guest.sysfs import block_files
from guest.virtio_mem_invariants import check_virtio_mem
from guest.vm import GuestVm
from memhp.logs import get_logger
from memhp.units import PAGE_SHIFT
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


#: How a failed write reads in the status message: ``... failed with -EINVAL: reason``.
_WRITE_FAILED = re.compile(r" failed with -(?P<name>E[A-Z0-9]+): (?P<reason>.*)\Z", re.DOTALL)

Context = grpc.aio.ServicerContext[Any, Any]


def errno_status(errno: int) -> grpc.StatusCode:
    """The gRPC status a failed sysfs write answers with."""
    return _ERRNO_STATUS.get(errno, grpc.StatusCode.FAILED_PRECONDITION)


def write_failure(details: str) -> tuple[str, str] | None:
    """(errno name, reason) of a failed ``SetBlockState`` status message, or None."""
    match = _WRITE_FAILED.search(details)
    return None if match is None else (match["name"], match["reason"])


def range_set(ranges: Iterable[guest_pb2.PfnRange]) -> RangeSet:
    out = RangeSet()
    for r in ranges:
        if r.end_pfn > r.start_pfn:
            out.add(r.start_pfn, r.end_pfn)
    return out


def pfn_ranges(ranges: Iterable[tuple[int, int]]) -> list[guest_pb2.PfnRange]:
    return [guest_pb2.PfnRange(start_pfn=s, end_pfn=e) for s, e in ranges]


def block_pb(vm: GuestVm, block: MemoryBlock) -> guest_pb2.MemoryBlock:
    files = block_files(vm.mm, block)
    cell = block_cell(vm.mm, block)
    return guest_pb2.MemoryBlock(
        page_offline=cell.page_offline,
        ballooned=cell.ballooned,
        cell=cell.cell,
        index=block.id,
        state=block.state,
        zone=block.zone or "",
        valid_zones=vm.mm.valid_zones(block),
        node=block.nid,
        removable=files["removable"] == "1\n",
    )


def guest_memory_pb(
    vm: GuestVm,
    trace: Iterable[str] = (),
    request: guest_pb2.GetMemoryRequest | None = None,
) -> guest_pb2.GuestMemory:
    """The whole ``GetMemory`` answer; ``trace`` (recent events) goes with each violation.

    With ``request.host_truth`` the invariants are checked against the host's backed and
    offered pages, as the in-process scenario runner checks them.
    """
    mm, driver = vm.mm, vm.hv_balloon
    recent = list(trace)
    backed: RangeSet | None = None
    offered: RangeSet | None = None
    if request is not None and request.host_truth:
        backed = range_set(request.host_backed)
        offered = range_set(request.host_offered)
    agent = agent_of(vm)
    stats = None if agent is None else agent.link_stats()
    findings = check_guest(mm, driver, None if driver is None else backed, offered)
    for vdriver in vm.virtio_mem:
        # For a virtio-mem guest host_backed is the device's plugged memory.
        plugged = None
        plugged_size = None
        if backed is not None:
            plugged = RangeSet()
            for s, e in backed.ranges():
                s, e = max(s, vdriver.start_pfn), min(e, vdriver.end_pfn)
                if s < e:
                    plugged.add(s, e)
            plugged_size = len(plugged) << PAGE_SHIFT
        findings += check_virtio_mem(mm, vdriver, plugged, plugged_size)
    memory = guest_pb2.GuestMemory(
        vm_id=vm.config.vm_id,
        block_size_bytes=mm.geometry.block_size_bytes,
        auto_online_blocks=mm.auto_online_blocks,
        blocks=[block_pb(vm, mm.blocks[i]) for i in sorted(mm.blocks)],
        meminfo=mm.meminfo(),
        counters=guest_pb2.DriverCounters(
            num_pages_added=0 if driver is None else driver.counters.num_pages_added,
            num_pages_onlined=0 if driver is None else driver.counters.num_pages_onlined,
            num_pages_ballooned=0 if driver is None else driver.counters.num_pages_ballooned,
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
            for has in (driver.ha_regions if driver is not None else ())
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
            for f in findings
        ],
        strategy=vm.config.strategy,
        driver_mode=vm.config.driver_mode,
        dm_state="" if driver is None else driver.state,
        busy=vm.busy,
        unsent_messages=(
            stats.unsent_messages
            if stats is not None
            else len(driver.outbox)
            if driver is not None
            else sum(len(d.outbox) for d in vm.virtio_mem)
        ),
        frames_sent=0 if stats is None else stats.frames_sent,
        frames_received=0 if stats is None else stats.frames_received,
    )
    if vm.virtio_mem:
        memory.virtio_mem.CopyFrom(virtio_mem_pb(vm.virtio_mem[0]))
    return memory


def virtio_mem_pb(driver: VirtioMem) -> guest_pb2.GuestVirtioMem:
    """The ``virtio_mem`` driver's state (memhp/scenario/result.py's ``driver`` view)."""
    unit = driver.sb_size if driver.in_sbm else driver.bb_size
    return guest_pb2.GuestVirtioMem(
        mode=driver.mode,
        probed=driver.probed,
        broken=driver.broken,
        requested_size=driver.requested_size,
        plugged_size=driver.plugged_size,
        unit_size=unit,
        offline_size=driver.offline_size,
        offline_threshold=driver.offline_threshold,
        retry_timer_armed=driver.retry_timer_deadline is not None,
        retry_timer_ms=driver.retry_timer_ms,
        busy=driver.busy or driver.request_in_flight is not None,
        blocks=[
            guest_pb2.VirtioMemBlock(
                id=block, state=state, plugged_pages=driver.block_plugged_pages(block)
            )
            for block, state in driver.block_states().items()
        ],
    )


async def set_block_state(vm: GuestVm, index: int, value: str) -> MemoryBlock:
    """``echo value > memory<index>/state``, waiting out a held ``mem_hotplug_lock`` or
    a virtio-mem work's ``hotplug_mutex`` over the block (where the kernel's writer blocks).

    Raises :class:`MemoryHotplugError` like the write would fail.
    """
    while True:
        try:
            vm.write_block_state(index, value)
        except HotplugLockBusy:
            await asyncio.sleep(LOCK_POLL_SECONDS)
            continue
        return vm.mm.blocks[index]


async def _guest(
    get_vm: Callable[[], GuestVm | None],
    context: Context,
    *,
    change: Callable[[], None] | None = None,
) -> GuestVm:
    """The guest, or UNAVAILABLE before the first attach built it.

    With ``change`` (a write is coming) the guest's clock is brought to now first and the
    agent woken (``change`` is its wake-up).
    """
    vm = get_vm()
    if vm is None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the guest has no memory layout yet: it has not attached to the hypervisor",
        )
    if change is not None:
        agent = agent_of(vm)
        if agent is not None:
            agent.catch_up()
            change()
    return vm


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

    async def _vm(self, context: Context, *, change: bool = False) -> GuestVm:
        return await _guest(self._get_vm, context, change=self._on_change if change else None)

    async def GetMemory(
        self,
        request: guest_pb2.GetMemoryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> guest_pb2.GuestMemory:
        vm = await self._vm(context)
        return guest_memory_pb(vm, self._trace(), request)

    async def SetBlockState(
        self,
        request: guest_pb2.SetBlockStateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> guest_pb2.MemoryBlock:
        vm = await self._vm(context, change=True)
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


class GuestControl(guest_pb2_grpc.GuestControlServicer):
    """What a process in the guest does: allocate, free, inject faults, walk a dump.

    ``get_vm`` and ``on_change`` as for :class:`GuestIntrospection`.
    """

    def __init__(
        self,
        get_vm: Callable[[], GuestVm | None],
        *,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._get_vm = get_vm
        self._on_change = on_change

    async def _vm(self, context: Context, *, change: bool = False) -> GuestVm:
        return await _guest(self._get_vm, context, change=self._on_change if change else None)

    async def _failed(self, context: Context, what: str, err: Exception) -> NoReturn:
        log.info("guest_call_failed", call=what, error=str(err))
        code = (
            errno_status(err.errno)
            if isinstance(err, MemoryHotplugError)
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        await context.abort(code, str(err))
        raise AssertionError("unreachable")  # context.abort raises

    async def Allocate(
        self, request: guest_pb2.AllocateRequest, context: Context
    ) -> guest_pb2.AllocateResponse:
        vm = await self._vm(context, change=True)
        try:
            got = vm.allocate(
                request.pages,
                order=request.order,
                zone=request.zone or "Normal",
                tag=request.tag or "workload",
                movable=request.movable if request.HasField("movable") else None,
            )
        except (ValueError, MemoryHotplugError) as err:
            await self._failed(context, "Allocate", err)
        self._on_change()
        return guest_pb2.AllocateResponse(allocated_pages=got)

    async def AllocateInWindow(
        self, request: guest_pb2.AllocateInWindowRequest, context: Context
    ) -> guest_pb2.AllocateInWindowResponse:
        vm = await self._vm(context, change=True)
        try:
            vm.allocate_in_window(
                request.pages,
                order=request.order,
                zone=request.zone or "Normal",
                tag=request.tag or "workload",
                block=request.block if request.HasField("block") else None,
            )
        except (ValueError, MemoryHotplugError) as err:
            await self._failed(context, "AllocateInWindow", err)
        return guest_pb2.AllocateInWindowResponse()

    async def Free(
        self, request: guest_pb2.FreeRequest, context: Context
    ) -> guest_pb2.FreeResponse:
        vm = await self._vm(context, change=True)
        try:
            freed = vm.free(request.tag, request.pages if request.HasField("pages") else None)
        except (ValueError, MemoryHotplugError) as err:
            await self._failed(context, "Free", err)
        self._on_change()
        return guest_pb2.FreeResponse(freed_pages=freed)

    async def InjectNotifierError(
        self, request: guest_pb2.InjectNotifierErrorRequest, context: Context
    ) -> guest_pb2.InjectResponse:
        vm = await self._vm(context, change=True)
        try:
            if not -4095 <= request.errno <= -1:
                raise ValueError(
                    f"errno: must be a negative errno in [-4095, -1], not {request.errno}"
                )
            vm.inject_notifier_error(
                request.action, request.errno, request.count if request.HasField("count") else None
            )
        except ValueError as err:
            await self._failed(context, "InjectNotifierError", err)
        return guest_pb2.InjectResponse()

    async def InjectSlowOnlining(
        self, request: guest_pb2.InjectSlowOnliningRequest, context: Context
    ) -> guest_pb2.InjectResponse:
        vm = await self._vm(context, change=True)
        if not (math.isfinite(request.seconds) and request.seconds >= 0):
            await self._failed(
                context,
                "InjectSlowOnlining",
                ValueError(f"seconds: must be a finite number >= 0, not {request.seconds}"),
            )
        vm.inject_slow_onlining(
            request.seconds, request.count if request.HasField("count") else None
        )
        return guest_pb2.InjectResponse()

    async def Dump(
        self, request: guest_pb2.DumpRequest, context: Context
    ) -> guest_pb2.DumpResponse:
        vm = await self._vm(context)
        backed = range_set(request.host_backed) if request.host_truth else None
        report = walk_dump(vm.mm, backed, skip_free=request.skip_free)
        return guest_pb2.DumpResponse(
            pages_read=report.pages_read,
            pages_skipped_offline=report.pages_skipped_offline,
            pages_skipped_free=report.pages_skipped_free,
            unbacked_read=pfn_ranges(report.unbacked_read),
        )
