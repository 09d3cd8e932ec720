"""The ``Control`` gRPC service: the operator's plane over :class:`hypervisor.runtime.Hypervisor`.

Bytes come in (what an operator types), pages go to the session. Every refusal is a
gRPC status with a message ``field: rule`` that names the proto field: a
:class:`HostCommandError` from the session is mapped from its page-named argument to
the RPC's byte-named field, with its code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Final, NoReturn

import grpc
from google.protobuf import struct_pb2

from hypervisor.dm_host import DmHostSession
from hypervisor.errors import HostCommandError
from hypervisor.policy import DynamicPolicy, ManualPolicy, TargetPolicy, make_dynamic
from hypervisor.runtime import Hypervisor, PublishedEvent, ServiceError, VmHandle
from hypervisor.vm import (
    DEFAULT_VIRTIO_MEM_BLOCK,
    HYPERV_DM,
    MIN_BLOCK_PAGES,
    PROTOCOLS,
    VIRTIO_MEM,
    VirtioMemSettings,
    VmConfig,
    default_virtio_mem_addr,
)
from memhp import dm
from memhp.units import PAGE_SHIFT, PAGE_SIZE
from memhp.v1 import control_pb2, control_pb2_grpc, dm_pb2

#: The Event schema version (README: events).
EVENT_VERSION: Final = 1

STATUS: Final[dict[str, grpc.StatusCode]] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
}

#: Session argument -> proto field, per command.
_SET_TARGET_FIELDS: Final = {"pages": "requested_bytes"}
_HOT_ADD_FIELDS: Final = {
    "region_pages": "region_bytes",
    "backed_pages": "backed_bytes",
    "offset_pages": "offset_bytes",
    "count": "count",
}
# "region": no region to back (or the newest takes no more): the VM is to blame.
_BACK_FIELDS: Final = {
    "pages": "size_bytes",
    "start_page": "start_page",
    "region": "vm_id",
    "remaining": "remaining",
}
_SIZE_FIELDS: Final = {"pages": "size_bytes"}
_POLICY_FIELDS: Final = {
    "buffer_percent": "buffer_percent",
    "minimum_pages": "minimum_bytes",
    "maximum_pages": "maximum_bytes",
}
_SPEC_FIELDS: Final = {
    "vm_id": "vm_id",
    "boot_pages": "boot_bytes",
    "max_pages": "max_bytes",
    "block_pages": "block_size_bytes",
    "protocol": "protocol",
    "virtio_mem": "virtio_mem",
    "virtio_mem.addr": "virtio_mem.addr",
}
#: The device's names (QEMU's) -> ResizeRequest fields.
_RESIZE_FIELDS: Final = {"requested_size": "requested_bytes"}

Context = grpc.aio.ServicerContext[Any, Any]


def _pages(field: str, value: int, *, positive: bool = True) -> int:
    if value % PAGE_SIZE:
        raise ServiceError(
            "invalid_argument", field, f"{value} is not a multiple of the 4 KiB page size"
        )
    if positive and value == 0:
        raise ServiceError("invalid_argument", field, "must be > 0")
    return value >> PAGE_SHIFT


def _host_error(err: HostCommandError, fields: Mapping[str, str]) -> ServiceError:
    return ServiceError(err.code, fields.get(err.field, err.field), err.message)


def config_from_spec(spec: control_pb2.VmSpec) -> VmConfig:
    """A VmConfig from a VmSpec; ServiceError naming the proto field when it does not fit.

    The virtio-mem device's own rules (QEMU's realize) are checked when the VM's device
    is made (:meth:`hypervisor.runtime.Hypervisor.create_vm`).
    """
    protocol = spec.protocol or HYPERV_DM
    if protocol not in PROTOCOLS:
        raise ServiceError(
            "invalid_argument",
            "protocol",
            f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}",
        )
    block = spec.block_size_bytes or MIN_BLOCK_PAGES << PAGE_SHIFT
    boot = _pages("boot_bytes", spec.boot_bytes)
    virtio = protocol == VIRTIO_MEM
    max_bytes = spec.max_bytes or (spec.boot_bytes if virtio else 0)
    max_pages = _pages("max_bytes", max_bytes)
    block_pages = _pages("block_size_bytes", block)
    settings: VirtioMemSettings | None = None
    if spec.HasField("virtio_mem") and not virtio:
        raise ServiceError(
            "invalid_argument", "virtio_mem", f"only with protocol {VIRTIO_MEM}, not {protocol}"
        )
    if virtio:
        if not spec.HasField("virtio_mem"):
            raise ServiceError(
                "invalid_argument", "virtio_mem", f"required with protocol {VIRTIO_MEM}"
            )
        v = spec.virtio_mem
        if not v.region_size_bytes:
            raise ServiceError("invalid_argument", "virtio_mem.region_size_bytes", "required, > 0")
        device_block = v.block_size_bytes or DEFAULT_VIRTIO_MEM_BLOCK
        addr = (
            v.addr
            if v.HasField("addr")
            else default_virtio_mem_addr(max_bytes, block, device_block)
        )
        settings = VirtioMemSettings(
            region_size=v.region_size_bytes,
            addr=addr,
            block_size=device_block,
            requested=v.requested_bytes,
            node_id=v.node_id,
        )
        if v.node_id > 0xFFFF:
            raise ServiceError(
                "invalid_argument", "virtio_mem.node_id", f"must fit 16 bits, got {v.node_id}"
            )
    try:
        return VmConfig(spec.vm_id, boot, max_pages, block_pages, protocol, settings)
    except ValueError as err:
        name, _, rule = str(err).partition(" ")
        raise ServiceError(
            "invalid_argument", _SPEC_FIELDS.get(name, "spec"), rule or str(err)
        ) from None


def spec_to_pb(cfg: VmConfig) -> control_pb2.VmSpec:
    spec = control_pb2.VmSpec(
        vm_id=cfg.vm_id,
        boot_bytes=cfg.boot_pages << PAGE_SHIFT,
        max_bytes=cfg.max_pages << PAGE_SHIFT,
        block_size_bytes=cfg.block_pages << PAGE_SHIFT,
        protocol=cfg.protocol,
    )
    v = cfg.virtio_mem
    if v is not None:
        spec.virtio_mem.CopyFrom(
            control_pb2.VirtioMemSpec(
                region_size_bytes=v.region_size,
                block_size_bytes=v.block_size,
                requested_bytes=v.requested,
                addr=v.addr,
                node_id=v.node_id,
            )
        )
    return spec


def virtio_mem_info(handle: VmHandle, *, full: bool) -> control_pb2.VirtioMemInfo | None:
    device = handle.device
    if device is None:
        return None
    info = control_pb2.VirtioMemInfo(
        requested_bytes=device.requested_size,
        plugged_bytes=device.plugged_size,
        block_size_bytes=device.block_size,
        region_size_bytes=device.region_size,
        usable_region_size_bytes=device.usable_region_size,
        addr=device.addr,
        node_id=device.node_id,
        answered=device.answered,
        protocol_errors=len(device.protocol_errors),
        violations=len(device.violations),
    )
    if full:
        info.plugged.extend(ranges_to_pb(device.plugged.ranges()))
    return info


def policy_to_pb(policy: TargetPolicy) -> control_pb2.Policy:
    if isinstance(policy, DynamicPolicy):
        return control_pb2.Policy(
            dynamic=control_pb2.DynamicPolicy(
                buffer_percent=policy.buffer_percent,
                minimum_bytes=policy.minimum_pages << PAGE_SHIFT,
                maximum_bytes=policy.maximum_pages << PAGE_SHIFT,
            )
        )
    return control_pb2.Policy(manual=control_pb2.ManualPolicy())


#: The most pages one ``PageRange`` of the Control service carries (its page_cnt is 32 bits).
_PB_RANGE_MAX_PAGES: Final = (1 << 32) - 1


def ranges_to_pb(ranges: Iterable[tuple[int, int]]) -> list[dm_pb2.PageRange]:
    """``[start, end)`` page ranges as ``PageRange`` messages (long ones split)."""
    out: list[dm_pb2.PageRange] = []
    for start, end in ranges:
        while start < end:
            count = min(end - start, _PB_RANGE_MAX_PAGES)
            out.append(dm_pb2.PageRange(start_page=start, page_cnt=count))
            start += count
    return out


def vm_to_pb(handle: VmHandle, *, full: bool = True) -> control_pb2.Vm:
    """The ``Vm`` message (control.proto documents every field).

    ``full=False`` is the summary that commands and ListVms answer with: no regions and
    no page ranges, so its cost does not grow with the VM (GetVm gives everything).
    """
    cfg, s = handle.config, handle.session
    vm = control_pb2.Vm(
        spec=spec_to_pb(cfg),
        attached=handle.attached,
        dm_state="" if cfg.is_virtio_mem else s.state,
        requested_bytes=(s.target_pages or 0) << PAGE_SHIFT,
        actual_bytes=s.current_pages << PAGE_SHIFT,
        committed_bytes=(s.committed_pages or 0) << PAGE_SHIFT,
        available_bytes=(s.available_pages or 0) << PAGE_SHIFT,
        ballooned_bytes=len(s.ballooned) << PAGE_SHIFT,
        policy=policy_to_pb(handle.policy),
        protocol_version=s.version or 0,
        hot_add_disabled=s.hot_add_disabled,
        queued_commands=len(s.queued),
        busy=s.busy,
        requested_set=s.target_pages is not None,
        frames_received=handle.frames_received,
        frames_sent=handle.frames_sent,
        violation_events=handle.violation_events,
        guest_address=handle.guest_address,
        transactions=round_trips_pb(handle),
    )
    if full:
        vm.backed.extend(ranges_to_pb(s.backed.ranges()))
        vm.ballooned.extend(ranges_to_pb(s.ballooned.ranges()))
    for region in s.regions if full else ():
        vm.regions.add(
            start_page=region.start,
            page_count=region.size,
            backed=[
                dm_pb2.PageRange(start_page=a, page_cnt=b - a) for a, b in region.backed.ranges()
            ],
            added_pages=region.added_pages,
            unusable=region.unusable,
        )
    info = virtio_mem_info(handle, full=full)
    if info is not None:
        vm.virtio_mem.CopyFrom(info)
    txn = s.in_flight
    if txn is not None:
        vm.in_flight.CopyFrom(
            control_pb2.Transaction(
                kind=txn.kind, trans_id=txn.trans_id, pages=txn.pages, description=txn.describe()
            )
        )
    return vm


def round_trips_pb(handle: VmHandle) -> control_pb2.TransactionStats:
    trips = handle.round_trips
    return control_pb2.TransactionStats(
        completed=trips.completed,
        window=len(trips.recent),
        p50_ms=trips.percentile(50) * 1e3,
        p99_ms=trips.percentile(99) * 1e3,
        max_ms=trips.percentile(100) * 1e3,
    )


def event_to_pb(event: PublishedEvent) -> control_pb2.Event:
    payload = struct_pb2.Struct()
    data: Any = event.payload
    payload.update(data)
    return control_pb2.Event(
        version=EVENT_VERSION,
        timestamp=event.timestamp,
        vm_id=event.vm_id,
        kind=event.kind,
        payload=payload,
        source=event.source,
    )


async def _abort(context: Context, err: ServiceError) -> NoReturn:
    await context.abort(STATUS[err.code], f"{err.field}: {err.message}")
    raise AssertionError("unreachable")  # context.abort raises


class ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor

    async def CreateVm(
        self, request: control_pb2.CreateVmRequest, context: Context
    ) -> control_pb2.Vm:
        try:
            if not request.HasField("spec"):
                raise ServiceError("invalid_argument", "spec", "required")
            handle = self.hv.create_vm(config_from_spec(request.spec))
        except ServiceError as err:
            await _abort(context, err)
        return vm_to_pb(handle)

    async def ListVms(
        self, request: control_pb2.ListVmsRequest, context: Context
    ) -> control_pb2.ListVmsResponse:
        return control_pb2.ListVmsResponse(
            vms=[vm_to_pb(h, full=False) for h in self.hv.vms.values()]
        )

    async def GetVm(self, request: control_pb2.GetVmRequest, context: Context) -> control_pb2.Vm:
        try:
            return vm_to_pb(self.hv.get(request.vm_id))
        except ServiceError as err:
            await _abort(context, err)

    async def _command(
        self,
        context: Context,
        vm_id: str,
        fields: Mapping[str, str],
        prepare: Callable[[], Callable[[DmHostSession, float], list[dm.DmMessage]]],
    ) -> control_pb2.Vm:
        try:
            self.hv.get(vm_id)
            run = prepare()  # byte-level checks, before the VM's attach state
            handle = self.hv.command(vm_id, run)
        except HostCommandError as err:
            await _abort(context, _host_error(err, fields))
        except ServiceError as err:
            await _abort(context, err)
        return vm_to_pb(handle, full=False)

    async def SetTarget(
        self, request: control_pb2.SetTargetRequest, context: Context
    ) -> control_pb2.Vm:
        def prepare() -> Callable[[DmHostSession, float], list[dm.DmMessage]]:
            pages = _pages("requested_bytes", request.requested_bytes, positive=False)
            return lambda s, now: s.set_target(pages, now)

        return await self._command(context, request.vm_id, _SET_TARGET_FIELDS, prepare)

    async def HotAdd(self, request: control_pb2.HotAddCommand, context: Context) -> control_pb2.Vm:
        def prepare() -> Callable[[DmHostSession, float], list[dm.DmMessage]]:
            region = _pages("region_bytes", request.region_bytes)
            backed = _pages("backed_bytes", request.backed_bytes)
            offset = _pages("offset_bytes", request.offset_bytes, positive=False)
            if backed > region:
                raise ServiceError(
                    "invalid_argument",
                    "backed_bytes",
                    f"{request.backed_bytes} exceeds region_bytes {request.region_bytes}",
                )
            if offset + backed > region:
                raise ServiceError(
                    "invalid_argument",
                    "offset_bytes",
                    f"offset {request.offset_bytes} + backed {request.backed_bytes} runs past "
                    f"region_bytes {request.region_bytes}",
                )
            with_region = not request.range_only
            count = request.count or 1
            return lambda s, now: s.hot_add(
                region, backed, now, offset_pages=offset, with_region=with_region, count=count
            )

        return await self._command(context, request.vm_id, _HOT_ADD_FIELDS, prepare)

    async def Back(self, request: control_pb2.BackCommand, context: Context) -> control_pb2.Vm:
        def prepare() -> Callable[[DmHostSession, float], list[dm.DmMessage]]:
            if request.remaining:
                if request.size_bytes or request.HasField("start_page"):
                    raise ServiceError(
                        "invalid_argument",
                        "remaining",
                        "backs everything left: leave size_bytes and start_page unset",
                    )
                return lambda s, now: s.back_remaining(now)
            pages = _pages("size_bytes", request.size_bytes)
            start = request.start_page if request.HasField("start_page") else None
            return lambda s, now: s.back(pages, now, start_page=start)

        return await self._command(context, request.vm_id, _BACK_FIELDS, prepare)

    async def Balloon(
        self, request: control_pb2.BalloonCommand, context: Context
    ) -> control_pb2.Vm:
        def prepare() -> Callable[[DmHostSession, float], list[dm.DmMessage]]:
            pages = _pages("size_bytes", request.size_bytes)
            return lambda s, now: s.balloon(pages, now)

        return await self._command(context, request.vm_id, _SIZE_FIELDS, prepare)

    async def Unballoon(
        self, request: control_pb2.UnballoonCommand, context: Context
    ) -> control_pb2.Vm:
        def prepare() -> Callable[[DmHostSession, float], list[dm.DmMessage]]:
            pages = _pages("size_bytes", request.size_bytes)
            return lambda s, now: s.unballoon(pages, now)

        return await self._command(context, request.vm_id, _SIZE_FIELDS, prepare)

    async def SetPolicy(
        self, request: control_pb2.SetPolicyRequest, context: Context
    ) -> control_pb2.Vm:
        try:
            handle = self.hv.get(request.vm_id)
            which = request.policy.WhichOneof("policy")
            policy: TargetPolicy
            if which == "manual":
                policy = ManualPolicy()
            elif which == "dynamic":
                d = request.policy.dynamic
                try:
                    policy = make_dynamic(
                        handle.config,
                        d.buffer_percent,
                        _pages("minimum_bytes", d.minimum_bytes, positive=False),
                        _pages("maximum_bytes", d.maximum_bytes, positive=False),
                    )
                except HostCommandError as err:
                    raise _host_error(err, _POLICY_FIELDS) from None
            else:
                raise ServiceError("invalid_argument", "policy", "must be manual or dynamic")
            handle = self.hv.set_policy(request.vm_id, policy)
        except ServiceError as err:
            await _abort(context, err)
        return vm_to_pb(handle)

    async def Resize(self, request: control_pb2.ResizeRequest, context: Context) -> control_pb2.Vm:
        try:
            handle = self.hv.resize(request.vm_id, request.requested_bytes)
        except HostCommandError as err:
            await _abort(context, _host_error(err, _RESIZE_FIELDS))
        except ServiceError as err:
            await _abort(context, err)
        return vm_to_pb(handle, full=False)

    async def WatchEvents(
        self, request: control_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[control_pb2.Event]:
        sub = self.hv.events.subscribe(request.vm_ids, request.kinds)
        try:
            # The watcher knows it is subscribed once the headers arrive.
            await context.send_initial_metadata(())
            while True:
                event = await sub.queue.get()
                if sub.overflowed:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"watcher fell more than {sub.queue.maxsize} events behind",
                    )
                if event is None or sub.closed:
                    return
                yield event_to_pb(event)
        finally:
            self.hv.events.unsubscribe(sub)
