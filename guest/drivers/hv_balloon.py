"""The Linux ``hv_balloon`` driver (``drivers/hv/hv_balloon.c``) on the memory model.

Sans-I/O: :meth:`HvBalloon.receive` takes a host message; messages for the host
collect in :attr:`HvBalloon.outbox`; work that waits (hot-add waiting for each
block to be onlined, the 1 s status thread) runs as tasks on the guest's
:class:`guest.kernel.Scheduler`.

Two modes:

* ``upstream`` is what Linux does today, including the suspected bugs E1-E3 of
  hyperv-dm.md §4 (the invariant checker must flag what they do);
* ``fixed`` computes the region of an unaligned region-less request from both
  ends (E1), handles a request that backs pages in an existing gap (E2), and
  re-checks a block at ``MEM_ONLINE`` for pages backed while it was being
  onlined (E3).

Three strategies keep unbacked pages out of the buddy (DESIGN.md):
``callback`` (``set_online_page_callback(hv_online_page)``, what Linux does),
``going-online`` (claim them at ``MEM_GOING_ONLINE``; the core skips claimed
pages), ``online-then-reclaim`` (everything goes to the buddy, a ``MEM_ONLINE``
notifier pulls the unbacked pages back: racy by construction).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field

from guest.kernel import Command, Scheduler, Sleep, Task, Wait, Work
from guest.mm.errors import EEXIST, MemoryHotplugError
from guest.mm.geometry import PAGES_PER_SECTION
from guest.mm.memory import ZONE_NORMAL, HotplugLockBusy, MemoryManager
from guest.mm.notifier import (
    MEM_CANCEL_ONLINE,
    MEM_GOING_ONLINE,
    MEM_OFFLINE,
    MEM_ONLINE,
    NOTIFY_OK,
    MemoryAction,
    MemoryNotify,
)
from guest.mm.pages import (
    ALLOCATED,
    BUDDY,
    CORE_OFFLINE_PAGE,
    OWNER_BALLOON,
    OWNER_CORE,
    PAGE_OFFLINE,
    PageState,
)
from memhp.dm import (
    GUEST_VERSION_ORDER,
    MAX_RANGES_PER_MESSAGE,
    AccessReport,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesReport,
    CapabilitiesResponse,
    DmMessage,
    HotAddRequest,
    HotAddResponse,
    InfoMessage,
    PageRange,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionRequest,
    VersionResponse,
    compute_balloon_floor,
    split_ranges,
)
from memhp.units import align_up

#: A task body that returns a value to the task that runs it with ``yield from``.
Generator_int = Generator[Command, bool | None, int]
Generator_none = Generator[Command, bool | None, None]

DRIVER = "hv_balloon"
MODES = ("upstream", "fixed")
STRATEGIES = ("callback", "going-online", "online-then-reclaim")

# dm_device.state
DM_INITIALIZING = "DM_INITIALIZING"
DM_INITIALIZED = "DM_INITIALIZED"
DM_BALLOON_UP = "DM_BALLOON_UP"
DM_BALLOON_DOWN = "DM_BALLOON_DOWN"
DM_HOT_ADD = "DM_HOT_ADD"
DM_INIT_ERROR = "DM_INIT_ERROR"

PAGES_IN_2M = 512
#: wait_for_completion_timeout(&dm->ol_waitevent, 5 * HZ) per hot-added chunk.
ONLINE_WAIT_SECONDS = 5.0
#: Version and capabilities negotiation waits.
PROBE_WAIT_SECONDS = 5.0
#: module parameter pressure_report_delay: status calls skipped after start.
PRESSURE_REPORT_DELAY = 45
STATUS_INTERVAL = 1.0


def _left_by_memmap_init(state: PageState) -> bool:
    return state == CORE_OFFLINE_PAGE


def _not_page_offline(state: PageState) -> bool:
    return state.kind != PAGE_OFFLINE


@dataclass
class HvHotaddState:
    """``struct hv_hotadd_state``: one hot-add region."""

    start_pfn: int
    end_pfn: int
    ha_end_pfn: int
    covered_start_pfn: int
    covered_end_pfn: int
    #: ``struct hv_hotadd_gap`` list, in creation order (may be inverted upstream: E2).
    gaps: list[tuple[int, int]] = field(default_factory=list)

    def pfn_is_backed(self, pfn: int) -> bool:
        """``has_pfn_is_backed``."""
        if pfn < self.covered_start_pfn or pfn >= self.covered_end_pfn:
            return False
        return not any(gs <= pfn < ge for gs, ge in self.gaps)

    def backed_ranges(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of ``[start, end)`` that :meth:`pfn_is_backed` says are backed."""
        lo, hi = max(start, self.covered_start_pfn), min(end, self.covered_end_pfn)
        if lo >= hi:
            return
        if not self.gaps:
            yield lo, hi
            return
        holes = sorted((max(gs, lo), min(ge, hi)) for gs, ge in self.gaps if gs < ge)
        pos = lo
        for gs, ge in holes:
            if ge <= pos or gs >= hi:
                continue
            if gs > pos:
                yield pos, gs
            pos = max(pos, ge)
        if pos < hi:
            yield pos, hi

    def unbacked_ranges(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        pos = start
        for s, e in self.backed_ranges(start, end):
            if s > pos:
                yield pos, s
            pos = e
        if pos < end:
            yield pos, end


@dataclass(frozen=True)
class DriverViolation:
    """Something the driver did that a correct driver must not (reported, not raised)."""

    kind: str
    start_pfn: int
    end_pfn: int
    message: str


@dataclass
class HvBalloonCounters:
    num_pages_added: int = 0
    num_pages_onlined: int = 0
    num_pages_ballooned: int = 0


class HvBalloon:
    """The guest side of Hyper-V Dynamic Memory."""

    def __init__(
        self,
        mm: MemoryManager,
        scheduler: Scheduler,
        *,
        mode: str = "upstream",
        strategy: str = "callback",
        pressure_report_delay: int = PRESSURE_REPORT_DELAY,
        status_interval: float = STATUS_INTERVAL,
        hot_add: bool = True,
        on_event: Callable[[str, dict[str, object]], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"driver_mode must be one of {', '.join(MODES)}, not {mode!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        if not status_interval > 0:
            raise ValueError(
                f"status_interval must be a positive number of seconds, not {status_interval!r}"
            )
        self.mm = mm
        self.scheduler = scheduler
        self.mode = mode
        self.strategy = strategy
        self.ha_pages_in_chunk = mm.geometry.block_pages
        self.ha_regions: list[HvHotaddState] = []
        # An index over the regions by start; valid while no two regions overlap.
        self._region_starts: list[int] = []
        self._region_index: dict[int, HvHotaddState] = {}
        self._regions_overlap = False
        self.counters = HvBalloonCounters()
        self.state = DM_INITIALIZING
        self.do_hot_add = hot_add
        self.host_specified_ha_region = False
        self.max_dynamic_page_count = 0
        self.outbox: list[DmMessage] = []
        self.violations: list[DriverViolation] = []
        self.version = 0
        self.pressure_report_delay = pressure_report_delay
        self.status_interval = status_interval
        self.last_post_time: float | None = None
        self._trans_id = 0
        self._version_index = 0
        #: Bumped by :meth:`renegotiate`: work started on an older channel sends nothing.
        self._generation = 0
        self._host_event = scheduler.completion()
        self.ol_waitevent = scheduler.completion()
        #: Ranges between MEM_GOING_ONLINE and MEM_ONLINE, with the pages counted as onlined
        #: at MEM_GOING_ONLINE (strategies where the core, not our callback, onlines them).
        self._onlining: dict[tuple[int, int], int] = {}
        self._on_event = on_event
        # The work items and their one global parameter slot each (dm_device.ha_wrk,
        # dm_device.balloon_wrk): a request that arrives before the work runs overwrites
        # the previous one (E4); one that arrives while it runs makes it run again.
        self._hot_add_request: HotAddRequest | None = None
        self._balloon_num_pages = 0
        self._hot_add_wrk = Work(scheduler, "hv_balloon:hot_add", self._hot_add_work)
        self._balloon_wrk = Work(scheduler, "hv_balloon:balloon_up", self._balloon_up_work)
        mm.notifier.register(self._memory_notifier, 0, name=DRIVER)
        if strategy == "callback":
            mm.set_online_page_callback(self.hv_online_page, owner=DRIVER)

    # -- plumbing --------------------------------------------------------------

    def _next_trans_id(self) -> int:
        self._trans_id += 1
        return self._trans_id

    def _send(self, msg: DmMessage) -> None:
        self.outbox.append(msg)

    def drain_outbox(self) -> list[DmMessage]:
        out, self.outbox = self.outbox, []
        return out

    def _event(self, event_kind: str, **data: object) -> None:
        if self._on_event is not None:
            self._on_event(event_kind, data)

    def _violation(self, kind: str, start: int, end: int, message: str) -> None:
        self.violations.append(DriverViolation(kind, start, end, message))
        self._event("driver_violation", kind=kind, start_pfn=start, end_pfn=end, message=message)

    # -- probe: version and capabilities ---------------------------------------

    def start(self) -> None:
        """``balloon_probe`` → ``balloon_connect_vsp``: begin version negotiation."""
        self.scheduler.spawn("hv_balloon:probe", self._probe())

    def renegotiate(self) -> None:
        """The channel was reset (host reset, or a new stream after a reconnect): probe again.

        Not something Linux does (its channel never resets under it); the emulator's
        guest keeps its memory, hot-add regions, balloon and counters, and only the
        channel state starts over: version negotiation from 2.0, then capabilities,
        then a fresh status thread. Messages not yet sent on the old channel are
        dropped, except access reports (they describe the memory, not the channel);
        work still running for a request of the old channel finishes its memory
        work but sends no response.
        """
        self._generation += 1
        self.outbox = [m for m in self.outbox if isinstance(m, AccessReport)]
        self.state = DM_INITIALIZING
        self._version_index = 0
        self.version = 0
        self._event("renegotiate", generation=self._generation)
        self.start()

    def _stale(self, generation: int) -> bool:
        """Work started for channel ``generation`` is for a channel that is gone."""
        return generation != self._generation

    def _probe(self) -> Task:
        generation = self._generation
        self._host_event.reinit()
        self._send_version_request()
        ok = yield Wait(self._host_event, PROBE_WAIT_SECONDS)
        if self._stale(generation):
            return
        if not ok or self.state == DM_INIT_ERROR:
            if self.state != DM_INIT_ERROR:
                self.state = DM_INIT_ERROR
                self._event("probe_failed", reason="version negotiation timed out (-ETIMEDOUT)")
            return
        self._host_event.reinit()
        alignment = max(self.mm.geometry.block_size_bytes >> 20, 1).bit_length() - 1
        self._send(
            CapabilitiesReport(
                self._next_trans_id(),
                balloon=True,
                hot_add=True,
                hot_add_alignment=alignment,
            )
        )
        ok = yield Wait(self._host_event, PROBE_WAIT_SECONDS)
        if self._stale(generation):
            return
        if not ok:
            self.state = DM_INIT_ERROR
            self._event("probe_failed", reason="capabilities response timed out (-ETIMEDOUT)")
            return
        if self.state == DM_INIT_ERROR:
            return
        self.scheduler.spawn("hv_balloon:status", self._status_thread())

    def _send_version_request(self) -> None:
        version = GUEST_VERSION_ORDER[self._version_index]
        last = self._version_index == len(GUEST_VERSION_ORDER) - 1
        self._send(VersionRequest(self._next_trans_id(), version, is_last_attempt=last))

    def _on_version_response(self, msg: VersionResponse) -> None:
        if msg.is_accepted:
            self.version = GUEST_VERSION_ORDER[self._version_index]
            self._event("version_accepted", version=self.version)
            self._host_event.complete()
            return
        self._version_index += 1
        if self._version_index >= len(GUEST_VERSION_ORDER):
            self.state = DM_INIT_ERROR
            self._event("probe_failed", reason="host rejected every protocol version (-EPROTO)")
            self._host_event.complete()
            return
        self._send_version_request()

    def _on_caps_response(self, msg: CapabilitiesResponse) -> None:
        if not msg.is_accepted:
            self.state = DM_INIT_ERROR
            self._event("probe_failed", reason="host rejected the capabilities")
        else:
            self.state = DM_INITIALIZED
            self._event("negotiated", version=self.version)
        self._host_event.complete()

    # -- the channel callback ----------------------------------------------------

    def receive(self, msg: DmMessage) -> None:
        """``balloon_onchannelcallback``: one host message."""
        if isinstance(msg, VersionResponse):
            self._on_version_response(msg)
        elif isinstance(msg, CapabilitiesResponse):
            self._on_caps_response(msg)
        elif isinstance(msg, BalloonRequest):
            if self.state == DM_BALLOON_UP:
                self._event("log", message="Currently ballooning")
            self.state = DM_BALLOON_UP
            self._balloon_num_pages = msg.num_pages
            self._balloon_wrk.schedule()
        elif isinstance(msg, UnballoonRequest):
            self.state = DM_BALLOON_DOWN
            self._balloon_down(msg)
        elif isinstance(msg, HotAddRequest):
            if self.state == DM_HOT_ADD:
                self._event("log", message="Currently hot-adding")
            self.state = DM_HOT_ADD
            self._hot_add_request = msg
            self._hot_add_wrk.schedule()
        elif isinstance(msg, InfoMessage):
            self.max_dynamic_page_count = msg.max_page_count
        else:
            self._event("log", message=f"Unhandled message: type {type(msg).__name__}")

    # -- status reports ----------------------------------------------------------

    def num_committed(self) -> int:
        """``num_committed`` of the status report (hyperv-dm.md §1.6)."""
        c = self.counters
        return (
            self.mm.count_pages(ALLOCATED)
            + c.num_pages_ballooned
            + max(0, c.num_pages_added - c.num_pages_onlined)
            + compute_balloon_floor(self.mm.totalram_pages)
        )

    def post_status(self) -> None:
        now = self.scheduler.now
        if self.pressure_report_delay > 0:
            self.pressure_report_delay -= 1
            return
        # Linux: at most one report a second; a shorter status interval shortens that too.
        min_gap = min(STATUS_INTERVAL, self.status_interval)
        if self.last_post_time is not None and now < self.last_post_time + min_gap:
            return
        self.last_post_time = now
        avail = self.mm.meminfo()["MemAvailable"] // 4
        self._send(
            StatusReport(self._next_trans_id(), num_avail=avail, num_committed=self.num_committed())
        )

    def _status_thread(self) -> Task:
        generation = self._generation
        while self.state != DM_INIT_ERROR and not self._stale(generation):
            self.post_status()
            yield Sleep(self.status_interval)

    # -- hot add -----------------------------------------------------------------

    def _hot_add_work(self) -> Task:
        """``hot_add_req``."""
        msg = self._hot_add_request
        assert msg is not None
        generation = self._generation
        chunk = self.ha_pages_in_chunk
        pg_start, pfn_cnt = msg.range.start_page, msg.range.page_cnt
        self.host_specified_ha_region = msg.region is not None
        rg_start = msg.region.start_page if msg.region else 0
        rg_sz = msg.region.page_cnt if msg.region else 0
        if rg_start == 0 and not self.host_specified_ha_region:
            rg_start = pg_start - pg_start % chunk
            if self.mode == "upstream":
                rg_sz = align_up(pfn_cnt, chunk)  # E1: too small when pg_start is unaligned
            else:
                rg_sz = align_up(pg_start + pfn_cnt, chunk) - rg_start
        page_count = 0
        if self.do_hot_add:
            page_count = yield from self._process_hot_add(pg_start, pfn_cnt, rg_start, rg_sz)
        self.counters.num_pages_added += page_count
        if self._stale(generation):
            self._event("hot_add_stale", page_count=page_count)
            return
        result = 1 if page_count > 0 or not self.do_hot_add else 0
        self.state = DM_INITIALIZED
        self._send(HotAddResponse(self._next_trans_id(), page_count=page_count, result=result))
        self._event("hot_add_done", page_count=page_count, result=result)

    def _process_hot_add(
        self, pg_start: int, pfn_cnt: int, rg_start: int, rg_sz: int
    ) -> Generator_int:
        if pfn_cnt == 0:
            return 0
        if not self.host_specified_ha_region:
            covered = self._pfn_covered(pg_start, pfn_cnt)
            if covered:
                return (yield from self._handle_pg_range(pg_start, pfn_cnt))
        if rg_sz != 0:
            self._add_region(
                HvHotaddState(
                    start_pfn=rg_start,
                    end_pfn=rg_start + rg_sz,
                    ha_end_pfn=rg_start,
                    covered_start_pfn=pg_start,
                    covered_end_pfn=pg_start,
                )
            )
        return (yield from self._handle_pg_range(pg_start, pfn_cnt))

    def _add_region(self, has: HvHotaddState) -> None:
        """``list_add_tail(&ha_region->list, &dm_device.ha_region_list)``, plus an index."""
        self.ha_regions.append(has)
        i = bisect_right(self._region_starts, has.start_pfn)
        prev_end = self._region_index[self._region_starts[i - 1]].end_pfn if i else 0
        next_start = self._region_starts[i] if i < len(self._region_starts) else None
        if has.start_pfn < prev_end or (next_start is not None and has.end_pfn > next_start):
            self._regions_overlap = True
        if has.start_pfn in self._region_index:
            self._regions_overlap = True
        else:
            self._region_starts.insert(i, has.start_pfn)
            self._region_index[has.start_pfn] = has

    def _find_region(self, pfn: int) -> HvHotaddState | None:
        """The first region in list order that holds ``pfn`` (Linux walks the list).

        While regions do not overlap at most one can hold it, so a binary search over
        their starts gives the same answer without the walk.
        """
        if self._regions_overlap:
            return next((h for h in self.ha_regions if h.start_pfn <= pfn < h.end_pfn), None)
        i = bisect_right(self._region_starts, pfn) - 1
        if i < 0:
            return None
        has = self._region_index[self._region_starts[i]]
        return has if pfn < has.end_pfn else None

    def _next_region_start(self, pfn: int, default: int) -> int:
        """The lowest region start above ``pfn`` (``default`` if none)."""
        if self._regions_overlap:
            return min((h.start_pfn for h in self.ha_regions if h.start_pfn > pfn), default=default)
        i = bisect_right(self._region_starts, pfn)
        return self._region_starts[i] if i < len(self._region_starts) else default

    def _pfn_covered(self, start_pfn: int, pfn_cnt: int) -> bool:
        has = self._find_region(start_pfn)
        if has is None:
            return False
        if has.covered_end_pfn != start_pfn:
            if self.mode == "fixed" and start_pfn < has.covered_end_pfn:
                # Backing inside the covered range: _handle_pg_range_fixed fills the gaps.
                return True
            # Upstream: an inverted gap when start_pfn < covered_end_pfn (E2).
            has.gaps.append((has.covered_end_pfn, start_pfn))
            has.covered_end_pfn = start_pfn
        if start_pfn + pfn_cnt > has.end_pfn:
            residual = start_pfn + pfn_cnt - has.end_pfn
            has.end_pfn += align_up(residual, self.ha_pages_in_chunk)
            i = bisect_right(self._region_starts, has.start_pfn)
            if i < len(self._region_starts) and has.end_pfn > self._region_starts[i]:
                self._regions_overlap = True
        return True

    def _handle_pg_range(self, start_pfn: int, pfn_cnt: int) -> Generator_int:
        """``handle_pg_range``; ``page_count`` is how far ``covered_end_pfn`` advanced."""
        has = self._find_region(start_pfn)
        if has is None:
            return 0
        if self.mode == "fixed":
            return (yield from self._handle_pg_range_fixed(has, start_pfn, pfn_cnt))
        old_covered = has.covered_end_pfn
        if start_pfn < has.ha_end_pfn:
            pgs_ol = min(has.ha_end_pfn - start_pfn, pfn_cnt)
            has.covered_end_pfn += pgs_ol
            pfn_cnt -= pgs_ol
            # The section of start_pfn only: it may still be offline while its block is
            # half way through onlining (E3); then nobody onlines these pages.
            if start_pfn > has.start_pfn and self.mm.online_section_nr(
                start_pfn // PAGES_PER_SECTION
            ):
                before = self.counters.num_pages_onlined
                self.hv_bring_pgs_online(has, start_pfn, pgs_ol)
                self._pages_onlined(start_pfn, start_pfn + pgs_ol, before)
        if has.ha_end_pfn < has.end_pfn and pfn_cnt > 0:
            size = has.end_pfn - has.ha_end_pfn
            if pfn_cnt <= size:
                # From ha_end_pfn, sized by the count alone: too short when the request
                # starts beyond ha_end_pfn (the root of E1).
                size = align_up(pfn_cnt, self.ha_pages_in_chunk)
            else:
                pfn_cnt = size
            yield from self._hv_mem_hot_add(has.ha_end_pfn, size, pfn_cnt, has)
        return has.covered_end_pfn - old_covered

    def _handle_pg_range_fixed(self, has: HvHotaddState, start: int, count: int) -> Generator_int:
        """Fixed mode: gaps first, then added memory, then whole chunks to the end (E1, E2)."""
        end = min(start + count, has.end_pfn)
        newly = 0
        if start < has.covered_end_pfn:
            # Backing inside the covered range can only fill gaps (E2).
            newly += self._fill_gaps(has, start, min(end, has.covered_end_pfn))
            start = has.covered_end_pfn
        if start >= end:
            return newly
        if start > has.covered_end_pfn:
            has.gaps.append((has.covered_end_pfn, start))
            has.covered_end_pfn = start
        if start < has.ha_end_pfn:
            stop = min(end, has.ha_end_pfn)
            has.covered_end_pfn = stop
            self._bring_online_where_online(has, start, stop)
            newly += stop - start
            start = stop
        if start < end:
            before = has.covered_end_pfn
            size = align_up(end - has.ha_end_pfn, self.ha_pages_in_chunk)
            size = min(size, has.end_pfn - has.ha_end_pfn)
            yield from self._hv_mem_hot_add(has.ha_end_pfn, size, end - start, has)
            newly += has.covered_end_pfn - before
        return newly

    def _fill_gaps(self, has: HvHotaddState, start: int, end: int) -> int:
        """Fixed mode: ``[start, end)`` is backed now; cut it out of the gaps, online it."""
        newly = 0
        new_gaps: list[tuple[int, int]] = []
        for gs, ge in has.gaps:
            lo, hi = max(gs, start), min(ge, end)
            if lo >= hi:
                new_gaps.append((gs, ge))
                continue
            newly += hi - lo
            if gs < lo:
                new_gaps.append((gs, lo))
            if hi < ge:
                new_gaps.append((hi, ge))
        has.gaps = new_gaps
        self._bring_online_where_online(has, start, end)
        return newly

    def _bring_online_where_online(self, has: HvHotaddState, start: int, end: int) -> None:
        """Fixed mode: online what is newly backed in blocks that are online now.

        Blocks in the middle of onlining are left to the MEM_ONLINE re-check; offline
        blocks to the online callback.
        """
        before = self.counters.num_pages_onlined
        for bs, be in self.mm._split_by_block(start, end):
            block = self.mm.block_of(bs)
            if block is not None and block.state == "online":
                self.hv_bring_pgs_online(has, bs, be - bs)
        self._pages_onlined(start, end, before)

    def _pages_onlined(self, start: int, end: int, before: int) -> None:
        """Announce what later backing brought online in ``[start, end)`` (not block onlining)."""
        pages = self.counters.num_pages_onlined - before
        if pages > 0:
            self._event("pages_onlined", start_pfn=start, end_pfn=end, pages=pages)

    def _hv_mem_hot_add(
        self, start: int, size: int, pfn_count: int, has: HvHotaddState
    ) -> Generator_none:
        chunk = self.ha_pages_in_chunk
        target_end = has.covered_end_pfn + pfn_count
        for i in range(size // chunk):
            start_pfn = start + i * chunk
            covered_before = has.covered_end_pfn
            has.ha_end_pfn += chunk
            if self.mode == "upstream":
                processed = min(pfn_count, chunk)
                pfn_count -= processed
                has.covered_end_pfn += processed
            else:
                has.covered_end_pfn = max(has.covered_end_pfn, min(target_end, has.ha_end_pfn))
            self.ol_waitevent.reinit()
            while True:
                try:
                    # add_memory(nid, addr, size, MHP_MERGE_RESOURCE): never memmap_on_memory.
                    self.mm.add_memory(start_pfn, chunk, owner=DRIVER, memmap_on_memory=False)
                    break
                except HotplugLockBusy:
                    # mem_hotplug_lock is held by an onlining in progress: sleep on it.
                    yield Sleep(0.001)
                except MemoryHotplugError as err:
                    self._event("log", message=f"hot_add memory failed error is -{err.name}")
                    if err.errno == EEXIST:
                        self.do_hot_add = False
                    has.ha_end_pfn -= chunk
                    has.covered_end_pfn = covered_before
                    return
            self._event("block_added", block=start_pfn // chunk, start_pfn=start_pfn)
            yield Wait(self.ol_waitevent, ONLINE_WAIT_SECONDS)
            self.post_status()

    # -- onlining --------------------------------------------------------------------

    def hv_online_page(self, start_pfn: int, nr_pages: int) -> None:
        """``hv_online_page``, the ``online_page_callback``, over a run of aligned chunks."""
        end = start_pfn + nr_pages
        pos = start_pfn
        while pos < end:
            has = self._find_region(pos)
            if has is None:
                # Not ours: up to the next region start (chunks never straddle one).
                stop = min(end, self._next_region_start(pos, end))
                self.mm.generic_online_pages(pos, stop)
            else:
                stop = min(end, has.end_pfn)
                self.hv_bring_pgs_online(has, pos, stop - pos)
            pos = stop

    def hv_bring_pgs_online(self, has: HvHotaddState, start_pfn: int, size: int) -> None:
        """``hv_bring_pgs_online`` → ``hv_page_online_one`` for each page."""
        end = start_pfn + size
        for s, e in has.unbacked_ranges(start_pfn, end):
            # Not backed: keep it PageOffline (owned by us from now on).
            for rs, re_, state in self.mm.pages.runs(s, e):
                if state.kind == PAGE_OFFLINE and state.owner == OWNER_CORE:
                    self.mm.set_page_offline(rs, re_, DRIVER)
        for s, e in has.backed_ranges(start_pfn, end):
            for rs, re_, state in self.mm.pages.runs(s, e):
                # Backed but not PageOffline: already online (the double-online guard).
                if state.kind == PAGE_OFFLINE and state.owner in (OWNER_CORE, DRIVER):
                    self.mm.generic_online_pages(rs, re_)
                    self.counters.num_pages_onlined += re_ - rs

    def _memory_notifier(self, action: MemoryAction, arg: MemoryNotify) -> int:
        start, end = arg.start_pfn, arg.start_pfn + arg.nr_pages
        if action == MEM_GOING_ONLINE:
            counted = 0
            if self.strategy == "going-online":
                self._claim_unbacked(start, end)
            if self.strategy != "callback":
                # The core hands every unclaimed backed page to the buddy right after this
                # notifier, as our callback would: count them now, like the callback does.
                counted = self._count_backed(start, end, _left_by_memmap_init)
                self.counters.num_pages_onlined += counted
            self._onlining[(start, end)] = counted
        elif action in (MEM_ONLINE, MEM_CANCEL_ONLINE):
            counted = self._onlining.pop((start, end), 0)
            if action == MEM_CANCEL_ONLINE:
                self.counters.num_pages_onlined -= counted
            else:
                if self.strategy == "online-then-reclaim":
                    self._reclaim_unbacked(start, end)
                if self.strategy != "callback":
                    # Pages backed while the block was onlining and already in the buddy.
                    self.counters.num_pages_onlined += (
                        self._count_backed(start, end, _not_page_offline) - counted
                    )
                if self.mode == "fixed":
                    self._online_backed_leftovers(start, end)
            self.ol_waitevent.complete()
        elif action == MEM_OFFLINE:
            backed = sum(
                e - s
                for has in self.ha_regions
                for s, e in has.backed_ranges(max(start, has.start_pfn), min(end, has.end_pfn))
            )
            self.counters.num_pages_onlined -= backed
            if self.counters.num_pages_onlined < 0:
                self._event("log", message="WARN_ON_ONCE: num_pages_onlined below zero")
                self.counters.num_pages_onlined = 0
        return NOTIFY_OK

    def _regions_in(self, start: int, end: int) -> Iterator[tuple[HvHotaddState, int, int]]:
        """Regions overlapping ``[start, end)``, each with the overlap, in list order."""
        if self._regions_overlap:
            candidates: Iterable[HvHotaddState] = self.ha_regions
        else:
            i = max(bisect_right(self._region_starts, start) - 1, 0)
            j = bisect_right(self._region_starts, end - 1)
            candidates = [self._region_index[st] for st in self._region_starts[i:j]]
        for has in candidates:
            lo, hi = max(start, has.start_pfn), min(end, has.end_pfn)
            if lo < hi:
                yield has, lo, hi

    def _claim_unbacked(self, start: int, end: int) -> None:
        """going-online: PG_offline on unbacked pages at MEM_GOING_ONLINE; the core skips them."""
        for has, lo, hi in self._regions_in(start, end):
            for s, e in has.unbacked_ranges(lo, hi):
                self.mm.set_page_offline(s, e, DRIVER)

    def _count_backed(self, start: int, end: int, want: Callable[[PageState], bool]) -> int:
        """Backed pages of our regions in ``[start, end)`` whose state ``want`` accepts."""
        return sum(
            re_ - rs
            for has, lo, hi in self._regions_in(start, end)
            for s, e in has.backed_ranges(lo, hi)
            for rs, re_, st in self.mm.pages.runs(s, e)
            if want(st)
        )

    def _reclaim_unbacked(self, start: int, end: int) -> None:
        """online-then-reclaim: pull unbacked pages back out of the buddy at MEM_ONLINE.

        Pages allocated in the meantime cannot be pulled back: that is the race.
        """
        for has, lo, hi in self._regions_in(start, end):
            for s, e in has.unbacked_ranges(lo, hi):
                for rs, re_, state in self.mm.pages.runs(s, e):
                    if state.kind == BUDDY:
                        self.mm.take_free_pages(rs, re_)
                        self.mm.set_page_offline(rs, re_, DRIVER)

    def _online_backed_leftovers(self, start: int, end: int) -> None:
        """Fixed mode (E3): pages backed while the block was onlining go online now."""
        before = self.counters.num_pages_onlined
        for has, lo, hi in self._regions_in(start, end):
            self.hv_bring_pgs_online(has, lo, hi - lo)
        self._pages_onlined(start, end, before)

    # -- balloon -----------------------------------------------------------------------

    def _balloon_up_work(self) -> Task:
        """``balloon_up``: answer one request with one or more responses."""
        num_pages = self._balloon_num_pages
        generation = self._generation
        avail = self.mm.meminfo()["MemAvailable"] // 4
        floor = compute_balloon_floor(self.mm.totalram_pages)
        if avail < num_pages or avail - num_pages < floor:
            self._event(
                "log",
                message="Balloon request will be partially fulfilled."
                + (" Balloon floor reached." if avail <= floor else ""),
            )
            num_pages = avail - floor if avail > floor else 0
        alloc_unit = PAGES_IN_2M
        num_ballooned = 0
        done = False
        total = 0
        while not done:
            num_pages -= num_ballooned
            ranges, num_ballooned = self._alloc_balloon_pages(num_pages, alloc_unit)
            if alloc_unit != 1 and num_ballooned == 0:
                alloc_unit = 1
                continue
            more = True
            if num_ballooned == 0 or num_ballooned == num_pages:
                more = False
                done = True
                self.state = DM_INITIALIZED
            total += num_ballooned
            self._send(
                BalloonResponse(self._next_trans_id(), more_pages=more, ranges=tuple(ranges))
            )
            if more:
                yield Sleep(0)
                if self._stale(generation):
                    # The channel was reset: the rest of this request is not wanted.
                    self._event("balloon_stale", pages=total)
                    return
        self._event("balloon_done", pages=total)

    def _alloc_balloon_pages(self, num_pages: int, alloc_unit: int) -> tuple[list[PageRange], int]:
        order = alloc_unit.bit_length() - 1
        want = min(num_pages // alloc_unit, MAX_RANGES_PER_MESSAGE)
        if want <= 0:
            return [], 0
        taken = self.mm.alloc_pages(order, want, zone=ZONE_NORMAL, tag=OWNER_BALLOON, touch=False)
        ranges: list[PageRange] = []
        for s, e in taken:
            # split_page: every allocation unit is its own range, never merged.
            self.mm.allocations[OWNER_BALLOON].remove(s, e)
            self.mm.set_page_offline(s, e, OWNER_BALLOON)
            self.mm.adjust_managed_range(s, e, -1)
            ranges.extend(PageRange(p, alloc_unit) for p in range(s, e, alloc_unit))
        n = len(ranges) * alloc_unit
        self.counters.num_pages_ballooned += n
        return ranges, n

    def _balloon_down(self, msg: UnballoonRequest) -> None:
        """``balloon_down`` → ``free_balloon_pages`` (no validation upstream: E6)."""
        freed = 0
        for rng in msg.ranges:
            start, end = rng.start_page, rng.end_page
            for s, e, state in self.mm.pages.runs(start, end):
                if state.kind != PAGE_OFFLINE or state.owner != OWNER_BALLOON:
                    self._violation(
                        "unballoon-not-ballooned",
                        s,
                        e,
                        f"host unballooned {state.kind} pages that were not ballooned (E6)",
                    )
                    continue
                self.mm.free_offline_pages(s, e)
                self.mm.adjust_managed_range(s, e, +1)
                self.counters.num_pages_ballooned -= e - s
                freed += e - s
        self._event("unballooned", pages=freed, more_pages=msg.more_pages)
        if not msg.more_pages:
            self.state = DM_INITIALIZED
            self._send(UnballoonResponse(self._next_trans_id()))

    # -- accesses ------------------------------------------------------------------

    def report_access(self, ranges: list[tuple[int, int]], what: str = "allocate") -> None:
        """Tell the host which pages were touched (the emulator's side channel)."""
        out: list[PageRange] = []
        for s, e in ranges:
            out.extend(split_ranges(s, e - s))
        for i in range(0, len(out), MAX_RANGES_PER_MESSAGE):
            self._send(
                AccessReport(
                    self._next_trans_id(), tuple(out[i : i + MAX_RANGES_PER_MESSAGE]), what
                )
            )

    # -- views -----------------------------------------------------------------------

    def pfn_is_backed(self, pfn: int) -> bool:
        has = self._find_region(pfn)
        return has is not None and has.pfn_is_backed(pfn)

    def backed_ranges(self) -> Iterator[tuple[int, int]]:
        for has in self.ha_regions:
            yield from has.backed_ranges(has.start_pfn, has.end_pfn)
