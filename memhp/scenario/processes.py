"""Run a scenario across real processes: one ``memhp hypervisor``, one ``memhp guest`` per VM.

``memhp scenario run FILE --processes`` plays the same scenario files as the
in-process runner (:mod:`memhp.scenario.runner`), on loopback with ephemeral ports,
and prints the same JSON: only ``virtual_time`` (here: seconds of real time since
setup), each step's ``time`` and the violation traces differ
(:func:`memhp.scenario.result.without_time` drops them).

* The hypervisor runs with ``--no-default-vm`` (and ``--profile qemu`` for a qemu
  scenario); every VM of the scenario is made with ``Control.CreateVm`` and gets a
  guest agent with the VM entry's options (a ``pressure_report_delay`` of N skipped
  reports becomes N seconds at one status report a second).
* Host steps go through ``Control`` (``HotAdd``, ``Back``, ``SetTarget``, ``Balloon``,
  ``Unballoon``; ``Resize`` for a virtio-mem VM, which is made with its device settings
  and whose guest runs ``--protocol virtio-mem``), sysfs writes through
  ``GuestIntrospection.SetBlockState``, the guest's own work (allocate, free, inject,
  dump) through the guest agent's RPCs, and ``advance`` sleeps.
* After every step the system *settles*: the host has nothing in flight or queued,
  the guest's driver is idle with nothing unsent, and every DM frame either side sent
  has arrived (frame counters of ``Vm`` and ``GuestMemory`` agree).
* Then every invariant is checked as in process: the guest runs
  :func:`guest.invariants.check_guest` against the host's ground truth from
  ``GetVm`` (``backed``, and the regions' backed pages as offered; for a virtio-mem VM
  the device's plugged ranges and the virtio-mem invariants), and the host's
  own findings (``violation`` and ``protocol_error`` events) come from a
  ``WatchEvents`` stream opened before the guests start. Findings are deduplicated
  with the same keys and marked expected from ``expect_violations``.

Every child is stopped by its own PID at the end, also when a step fails. A
``progress`` callback hears when each step starts and ends (``memhp demo`` shows it),
and a :class:`memhp.view.timeline.Timeline` gets a sample of every VM after setup and
after every step (from ``GetVm`` and ``GetMemory``, on the wall clock since setup).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from extents import RangeSet
from guest.introspection import pfn_ranges, write_failure
from memhp.logs import get_logger
from memhp.procs import (
    Child,
    ChildFailed,
    memhp_command,
    sigterm_cancels_this_task,
    start_child,
)
from memhp.scenario.result import (
    Finding,
    StepFailed,
    Violation,
    dump_outcome,
    expectations,
    guest_view_pb,
    host_view,
    record_dump,
    record_violations,
    scenario_result,
    sysfs_outcome,
    virtio_mem_view_pb,
    vm_view,
)
from memhp.scenario.runner import POST_INIT_DELAY, TRACE_LENGTH
from memhp.scenario.spec import Scenario, ScenarioError, Step, VmSpec
from memhp.units import PAGE_SHIFT
from memhp.v1 import control_pb2, control_pb2_grpc, dm_pb2, guest_pb2, guest_pb2_grpc
from memhp.view.grpc_source import memory_request
from memhp.view.model import onlined_pages
from memhp.view.timeline import Sample, Timeline

log = get_logger("memhp.scenario.processes")

#: Seconds of real time a step may take to settle (plus the profile's post-init wait).
SETTLE_TIMEOUT = 60.0
#: Seconds between two looks at whether the system settled: from the first to the last,
#: growing while a step takes long (a 5 s onlining wait, QEMU's 50 s post-init wait).
POLL_INTERVAL = 0.01
POLL_INTERVAL_MAX = 0.05
#: Seconds a single RPC may take.
RPC_TIMEOUT = 30.0
#: Seconds the guests get to write their sysfs trees one last time (--sysfs-out).
SYSFS_FLUSH = 0.3

#: The Control field a refusal names -> the scenario's key, per step kind.
PROTO_FIELDS: dict[str, dict[str, str]] = {
    "hot_add": {"region_bytes": "region", "backed_bytes": "backed", "offset_bytes": "offset"},
    # The session's "region" (no region to back) is the VM's fault in Control: vm_id.
    "back": {"size_bytes": "size", "start_page": "offset", "vm_id": "region"},
    "set_target": {"requested_bytes": "size"},
    "balloon": {"size_bytes": "size"},
    "unballoon": {"size_bytes": "size"},
    "resize": {"requested_bytes": "size"},
}

_GUEST_TRACE = re.compile(r"^t=(?P<t>-?[0-9.]+) (?P<rest>.*)$", re.DOTALL)

T = TypeVar("T")


@dataclass(frozen=True)
class StepProgress:
    """A step starts (``phase`` "start"), ended ("done") or failed ("failed")."""

    #: 1-based; 0 is the setup (the processes attached and settled).
    index: int
    total: int
    #: What the step does (:meth:`Step.describe`), or "setup".
    text: str
    phase: str
    #: Seconds the step took ("done", "failed"); 0 at "start".
    elapsed: float = 0.0
    error: str = ""


def check_supported(scenario: Scenario) -> None:
    """Raise :class:`ScenarioError` for a VM option the guest agent cannot take."""
    for vm in scenario.vms:
        if vm.protocol not in ("hyperv-dm", "virtio-mem"):
            raise ScenarioError(
                scenario.path,
                vm.line,
                f"vm {vm.id}: protocol {vm.protocol} is not supported with --processes "
                "(a hypervisor VM has one memory device; memhp guest exits 1 with both drivers)",
            )
        if vm.onlining_jitter:
            raise ScenarioError(
                scenario.path,
                vm.line,
                f"vm {vm.id}: onlining_jitter is not supported with --processes "
                "(memhp guest has no such option)",
            )
        if vm.memmap_on_memory:
            raise ScenarioError(
                scenario.path,
                vm.line,
                f"vm {vm.id}: memmap_on_memory is not supported with --processes "
                "(memhp guest has no such option)",
            )


def guest_argv(
    spec: VmSpec, hypervisor: str, *, log_args: list[str], sysfs: Path | None
) -> list[str]:
    """``memhp guest`` for a scenario VM entry."""
    args = [
        *log_args,
        "guest",
        "--hypervisor",
        hypervisor,
        "--vm-id",
        spec.id,
        "--listen",
        "127.0.0.1:0",
        "--strategy",
        spec.strategy,
        "--driver-mode",
        spec.driver_mode,
        "--auto-online",
        spec.auto_online,
        "--onlining-delay",
        repr(spec.onlining_delay),
        # The scenario counts skipped status reports; the agent takes seconds.
        "--status-interval",
        "1",
        "--pressure-report-delay",
        str(spec.pressure_report_delay),
    ]
    if spec.udev_online is not None:
        args += ["--udev-online", spec.udev_online]
    if spec.protocol != "hyperv-dm":
        args += ["--protocol", spec.protocol]
    vmem = spec.virtio_mem
    if vmem is not None:
        args += [
            "--force-bbm" if vmem.force_bbm else "--no-force-bbm",
            "--unplug-online" if vmem.unplug_online else "--no-unplug-online",
            "--bbm-safe-unplug" if vmem.bbm_safe_unplug else "--no-bbm-safe-unplug",
        ]
    if sysfs is not None:
        args += ["--sysfs-dir", str(sysfs)]
    return memhp_command(*args)


def vm_spec_pb(spec: VmSpec) -> control_pb2.VmSpec:
    """``Control.CreateVm``'s VmSpec for a scenario VM entry (with its virtio-mem device)."""
    pb = control_pb2.VmSpec(
        vm_id=spec.id,
        boot_bytes=spec.boot_memory,
        max_bytes=spec.max_memory,
        block_size_bytes=spec.block_size,
        protocol=spec.protocol,
    )
    vmem = spec.virtio_mem
    if vmem is not None:
        pb.virtio_mem.CopyFrom(
            control_pb2.VirtioMemSpec(
                region_size_bytes=vmem.region_size,
                block_size_bytes=vmem.block_size,
                requested_bytes=vmem.requested,
                addr=vmem.addr,
                node_id=vmem.node,
            )
        )
    return pb


def _plain(value: Any) -> Any:
    """A protobuf Struct value as plain JSON data (whole numbers as ints)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, struct_pb2.Struct):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [_plain(v) for v in value]
    return value


def _ranges(ranges: Iterable[dm_pb2.PageRange]) -> list[tuple[int, int]]:
    return [(r.start_page, r.start_page + r.page_cnt) for r in ranges]


@dataclass
class ProcNode:
    """One VM: its guest agent child and what the runner learnt about it."""

    spec: VmSpec
    child: Child | None = None
    channel: grpc.aio.Channel | None = None
    guest: Any = None  # GuestIntrospectionStub
    control: Any = None  # GuestControlStub
    seen: set[Finding] = field(default_factory=set)
    violations: list[Violation] = field(default_factory=list)
    #: The host's findings from the event stream, in order: unbacked accesses, protocol errors.
    host_violations: list[Finding] = field(default_factory=list)
    protocol_errors: list[Finding] = field(default_factory=list)
    #: How many "violation" and "protocol_error" events arrived.
    violation_events: int = 0
    #: (wall time, line) of the host's recent events.
    host_events: deque[tuple[float, str]] = field(
        default_factory=lambda: deque(maxlen=TRACE_LENGTH)
    )
    #: Wall time the host attached the guest (the guest's clock starts about then).
    attached_at: float | None = None


class ProcessRunner:
    """See the module doc. Use ``async with`` (or :meth:`start` and :meth:`stop`)."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        seed: int | None = None,
        log_dir: Path | None = None,
        sysfs_out: Path | None = None,
        settle_timeout: float = SETTLE_TIMEOUT,
        timeline: Timeline | None = None,
        progress: Callable[[StepProgress], None] | None = None,
        hypervisor_args: Sequence[str] = (),
        guest_args: Sequence[str] = (),
    ) -> None:
        check_supported(scenario)
        self.timeline = timeline
        self.progress = progress
        #: Extra arguments for ``memhp hypervisor`` and every ``memhp guest``.
        self.hypervisor_args = list(hypervisor_args)
        self.guest_args = list(guest_args)
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.log_dir = log_dir
        self.sysfs_out = sysfs_out
        self.settle_timeout = settle_timeout + POST_INIT_DELAY[scenario.profile]
        self.nodes: dict[str, ProcNode] = {spec.id: ProcNode(spec) for spec in scenario.vms}
        self.hypervisor: Child | None = None
        self.channel: grpc.aio.Channel | None = None
        self.control: Any = None  # ControlStub
        self.expectations: list[dict[str, Any]] = []
        self.step_results: list[dict[str, Any]] = []
        self.current_step = "setup"
        self._watch: Any = None
        self._watch_task: asyncio.Task[None] | None = None
        self._origin = time.monotonic()
        self._origin_wall = time.time()

    # -- processes ---------------------------------------------------------------------

    def _log_args(self) -> list[str]:
        level = "info" if self.log_dir is not None else "warning"
        return ["--log-level", level, "--log-json"]

    async def __aenter__(self) -> ProcessRunner:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the hypervisor, create the VMs, watch events, start one guest per VM.

        Raises :class:`ChildFailed` (a process did not come up) or :class:`StepFailed`
        (the hypervisor refused a VM); :meth:`stop` cleans up either way.
        """
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = memhp_command(
            *self._log_args(),
            "hypervisor",
            "--listen",
            "127.0.0.1:0",
            "--no-default-vm",
            "--profile",
            self.scenario.profile,
            *self.hypervisor_args,
        )
        self.hypervisor = await start_child("hypervisor", argv, log_dir=self.log_dir)
        self.channel = grpc.aio.insecure_channel(self.hypervisor.address)
        self.control = control_pb2_grpc.ControlStub(self.channel)
        self._watch = self.control.WatchEvents(control_pb2.WatchEventsRequest())
        # The hypervisor has the subscription once the headers arrive.
        await asyncio.wait_for(self._watch.initial_metadata(), RPC_TIMEOUT)
        self._watch_task = asyncio.create_task(self._collect_events(), name="watch-events")
        for spec in self.scenario.vms:
            await self._rpc(
                self.control.CreateVm(
                    control_pb2.CreateVmRequest(spec=vm_spec_pb(spec)), timeout=RPC_TIMEOUT
                ),
            )
        results = await asyncio.gather(
            *(self._start_guest(node) for node in self.nodes.values()), return_exceptions=True
        )
        for outcome in results:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _start_guest(self, node: ProcNode) -> None:
        assert self.hypervisor is not None
        sysfs = self.sysfs_out / node.spec.id if self.sysfs_out is not None else None
        argv = guest_argv(
            node.spec, self.hypervisor.address, log_args=self._log_args(), sysfs=sysfs
        )
        argv += self.guest_args
        node.child = await start_child(f"guest-{node.spec.id}", argv, log_dir=self.log_dir)
        node.channel = grpc.aio.insecure_channel(node.child.address)
        node.guest = guest_pb2_grpc.GuestIntrospectionStub(node.channel)
        node.control = guest_pb2_grpc.GuestControlStub(node.channel)

    async def stop(self) -> None:
        """Stop every child by its PID (SIGTERM, then SIGKILL) and close every channel."""
        if self._watch is not None:
            self._watch.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        channels = [n.channel for n in self.nodes.values()] + [self.channel]
        for channel in channels:
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close(None)
        guests = [n.child for n in self.nodes.values() if n.child is not None]
        await asyncio.gather(*(child.stop() for child in guests), return_exceptions=True)
        if self.hypervisor is not None:
            await self.hypervisor.stop()

    def _children(self) -> list[Child]:
        out = [self.hypervisor] if self.hypervisor is not None else []
        return out + [n.child for n in self.nodes.values() if n.child is not None]

    def _check_children(self) -> None:
        for child in self._children():
            code = child.process.returncode
            if code is not None:
                raise StepFailed(f"{child.name} exited with status {code}:\n{child.log_tail()}")

    # -- events --------------------------------------------------------------------------

    async def _collect_events(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for event in self._watch:
                self._on_event(event)

    def _on_event(self, event: control_pb2.Event) -> None:
        node = self.nodes.get(event.vm_id)
        if node is None:
            return
        data = {k: _plain(v) for k, v in event.payload.items()}
        if event.kind == "attach" and node.attached_at is None:
            node.attached_at = event.timestamp
        if event.kind in ("violation", "protocol_error"):
            node.violation_events += 1
            finding: Finding = (
                str(data.get("kind", event.kind)),
                int(data.get("pfn_start") or 0),
                int(data.get("pfn_end") or 0),
                str(data.get("message", "")),
            )
            target = node.host_violations if event.kind == "violation" else node.protocol_errors
            target.append(finding)
        shown = {k: v for k, v in data.items() if k not in ("vm_id", "state")}
        detail = ", ".join(f"{k}={v}" for k, v in shown.items())
        node.host_events.append(
            (event.timestamp, f"host {event.kind}" + (f" {detail}" if detail else ""))
        )

    async def _caught_up(self, node: ProcNode, published: int) -> None:
        """Wait until the event stream delivered every finding the host published."""
        deadline = time.monotonic() + RPC_TIMEOUT
        while node.violation_events < published:
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"the event stream delivered {node.violation_events} of the host's "
                    f"{published} findings for vm {node.spec.id}"
                )
            await asyncio.sleep(POLL_INTERVAL)

    def _trace(self, node: ProcNode, memory: guest_pb2.GuestMemory) -> list[str]:
        """The last events of both sides, on the runner's clock (seconds since setup)."""
        lines: list[tuple[float, str]] = list(node.host_events)
        guest_lines = memory.violations[0].trace if memory.violations else []
        base = node.attached_at if node.attached_at is not None else self._origin_wall
        for line in guest_lines:
            match = _GUEST_TRACE.match(line)
            if match is not None:
                lines.append((base + float(match["t"]), f"guest {match['rest']}"))
        lines.sort(key=lambda item: item[0])
        return [f"t={wall - self._origin_wall:.3f} {text}" for wall, text in lines[-TRACE_LENGTH:]]

    # -- RPCs ---------------------------------------------------------------------------------

    async def _rpc(self, call: Awaitable[T], fields: dict[str, str] | None = None) -> T:
        """Await ``call``; a gRPC error becomes :class:`StepFailed` (``field: rule`` mapped)."""
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            details = err.details() or err.code().name
            name, sep, rule = details.partition(": ")
            if fields is not None and sep and name in fields:
                details = f"{fields[name]}: {rule}"
            elif err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                details = f"{err.code().name}: {details}"
            raise StepFailed(details) from None

    async def _get_vm(self, node: ProcNode) -> control_pb2.Vm:
        vm: control_pb2.Vm = await self._rpc(
            self.control.GetVm(control_pb2.GetVmRequest(vm_id=node.spec.id), timeout=RPC_TIMEOUT),
        )
        return vm

    async def _memory(
        self, node: ProcNode, vm: control_pb2.Vm | None = None
    ) -> guest_pb2.GuestMemory:
        request = guest_pb2.GetMemoryRequest() if vm is None else memory_request(vm)
        memory: guest_pb2.GuestMemory = await self._rpc(
            node.guest.GetMemory(request, timeout=RPC_TIMEOUT)
        )
        return memory

    # -- settling and checking ----------------------------------------------------------------

    async def _node_settled(self, node: ProcNode) -> bool:
        memory = await self._memory(node)
        vm = await self._get_vm(node)
        return (
            vm.attached
            and not vm.busy
            and not memory.busy
            and memory.unsent_messages == 0
            and memory.frames_sent == vm.frames_received
            and vm.frames_sent == memory.frames_received
        )

    async def settle(self) -> None:
        """Wait until nothing is in flight anywhere (or the step is stuck)."""
        deadline = time.monotonic() + self.settle_timeout
        interval = POLL_INTERVAL
        while True:
            self._check_children()
            settled = await asyncio.gather(*(self._node_settled(n) for n in self.nodes.values()))
            if all(settled):
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"did not settle within {self.settle_timeout:.0f} s")
            await asyncio.sleep(interval)
            interval = min(interval * 1.25, POLL_INTERVAL_MAX)

    async def _check_node(self, node: ProcNode) -> None:
        vm = await self._get_vm(node)
        memory = await self._memory(node, vm)
        await self._caught_up(node, vm.violation_events)
        items: list[Finding] = [
            (v.invariant, v.pfn_start, v.pfn_end, v.message) for v in memory.violations
        ]
        items += node.host_violations + node.protocol_errors
        record_violations(
            node.seen,
            node.violations,
            items,
            vm=node.spec.id,
            step=self.current_step,
            trace=self._trace(node, memory),
            expect=node.spec.expect_violations,
        )

    async def check(self) -> None:
        await asyncio.gather(*(self._check_node(n) for n in self.nodes.values()))

    # -- running --------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Seconds of real time since setup settled."""
        return time.monotonic() - self._origin

    def _progress(self, index: int, text: str, phase: str, started: float, error: str = "") -> None:
        if self.progress is None:
            return
        elapsed = 0.0 if phase == "start" else time.monotonic() - started
        total = len(self.scenario.steps)
        self.progress(StepProgress(index, total, text, phase, elapsed, error))

    async def play(self) -> dict[str, Any]:
        """:meth:`run`, but a failed step still gives a result (``ok`` False, ``error`` set)."""
        try:
            return await self.run()
        except StepFailed as err:
            try:
                result = await self.result()
            except StepFailed:
                return self.partial_result(str(err))
            result["ok"] = False
            result["error"] = str(err)
            return result

    async def run(self) -> dict[str, Any]:
        self.current_step = "setup"
        started = time.monotonic()
        self._progress(0, "setup", "start", started)
        try:
            await self.settle()
        except StepFailed as err:
            self._progress(0, "setup", "failed", started, str(err))
            raise
        self._origin = time.monotonic()
        self._origin_wall = time.time()
        await self.check()
        await self.sample()
        self._progress(0, "setup", "done", started)
        for step in self.scenario.steps:
            self.current_step = step.label
            record: dict[str, Any] = {"index": step.index + 1, "kind": step.kind, "line": step.line}
            started = time.monotonic()
            self._progress(step.index + 1, step.describe(), "start", started)
            try:
                outcome = await self._run_step(step)
                if outcome is not None:
                    record["result"] = outcome
                await self.settle()
            except StepFailed as err:
                record["error"] = str(err)
                self.step_results.append(record)
                self._progress(step.index + 1, step.describe(), "failed", started, str(err))
                raise
            record["time"] = round(self.now, 6)
            self.step_results.append(record)
            await self.check()
            await self.sample()
            self._progress(step.index + 1, step.describe(), "done", started)
            log.debug("step done", step=step.label, time=self.now)
        return await self.result()

    async def sample(self) -> None:
        """One timeline sample per VM (bytes), when there is a timeline."""
        if self.timeline is None:
            return
        now = self.now
        for vm_id, node in self.nodes.items():
            vm = await self._get_vm(node)
            memory = await self._memory(node)
            self.timeline.add(
                Sample(
                    time=round(now, 3),
                    vm=vm_id,
                    backed=sum(r.page_cnt for r in vm.backed) << PAGE_SHIFT,
                    onlined=onlined_pages(memory) << PAGE_SHIFT,
                    committed=vm.committed_bytes,
                    target=vm.requested_bytes if vm.requested_set else None,
                    step=self.current_step,
                )
            )

    async def _run_step(self, step: Step) -> Any:
        a = step.args
        node = self.nodes[a["vm"]] if "vm" in a else None
        handler: Callable[[ProcNode | None, dict[str, Any]], Awaitable[Any]] = getattr(
            self, f"_step_{step.kind}"
        )
        self._check_children()
        try:
            return await handler(node, a)
        except StepFailed as err:
            raise StepFailed(f"{step.label}: {err}") from None

    async def _command(self, kind: str, call: Awaitable[Any]) -> None:
        await self._rpc(call, PROTO_FIELDS[kind])

    async def _step_hot_add(self, node: ProcNode, a: dict[str, Any]) -> Any:
        request = control_pb2.HotAddCommand(
            vm_id=node.spec.id,
            region_bytes=a["region"],
            backed_bytes=a["backed"],
            offset_bytes=a.get("offset", 0),
            range_only=a.get("form", "region") == "range",
        )
        await self._command("hot_add", self.control.HotAdd(request, timeout=RPC_TIMEOUT))

    async def _step_back(self, node: ProcNode, a: dict[str, Any]) -> Any:
        request = control_pb2.BackCommand(vm_id=node.spec.id, size_bytes=a["size"])
        if "offset" in a:
            region_index = a.get("region", -1)
            regions = list((await self._get_vm(node)).regions)
            if not regions:
                raise StepFailed("back: the VM has no hot-add region yet")
            try:
                region = regions[region_index]
            except IndexError:
                raise StepFailed(f"back.region: no region {region_index}") from None
            request.start_page = region.start_page + (a["offset"] >> PAGE_SHIFT)
        await self._command("back", self.control.Back(request, timeout=RPC_TIMEOUT))

    async def _step_set_target(self, node: ProcNode, a: dict[str, Any]) -> Any:
        request = control_pb2.SetTargetRequest(vm_id=node.spec.id, requested_bytes=a["size"])
        await self._command("set_target", self.control.SetTarget(request, timeout=RPC_TIMEOUT))

    async def _step_balloon(self, node: ProcNode, a: dict[str, Any]) -> Any:
        request = control_pb2.BalloonCommand(vm_id=node.spec.id, size_bytes=a["size"])
        await self._command("balloon", self.control.Balloon(request, timeout=RPC_TIMEOUT))

    async def _step_resize(self, node: ProcNode, a: dict[str, Any]) -> Any:
        request = control_pb2.ResizeRequest(vm_id=node.spec.id, requested_bytes=a["size"])
        await self._command("resize", self.control.Resize(request, timeout=RPC_TIMEOUT))

    async def _step_unballoon(self, node: ProcNode, a: dict[str, Any]) -> Any:
        request = control_pb2.UnballoonCommand(vm_id=node.spec.id, size_bytes=a["size"])
        await self._command("unballoon", self.control.Unballoon(request, timeout=RPC_TIMEOUT))

    async def _sysfs_step(self, node: ProcNode, a: dict[str, Any], value: str) -> Any:
        request = guest_pb2.SetBlockStateRequest(index=a["block"], state=value)
        expect_error = a.get("expect_error")
        try:
            await node.guest.SetBlockState(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            failure = write_failure(err.details() or "")
            if failure is None:
                raise StepFailed(err.details() or err.code().name) from None
            name, reason = failure
            if expect_error is None:
                # What the in-process runner shows: the MemoryHotplugError's text.
                raise StepFailed(f"{reason} (-{name})") from None
            return sysfs_outcome(expect_error, name)
        return sysfs_outcome(expect_error, None)

    async def _step_online(self, node: ProcNode, a: dict[str, Any]) -> Any:
        return await self._sysfs_step(node, a, a.get("type", "online"))

    async def _step_offline(self, node: ProcNode, a: dict[str, Any]) -> Any:
        return await self._sysfs_step(node, a, "offline")

    async def _step_allocate(self, node: ProcNode, a: dict[str, Any]) -> Any:
        pages = a["size"] >> PAGE_SHIFT
        order = a.get("order", 0)
        zone = a.get("zone", "Normal")
        tag = a.get("tag", "workload")
        if a.get("in_window"):
            armed = guest_pb2.AllocateInWindowRequest(pages=pages, order=order, zone=zone, tag=tag)
            if a.get("block") is not None:
                armed.block = a["block"]
            await self._rpc(node.control.AllocateInWindow(armed, timeout=RPC_TIMEOUT))
            return {"armed": True}
        request = guest_pb2.AllocateRequest(pages=pages, order=order, zone=zone, tag=tag)
        if a.get("movable") is not None:
            request.movable = bool(a["movable"])
        reply = await self._rpc(node.control.Allocate(request, timeout=RPC_TIMEOUT))
        return {"allocated": reply.allocated_pages}

    async def _step_free(self, node: ProcNode, a: dict[str, Any]) -> Any:
        request = guest_pb2.FreeRequest(tag=a["tag"])
        if "size" in a:
            request.pages = a["size"] >> PAGE_SHIFT
        reply = await self._rpc(node.control.Free(request, timeout=RPC_TIMEOUT))
        return {"freed": reply.freed_pages}

    async def _step_inject(self, node: ProcNode, a: dict[str, Any]) -> Any:
        if "notifier" in a:
            notifier = guest_pb2.InjectNotifierErrorRequest(action=a["notifier"], errno=a["errno"])
            if a.get("count") is not None:
                notifier.count = a["count"]
            await self._rpc(
                node.control.InjectNotifierError(notifier, timeout=RPC_TIMEOUT),
            )
        else:
            slow = guest_pb2.InjectSlowOnliningRequest(seconds=a["slow_onlining"])
            if a.get("count") is not None:
                slow.count = a["count"]
            await self._rpc(node.control.InjectSlowOnlining(slow, timeout=RPC_TIMEOUT))

    async def _step_advance(self, node: ProcNode | None, a: dict[str, Any]) -> Any:
        await asyncio.sleep(a["seconds"])

    async def _step_dump(self, node: ProcNode, a: dict[str, Any]) -> Any:
        vm = await self._get_vm(node)
        backed = _ranges(vm.backed)
        if vm.HasField("virtio_mem"):
            # Boot memory plus what the device has plugged (the runner's Node.backed).
            truth = RangeSet()
            truth.add(0, vm.spec.boot_bytes >> PAGE_SHIFT)
            for s, e in _ranges(vm.virtio_mem.plugged):
                truth.add(s, e)
            backed = list(truth.ranges())
        request = guest_pb2.DumpRequest(
            skip_free=bool(a.get("skip_free")),
            host_truth=True,
            host_backed=pfn_ranges(backed),
        )
        reply = await self._rpc(node.control.Dump(request, timeout=RPC_TIMEOUT))
        unbacked = [(r.start_pfn, r.end_pfn) for r in reply.unbacked_read]
        memory = await self._memory(node)
        record_dump(
            node.seen,
            node.violations,
            unbacked,
            vm=node.spec.id,
            step=self.current_step,
            trace=self._trace(node, memory),
            expect=node.spec.expect_violations,
        )
        return dump_outcome(
            reply.pages_read, reply.pages_skipped_offline, sum(e - s for s, e in unbacked)
        )

    async def _step_expect(self, node: ProcNode, a: dict[str, Any]) -> Any:
        view = await self.vm_view(node)
        self.expectations += expectations(view, a, step=self.current_step, vm=node.spec.id)
        return None

    # -- results ----------------------------------------------------------------------------------

    async def vm_view(self, node: ProcNode, *, full: bool = False) -> dict[str, Any]:
        vm = await self._get_vm(node)
        memory = await self._memory(node)
        virtio = vm.HasField("virtio_mem")
        return vm_view(
            guest_view_pb(memory),
            strategy=memory.strategy,
            driver_mode=memory.driver_mode,
            host=None
            if virtio
            else host_view(
                (vm.requested_bytes >> PAGE_SHIFT) if vm.requested_set else None,
                vm.actual_bytes >> PAGE_SHIFT,
                sum(r.page_cnt for r in vm.backed),
                vm.dm_state,
            ),
            violations=node.violations,
            full=full,
            protocol=node.spec.protocol,
            virtio_mem=virtio_mem_view_pb(
                vm.virtio_mem, memory.virtio_mem if memory.HasField("virtio_mem") else None
            )
            if virtio
            else None,
        )

    async def result(self) -> dict[str, Any]:
        if self.sysfs_out is not None:
            await asyncio.sleep(SYSFS_FLUSH)  # the guests rewrite sysfs at most every 0.1 s
        views = await asyncio.gather(*(self.vm_view(n, full=True) for n in self.nodes.values()))
        return scenario_result(
            name=self.scenario.name,
            seed=self.seed,
            now=self.now,
            steps=self.step_results,
            expectations=self.expectations,
            vms=dict(zip(self.nodes, views, strict=True)),
            violations=[v for node in self.nodes.values() for v in node.violations],
        )

    def partial_result(self, error: str) -> dict[str, Any]:
        """The document when the processes can no longer be asked: no VM views."""
        result = scenario_result(
            name=self.scenario.name,
            seed=self.seed,
            now=self.now,
            steps=self.step_results,
            expectations=self.expectations,
            vms={},
            violations=[v for node in self.nodes.values() for v in node.violations],
        )
        result["ok"] = False
        result["error"] = error
        return result


async def run_processes(
    scenario: Scenario,
    *,
    seed: int | None = None,
    log_dir: Path | None = None,
    sysfs_out: Path | None = None,
    timeline: Timeline | None = None,
) -> dict[str, Any]:
    """Play ``scenario`` across processes; the JSON result (``ok`` False and ``error`` set
    when a step failed or a process did not start). Every child is stopped on the way out,
    also when this is cancelled (SIGTERM cancels it)."""
    runner = ProcessRunner(
        scenario, seed=seed, log_dir=log_dir, sysfs_out=sysfs_out, timeline=timeline
    )
    with sigterm_cancels_this_task():
        try:
            await runner.start()
            return await runner.play()
        except (ChildFailed, StepFailed, OSError) as err:
            return runner.partial_result(f"{type(err).__name__}: {err}")
        finally:
            await runner.stop()


__all__ = [
    "PROTO_FIELDS",
    "ProcNode",
    "ProcessRunner",
    "StepProgress",
    "check_supported",
    "guest_argv",
    "run_processes",
    "vm_spec_pb",
]
