"""The guest agent: one :class:`guest.vm.GuestVm` driven in real time over the DM stream.

The guest is sans-I/O; this is its process adapter. It dials the hypervisor's
``DynamicMemory.Connect`` (through a :class:`Transport`, so tests can swap the gRPC
stream for an in-process fake, as httpx swaps transports), sends ``attach``, waits
for ``attached`` and only then builds the guest from the layout the hypervisor owns
plus the agent's own options. From then on two tasks share the guest:

* the **pump** runs the guest's scheduler on the real clock (``run_until(monotonic
  - t0)``), sends what the driver put in its outbox, keeps the optional sysfs tree
  current, and sleeps until the guest's next timer, the access-batch deadline or a
  wake-up (a frame arrived, an introspection write changed the model);
* the **connection loop** reads frames and hands them to ``deliver()``; when the
  stream breaks it reconnects with exponential backoff (0.1 s doubling to 5 s,
  jittered) and reattaches with a ``GuestMemoryState`` (the regions it holds,
  ``pages_added``, ballooned ranges), and the driver renegotiates on the new stream.

The guest itself lives across reconnects: its clock, memory, workload and udev keep
running while the stream is down. What the driver sends while there is no stream is
dropped (a channel message has no meaning on the next channel), except access
reports, which describe memory and wait for the next stream. Access reports are
coalesced for ``access_batch`` seconds (per kind, as merged page ranges) but never
overtake another message: a pending batch goes out before anything else is sent, so
the host sees accesses in the order they happened relative to the protocol.

A host ``error`` with action ``reset`` makes the driver renegotiate on the same
stream (:meth:`guest.vm.GuestVm.renegotiate`); ``close`` is followed by the host
ending the stream, and the agent reconnects.

With ``protocol="virtio-mem"`` the same loop, backoff and pump run over the
``VirtioMem.Connect`` stream of the guest's one virtio-mem device instead: ``attached``
carries the layout and the device's config space (the guest attaches the device with
it and probes), the driver's requests go out as ``request``, each ``response`` is
delivered with the config it carries, ``config_changed`` is the config interrupt, and
page accesses in device memory go out as ``access`` (batched like the DM ones). A
request left unanswered when the stream broke is sent again on the new stream (the
virtqueue outlives a transport hiccup; the host answers in order, and replays its ACK
when it had applied the request and only the answer was lost). There is no
reconcile: the device keeps what is plugged, the driver what it holds.

A device message that cannot be one is not waited on: a ``response`` whose type, state
or config does not parse is delivered as ERROR (with the config the driver read last),
a failed request: after a PLUG or UNPLUG the driver marks the device broken, as for the
device's own ERROR (the kernel reads an unknown type as -ENOMEM and retries, but the
request may have been applied; a device that answers garbage gets no more). A config
that does not parse (in ``attached`` or ``config_changed``) breaks the stream: the
agent reconnects and reads the config afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import grpc
import structlog

from extents import RangeSet
from guest.mm.errors import MemoryHotplugError
from guest.mm.memory import MMOP_OFFLINE, MemoryBlock
from guest.mm.notifier import NOTIFY_OK, MemoryAction, MemoryNotify
from guest.mm.pages import OWNER_BALLOON, PAGE_OFFLINE
from guest.sysfs import write_sysfs_tree
from guest.vm import HYPERV_DM, VIRTIO_MEM, GuestConfig, GuestVm
from guest.workload import Workload, WorkloadSpec
from memhp import dm
from memhp import virtio_mem as vmem
from memhp.logs import get_logger, logs_at
from memhp.units import PAGE_SIZE
from memhp.v1 import dm_pb2, dm_pb2_grpc, virtio_mem_pb2, virtio_mem_pb2_grpc
from memhp.wire import from_frame, range_to_pb, to_frame

#: Seconds the hypervisor has to answer ``attach``.
ATTACH_TIMEOUT = 10.0
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
#: The sysfs tree is rewritten at most this often (seconds).
SYSFS_MIN_INTERVAL = 0.1
#: Recent guest events kept for the trace of a violation.
TRACE_EVENTS = 64
#: Statuses a reconnect cannot fix: the agent exits instead.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)

#: Guest events logged at info (the rest at debug); the first group at warning.
_WARN_EVENTS = frozenset(
    {"probe_failed", "driver_violation", "online_failed", "offline_failed", "workload_short"}
)
_INFO_EVENTS = frozenset(
    {
        "negotiated",
        "renegotiate",
        "hot_add_done",
        "hot_add_stale",
        "balloon_done",
        "balloon_stale",
        "block_added",
        "block_onlined",
        "block_offlined",
        "workload_caught_up",
        "log",
    }
)


class LinkClosed(Exception):
    """The DM stream ended or broke; ``code`` is the gRPC status when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class AgentError(Exception):
    """Something reconnecting cannot fix (a refused attach, a changed layout)."""


SendT = TypeVar("SendT", contravariant=True)
RecvT = TypeVar("RecvT", covariant=True)
S = TypeVar("S")
R = TypeVar("R")


class Link(Protocol[SendT, RecvT]):
    """One open stream: the DM channel's or a virtio-mem device's."""

    async def write(self, msg: SendT) -> None:
        """Send one message; raises :class:`LinkClosed`."""

    async def read(self) -> RecvT | None:
        """The next host message, None when the host ended the stream; raises LinkClosed."""

    async def close(self) -> None:
        """End the stream (idempotent)."""


class EventSink(Protocol):
    """Where the agent hands every guest event on (``--mqtt``: :mod:`guest.mqtt_events`).

    Called in line with the guest's work: it must not block.
    """

    def on_event(self, kind: str, data: dict[str, Any]) -> None: ...

    def state_changed(self) -> None: ...


class Transport(Protocol):
    """Opens streams to one hypervisor (DM or virtio-mem, as the agent's protocol says)."""

    async def open(self) -> Link[Any, Any]: ...

    async def close(self) -> None: ...


class GrpcLink(Generic[S, R]):
    """A ``DynamicMemory.Connect`` or ``VirtioMem.Connect`` call on its own channel."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        call: grpc.aio.StreamStreamCall[S, R],
        recv_type: type[R],
    ) -> None:
        self._channel = channel
        self._call = call
        self._recv_type = recv_type
        self._closed = False

    def _broken(self, err: BaseException) -> LinkClosed:
        if isinstance(err, grpc.aio.AioRpcError):
            return LinkClosed(f"{err.code().name}: {err.details()}", err.code())
        return LinkClosed(f"stream finished ({type(err).__name__})")

    async def _guard(self, op: Callable[[], Any]) -> Any:
        try:
            return await op()
        except grpc.aio.AioRpcError as err:
            raise self._broken(err) from None
        except asyncio.InvalidStateError as err:
            raise self._broken(err) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                # We cancelled the call (close): the stream is gone, this task is not.
                raise LinkClosed("stream closed") from None
            raise

    async def write(self, msg: S) -> None:
        await self._guard(lambda: self._call.write(msg))

    async def read(self) -> R | None:
        msg = await self._guard(self._call.read)
        # Anything but a message is grpc.aio.EOF: the host ended the stream.
        return msg if isinstance(msg, self._recv_type) else None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        await self._channel.close(None)


class GrpcTransport:
    """A fresh channel per stream, so only the agent's own backoff paces reconnects.

    ``protocol`` picks the service: ``DynamicMemory`` (hyperv-dm) or ``VirtioMem``.
    """

    def __init__(self, target: str, protocol: str = HYPERV_DM) -> None:
        self.target = target
        self.protocol = protocol

    async def open(self) -> Link[Any, Any]:
        channel = grpc.aio.insecure_channel(self.target)
        if self.protocol == VIRTIO_MEM:
            vstub = virtio_mem_pb2_grpc.VirtioMemStub(channel)
            return GrpcLink(channel, vstub.Connect(None), virtio_mem_pb2.DeviceToGuest)
        stub = dm_pb2_grpc.DynamicMemoryStub(channel)
        return GrpcLink(channel, stub.Connect(None), dm_pb2.HostToGuest)

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class Layout:
    """``VmLayout``: what the hypervisor says the VM's memory is, in pages."""

    vm_id: str
    boot_pages: int
    max_pages: int
    block_pages: int

    @classmethod
    def from_pb(cls, pb: dm_pb2.VmLayout) -> Layout:
        return cls(pb.vm_id, pb.boot_pages, pb.max_pages, pb.block_pages)


@dataclass
class AgentOptions:
    """The ``memhp guest`` command line (sizes and layout come from the hypervisor)."""

    vm_id: str
    strategy: str = "callback"
    driver_mode: str = "upstream"
    auto_online: str = MMOP_OFFLINE
    udev_online: str | None = None
    onlining_delay: float = 0.0
    status_interval: float = 1.0
    #: Seconds before the first status report (Linux's module parameter, in seconds).
    pressure_report_delay: float = 45.0
    #: Seconds access reports are coalesced before they go out.
    access_batch: float = 0.05
    sysfs_dir: Path | None = None
    workload: WorkloadSpec | None = None
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    #: Announced at attach: where this agent serves GuestIntrospection ("" for nowhere).
    introspection_address: str = ""
    #: hyperv-dm (the DM channel) or virtio-mem (the VirtioMem channel of one device).
    protocol: str = HYPERV_DM
    #: virtio_mem module parameters.
    virtio_mem_force_bbm: bool = False
    virtio_mem_unplug_online: bool = True
    virtio_mem_bbm_safe_unplug: bool = True

    def guest_config(self, layout: Layout) -> GuestConfig:
        """The guest's configuration: the hypervisor's layout plus these options."""
        return GuestConfig(
            vm_id=self.vm_id,
            boot_pages=layout.boot_pages,
            block_size_bytes=layout.block_pages * PAGE_SIZE,
            strategy=self.strategy,
            driver_mode=self.driver_mode,
            auto_online_blocks=self.auto_online,
            udev_online_type=self.udev_online,
            onlining_delay=self.onlining_delay,
            pressure_report_delay=pressure_report_calls(
                self.pressure_report_delay, self.status_interval
            ),
            status_interval=self.status_interval,
            protocol=self.protocol,
            virtio_mem_force_bbm=self.virtio_mem_force_bbm,
            virtio_mem_unplug_online=self.virtio_mem_unplug_online,
            virtio_mem_bbm_safe_unplug=self.virtio_mem_bbm_safe_unplug,
        )


def pressure_report_calls(seconds: float, status_interval: float) -> int:
    """The driver counts skipped status calls; one call per ``status_interval`` seconds."""
    if seconds <= 0:
        return 0
    return math.ceil(seconds / status_interval - 1e-9)


class AccessBatcher:
    """Access reports coalesced per kind over a time window, as merged page ranges.

    The coalesced reports reuse the trans_ids of the reports they replace, in order
    (merging never needs more messages than went in), so ids stay unique.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._pages: dict[str, RangeSet] = {}
        self._trans_ids: list[int] = []
        self.deadline: float | None = None

    def __bool__(self) -> bool:
        return bool(self._trans_ids)

    def __len__(self) -> int:
        """Access reports waiting (before coalescing)."""
        return len(self._trans_ids)

    def add(self, report: dm.AccessReport, now: float) -> None:
        pages = self._pages.setdefault(report.what, RangeSet())
        for r in report.ranges:
            pages.add(r.start_page, r.end_page)
        self._trans_ids.append(report.trans_id)
        if self.deadline is None:
            self.deadline = now + self.window

    def add_pfn_ranges(self, what: str, ranges: tuple[tuple[int, int], ...], now: float) -> None:
        """A virtio-mem access report (``[start, end)`` PFNs, no trans_id: 0 stands in)."""
        pages = self._pages.setdefault(what, RangeSet())
        for start, end in ranges:
            pages.add(start, end)
        self._trans_ids.append(0)
        if self.deadline is None:
            self.deadline = now + self.window

    def due(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def take(self) -> list[dm.AccessReport]:
        ids = iter(self._trans_ids)
        out: list[dm.AccessReport] = []
        for what, pages in self._pages.items():
            ranges = [r for s, e in pages.ranges() for r in dm.split_ranges(s, e - s)]
            for i in range(0, len(ranges), dm.MAX_RANGES_PER_MESSAGE):
                chunk = tuple(ranges[i : i + dm.MAX_RANGES_PER_MESSAGE])
                out.append(dm.AccessReport(next(ids), chunk, what))
        self._pages.clear()
        self._trans_ids.clear()
        self.deadline = None
        return out


def config_from_pb(pb: virtio_mem_pb2.VirtioMemConfig) -> vmem.VirtioMemConfig:
    """The device's config space from the wire; VirtioMemProtocolError if it cannot be one."""
    return vmem.VirtioMemConfig(
        block_size=pb.block_size,
        node_id=pb.node_id,
        addr=pb.addr,
        region_size=pb.region_size,
        usable_region_size=pb.usable_region_size,
        plugged_size=pb.plugged_size,
        requested_size=pb.requested_size,
    )


def memory_state(vm: GuestVm) -> dm_pb2.GuestMemoryState:
    """What the guest holds, for a reattach: regions, pages added, ballooned ranges."""
    driver, mm = vm.driver, vm.mm
    state = dm_pb2.GuestMemoryState(pages_added=driver.counters.num_pages_added)
    for has in driver.ha_regions:
        for r in dm.split_ranges(has.start_pfn, has.end_pfn - has.start_pfn):
            state.regions.append(range_to_pb(r))
        held = state.held.add(start_page=has.start_pfn, page_count=has.end_pfn - has.start_pfn)
        for s, e in has.backed_ranges(has.start_pfn, has.end_pfn):
            held.added.extend(range_to_pb(r) for r in dm.split_ranges(s, e - s))
    top = max((b.end_pfn for b in mm.blocks.values()), default=0)
    for s, e, page in mm.pages.runs(0, top):
        if page.kind == PAGE_OFFLINE and page.owner == OWNER_BALLOON:
            for r in dm.split_ranges(s, e - s):
                state.ballooned.append(range_to_pb(r))
    return state


@dataclass(frozen=True)
class LinkStats:
    """How far the agent is with the DM stream (``GuestMemory`` reports it)."""

    frames_sent: int
    frames_received: int
    #: Messages the driver produced that are not sent yet (batched access reports too).
    unsent_messages: int


#: The agent driving each guest: the introspection service is handed only the guest.
_AGENTS: weakref.WeakKeyDictionary[GuestVm, GuestAgent] = weakref.WeakKeyDictionary()


def agent_of(vm: GuestVm) -> GuestAgent | None:
    """The agent that drives ``vm`` (None: no agent does)."""
    return _AGENTS.get(vm)


def _describe(kind: str, data: dict[str, Any]) -> str:
    detail = ", ".join(f"{k}={v}" for k, v in data.items())
    return f"{kind} {detail}" if detail else kind


class GuestAgent:
    """Drives one guest over one hypervisor connection at a time (see the module doc)."""

    def __init__(
        self,
        options: AgentOptions,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        event_sink: EventSink | None = None,
    ) -> None:
        self.options = options
        self.transport = transport
        #: Gets every guest event and model change (None: nobody, at no cost).
        self.event_sink = event_sink
        self._clock = clock
        self._rng = rng or random.Random()
        self.log = get_logger("guest.agent").bind(vm=options.vm_id)
        # Asked once: an event below the level then costs nothing on the path that
        # answers the host.
        self._logs_debug = logs_at(self.log, logging.DEBUG)
        self._logs_info = logs_at(self.log, logging.INFO)
        self.vm: GuestVm | None = None
        self.layout: Layout | None = None
        self.workload: Workload | None = None
        #: Set once the first attach built the guest.
        self.attached = asyncio.Event()
        self.connected = False
        self.attach_count = 0
        self.frames_sent = 0
        self.frames_received = 0
        self.frames_dropped = 0
        #: Recent guest events, oldest first (the trace of a violation).
        #: The recent events, raw: (guest time, kind, data); :attr:`events` formats them.
        self._trace: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=TRACE_EVENTS)
        self._unlogged: list[tuple[str, dict[str, Any]]] = []
        self._link: Link[Any, Any] | None = None
        self._wake = asyncio.Event()
        #: One step at a time: the pump's or the reader's (frames are answered inline).
        self._step_lock = asyncio.Lock()
        self._t0 = 0.0
        self._access = AccessBatcher(options.access_batch)
        self._sysfs_dirty = False
        self._sysfs_written_at: float | None = None
        #: When the sleeping pump wakes on its own (None: only when woken).
        self._pump_wakes_at: float | None = None
        self.virtio = options.protocol == VIRTIO_MEM
        #: The virtio-mem request sent on the current stream and not answered yet.
        self._vmem_pending: vmem.VirtioMemRequest | None = None

    # -- time and wake-ups ----------------------------------------------------------

    def elapsed(self) -> float:
        """The guest's clock: seconds since it was built."""
        return self._clock() - self._t0

    def wake(self) -> None:
        """Something changed outside the pump (a frame, a sysfs write): run it now."""
        self._wake.set()

    def state_changed(self) -> None:
        """The memory layout may have changed: rewrite sysfs (soon) and run the guest."""
        self._sysfs_dirty = True
        if self.event_sink is not None:
            self.event_sink.state_changed()
        self.wake()

    def _wake_if_sooner(self) -> None:
        """A step outside the pump (a frame answered inline) may have made something due
        before the pump means to wake (a timer, an access batch, a sysfs rewrite): wake
        it then, and only then, so it sleeps until that. The pump's own rule decides
        (:meth:`_wake_at`): a sysfs rewrite held back by the 100 ms limit is not due."""
        vm = self.vm
        if vm is None:
            return
        due = self._wake_at(vm)
        if due is not None and (self._pump_wakes_at is None or due < self._pump_wakes_at):
            self.wake()

    def catch_up(self) -> None:
        """Bring the guest's clock to now before something from outside changes it.

        The pump moves the clock only when it wakes; work started by a frame or a sysfs
        write at a stale time would sleep from that time (a udev onlining delay would
        partly have passed already).
        """
        if self.vm is not None:
            self.vm.run_until(self.elapsed())

    def link_stats(self) -> LinkStats:
        """The DM stream counters ``GetMemory`` reports (a scenario step settles on them)."""
        outbox = 0
        if self.vm is not None:
            if self.vm.hv_balloon is not None:
                outbox += len(self.vm.hv_balloon.outbox)
            outbox += sum(len(d.outbox) for d in self.vm.virtio_mem)
        return LinkStats(self.frames_sent, self.frames_received, len(self._access) + outbox)

    # -- running ------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until cancelled (the caller's clean stop) or a fatal error (returns 1).

        On the way out the stream is closed and the transport too.
        """
        connect = asyncio.create_task(self._connect_loop(), name=f"dm-connect:{self.options.vm_id}")
        pump = asyncio.create_task(self._pump_after_attach(), name=f"dm-pump:{self.options.vm_id}")
        try:
            done, _ = await asyncio.wait({connect, pump}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                pump.result()  # the pump only ends by raising: a bug, let it show
            return connect.result()
        finally:
            for task in (connect, pump):
                task.cancel()
            await asyncio.gather(connect, pump, return_exceptions=True)
            await self.transport.close()

    async def _connect_loop(self) -> int:
        delay = self.options.backoff_initial
        while True:
            try:
                link = await self.transport.open()
            except LinkClosed as err:
                self.log.warning("connect_failed", error=str(err))
            else:
                try:
                    await self._attach(link)
                    delay = self.options.backoff_initial
                    await self._read_loop(link)
                except LinkClosed as err:
                    if err.code in FATAL_CODES:
                        self.log.error("attach_refused", error=str(err), code=err.code.name)
                        return 1
                    self.log.warning(
                        "disconnected" if self.connected else "attach_failed", error=str(err)
                    )
                except AgentError as err:
                    self.log.error("fatal", error=str(err))
                    return 1
                finally:
                    self.connected = False
                    if self._link is link:
                        self._link = None
                    await link.close()
            pause = self._rng.uniform(delay / 2, delay)
            self.log.info("reconnect_backoff", seconds=round(pause, 3))
            await asyncio.sleep(pause)
            delay = min(delay * 2, self.options.backoff_max)

    async def _attach(self, link: Link[Any, Any]) -> None:
        if self.virtio:
            await self._attach_virtio(link)
            return
        attach = dm_pb2.Attach(
            vm_id=self.options.vm_id, introspection_address=self.options.introspection_address
        )
        if self.vm is not None:
            attach.state.CopyFrom(memory_state(self.vm))
        await link.write(dm_pb2.GuestToHost(attach=attach))
        try:
            async with asyncio.timeout(ATTACH_TIMEOUT):
                reply = await link.read()
        except TimeoutError:
            raise LinkClosed(f"no answer to attach within {ATTACH_TIMEOUT:.0f} s") from None
        if reply is None:
            raise LinkClosed("the hypervisor ended the stream before attached")
        kind = reply.WhichOneof("msg")
        if kind == "error":
            raise LinkClosed(f"attach refused: {reply.error.kind}: {reply.error.message}")
        if kind != "attached":
            raise LinkClosed(f"expected attached, got {kind}")
        layout = Layout.from_pb(reply.attached.layout)
        if self.vm is None:
            self._build(layout)
            assert self.vm is not None
            self.vm.start()
        else:
            self._check_layout(layout)
            self.vm.renegotiate()
        self.attach_count += 1
        self.connected = True
        self._link = link
        self.log.info(
            "attached",
            reattach=self.attach_count > 1,
            boot_pages=layout.boot_pages,
            max_pages=layout.max_pages,
            block_pages=layout.block_pages,
        )
        self.attached.set()
        self.wake()

    async def _attach_virtio(self, link: Link[Any, Any]) -> None:
        """Attach the virtio-mem device's stream (see the module doc)."""
        attach = virtio_mem_pb2.VirtioMemAttach(
            vm_id=self.options.vm_id, introspection_address=self.options.introspection_address
        )
        await link.write(virtio_mem_pb2.GuestToDevice(attach=attach))
        try:
            async with asyncio.timeout(ATTACH_TIMEOUT):
                reply = await link.read()
        except TimeoutError:
            raise LinkClosed(f"no answer to attach within {ATTACH_TIMEOUT:.0f} s") from None
        if reply is None:
            raise LinkClosed("the hypervisor ended the stream before attached")
        kind = reply.WhichOneof("msg")
        if kind != "attached":
            raise LinkClosed(f"expected attached, got {kind}")
        layout = Layout.from_pb(reply.attached.layout)
        config = self._config_or_broken(reply.attached.config, "attached")
        if self.vm is None:
            self._build(layout, config)
            assert self.vm is not None
            try:
                self.vm.start()
            except (ValueError, MemoryHotplugError) as err:
                raise AgentError(str(err)) from None
        else:
            self._check_layout(layout)
            driver = self.vm.virtio_mem[0]
            if (config.addr, config.region_size, config.block_size) != (
                driver.config.addr,
                driver.config.region_size,
                driver.config.block_size,
            ):
                raise AgentError(
                    f"the hypervisor changed the virtio-mem device across a reattach: "
                    f"{driver.config} -> {config}"
                )
            # What the device shows now (a resize while away is a config change).
            self.catch_up()
            self.vm.virtio_config_changed(config)
        self.attach_count += 1
        self.connected = True
        self._link = link
        # A request the old stream never answered goes out again on this one.
        self._vmem_pending = None
        if self.vm.virtio_mem and self.vm.virtio_mem[0].request_in_flight is not None:
            await self._write_virtio(self.vm.virtio_mem[0].request_in_flight)
        self.log.info(
            "attached",
            reattach=self.attach_count > 1,
            protocol=VIRTIO_MEM,
            boot_pages=layout.boot_pages,
            block_pages=layout.block_pages,
            region_size=config.region_size,
            plugged_size=config.plugged_size,
            requested_size=config.requested_size,
        )
        self.attached.set()
        self.wake()

    def _build(self, layout: Layout, device: vmem.VirtioMemConfig | None = None) -> None:
        if layout.vm_id and layout.vm_id != self.options.vm_id:
            raise AgentError(f"attached as {layout.vm_id!r}, not {self.options.vm_id!r}")
        try:
            config = self.options.guest_config(layout)
            self._t0 = self._clock()
            vm = GuestVm(config, now=0.0, on_event=self._on_event)
            if device is not None:
                vm.attach_virtio_mem(device)
        except (ValueError, MemoryHotplugError) as err:
            raise AgentError(f"unusable layout {layout}: {err}") from None
        vm.mm.notifier.register(self._memory_notifier, -1000, name="guest-agent")
        vm.mm.block_added_hooks.append(self._block_added)
        self.vm = vm
        _AGENTS[vm] = self
        self.layout = layout
        self._sysfs_dirty = True
        if self.options.workload is not None:
            self.workload = Workload(vm, self.options.workload, on_event=self._on_event)
            self.workload.start()

    def _check_layout(self, layout: Layout) -> None:
        old = self.layout
        assert old is not None
        if (layout.boot_pages, layout.block_pages) != (old.boot_pages, old.block_pages):
            raise AgentError(
                f"the hypervisor changed the VM's layout across a reattach: {old} -> {layout}"
            )
        if layout.max_pages != old.max_pages:
            self.log.info("max_pages_changed", old=old.max_pages, new=layout.max_pages)
            self.layout = layout

    async def _read_loop(self, link: Link[Any, Any]) -> None:
        if self.virtio:
            await self._read_loop_virtio(link)
            return
        while True:
            msg = await link.read()
            if msg is None:
                raise LinkClosed("the hypervisor ended the stream")
            kind = msg.WhichOneof("msg")
            if kind == "frame":
                # Delivered and answered from here, under the step lock as the virtio
                # reader does: the host waits, and a hop through the pump task costs a
                # turn of the loop. The pump still runs for its timers.
                async with self._step_lock:
                    self._on_frame(msg.frame)
                    await self._step(self.elapsed())
                self._wake_if_sooner()
            elif kind == "error":
                async with self._step_lock:
                    self._on_host_error(msg.error)
                self.wake()
            else:
                self.log.warning("unexpected_host_message", kind=kind)

    async def _read_loop_virtio(self, link: Link[Any, Any]) -> None:
        vm = self.vm
        assert vm is not None
        while True:
            msg = await link.read()
            if msg is None:
                raise LinkClosed("the hypervisor ended the stream")
            kind = msg.WhichOneof("msg")
            if kind == "response":
                self.frames_received += 1
                config: vmem.VirtioMemConfig | None
                try:
                    resp = vmem.VirtioMemResponse(
                        vmem.VirtioMemRespType(msg.response.type), msg.response.state
                    )
                    config = config_from_pb(msg.response.config)
                except (ValueError, vmem.VirtioMemProtocolError) as err:
                    # The request failed: ERROR, the config as the driver read it last.
                    self.log.warning(
                        "bad_device_response", error=str(err), delivered=vmem.ERROR.name
                    )
                    resp, config = vmem.VirtioMemResponse(vmem.ERROR), None
                self._vmem_pending = None
                async with self._step_lock:
                    self.catch_up()
                    vm.deliver_virtio(resp, config)
                    # Answer from here: the next request goes out without a pump turn.
                    await self._step(self.elapsed())
                self._wake_if_sooner()
                continue
            if kind == "config_changed":
                self.frames_received += 1
                changed = self._config_or_broken(msg.config_changed.config, "config_changed")
                async with self._step_lock:
                    self.catch_up()
                    vm.virtio_config_changed(changed)
                    await self._step(self.elapsed())
                self._wake_if_sooner()
                continue
            self.log.warning("unexpected_device_message", kind=kind)

    def _config_or_broken(
        self, pb: virtio_mem_pb2.VirtioMemConfig, where: str
    ) -> vmem.VirtioMemConfig:
        """The config a device message carries; a config that cannot be one breaks the
        stream (LinkClosed: the agent reconnects and reads it afresh at attach)."""
        try:
            return config_from_pb(pb)
        except vmem.VirtioMemProtocolError as err:
            self.log.warning("bad_device_config", message=where, error=str(err))
            raise LinkClosed(f"{where}: bad device config: {err}") from None

    def _on_frame(self, frame: dm_pb2.DmFrame) -> None:
        assert self.vm is not None
        self.frames_received += 1
        # bind/reset rather than bound_contextvars(): no generator per frame.
        tokens = structlog.contextvars.bind_contextvars(trans_id=frame.trans_id)
        try:
            try:
                msg = from_frame(frame)
            except dm.ProtocolError as err:
                self.log.warning("bad_host_frame", error=str(err))
                return
            if self._logs_debug:
                self.log.debug("received", message=type(msg).__name__)
            self.catch_up()
            self.vm.deliver(msg)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    def _on_host_error(self, error: dm_pb2.ProtocolErrorNotice) -> None:
        assert self.vm is not None
        self.log.warning(
            "host_protocol_error", kind=error.kind, message=error.message, action=error.action
        )
        if error.action == "reset":
            self.vm.renegotiate()

    # -- the pump -----------------------------------------------------------------------

    async def _pump_after_attach(self) -> None:
        await self.attached.wait()
        vm = self.vm
        assert vm is not None
        while True:
            self._wake.clear()
            async with self._step_lock:
                now = self.elapsed()
                await self._step(now)
                if self._access.due(now):
                    await self._flush_access()
                self._sync_sysfs(now)
                wake_at = self._wake_at(vm)
                timeout = None if wake_at is None else max(0.0, wake_at - now)
                self._pump_wakes_at = wake_at
            if timeout is None:
                await self._wake.wait()
            elif timeout > 0:
                # asyncio.timeout, not wait_for: in 3.11 wait_for swallows a cancellation
                # that arrives just as the event is set, and the pump would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()

    async def _step(self, now: float) -> None:
        """Run the guest up to ``now`` and send what it says (under ``_step_lock``)."""
        vm = self.vm
        assert vm is not None
        vm.run_until(now)
        if self.virtio:
            await self._send_virtio(vm.drain_virtio_outbox(), now)
        else:
            await self._send(vm.drain_outbox(), now)
        self._log_events()

    def _wake_at(self, vm: GuestVm) -> float | None:
        """When the pump has something to do (guest time; None: nothing until woken):
        the guest's next timer, the access batch's deadline (with a stream), the sysfs
        rewrite the rate limit allows."""
        deadlines = [vm.next_deadline(), self._access.deadline if self._link else None]
        if self._sysfs_dirty and self._sysfs_written_at is not None:
            deadlines.append(self._sysfs_written_at + SYSFS_MIN_INTERVAL)
        due = [d for d in deadlines if d is not None]
        return min(due) if due else None

    async def _send(self, messages: list[dm.DmMessage], now: float) -> None:
        for msg in messages:
            if isinstance(msg, dm.AccessReport):
                self._access.add(msg, now)
                continue
            # Never let a later message overtake the accesses before it.
            await self._flush_access()
            await self._write(msg)

    async def _flush_access(self) -> None:
        if self._access and self._link is not None:
            for report in self._access.take():
                if self.virtio:
                    await self._write_access_virtio(report)
                else:
                    await self._write(report)

    async def _send_virtio(
        self, messages: list[vmem.VirtioMemRequest | vmem.AccessReport], now: float
    ) -> None:
        for msg in messages:
            if isinstance(msg, vmem.AccessReport):
                self._access.add_pfn_ranges(msg.what, msg.ranges, now)
                continue
            await self._flush_access()
            await self._write_virtio(msg)

    async def _write_virtio(self, req: vmem.VirtioMemRequest) -> None:
        """One request; without a stream it waits for the next (sent again at attach)."""
        link = self._link
        if link is None or self._vmem_pending is req:
            return
        pb = virtio_mem_pb2.GuestToDevice(
            request=virtio_mem_pb2.VirtioMemRequest(
                type=int(req.type), addr=req.addr, nb_blocks=req.nb_blocks
            )
        )
        try:
            await link.write(pb)
        except LinkClosed as err:
            self.log.info("send_failed", message=req.name, error=str(err))
            if self._link is link:
                self._link = None
            return
        self._vmem_pending = req
        self.frames_sent += 1

    async def _write_access_virtio(self, report: dm.AccessReport) -> None:
        link = self._link
        if link is None:
            self.frames_dropped += 1
            return
        pb = virtio_mem_pb2.GuestToDevice(
            access=dm_pb2.AccessReport(
                ranges=[range_to_pb(r) for r in report.ranges], what=report.what
            )
        )
        try:
            await link.write(pb)
        except LinkClosed as err:
            self.frames_dropped += 1
            self.log.info("send_failed", message="access", error=str(err))
            if self._link is link:
                self._link = None
            return
        self.frames_sent += 1

    async def _write(self, msg: dm.DmMessage) -> None:
        link = self._link
        if link is None:
            self.frames_dropped += 1
            self.log.debug(
                "dropped_not_connected", message=type(msg).__name__, trans_id=msg.trans_id
            )
            return
        try:
            await link.write(dm_pb2.GuestToHost(frame=to_frame(msg)))
        except LinkClosed as err:
            self.frames_dropped += 1
            self.log.info("send_failed", message=type(msg).__name__, error=str(err))
            if self._link is link:
                self._link = None
            return
        self.frames_sent += 1
        self.log.debug("sent", message=type(msg).__name__, trans_id=msg.trans_id)

    # -- sysfs ---------------------------------------------------------------------------

    def _memory_notifier(self, action: MemoryAction, arg: MemoryNotify) -> int:
        self._sysfs_dirty = True
        return NOTIFY_OK

    def _block_added(self, block: MemoryBlock) -> None:
        self._sysfs_dirty = True

    def _sync_sysfs(self, now: float) -> None:
        root = self.options.sysfs_dir
        if root is None or not self._sysfs_dirty or self.vm is None:
            return
        if self._sysfs_written_at is not None and now < self._sysfs_written_at + SYSFS_MIN_INTERVAL:
            return
        self._sysfs_dirty = False
        self._sysfs_written_at = now
        try:
            write_sysfs_tree(self.vm.mm, root)
        except OSError as err:
            self._sysfs_dirty = True
            self.log.error("sysfs_write_failed", dir=str(root), error=str(err))

    # -- events ---------------------------------------------------------------------------

    @property
    def events(self) -> list[str]:
        """The recent events as trace lines (``t=SECONDS kind key=value, ...``)."""
        return [f"t={now:.3f} {_describe(kind, data)}" for now, kind, data in self._trace]

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        # On the critical path (the hypervisor waits for the answer): keep the event
        # raw; the trace line is formatted when somebody reads it.
        now = self.vm.now if self.vm is not None else 0.0
        if self._trace:
            last_now, last_kind, last_data = self._trace[-1]
            if last_kind == kind and last_data == data and f"{last_now:.3f}" == f"{now:.3f}":
                # The driver and the VM both announce a hot-added block: once is enough.
                return
        self._trace.append((now, kind, data))
        if kind in _WARN_EVENTS:
            logged = True
        elif kind in _INFO_EVENTS:
            logged = self._logs_info
        else:
            logged = self._logs_debug
        if self.event_sink is None and not logged:
            return
        fields = {k: v for k, v in data.items() if k not in ("vm", "vm_id", "event")}
        if self.event_sink is not None:
            self.event_sink.on_event(kind, fields)
        if logged:
            # Logged by the pump once the messages of this step are sent: a log line
            # costs tens of microseconds, and the hypervisor is waiting for the answer.
            self._unlogged.append((kind, fields))

    def _log_events(self) -> None:
        unlogged, self._unlogged = self._unlogged, []
        for kind, fields in unlogged:
            if kind in _WARN_EVENTS:
                self.log.warning(kind, **fields)
            elif kind in _INFO_EVENTS:
                self.log.info(kind, **fields)
            else:
                self.log.debug(kind, **fields)


__all__ = [
    "AccessBatcher",
    "AgentError",
    "AgentOptions",
    "EventSink",
    "GrpcTransport",
    "GuestAgent",
    "Layout",
    "Link",
    "LinkClosed",
    "LinkStats",
    "Transport",
    "agent_of",
    "config_from_pb",
    "memory_state",
    "pressure_report_calls",
]
