"""The Linux memory-hotplug core: memory blocks, sections, zones, online/offline.

This follows ``mm/memory_hotplug.c`` and ``drivers/base/memory.c`` of current
kernels (6.11+), where they differ from v5.4 the difference is noted:

* memmap init puts every hot-added page in ``PageOffline`` with refcount 1
  (v5.4: ``PG_reserved``), and ``generic_online_page`` clears it;
* pageblocks stay isolated while the ``online_page_callback`` runs and only
  become allocatable just before ``MEM_ONLINE`` (v5.4: at once);
* offlining treats refcount-0 PageOffline pages as free (v5.8+), so a driver
  that drops its references at ``MEM_GOING_OFFLINE`` can offline a block with
  pages it kept back.

Onlining is a generator (:meth:`MemoryManager.online_pages_steps`) that yields
at the two points where something else can happen while ``mem_hotplug_lock`` is
held: after the callbacks and before the sections are marked online
(:data:`PHASE_CALLBACKS_DONE`, where a slow onlining pauses), and after the
pageblocks are un-isolated but before ``MEM_ONLINE`` (:data:`PHASE_WINDOW`, the
window in which another CPU can allocate the new pages). Callers that do not
care run it to the end with :meth:`MemoryManager.online_block`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from extents import RangeMap, RangeSet
from guest.mm.buddy import FreeArea
from guest.mm.errors import E2BIG, EBUSY, EEXIST, EINVAL, ENOMEM, MemoryHotplugError
from guest.mm.geometry import (
    MAX_PFN,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    PAGES_PER_SECTION,
    Geometry,
    count_chunks,
    memmap_pages,
)
from guest.mm.notifier import (
    MEM_CANCEL_OFFLINE,
    MEM_CANCEL_ONLINE,
    MEM_GOING_OFFLINE,
    MEM_GOING_ONLINE,
    MEM_OFFLINE,
    MEM_ONLINE,
    MemoryNotifierChain,
    MemoryNotify,
    notifier_to_errno,
)
from guest.mm.pages import (
    ABSENT,
    ABSENT_PAGE,
    ALLOCATED,
    BUDDY,
    BUDDY_PAGE,
    CORE_OFFLINE_PAGE,
    OWNER_BALLOON,
    PAGE_OFFLINE,
    RESERVED,
    UNINIT,
    UNINIT_PAGE,
    VMEMMAP_PAGE,
    PageState,
    allocated,
    reserved,
)

ZONE_NORMAL = "Normal"
ZONE_MOVABLE = "Movable"
ZONES = (ZONE_NORMAL, ZONE_MOVABLE)

#: sysfs ``state`` strings.
STATE_ONLINE = "online"
STATE_OFFLINE = "offline"
STATE_GOING_OFFLINE = "going-offline"

#: Online types (``mhp_online_type_from_str``), also the ``auto_online_blocks`` values.
MMOP_OFFLINE = "offline"
MMOP_ONLINE = "online"
MMOP_ONLINE_KERNEL = "online_kernel"
MMOP_ONLINE_MOVABLE = "online_movable"
ONLINE_TYPES = (MMOP_OFFLINE, MMOP_ONLINE, MMOP_ONLINE_KERNEL, MMOP_ONLINE_MOVABLE)

PHASE_CALLBACKS_DONE = "callbacks-done"
PHASE_WINDOW = "window"

#: Reserved at the bottom of boot memory (real-mode area, BIOS data), like x86.
BOOT_LOW_RESERVED_PAGES = 256

#: ``online_page_callback_t``: handed a run ``[start_pfn, start_pfn + nr_pages)`` of the
#: aligned chunks the kernel would pass one by one as ``(page, order)``, in ascending
#: order. An implementation must behave as that sequence of per-chunk calls.
OnlinePageCallback = Callable[[int, int], None]


@dataclass
class MemoryBlock:
    """``struct memory_block``: one ``/sys/devices/system/memory/memoryN``."""

    id: int
    start_pfn: int
    nr_pages: int
    state: str = STATE_OFFLINE
    zone: str | None = None
    nid: int = 0
    boot: bool = False
    owner: str | None = None
    #: memmap_on_memory: pages at the block start that hold its own memmap.
    nr_vmemmap_pages: int = 0
    #: memmap allocated from other memory (not memmap_on_memory): ranges to free on remove.
    memmap_ranges: list[tuple[int, int]] = field(default_factory=list)
    #: Pageblocks isolated (onlining in progress or offlining).
    isolated: bool = False

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.nr_pages


@dataclass
class Zone:
    name: str
    free_area: FreeArea
    managed_pages: int = 0
    present_pages: int = 0
    span_start: int = 0
    span_end: int = 0

    @property
    def spanned(self) -> bool:
        return self.span_end > self.span_start

    @property
    def free_pages(self) -> int:
        return self.free_area.free_pages


@dataclass(frozen=True)
class MmWarning:
    """A ``WARN_ON`` the kernel would print: the model records it and carries on."""

    what: str
    start_pfn: int
    end_pfn: int
    message: str


@dataclass
class MmStats:
    callback_chunks: int = 0
    generic_online_pages: int = 0
    blocks_onlined: int = 0
    blocks_offlined: int = 0


class HotplugLockBusy(Exception):
    """``mem_hotplug_lock`` is held by a suspended online operation: retry when released."""


class _HotplugLock:
    """Holds ``mem_hotplug_lock`` for ``who`` while the ``with`` block runs (a plain
    class: a ``contextlib`` generator costs more on every add and online)."""

    __slots__ = ("_mm", "_who")

    def __init__(self, mm: MemoryManager, who: str) -> None:
        self._mm = mm
        self._who = who

    def __enter__(self) -> None:
        holder = self._mm.hotplug_lock_holder
        if holder is not None:
            raise HotplugLockBusy(f"mem_hotplug_lock held by {holder}")
        self._mm.hotplug_lock_holder = self._who

    def __exit__(self, *exc: object) -> None:
        self._mm.hotplug_lock_holder = None


class MemoryManager:
    """One guest's physical memory: boot memory plus whatever gets hot-added."""

    def __init__(
        self,
        boot_pages: int,
        geometry: Geometry | None = None,
        *,
        auto_online_blocks: str = MMOP_OFFLINE,
        memmap_on_memory: bool = False,
        movable_node: bool = False,
        boot_low_reserved_pages: int = BOOT_LOW_RESERVED_PAGES,
    ) -> None:
        self.geometry = geometry or Geometry()
        block_pages = self.geometry.block_pages
        if boot_pages <= 0 or boot_pages % block_pages:
            raise MemoryHotplugError(
                EINVAL,
                f"boot memory ({boot_pages} pages) must be a positive multiple of the "
                f"memory block size ({block_pages} pages)",
            )
        if auto_online_blocks not in ONLINE_TYPES:
            raise MemoryHotplugError(
                EINVAL, f"auto_online_blocks: unknown policy {auto_online_blocks!r}"
            )
        self.auto_online_blocks = auto_online_blocks
        self.memmap_on_memory = memmap_on_memory
        self.movable_node = movable_node
        self.pages: RangeMap[PageState] = RangeMap(ABSENT_PAGE, MAX_PFN)
        self.zones = {name: Zone(name, FreeArea(name)) for name in ZONES}
        self.blocks: dict[int, MemoryBlock] = {}
        self.present_sections = RangeSet(MAX_PFN)
        self.online_sections = RangeSet(MAX_PFN)
        #: Pages that went through generic_online_page since they were added/offlined.
        self.onlined = RangeSet(MAX_PFN)
        self.notifier = MemoryNotifierChain()
        self.warnings: list[MmWarning] = []
        self.stats = MmStats()
        self.allocations: dict[str, RangeSet] = {}
        self._online_page_callback: OnlinePageCallback | None = None
        self._online_page_callback_owner = ""
        #: Called with each newly added block (the KOBJ_ADD uevent udev rules react to).
        self.block_added_hooks: list[Callable[[MemoryBlock], None]] = []
        #: Called at each onlining phase (PHASE_CALLBACKS_DONE, PHASE_WINDOW) with the block.
        self.phase_hooks: list[Callable[[MemoryBlock, str], None]] = []
        #: Called with the ranges of every allocation that touches its pages.
        self.access_hooks: list[Callable[[list[tuple[int, int]], str], None]] = []
        #: Who holds mem_hotplug_lock across a suspended online operation.
        self.hotplug_lock_holder: str | None = None
        self.boot_end_pfn = boot_pages
        self._boot(boot_pages, boot_low_reserved_pages)

    # -- boot ------------------------------------------------------------------

    def _boot(self, boot_pages: int, low_reserved: int) -> None:
        normal = self.zones[ZONE_NORMAL]
        memmap = memmap_pages(boot_pages)
        # memblock allocates top-down: the boot memmap sits at the top of boot memory.
        memmap_start = boot_pages - memmap
        self.pages.set(0, boot_pages, BUDDY_PAGE)
        self.pages.set(0, low_reserved, reserved("memblock"))
        self.pages.set(memmap_start, boot_pages, reserved("memmap"))
        normal.free_area.free_range(low_reserved, memmap_start)
        normal.managed_pages = memmap_start - low_reserved
        normal.present_pages = boot_pages
        normal.span_start, normal.span_end = 0, boot_pages
        self.present_sections.add(0, boot_pages)
        self.online_sections.add(0, boot_pages)
        for block_id in range(boot_pages // self.geometry.block_pages):
            start, _ = self.geometry.block_range(block_id)
            self.blocks[block_id] = MemoryBlock(
                block_id, start, self.geometry.block_pages, STATE_ONLINE, ZONE_NORMAL, boot=True
            )

    # -- counters --------------------------------------------------------------

    @property
    def totalram_pages(self) -> int:
        return sum(z.managed_pages for z in self.zones.values())

    @property
    def present_pages(self) -> int:
        return sum(z.present_pages for z in self.zones.values())

    @property
    def free_pages(self) -> int:
        """NR_FREE_PAGES: free pages the buddy can hand out (isolated pageblocks excluded)."""
        return sum(z.free_area.allocatable_pages for z in self.zones.values())

    @property
    def buddy_pages(self) -> int:
        """Every page in the buddy, isolated pageblocks included."""
        return sum(z.free_area.free_pages for z in self.zones.values())

    def count_pages(self, kind: str, owner: str | None = None) -> int:
        """Pages of one kind (and owner), over all memory. O(distinct page states)."""
        return sum(
            n
            for state, n in self.pages.totals().items()
            if state.kind == kind and (owner is None or state.owner == owner)
        )

    def totalreserve_pages(self) -> int:
        """Sum of the zones' high watermarks (``calculate_totalreserve_pages``)."""
        total = 0
        lowmem_kbytes = self.zones[ZONE_NORMAL].managed_pages * 4
        min_free_kbytes = min(max(math.isqrt(lowmem_kbytes * 16), 128), 262144)
        min_pages_total = min_free_kbytes // 4
        normal_managed = self.zones[ZONE_NORMAL].managed_pages
        for zone in self.zones.values():
            if not zone.managed_pages:
                continue
            if zone.name == ZONE_MOVABLE:
                # ZONE_MOVABLE is a "highmem-like" zone: min is small (SWAP_CLUSTER_MAX..128).
                zone_min = min(max(zone.managed_pages // 1024, 32), 128)
            else:
                zone_min = min_pages_total * zone.managed_pages // max(normal_managed, 1)
            tmp = max(zone_min >> 2, zone.managed_pages * 10 // 10000)
            total += zone_min + 2 * tmp
        return total

    def meminfo(self) -> dict[str, int]:
        """``/proc/meminfo`` fields, in kB as the kernel prints them."""
        free = self.free_pages
        available = max(free - self.totalreserve_pages(), 0)
        return {
            "MemTotal": self.totalram_pages * 4,
            "MemFree": free * 4,
            "MemAvailable": available * 4,
            "Balloon": self.count_pages(PAGE_OFFLINE, OWNER_BALLOON) * 4,
        }

    def meminfo_text(self) -> str:
        return "".join(f"{k + ':':<16}{v:>8} kB\n" for k, v in self.meminfo().items())

    # -- lookups ---------------------------------------------------------------

    def block_of(self, pfn: int) -> MemoryBlock | None:
        return self.blocks.get(self.geometry.block_id(pfn))

    def online_section_nr(self, section_nr: int) -> bool:
        return (section_nr * PAGES_PER_SECTION) in self.online_sections

    def pfn_to_section_nr(self, pfn: int) -> int:
        return pfn // PAGES_PER_SECTION

    def pfn_to_online_page(self, pfn: int) -> PageState | None:
        """The page if its section is online (what PFN walkers use), else None."""
        if pfn not in self.online_sections:
            return None
        state = self.pages.get(pfn)
        return None if state.kind == ABSENT else state

    def page_state(self, pfn: int) -> PageState:
        return self.pages.get(pfn)

    def is_page_offline(self, pfn: int) -> bool:
        return self.pages.get(pfn).kind == PAGE_OFFLINE

    def valid_zones(self, block: MemoryBlock) -> list[str]:
        """``valid_zones`` of a block: its zone when online, the choices when offline."""
        if block.state == STATE_ONLINE:
            return [block.zone] if block.zone else ["none"]
        default = self.zone_for_pfn_range(MMOP_ONLINE, block.start_pfn, block.nr_pages)
        others = [z for z in (ZONE_NORMAL, ZONE_MOVABLE) if z != default]
        return [default, *others]

    def zone_for_pfn_range(self, online_type: str, start_pfn: int, nr_pages: int) -> str:
        """``zone_for_pfn_range`` with the default ``contig-zones`` policy."""
        if online_type == MMOP_ONLINE_KERNEL:
            return ZONE_NORMAL
        if online_type == MMOP_ONLINE_MOVABLE:
            return ZONE_MOVABLE
        end = start_pfn + nr_pages
        in_kernel = self._zone_intersects(ZONE_NORMAL, start_pfn, end)
        in_movable = self._zone_intersects(ZONE_MOVABLE, start_pfn, end)
        if in_kernel and not in_movable:
            return ZONE_NORMAL
        if in_movable and not in_kernel:
            return ZONE_MOVABLE
        return ZONE_MOVABLE if self.movable_node else ZONE_NORMAL

    def _zone_intersects(self, name: str, start: int, end: int) -> bool:
        zone = self.zones[name]
        return zone.spanned and start < zone.span_end and zone.span_start < end

    # -- online_page_callback ---------------------------------------------------

    def set_online_page_callback(
        self, callback: OnlinePageCallback, *, owner: str | None = None
    ) -> None:
        """Install a callback; -EINVAL unless the generic one is installed.

        ``owner`` (the driver's name) is only remembered so the refusal can say who
        holds the callback; the kernel keeps no such name.
        """
        if self._online_page_callback is not None:
            holder = self._online_page_callback_owner
            raise MemoryHotplugError(
                EINVAL,
                "set_online_page_callback: another online_page_callback is installed"
                + (f" (by {holder})" if holder else ""),
            )
        self._online_page_callback = callback
        self._online_page_callback_owner = owner or str(getattr(callback, "__qualname__", ""))

    def restore_online_page_callback(self, callback: OnlinePageCallback) -> None:
        """Put ``generic_online_page`` back; -EINVAL unless ``callback`` is installed."""
        # != rather than "is not": a driver's bound method is a new object on every access.
        if self._online_page_callback is None or self._online_page_callback != callback:
            raise MemoryHotplugError(
                EINVAL, "restore_online_page_callback: that callback is not the installed one"
            )
        self._online_page_callback = None
        self._online_page_callback_owner = ""

    @property
    def online_page_callback_installed(self) -> bool:
        return self._online_page_callback is not None

    @property
    def online_page_callback_owner(self) -> str | None:
        """Who installed the non-generic callback (None: ``generic_online_page``)."""
        return self._online_page_callback_owner if self._online_page_callback else None

    def generic_online_page(self, pfn: int, order: int) -> None:
        """Hand ``2^order`` pages at ``pfn`` to the buddy (clears PageOffline)."""
        if pfn % (1 << order):
            raise ValueError(f"generic_online_page: pfn {pfn:#x} not aligned to order {order}")
        self.generic_online_pages(pfn, pfn + (1 << order))

    def generic_online_pages(self, start: int, end: int) -> None:
        """:meth:`generic_online_page` over a run of aligned chunks ``[start, end)``.

        Only PageOffline pages of blocks that are associated with a zone go to the
        buddy; any other page is the double onlining the kernel would WARN about (and
        corrupt its free lists with): recorded in :attr:`warnings` and left alone.
        """
        for s, e, state in self.pages.runs(start, end):
            block = self.block_of(s)
            if state.kind != PAGE_OFFLINE or block is None or block.zone is None:
                self.warnings.append(
                    MmWarning(
                        "generic_online_page-not-offline",
                        s,
                        e,
                        f"generic_online_page on {state.kind} pages (not PageOffline in a "
                        "zone): double onlining",
                    )
                )
                continue
            for bs, be in self._split_by_block(s, e):
                self._free_to_buddy(bs, be)
            if not self.onlined.disjoint(s, e):
                self.warnings.append(
                    MmWarning(
                        "generic_online_page-twice",
                        s,
                        e,
                        "generic_online_page called twice for pages between add and offline",
                    )
                )
            self.onlined.add(s, e)
            self.stats.generic_online_pages += e - s

    def _free_to_buddy(self, start: int, end: int) -> None:
        block = self.block_of(start)
        assert block is not None and block.zone is not None
        zone = self.zones[block.zone]
        self.pages.set(start, end, BUDDY_PAGE)
        # FPI_TO_TAIL: hotplugged pages go to the tail of the free lists.
        zone.free_area.free_range(start, end, to_tail=True, isolated=block.isolated)
        zone.managed_pages += end - start

    def _split_by_block(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        block_pages = self.geometry.block_pages
        pfn = start
        while pfn < end:
            stop = min(end, (pfn // block_pages + 1) * block_pages)
            yield pfn, stop
            pfn = stop

    # -- add / remove ----------------------------------------------------------

    def _hotplug_locked(self, who: str) -> _HotplugLock:
        """``mem_hotplug_begin`` / ``mem_hotplug_done``; HotplugLockBusy if it is held.

        Also spans the yields of :meth:`online_pages_steps`: a suspended onlining keeps
        the lock, as the kernel's does.
        """
        return _HotplugLock(self, who)

    def add_memory(
        self,
        start_pfn: int,
        nr_pages: int,
        *,
        owner: str | None = None,
        memmap_on_memory: bool | None = None,
    ) -> list[MemoryBlock]:
        """``add_memory``: create offline blocks for ``[start_pfn, +nr_pages)``.

        Then onlines them when ``auto_online_blocks`` says so (inside the call, as
        ``add_memory_resource`` does). Raises -EINVAL (misaligned), -EEXIST (overlap),
        -E2BIG (beyond MAX_PHYSMEM_BITS), -ENOMEM (no room for the memmap).
        """
        with self._hotplug_locked("add_memory"):
            new_blocks = self._add_memory_locked(start_pfn, nr_pages, owner, memmap_on_memory)
        # The KOBJ_ADD uevents and auto-onlining come after mem_hotplug_done().
        for block in new_blocks:
            for hook in list(self.block_added_hooks):
                hook(block)
        if self.auto_online_blocks != MMOP_OFFLINE:
            for block in new_blocks:
                if block.state == STATE_OFFLINE:
                    # online_memory_block: errors are ignored by add_memory_resource.
                    with contextlib.suppress(MemoryHotplugError):
                        self.online_block(block.id, self.auto_online_blocks)
        return new_blocks

    def add_memory_driver_managed(
        self, start_pfn: int, nr_pages: int, *, owner: str
    ) -> list[MemoryBlock]:
        """``add_memory_driver_managed``: :meth:`add_memory` for memory a driver manages.

        What differs in Linux is the resource ("System RAM (virtio_mem)", which kexec
        and /proc/iomem users treat as driver-managed) and that the memmap never comes
        from the memory itself (virtio-mem does not ask for ``MHP_MEMMAP_ON_MEMORY``);
        the model has no resource tree, so only the latter shows.
        """
        return self.add_memory(start_pfn, nr_pages, owner=owner, memmap_on_memory=False)

    def _add_memory_locked(
        self, start_pfn: int, nr_pages: int, owner: str | None, memmap_on_memory: bool | None
    ) -> list[MemoryBlock]:
        block_pages = self.geometry.block_pages
        end_pfn = start_pfn + nr_pages
        if nr_pages <= 0 or start_pfn % block_pages or nr_pages % block_pages:
            raise MemoryHotplugError(
                EINVAL,
                f"Block size [{self.geometry.block_size_bytes:#x}] unaligned hotplug range: "
                f"start {start_pfn << 12:#x}, size {nr_pages << 12:#x}",
            )
        if start_pfn < 0 or end_pfn > MAX_PFN:
            raise MemoryHotplugError(
                E2BIG, f"hotplug range [{start_pfn:#x}, {end_pfn:#x}) beyond MAX_PHYSMEM_BITS"
            )
        if not self.pages.all_equal(start_pfn, end_pfn, ABSENT_PAGE):
            raise MemoryHotplugError(
                EEXIST, f"range [{start_pfn << 12:#x}, {end_pfn << 12:#x}) overlaps present memory"
            )
        use_altmap = self.memmap_on_memory if memmap_on_memory is None else memmap_on_memory
        per_block_memmap = memmap_pages(block_pages)
        # The memmap is per section (sparse_add_section): allocate it per block, so that
        # removing part of an added range frees exactly that part's memmap.
        memmap_by_block: list[list[tuple[int, int]]] = []
        if not use_altmap:
            try:
                for _ in range(nr_pages // block_pages):
                    memmap_by_block.append(self._alloc_memmap(per_block_memmap))
            except MemoryHotplugError:
                for ranges in memmap_by_block:
                    self._free_memmap(ranges)
                raise
        self.pages.set(start_pfn, end_pfn, UNINIT_PAGE)
        self.present_sections.add(start_pfn, end_pfn)
        new_blocks: list[MemoryBlock] = []
        for i, block_start in enumerate(range(start_pfn, end_pfn, block_pages)):
            block = MemoryBlock(
                self.geometry.block_id(block_start), block_start, block_pages, owner=owner
            )
            if use_altmap:
                block.nr_vmemmap_pages = per_block_memmap
                self.pages.set(block_start, block_start + per_block_memmap, VMEMMAP_PAGE)
            else:
                block.memmap_ranges = memmap_by_block[i]
            self.blocks[block.id] = block
            new_blocks.append(block)
        return new_blocks

    def _alloc_memmap(self, nr_pages: int) -> list[tuple[int, int]]:
        area = self.zones[ZONE_NORMAL].free_area
        # vmemmap is populated in PMD-sized (2 MiB) pieces when possible.
        # vmemmap_populate_hugepages() falls back to base pages when no 2 MiB block is free.
        blocks = nr_pages // PAGEBLOCK_NR_PAGES
        taken = area.alloc(PAGEBLOCK_ORDER, blocks)
        short = nr_pages - sum(e - s for s, e in taken)
        taken += area.alloc(0, short)
        got = sum(e - s for s, e in taken)
        if got < nr_pages:
            for s, e in taken:
                area.free_range(s, e)
            raise MemoryHotplugError(
                ENOMEM, f"no memory for the memmap of the new memory ({nr_pages} pages needed)"
            )
        for s, e in taken:
            self.pages.set(s, e, reserved("memmap"))
        return taken

    def _free_memmap(self, ranges: list[tuple[int, int]]) -> None:
        for s, e in ranges:
            block = self.block_of(s)
            assert block is not None and block.zone is not None
            self.pages.set(s, e, BUDDY_PAGE)
            self.zones[block.zone].free_area.free_range(s, e)

    def remove_memory(self, start_pfn: int, nr_pages: int) -> None:
        """``remove_memory``: every block of the range must be offline (-EBUSY otherwise)."""
        with self._hotplug_locked("remove_memory"):
            self._remove_memory_locked(start_pfn, nr_pages)

    def _remove_memory_locked(self, start_pfn: int, nr_pages: int) -> None:
        block_pages = self.geometry.block_pages
        end_pfn = start_pfn + nr_pages
        if nr_pages <= 0 or start_pfn % block_pages or nr_pages % block_pages:
            raise MemoryHotplugError(EINVAL, "remove_memory: range not aligned to the block size")
        ids = range(start_pfn // block_pages, end_pfn // block_pages)
        for block_id in ids:
            block = self.blocks.get(block_id)
            if block is None or block.boot:
                raise MemoryHotplugError(
                    EINVAL, f"remove_memory: memory{block_id} is not hot-added memory"
                )
            if block.state != STATE_OFFLINE:
                raise MemoryHotplugError(EBUSY, f"remove_memory: memory{block_id} is not offline")
        for block_id in ids:
            block = self.blocks.pop(block_id)
            self._free_memmap(block.memmap_ranges)
        self.pages.set(start_pfn, end_pfn, ABSENT_PAGE)
        self.present_sections.remove(start_pfn, end_pfn)
        self.onlined.remove(start_pfn, end_pfn)

    def offline_and_remove_memory(self, start_pfn: int, nr_pages: int) -> None:
        """``offline_and_remove_memory`` (5.8+): offline every online block of the range, remove it.

        When a block fails to go offline, the blocks this call offlined go online again
        in their zones (``online_kernel`` / ``online_movable``) and the error is raised;
        nothing is removed. Raises HotplugLockBusy, before doing anything, while a
        suspended onlining holds ``mem_hotplug_lock``.
        """
        block_pages = self.geometry.block_pages
        if nr_pages <= 0 or start_pfn % block_pages or nr_pages % block_pages:
            raise MemoryHotplugError(
                EINVAL, "offline_and_remove_memory: range not aligned to the block size"
            )
        if self.hotplug_lock_holder is not None:
            raise HotplugLockBusy(f"mem_hotplug_lock held by {self.hotplug_lock_holder}")
        ids = range(start_pfn // block_pages, (start_pfn + nr_pages) // block_pages)
        for block_id in ids:
            block = self.blocks.get(block_id)
            if block is None or block.boot:
                raise MemoryHotplugError(
                    EINVAL, f"offline_and_remove_memory: memory{block_id} is not hot-added memory"
                )
        offlined: list[tuple[int, str]] = []
        try:
            for block_id in ids:
                block = self.blocks[block_id]
                if block.state == STATE_ONLINE:
                    zone = block.zone or ZONE_NORMAL
                    self.offline_block(block_id)
                    offlined.append((block_id, zone))
            self.remove_memory(start_pfn, nr_pages)
        except MemoryHotplugError:
            for block_id, zone in reversed(offlined):
                online_type = MMOP_ONLINE_MOVABLE if zone == ZONE_MOVABLE else MMOP_ONLINE_KERNEL
                with contextlib.suppress(MemoryHotplugError):
                    self.online_block(block_id, online_type)
            raise

    # -- online ----------------------------------------------------------------

    def online_block(self, block_id: int, online_type: str = MMOP_ONLINE) -> None:
        """Online a block in one go (``device_online``); raises MemoryHotplugError."""
        for _ in self.online_pages_steps(block_id, online_type):
            pass

    def online_pages_steps(
        self, block_id: int, online_type: str = MMOP_ONLINE
    ) -> Generator[str, None, None]:
        """``memory_block_online`` → ``online_pages``, yielding at the two phases."""
        block = self._offline_block_for_online(block_id, online_type)
        with self._hotplug_locked(f"online memory{block_id}"):
            zone_name = self.zone_for_pfn_range(online_type, block.start_pfn, block.nr_pages)
            zone = self.zones[zone_name]
            start = block.start_pfn + block.nr_vmemmap_pages
            end = block.end_pfn
            arg = MemoryNotify(start, end - start)
            # move_pfn_range_to_zone(..., MIGRATE_ISOLATE): memmap init, PageOffline, refcount 1.
            block.zone = zone_name
            block.isolated = True
            self._grow_zone_span(zone, block.start_pfn, block.end_pfn)
            self.pages.set(start, end, CORE_OFFLINE_PAGE)
            if block.nr_vmemmap_pages:
                zone.present_pages += block.nr_vmemmap_pages
            ret = self.notifier.call(MEM_GOING_ONLINE, arg)
            err = notifier_to_errno(ret)
            if err:
                self.notifier.call(MEM_CANCEL_ONLINE, arg)
                self._undo_move_to_zone(block, zone)
                raise MemoryHotplugError(-err, f"memory{block_id}: MEM_GOING_ONLINE vetoed")
            self._online_pages_range(start, end)
            zone.present_pages += end - start
            self._phase(block, PHASE_CALLBACKS_DONE)
            yield PHASE_CALLBACKS_DONE
            # online_mem_sections: only now does pfn_to_online_page() see the pages.
            self.online_sections.add(block.start_pfn, block.end_pfn)
            # undo_isolate_page_range: the buddy may now hand out the new pages.
            block.isolated = False
            zone.free_area.unisolate(block.start_pfn, block.end_pfn)
            self._phase(block, PHASE_WINDOW)
            yield PHASE_WINDOW
            self.notifier.call(MEM_ONLINE, arg)
            block.state = STATE_ONLINE
            self.stats.blocks_onlined += 1

    def _phase(self, block: MemoryBlock, phase: str) -> None:
        for hook in list(self.phase_hooks):
            hook(block, phase)

    def _offline_block_for_online(self, block_id: int, online_type: str) -> MemoryBlock:
        if online_type not in ONLINE_TYPES or online_type == MMOP_OFFLINE:
            raise MemoryHotplugError(EINVAL, f"unknown online type {online_type!r}")
        block = self.blocks.get(block_id)
        if block is None:
            raise MemoryHotplugError(EINVAL, f"no memory block {block_id}")
        if block.state != STATE_OFFLINE:
            raise MemoryHotplugError(EINVAL, f"memory{block_id} is already {block.state}")
        return block

    def _online_pages_range(self, start: int, end: int) -> None:
        """``online_pages_range``: the callback over ascending aligned chunks.

        Pages a driver claimed at MEM_GOING_ONLINE (PageOffline with an owner: the
        ``going-online`` design) are skipped; the rest go to the callback, or to
        ``generic_online_page`` when none is installed.
        """
        callback = self._online_page_callback or self.generic_online_pages_callback
        for s, e, state in self.pages.runs(start, end):
            if state != CORE_OFFLINE_PAGE:
                continue
            self.stats.callback_chunks += count_chunks(s, e)
            callback(s, e - s)

    def generic_online_pages_callback(self, start_pfn: int, nr_pages: int) -> None:
        self.generic_online_pages(start_pfn, start_pfn + nr_pages)

    def _undo_move_to_zone(self, block: MemoryBlock, zone: Zone) -> None:
        """``remove_pfn_range_from_zone`` after a failed online."""
        start = block.start_pfn + block.nr_vmemmap_pages
        zone.present_pages -= block.nr_vmemmap_pages
        self.pages.set(start, block.end_pfn, UNINIT_PAGE)
        block.zone = None
        block.isolated = False
        self._shrink_zone_span(zone)

    def _grow_zone_span(self, zone: Zone, start: int, end: int) -> None:
        if not zone.spanned:
            zone.span_start, zone.span_end = start, end
        else:
            zone.span_start = min(zone.span_start, start)
            zone.span_end = max(zone.span_end, end)

    def _shrink_zone_span(self, zone: Zone) -> None:
        ids = [b.id for b in self.blocks.values() if b.zone == zone.name]
        if not ids:
            zone.span_start = zone.span_end = 0
            return
        first, last = self.blocks[min(ids)], self.blocks[max(ids)]
        zone.span_start, zone.span_end = first.start_pfn, last.end_pfn

    # -- offline ---------------------------------------------------------------

    def offline_block(self, block_id: int) -> None:
        """``memory_block_offline`` → ``offline_pages``; raises MemoryHotplugError."""
        block = self.blocks.get(block_id)
        if block is None:
            raise MemoryHotplugError(EINVAL, f"no memory block {block_id}")
        if block.state != STATE_ONLINE:
            raise MemoryHotplugError(EINVAL, f"memory{block_id} is already {block.state}")
        if block.zone is None:
            raise MemoryHotplugError(EINVAL, f"memory{block_id} spans several zones")
        with self._hotplug_locked(f"offline memory{block_id}"):
            self._offline_pages(block)

    def _offline_pages(self, block: MemoryBlock) -> None:
        """``offline_pages`` with ``mem_hotplug_lock`` held."""
        assert block.zone is not None
        block_id = block.id
        zone = self.zones[block.zone]
        start = block.start_pfn + block.nr_vmemmap_pages
        end = block.end_pfn
        arg = MemoryNotify(start, end - start)
        # start_isolate_page_range: has_unmovable_pages() treats PageOffline as movable.
        for s, _e, state in self.pages.runs(start, end):
            if state.kind == RESERVED or (state.kind == ALLOCATED and not state.movable):
                raise MemoryHotplugError(
                    EBUSY,
                    f"memory{block_id}: unmovable page at pfn {s:#x} ({state.kind} {state.owner})",
                )
        block.state = STATE_GOING_OFFLINE
        block.isolated = True
        zone.free_area.isolate(start, end)
        ret = self.notifier.call(MEM_GOING_OFFLINE, arg)
        err = notifier_to_errno(ret)
        if err:
            self._cancel_offline(block, zone, arg)
            raise MemoryHotplugError(-err, f"memory{block_id}: MEM_GOING_OFFLINE vetoed")
        # scan_movable_pages: PageOffline with a reference is unmovable.
        for s, _e, state in self.pages.runs(start, end):
            if state.kind == PAGE_OFFLINE and state.refcount:
                self._cancel_offline(block, zone, arg)
                raise MemoryHotplugError(
                    EBUSY,
                    f"memory{block_id}: unmovable page at pfn {s:#x} (PageOffline, owner "
                    f"{state.owner or 'core'}, refcount {state.refcount})",
                )
        try:
            self._migrate_range(start, end, block.zone)
        except MemoryHotplugError:
            self._cancel_offline(block, zone, arg)
            raise
        # __offline_isolated_pages: sections offline, free pages leave the zone,
        # PageOffline (refcount 0) pages are skipped and were never managed.
        self.online_sections.remove(block.start_pfn, block.end_pfn)
        dropped = zone.free_area.drop_isolated(start, end)
        zone.managed_pages -= dropped
        zone.present_pages -= end - start + block.nr_vmemmap_pages
        self.pages.set(start, end, UNINIT_PAGE)
        self.onlined.remove(block.start_pfn, block.end_pfn)
        block.isolated = False
        block.zone = None
        self._shrink_zone_span(zone)
        self.notifier.call(MEM_OFFLINE, arg)
        block.state = STATE_OFFLINE
        self.stats.blocks_offlined += 1

    def _cancel_offline(self, block: MemoryBlock, zone: Zone, arg: MemoryNotify) -> None:
        block.isolated = False
        zone.free_area.unisolate(block.start_pfn, block.end_pfn, to_tail=False)
        self.notifier.call(MEM_CANCEL_OFFLINE, arg)
        block.state = STATE_ONLINE

    def _migrate_range(self, start: int, end: int, zone_name: str) -> None:
        """``do_migrate_range``: move movable allocations out of ``[start, end)``.

        The kernel retries until it succeeds or a signal arrives; with nowhere to
        migrate to, the model gives up at once with -EBUSY.
        """
        moves = [(s, e, st) for s, e, st in self.pages.runs(start, end) if st.kind == ALLOCATED]
        need = sum(e - s for s, e, _ in moves)
        if not need:
            return
        # Migration targets come from a GFP_HIGHUSER_MOVABLE allocation: ZONE_MOVABLE first,
        # then ZONE_NORMAL (the block's own free pages are isolated and never chosen).
        areas = [self.zones[name].free_area for name in (ZONE_MOVABLE, ZONE_NORMAL)]
        if sum(a.allocatable_pages for a in areas) < need:
            raise MemoryHotplugError(
                EBUSY, f"cannot migrate {need} pages out of [{start:#x}, {end:#x})"
            )
        isolated_area = self.zones[zone_name].free_area
        for s, e, state in moves:
            left = e - s
            for area in areas:
                for ts, te in area.alloc(0, left):
                    self.pages.set(ts, te, state)
                    self.allocations.setdefault(state.owner, RangeSet(MAX_PFN)).add(ts, te)
                    left -= te - ts
                if not left:
                    break
            self.allocations[state.owner].remove(s, e)
            self.pages.set(s, e, BUDDY_PAGE)
            isolated_area.free_range(s, e, isolated=True)

    # -- allocation ------------------------------------------------------------

    def alloc_pages(
        self,
        order: int,
        count: int,
        *,
        zone: str = ZONE_NORMAL,
        tag: str = "user",
        movable: bool | None = None,
        touch: bool = True,
    ) -> list[tuple[int, int]]:
        """Allocate ``count`` blocks of ``2^order`` pages from one zone.

        Returns the ranges taken; fewer pages than asked means the zone ran out.
        Allocations in ZONE_MOVABLE are movable; in ZONE_NORMAL they are
        unmovable unless ``movable`` says otherwise.
        """
        if zone not in self.zones:
            raise MemoryHotplugError(EINVAL, f"unknown zone {zone!r}")
        is_movable = zone == ZONE_MOVABLE if movable is None else movable
        if zone == ZONE_MOVABLE and not is_movable:
            raise MemoryHotplugError(EINVAL, "ZONE_MOVABLE only takes movable allocations")
        state = allocated(tag, is_movable)
        taken = self.zones[zone].free_area.alloc(order, count)
        if taken:
            owned = self.allocations.setdefault(tag, RangeSet(MAX_PFN))
            for s, e in taken:
                self.pages.set(s, e, state)
                owned.add(s, e)
            if touch:
                for hook in list(self.access_hooks):
                    hook(taken, tag)
        return taken

    def free_pages_of(self, tag: str, nr_pages: int | None = None) -> int:
        """Free ``nr_pages`` (all if None) of the pages allocated under ``tag``, highest first."""
        owned = self.allocations.get(tag)
        if not owned:
            return 0
        left = len(owned) if nr_pages is None else nr_pages
        freed = 0
        for s, e in reversed(list(owned.ranges())):
            if left <= 0:
                break
            take_start = max(s, e - left)
            self.free_range(take_start, e)
            left -= e - take_start
            freed += e - take_start
        return freed

    def free_range(self, start: int, end: int) -> None:
        """Free allocated pages ``[start, end)`` back to the buddy (``__free_pages``)."""
        for s, e, state in self.pages.runs(start, end):
            if state.kind != ALLOCATED:
                raise MemoryHotplugError(EINVAL, f"free of {state.kind} pages at {s:#x}")
            self.allocations[state.owner].remove(s, e)
            for bs, be in self._split_by_block(s, e):
                block = self.block_of(bs)
                assert block is not None and block.zone is not None
                self.pages.set(bs, be, BUDDY_PAGE)
                self.zones[block.zone].free_area.free_range(bs, be, isolated=block.isolated)

    # -- contiguous ranges ---------------------------------------------------------

    def alloc_contig_range(self, start: int, end: int, owner: str = "contig") -> None:
        """``alloc_contig_range(start, end, MIGRATE_MOVABLE)``: hand ``[start, end)`` to the caller.

        Every page must be free or hold a movable allocation (ZONE_MOVABLE allocations
        are movable; ZONE_NORMAL ones are kernel allocations and unmovable unless made
        movable): the pageblocks are isolated, movable allocations migrate out (to
        ZONE_MOVABLE first, then ZONE_NORMAL, never into the range), and then every
        page belongs to the caller (refcount 1, ``owner``). Managed counts do not
        change: the caller adjusts them. -EBUSY: a page that cannot move (an unmovable
        allocation, reserved memory, a PageOffline page); -ENOMEM: nowhere to migrate
        to; -EINVAL: the range is not online memory of one zone. Nothing changes on
        failure.
        """
        zone_name = self._contig_zone(start, end)
        need = 0
        for s, _e, state in self.pages.runs(start, end):
            if state.kind == BUDDY:
                continue
            if state.kind == ALLOCATED and state.movable:
                need += _e - s
                continue
            raise MemoryHotplugError(
                EBUSY,
                f"alloc_contig_range: unmovable page at pfn {s:#x} ({state.kind}"
                f"{' ' + state.owner if state.owner else ''})",
            )
        area = self.zones[zone_name].free_area
        # start_isolate_page_range: the range's free pages are no migration target.
        area.isolate(start, end)
        targets = sum(
            self.zones[z].free_area.allocatable_pages for z in (ZONE_MOVABLE, ZONE_NORMAL)
        )
        if targets < need:
            area.unisolate(start, end, to_tail=False)
            raise MemoryHotplugError(
                ENOMEM,
                f"alloc_contig_range: no room to migrate {need} pages out of "
                f"[{start:#x}, {end:#x})",
            )
        self._migrate_range(start, end, zone_name)
        # Every page of the range is now free and isolated: take them all.
        assert area.isolated.covers(start, end)
        area.isolated.remove(start, end)
        self.pages.set(start, end, reserved(owner))

    def _contig_zone(self, start: int, end: int) -> str:
        zones = set()
        for bs, _be in self._split_by_block(start, end):
            block = self.block_of(bs)
            if block is None or block.state != STATE_ONLINE or block.zone is None:
                raise MemoryHotplugError(
                    EINVAL, f"alloc_contig_range: pfn {bs:#x} is not in online memory"
                )
            zones.add(block.zone)
        if len(zones) != 1:
            raise MemoryHotplugError(EINVAL, "alloc_contig_range: the range spans zones")
        return zones.pop()

    def free_contig_range(self, start: int, end: int) -> None:
        """``free_contig_range``: the caller's pages ``[start, end)`` back to the buddy.

        Managed counts do not change (the caller adjusts them, as after
        :meth:`alloc_contig_range`).
        """
        for s, _e, state in self.pages.runs(start, end):
            if state.kind in (ABSENT, UNINIT, BUDDY, ALLOCATED):
                raise MemoryHotplugError(
                    EINVAL,
                    f"free_contig_range: {state.kind} page at pfn {s:#x} is not the caller's",
                )
        self.free_offline_pages(start, end)

    # -- PageOffline helpers for drivers ----------------------------------------

    def set_page_offline(self, start: int, end: int, owner: str, refcount: int = 1) -> None:
        """``__SetPageOffline`` on pages the caller owns (not free, not allocated by others)."""
        self.pages.set(start, end, PageState(PAGE_OFFLINE, owner, refcount))

    def take_free_pages(self, start: int, end: int) -> int:
        """Pull the free pages of ``[start, end)`` out of the buddy (``alloc_contig_range``-like).

        Returns how many pages were free and taken; the caller owns them after this
        and must mark them (e.g. PageOffline). Managed pages drop accordingly, and the
        pages count as not onlined any more: handing them back later with
        ``generic_online_page`` is onlining them anew, not twice.
        """
        taken = 0
        for s, e, state in self.pages.runs(start, end):
            if state.kind != BUDDY:
                continue
            for bs, be in self._split_by_block(s, e):
                block = self.block_of(bs)
                assert block is not None and block.zone is not None
                zone = self.zones[block.zone]
                area = zone.free_area
                for fs, fe in list(area.free.ranges(bs, be)):
                    area.take_range(fs, fe)
                area.isolated.remove(bs, be)
                zone.managed_pages -= be - bs
                self.pages.set(bs, be, reserved("taken"))
                self.onlined.remove(bs, be)
                taken += be - bs
        return taken

    def adjust_managed_range(self, start: int, end: int, sign: int) -> None:
        """``adjust_managed_page_count`` for every page of ``[start, end)`` (sign ±1)."""
        for bs, be in self._split_by_block(start, end):
            block = self.block_of(bs)
            assert block is not None and block.zone is not None
            self.zones[block.zone].managed_pages += sign * (be - bs)

    def free_offline_pages(self, start: int, end: int) -> None:
        """``__ClearPageOffline`` + ``__free_page``: PageOffline pages straight to the buddy.

        What a balloon does on deflate; unlike :meth:`generic_online_pages` it neither
        changes the managed count (the caller does) nor counts as onlining.
        """
        for bs, be in self._split_by_block(start, end):
            block = self.block_of(bs)
            assert block is not None and block.zone is not None
            self.pages.set(bs, be, BUDDY_PAGE)
            self.zones[block.zone].free_area.free_range(bs, be, isolated=block.isolated)

    # -- whole-model checks -------------------------------------------------------

    def check(self) -> list[str]:
        """Internal consistency (buddy index, counters); empty when sound."""
        problems: list[str] = []
        for zone in self.zones.values():
            problems += zone.free_area.check()
        buddy_total = self.count_pages(BUDDY)
        if buddy_total != self.buddy_pages:
            problems.append(
                f"pages marked free {buddy_total} != pages in the buddy {self.buddy_pages}"
            )
        if self.count_pages(UNINIT) and self.online_sections.count(0, MAX_PFN) > 0:
            for s, e, state in self.pages.runs(0, MAX_PFN):
                if state.kind == UNINIT and not self.online_sections.disjoint(s, e):
                    problems.append(f"uninitialised memmap in an online section at {s:#x}")
                    break
        return problems
