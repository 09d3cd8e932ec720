"""DmHostSession driven by hand-built guest messages (hyperv-dm.md §1, §3, §5)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hypervisor.dm_host import DmHostSession
from hypervisor.errors import HostCommandError
from memhp.dm import (
    DYNMEM_PROTOCOL_VERSION_1,
    DYNMEM_PROTOCOL_VERSION_2,
    DYNMEM_PROTOCOL_VERSION_3,
    HV_BALLOON_HR_CHUNK_PAGES,
    MAX_RANGES_PER_MESSAGE,
    AccessReport,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesReport,
    CapabilitiesResponse,
    HotAddRequest,
    HotAddResponse,
    PageRange,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionRequest,
    VersionResponse,
    compute_balloon_floor,
)
from tests.hypervisor.helpers import (
    BLOCK,
    BOOT,
    MAX,
    error_kinds,
    negotiate,
    new_session,
    ready,
    snapshot,
    tid,
)


def balloon_reply(
    s: DmHostSession, *ranges: tuple[int, int], more: bool = False, now: float = 1.0
) -> list[object]:
    msg = BalloonResponse(tid(), more_pages=more, ranges=tuple(PageRange(a, n) for a, n in ranges))
    return list(s.receive(msg, now))


def hot_add_reply(s: DmHostSession, page_count: int, result: int = 1) -> list[object]:
    return list(s.receive(HotAddResponse(tid(), page_count=page_count, result=result), 1.0))


def balloon_out(s: DmHostSession, start: int, pages: int) -> None:
    """Get ``[start, start+pages)`` ballooned through one explicit balloon transaction."""
    (req,) = s.balloon(pages, 0.0)
    assert isinstance(req, BalloonRequest) and req.num_pages == pages
    balloon_reply(s, (start, pages))
    assert s.state == "IDLE"


# -- negotiation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        (0x2, False),
        (DYNMEM_PROTOCOL_VERSION_1, True),
        (DYNMEM_PROTOCOL_VERSION_2, True),
        (DYNMEM_PROTOCOL_VERSION_3, True),
        (0x20001, False),
        (0x30000, False),
    ],
)
def test_version_accepted_iff_in_qemu_range(version: int, accepted: bool) -> None:
    s = new_session()
    (resp,) = s.receive(VersionRequest(77, version), 0.0)
    assert resp == VersionResponse(trans_id=77, is_accepted=accepted)
    assert s.state == ("CAPS" if accepted else "VERSION")
    assert s.version == (version if accepted else None)
    assert s.protocol_errors == []


def test_linux_walks_down_versions_without_violation() -> None:
    s = new_session()
    assert s.receive(VersionRequest(1, 0x30000), 0.0) == [VersionResponse(1, False)]
    assert s.receive(VersionRequest(2, DYNMEM_PROTOCOL_VERSION_3), 0.0) == [
        VersionResponse(2, True)
    ]
    (caps_resp,) = s.receive(CapabilitiesReport(3, True, True, 7), 0.0)
    assert caps_resp == CapabilitiesResponse(trans_id=3, is_accepted=True)
    assert s.state == "IDLE"
    assert s.protocol_errors == []
    kinds = [e.kind for e in s.events]
    assert kinds[:4] == ["attach", "version", "version", "negotiated"]


def test_version_order_violations_are_recorded_and_answered() -> None:
    s = new_session()
    s.receive(VersionRequest(tid(), 0x30000), 0.0)
    # Not below the rejected proposal: wrong order, still answered.
    assert s.receive(VersionRequest(5, 0x40000), 0.0) == [VersionResponse(5, False)]
    assert error_kinds(s) == ["version-order"]
    s.receive(VersionRequest(tid(), 0x1, is_last_attempt=True), 0.0)
    (resp,) = s.receive(VersionRequest(6, DYNMEM_PROTOCOL_VERSION_3), 0.0)
    assert resp == VersionResponse(6, True)
    assert error_kinds(s) == ["version-order", "version-order"]
    assert s.state == "CAPS"


def test_caps_before_version_and_version_after_acceptance() -> None:
    s = new_session()
    assert s.receive(CapabilitiesReport(9, True, True, 7), 0.0) == []
    assert error_kinds(s) == ["caps-out-of-state"]
    assert s.state == "VERSION"
    assert s.protocol_errors[0].trans_id == 9
    negotiate(s)
    assert s.receive(VersionRequest(tid(), DYNMEM_PROTOCOL_VERSION_3), 0.0) == []
    assert s.receive(CapabilitiesReport(tid(), True, True, 7), 0.0) == []
    assert error_kinds(s) == ["caps-out-of-state", "version-out-of-state", "caps-out-of-state"]
    assert s.state == "IDLE"
    assert [e.kind for e in s.events].count("protocol_error") == 3


def test_caps_alignment_outside_four_bits_is_flagged_and_clamped() -> None:
    s = new_session()
    negotiate(s, alignment=20)
    assert error_kinds(s) == ["caps-bad-alignment"]
    assert s.hot_add_alignment_pages == 256 << 15


def test_post_init_wait_delays_the_first_request() -> None:
    s = new_session(post_init_delay=50.0)
    negotiate(s, now=10.0)
    assert s.state == "POST_INIT_WAIT"
    assert s.balloon(1000, 20.0) == []  # queued behind the timer
    assert s.queued == ("balloon 1000",)
    assert s.tick(59.9) == []
    (req,) = s.tick(60.0)
    assert req == BalloonRequest(trans_id=0, num_pages=1000)
    assert s.state == "BALLOON_REPLY_WAIT"
    assert "ready" in [e.kind for e in s.events]


def test_status_reports_only_after_caps() -> None:
    s = new_session()
    assert s.receive(StatusReport(tid(), num_avail=5, num_committed=6), 0.0) == []
    assert error_kinds(s) == ["status-before-caps"]
    assert [s.committed_pages, s.available_pages] == [None, None]
    negotiate(s, now=1.0)
    assert s.receive(StatusReport(tid(), num_avail=1000, num_committed=2000), 3.5) == []
    assert (s.committed_pages, s.available_pages, s.last_status_time) == (2000, 1000, 3.5)
    assert s.events[-1].kind == "status_report"
    assert s.events[-1].data["committed_pages"] == 2000


# -- one transaction at a time ---------------------------------------------------


def test_second_command_waits_for_the_first_response() -> None:
    s = ready()
    (req,) = s.balloon(1000, 0.0)
    assert req == BalloonRequest(trans_id=0, num_pages=1000)
    assert s.in_flight is not None and s.in_flight.kind == "balloon"
    assert s.hot_add(BLOCK, 10, 0.0) == []
    assert s.queued == (f"hot_add [{BOOT:#x}, {BOOT + 10:#x})",)
    # The guest answers in two messages; only the last one ends the transaction.
    assert balloon_reply(s, (1000, 600), more=True) == []
    assert s.state == "BALLOON_REPLY_WAIT"
    (hot_add_req,) = balloon_reply(s, (1600, 400))
    assert isinstance(hot_add_req, HotAddRequest)
    assert hot_add_req.trans_id == 1  # QEMU counts completed transactions
    assert s.state == "HOT_ADD_REPLY_WAIT"
    assert len(s.ballooned) == 1000


def test_unballoon_refused_beyond_what_is_ballooned() -> None:
    s = ready()
    with pytest.raises(HostCommandError) as err:
        s.unballoon(1, 0.0)
    assert err.value.code == "failed_precondition" and err.value.field == "pages"


def test_queued_unballoons_count_against_the_ballooned_pages() -> None:
    s = ready()
    balloon_out(s, 1000, 1000)
    s.hot_add(BLOCK, BLOCK, 0.0)  # in flight
    assert s.unballoon(600, 0.0) == []
    with pytest.raises(HostCommandError) as err:
        s.unballoon(401, 0.0)
    assert err.value.code == "failed_precondition"
    assert s.unballoon(400, 0.0) == []


# -- set_target -------------------------------------------------------------------


def test_set_target_unballoons_first_then_hot_adds_in_2g_chunks() -> None:
    s = ready()
    balloon_out(s, BOOT // 2, BOOT // 2)
    assert s.current_pages == BOOT // 2
    target = BOOT + 524_288 + BLOCK
    (unb,) = s.set_target(target, 1.0)
    assert unb == UnballoonRequest(
        trans_id=1, more_pages=False, ranges=(PageRange(BOOT // 2, BOOT // 2),)
    )
    # The host backs unballooned pages before it tells the guest.
    assert s.backed.covers(0, BOOT) and not s.ballooned
    (first,) = s.receive(UnballoonResponse(tid()), 2.0)
    assert first == HotAddRequest(
        trans_id=2, range=PageRange(BOOT, 524_288), region=PageRange(BOOT, 524_288)
    )
    (second,) = hot_add_reply(s, 524_288)
    assert second == HotAddRequest(
        trans_id=3,
        range=PageRange(BOOT + 524_288, BLOCK),
        region=PageRange(BOOT + 524_288, BLOCK),
    )
    assert hot_add_reply(s, BLOCK) == []
    assert s.state == "IDLE"
    assert s.current_pages == target == s.target_pages
    assert [(r.start, r.size, r.added_pages) for r in s.regions] == [
        (BOOT, 524_288, 524_288),
        (BOOT + 524_288, BLOCK, BLOCK),
    ]
    kinds = [e.kind for e in s.events]
    assert kinds.index("unballoon_request") < kinds.index("hot_add_request")


def test_set_target_hot_add_never_sends_sub_alignment_amounts() -> None:
    s = ready()
    assert s.set_target(BOOT + BLOCK - 1, 0.0) == []
    assert s.state == "IDLE" and s.regions == ()


@pytest.mark.parametrize(("alignment", "chunk"), [(11, 524_288), (12, 1_048_576)])
def test_set_target_hot_add_chunk_is_the_alignment_when_larger(alignment: int, chunk: int) -> None:
    s = ready(boot=BOOT, max_pages=4 * 1_048_576, alignment=alignment)
    (req,) = s.set_target(2 * 1_048_576 + chunk, 0.0)
    assert isinstance(req, HotAddRequest) and req.region is not None
    assert req.range.page_cnt == chunk and req.range == req.region
    assert req.range.start_page % chunk == 0 and req.range.start_page >= BOOT


def test_set_target_balloons_down_in_capped_requests() -> None:
    boot = 48 * BLOCK  # 6 GiB: down to the floor is between two and three requests
    floor = compute_balloon_floor(boot)
    s = ready(boot=boot, max_pages=boot)
    (req,) = s.set_target(floor, 0.0)
    assert req == BalloonRequest(trans_id=0, num_pages=HV_BALLOON_HR_CHUNK_PAGES)
    # more_pages: the guest answers in two messages
    assert balloon_reply(s, (0, 300_000), more=True) == []
    (req2,) = balloon_reply(s, (300_000, HV_BALLOON_HR_CHUNK_PAGES - 300_000))
    assert req2 == BalloonRequest(trans_id=1, num_pages=HV_BALLOON_HR_CHUNK_PAGES)
    (req3,) = balloon_reply(s, (HV_BALLOON_HR_CHUNK_PAGES, HV_BALLOON_HR_CHUNK_PAGES))
    rest = boot - floor - 2 * HV_BALLOON_HR_CHUNK_PAGES
    assert 0 < rest < HV_BALLOON_HR_CHUNK_PAGES
    assert req3 == BalloonRequest(trans_id=2, num_pages=rest)
    # Partly fulfilled: the host asks again for the remainder (QEMU loops on balloon_diff).
    (req4,) = balloon_reply(s, (2 * HV_BALLOON_HR_CHUNK_PAGES, 1000))
    assert req4 == BalloonRequest(trans_id=3, num_pages=rest - 1000)
    # No ranges: the guest is at its floor, which ends the whole job.
    assert balloon_reply(s, more=True) == []
    assert s.state == "IDLE" and s.in_flight is None
    assert s.current_pages == boot - 2 * HV_BALLOON_HR_CHUNK_PAGES - 1000
    assert not s.backed.count(0, 2 * HV_BALLOON_HR_CHUNK_PAGES + 1000)
    assert s.protocol_errors == []


def test_newer_target_replaces_the_running_one_at_the_next_boundary() -> None:
    boot = 40 * BLOCK
    s = ready(boot=boot, max_pages=boot)
    s.set_target(compute_balloon_floor(boot), 0.0)
    assert s.set_target(boot - 1000, 0.0) == []
    (req,) = balloon_reply(s, (0, 400))
    assert req == BalloonRequest(trans_id=1, num_pages=600)
    assert balloon_reply(s, (400, 600)) == []
    assert s.current_pages == boot - 1000 and s.state == "IDLE"


def test_set_target_without_hot_add_cap_only_unballoons() -> None:
    s = ready(hot_add=False)
    balloon_out(s, 0, 1000)
    (unb,) = s.set_target(BOOT + BLOCK, 0.0)
    assert isinstance(unb, UnballoonRequest)
    assert s.receive(UnballoonResponse(tid()), 0.0) == []
    assert s.state == "IDLE" and s.regions == ()


# -- explicit balloon / unballoon ------------------------------------------------------


def test_balloon_reply_over_the_request_is_clamped() -> None:
    s = ready()
    s.balloon(1000, 0.0)
    balloon_reply(s, (0, 800), (5000, 400))
    assert error_kinds(s) == ["balloon-too-many"]
    v = s.protocol_errors[0]
    assert (v.pfn_start, v.pfn_end) == (5200, 5400)
    assert len(s.ballooned) == 1000
    assert s.backed.count(5000, 5400) == 200


def test_balloon_reply_duplicates_are_counted_once() -> None:
    s = ready()
    s.balloon(1000, 0.0)
    balloon_reply(s, (0, 600), (100, 100), more=True)
    assert error_kinds(s) == ["balloon-duplicate"]
    balloon_reply(s, (500, 500))  # [500, 600) again
    assert error_kinds(s) == ["balloon-duplicate"] * 2
    assert len(s.ballooned) == 1000 and s.state == "IDLE"


def test_balloon_reply_outside_ram_and_in_unbacked_area() -> None:
    s = ready()
    s.hot_add(BLOCK, 100, 0.0)
    hot_add_reply(s, 100)
    s.balloon(1000, 0.0)
    balloon_reply(s, (MAX + 1000, 10), (BOOT + 500, 10), (BOOT + 50, 100))
    assert error_kinds(s) == ["balloon-outside-ram", "balloon-unbacked", "balloon-unbacked"]
    assert [(v.pfn_start, v.pfn_end) for v in s.protocol_errors] == [
        (MAX + 1000, MAX + 1010),
        (BOOT + 500, BOOT + 510),
        (BOOT + 100, BOOT + 150),
    ]
    assert list(s.ballooned.ranges()) == [(BOOT + 50, BOOT + 100)]


def test_balloon_reply_with_too_many_ranges() -> None:
    s = ready()
    s.balloon(MAX_RANGES_PER_MESSAGE + 1, 0.0)
    ranges = [(2 * i, 1) for i in range(MAX_RANGES_PER_MESSAGE + 1)]
    balloon_reply(s, *ranges)
    assert error_kinds(s) == ["message-too-large"]
    assert len(s.ballooned) == MAX_RANGES_PER_MESSAGE + 1


def test_unballoon_messages_one_range_each_highest_first() -> None:
    boot = 40 * BLOCK
    s = ready(boot=boot, max_pages=boot)
    s.balloon(HV_BALLOON_HR_CHUNK_PAGES, 0.0)
    balloon_reply(s, (1000, 1000), (200_000, HV_BALLOON_HR_CHUNK_PAGES - 1000))
    top = 200_000 + HV_BALLOON_HR_CHUNK_PAGES - 1000
    msgs = s.unballoon(HV_BALLOON_HR_CHUNK_PAGES - 500, 0.0)
    assert msgs == [
        UnballoonRequest(1, True, (PageRange(top - 524_288, 524_288),)),
        UnballoonRequest(1, True, (PageRange(200_000, top - 524_288 - 200_000),)),
        UnballoonRequest(1, False, (PageRange(1500, 500),)),
    ]
    assert list(s.ballooned.ranges()) == [(1000, 1500)]
    assert s.state == "UNBALLOON_REPLY_WAIT"
    assert s.receive(UnballoonResponse(tid()), 0.0) == []
    assert s.state == "IDLE" and s.trans_id == 2


# -- explicit hot-add with partial backing ------------------------------------------------


def test_hot_add_region_placement_form_and_ground_truth() -> None:
    s = ready(boot=3 * BLOCK, alignment=8)  # 256 MiB alignment
    align = 2 * BLOCK
    assert s.hot_add_alignment_pages == align
    with pytest.raises(HostCommandError) as err:
        s.hot_add(3 * BLOCK, 10, 0.0)
    assert err.value.code == "invalid_argument" and err.value.field == "region_pages"
    (req,) = s.hot_add(2 * align, 10_000, 0.0)
    start = 2 * BLOCK * 2  # end of boot (3 blocks) aligned up to 256 MiB
    assert req == HotAddRequest(0, PageRange(start, 10_000), PageRange(start, 2 * align))
    # Backed as the request goes out, before any answer.
    assert s.backed.covers(start, start + 10_000)
    assert s.backed.disjoint(start + 10_000, start + 2 * align)
    assert s.hot_add(align, align, 0.0) == []
    (region, second) = s.regions
    assert (region.start, region.size, region.backed_pages) == (start, 2 * align, 10_000)
    assert (second.start, second.size, second.backed_pages) == (start + 2 * align, align, 0)
    assert list(second.pending.ranges()) == [(second.start, second.end)]
    (req2,) = hot_add_reply(s, 10_000)
    assert req2 == HotAddRequest(1, PageRange(second.start, align), PageRange(second.start, align))
    assert region.added_pages == 10_000 and region.guest_known
    assert s.current_pages == 3 * BLOCK + 10_000
    data = next(e.data for e in s.events if e.kind == "hot_add_request")
    assert data["form"] == 24 and data["range"] == [start, 10_000]


def test_hot_add_before_caps_uses_the_block_size() -> None:
    s = new_session(boot=3 * BLOCK)
    assert s.hot_add(BLOCK, 10, 0.0) == []
    assert s.regions[0].start == 3 * BLOCK
    out = negotiate(s)
    assert isinstance(out[-1], HotAddRequest)


def test_hot_add_queued_before_caps_dropped_if_misaligned_for_the_guest() -> None:
    s = new_session(boot=3 * BLOCK)
    s.hot_add(BLOCK, 10, 0.0)
    out = negotiate(s, alignment=8)
    assert not any(isinstance(m, HotAddRequest) for m in out)
    assert s.regions[0].unusable and not s.regions[0].pending
    assert "command_dropped" in [e.kind for e in s.events]


def test_back_contiguous_uses_the_16_byte_form() -> None:
    s = ready()
    s.hot_add(4 * BLOCK, 10_000, 0.0)
    hot_add_reply(s, 10_000)
    (req,) = s.back(5000, 0.0)
    assert req == HotAddRequest(1, PageRange(BOOT + 10_000, 5000), None)
    assert s.backed.covers(BOOT, BOOT + 15_000)
    hot_add_reply(s, 5000)
    assert s.regions[0].added_pages == 15_000 and s.protocol_errors == []


def test_back_at_an_explicit_start_leaves_then_fills_a_gap() -> None:
    s = ready()
    s.hot_add(4 * BLOCK, 10_000, 0.0)
    hot_add_reply(s, 10_000)
    (req,) = s.back(1000, 0.0, start_page=BOOT + 50_000)
    assert req == HotAddRequest(1, PageRange(BOOT + 50_000, 1000), None)
    hot_add_reply(s, 1000)
    region = s.regions[0]
    assert list(region.backed.ranges()) == [(BOOT, BOOT + 10_000), (BOOT + 50_000, BOOT + 51_000)]
    # Contiguous backing continues after the highest backed page, not in the gap.
    (req2,) = s.back(100, 0.0)
    assert req2 == HotAddRequest(2, PageRange(BOOT + 51_000, 100), None)
    hot_add_reply(s, 100)
    # Into the earlier gap (upstream Linux mishandles this: E2).
    (req3,) = s.back(500, 0.0, start_page=BOOT + 20_000)
    assert req3 == HotAddRequest(3, PageRange(BOOT + 20_000, 500), None)
    hot_add_reply(s, 500)
    assert s.protocol_errors == []
    assert region.added_pages == 10_000 + 1000 + 100 + 500


def test_short_hot_add_answer_makes_the_region_unusable() -> None:
    s = ready()
    s.hot_add(4 * BLOCK, 10_000, 0.0)
    hot_add_reply(s, 9_000)
    assert s.regions[0].unusable and s.regions[0].added_pages == 9_000
    with pytest.raises(HostCommandError) as err:
        s.back(100, 0.0)
    assert err.value.code == "failed_precondition"
    # A new region is still fine.
    assert s.hot_add(BLOCK, 10, 0.0) != []


def test_short_answer_stops_set_target_growth() -> None:
    s = ready()
    s.set_target(BOOT + 2 * 524_288, 0.0)
    assert hot_add_reply(s, 1000) == []
    assert s.state == "IDLE" and len(s.regions) == 1


def test_result_1_with_no_pages_disables_hot_add() -> None:
    s = ready()
    s.hot_add(BLOCK, 10, 0.0)
    hot_add_reply(s, 0, result=1)
    assert s.hot_add_disabled and s.protocol_errors == []
    assert not s.regions[0].guest_known
    with pytest.raises(HostCommandError) as err:
        s.hot_add(BLOCK, 10, 0.0)
    assert err.value.code == "failed_precondition"
    assert s.set_target(BOOT + BLOCK, 0.0) == []


def test_transient_failure_is_not_disabled() -> None:
    s = ready()
    s.hot_add(BLOCK, 10, 0.0)
    hot_add_reply(s, 0, result=0)
    assert not s.hot_add_disabled and s.regions[0].unusable
    assert s.regions[0].guest_known


# -- bad operator input ------------------------------------------------------------


def _with_region(s: DmHostSession) -> DmHostSession:
    s.hot_add(4 * BLOCK, 10_000, 0.0)
    hot_add_reply(s, 10_000)
    return s


def _disabled(s: DmHostSession) -> DmHostSession:
    s.hot_add(BLOCK, 10, 0.0)
    hot_add_reply(s, 0)
    return s


def _unusable(s: DmHostSession) -> DmHostSession:
    s.hot_add(BLOCK, 10, 0.0)
    hot_add_reply(s, 5)
    return s


BAD_COMMANDS: list[tuple[str, Callable[[], DmHostSession], Callable[[DmHostSession], object], str]]
BAD_COMMANDS = [
    ("target<0", ready, lambda s: s.set_target(-1, 0.0), "pages"),
    ("target>max", ready, lambda s: s.set_target(MAX + 1, 0.0), "pages"),
    ("target-bool", ready, lambda s: s.set_target(True, 0.0), "pages"),
    ("target-str", ready, lambda s: s.set_target("1G", 0.0), "pages"),  # type: ignore[arg-type]
    ("region-0", ready, lambda s: s.hot_add(0, 0, 0.0), "region_pages"),
    ("region-unaligned", ready, lambda s: s.hot_add(BLOCK + 1, 1, 0.0), "region_pages"),
    ("region-24bit", ready, lambda s: s.hot_add(1 << 24, 1, 0.0), "region_pages"),
    ("backed-0", ready, lambda s: s.hot_add(BLOCK, 0, 0.0), "backed_pages"),
    ("backed>region", ready, lambda s: s.hot_add(BLOCK, BLOCK + 1, 0.0), "backed_pages"),
    ("back-0", lambda: _with_region(ready()), lambda s: s.back(0, 0.0), "pages"),
    (
        "back-start<0",
        lambda: _with_region(ready()),
        lambda s: s.back(1, 0.0, start_page=-1),
        "start_page",
    ),
    (
        "back-crosses-end",
        lambda: _with_region(ready()),
        lambda s: s.back(2, 0.0, start_page=BOOT + 4 * BLOCK - 1),
        "pages",
    ),
    ("balloon-0", ready, lambda s: s.balloon(0, 0.0), "pages"),
    ("unballoon-0", ready, lambda s: s.unballoon(0, 0.0), "pages"),
]


def _no_hot_add() -> DmHostSession:
    return ready(hot_add=False)


def _no_balloon() -> DmHostSession:
    return ready(balloon=False)


PRECONDITION_COMMANDS = [
    ("no-hot-add-cap", _no_hot_add, lambda s: s.hot_add(BLOCK, 1, 0.0), "region_pages"),
    (
        "hot-add-disabled",
        lambda: _disabled(ready()),
        lambda s: s.hot_add(BLOCK, 1, 0.0),
        "region_pages",
    ),
    ("back-disabled", lambda: _disabled(ready()), lambda s: s.back(1, 0.0), "region"),
    ("back-unusable", lambda: _unusable(ready()), lambda s: s.back(1, 0.0), "region"),
    (
        "back-overlap",
        lambda: _with_region(ready()),
        lambda s: s.back(10, 0.0, start_page=BOOT + 9_995),
        "start_page",
    ),
    ("no-balloon-cap", _no_balloon, lambda s: s.balloon(1, 0.0), "pages"),
    ("balloon>current", ready, lambda s: s.balloon(BOOT + 1, 0.0), "pages"),
    ("unballoon>ballooned", ready, lambda s: s.unballoon(1, 0.0), "pages"),
]

EXHAUSTED_COMMANDS = [
    ("region>max", ready, lambda s: s.hot_add(MAX - BOOT + BLOCK, 1, 0.0), "region_pages"),
    (
        "back>room",
        lambda: _with_region(ready()),
        lambda s: s.back(4 * BLOCK - 10_000 + 1, 0.0),
        "pages",
    ),
]

NOT_FOUND_COMMANDS = [
    ("back-no-region", ready, lambda s: s.back(1, 0.0), "region"),
    (
        "back-start-outside",
        lambda: _with_region(ready()),
        lambda s: s.back(1, 0.0, start_page=5),
        "start_page",
    ),
]


@pytest.mark.parametrize(
    ("code", "make", "command", "field"),
    [pytest.param("invalid_argument", *c[1:], id=c[0]) for c in BAD_COMMANDS]
    + [pytest.param("failed_precondition", *c[1:], id=c[0]) for c in PRECONDITION_COMMANDS]
    + [pytest.param("resource_exhausted", *c[1:], id=c[0]) for c in EXHAUSTED_COMMANDS]
    + [pytest.param("not_found", *c[1:], id=c[0]) for c in NOT_FOUND_COMMANDS],
)
def test_bad_command_raises_and_changes_nothing(
    code: str,
    make: Callable[[], DmHostSession],
    command: Callable[[DmHostSession], object],
    field: str | None,
) -> None:
    s = make()
    before = snapshot(s)
    with pytest.raises(HostCommandError) as err:
        command(s)
    assert err.value.code == code
    assert isinstance(err.value, ValueError)
    if field is not None:
        assert err.value.field == field
        assert str(err.value).startswith(f"{field}: ")
    assert snapshot(s) == before


def test_hot_add_regions_stop_at_max_pages() -> None:
    s = ready(max_pages=BOOT + 2 * BLOCK)
    s.hot_add(BLOCK, 1, 0.0)
    s.hot_add(BLOCK, 1, 0.0)  # queued, but its space is reserved already
    with pytest.raises(HostCommandError) as err:
        s.hot_add(BLOCK, 1, 0.0)
    assert err.value.code == "resource_exhausted"


# -- protocol violations -------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        BalloonResponse(41, more_pages=False, ranges=(PageRange(0, 1),)),
        UnballoonResponse(41),
        HotAddResponse(41, page_count=1, result=1),
    ],
    ids=["balloon", "unballoon", "hot_add"],
)
def test_response_without_request(response: object) -> None:
    s = ready()
    assert s.receive(response, 0.0) == []  # type: ignore[arg-type]
    assert error_kinds(s) == ["response-without-request"]
    assert s.protocol_errors[0].trans_id == 41
    assert s.state == "IDLE" and not s.ballooned
    # Still usable.
    assert s.balloon(10, 0.0) == [BalloonRequest(0, 10)]


def test_response_of_the_wrong_kind_keeps_the_transaction() -> None:
    s = ready()
    s.hot_add(BLOCK, 10, 0.0)
    s.receive(UnballoonResponse(tid()), 0.0)
    balloon_reply(s, (0, 1))
    assert error_kinds(s) == ["response-without-request"] * 2
    assert s.state == "HOT_ADD_REPLY_WAIT"
    hot_add_reply(s, 10)
    assert s.state == "IDLE" and s.regions[0].added_pages == 10


def test_unexpected_message_type() -> None:
    s = ready()
    s.receive(BalloonRequest(3, 10), 0.0)
    assert error_kinds(s) == ["unexpected-message-type"]


def test_hot_add_page_count_above_request_is_clamped() -> None:
    s = ready()
    s.hot_add(BLOCK, 100, 0.0)
    hot_add_reply(s, 150)
    assert error_kinds(s) == ["hot-add-page-count-above-request"]
    assert s.regions[0].added_pages == 100 and not s.regions[0].unusable


def test_hot_add_failure_with_pages_is_inconsistent() -> None:
    s = ready()
    s.hot_add(BLOCK, 100, 0.0)
    hot_add_reply(s, 100, result=0)
    hot_add_reply(s, 1, result=0)  # no request pending any more
    assert error_kinds(s) == ["hot-add-result-inconsistent", "response-without-request"]
    assert s.regions[0].added_pages == 0 and s.regions[0].unusable


def test_hot_add_result_other_than_0_or_1() -> None:
    s = ready()
    s.hot_add(BLOCK, 100, 0.0)
    hot_add_reply(s, 100, result=7)
    assert error_kinds(s) == ["hot-add-bad-result"]


def test_hot_add_range_only_form_at_an_offset() -> None:
    """The 16-byte form for a new region: the guest must derive the region itself."""
    s = ready()
    (req,) = s.hot_add(2 * BLOCK, BLOCK, 0.0, offset_pages=100, with_region=False)
    assert isinstance(req, HotAddRequest)
    assert req.region is None
    assert req.range == PageRange(BOOT + 100, BLOCK)
    assert s.backed.covers(BOOT + 100, BOOT + 100 + BLOCK)
    assert BOOT + 99 not in s.backed


def test_hot_add_offset_must_leave_room_for_the_backing() -> None:
    s = ready()
    with pytest.raises(HostCommandError) as err:
        s.hot_add(BLOCK, BLOCK, 0.0, offset_pages=1)
    assert err.value.field == "offset_pages"
    assert s.regions == ()


def test_hot_add_correct_page_count_in_known_region_is_fine() -> None:
    s = ready()
    s.hot_add(4 * BLOCK, 100, 0.0)
    hot_add_reply(s, 100)
    s.back(BLOCK, 0.0)
    hot_add_reply(s, BLOCK)
    assert s.protocol_errors == []


def test_violations_never_raise_and_session_keeps_working() -> None:
    s = ready()
    for msg in [
        UnballoonResponse(1),
        HotAddResponse(2, 5, 1),
        BalloonResponse(3, False, ()),
        VersionRequest(4, DYNMEM_PROTOCOL_VERSION_3),
        CapabilitiesReport(5, True, True, 7),
    ]:
        assert s.receive(msg, 0.0) == []
    assert len(s.protocol_errors) == 5
    (req,) = s.set_target(BOOT - 10, 0.0)
    assert req == BalloonRequest(0, 10)


# -- access reports ------------------------------------------------------------------


def test_access_to_unbacked_memory_is_flagged() -> None:
    s = ready()
    s.hot_add(BLOCK, 100, 0.0)
    hot_add_reply(s, 100)
    balloon_out(s, 0, 10)
    s.drain_events()
    report = AccessReport(
        tid(), ranges=(PageRange(BOOT + 50, 150), PageRange(0, 20), PageRange(20, 5))
    )
    assert s.receive(report, 0.0) == []
    assert [(v.kind, v.pfn_start, v.pfn_end) for v in s.violations] == [
        ("unbacked-access", BOOT + 100, BOOT + 200),
        ("unbacked-access", 0, 10),
    ]
    assert s.protocol_errors == []
    events = s.drain_events()
    assert [e.kind for e in events] == ["violation", "violation"]
    assert events[0].data["pfn_start"] == BOOT + 100
    assert s.drain_events() == []


def test_access_report_accepted_in_any_state() -> None:
    s = new_session()
    s.receive(AccessReport(tid(), ranges=(PageRange(BOOT - 1, 2),)), 0.0)
    assert [(v.pfn_start, v.pfn_end) for v in s.violations] == [(BOOT, BOOT + 1)]
    assert s.protocol_errors == []


# -- reset ----------------------------------------------------------------------------


def test_reset_forgets_balloon_keeps_hot_added_memory() -> None:
    s = ready()
    s.hot_add(BLOCK, 100, 0.0)
    hot_add_reply(s, 100)
    balloon_out(s, 0, 1000)
    s.balloon(10, 0.0)  # in flight, never answered
    s.unballoon(5, 0.0)  # queued
    s.reset()
    assert s.state == "VERSION" and s.trans_id == 0 and s.in_flight is None
    assert not s.ballooned and s.backed.covers(0, BOOT)
    assert s.backed.covers(BOOT, BOOT + 100)
    assert s.regions[0].added_pages == 100 and not s.regions[0].guest_known
    assert s.current_pages == BOOT + 100
    assert s.caps is None and s.version is None
    assert s.events[-1].kind == "reset"
    # Queued work survives; unballooning nothing is dropped.
    out = negotiate(s)
    assert not any(isinstance(m, UnballoonRequest) for m in out)
    assert s.state == "IDLE"
    assert s.balloon(10, 0.0) == [BalloonRequest(0, 10)]


def test_reset_during_hot_add_makes_the_region_unusable() -> None:
    s = ready()
    s.hot_add(BLOCK, 100, 0.0)
    s.reset()
    assert s.regions[0].unusable


def test_events_cover_each_transaction() -> None:
    s = ready()
    s.set_target(BOOT + BLOCK, 0.0)
    hot_add_reply(s, BLOCK)
    s.balloon(10, 0.0)
    balloon_reply(s, (0, 10))
    s.unballoon(10, 0.0)
    s.receive(UnballoonResponse(tid()), 0.0)
    kinds = [e.kind for e in s.drain_events()]
    for kind in [
        "target",
        "target_plan",
        "hot_add_request",
        "hot_add_response",
        "balloon_request",
        "balloon_response",
        "unballoon_request",
        "unballoon_response",
        "command_queued",
        "command_started",
        "command_done",
    ]:
        assert kind in kinds
    assert all(e.data["vm_id"] == "vm0" for e in s.events)


def test_target_below_the_balloon_floor_is_refused() -> None:
    boot = 40 * BLOCK  # 5 GiB: floor 232 MiB + 5 GiB / 16 = 552 MiB
    s = ready(boot=boot, max_pages=boot)
    floor = compute_balloon_floor(boot)
    assert floor == (232 + 320) * 256
    before = (s.state, s.target_pages, s.current_pages)
    with pytest.raises(HostCommandError) as err:
        s.set_target(floor - 1, 0.0)
    assert err.value.field == "pages" and err.value.code == "failed_precondition"
    assert "balloon floor" in err.value.message
    with pytest.raises(HostCommandError) as err:
        s.balloon(boot - floor + 1, 0.0)
    assert err.value.code == "failed_precondition"
    assert (s.state, s.target_pages, s.current_pages) == before
    assert s.set_target(floor, 0.0) != []  # the floor itself is fine
