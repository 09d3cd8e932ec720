"""The Linux ``virtio_mem`` driver (``drivers/virtio/virtio_mem.c``) on the memory model.

Sans-I/O like :mod:`guest.drivers.hv_balloon`: requests for the device collect in
:attr:`VirtioMem.outbox`; the device's answer comes back through
:meth:`VirtioMem.deliver` together with the config space as the device shows it after
the request (a virtio config read is synchronous; the transport hands the driver
what that read would return); the config interrupt is :meth:`VirtioMem.config_changed`.
The work item (``virtio_mem_run_wq``), the retry timer and every wait for a response
run on the guest's :class:`guest.kernel.Scheduler`.

What is modelled, with the kernel's names (mm-model.md §5.2; current kernels, where
offlining leaves the managed count of PageOffline pages alone, 6.11+):

* ``virtio_mem_init``: ``sb_size = max(MAX_ORDER_NR_PAGES, pageblock_nr_pages)`` pages
  (4 MiB) then ``max(device block size, sb_size)``; Sub Block Mode when ``sb_size`` is
  below the memory block size and ``force_bbm`` is off, else Big Block Mode with
  ``bb_size = max(device block size, memory block size)``; ``offline_threshold =
  max(2 * memory block, 1 GiB)`` (BBM: at least two big blocks); the first block id is
  the device address rounded up to a block.
* probe: ``unplug_all_required`` when ``plugged_size`` != 0, the memory notifier, and
  the shared ``online_page_callback``: the first device of a guest installs
  ``virtio_mem_online_page_cb`` (:class:`VirtioMemDevices` is the kernel's
  ``virtio_mem_devices`` list), later devices join the list; when another driver
  (hv_balloon) holds the callback, ``set_online_page_callback`` fails with -EINVAL and
  so does the probe (:class:`VirtioMemProbeError`).
* the work loop: UNPLUG_ALL if required, config refresh, leftovers, then plug or
  unplug toward ``requested_size``; -ENOSPC stops, -ETXTBSY (BUSY), -EBUSY and
  -ENOMEM arm the retry timer (50 s, doubling up to 300 s), -EAGAIN (NACK, a config
  change) retries at once, anything else marks the device broken.
* SBM plug (partial blocks first: KERNEL_PARTIAL, MOVABLE_PARTIAL, OFFLINE_PARTIAL,
  fake-onlining what gets plugged in online blocks; then new blocks, plugged *before*
  ``add_memory_driver_managed`` while the offline memory stays under the threshold,
  with rollback when adding fails), SBM unplug (OFFLINE_PARTIAL, OFFLINE,
  MOVABLE_PARTIAL, KERNEL_PARTIAL, MOVABLE, KERNEL, highest block first; offline
  blocks right to left then ``remove_memory``; online blocks by
  ``alloc_contig_range`` fake-offlining, whole block first then single subblocks,
  busy ones skipped, ``offline_and_remove_memory`` once empty), BBM plug and unplug
  (offline big blocks first, then Movable ones, then any; ``bbm_safe_unplug``). As in
  ``virtio_mem_offline_and_remove_memory``, a failed offline-and-remove is -ENOMEM or
  else -EBUSY: a notifier's veto skips the block (retried later), never breaks the device.
* ``virtio_mem_online_page_cb`` (plugged subblocks to ``generic_online_page``,
  unplugged ones kept fake-offline, marked "never onlined" as the kernel does with
  PageDirty) and the memory notifier (GOING_ONLINE refuses blocks not OFFLINE or
  OFFLINE_PARTIAL in SBM, ONLINE moves a block to KERNEL/MOVABLE(_PARTIAL) by zone,
  GOING_OFFLINE drops the references of fake-offline pages and CANCEL_OFFLINE takes
  them again, OFFLINE moves it back).
* ``hotplug_mutex``: held by the work while it walks added blocks and by a memory
  notifier from GOING_* to the end of the operation; user space onlining waits for it
  (:class:`guest.vm.GuestVm` defers the sysfs write while the work holds it, which is
  where the kernel's writer would block).

Not modelled: kdump mode, suspend, ``bbm_block_size``, NUMA nodes (node 0), the
parent resource. Emulator guard: the kernel retries -EAGAIN at once forever; the
model gives up after :data:`EAGAIN_LIMIT` tries in a row and marks the device broken.
"""

from __future__ import annotations

import errno as _errno
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from enum import IntEnum

from guest.kernel import Command, Scheduler, Sleep, Wait, Work
from guest.mm.errors import EINVAL, MemoryHotplugError
from guest.mm.geometry import (
    MAX_ORDER_NR_PAGES,
    MAX_PFN,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    PAGES_PER_SECTION,
)
from guest.mm.memory import ZONE_MOVABLE, HotplugLockBusy, MemoryManager
from guest.mm.notifier import (
    MEM_CANCEL_OFFLINE,
    MEM_CANCEL_ONLINE,
    MEM_GOING_OFFLINE,
    MEM_GOING_ONLINE,
    MEM_OFFLINE,
    MEM_ONLINE,
    NOTIFY_BAD,
    NOTIFY_DONE,
    NOTIFY_OK,
    MemoryAction,
    MemoryNotify,
    notifier_from_errno,
)
from guest.mm.pages import PAGE_OFFLINE, reserved
from memhp.virtio_mem import (
    ACK,
    BUSY,
    ERROR,
    NACK,
    AccessReport,
    VirtioMemConfig,
    VirtioMemRequest,
    VirtioMemResponse,
)

DRIVER = "virtio_mem"
#: Fake-offline pages that were onlined before (taken with alloc_contig_range).
OWNER_FAKE_OFFLINE = "virtio_mem"
#: Fake-offline pages kept back when their block was onlined (the kernel's PageDirty).
OWNER_NEVER_ONLINED = "virtio_mem:never-onlined"
OWNERS = (OWNER_FAKE_OFFLINE, OWNER_NEVER_ONLINED)

ENOSPC = _errno.ENOSPC
ETXTBSY = _errno.ETXTBSY
EBUSY = _errno.EBUSY
ENOMEM = _errno.ENOMEM
EAGAIN = _errno.EAGAIN

VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD = 1 << 30
VIRTIO_MEM_RETRY_TIMER_MIN_MS = 50_000
VIRTIO_MEM_RETRY_TIMER_MAX_MS = 300_000
#: Emulator guard against an endless -EAGAIN loop (the kernel has none).
EAGAIN_LIMIT = 1000
#: How long a task waits before looking at a held lock again.
LOCK_POLL_SECONDS = 0.001

Generator_int = Generator[Command, bool | None, int]
Generator_pair = Generator[Command, bool | None, tuple[int, int]]
Generator_resp = Generator[Command, bool | None, VirtioMemResponse]
Generator_none = Generator[Command, bool | None, None]


class SbmMbState(IntEnum):
    """``enum virtio_mem_sbm_mb_state`` (the numbering matters: ``old_state - 1``)."""

    VIRTIO_MEM_SBM_MB_UNUSED = 0
    VIRTIO_MEM_SBM_MB_PLUGGED = 1
    VIRTIO_MEM_SBM_MB_OFFLINE = 2
    VIRTIO_MEM_SBM_MB_OFFLINE_PARTIAL = 3
    VIRTIO_MEM_SBM_MB_KERNEL = 4
    VIRTIO_MEM_SBM_MB_KERNEL_PARTIAL = 5
    VIRTIO_MEM_SBM_MB_MOVABLE = 6
    VIRTIO_MEM_SBM_MB_MOVABLE_PARTIAL = 7

    @property
    def label(self) -> str:
        return self.name.removeprefix("VIRTIO_MEM_SBM_MB_").lower()


class BbmBbState(IntEnum):
    """``enum virtio_mem_bbm_bb_state``."""

    VIRTIO_MEM_BBM_BB_UNUSED = 0
    VIRTIO_MEM_BBM_BB_PLUGGED = 1
    VIRTIO_MEM_BBM_BB_ADDED = 2
    VIRTIO_MEM_BBM_BB_FAKE_OFFLINE = 3

    @property
    def label(self) -> str:
        return self.name.removeprefix("VIRTIO_MEM_BBM_BB_").lower()


MB_UNUSED = SbmMbState.VIRTIO_MEM_SBM_MB_UNUSED
MB_PLUGGED = SbmMbState.VIRTIO_MEM_SBM_MB_PLUGGED
MB_OFFLINE = SbmMbState.VIRTIO_MEM_SBM_MB_OFFLINE
MB_OFFLINE_PARTIAL = SbmMbState.VIRTIO_MEM_SBM_MB_OFFLINE_PARTIAL
MB_KERNEL = SbmMbState.VIRTIO_MEM_SBM_MB_KERNEL
MB_KERNEL_PARTIAL = SbmMbState.VIRTIO_MEM_SBM_MB_KERNEL_PARTIAL
MB_MOVABLE = SbmMbState.VIRTIO_MEM_SBM_MB_MOVABLE
MB_MOVABLE_PARTIAL = SbmMbState.VIRTIO_MEM_SBM_MB_MOVABLE_PARTIAL
BB_UNUSED = BbmBbState.VIRTIO_MEM_BBM_BB_UNUSED
BB_PLUGGED = BbmBbState.VIRTIO_MEM_BBM_BB_PLUGGED
BB_ADDED = BbmBbState.VIRTIO_MEM_BBM_BB_ADDED
BB_FAKE_OFFLINE = BbmBbState.VIRTIO_MEM_BBM_BB_FAKE_OFFLINE

#: States of blocks that are added and online (SBM).
MB_ONLINE_STATES = (MB_KERNEL, MB_KERNEL_PARTIAL, MB_MOVABLE, MB_MOVABLE_PARTIAL)
MB_OFFLINE_STATES = (MB_OFFLINE, MB_OFFLINE_PARTIAL)
_SBM_PLUG_ORDER = (MB_KERNEL_PARTIAL, MB_MOVABLE_PARTIAL, MB_OFFLINE_PARTIAL)
_SBM_UNPLUG_ORDER = (
    MB_OFFLINE_PARTIAL,
    MB_OFFLINE,
    MB_MOVABLE_PARTIAL,
    MB_KERNEL_PARTIAL,
    MB_MOVABLE,
    MB_KERNEL,
)


def bit_runs(bits: int, count: int) -> Iterator[tuple[int, int, bool]]:
    """Runs ``(first, end, set)`` of equal bits among the low ``count`` bits of ``bits``."""
    full = (1 << count) - 1
    bits &= full
    if bits in (0, full):
        yield 0, count, bool(bits)
        return
    pos = 0
    while pos < count:
        value = bool(bits >> pos & 1)
        # The next bit that differs: lowest set bit of the flipped remainder.
        rest = (bits if not value else ~bits & full) >> pos
        end = pos + ((rest & -rest).bit_length() - 1) if rest else count
        yield pos, end, value
        pos = end


def is_work_task(name: str) -> bool:
    """A scheduler task of this driver that a protocol step waits for (the work item)."""
    return name.startswith(f"{DRIVER}:") and name.endswith(":wq")


class VirtioMemProbeError(MemoryHotplugError):
    """``virtio_mem_probe`` failed; the device is not driven (the guest itself runs on)."""


@dataclass(frozen=True)
class DriverViolation:
    """Something the kernel would BUG or WARN about (reported, not raised)."""

    kind: str
    start_pfn: int
    end_pfn: int
    message: str


class VirtioMemDevices:
    """``virtio_mem_devices``: the devices of one guest, sharing one online_page callback."""

    def __init__(self, mm: MemoryManager) -> None:
        self.mm = mm
        self.devices: list[VirtioMem] = []

    def register(self, vm: VirtioMem) -> None:
        """``register_virtio_mem_device``: the first device installs the callback (may fail)."""
        if not self.devices:
            self.mm.set_online_page_callback(self.virtio_mem_online_page_cb, owner=DRIVER)
        # list_add_rcu: at the head.
        self.devices.insert(0, vm)

    def unregister(self, vm: VirtioMem) -> None:
        """``unregister_virtio_mem_device``: the last device restores the generic callback."""
        self.devices.remove(vm)
        if not self.devices:
            self.mm.restore_online_page_callback(self.virtio_mem_online_page_cb)

    def device_of(self, pfn: int) -> VirtioMem | None:
        for vm in self.devices:
            if vm.start_pfn <= pfn < vm.end_pfn:
                return vm
        return None

    def virtio_mem_online_page_cb(self, start_pfn: int, nr_pages: int) -> None:
        """The shared ``online_page_callback``, over a run of aligned chunks.

        A chunk never straddles a device boundary (regions are block-aligned where
        they are used) nor, in SBM, a subblock (subblocks span at least a MAX_ORDER
        chunk), so whole runs can be handed on.
        """
        end = start_pfn + nr_pages
        pos = start_pfn
        while pos < end:
            vm = self.device_of(pos)
            if vm is None:
                # Not virtio-mem memory (a DIMM, another driver's): online it.
                starts = [d.start_pfn for d in self.devices if pos < d.start_pfn < end]
                stop = min([end, *starts])
                self.mm.generic_online_pages(pos, stop)
            else:
                stop = min(end, vm.end_pfn)
                vm.online_pages(pos, stop)
            pos = stop


class VirtioMem:
    """``struct virtio_mem``: the driver of one virtio-mem device."""

    def __init__(
        self,
        mm: MemoryManager,
        scheduler: Scheduler,
        devices: VirtioMemDevices,
        config: VirtioMemConfig,
        *,
        name: str = "virtio0",
        force_bbm: bool = False,
        unplug_online: bool = True,
        bbm_safe_unplug: bool = True,
        on_event: Callable[[str, dict[str, object]], None] | None = None,
    ) -> None:
        self.mm = mm
        self.scheduler = scheduler
        self.devices = devices
        self.name = name
        self.force_bbm = force_bbm
        self.unplug_online = unplug_online
        self.bbm_safe_unplug = bbm_safe_unplug
        self._on_event = on_event
        #: What a read of the config space returns now (kept current by the transport).
        self.config = config
        self.outbox: list[VirtioMemRequest | AccessReport] = []
        self.violations: list[DriverViolation] = []
        self.unplug_all_required = False
        self.config_changed_flag = False
        self.broken = False
        self.removing = False
        self.probed = False
        self.hotplug_active = False
        #: Who holds ``vm->hotplug_mutex``: "wq", "memory-notifier" or None.
        self.hotplug_mutex_owner: str | None = None
        self.wq_active = False
        self.retry_timer_ms = VIRTIO_MEM_RETRY_TIMER_MIN_MS
        self._timer_generation = 0
        #: When the retry timer fires (None: not armed), for views and tests.
        self.retry_timer_deadline: float | None = None
        self._in_flight: VirtioMemRequest | None = None
        self._resp: VirtioMemResponse | None = None
        self._host_resp = scheduler.completion()
        self._wq = Work(scheduler, f"{DRIVER}:{name}:wq", self._run_wq)
        self._eagain_in_a_row = 0
        self.stats: Counter[str] = Counter()
        self._init()

    # -- virtio_mem_init ---------------------------------------------------------

    def _init(self) -> None:
        c = self.config
        self.plugged_size = c.plugged_size
        self.device_block_size = c.block_size
        self.nid = 0
        self.addr = c.addr
        self.region_size = c.region_size
        self.requested_size = c.requested_size
        self.memory_block_size = self.mm.geometry.block_size_bytes
        mb = self.memory_block_size
        self.offline_size = 0
        self.offline_threshold = max(2 * mb, VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD)
        if self.addr % mb:
            self._event("warning", message="the physical start address can make memory unusable")
        if (self.addr + self.region_size) % mb:
            self._event("warning", message="the physical end address can make memory unusable")
        sb_size = max(MAX_ORDER_NR_PAGES, PAGEBLOCK_NR_PAGES) * PAGE_SIZE
        sb_size = max(self.device_block_size, sb_size)
        self.in_sbm = sb_size < mb and not self.force_bbm
        # SBM
        self.sb_size = sb_size
        self.sbs_per_mb = mb // sb_size if self.in_sbm else 0
        self._full_mask = (1 << self.sbs_per_mb) - 1
        self.first_mb_id = (self.addr + mb - 1) // mb
        self.next_mb_id = self.first_mb_id
        self.last_usable_mb_id = self.first_mb_id - 1
        self.mb_states: dict[int, SbmMbState] = {}
        #: One bit per subblock (plugged) per memory block: ``sbm.sb_states``.
        self.sb_states: dict[int, int] = {}
        self.mb_count: Counter[SbmMbState] = Counter()
        # BBM
        self.bb_size = max(self.device_block_size, mb)
        self.first_bb_id = (self.addr + self.bb_size - 1) // self.bb_size
        self.next_bb_id = self.first_bb_id
        self.last_usable_bb_id = self.first_bb_id - 1
        self.bb_states: dict[int, BbmBbState] = {}
        self.bb_count: Counter[BbmBbState] = Counter()
        if not self.in_sbm:
            self.offline_threshold = max(2 * self.bb_size, self.offline_threshold)

    @property
    def mode(self) -> str:
        return "sbm" if self.in_sbm else "bbm"

    @property
    def start_pfn(self) -> int:
        return self.addr >> PAGE_SHIFT

    @property
    def end_pfn(self) -> int:
        return (self.addr + self.region_size) >> PAGE_SHIFT

    # -- probe and remove ----------------------------------------------------------

    def probe(self) -> None:
        """``virtio_mem_probe``; :class:`VirtioMemProbeError` (-EINVAL) on a callback conflict."""
        if self.plugged_size:
            self.unplug_all_required = True
            self._event("log", message="unplugging all memory is required")
        self.mm.notifier.register(self._memory_notifier_cb, 0, name=f"{DRIVER}:{self.name}")
        try:
            self.devices.register(self)
        except MemoryHotplugError as err:
            self.mm.notifier.unregister(self._memory_notifier_cb)
            holder = self.mm.online_page_callback_owner or "another driver"
            message = (
                f"{DRIVER} {self.name}: probe failed with error -{err.errno} "
                f"({_errno.errorcode.get(err.errno, err.errno)}): only one "
                f"online_page_callback system-wide: {holder} already installed it; "
                f"{DRIVER} cannot"
            )
            self._event("probe_failed", errno=-err.errno, holder=holder, message=message)
            raise VirtioMemProbeError(err.errno, message) from None
        self.probed = True
        self._event(
            "probe",
            mode=self.mode,
            block_size=self.device_block_size,
            subblock_size=self.sb_size if self.in_sbm else None,
            big_block_size=None if self.in_sbm else self.bb_size,
            offline_threshold=self.offline_threshold,
        )
        # Trigger a config update to start processing the requested size.
        self.config_changed_flag = True
        self._wq.schedule()

    def remove(self) -> None:
        """``virtio_mem_remove`` (with the work idle): drop OFFLINE_PARTIAL blocks, unregister.

        Memory that is still added stays (the kernel warns: "device still has system
        memory added").
        """
        if self._wq.running or self._wq.pending:
            raise MemoryHotplugError(EBUSY, f"{DRIVER} {self.name}: the work is running")
        self.removing = True
        self._cancel_retry_timer()
        if self.in_sbm:
            for mb_id in list(self._sbm_for_each_mb(MB_OFFLINE_PARTIAL)):
                self._remove_memory_now(mb_id * self.memory_block_size, self.memory_block_size)
                self._sbm_set_mb_state(mb_id, MB_UNUSED)
        self.devices.unregister(self)
        self.mm.notifier.unregister(self._memory_notifier_cb)
        self.probed = False
        if self.mm.present_sections.count(self.start_pfn, self.end_pfn):
            self._event("warning", message="device still has system memory added")
        self._event("removed")

    # -- the transport ---------------------------------------------------------------

    def drain_outbox(self) -> list[VirtioMemRequest | AccessReport]:
        out, self.outbox = self.outbox, []
        return out

    def deliver(self, resp: VirtioMemResponse, config: VirtioMemConfig | None = None) -> None:
        """The device's answer to the request in flight (``virtio_mem_handle_response``).

        ``config`` is the config space as the device shows it after the request
        (``plugged_size`` changes without an interrupt; UNPLUG_ALL may shrink the
        usable region).
        """
        if config is not None:
            self.config = config
        if self._in_flight is None:
            self._violation("response-without-request", 0, 0, f"{resp.name} with no request")
            return
        self._resp = resp
        self._host_resp.complete()

    def update_config(self, config: VirtioMemConfig) -> None:
        """The config space changed without an interrupt (what a later read would see)."""
        self.config = config

    def config_changed(self, config: VirtioMemConfig | None = None) -> None:
        """``virtio_mem_config_changed``: the config interrupt."""
        if config is not None:
            self.config = config
        self.config_changed_flag = True
        self._retry()

    @property
    def busy(self) -> bool:
        """The work is queued or running (a protocol step waits for it)."""
        return self._wq.pending or self._wq.running

    @property
    def request_in_flight(self) -> VirtioMemRequest | None:
        """The request sent and not answered yet."""
        return self._in_flight

    def report_access(self, ranges: list[tuple[int, int]], what: str = "allocate") -> None:
        """Tell the host which pages of this device's region were touched (side channel)."""
        lo, hi = self.start_pfn, self.end_pfn
        mine = tuple((max(s, lo), min(e, hi)) for s, e in ranges if s < hi and e > lo)
        if mine:
            self.outbox.append(AccessReport(mine, what))

    def _send_request(self, req: VirtioMemRequest) -> Generator_resp:
        """``virtio_mem_send_request``: queue it, kick, wait for the answer (no timeout)."""
        self._in_flight = req
        self._resp = None
        self._host_resp.reinit()
        self.outbox.append(req)
        self.stats[req.name] += 1
        yield Wait(self._host_resp)
        resp = self._resp
        assert resp is not None
        self._in_flight = None
        self._resp = None
        return resp

    def _send_plug_request(self, addr: int, size: int) -> Generator_int:
        if self.config_changed_flag:
            return -EAGAIN
        nb = size // self.device_block_size
        resp = yield from self._send_request(VirtioMemRequest.plug(addr, nb))
        if resp.type == ACK:
            self.plugged_size += size
            return 0
        rc = {NACK: -EAGAIN, BUSY: -ETXTBSY, ERROR: -EINVAL}.get(resp.type, -ENOMEM)
        self._event("plug_failed", addr=addr, size=size, rc=rc)
        return rc

    def _send_unplug_request(self, addr: int, size: int) -> Generator_int:
        if self.config_changed_flag:
            return -EAGAIN
        nb = size // self.device_block_size
        resp = yield from self._send_request(VirtioMemRequest.unplug(addr, nb))
        if resp.type == ACK:
            self.plugged_size -= size
            return 0
        rc = {BUSY: -ETXTBSY, ERROR: -EINVAL}.get(resp.type, -ENOMEM)
        self._event("unplug_failed", addr=addr, size=size, rc=rc)
        return rc

    def _send_unplug_all_request(self) -> Generator_int:
        resp = yield from self._send_request(VirtioMemRequest.unplug_all())
        if resp.type == ACK:
            self.unplug_all_required = False
            self.plugged_size = 0
            # The usable region might have shrunk.
            self.config_changed_flag = True
            return 0
        rc = -ETXTBSY if resp.type == BUSY else -ENOMEM
        self._event("unplug_all_failed", rc=rc)
        return rc

    # -- the work loop -----------------------------------------------------------------

    def _retry(self) -> None:
        """``virtio_mem_retry``: queue the work (unless removing)."""
        if not self.removing:
            self._wq.schedule()

    def _arm_retry_timer(self) -> None:
        self._timer_generation += 1
        seconds = self.retry_timer_ms / 1000
        self.retry_timer_deadline = self.scheduler.now + seconds
        self.scheduler.spawn(
            f"{DRIVER}:{self.name}:retry_timer", self._retry_timer(self._timer_generation, seconds)
        )
        self._event("retry_timer", seconds=seconds)

    def _cancel_retry_timer(self) -> None:
        """``hrtimer_cancel``: a sleeping timer task wakes up to nothing."""
        self._timer_generation += 1
        self.retry_timer_deadline = None

    def _retry_timer(self, generation: int, seconds: float) -> Generator_none:
        yield Sleep(seconds)
        if generation != self._timer_generation:
            return
        # virtio_mem_timer_expired
        self.retry_timer_deadline = None
        self._retry()
        self.retry_timer_ms = min(self.retry_timer_ms * 2, VIRTIO_MEM_RETRY_TIMER_MAX_MS)

    def _run_wq(self) -> Generator_none:
        """``virtio_mem_run_wq``."""
        self._cancel_retry_timer()
        if self.broken:
            return
        self.wq_active = True
        while True:
            rc = 0
            # Make sure we start with a clean state if there are leftovers.
            if self.unplug_all_required:
                rc = yield from self._send_unplug_all_request()
            if self.config_changed_flag:
                self.config_changed_flag = False
                self._refresh_config()
            # Unplug any leftovers from previous runs.
            if not rc:
                rc = yield from self._unplug_pending_mb()
            if not rc and self.requested_size != self.plugged_size:
                if self.requested_size > self.plugged_size:
                    rc = yield from self._plug_request(self.requested_size - self.plugged_size)
                else:
                    rc = yield from self._unplug_request(self.plugged_size - self.requested_size)
            if rc != -EAGAIN:
                break
            self._eagain_in_a_row += 1
            if self._eagain_in_a_row >= EAGAIN_LIMIT:
                rc = -EAGAIN
                break
        if rc != -EAGAIN:
            self._eagain_in_a_row = 0
        if rc == 0:
            self.retry_timer_ms = VIRTIO_MEM_RETRY_TIMER_MIN_MS
        elif rc == -ENOSPC:
            # No more room (alignment, physical limit) or too much offline memory.
            self._event("log", message="cannot add more memory (-ENOSPC)")
        elif rc in (-ETXTBSY, -EBUSY, -ENOMEM):
            self._arm_retry_timer()
        else:
            self.broken = True
            self._event("broken", rc=rc, message=f"unknown error, marking device broken: {rc}")
        self.wq_active = False
        self._event(
            "wq_done",
            rc=rc,
            plugged_size=self.plugged_size,
            requested_size=self.requested_size,
        )

    def _refresh_config(self) -> None:
        """``virtio_mem_refresh_config``."""
        c = self.config
        if c.plugged_size != self.plugged_size:
            # WARN_ON_ONCE: the plugged size is a reflection of what we did.
            self._violation(
                "virtio-mem-plugged-size",
                0,
                0,
                f"device plugged_size {c.plugged_size:#x} != the driver's {self.plugged_size:#x}",
            )
            self.plugged_size = c.plugged_size
        end_addr = min(self.addr + c.usable_region_size - 1, (MAX_PFN << PAGE_SHIFT) - 1)
        if self.in_sbm:
            mb = self.memory_block_size
            self.last_usable_mb_id = end_addr // mb
            if (end_addr + 1) % mb:
                self.last_usable_mb_id -= 1
        else:
            self.last_usable_bb_id = end_addr // self.bb_size
            if (end_addr + 1) % self.bb_size:
                self.last_usable_bb_id -= 1
        self.requested_size = c.requested_size
        self._event(
            "config",
            plugged_size=self.plugged_size,
            requested_size=self.requested_size,
            usable_region_size=c.usable_region_size,
        )

    def _plug_request(self, diff: int) -> Generator_int:
        if self.in_sbm:
            return (yield from self._sbm_plug_request(diff))
        return (yield from self._bbm_plug_request(diff))

    def _unplug_request(self, diff: int) -> Generator_int:
        if self.in_sbm:
            return (yield from self._sbm_unplug_request(diff))
        return (yield from self._bbm_unplug_request(diff))

    def _unplug_pending_mb(self) -> Generator_int:
        """``virtio_mem_unplug_pending_mb``: blocks plugged but never (or no longer) added."""
        if not self.in_sbm:
            for bb_id in list(self._bbm_for_each_bb(BB_PLUGGED)):
                rc = yield from self._bbm_unplug_bb(bb_id)
                if rc:
                    return rc
                self._bbm_set_bb_state(bb_id, BB_UNUSED)
            return 0
        for mb_id in list(self._sbm_for_each_mb(MB_PLUGGED)):
            nb_sb = self.sbs_per_mb
            rc, _ = yield from self._sbm_unplug_any_sb_raw(mb_id, nb_sb)
            if rc:
                return rc
            self._sbm_set_mb_state(mb_id, MB_UNUSED)
        return 0

    # -- hotplug_mutex -------------------------------------------------------------------

    def _mutex_lock(self) -> Generator_none:
        while self.hotplug_mutex_owner is not None:
            yield Sleep(LOCK_POLL_SECONDS)
        self.hotplug_mutex_owner = "wq"

    def _mutex_unlock(self) -> None:
        self.hotplug_mutex_owner = None

    # -- memory hotplug calls ------------------------------------------------------------

    def could_add_memory(self, size: int) -> bool:
        """``virtio_mem_could_add_memory``."""
        if size > self.offline_threshold:
            self._violation("virtio-mem-threshold", 0, 0, f"WARN: {size:#x} above the threshold")
            return False
        return self.offline_size + size <= self.offline_threshold

    def _add_memory(self, addr: int, size: int) -> Generator_int:
        """``virtio_mem_add_memory``: the memory may get onlined at once (auto-online)."""
        self.offline_size += size
        while True:
            try:
                self.mm.add_memory_driver_managed(
                    addr >> PAGE_SHIFT, size >> PAGE_SHIFT, owner=DRIVER
                )
                break
            except HotplugLockBusy:
                yield Sleep(LOCK_POLL_SECONDS)
            except MemoryHotplugError as err:
                self.offline_size -= size
                self._event("add_failed", addr=addr, size=size, rc=-err.errno, message=err.message)
                return -err.errno
        return 0

    def _remove_memory(self, addr: int, size: int) -> Generator_int:
        """``virtio_mem_remove_memory``: only fails if the memory is not offline."""
        while True:
            try:
                self.mm.remove_memory(addr >> PAGE_SHIFT, size >> PAGE_SHIFT)
                break
            except HotplugLockBusy:
                yield Sleep(LOCK_POLL_SECONDS)
            except MemoryHotplugError as err:
                return -err.errno
        self.offline_size -= size
        # We might have freed up memory we can unplug now: retry at once.
        self._retry()
        return 0

    def _remove_memory_now(self, addr: int, size: int) -> None:
        try:
            self.mm.remove_memory(addr >> PAGE_SHIFT, size >> PAGE_SHIFT)
            self.offline_size -= size
        except (MemoryHotplugError, HotplugLockBusy) as err:
            self._violation(
                "virtio-mem-remove-failed",
                addr >> PAGE_SHIFT,
                (addr + size) >> PAGE_SHIFT,
                f"BUG_ON: removing offline memory failed: {err}",
            )

    def _offline_and_remove_memory(self, addr: int, size: int) -> Generator_int:
        """``virtio_mem_offline_and_remove_memory``."""
        while True:
            try:
                self.mm.offline_and_remove_memory(addr >> PAGE_SHIFT, size >> PAGE_SHIFT)
                break
            except HotplugLockBusy:
                yield Sleep(LOCK_POLL_SECONDS)
            except MemoryHotplugError as err:
                self._event("offline_and_remove_failed", addr=addr, size=size, rc=-err.errno)
                # Not expected (everything was fake-offlined), but a notifier may veto:
                # the kernel reports any failure but -ENOMEM as -EBUSY (skip, retry later).
                if err.errno not in (ENOMEM, EBUSY):
                    self._event(
                        "warning",
                        message=f"offline_and_remove_memory failed with {-err.errno} "
                        "(neither -ENOMEM nor -EBUSY)",
                    )
                return -ENOMEM if err.errno == ENOMEM else -EBUSY
        self.offline_size -= size
        self._retry()
        return 0

    # -- fake offline / fake online --------------------------------------------------------

    def _set_fake_offline(self, pfn: int, nr_pages: int, onlined: bool) -> None:
        """``virtio_mem_set_fake_offline``; "never onlined" is the kernel's PageDirty."""
        owner = OWNER_FAKE_OFFLINE if onlined else OWNER_NEVER_ONLINED
        self.mm.set_page_offline(pfn, pfn + nr_pages, owner, 1)

    def _fake_online(self, pfn: int, nr_pages: int) -> None:
        """``virtio_mem_fake_online``: fake-offline pages back to the buddy."""
        for s, e, state in self.mm.pages.runs(pfn, pfn + nr_pages):
            if state.kind != PAGE_OFFLINE or state.owner not in OWNERS:
                self._violation(
                    "virtio-mem-fake-online",
                    s,
                    e,
                    f"fake-onlining {state.kind} pages ({state.owner or 'core'}) not fake-offline",
                )
                continue
            if state.owner == OWNER_NEVER_ONLINED:
                # Kept back when the block was onlined: online them now.
                self.mm.generic_online_pages(s, e)
            else:
                # Taken with alloc_contig_range: free them and count them managed again.
                self.mm.pages.set(s, e, reserved(DRIVER))
                self.mm.free_contig_range(s, e)
                self.mm.adjust_managed_range(s, e, +1)

    def _fake_offline(self, pfn: int, nr_pages: int) -> int:
        """``virtio_mem_fake_offline``: ``alloc_contig_range`` then mark fake-offline.

        The kernel tries 5 times on ZONE_MOVABLE; the model's answer would not change.
        """
        try:
            self.mm.alloc_contig_range(pfn, pfn + nr_pages, owner=DRIVER)
        except MemoryHotplugError as err:
            if err.errno == ENOMEM:
                return -ENOMEM
            return -EBUSY
        self._set_fake_offline(pfn, nr_pages, onlined=True)
        self.mm.adjust_managed_range(pfn, pfn + nr_pages, -1)
        return 0

    def _fake_offline_going_offline(self, pfn: int, nr_pages: int) -> None:
        """Drop our reference on fake-offline pages so the memory can go offline."""
        for s, e, state in self.mm.pages.runs(pfn, pfn + nr_pages):
            if state.kind != PAGE_OFFLINE or state.owner not in OWNERS or state.refcount != 1:
                self._violation(
                    "virtio-mem-fake-offline-referenced",
                    s,
                    e,
                    f"WARN: fake-offline page referenced ({state.kind}, refcount {state.refcount})",
                )
                continue
            self.mm.set_page_offline(s, e, state.owner, 0)

    def _fake_offline_cancel_offline(self, pfn: int, nr_pages: int) -> None:
        """Take the references dropped at MEM_GOING_OFFLINE again."""
        for s, e, state in self.mm.pages.runs(pfn, pfn + nr_pages):
            if state.kind == PAGE_OFFLINE and state.owner in OWNERS and state.refcount == 0:
                self.mm.set_page_offline(s, e, state.owner, 1)

    # -- onlining ---------------------------------------------------------------------------

    def online_pages(self, start_pfn: int, end_pfn: int) -> None:
        """This device's part of ``virtio_mem_online_page_cb``."""
        if self.in_sbm:
            mb_pages = self.memory_block_size >> PAGE_SHIFT
            pos = start_pfn
            while pos < end_pfn:
                mb_id = pos // mb_pages
                stop = min(end_pfn, (mb_id + 1) * mb_pages)
                self._sbm_online_range(mb_id, pos, stop)
                pos = stop
            return
        bb_pages = self.bb_size >> PAGE_SHIFT
        pos = start_pfn
        while pos < end_pfn:
            bb_id = pos // bb_pages
            stop = min(end_pfn, (bb_id + 1) * bb_pages)
            if self.bb_states.get(bb_id) == BB_FAKE_OFFLINE:
                self._set_fake_offline(pos, stop - pos, onlined=False)
            else:
                self.mm.generic_online_pages(pos, stop)
            pos = stop

    def _sbm_online_range(self, mb_id: int, start: int, end: int) -> None:
        sb_pages = self.sb_size >> PAGE_SHIFT
        base = mb_id * (self.memory_block_size >> PAGE_SHIFT)
        bits = self.sb_states.get(mb_id, 0)
        for first, last, plugged in bit_runs(bits, self.sbs_per_mb):
            lo, hi = max(start, base + first * sb_pages), min(end, base + last * sb_pages)
            if lo >= hi:
                continue
            if plugged:
                self.mm.generic_online_pages(lo, hi)
            else:
                self._set_fake_offline(lo, hi - lo, onlined=False)

    # -- the memory notifier ----------------------------------------------------------------

    def _overlaps(self, start: int, size: int) -> bool:
        return start < self.addr + self.region_size and self.addr < start + size

    def _notifier_lock(self) -> bool:
        if self.hotplug_mutex_owner is not None:
            # The kernel would block here until the work drops the mutex; a caller of
            # the model that bypasses GuestVm's wait gets -EBUSY instead.
            return False
        self.hotplug_mutex_owner = "memory-notifier"
        return True

    def _memory_notifier_cb(self, action: MemoryAction, arg: MemoryNotify) -> int:
        """``virtio_mem_memory_notifier_cb``."""
        start = arg.start_pfn << PAGE_SHIFT
        size = arg.nr_pages << PAGE_SHIFT
        if not self._overlaps(start, size):
            return NOTIFY_DONE
        if self.in_sbm:
            mb = self.memory_block_size
            block_id = start // mb
            if size != mb or start % mb:
                self._violation(
                    "virtio-mem-notifier-range",
                    arg.start_pfn,
                    arg.start_pfn + arg.nr_pages,
                    "WARN: SBM expects one whole memory block per notification",
                )
                return NOTIFY_BAD
        else:
            block_id = start // self.bb_size
            if block_id != (start + size - 1) // self.bb_size:
                self._violation(
                    "virtio-mem-notifier-range",
                    arg.start_pfn,
                    arg.start_pfn + arg.nr_pages,
                    "WARN: the range spans big blocks",
                )
                return NOTIFY_BAD
        rc = NOTIFY_OK
        if action in (MEM_GOING_OFFLINE, MEM_GOING_ONLINE):
            if not self._notifier_lock():
                return notifier_from_errno(-EBUSY)
            if self.removing:
                self.hotplug_mutex_owner = None
                return notifier_from_errno(-EBUSY)
            self.hotplug_active = True
            if action == MEM_GOING_OFFLINE:
                if self.in_sbm:
                    self._sbm_notify_going_offline(block_id)
                elif self.bb_states.get(block_id) == BB_FAKE_OFFLINE:
                    self._fake_offline_going_offline(arg.start_pfn, arg.nr_pages)
            elif self.in_sbm:
                rc = self._sbm_notify_going_online(block_id)
        elif action == MEM_OFFLINE:
            if self.in_sbm:
                self._sbm_notify_offline(block_id)
            self.offline_size += size
            # Now that there is offline memory, pending unplug requests may succeed.
            if not self.unplug_online:
                self._retry()
            self.hotplug_active = False
            self.hotplug_mutex_owner = None
        elif action == MEM_ONLINE:
            if self.in_sbm:
                self._sbm_notify_online(block_id, arg.start_pfn)
            self.offline_size -= size
            # Add more memory once half the threshold is onlined (not if that is us).
            if not self.wq_active and self.could_add_memory(self.offline_threshold // 2):
                self._retry()
            self.hotplug_active = False
            self.hotplug_mutex_owner = None
        elif action == MEM_CANCEL_OFFLINE:
            if self.hotplug_active:
                if self.in_sbm:
                    self._sbm_notify_cancel_offline(block_id)
                elif self.bb_states.get(block_id) == BB_FAKE_OFFLINE:
                    self._fake_offline_cancel_offline(arg.start_pfn, arg.nr_pages)
                self.hotplug_active = False
                self.hotplug_mutex_owner = None
        elif action == MEM_CANCEL_ONLINE and self.hotplug_active:
            self.hotplug_active = False
            self.hotplug_mutex_owner = None
        return rc

    def _sbm_notify_going_online(self, mb_id: int) -> int:
        if self.mb_states.get(mb_id) in MB_OFFLINE_STATES:
            return NOTIFY_OK
        self._event("log", message=f"memory block onlining denied: memory{mb_id}")
        return NOTIFY_BAD

    def _sbm_notify_offline(self, mb_id: int) -> None:
        state = self.mb_states.get(mb_id)
        if state in (MB_KERNEL_PARTIAL, MB_MOVABLE_PARTIAL):
            self._sbm_set_mb_state(mb_id, MB_OFFLINE_PARTIAL)
        elif state in (MB_KERNEL, MB_MOVABLE):
            self._sbm_set_mb_state(mb_id, MB_OFFLINE)
        else:
            self._bug(mb_id, f"MEM_OFFLINE of a block in state {state}")

    def _sbm_notify_online(self, mb_id: int, start_pfn: int) -> None:
        block = self.mm.block_of(start_pfn)
        is_movable = block is not None and block.zone == ZONE_MOVABLE
        state = self.mb_states.get(mb_id)
        if state == MB_OFFLINE_PARTIAL:
            new = MB_MOVABLE_PARTIAL if is_movable else MB_KERNEL_PARTIAL
        elif state == MB_OFFLINE:
            new = MB_MOVABLE if is_movable else MB_KERNEL
        else:
            self._bug(mb_id, f"MEM_ONLINE of a block in state {state}")
            return
        self._sbm_set_mb_state(mb_id, new)

    def sbm_subblock_runs(self, mb_id: int) -> Iterator[tuple[int, int, bool]]:
        """PFN runs ``(start, end, plugged)`` of a memory block's subblocks."""
        sb_pages = self.sb_size >> PAGE_SHIFT
        base = mb_id * (self.memory_block_size >> PAGE_SHIFT)
        for first, last, plugged in bit_runs(self.sb_states.get(mb_id, 0), self.sbs_per_mb):
            yield base + first * sb_pages, base + last * sb_pages, plugged

    def _sbm_unplugged_subblocks(self, mb_id: int) -> Iterator[tuple[int, int]]:
        """PFN runs of the unplugged subblocks of a memory block."""
        for s, e, plugged in self.sbm_subblock_runs(mb_id):
            if not plugged:
                yield s, e

    def _sbm_notify_going_offline(self, mb_id: int) -> None:
        for s, e in self._sbm_unplugged_subblocks(mb_id):
            self._fake_offline_going_offline(s, e - s)

    def _sbm_notify_cancel_offline(self, mb_id: int) -> None:
        for s, e in self._sbm_unplugged_subblocks(mb_id):
            self._fake_offline_cancel_offline(s, e - s)

    # -- SBM bookkeeping ----------------------------------------------------------------------

    def _sbm_set_mb_state(self, mb_id: int, state: SbmMbState) -> None:
        old = self.mb_states[mb_id]
        self.mb_states[mb_id] = state
        self.mb_count[old] -= 1
        self.mb_count[state] += 1

    def _sbm_for_each_mb(self, state: SbmMbState, *, reverse: bool = False) -> Iterator[int]:
        """``virtio_mem_sbm_for_each_mb(_rev)``: states are looked at when visited."""
        ids = (
            range(self.next_mb_id - 1, self.first_mb_id - 1, -1)
            if reverse
            else range(self.first_mb_id, self.next_mb_id)
        )
        for mb_id in ids:
            if not self.mb_count[state]:
                return
            if self.mb_states[mb_id] == state:
                yield mb_id

    def _mask(self, sb_id: int, count: int) -> int:
        return ((1 << count) - 1) << sb_id

    def _sbm_test_sb_plugged(self, mb_id: int, sb_id: int, count: int) -> bool:
        mask = self._mask(sb_id, count)
        return self.sb_states.get(mb_id, 0) & mask == mask

    def _sbm_test_sb_unplugged(self, mb_id: int, sb_id: int, count: int) -> bool:
        return not self.sb_states.get(mb_id, 0) & self._mask(sb_id, count)

    def _sbm_first_unplugged_sb(self, mb_id: int) -> int:
        free = ~self.sb_states.get(mb_id, 0) & self._full_mask
        return (free & -free).bit_length() - 1 if free else self.sbs_per_mb

    def _sbm_sb_addr(self, mb_id: int, sb_id: int) -> int:
        return mb_id * self.memory_block_size + sb_id * self.sb_size

    def _sbm_plug_sb(self, mb_id: int, sb_id: int, count: int) -> Generator_int:
        rc = yield from self._send_plug_request(
            self._sbm_sb_addr(mb_id, sb_id), count * self.sb_size
        )
        if not rc:
            self.sb_states[mb_id] = self.sb_states.get(mb_id, 0) | self._mask(sb_id, count)
        return rc

    def _sbm_unplug_sb(self, mb_id: int, sb_id: int, count: int) -> Generator_int:
        addr = self._sbm_sb_addr(mb_id, sb_id)
        rc = yield from self._send_unplug_request(addr, count * self.sb_size)
        if not rc:
            self.sb_states[mb_id] = self.sb_states.get(mb_id, 0) & ~self._mask(sb_id, count)
        return rc

    def _sbm_prepare_next_mb(self) -> tuple[int, int]:
        if self.next_mb_id > self.last_usable_mb_id:
            return -ENOSPC, -1
        mb_id = self.next_mb_id
        self.next_mb_id += 1
        self.mb_states[mb_id] = MB_UNUSED
        self.mb_count[MB_UNUSED] += 1
        return 0, mb_id

    # -- SBM plug -------------------------------------------------------------------------------

    def _sbm_plug_request(self, diff: int) -> Generator_int:
        """``virtio_mem_sbm_plug_request``."""
        nb_sb = diff // self.sb_size
        if not nb_sb:
            return 0
        # Don't race with onlining/offlining.
        yield from self._mutex_lock()
        for state in _SBM_PLUG_ORDER:
            for mb_id in self._sbm_for_each_mb(state):
                rc, nb_sb = yield from self._sbm_plug_any_sb(mb_id, nb_sb)
                if rc or not nb_sb:
                    self._mutex_unlock()
                    return rc
        # From here on no online/offline block is touched: drop the mutex.
        self._mutex_unlock()
        for mb_id in list(self._sbm_for_each_mb(MB_UNUSED)):
            if self.mb_states[mb_id] != MB_UNUSED:
                continue
            if not self.could_add_memory(self.memory_block_size):
                return -ENOSPC
            rc, nb_sb = yield from self._sbm_plug_and_add_mb(mb_id, nb_sb)
            if rc or not nb_sb:
                return rc
        while nb_sb:
            if not self.could_add_memory(self.memory_block_size):
                return -ENOSPC
            rc, mb_id = self._sbm_prepare_next_mb()
            if rc:
                return rc
            rc, nb_sb = yield from self._sbm_plug_and_add_mb(mb_id, nb_sb)
            if rc:
                return rc
        return 0

    def _sbm_plug_and_add_mb(self, mb_id: int, nb_sb: int) -> Generator_pair:
        """Plug the first subblocks of a new block *before* adding it, then add it."""
        count = min(nb_sb, self.sbs_per_mb)
        rc = yield from self._sbm_plug_sb(mb_id, 0, count)
        if rc:
            return rc, nb_sb
        # Mark the block offline before adding it, so the notifiers find it right.
        self._sbm_set_mb_state(
            mb_id, MB_OFFLINE if count == self.sbs_per_mb else MB_OFFLINE_PARTIAL
        )
        rc = yield from self._add_memory(mb_id * self.memory_block_size, self.memory_block_size)
        if rc:
            new = MB_UNUSED
            if (yield from self._sbm_unplug_sb(mb_id, 0, count)):
                new = MB_PLUGGED
            self._sbm_set_mb_state(mb_id, new)
            return rc, nb_sb
        return 0, nb_sb - count

    def _sbm_plug_any_sb(self, mb_id: int, nb_sb: int) -> Generator_pair:
        """Plug unplugged subblocks of an added block; fake-online them if it is online."""
        old_state = self.mb_states[mb_id]
        sb_pages = self.sb_size >> PAGE_SHIFT
        while nb_sb:
            sb_id = self._sbm_first_unplugged_sb(mb_id)
            if sb_id >= self.sbs_per_mb:
                break
            count = 1
            while (
                count < nb_sb
                and sb_id + count < self.sbs_per_mb
                and not self._sbm_test_sb_plugged(mb_id, sb_id + count, 1)
            ):
                count += 1
            rc = yield from self._sbm_plug_sb(mb_id, sb_id, count)
            if rc:
                return rc, nb_sb
            nb_sb -= count
            if old_state == MB_OFFLINE_PARTIAL:
                continue
            # The block is online: hand the newly plugged pages to the buddy.
            pfn = self._sbm_sb_addr(mb_id, sb_id) >> PAGE_SHIFT
            self._fake_online(pfn, count * sb_pages)
        if self._sbm_test_sb_plugged(mb_id, 0, self.sbs_per_mb):
            self._sbm_set_mb_state(mb_id, SbmMbState(old_state - 1))
        return 0, nb_sb

    # -- SBM unplug -----------------------------------------------------------------------------

    def _sbm_unplug_request(self, diff: int) -> Generator_int:
        """``virtio_mem_sbm_unplug_request``."""
        nb_sb = diff // self.sb_size
        if not nb_sb:
            return 0
        yield from self._mutex_lock()
        # Partially plugged blocks first (to remove whole blocks), ZONE_MOVABLE before
        # kernel zones (more reliable, and no zone imbalance).
        for i, state in enumerate(_SBM_UNPLUG_ORDER):
            for mb_id in self._sbm_for_each_mb(state, reverse=True):
                if self.mb_states[mb_id] != state:
                    continue
                rc, nb_sb = yield from self._sbm_unplug_any_sb(mb_id, nb_sb)
                if rc or not nb_sb:
                    self._mutex_unlock()
                    return rc
                # cond_resched() with the mutex dropped: onlining may get through.
                self._mutex_unlock()
                yield from self._mutex_lock()
            if not self.unplug_online and i == 1:
                self._mutex_unlock()
                return 0
        self._mutex_unlock()
        return -EBUSY if nb_sb else 0

    def _sbm_unplug_any_sb(self, mb_id: int, nb_sb: int) -> Generator_pair:
        state = self.mb_states[mb_id]
        if state in MB_ONLINE_STATES:
            return (yield from self._sbm_unplug_any_sb_online(mb_id, nb_sb))
        if state in MB_OFFLINE_STATES:
            return (yield from self._sbm_unplug_any_sb_offline(mb_id, nb_sb))
        return -EINVAL, nb_sb

    def _sbm_unplug_any_sb_raw(self, mb_id: int, nb_sb: int) -> Generator_pair:
        """Unplug plugged subblocks of an offline or not-added block, right to left."""
        sb_id = self.sbs_per_mb - 1
        while nb_sb:
            while sb_id >= 0 and self._sbm_test_sb_unplugged(mb_id, sb_id, 1):
                sb_id -= 1
            if sb_id < 0:
                break
            count = 1
            while count < nb_sb and sb_id > 0 and self._sbm_test_sb_plugged(mb_id, sb_id - 1, 1):
                count += 1
                sb_id -= 1
            rc = yield from self._sbm_unplug_sb(mb_id, sb_id, count)
            if rc:
                return rc, nb_sb
            nb_sb -= count
            sb_id -= 1
        return 0, nb_sb

    def _sbm_unplug_any_sb_offline(self, mb_id: int, nb_sb: int) -> Generator_pair:
        rc, nb_sb = yield from self._sbm_unplug_any_sb_raw(mb_id, nb_sb)
        # Some subblocks might have been unplugged even on failure.
        if not self._sbm_test_sb_plugged(mb_id, 0, self.sbs_per_mb):
            self._sbm_set_mb_state(mb_id, MB_OFFLINE_PARTIAL)
        if rc:
            return rc, nb_sb
        if self._sbm_test_sb_unplugged(mb_id, 0, self.sbs_per_mb):
            # Remove the block; mark it unused first so it cannot get onlined meanwhile.
            self._sbm_set_mb_state(mb_id, MB_UNUSED)
            self._mutex_unlock()
            rc = yield from self._remove_memory(
                mb_id * self.memory_block_size, self.memory_block_size
            )
            if rc:
                self._bug(mb_id, f"removing offline memory{mb_id} failed: {rc}")
            yield from self._mutex_lock()
        return 0, nb_sb

    def _sbm_unplug_sb_online(self, mb_id: int, sb_id: int, count: int) -> Generator_int:
        """Fake-offline subblocks of an online block, then unplug them."""
        nr_pages = (self.sb_size >> PAGE_SHIFT) * count
        old_state = self.mb_states[mb_id]
        start_pfn = self._sbm_sb_addr(mb_id, sb_id) >> PAGE_SHIFT
        rc = self._fake_offline(start_pfn, nr_pages)
        if rc:
            return rc
        rc = yield from self._sbm_unplug_sb(mb_id, sb_id, count)
        if rc:
            # Give the memory back to the buddy.
            self._fake_online(start_pfn, nr_pages)
            return rc
        if old_state == MB_KERNEL:
            self._sbm_set_mb_state(mb_id, MB_KERNEL_PARTIAL)
        elif old_state == MB_MOVABLE:
            self._sbm_set_mb_state(mb_id, MB_MOVABLE_PARTIAL)
        return 0

    def _sbm_unplug_any_sb_online(self, mb_id: int, nb_sb: int) -> Generator_pair:
        """Unplug subblocks of an online block, skipping busy ones; remove it when empty."""
        done = False
        if nb_sb >= self.sbs_per_mb and self._sbm_test_sb_plugged(mb_id, 0, self.sbs_per_mb):
            # If possible, the whole block in one go.
            rc = yield from self._sbm_unplug_sb_online(mb_id, 0, self.sbs_per_mb)
            if not rc:
                nb_sb -= self.sbs_per_mb
                done = True
            elif rc != -EBUSY:
                return rc, nb_sb
        if not done:
            sb_id = self.sbs_per_mb - 1
            while sb_id >= 0 and nb_sb:
                while sb_id >= 0 and not self._sbm_test_sb_plugged(mb_id, sb_id, 1):
                    sb_id -= 1
                if sb_id < 0:
                    break
                rc = yield from self._sbm_unplug_sb_online(mb_id, sb_id, 1)
                if rc == -EBUSY:
                    self._event("subblock_busy", block=mb_id, subblock=sb_id)
                    sb_id -= 1
                    continue
                if rc:
                    return rc, nb_sb
                nb_sb -= 1
                sb_id -= 1
        # A block with everything unplugged goes offline and away (usually succeeds:
        # nothing in it is in use, but another notifier may refuse).
        if self._sbm_test_sb_unplugged(mb_id, 0, self.sbs_per_mb):
            self._mutex_unlock()
            rc = yield from self._offline_and_remove_memory(
                mb_id * self.memory_block_size, self.memory_block_size
            )
            yield from self._mutex_lock()
            if not rc:
                self._sbm_set_mb_state(mb_id, MB_UNUSED)
        return 0, nb_sb

    # -- BBM -------------------------------------------------------------------------------------

    def _bbm_set_bb_state(self, bb_id: int, state: BbmBbState) -> None:
        old = self.bb_states[bb_id]
        self.bb_states[bb_id] = state
        self.bb_count[old] -= 1
        self.bb_count[state] += 1

    def _bbm_for_each_bb(self, state: BbmBbState, *, reverse: bool = False) -> Iterator[int]:
        ids = (
            range(self.next_bb_id - 1, self.first_bb_id - 1, -1)
            if reverse
            else range(self.first_bb_id, self.next_bb_id)
        )
        for bb_id in ids:
            if not self.bb_count[state]:
                return
            if self.bb_states[bb_id] == state:
                yield bb_id

    def _bbm_prepare_next_bb(self) -> tuple[int, int]:
        if self.next_bb_id > self.last_usable_bb_id:
            return -ENOSPC, -1
        bb_id = self.next_bb_id
        self.next_bb_id += 1
        self.bb_states[bb_id] = BB_UNUSED
        self.bb_count[BB_UNUSED] += 1
        return 0, bb_id

    def _bbm_plug_bb(self, bb_id: int) -> Generator_int:
        return (yield from self._send_plug_request(bb_id * self.bb_size, self.bb_size))

    def _bbm_unplug_bb(self, bb_id: int) -> Generator_int:
        return (yield from self._send_unplug_request(bb_id * self.bb_size, self.bb_size))

    def _bbm_plug_and_add_bb(self, bb_id: int) -> Generator_int:
        if self.bb_states[bb_id] != BB_UNUSED:
            return -EINVAL
        rc = yield from self._bbm_plug_bb(bb_id)
        if rc:
            return rc
        self._bbm_set_bb_state(bb_id, BB_ADDED)
        rc = yield from self._add_memory(bb_id * self.bb_size, self.bb_size)
        if rc:
            if not (yield from self._bbm_unplug_bb(bb_id)):
                self._bbm_set_bb_state(bb_id, BB_UNUSED)
            else:
                # Retried from the main loop.
                self._bbm_set_bb_state(bb_id, BB_PLUGGED)
            return rc
        return 0

    def _bbm_plug_request(self, diff: int) -> Generator_int:
        """``virtio_mem_bbm_plug_request``."""
        nb_bb = diff // self.bb_size
        if not nb_bb:
            return 0
        for bb_id in list(self._bbm_for_each_bb(BB_UNUSED)):
            if self.bb_states[bb_id] != BB_UNUSED:
                continue
            if not self.could_add_memory(self.bb_size):
                return -ENOSPC
            rc = yield from self._bbm_plug_and_add_bb(bb_id)
            if not rc:
                nb_bb -= 1
            if rc or not nb_bb:
                return rc
        while nb_bb:
            if not self.could_add_memory(self.bb_size):
                return -ENOSPC
            rc, bb_id = self._bbm_prepare_next_bb()
            if rc:
                return rc
            rc = yield from self._bbm_plug_and_add_bb(bb_id)
            if rc:
                return rc
            nb_bb -= 1
        return 0

    def _bb_sections(self, bb_id: int) -> range:
        start = (bb_id * self.bb_size) >> PAGE_SHIFT
        return range(start, start + (self.bb_size >> PAGE_SHIFT), PAGES_PER_SECTION)

    def _bbm_bb_is_offline(self, bb_id: int) -> bool:
        return all(self.mm.pfn_to_online_page(pfn) is None for pfn in self._bb_sections(bb_id))

    def _bbm_bb_is_movable(self, bb_id: int) -> bool:
        for pfn in self._bb_sections(bb_id):
            if self.mm.pfn_to_online_page(pfn) is None:
                continue
            block = self.mm.block_of(pfn)
            if block is None or block.zone != ZONE_MOVABLE:
                return False
        return True

    def _bbm_offline_remove_and_unplug_bb(self, bb_id: int) -> Generator_int:
        """Fake-offline (safe unplug), offline and remove, then unplug a big block."""
        if self.bb_states[bb_id] != BB_ADDED:
            return -EINVAL
        sections = self._bb_sections(bb_id)
        done: list[int] = []
        if self.bbm_safe_unplug:
            # Once FAKE_OFFLINE, memory onlined from now on stays fake-offline too.
            yield from self._mutex_lock()
            self._bbm_set_bb_state(bb_id, BB_FAKE_OFFLINE)
            for pfn in sections:
                if self.mm.pfn_to_online_page(pfn) is None:
                    continue
                rc = self._fake_offline(pfn, PAGES_PER_SECTION)
                if rc:
                    self._bbm_rollback_safe_unplug(bb_id, done)
                    return rc
                done.append(pfn)
            self._mutex_unlock()
        rc = yield from self._offline_and_remove_memory(bb_id * self.bb_size, self.bb_size)
        if rc:
            if self.bbm_safe_unplug:
                yield from self._mutex_lock()
                online = [pfn for pfn in sections if self.mm.pfn_to_online_page(pfn) is not None]
                self._bbm_rollback_safe_unplug(bb_id, online)
            return rc
        rc = yield from self._bbm_unplug_bb(bb_id)
        self._bbm_set_bb_state(bb_id, BB_PLUGGED if rc else BB_UNUSED)
        return rc

    def _bbm_rollback_safe_unplug(self, bb_id: int, sections: list[int]) -> None:
        for pfn in sections:
            self._fake_online(pfn, PAGES_PER_SECTION)
        self._bbm_set_bb_state(bb_id, BB_ADDED)
        self._mutex_unlock()

    def _bbm_unplug_request(self, diff: int) -> Generator_int:
        """``virtio_mem_bbm_unplug_request``: offline big blocks, then Movable ones, then any."""
        nb_bb = diff // self.bb_size
        if not nb_bb:
            return 0
        for i in range(3):
            for bb_id in self._bbm_for_each_bb(BB_ADDED, reverse=True):
                if self.bb_states[bb_id] != BB_ADDED:
                    continue
                if i == 0 and not self._bbm_bb_is_offline(bb_id):
                    continue
                if i == 1 and not self._bbm_bb_is_movable(bb_id):
                    continue
                rc = yield from self._bbm_offline_remove_and_unplug_bb(bb_id)
                if rc == -EBUSY:
                    self._event("big_block_busy", block=bb_id)
                    continue
                if not rc:
                    nb_bb -= 1
                if rc or not nb_bb:
                    return rc
            if i == 0 and not self.unplug_online:
                return 0
        return -EBUSY if nb_bb else 0

    # -- views -------------------------------------------------------------------------------------

    def plugged_by_driver(self) -> int:
        """Bytes the driver's own state says are plugged (bitmaps or big-block states)."""
        if self.in_sbm:
            return sum(bin(bits).count("1") for bits in self.sb_states.values()) * self.sb_size
        plugged = (BB_PLUGGED, BB_ADDED, BB_FAKE_OFFLINE)
        return sum(n for state, n in self.bb_count.items() if state in plugged) * self.bb_size

    def plugged_ranges(self) -> Iterator[tuple[int, int]]:
        """The PFN ranges the driver believes plugged, ascending."""
        if self.in_sbm:
            # Neighbouring runs merge, so a fully plugged device is one range.
            pending: tuple[int, int] | None = None
            for mb_id in sorted(self.sb_states):
                for s, e, plugged in self.sbm_subblock_runs(mb_id):
                    if not plugged:
                        continue
                    if pending is not None and pending[1] == s:
                        pending = (pending[0], e)
                        continue
                    if pending is not None:
                        yield pending
                    pending = (s, e)
            if pending is not None:
                yield pending
            return
        bb_pages = self.bb_size >> PAGE_SHIFT
        for bb_id in sorted(self.bb_states):
            if self.bb_states[bb_id] != BB_UNUSED:
                yield bb_id * bb_pages, (bb_id + 1) * bb_pages

    def block_states(self) -> dict[int, str]:
        """Tracked block id -> state label (memory blocks in SBM, big blocks in BBM)."""
        if self.in_sbm:
            return {i: s.label for i, s in sorted(self.mb_states.items())}
        return {i: s.label for i, s in sorted(self.bb_states.items())}

    def block_plugged_pages(self, block_id: int) -> int:
        if self.in_sbm:
            bits = self.sb_states.get(block_id, 0)
            return bin(bits).count("1") * (self.sb_size >> PAGE_SHIFT)
        return (
            0
            if self.bb_states.get(block_id, BB_UNUSED) == BB_UNUSED
            else self.bb_size >> PAGE_SHIFT
        )

    # -- recording -----------------------------------------------------------------------------

    def _event(self, kind: str, /, **data: object) -> None:
        if self._on_event is not None:
            self._on_event(kind, {"device": self.name, **data})

    def _violation(self, kind: str, start: int, end: int, message: str) -> None:
        self.violations.append(DriverViolation(kind, start, end, message))
        self._event("driver_violation", kind=kind, start_pfn=start, end_pfn=end, message=message)

    def _bug(self, block_id: int, message: str) -> None:
        pages = self.memory_block_size >> PAGE_SHIFT if self.in_sbm else self.bb_size >> PAGE_SHIFT
        self._violation("virtio-mem-bug", block_id * pages, (block_id + 1) * pages, message)
