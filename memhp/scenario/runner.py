"""Run a scenario in one process under a virtual clock.

One :class:`hypervisor.dm_host.DmHostSession` (``protocol: hyperv-dm``) or one
:class:`hypervisor.virtio_mem_host.VirtioMemDevice` (``protocol: virtio-mem``) and one
:class:`guest.vm.GuestVm` per VM, wired by in-memory message passing (a virtio-mem
response travels with the device's config space as it reads after the request, a
``resize`` with the config interrupt). Time only moves when nothing is
left to do now: the clock jumps to the next timer (an onlining delay, the 5 s
onlining wait of hv_balloon, a status report), so a run is deterministic for a
given scenario and seed and takes CPU time, not wall time.

After every step the system *settles* (every message delivered, no transaction
in flight, no hot-add, balloon or onlining work pending) and every invariant is
checked; a violation is recorded once, with the step that first showed it and
a short trace of the events before it. With a :class:`memhp.view.timeline.Timeline`
the runner also samples every VM's memory after setup and after every step.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from extents import RangeSet
from guest.blockmap import block_cells
from guest.invariants import check_guest
from guest.mm.dump import walk_dump
from guest.mm.errors import MemoryHotplugError
from guest.mm.memory import STATE_ONLINE
from guest.virtio_mem_invariants import check_virtio_mem
from guest.vm import GuestConfig, GuestVm
from hypervisor.dm_host import DmHostSession
from hypervisor.errors import HostCommandError
from hypervisor.virtio_mem_host import VirtioMemDevice
from hypervisor.vm import VmConfig
from memhp.logs import get_logger
from memhp.scenario.result import (
    OPERATORS,
    Finding,
    StepFailed,
    Violation,
    compare,
    dump_outcome,
    expectations,
    guest_view,
    host_view,
    record_dump,
    record_violations,
    scenario_result,
    sysfs_outcome,
    virtio_mem_view,
    vm_view,
)
from memhp.scenario.spec import HYPERV_DM, VIRTIO_MEM, Scenario, Step, VmSpec
from memhp.units import PAGE_SHIFT
from memhp.view.timeline import Sample, Timeline
from memhp.virtio_mem import AccessReport, VirtioMemConfig

log = get_logger("memhp.scenario")

#: The host's argument names, as the scenario file spells them, per step kind.
HOST_FIELDS: dict[str, dict[str, str]] = {
    "hot_add": {"region_pages": "region", "backed_pages": "backed", "offset_pages": "offset"},
    "back": {"pages": "size", "start_page": "offset"},
    "set_target": {"pages": "size"},
    "balloon": {"pages": "size"},
    "unballoon": {"pages": "size"},
    "resize": {"requested_size": "size"},
}

#: A step that has not settled after this much virtual time is reported stuck.
SETTLE_LIMIT_SECONDS = 3600.0
TRACE_LENGTH = 8
POST_INIT_DELAY = {"default": 0.0, "qemu": 50.0}


__all__ = [
    "HOST_FIELDS",
    "OPERATORS",
    "Node",
    "ScenarioRunner",
    "StepFailed",
    "Violation",
    "compare",
    "run_scenario",
]


@dataclass
class Node:
    """One VM: the host side that serves it (DM session, virtio-mem device) and the guest."""

    spec: VmSpec
    dm: DmHostSession | None
    guest: GuestVm
    device: VirtioMemDevice | None = None
    events: deque[str] = field(default_factory=lambda: deque(maxlen=TRACE_LENGTH))
    seen: set[Finding] = field(default_factory=set)
    violations: list[Violation] = field(default_factory=list)

    @property
    def host(self) -> DmHostSession:
        """The DM host session; StepFailed for a VM without a Hyper-V DM device."""
        if self.dm is None:
            raise StepFailed(
                f"vm {self.spec.id} has no Hyper-V DM device (protocol {self.spec.protocol})"
            )
        return self.dm

    @property
    def virtio(self) -> VirtioMemDevice:
        """The virtio-mem device; StepFailed for a VM without one."""
        if self.device is None:
            raise StepFailed(
                f"vm {self.spec.id} has no virtio-mem device (protocol {self.spec.protocol})"
            )
        return self.device

    def backed(self) -> RangeSet:
        """What the host backs: the DM ground truth, or boot memory plus plugged memory."""
        if self.dm is not None:
            return self.dm.backed
        backed = RangeSet()
        backed.add(0, self.spec.boot_memory >> PAGE_SHIFT)
        if self.device is not None:
            for s, e in self.device.plugged.ranges():
                backed.add(s, e)
        return backed


class ScenarioRunner:
    def __init__(
        self,
        scenario: Scenario,
        *,
        seed: int | None = None,
        check_every_step: bool = True,
        timeline: Timeline | None = None,
    ) -> None:
        self.scenario = scenario
        self.check_every_step = check_every_step
        self.timeline = timeline
        self.seed = scenario.seed if seed is None else seed
        self.rng = random.Random(self.seed)
        self.now = 0.0
        self.nodes: dict[str, Node] = {}
        self.expectations: list[dict[str, Any]] = []
        self.step_results: list[dict[str, Any]] = []
        self.current_step = "setup"
        for spec in scenario.vms:
            self.nodes[spec.id] = self._make_node(spec)

    # -- setup ---------------------------------------------------------------------

    def _make_node(self, spec: VmSpec) -> Node:
        block_pages = spec.block_size >> PAGE_SHIFT
        host: DmHostSession | None = None
        if HYPERV_DM in spec.protocols:
            host = DmHostSession(
                VmConfig(
                    vm_id=spec.id,
                    boot_pages=spec.boot_memory >> PAGE_SHIFT,
                    max_pages=spec.max_memory >> PAGE_SHIFT,
                    block_pages=block_pages,
                ),
                post_init_delay=POST_INIT_DELAY[self.scenario.profile],
            )
        device: VirtioMemDevice | None = None
        vmem = spec.virtio_mem
        if VIRTIO_MEM in spec.protocols:
            assert vmem is not None  # the parser requires it
            device = VirtioMemDevice(
                VirtioMemConfig(
                    block_size=vmem.block_size,
                    node_id=vmem.node,
                    addr=vmem.addr,
                    region_size=vmem.region_size,
                    usable_region_size=0,
                    plugged_size=0,
                    requested_size=vmem.requested,
                ),
                vm_id=spec.id,
            )
        node_ref: list[Node] = []

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if node_ref:
                self._trace(node_ref[0], "guest", kind, data)

        guest = GuestVm(
            GuestConfig(
                vm_id=spec.id,
                boot_pages=spec.boot_memory >> PAGE_SHIFT,
                block_size_bytes=spec.block_size,
                strategy=spec.strategy,
                driver_mode=spec.driver_mode,
                auto_online_blocks=spec.auto_online,
                udev_online_type=spec.udev_online,
                onlining_delay=spec.onlining_delay,
                onlining_jitter=spec.onlining_jitter,
                memmap_on_memory=spec.memmap_on_memory,
                pressure_report_delay=spec.pressure_report_delay,
                protocol=spec.protocol,
                virtio_mem_force_bbm=vmem.force_bbm if vmem else False,
                virtio_mem_unplug_online=vmem.unplug_online if vmem else True,
                virtio_mem_bbm_safe_unplug=vmem.bbm_safe_unplug if vmem else True,
            ),
            now=self.now,
            on_event=on_event,
            rng=random.Random(f"{self.seed}:{spec.id}"),
        )
        if device is not None:
            # The device's config space, as the guest finds it at attach.
            guest.attach_virtio_mem(device.config)
        node = Node(spec, host, guest, device)
        node_ref.append(node)
        return node

    def _trace(self, node: Node, source: str, kind: str, data: dict[str, Any]) -> None:
        shown = {k: v for k, v in data.items() if k not in ("vm_id", "state")}
        detail = ", ".join(f"{k}={v}" for k, v in shown.items())
        node.events.append(f"t={self.now:.3f} {source} {kind}" + (f" {detail}" if detail else ""))
        log.debug(kind, vm=node.spec.id, source=source, virtual_time=self.now, **shown)

    # -- the message loop --------------------------------------------------------------

    def _pump(self) -> None:
        """Deliver messages both ways and run everything that is due now."""
        moving = True
        while moving:
            moving = False
            for node in self.nodes.values():
                node.guest.run_until(self.now)
                if node.dm is not None:
                    for msg in node.guest.drain_outbox():
                        moving = True
                        for reply in node.dm.receive(msg, self.now):
                            node.guest.deliver(reply)
                    for reply in node.dm.tick(self.now):
                        moving = True
                        node.guest.deliver(reply)
                    for event in node.dm.drain_events():
                        self._trace(node, "host", event.kind, event.data)
                if node.device is not None and node.guest.virtio_mem:
                    moving |= self._pump_virtio(node, node.device)
                if node.guest.scheduler.busy:
                    moving = True

    def _pump_virtio(self, node: Node, device: VirtioMemDevice) -> bool:
        """The virtio-mem queue: requests answered (with the config after them), accesses."""
        msgs = node.guest.drain_virtio_outbox()
        for msg in msgs:
            if isinstance(msg, AccessReport):
                device.check_access(msg.ranges, msg.what)
            else:
                node.guest.deliver_virtio(device.request(msg, self.now), device.config)
        for event in device.drain_events():
            self._trace(node, "host", event.kind, event.data)
        return bool(msgs)

    def _deliver(self, node: Node, messages: list[Any]) -> None:
        for msg in messages:
            node.guest.deliver(msg)

    def _busy(self) -> bool:
        return any(
            node.guest.busy or (node.dm is not None and node.dm.busy)
            for node in self.nodes.values()
        )

    def _next_deadline(self) -> float | None:
        deadlines: list[float] = []
        for node in self.nodes.values():
            d = node.guest.next_deadline()
            if d is not None:
                deadlines.append(d)
            h = node.dm.next_deadline() if node.dm is not None else None
            if h is not None:
                deadlines.append(h)
        return min(deadlines) if deadlines else None

    def settle(self) -> None:
        """Run until nothing but periodic work is left (or the step is stuck)."""
        start = self.now
        self._pump()
        while self._busy():
            deadline = self._next_deadline()
            if deadline is None:
                raise StepFailed("stuck: work is pending but no timer will ever fire")
            if deadline - start > SETTLE_LIMIT_SECONDS:
                raise StepFailed(
                    f"did not settle within {SETTLE_LIMIT_SECONDS:.0f} s of virtual time"
                )
            self.now = max(self.now, deadline)
            self._pump()

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        self._pump()
        while True:
            deadline = self._next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            self._pump()
        self.now = end
        self._pump()

    # -- running -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.current_step = "setup"
        for node in self.nodes.values():
            try:
                node.guest.start()
            except MemoryHotplugError as err:
                # A driver's probe failed (two drivers for the one online_page_callback).
                raise StepFailed(f"setup: vm {node.spec.id}: {err.message}") from None
        self.settle()
        self.check()
        self.sample()
        for step in self.scenario.steps:
            self.current_step = step.label
            record: dict[str, Any] = {"index": step.index + 1, "kind": step.kind, "line": step.line}
            try:
                outcome = self._run_step(step)
                if outcome is not None:
                    record["result"] = outcome
                self.settle()
            except StepFailed as err:
                record["error"] = str(err)
                self.step_results.append(record)
                raise
            record["time"] = round(self.now, 6)
            self.step_results.append(record)
            if self.check_every_step:
                self.check()
            self.sample()
            log.debug("step done", step=step.label, time=self.now)
        return self.result()

    def sample(self) -> None:
        """One timeline sample per VM (bytes), when there is a timeline."""
        if self.timeline is None:
            return
        for vm_id, node in self.nodes.items():
            onlined = sum(
                c.nr_pages - c.page_offline - c.ballooned
                for c in block_cells(node.guest.mm)
                if c.state == STATE_ONLINE
            )
            target = node.host.target_pages
            self.timeline.add(
                Sample(
                    time=self.now,
                    vm=vm_id,
                    backed=len(node.host.backed) << PAGE_SHIFT,
                    onlined=onlined << PAGE_SHIFT,
                    committed=(node.host.committed_pages or 0) << PAGE_SHIFT,
                    target=None if target is None else target << PAGE_SHIFT,
                    step=self.current_step,
                )
            )

    def check(self) -> None:
        for node in self.nodes.values():
            mm = node.guest.mm
            if node.dm is not None:
                offered = RangeSet()
                for region in node.dm.regions:
                    for s, e in region.backed.ranges():
                        offered.add(s, e)
                findings = check_guest(mm, node.guest.hv_balloon, node.dm.backed, offered)
            else:
                findings = check_guest(mm, None, None)
            device = node.device
            if device is not None:
                for driver in node.guest.virtio_mem:
                    findings += check_virtio_mem(mm, driver, device.plugged, device.plugged_size)
            items: list[Finding] = [
                (f.invariant, f.start_pfn, f.end_pfn, f.message) for f in findings
            ]
            host_findings = []
            if node.dm is not None:
                host_findings += [*node.dm.violations, *node.dm.protocol_errors]
            if device is not None:
                host_findings += [*device.violations, *device.protocol_errors]
            for violation in host_findings:
                items.append(
                    (
                        str(violation.kind),
                        violation.pfn_start or 0,
                        violation.pfn_end or 0,
                        violation.message,
                    )
                )
            record_violations(
                node.seen,
                node.violations,
                items,
                vm=node.spec.id,
                step=self.current_step,
                trace=list(node.events),
                expect=node.spec.expect_violations,
            )

    # -- steps ---------------------------------------------------------------------------

    def _run_step(self, step: Step) -> Any:
        a = step.args
        node = self.nodes[a["vm"]] if "vm" in a else None
        handler = getattr(self, f"_step_{step.kind}")
        try:
            return handler(node, a)
        except StepFailed as err:
            raise StepFailed(f"{step.label}: {err}") from None
        except HostCommandError as err:
            field = HOST_FIELDS.get(step.kind, {}).get(err.field, err.field)
            raise StepFailed(f"{step.label}: {field}: {err.message}") from None
        except MemoryHotplugError as err:
            raise StepFailed(f"{step.label}: {err}") from None
        except ValueError as err:
            raise StepFailed(f"{step.label}: {err}") from None

    def _step_hot_add(self, node: Node, a: dict[str, Any]) -> Any:
        msgs = node.host.hot_add(
            a["region"] >> PAGE_SHIFT,
            a["backed"] >> PAGE_SHIFT,
            self.now,
            offset_pages=a.get("offset", 0) >> PAGE_SHIFT,
            with_region=a.get("form", "region") == "region",
        )
        self._deliver(node, msgs)
        return None

    def _step_back(self, node: Node, a: dict[str, Any]) -> Any:
        start_page = None
        if "offset" in a:
            region_index = a.get("region", -1)
            regions = node.host.regions
            if not regions:
                raise StepFailed("back: the VM has no hot-add region yet")
            try:
                region = regions[region_index]
            except IndexError:
                raise StepFailed(f"back.region: no region {region_index}") from None
            start_page = region.start + (a["offset"] >> PAGE_SHIFT)
        msgs = node.host.back(a["size"] >> PAGE_SHIFT, self.now, start_page=start_page)
        self._deliver(node, msgs)
        return None

    def _step_set_target(self, node: Node, a: dict[str, Any]) -> Any:
        self._deliver(node, node.host.set_target(a["size"] >> PAGE_SHIFT, self.now))

    def _step_balloon(self, node: Node, a: dict[str, Any]) -> Any:
        self._deliver(node, node.host.balloon(a["size"] >> PAGE_SHIFT, self.now))

    def _step_unballoon(self, node: Node, a: dict[str, Any]) -> Any:
        self._deliver(node, node.host.unballoon(a["size"] >> PAGE_SHIFT, self.now))

    def _sysfs_step(self, a: dict[str, Any], action: Any) -> Any:
        expect_error = a.get("expect_error")
        try:
            action()
        except MemoryHotplugError as err:
            if expect_error is None:
                raise
            return sysfs_outcome(expect_error, err.name)
        return sysfs_outcome(expect_error, None)

    def _step_online(self, node: Node, a: dict[str, Any]) -> Any:
        return self._sysfs_step(
            a, lambda: node.guest.online_block(a["block"], a.get("type", "online"))
        )

    def _step_offline(self, node: Node, a: dict[str, Any]) -> Any:
        return self._sysfs_step(a, lambda: node.guest.offline_block(a["block"]))

    def _step_allocate(self, node: Node, a: dict[str, Any]) -> Any:
        pages = a["size"] >> PAGE_SHIFT
        order = a.get("order", 0)
        zone = a.get("zone", "Normal")
        tag = a.get("tag", "workload")
        if a.get("in_window"):
            node.guest.allocate_in_window(
                pages, order=order, zone=zone, tag=tag, block=a.get("block")
            )
            return {"armed": True}
        got = node.guest.allocate(pages, order=order, zone=zone, tag=tag, movable=a.get("movable"))
        return {"allocated": got}

    def _step_free(self, node: Node, a: dict[str, Any]) -> Any:
        pages = a["size"] >> PAGE_SHIFT if "size" in a else None
        return {"freed": node.guest.free(a["tag"], pages)}

    def _step_inject(self, node: Node, a: dict[str, Any]) -> Any:
        if "notifier" in a:
            node.guest.inject_notifier_error(a["notifier"], a["errno"], a.get("count"))
        else:
            node.guest.inject_slow_onlining(a["slow_onlining"], a.get("count"))

    def _step_advance(self, node: Node | None, a: dict[str, Any]) -> Any:
        self.advance(a["seconds"])

    def _step_resize(self, node: Node, a: dict[str, Any]) -> Any:
        change = node.virtio.resize(a["size"], self.now)
        # The config interrupt.
        node.guest.virtio_config_changed(change.config)

    def _step_dump(self, node: Node, a: dict[str, Any]) -> Any:
        report = walk_dump(node.guest.mm, node.backed(), skip_free=bool(a.get("skip_free")))
        record_dump(
            node.seen,
            node.violations,
            report.unbacked_read,
            vm=node.spec.id,
            step=self.current_step,
            trace=list(node.events),
            expect=node.spec.expect_violations,
        )
        return dump_outcome(report.pages_read, report.pages_skipped_offline, report.unbacked_pages)

    def _step_expect(self, node: Node, a: dict[str, Any]) -> Any:
        view = self.vm_view(node)
        self.expectations += expectations(view, a, step=self.current_step, vm=node.spec.id)
        return None

    # -- results -----------------------------------------------------------------------------

    def vm_view(self, node: Node, *, full: bool = False) -> dict[str, Any]:
        dm, device = node.dm, node.device
        return vm_view(
            guest_view(node.guest),
            strategy=node.spec.strategy,
            driver_mode=node.spec.driver_mode,
            host=None
            if dm is None
            else host_view(dm.target_pages, dm.current_pages, len(dm.backed), dm.state),
            violations=node.violations,
            full=full,
            protocol=node.spec.protocol,
            virtio_mem=None
            if device is None
            else virtio_mem_view(
                device.config,
                answered=device.answered,
                driver=node.guest.virtio_mem[0] if node.guest.virtio_mem else None,
            ),
        )

    def result(self) -> dict[str, Any]:
        if not self.check_every_step:
            self.check()
        return scenario_result(
            name=self.scenario.name,
            seed=self.seed,
            now=self.now,
            steps=self.step_results,
            expectations=self.expectations,
            vms={vm_id: self.vm_view(node, full=True) for vm_id, node in self.nodes.items()},
            violations=[v for node in self.nodes.values() for v in node.violations],
        )


def run_scenario(
    scenario: Scenario, *, seed: int | None = None
) -> tuple[dict[str, Any], ScenarioRunner]:
    runner = ScenarioRunner(scenario, seed=seed)
    return runner.run(), runner
