"""guest.drivers.hv_balloon driven through a GuestVm with hand-built host messages.

Every expected number below is worked out from hyperv-dm.md (§1.2, §1.5-1.9, §2,
§5) and the guest's geometry (x86-64: 4 KiB pages, 128 MiB sections), never read
back from the model. The "host" keeps its own ground truth of what it backed in an
extents.RangeSet, which guest.invariants.check_guest compares against.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from extents import RangeSet
from guest.drivers.hv_balloon import (
    DM_INIT_ERROR,
    DM_INITIALIZED,
    DRIVER,
    HvBalloon,
)
from guest.invariants import check_guest
from guest.kernel import Scheduler
from guest.mm.errors import EINVAL, MemoryHotplugError
from guest.mm.geometry import Geometry
from guest.mm.memory import MemoryManager
from guest.mm.pages import (
    ABSENT,
    ALLOCATED,
    BUDDY,
    OWNER_BALLOON,
    PAGE_OFFLINE,
    UNINIT,
)
from guest.vm import GuestConfig, GuestVm
from memhp.dm import (
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
)

M = TypeVar("M", bound=DmMessage)

#: 4 KiB pages.
MIB = 256
GIB = 1024 * MIB
BLOCK = 128 * MIB  # default memory block / hot-add chunk: 32768 pages
BOOT = 4 * GIB  # 4 GiB guest: pfn 0x100000 is the first hot-add pfn
R = BOOT
#: Boot memory: 256 low reserved pages, the memmap (1/64) at the top.
BOOT_LOW_RESERVED = 256
NO_REPORTS = 10**9


def spec_floor(n: int) -> int:
    """compute_balloon_floor written out from hyperv-dm.md §1.7."""
    if n < 128 * MIB:
        return 8 * MIB + n // 2
    if n < 512 * MIB:
        return 40 * MIB + n // 4
    if n < 2 * GIB:
        return 104 * MIB + n // 8
    if n < 8 * GIB:
        return 232 * MIB + n // 16
    return 488 * MIB + n // 32


def boot_totalram(boot_pages: int) -> int:
    return boot_pages - BOOT_LOW_RESERVED - boot_pages // 64


@dataclass
class Host:
    """A hand-driven host: sends messages, collects the guest's, keeps ground truth."""

    g: GuestVm
    backed: RangeSet = field(default_factory=RangeSet)
    offered: RangeSet = field(default_factory=RangeSet)
    received: list[tuple[float, DmMessage]] = field(default_factory=list)
    #: Received and not yet taken by wait_for.
    unread: list[DmMessage] = field(default_factory=list)
    tid: int = 1000

    def next_tid(self) -> int:
        self.tid += 1
        return self.tid

    def pump(self) -> list[DmMessage]:
        self.g.run_until(self.g.now)
        out = self.g.drain_outbox()
        self.received += [(self.g.now, m) for m in out]
        self.unread += out
        return out

    def run_until(self, t: float) -> list[DmMessage]:
        """Run to ``t`` timer by timer, so each message is stamped with its send time."""
        out = self.pump()
        while (deadline := self.g.next_deadline()) is not None and deadline <= t:
            self.g.run_until(deadline)
            out += self.pump()
        self.g.run_until(t)
        return out + self.pump()

    def wait_for(self, kind: type[M], limit: float = 200.0) -> M:
        """Run the guest timer by timer until it sends a ``kind`` message."""
        while True:
            self.pump()
            for i, m in enumerate(self.unread):
                if isinstance(m, kind):
                    del self.unread[: i + 1]
                    return m
            deadline = self.g.next_deadline()
            assert deadline is not None, f"guest idle without sending {kind.__name__}"
            assert deadline <= limit, f"no {kind.__name__} before t={limit}"
            self.g.run_until(deadline)

    def of(self, kind: type[M]) -> list[M]:
        return [m for _, m in self.received if isinstance(m, kind)]

    def hot_add(
        self, start: int, count: int, region: tuple[int, int] | None = None, *, back: bool = True
    ) -> HotAddResponse:
        if back and count:
            self.backed.add(start, start + count)
            self.offered.add(start, start + count)
        rg = PageRange(*region) if region is not None else None
        self.g.deliver(HotAddRequest(self.next_tid(), PageRange(start, count), rg))
        return self.wait_for(HotAddResponse)

    def balloon(self, pages: int) -> list[BalloonResponse]:
        self.g.deliver(BalloonRequest(self.next_tid(), pages))
        out: list[BalloonResponse] = []
        while True:
            resp = self.wait_for(BalloonResponse)
            out.append(resp)
            for r in resp.ranges:
                self.backed.remove(r.start_page, r.end_page)
            if not resp.more_pages:
                return out

    def unballoon(self, ranges: list[tuple[int, int]], more: bool = False) -> list[DmMessage]:
        for s, n in ranges:
            self.backed.add(s, s + n)
        self.g.deliver(
            UnballoonRequest(self.next_tid(), more, tuple(PageRange(s, n) for s, n in ranges))
        )
        return self.pump()

    def findings(self) -> set[str]:
        return {
            f.invariant for f in check_guest(self.g.mm, self.g.driver, self.backed, self.offered)
        }


def negotiate(g: GuestVm) -> None:
    g.start()
    g.run_until(0)
    (ver,) = g.drain_outbox()
    assert isinstance(ver, VersionRequest)
    g.deliver(VersionResponse(ver.trans_id, True))
    g.run_until(g.now)
    (caps,) = g.drain_outbox()
    assert isinstance(caps, CapabilitiesReport)
    g.deliver(CapabilitiesResponse(caps.trans_id, True))
    g.run_until(g.now)
    assert g.driver.state == DM_INITIALIZED


def rig(boot_pages: int = BOOT, **kw: object) -> Host:
    kw.setdefault("pressure_report_delay", NO_REPORTS)
    g = GuestVm(GuestConfig("g", boot_pages=boot_pages, **kw))  # type: ignore[arg-type]
    negotiate(g)
    h = Host(g)
    h.backed.add(0, boot_pages)
    h.pump()
    return h


def count_kind(g: GuestVm, start: int, end: int, kind: str, owner: str | None = None) -> int:
    return sum(
        e - s
        for s, e, st in g.mm.pages.runs(start, end)
        if st.kind == kind and (owner is None or st.owner == owner)
    )


def offline_ranges(g: GuestVm, start: int, end: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e, st in g.mm.pages.runs(start, end):
        if st.kind != PAGE_OFFLINE:
            continue
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


# -- negotiation ---------------------------------------------------------------------------


def test_version_order_then_all_rejected_is_init_error_without_caps() -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT, pressure_report_delay=0))
    g.start()
    g.run_until(0)
    proposed: list[tuple[int, bool]] = []
    tids: list[int] = []
    for _ in range(3):
        (req,) = g.drain_outbox()
        assert isinstance(req, VersionRequest)
        proposed.append((req.version, req.is_last_attempt))
        tids.append(req.trans_id)
        g.deliver(VersionResponse(req.trans_id, False))
        g.run_until(g.now)
    # 2.0 = 0x20000, 1.0 = 0x10000, 0.3 = 0x3 (DYNMEM_MAKE_VERSION(major, minor)).
    assert proposed == [(0x20000, False), (0x10000, False), (0x3, True)]
    assert len(set(tids)) == 3
    assert g.driver.state == DM_INIT_ERROR
    g.run_until(20)
    assert g.drain_outbox() == []  # no capabilities, no status reports
    assert not g.busy
    assert "hv_balloon:status" not in g.scheduler.tasks


def test_second_version_accepted_then_caps() -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT, pressure_report_delay=NO_REPORTS))
    g.start()
    g.run_until(0)
    (v2,) = g.drain_outbox()
    g.deliver(VersionResponse(v2.trans_id, False))
    (v1,) = g.drain_outbox()
    assert isinstance(v1, VersionRequest) and v1.version == 0x10000
    g.deliver(VersionResponse(v1.trans_id, True))
    g.run_until(0)
    (caps,) = g.drain_outbox()
    assert isinstance(caps, CapabilitiesReport)
    assert g.driver.version == 0x10000
    assert caps.trans_id > v1.trans_id
    g.deliver(CapabilitiesResponse(caps.trans_id, True))
    g.run_until(0)
    assert g.driver.state == DM_INITIALIZED
    assert not g.busy


@pytest.mark.parametrize(
    ("block_bytes", "alignment"),
    [(128 << 20, 7), (256 << 20, 8), (1 << 30, 10), (2 << 30, 11)],
)
def test_caps_report(block_bytes: int, alignment: int) -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT, block_size_bytes=block_bytes))
    g.start()
    g.run_until(0)
    (ver,) = g.drain_outbox()
    g.deliver(VersionResponse(ver.trans_id, True))
    g.run_until(0)
    (caps,) = g.drain_outbox()
    assert isinstance(caps, CapabilitiesReport)
    assert caps.hot_add_alignment == alignment
    assert caps.balloon and caps.hot_add
    assert caps.min_page_cnt == 0
    assert caps.max_page_number == 0xFFFF_FFFF_FFFF_FFFF
    assert g.driver.ha_pages_in_chunk == block_bytes // 4096


def test_no_version_response_within_5s_is_init_error() -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT))
    g.start()
    g.run_until(0)
    assert len(g.drain_outbox()) == 1
    assert g.next_deadline() == 5.0
    g.run_until(4.999)
    assert g.driver.state != DM_INIT_ERROR
    assert g.busy
    g.run_until(5.0)
    assert g.driver.state == DM_INIT_ERROR
    assert g.drain_outbox() == []
    assert not g.busy


def test_whole_version_negotiation_shares_one_5s_wait() -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT))
    g.start()
    g.run_until(0)
    (v2,) = g.drain_outbox()
    g.run_until(4)
    g.deliver(VersionResponse(v2.trans_id, False))  # the retry does not restart the wait
    g.run_until(4.999)
    assert g.driver.state != DM_INIT_ERROR
    g.run_until(5)
    assert g.driver.state == DM_INIT_ERROR
    assert [type(m) for m in g.drain_outbox()] == [VersionRequest]


def test_caps_response_has_its_own_5s_wait() -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT))
    g.start()
    g.run_until(2)
    (ver,) = g.drain_outbox()
    g.deliver(VersionResponse(ver.trans_id, True))
    g.run_until(2)
    assert [type(m) for m in g.drain_outbox()] == [CapabilitiesReport]
    g.run_until(6.999)
    assert g.driver.state != DM_INIT_ERROR
    g.run_until(7)
    assert g.driver.state == DM_INIT_ERROR


def test_caps_rejected_is_init_error_without_status() -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT, pressure_report_delay=0))
    g.start()
    g.run_until(0)
    (ver,) = g.drain_outbox()
    g.deliver(VersionResponse(ver.trans_id, True))
    g.run_until(0)
    (caps,) = g.drain_outbox()
    g.deliver(CapabilitiesResponse(caps.trans_id, False))
    g.run_until(10)
    assert g.driver.state == DM_INIT_ERROR
    assert g.drain_outbox() == []


def test_info_message_sets_max_dynamic_page_count() -> None:
    h = rig()
    h.g.deliver(InfoMessage(1, 123456))
    assert h.g.driver.max_dynamic_page_count == 123456
    assert h.pump() == []


# -- status reports -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "floor"),
    [
        (0, 2048),
        (32767, 2048 + 16383),  # just below 128 MiB: 8 MiB + n/2
        (32768, 10240 + 8192),  # 128 MiB: 40 MiB + n/4
        (131071, 10240 + 32767),
        (131072, 26624 + 16384),  # 512 MiB: 104 MiB + n/8
        (524287, 26624 + 65535),
        (524288, 59392 + 32768),  # 2 GiB: 232 MiB + n/16
        (2097151, 59392 + 131071),
        (2097152, 124928 + 65536),  # 8 GiB: 488 MiB + n/32
        (16 * 2**20, 124928 + 524288),
    ],
)
def test_compute_balloon_floor_brackets(n: int, floor: int) -> None:
    assert compute_balloon_floor(n) == floor == spec_floor(n)


def test_status_reports_skip_the_delay_then_one_per_second() -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT, pressure_report_delay=3))
    negotiate(g)
    times: list[float] = []
    for t in [x / 4 for x in range(0, 41)]:  # 0 .. 10 s in quarter seconds
        g.run_until(t)
        times += [g.now for m in g.drain_outbox() if isinstance(m, StatusReport)]
    # The calls at 0, 1 and 2 s are skipped; then one per second.
    assert times == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def test_status_reports_never_closer_than_one_second_with_hot_add() -> None:
    h = rig(pressure_report_delay=0, udev_online_type="online", onlining_delay=0.3)
    h.run_until(0.5)
    h.hot_add(R, 3 * BLOCK, (R, 3 * BLOCK))  # post_status after every chunk (0.8, 1.1, 1.4)
    h.run_until(6)
    times = [t for t, m in h.received if isinstance(m, StatusReport)]
    assert times[0] == 0.0
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert len(times) >= 6


def test_num_committed_formula() -> None:
    h = rig(pressure_report_delay=0)
    g = h.g
    h.pump()
    # allocated pages, ballooned pages, added-but-not-onlined pages and the floor.
    assert g.allocate(1000, tag="work") == 1000
    h.balloon(2048)
    resp = h.hot_add(R, 2 * BLOCK, (R, 2 * BLOCK))  # blocks stay offline: 10 s
    assert resp.page_count == 2 * BLOCK
    assert g.driver.counters.num_pages_onlined == 0
    h.received.clear()
    t = g.now
    h.run_until(t + 1.0)
    (report,) = h.of(StatusReport)
    totalram = boot_totalram(BOOT) - 2048
    assert report.num_committed == 1000 + 2048 + 2 * BLOCK + spec_floor(totalram)
    assert report.num_avail == g.mm.meminfo()["MemAvailable"] // 4
    assert (report.page_file_size, report.zero_free) == (0, 0)
    assert (report.page_file_writes, report.io_diff) == (0, 0)
    # Onlining one block: its pages leave the "added - onlined" term and join totalram.
    g.online_block(R // BLOCK)
    h.received.clear()
    h.run_until(t + 2.0)
    (report,) = h.of(StatusReport)
    totalram += BLOCK
    assert report.num_committed == 1000 + 2048 + BLOCK + spec_floor(totalram)


# -- hot add ------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.25, 0.5, 2.0, 4.5])
def test_hot_add_partial_backing_with_region(delay: float) -> None:
    h = rig(udev_online_type="online", onlining_delay=delay)
    g = h.g
    mem_total = g.mm.meminfo()["MemTotal"]
    t0 = g.now
    backed = 300 * MIB  # 76800 pages: 2 full blocks and 11264 pages of a third
    resp = h.hot_add(R, backed, (R, GIB))
    # udev onlines each block `delay` after it is added; hv_balloon waits for each.
    assert g.now - t0 == pytest.approx(3 * delay)
    assert (resp.page_count, resp.result) == (backed, 1)
    (has,) = g.driver.ha_regions
    assert (has.start_pfn, has.end_pfn) == (R, R + GIB)
    assert has.ha_end_pfn == R + 3 * BLOCK
    assert (has.covered_start_pfn, has.covered_end_pfn) == (R, R + backed)
    assert has.gaps == []
    blocks = {b.id: b for b in g.mm.blocks.values() if not b.boot}
    assert sorted(blocks) == [32, 33, 34]
    assert all(b.state == "online" and b.nr_pages == BLOCK for b in blocks.values())
    assert offline_ranges(g, R, R + 3 * BLOCK) == [(R + backed, R + 3 * BLOCK)]
    assert count_kind(g, R + backed, R + 3 * BLOCK, PAGE_OFFLINE, DRIVER) == 3 * BLOCK - backed
    assert count_kind(g, R, R + backed, BUDDY) == backed
    c = g.driver.counters
    assert (c.num_pages_added, c.num_pages_onlined) == (backed, backed)
    assert g.mm.meminfo()["MemTotal"] == mem_total + backed * 4
    assert count_kind(g, R + 3 * BLOCK, R + GIB, ABSENT) == GIB - 3 * BLOCK
    assert h.findings() == set()


@pytest.mark.parametrize("block_mib", [128, 256, 1024, 2048])
def test_hot_add_adds_whole_memory_blocks(block_mib: int) -> None:
    block = block_mib * MIB
    h = rig(block_size_bytes=block_mib << 20, udev_online_type="online", onlining_delay=0.5)
    g = h.g
    region = max(GIB, block)
    backed = 300 * MIB
    t0 = g.now
    resp = h.hot_add(R, backed, (R, region))
    n_blocks = -(-backed // block)
    assert (resp.page_count, resp.result) == (backed, 1)
    assert g.now - t0 == pytest.approx(0.5 * n_blocks)
    added = sorted(b.id for b in g.mm.blocks.values() if not b.boot)
    assert added == [R // block + i for i in range(n_blocks)]
    (has,) = g.driver.ha_regions
    assert has.ha_end_pfn == R + n_blocks * block
    assert has.covered_end_pfn == R + backed
    assert offline_ranges(g, R, R + n_blocks * block) == [(R + backed, R + n_blocks * block)]
    assert h.findings() == set()


def test_hot_add_offline_without_udev_waits_5s_per_block() -> None:
    h = rig()
    g = h.g
    h.backed.add(R, R + 300 * MIB)
    g.deliver(HotAddRequest(1, PageRange(R, 300 * MIB), PageRange(R, GIB)))
    g.run_until(0)
    assert g.busy
    g.run_until(14.999)
    assert h.pump() == []
    assert g.busy
    g.run_until(15.0)
    (resp,) = h.pump()
    assert isinstance(resp, HotAddResponse)
    assert (resp.page_count, resp.result) == (300 * MIB, 1)
    assert not g.busy
    for bid in (32, 33, 34):
        assert g.mm.blocks[bid].state == "offline"
        assert not g.mm.online_section_nr(bid)
    assert count_kind(g, R, R + 3 * BLOCK, UNINIT) == 3 * BLOCK
    c = g.driver.counters
    assert (c.num_pages_added, c.num_pages_onlined) == (300 * MIB, 0)


def test_later_backing_of_an_online_block_goes_online_at_once() -> None:
    h = rig(udev_online_type="online", onlining_delay=0.5)
    g = h.g
    h.hot_add(R, 300 * MIB, (R, GIB))
    # 100 MiB more in the 16-byte form, right after covered_end: 84 MiB fill block 34
    # (online: straight to the buddy), 16 MiB need block 35.
    start = R + 300 * MIB
    t0 = g.now
    resp = h.hot_add(start, 100 * MIB)
    assert (resp.page_count, resp.result) == (100 * MIB, 1)
    assert g.now - t0 == pytest.approx(0.5)  # one new block, onlined by udev
    (has,) = g.driver.ha_regions
    assert has.covered_end_pfn == R + 400 * MIB
    assert has.ha_end_pfn == R + 4 * BLOCK
    assert count_kind(g, start, R + 3 * BLOCK, BUDDY) == 3 * BLOCK - 300 * MIB
    assert offline_ranges(g, R, R + 4 * BLOCK) == [(R + 400 * MIB, R + 4 * BLOCK)]
    c = g.driver.counters
    assert (c.num_pages_added, c.num_pages_onlined) == (400 * MIB, 400 * MIB)
    assert g.mm.warnings == []
    assert h.findings() == set()


def test_later_backing_of_an_offline_block_is_left_to_the_callback() -> None:
    h = rig()
    g = h.g
    h.hot_add(R, 300 * MIB, (R, GIB))  # three offline blocks, 15 s
    t0 = g.now
    resp = h.hot_add(R + 300 * MIB, 20 * MIB)
    assert g.now == t0  # nothing to add: answered at once
    assert (resp.page_count, resp.result) == (20 * MIB, 1)
    assert count_kind(g, R, R + 3 * BLOCK, UNINIT) == 3 * BLOCK  # nothing onlined yet
    assert g.driver.counters.num_pages_onlined == 0
    # User space onlines the partly backed block: the callback onlines what is backed now.
    g.online_block(34)
    assert offline_ranges(g, R + 2 * BLOCK, R + 3 * BLOCK) == [(R + 320 * MIB, R + 3 * BLOCK)]
    assert count_kind(g, R + 2 * BLOCK, R + 320 * MIB, BUDDY) == 320 * MIB - 2 * BLOCK
    assert g.driver.counters.num_pages_onlined == 320 * MIB - 2 * BLOCK
    g.online_block(32)
    g.online_block(33)
    assert g.driver.counters.num_pages_onlined == 320 * MIB
    assert h.findings() == set()


def test_later_backing_beyond_covered_end_leaves_a_gap() -> None:
    h = rig(auto_online_blocks="online")
    g = h.g
    h.hot_add(R, 64 * MIB, (R, GIB))
    resp = h.hot_add(R + 96 * MIB, 16 * MIB)
    assert (resp.page_count, resp.result) == (16 * MIB, 1)
    (has,) = g.driver.ha_regions
    assert has.gaps == [(R + 64 * MIB, R + 96 * MIB)]
    assert has.covered_end_pfn == R + 112 * MIB
    assert offline_ranges(g, R, R + BLOCK) == [
        (R + 64 * MIB, R + 96 * MIB),
        (R + 112 * MIB, R + BLOCK),
    ]
    assert g.driver.counters.num_pages_onlined == 80 * MIB
    assert h.findings() == set()


def test_add_memory_eexist_disables_hot_add_for_good() -> None:
    h = rig(auto_online_blocks="online")
    g = h.g
    # The region overlaps boot memory: add_memory fails with -EEXIST.
    resp = h.hot_add(R - BLOCK, BLOCK, (R - BLOCK, BLOCK), back=False)
    assert (resp.page_count, resp.result) == (0, 1)
    assert not g.driver.do_hot_add
    blocks = len(g.mm.blocks)
    # A perfectly good request afterwards: refused the same way, nothing added.
    resp = h.hot_add(R, BLOCK, (R, BLOCK), back=False)
    assert (resp.page_count, resp.result) == (0, 1)
    assert len(g.mm.blocks) == blocks
    assert count_kind(g, R, R + BLOCK, ABSENT) == BLOCK
    assert g.driver.counters.num_pages_added == 0


def test_eexist_on_a_later_chunk_reports_the_chunks_added_then_refuses() -> None:
    h = rig(auto_online_blocks="online")
    g = h.g
    g.mm.add_memory(R + BLOCK, BLOCK, owner="dimm")  # something else sits in the 2nd chunk
    h.backed.add(R + BLOCK, R + 2 * BLOCK)
    h.backed.add(R, R + BLOCK)
    h.offered.add(R, R + BLOCK)
    h.g.deliver(HotAddRequest(1, PageRange(R, 2 * BLOCK), PageRange(R, 2 * BLOCK)))
    resp = h.wait_for(HotAddResponse)
    assert (resp.page_count, resp.result) == (BLOCK, 1)  # short: no more hot-adds
    assert not g.driver.do_hot_add
    (has,) = g.driver.ha_regions
    assert has.ha_end_pfn == has.covered_end_pfn == R + BLOCK
    resp = h.hot_add(R + 4 * BLOCK, BLOCK, (R + 4 * BLOCK, BLOCK), back=False)
    assert (resp.page_count, resp.result) == (0, 1)
    assert h.findings() == set()


def test_zero_page_request_is_a_transient_failure() -> None:
    h = rig(auto_online_blocks="online")
    g = h.g
    resp = h.hot_add(R, 0, (R, BLOCK))
    assert (resp.page_count, resp.result) == (0, 0)
    assert g.driver.do_hot_add
    resp = h.hot_add(R, 0)
    assert (resp.page_count, resp.result) == (0, 0)
    resp = h.hot_add(R, BLOCK, (R, BLOCK))
    assert (resp.page_count, resp.result) == (BLOCK, 1)


def test_misaligned_region_is_a_transient_failure() -> None:
    h = rig(auto_online_blocks="online")
    g = h.g
    # add_memory -EINVAL (not block aligned): nothing added, hot-add stays enabled.
    resp = h.hot_add(R + 100, BLOCK, (R + 100, BLOCK), back=False)
    assert (resp.page_count, resp.result) == (0, 0)
    assert g.driver.do_hot_add
    # (The failed region stays in ha_region_list, as in Linux: use memory it does not span.)
    resp = h.hot_add(R + 2 * BLOCK, BLOCK, (R + 2 * BLOCK, BLOCK))
    assert (resp.page_count, resp.result) == (BLOCK, 1)


def test_hot_add_request_during_hot_add_work_is_answered_later() -> None:
    h = rig()
    g = h.g
    g.deliver(HotAddRequest(1, PageRange(R, BLOCK), PageRange(R, BLOCK)))
    g.run_until(1)  # the work waits up to 5 s for the block to be onlined
    g.deliver(HotAddRequest(2, PageRange(R + BLOCK, BLOCK), PageRange(R + BLOCK, BLOCK)))
    h.run_until(30)
    assert len(h.of(HotAddResponse)) == 2


# -- balloon ------------------------------------------------------------------------------


def check_ranges_are_ballooned(g: GuestVm, ranges: list[PageRange]) -> None:
    seen = RangeSet()
    for r in ranges:
        assert seen.disjoint(r.start_page, r.end_page)
        seen.add(r.start_page, r.end_page)
        assert count_kind(g, r.start_page, r.end_page, PAGE_OFFLINE, OWNER_BALLOON) == r.page_cnt


def test_balloon_up_2m_ranges_then_4k_remainder() -> None:
    h = rig()
    g = h.g
    total0 = g.mm.meminfo()["MemTotal"]
    want = 600_000
    resps = h.balloon(want)
    n2m, rest = divmod(want, 512)  # 1171 ranges of 512, then 448 single pages
    assert [len(r.ranges) for r in resps] == [510, 510, n2m - 1020, rest]
    assert [r.more_pages for r in resps] == [True, True, True, False]
    ranges = [x for r in resps for x in r.ranges]
    assert all(x.page_cnt == 512 and x.start_page % 512 == 0 for x in ranges[:n2m])
    assert all(x.page_cnt == 1 for x in ranges[n2m:])
    assert all(16 + 8 * len(r.ranges) <= 4096 for r in resps)
    check_ranges_are_ballooned(g, ranges)
    assert g.driver.counters.num_pages_ballooned == want
    info = g.mm.meminfo()
    assert info["MemTotal"] == total0 - want * 4
    assert info["Balloon"] == want * 4
    assert g.driver.state == DM_INITIALIZED
    assert h.findings() == set()


def fragment(g: GuestVm) -> int:
    """Allocate all free memory, then free everything but the first page of each pageblock."""
    free = g.mm.free_pages
    taken = g.mm.alloc_pages(0, free, tag="frag", touch=False)
    assert sum(e - s for s, e in taken) == free
    held = 0
    for s, e in list(g.mm.allocations["frag"].ranges()):
        pb = s - s % 512
        while pb < e:
            lo, hi = max(pb + 1, s), min(pb + 512, e)
            if lo < hi:
                g.mm.free_range(lo, hi)
            held += int(s <= pb < e)
            pb += 512
    return held


def test_balloon_falls_back_to_4k_when_no_2m_page_is_left() -> None:
    h = rig(boot_pages=2 * BLOCK)
    g = h.g
    fragment(g)
    assert g.mm.zones["Normal"].free_area.buddyinfo()[9:] == [0, 0]
    resps = h.balloon(1200)
    assert [len(r.ranges) for r in resps] == [510, 510, 180]
    assert [r.more_pages for r in resps] == [True, True, False]
    ranges = [x for r in resps for x in r.ranges]
    assert all(x.page_cnt == 1 for x in ranges)
    check_ranges_are_ballooned(g, ranges)
    assert g.driver.counters.num_pages_ballooned == 1200


@pytest.mark.parametrize("extra", [0, 1, 100_000])
def test_balloon_floor_partially_fulfils(extra: int) -> None:
    h = rig()
    g = h.g
    avail = g.mm.meminfo()["MemAvailable"] // 4
    floor = spec_floor(g.mm.totalram_pages)
    want = avail - floor + extra
    resps = h.balloon(want)
    got = sum(x.page_cnt for r in resps for x in r.ranges)
    assert got == avail - floor
    assert not resps[-1].more_pages
    assert g.driver.counters.num_pages_ballooned == avail - floor
    # The floor follows totalram, which just shrank: the next request is measured anew.
    avail = g.mm.meminfo()["MemAvailable"] // 4
    floor = spec_floor(g.mm.totalram_pages)
    assert floor == spec_floor(boot_totalram(BOOT) - got)
    resps = h.balloon(avail)
    assert sum(x.page_cnt for r in resps for x in r.ranges) == max(avail - floor, 0)
    assert h.findings() == set()


def test_balloon_at_the_floor_gets_one_empty_response() -> None:
    # 128 MiB guest: totalram 32000 pages, floor 8 MiB + n/2 = 18048; ask for it all.
    h = rig(boot_pages=BLOCK)
    g = h.g
    assert g.mm.totalram_pages == boot_totalram(BLOCK) == 32000
    # Eat free memory until MemAvailable is below the floor.
    avail = g.mm.meminfo()["MemAvailable"] // 4
    g.allocate(avail - 18000, tag="hog")
    assert g.mm.meminfo()["MemAvailable"] // 4 <= spec_floor(32000)
    resps = h.balloon(1000)
    assert [(len(r.ranges), r.more_pages) for r in resps] == [(0, False)]
    assert g.driver.counters.num_pages_ballooned == 0


def test_balloon_zero_pages_is_one_empty_response() -> None:
    h = rig()
    resps = h.balloon(0)
    assert [(len(r.ranges), r.more_pages) for r in resps] == [(0, False)]


def test_unballoon_returns_pages_and_answers_once() -> None:
    h = rig()
    g = h.g
    info0 = g.mm.meminfo()
    free0 = g.mm.free_pages
    resps = h.balloon(4 * 512)
    ranges = [(x.start_page, x.page_cnt) for r in resps for x in r.ranges]
    assert len(ranges) == 4
    # Two requests with more_pages=1 (one of them half a range), then the last one.
    assert h.unballoon(ranges[:1], more=True) == []
    s, n = ranges[1]
    assert h.unballoon([(s, n // 2)], more=True) == []
    assert g.driver.counters.num_pages_ballooned == 4 * 512 - 512 - 256
    assert g.mm.meminfo()["MemTotal"] == info0["MemTotal"] - (4 * 512 - 768) * 4
    assert count_kind(g, ranges[0][0], ranges[0][0] + 512, BUDDY) == 512
    out = h.unballoon([(s + n // 2, n - n // 2), *ranges[2:]], more=False)
    assert [type(m) for m in out] == [UnballoonResponse]
    assert g.driver.counters.num_pages_ballooned == 0
    assert g.mm.meminfo() == info0
    assert g.mm.free_pages == free0
    assert g.driver.violations == []
    assert h.findings() == set()


def bare_driver(boot_pages: int = BOOT) -> tuple[HvBalloon, Scheduler]:
    """HvBalloon on its own (no GuestVm, no event hook), negotiated."""
    sched = Scheduler()
    drv = HvBalloon(MemoryManager(boot_pages, Geometry()), sched, pressure_report_delay=NO_REPORTS)
    drv.start()
    sched.run_until(0)
    (ver,) = drv.drain_outbox()
    drv.receive(VersionResponse(ver.trans_id, True))
    sched.run_until(0)
    (caps,) = drv.drain_outbox()
    drv.receive(CapabilitiesResponse(caps.trans_id, True))
    sched.run_until(0)
    assert drv.state == DM_INITIALIZED
    return drv, sched


def test_unballoon_of_pages_not_ballooned_is_a_violation_and_changes_nothing() -> None:
    drv, sched = bare_driver()
    mm = drv.mm
    drv.receive(BalloonRequest(1, 512))
    sched.run_until(0)
    ((resp,),) = [[m for m in drv.drain_outbox() if isinstance(m, BalloonResponse)]]
    (ballooned,) = resp.ranges
    before = list(mm.pages.runs(0, 2 * BOOT))
    info = mm.meminfo()
    # Boot pages in the buddy, then the reserved low pages.
    drv.receive(UnballoonRequest(2, False, (PageRange(0x40000, 16), PageRange(0, 8))))
    assert [type(m) for m in drv.drain_outbox()] == [UnballoonResponse]
    assert [(v.kind, v.start_pfn, v.end_pfn) for v in drv.violations] == [
        ("unballoon-not-ballooned", 0x40000, 0x40010),
        ("unballoon-not-ballooned", 0, 8),
    ]
    assert list(mm.pages.runs(0, 2 * BOOT)) == before
    assert mm.meminfo() == info
    assert drv.counters.num_pages_ballooned == 512
    found = check_guest(mm, drv, None)
    assert {f.invariant for f in found} == {"unballoon-not-ballooned"}
    # Straddling the balloon: the ballooned half is freed, the other half reported.
    drv.violations.clear()
    s = ballooned.start_page
    drv.receive(UnballoonRequest(3, False, (PageRange(s + 256, 512),)))
    assert [(v.start_pfn, v.end_pfn) for v in drv.violations] == [(s + 512, s + 768)]
    assert drv.counters.num_pages_ballooned == 256
    assert sum(e - st for st, e, p in mm.pages.runs(s, s + 512) if p.kind == PAGE_OFFLINE) == 256
    # Unballooning the same pages twice is the double free E6 warns about: reported too.
    drv.violations.clear()
    drv.receive(UnballoonRequest(4, False, (PageRange(s + 256, 256),)))
    assert [(v.start_pfn, v.end_pfn) for v in drv.violations] == [(s + 256, s + 512)]
    assert drv.counters.num_pages_ballooned == 256


def test_unballoon_of_pages_not_ballooned_through_guest_vm() -> None:
    h = rig()
    g = h.g
    before = list(g.mm.pages.runs(0, 2 * BOOT))
    out = h.unballoon([(0x40000, 16)], more=False)
    assert [type(m) for m in out] == [UnballoonResponse]
    assert [v.kind for v in g.driver.violations] == ["unballoon-not-ballooned"]
    assert list(g.mm.pages.runs(0, 2 * BOOT)) == before


def test_balloon_takes_from_online_hot_added_normal_memory_not_movable() -> None:
    h = rig(boot_pages=BLOCK, udev_online_type="online_movable")
    g = h.g
    h.hot_add(BLOCK, BLOCK, (BLOCK, BLOCK))
    assert g.mm.blocks[1].zone == "Movable"
    resps = h.balloon(10**6)
    ranges = [x for r in resps for x in r.ranges]
    assert all(x.end_page <= BLOCK for x in ranges)  # GFP_HIGHUSER: never ZONE_MOVABLE


# -- E1, E2, E3 ---------------------------------------------------------------------------

MODES = ["upstream", "fixed"]


@pytest.mark.parametrize("mode", MODES)
def test_e1_misaligned_region_less_hot_add(mode: str) -> None:
    h = rig(driver_mode=mode, auto_online_blocks="online")
    g = h.g
    start = R + 100  # 400 KiB into the block, 128 MiB of backing, 16-byte form
    resp = h.hot_add(start, BLOCK)
    assert (resp.page_count, resp.result) == (BLOCK, 1)
    (has,) = g.driver.ha_regions
    assert has.start_pfn == R and has.covered_end_pfn == start + BLOCK
    findings = h.findings()
    if mode == "upstream":
        # One chunk added, covered_end 100 pages past it; 100 "added" pages absent.
        assert has.ha_end_pfn == R + BLOCK
        assert findings == {"region-bookkeeping", "hot-add-page-count"}
        assert count_kind(g, R + BLOCK, start + BLOCK, ABSENT) == 100
    else:
        assert has.ha_end_pfn == R + 2 * BLOCK
        assert findings == set()
        assert g.driver.counters.num_pages_onlined == BLOCK
        assert offline_ranges(g, R, R + 2 * BLOCK) == [(R, start), (start + BLOCK, R + 2 * BLOCK)]


@pytest.mark.parametrize("mode", MODES)
def test_e1_region_less_backing_past_the_next_chunk(mode: str) -> None:
    # The same root as E1 inside an existing region: 100 pages starting 10 pages into the
    # chunk after the next one. Upstream adds one chunk from ha_end_pfn (sized by the
    # count alone), so covered_end_pfn ends beyond ha_end_pfn.
    h = rig(driver_mode=mode, auto_online_blocks="online")
    g = h.g
    h.hot_add(R, 64 * MIB, (R, GIB))
    start = R + 2 * BLOCK + 10
    resp = h.hot_add(start, 100)
    assert (resp.page_count, resp.result) == (100, 1)
    (has,) = g.driver.ha_regions
    assert has.gaps == [(R + 64 * MIB, start)]
    assert has.covered_end_pfn == start + 100
    if mode == "upstream":
        assert has.ha_end_pfn == R + 2 * BLOCK
        assert h.findings() == {"region-bookkeeping", "hot-add-page-count"}
    else:
        assert has.ha_end_pfn == R + 3 * BLOCK
        assert h.findings() == set()
        assert g.driver.counters.num_pages_onlined == 64 * MIB + 100


@pytest.mark.parametrize("mode", MODES)
def test_e2_backing_into_a_gap(mode: str) -> None:
    h = rig(driver_mode=mode, auto_online_blocks="online")
    g = h.g
    h.hot_add(R, 192 * MIB, (R, GIB))
    h.hot_add(R + 224 * MIB, 32 * MIB)  # gap [192M, 224M)
    (has,) = g.driver.ha_regions
    assert has.gaps == [(R + 192 * MIB, R + 224 * MIB)]
    assert g.driver.counters.num_pages_onlined == 224 * MIB
    assert h.findings() == set()
    resp = h.hot_add(R + 192 * MIB, 16 * MIB)  # into the gap
    assert (resp.page_count, resp.result) == (16 * MIB, 1)
    assert g.driver.counters.num_pages_added == 240 * MIB
    findings = h.findings()
    if mode == "upstream":
        assert {"region-bookkeeping", "backed-never-onlined", "counter-onlined"} <= findings
        assert (R + 2 * BLOCK, R + 192 * MIB) in has.gaps  # inverted
        assert has.covered_end_pfn == R + 208 * MIB  # moved back
        # The host backs [192M, 208M) but the pages stay PageOffline.
        assert count_kind(g, R + 192 * MIB, R + 208 * MIB, PAGE_OFFLINE) == 16 * MIB
    else:
        assert findings == set()
        assert has.gaps == [(R + 208 * MIB, R + 224 * MIB)]
        assert has.covered_end_pfn == R + 2 * BLOCK
        assert offline_ranges(g, R, R + 2 * BLOCK) == [(R + 208 * MIB, R + 224 * MIB)]
        assert g.driver.counters.num_pages_onlined == 240 * MIB


@pytest.mark.parametrize("mode", MODES)
def test_e3_online_race(mode: str) -> None:
    h = rig(driver_mode=mode, udev_online_type="online", onlining_delay=4.5)
    g = h.g
    g.inject_slow_onlining(3, count=1)
    resp = h.hot_add(R, 64 * MIB, (R, 512 * MIB))
    assert g.now == 5.0  # the 5 s wait ran out: udev's onlining is still paused
    assert resp.page_count == 64 * MIB
    block = g.mm.blocks[32]
    assert block.state == "offline" and not g.mm.online_section_nr(32)
    resp = h.hot_add(R + 64 * MIB, 32 * MIB)
    assert (resp.page_count, resp.result) == (32 * MIB, 1)
    assert g.now == 5.0
    h.run_until(8)
    assert block.state == "online"
    c = g.driver.counters
    assert c.num_pages_added == 96 * MIB
    findings = h.findings()
    if mode == "upstream":
        assert findings == {"backed-never-onlined"}
        assert c.num_pages_onlined == 64 * MIB
        assert offline_ranges(g, R, R + BLOCK) == [(R + 64 * MIB, R + BLOCK)]
    else:
        assert findings == set()
        assert c.num_pages_onlined == 96 * MIB
        assert offline_ranges(g, R, R + BLOCK) == [(R + 96 * MIB, R + BLOCK)]


# -- strategies ---------------------------------------------------------------------------

STRAT_BOOT = 2 * GIB
STRAT_REGION = (STRAT_BOOT, 384 * MIB)
STRAT_BACKED = 320 * MIB
UNBACKED = (STRAT_BOOT + STRAT_BACKED, STRAT_BOOT + 384 * MIB)


def strategy_rig(strategy: str) -> tuple[Host, list[tuple[int, int]]]:
    h = rig(
        boot_pages=STRAT_BOOT,
        strategy=strategy,
        udev_online_type="online_movable",
        onlining_delay=0.2,
    )
    armed = h.g.allocate_in_window(384 * MIB, zone="Movable", tag="racer", block=18)
    resp = h.hot_add(STRAT_BOOT, STRAT_BACKED, STRAT_REGION)
    assert (resp.page_count, resp.result) == (STRAT_BACKED, 1)
    assert armed.done
    return h, armed.result


@pytest.mark.parametrize("strategy", ["callback", "going-online"])
def test_safe_strategies_never_allocate_unbacked_pages(strategy: str) -> None:
    h, taken = strategy_rig(strategy)
    g = h.g
    got = RangeSet()
    for s, e in taken:
        got.add(s, e)
    # All of blocks 16, 17 and the backed part of 18: nothing of the unbacked tail.
    assert len(got) == STRAT_BACKED
    assert got.disjoint(*UNBACKED)
    assert count_kind(g, *UNBACKED, PAGE_OFFLINE, DRIVER) == UNBACKED[1] - UNBACKED[0]
    for rep in h.of(AccessReport):
        for r in rep.ranges:
            assert r.end_page <= UNBACKED[0] or r.start_page >= UNBACKED[1]
    assert h.findings() == set()
    # The host backs the rest: the pages go online now, counted once.
    h.hot_add(UNBACKED[0], 64 * MIB)
    assert g.driver.counters.num_pages_onlined == 384 * MIB
    assert count_kind(g, STRAT_BOOT, STRAT_BOOT + 384 * MIB, PAGE_OFFLINE) == 0
    assert h.findings() == set()


def test_online_then_reclaim_hands_out_unbacked_pages() -> None:
    h, taken = strategy_rig("online-then-reclaim")
    g = h.g
    assert sum(e - s for s, e in taken) == 384 * MIB
    assert count_kind(g, *UNBACKED, ALLOCATED) == UNBACKED[1] - UNBACKED[0]
    found = check_guest(g.mm, g.driver, h.backed, h.offered)
    bad = [f for f in found if f.invariant == "unbacked-allocated"]
    assert sum(f.end_pfn - f.start_pfn for f in bad) == UNBACKED[1] - UNBACKED[0]
    touched = RangeSet()
    for rep in h.of(AccessReport):
        for r in rep.ranges:
            touched.add(r.start_page, r.end_page)
    assert touched.covers(*UNBACKED)


def test_set_online_page_callback_conflict() -> None:
    mm = MemoryManager(BOOT, Geometry())
    HvBalloon(mm, Scheduler(), strategy="callback")
    assert mm.online_page_callback_installed
    with pytest.raises(MemoryHotplugError) as err:
        mm.set_online_page_callback(lambda start, n: None)
    assert err.value.errno == EINVAL
    # The hv_balloon callback stays: a second hv_balloon-style driver cannot load either.
    with pytest.raises(MemoryHotplugError):
        HvBalloon(mm, Scheduler(), strategy="callback")


@pytest.mark.parametrize("strategy", ["going-online", "online-then-reclaim"])
def test_strategies_without_callback_leave_it_free(strategy: str) -> None:
    mm = MemoryManager(BOOT, Geometry())
    HvBalloon(mm, Scheduler(), strategy=strategy)
    assert not mm.online_page_callback_installed
    mm.set_online_page_callback(lambda start, n: None)


def test_callback_onlines_memory_it_does_not_manage_generically() -> None:
    h = rig(auto_online_blocks="offline")
    g = h.g
    h.hot_add(R, 64 * MIB, (R, BLOCK))
    g.mm.add_memory(R + 4 * BLOCK, BLOCK, owner="dimm")
    g.online_block(36)
    assert count_kind(g, R + 4 * BLOCK, R + 5 * BLOCK, BUDDY) == BLOCK
    assert g.driver.counters.num_pages_onlined == 0


def test_offline_accounting_of_hot_added_blocks() -> None:
    h = rig(udev_online_type="online_movable")
    g = h.g
    h.hot_add(R, BLOCK + 64 * MIB, (R, 2 * BLOCK))
    assert g.driver.counters.num_pages_onlined == BLOCK + 64 * MIB
    # The partly backed block keeps unbacked PageOffline pages: it cannot go offline.
    with pytest.raises(MemoryHotplugError):
        g.offline_block(33)
    g.offline_block(32)
    assert g.driver.counters.num_pages_onlined == 64 * MIB
    assert h.findings() == set()
    g.online_block(32, "online_movable")
    assert g.driver.counters.num_pages_onlined == BLOCK + 64 * MIB
    assert g.mm.warnings == []
    assert h.findings() == set()


def test_memmap_on_memory_hot_add_is_healthy() -> None:
    h = rig(memmap_on_memory=True, auto_online_blocks="online")
    resp = h.hot_add(R, BLOCK + 1000, (R, 2 * BLOCK))
    assert (resp.page_count, resp.result) == (BLOCK + 1000, 1)
    assert h.findings() == set()
