"""One emulated guest: memory model, scheduler, protocol drivers, udev and workloads.

Sans-I/O like its parts: :meth:`GuestVm.deliver` takes a host message,
:meth:`GuestVm.drain_outbox` gives the messages for the host, and
:meth:`GuestVm.run_until` moves the guest's clock. The scenario runner drives it
under a virtual clock; the guest-agent process drives it with asyncio.

``GuestConfig.protocol`` says which devices the guest has: ``hyperv-dm`` (the
hv_balloon driver, the default), ``virtio-mem`` (one virtio_mem driver per device,
each device's config given at attach with :meth:`GuestVm.attach_virtio_mem`), or
both. Both fails at :meth:`GuestVm.start` exactly as Linux does: hv_balloon holds the
one system-wide ``online_page_callback``, so virtio_mem's probe gets -EINVAL
(:class:`guest.drivers.virtio_mem.VirtioMemProbeError`). A virtio-mem device has its
own message channel (the gRPC side opens a stream per device):
:meth:`GuestVm.drain_virtio_outbox`, :meth:`GuestVm.deliver_virtio`,
:meth:`GuestVm.virtio_config_changed`. :meth:`GuestVm.deliver_virtio` also takes the
device's config space as it reads after the request (a config read is synchronous on
real hardware; ``plugged_size`` changes and UNPLUG_ALL's shrinking of the usable region
raise no interrupt), so a transport sends the config along with each response.
:attr:`GuestVm.driver` is the hv_balloon driver and exists only with ``hyperv-dm``
(:attr:`GuestVm.hv_balloon` is None otherwise).

What user space would do through sysfs (``echo online_movable > state``) is a
method here too, and so is what a concurrent allocator does: an allocation can
be armed to land *inside* the next onlining window of a zone (after the new pages
reach the buddy, before ``MEM_ONLINE``), which is how the race of the
``online-then-reclaim`` strategy is shown.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guest.drivers.hv_balloon import MODES, STRATEGIES, HvBalloon
from guest.drivers.virtio_mem import VirtioMem, VirtioMemDevices, is_work_task
from guest.kernel import Scheduler, Sleep, Task
from guest.mm.errors import ENOENT, MemoryHotplugError
from guest.mm.geometry import Geometry
from guest.mm.memory import (
    MMOP_OFFLINE,
    ONLINE_TYPES,
    PHASE_CALLBACKS_DONE,
    PHASE_WINDOW,
    STATE_OFFLINE,
    STATE_ONLINE,
    ZONES,
    HotplugLockBusy,
    MemoryBlock,
    MemoryManager,
)
from guest.mm.notifier import (
    MEM_CANCEL_ONLINE,
    MEM_OFFLINE,
    MEM_ONLINE,
    NOTIFY_OK,
    MemoryAction,
    MemoryNotify,
    NotifierErrorInject,
)
from guest.sysfs import sysfs_state_write, sysfs_streq
from memhp.dm import DmMessage
from memhp.virtio_mem import AccessReport, VirtioMemConfig, VirtioMemRequest, VirtioMemResponse

#: Driver work a protocol step waits for (user space: udev, sysfs writes, runs on its own).
PROTOCOL_TASKS = frozenset({"hv_balloon:probe", "hv_balloon:hot_add", "hv_balloon:balloon_up"})
#: The block events come from a memory notifier called after every other one.
EVENTS_NOTIFIER_PRIORITY = -10_000
HYPERV_DM = "hyperv-dm"
VIRTIO_MEM = "virtio-mem"
#: The devices a guest can have (both at once fails at start, as in Linux).
PROTOCOLS = (HYPERV_DM, VIRTIO_MEM, f"{HYPERV_DM}+{VIRTIO_MEM}")


@dataclass
class GuestConfig:
    """What the guest's command line / the scenario's VM entry says."""

    vm_id: str
    boot_pages: int
    block_size_bytes: int = 128 << 20
    strategy: str = "callback"
    driver_mode: str = "upstream"
    #: ``/sys/devices/system/memory/auto_online_blocks`` (the kernel's own onlining).
    auto_online_blocks: str = MMOP_OFFLINE
    #: A udev rule that onlines every new block with this type after ``onlining_delay``.
    udev_online_type: str | None = None
    onlining_delay: float = 0.0
    #: udev waits ``onlining_delay`` plus a uniform random share of this (seeded).
    onlining_jitter: float = 0.0
    memmap_on_memory: bool = False
    pressure_report_delay: int = 45
    status_interval: float = 1.0
    #: hyperv-dm | virtio-mem | hyperv-dm+virtio-mem
    protocol: str = HYPERV_DM
    #: virtio_mem module parameters.
    virtio_mem_force_bbm: bool = False
    virtio_mem_unplug_online: bool = True
    virtio_mem_bbm_safe_unplug: bool = True

    @property
    def protocols(self) -> tuple[str, ...]:
        return tuple(self.protocol.split("+"))

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol: must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}"
            )
        if self.auto_online_blocks not in ONLINE_TYPES:
            raise ValueError(
                f"auto_online: must be one of {', '.join(ONLINE_TYPES)}, "
                f"not {self.auto_online_blocks!r}"
            )
        if self.udev_online_type is not None and self.udev_online_type not in ONLINE_TYPES[1:]:
            raise ValueError(
                f"udev_online: must be one of {', '.join(ONLINE_TYPES[1:])}, "
                f"not {self.udev_online_type!r}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy: must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}"
            )
        if self.driver_mode not in MODES:
            raise ValueError(
                f"driver_mode: must be one of {', '.join(MODES)}, not {self.driver_mode!r}"
            )
        if not (math.isfinite(self.onlining_delay) and self.onlining_delay >= 0):
            raise ValueError(
                f"onlining_delay: must be a finite number of seconds >= 0, "
                f"not {self.onlining_delay!r}"
            )
        if not (math.isfinite(self.onlining_jitter) and self.onlining_jitter >= 0):
            raise ValueError(
                f"onlining_jitter: must be a finite number of seconds >= 0, "
                f"not {self.onlining_jitter!r}"
            )
        if not (math.isfinite(self.status_interval) and self.status_interval > 0):
            raise ValueError(
                f"status_interval: must be a finite number of seconds > 0, "
                f"not {self.status_interval!r}"
            )


@dataclass
class WindowAllocation:
    pages: int
    order: int
    zone: str
    tag: str
    #: Only the window of this block (None: the next window in the zone).
    block: int | None = None
    result: list[tuple[int, int]] = field(default_factory=list)
    done: bool = False


class GuestVm:
    def __init__(
        self,
        config: GuestConfig,
        *,
        now: float = 0.0,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        #: The only source of randomness (udev jitter): seeded, so runs repeat.
        self.rng = rng or random.Random(0)
        self.scheduler = Scheduler(now)
        self.mm = MemoryManager(
            config.boot_pages,
            Geometry(config.block_size_bytes),
            auto_online_blocks=config.auto_online_blocks,
            memmap_on_memory=config.memmap_on_memory,
        )
        self._on_event = on_event
        #: The hv_balloon driver (its probe installs its online_page_callback at once).
        self.hv_balloon: HvBalloon | None = None
        if HYPERV_DM in config.protocols:
            self.hv_balloon = HvBalloon(
                self.mm,
                self.scheduler,
                mode=config.driver_mode,
                strategy=config.strategy,
                pressure_report_delay=config.pressure_report_delay,
                status_interval=config.status_interval,
                on_event=self._driver_event,
            )
        #: ``virtio_mem_devices``: the drivers of the attached virtio-mem devices.
        self.virtio_mem_devices = VirtioMemDevices(self.mm)
        self.virtio_mem: list[VirtioMem] = []
        self.started = False
        self.error_inject = NotifierErrorInject(self.mm.notifier, priority=0)
        #: Seconds an onlining pauses after its callbacks, before the sections go online.
        self.slow_onlining: float = 0.0
        self.slow_onlining_count: int | None = None
        self.window_allocations: list[WindowAllocation] = []
        #: Hooks the checker uses: called at each onlining phase.
        self.phase_observers: list[Callable[[MemoryBlock, str], None]] = []
        #: What each block in the middle of onlining is onlined as (for its event).
        self._online_types: dict[int, str] = {}
        self.mm.block_added_hooks.append(self._udev_block_added)
        self.mm.phase_hooks.append(self._on_phase)
        self.mm.access_hooks.append(self._on_access)
        self.mm.notifier.register(
            self._block_events, EVENTS_NOTIFIER_PRIORITY, name="guest-block-events"
        )

    # -- events ------------------------------------------------------------------

    def _emit(self, event_kind: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(event_kind, data)

    def _driver_event(self, event_kind: str, data: dict[str, object]) -> None:
        if self._on_event is not None:
            self._on_event(event_kind, dict(data))

    def _block_events(self, action: MemoryAction, arg: MemoryNotify) -> int:
        """``block_onlined`` / ``block_offlined``, whoever did it (this class, sysfs, the
        kernel's auto-onlining), like the KOBJ_ONLINE/KOBJ_OFFLINE uevents."""
        if action not in (MEM_ONLINE, MEM_OFFLINE, MEM_CANCEL_ONLINE):
            return NOTIFY_OK
        block = self.mm.block_of(arg.start_pfn)
        if block is None:
            return NOTIFY_OK
        online_type = self._online_types.pop(block.id, None)
        if action == MEM_ONLINE:
            # online_type: None when whoever onlined it did not say (a direct mm call).
            self._emit("block_onlined", block=block.id, online_type=online_type, zone=block.zone)
        elif action == MEM_OFFLINE:
            self._emit("block_offlined", block=block.id)
        return NOTIFY_OK

    def write_block_state(self, block_id: int, value: str) -> None:
        """``echo value > memoryN/state`` (:func:`guest.sysfs.sysfs_state_write`), with
        the online type remembered for the block's event.

        Raises :class:`HotplugLockBusy` (retry later, as for ``mem_hotplug_lock``) while
        a virtio-mem work holds its ``hotplug_mutex`` over the block and the write would
        change its state: the kernel's writer blocks in the driver's memory notifier
        until the work drops it (as :meth:`online_block` / :meth:`offline_block` wait).
        """
        if self._driver_mutex_held(block_id) and self._state_write_changes(block_id, value):
            raise HotplugLockBusy(f"memory{block_id}: virtio_mem hotplug_mutex held by its work")
        if value.strip() != "offline":
            self._online_types[block_id] = value.strip()
        try:
            sysfs_state_write(self.mm, block_id, value)
        except BaseException:
            self._online_types.pop(block_id, None)
            raise

    # -- the transport side ---------------------------------------------------------

    @property
    def driver(self) -> HvBalloon:
        """The hv_balloon driver; ValueError for a guest without a Hyper-V DM device."""
        if self.hv_balloon is None:
            raise ValueError(
                f"vm {self.config.vm_id}: no Hyper-V DM device (protocol {self.config.protocol})"
            )
        return self.hv_balloon

    def attach_virtio_mem(self, config: VirtioMemConfig) -> VirtioMem:
        """A virtio-mem device with this config space (from the host); probed at :meth:`start`.

        A device attached after start is probed at once (hotplug of the PCI device).
        """
        if VIRTIO_MEM not in self.config.protocols:
            raise ValueError(
                f"vm {self.config.vm_id}: no virtio-mem device (protocol {self.config.protocol})"
            )
        if config.addr >> 12 < self.mm.boot_end_pfn:
            raise ValueError(
                f"vm {self.config.vm_id}: the virtio-mem region at {config.addr:#x} overlaps "
                f"boot memory (which ends at {self.mm.boot_end_pfn << 12:#x})"
            )
        c = self.config
        driver = VirtioMem(
            self.mm,
            self.scheduler,
            self.virtio_mem_devices,
            config,
            name=f"virtio{len(self.virtio_mem)}",
            force_bbm=c.virtio_mem_force_bbm,
            unplug_online=c.virtio_mem_unplug_online,
            bbm_safe_unplug=c.virtio_mem_bbm_safe_unplug,
            on_event=self._driver_event,
        )
        self.virtio_mem.append(driver)
        if self.started:
            driver.probe()
        return driver

    def start(self) -> None:
        """Boot the drivers: hv_balloon negotiates, each virtio_mem device probes.

        Raises :class:`guest.drivers.virtio_mem.VirtioMemProbeError` when a virtio-mem
        device cannot install the online_page_callback (hv_balloon holds it).
        """
        if VIRTIO_MEM in self.config.protocols and not self.virtio_mem:
            raise ValueError(
                f"vm {self.config.vm_id}: protocol {self.config.protocol} needs a virtio-mem "
                "device (attach_virtio_mem before start)"
            )
        self.started = True
        if self.hv_balloon is not None:
            self.hv_balloon.start()
        for driver in self.virtio_mem:
            driver.probe()

    def renegotiate(self) -> None:
        """The DM channel was reset or replaced: the driver negotiates again, memory stays."""
        self.driver.renegotiate()

    def deliver(self, msg: DmMessage) -> None:
        self.driver.receive(msg)

    def drain_outbox(self) -> list[DmMessage]:
        return self.hv_balloon.drain_outbox() if self.hv_balloon is not None else []

    def _virtio(self, device: int) -> VirtioMem:
        try:
            return self.virtio_mem[device]
        except IndexError:
            raise ValueError(
                f"vm {self.config.vm_id}: no virtio-mem device {device} "
                f"({len(self.virtio_mem)} attached)"
            ) from None

    def drain_virtio_outbox(self, device: int = 0) -> list[VirtioMemRequest | AccessReport]:
        """The requests (and access reports) for virtio-mem device ``device``."""
        return self._virtio(device).drain_outbox()

    def deliver_virtio(
        self,
        response: VirtioMemResponse,
        config: VirtioMemConfig | None = None,
        device: int = 0,
    ) -> None:
        """The device's response, with its config space as it reads after the request."""
        self._virtio(device).deliver(response, config)

    def virtio_config_changed(self, config: VirtioMemConfig, device: int = 0) -> None:
        """The device's config interrupt (e.g. a new ``requested_size``)."""
        self._virtio(device).config_changed(config)

    def run_until(self, now: float) -> None:
        self.scheduler.run_until(now)

    def next_deadline(self) -> float | None:
        return self.scheduler.next_deadline()

    @property
    def now(self) -> float:
        return self.scheduler.now

    @property
    def busy(self) -> bool:
        """Driver work is pending (probe, a hot-add, a balloon request).

        User-space work (udev onlining, a slow sysfs onlining) runs on its own time,
        like in a real guest: it does not keep a protocol step from finishing.
        """
        return self.scheduler.busy or any(
            name in PROTOCOL_TASKS or is_work_task(name) for name in self.scheduler.tasks
        )

    # -- user space: sysfs ----------------------------------------------------------

    def online_block(self, block_id: int, online_type: str = "online") -> bool:
        """``echo <online_type> > memoryN/state``; raises MemoryHotplugError.

        With slow onlining injected, the onlining runs as a task that pauses between
        its callbacks and marking the sections online; errors then become events.
        While another onlining holds ``mem_hotplug_lock`` the write blocks: here it
        becomes a task that waits for the lock. Returns whether it ran at once.
        """
        self._check_block(block_id)
        pause = self._take_slow()
        if (
            pause > 0
            or self.mm.hotplug_lock_holder is not None
            or self._driver_mutex_held(block_id)
        ):
            self.scheduler.spawn(
                f"online:memory{block_id}", self._online_task(block_id, online_type, pause)
            )
            return False
        self._online_types[block_id] = online_type
        try:
            self.mm.online_block(block_id, online_type)
        finally:
            self._online_types.pop(block_id, None)
        return True

    def offline_block(self, block_id: int) -> bool:
        """``echo offline > memoryN/state``; waits (as a task) for ``mem_hotplug_lock``."""
        self._check_block(block_id)
        if self.mm.hotplug_lock_holder is not None or self._driver_mutex_held(block_id):
            self.scheduler.spawn(f"offline:memory{block_id}", self._offline_task(block_id))
            return False
        self.mm.offline_block(block_id)
        return True

    def _offline_task(self, block_id: int) -> Task:
        while self.mm.hotplug_lock_holder is not None or self._driver_mutex_held(block_id):
            yield Sleep(0.001)
        try:
            self.mm.offline_block(block_id)
        except MemoryHotplugError as err:
            self._emit("offline_failed", block=block_id, errno=err.name, message=err.message)

    def _driver_mutex_held(self, block_id: int) -> bool:
        """A virtio-mem work holds its ``hotplug_mutex`` over this block's memory.

        The kernel's sysfs writer would block in the driver's memory notifier until the
        work drops it; here the write waits (as a task) before it starts.
        """
        block = self.mm.blocks.get(block_id)
        if block is None:
            return False
        return any(
            d.hotplug_mutex_owner == "wq" and d.start_pfn <= block.start_pfn < d.end_pfn
            for d in self.virtio_mem
        )

    def _state_write_changes(self, block_id: int, value: str) -> bool:
        """A ``memoryN/state`` write of ``value`` would reach the memory notifiers (a
        valid online type for an offline block, ``offline`` for an online one)."""
        block = self.mm.blocks.get(block_id)
        if block is None or not any(sysfs_streq(value, t) for t in ONLINE_TYPES):
            return False
        if sysfs_streq(value, MMOP_OFFLINE):
            return block.state == STATE_ONLINE
        return block.state == STATE_OFFLINE

    def _check_block(self, block_id: int) -> None:
        """No ``memoryN`` directory: the write fails to open it (-ENOENT), as in sysfs."""
        if block_id not in self.mm.blocks:
            raise MemoryHotplugError(ENOENT, f"memory{block_id}/state: no such memory block")

    def _take_slow(self) -> float:
        if self.slow_onlining <= 0:
            return 0.0
        if self.slow_onlining_count is not None:
            if self.slow_onlining_count <= 0:
                return 0.0
            self.slow_onlining_count -= 1
        return self.slow_onlining

    def _online_task(self, block_id: int, online_type: str, pause: float) -> Task:
        while True:
            while self._driver_mutex_held(block_id):
                yield Sleep(0.001)
            try:
                self._online_types[block_id] = online_type
                steps = self.mm.online_pages_steps(block_id, online_type)
                for phase in steps:
                    if phase == PHASE_CALLBACKS_DONE and pause > 0:
                        yield Sleep(pause)
                break
            except HotplugLockBusy:
                yield Sleep(0.001)
            except MemoryHotplugError as err:
                self._emit("online_failed", block=block_id, errno=err.name, message=err.message)
                return
            finally:
                self._online_types.pop(block_id, None)

    def _udev_block_added(self, block: MemoryBlock) -> None:
        self._emit("block_added", block=block.id, start_pfn=block.start_pfn)
        if self.mm.auto_online_blocks != MMOP_OFFLINE:
            # add_memory onlines it right after this uevent (auto_online_blocks).
            self._online_types[block.id] = self.mm.auto_online_blocks
        if self.config.udev_online_type is None:
            return
        self.scheduler.spawn(f"udev:memory{block.id}", self._udev_task(block.id))

    def _udev_task(self, block_id: int) -> Task:
        delay = self.config.onlining_delay
        if self.config.onlining_jitter > 0:
            delay += self.rng.uniform(0, self.config.onlining_jitter)
        if delay > 0:
            yield Sleep(delay)
        block = self.mm.blocks.get(block_id)
        if block is None or block.state != "offline":
            return
        online_type = self.config.udev_online_type or "online"
        pause = self._take_slow()
        yield from self._online_task(block_id, online_type, pause)

    # -- fault injection ---------------------------------------------------------------

    def inject_notifier_error(self, action: str, errno: int, count: int | None = None) -> None:
        """``echo -E > .../notifier-error-inject/memory/actions/<action>/error``."""
        try:
            act = MemoryAction[action]
        except KeyError:
            raise ValueError(
                f"notifier action must be MEM_GOING_ONLINE or MEM_GOING_OFFLINE, not {action!r}"
            ) from None
        self.error_inject.set(act, -abs(errno), count)

    def inject_slow_onlining(self, seconds: float, count: int | None = None) -> None:
        self.slow_onlining = seconds
        self.slow_onlining_count = count

    # -- workloads ------------------------------------------------------------------------

    def allocate(
        self,
        pages: int,
        *,
        order: int = 0,
        zone: str = "Normal",
        tag: str = "workload",
        movable: bool | None = None,
    ) -> int:
        """Allocate ``pages`` pages in ``2^order`` blocks; returns how many were allocated."""
        if zone not in ZONES:
            raise ValueError(f"zone: must be one of {', '.join(ZONES)}, not {zone!r}")
        count = pages >> order
        taken = self.mm.alloc_pages(order, count, zone=zone, tag=tag, movable=movable)
        got = sum(e - s for s, e in taken)
        self._emit("allocated", tag=tag, zone=zone, requested=pages, pages=got)
        return got

    def allocate_in_window(
        self,
        pages: int,
        *,
        order: int = 0,
        zone: str = "Movable",
        tag: str = "window",
        block: int | None = None,
    ) -> WindowAllocation:
        """Arm an allocation that runs inside the next onlining window of ``zone``.

        With ``block``, only that block's window (e.g. the partially backed one).
        """
        if zone not in ZONES:
            raise ValueError(f"zone: must be one of {', '.join(ZONES)}, not {zone!r}")
        armed = WindowAllocation(pages, order, zone, tag, block)
        self.window_allocations.append(armed)
        return armed

    def free(self, tag: str, pages: int | None = None) -> int:
        freed = self.mm.free_pages_of(tag, pages)
        self._emit("freed", tag=tag, pages=freed)
        return freed

    def _on_phase(self, block: MemoryBlock, phase: str) -> None:
        for observer in list(self.phase_observers):
            observer(block, phase)
        if phase != PHASE_WINDOW:
            return
        for armed in self.window_allocations:
            if armed.done or armed.zone != block.zone:
                continue
            if armed.block is not None and armed.block != block.id:
                continue
            armed.done = True
            armed.result = self.mm.alloc_pages(
                armed.order, armed.pages >> armed.order, zone=armed.zone, tag=armed.tag
            )
            got = sum(e - s for s, e in armed.result)
            self._emit(
                "allocated_in_window", block=block.id, tag=armed.tag, zone=armed.zone, pages=got
            )
        self.window_allocations = [a for a in self.window_allocations if not a.done]

    def _on_access(self, ranges: list[tuple[int, int]], tag: str) -> None:
        if self.hv_balloon is not None:
            self.hv_balloon.report_access(ranges, "allocate")
        for driver in self.virtio_mem:
            driver.report_access(ranges, "allocate")
