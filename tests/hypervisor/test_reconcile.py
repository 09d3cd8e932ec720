"""Reattach: the guest's layout wins for what it added; nothing is offered twice."""

from __future__ import annotations

from hypervisor.dm_host import DmHostSession
from hypervisor.ground_truth import GroundTruth
from hypervisor.reconcile import GuestState, HeldRegion, reattach, reconcile
from hypervisor.vm import VmConfig
from memhp.dm import BalloonResponse, HotAddRequest, HotAddResponse, PageRange
from tests.hypervisor.helpers import BLOCK, BOOT, MAX, negotiate, ready, tid

CFG = VmConfig("vm0", BOOT, MAX, BLOCK)
R1 = BOOT  # first region start


def with_region(backed: int = BLOCK, added: int = BLOCK) -> DmHostSession:
    s = ready()
    s.hot_add(4 * BLOCK, backed, 0.0)
    s.receive(HotAddResponse(tid(), added, 1), 0.0)
    return s


def test_reattach_without_state_is_a_reset_that_keeps_hot_add_disabled() -> None:
    s = ready()
    s.hot_add(BLOCK, BLOCK, 0.0)
    s.receive(HotAddResponse(tid(), 0, 1), 0.0)
    assert s.hot_add_disabled
    reattach(s, None)
    assert s.state == "VERSION" and s.hot_add_disabled
    assert s.regions[0].unusable


def test_held_region_becomes_guest_known_and_takes_more_backing() -> None:
    s = with_region()
    report = reattach(s, GuestState(regions=((R1, 4 * BLOCK),), pages_added=BLOCK))
    assert report.held_regions == 1 and report.added_placed == 0
    assert s.regions[0].guest_known and not s.regions[0].unusable
    negotiate(s)
    (req,) = s.back(BLOCK, 0.0)
    assert isinstance(req, HotAddRequest) and req.region is None
    assert req.range == PageRange(R1 + BLOCK, BLOCK)


def test_answer_lost_in_flight_is_placed_in_that_request() -> None:
    s = with_region()
    s.back(BLOCK, 0.0)  # in flight: [R1+BLOCK, R1+2*BLOCK); the stream breaks
    report = reattach(s, GuestState(regions=((R1, 4 * BLOCK),), pages_added=2 * BLOCK))
    assert report.added_placed == BLOCK
    assert list(s.regions[0].added.ranges()) == [(R1, R1 + 2 * BLOCK)]
    assert s.current_pages == BOOT + 2 * BLOCK
    # Whether the guest added it was unknown when the stream broke: the region stays closed.
    assert s.regions[0].unusable


def test_region_the_guest_does_not_hold_is_closed_and_its_pages_leave_ram() -> None:
    s = with_region()
    report = reattach(s, GuestState(regions=(), pages_added=0))
    r = s.regions[0]
    assert r.unusable and not r.guest_known and r.added_pages == 0
    assert report.dropped_regions == 1 and report.added_removed == BLOCK
    assert s.current_pages == BOOT
    # The backing stays recorded, so those pages are never offered again.
    assert r.backed_pages == BLOCK
    negotiate(s)
    (req,) = s.hot_add(BLOCK, BLOCK, 0.0)
    assert isinstance(req, HotAddRequest) and req.region is not None
    assert req.region.start_page == R1 + 4 * BLOCK


def test_unknown_guest_region_is_adopted_backed_as_far_as_added() -> None:
    s = ready()  # a hypervisor that lost its state
    state = GuestState(regions=((R1, 2 * BLOCK),), pages_added=BLOCK + 10)
    report = reattach(s, state)
    assert report.adopted_regions == 1 and report.added_placed == BLOCK + 10
    (r,) = s.regions
    assert (r.start, r.size, r.guest_known, r.unusable) == (R1, 2 * BLOCK, True, True)
    assert list(r.added.ranges()) == [(R1, R1 + BLOCK + 10)]
    assert s.backed.covers(R1, R1 + BLOCK + 10)
    assert s.current_pages == BOOT + BLOCK + 10
    negotiate(s)
    (req,) = s.hot_add(BLOCK, BLOCK, 0.0)
    assert isinstance(req, HotAddRequest) and req.region is not None
    assert req.region.start_page == R1 + 2 * BLOCK


def test_guest_with_fewer_added_pages_wins() -> None:
    s = with_region(backed=2 * BLOCK, added=2 * BLOCK)
    report = reattach(s, GuestState(regions=((R1, 4 * BLOCK),), pages_added=BLOCK))
    assert report.added_removed == BLOCK
    assert list(s.regions[0].added.ranges()) == [(R1, R1 + BLOCK)]


def test_ballooned_pages_follow_the_guest() -> None:
    s = with_region()
    s.balloon(100, 0.0)
    s.receive(BalloonResponse(tid(), False, (PageRange(0, 100),)), 0.0)
    state = GuestState(
        regions=((R1, 4 * BLOCK),),
        pages_added=BLOCK,
        ballooned=((50, 100), (R1, 10), (MAX, 5)),
    )
    report = reattach(s, state)
    assert list(s.ballooned.ranges()) == [(50, 150), (R1, R1 + 10)]
    assert s.backed.disjoint(50, 150) and s.backed.disjoint(R1, R1 + 10)
    assert s.backed.covers(0, 50)  # the host forgot [0, 50): the guest holds it again
    assert report.ballooned == 110
    assert any("not guest RAM" in n for n in report.notes)


def test_guest_regions_outside_the_window_are_ignored() -> None:
    truth = GroundTruth(CFG)
    report = reconcile(truth, GuestState(regions=((0, BLOCK), (MAX, BLOCK)), pages_added=0))
    assert not truth.regions and len(report.notes) == 2


def test_reconcile_result_survives_a_snapshot() -> None:
    s = with_region()
    s.back(BLOCK, 0.0)
    reattach(s, GuestState(regions=((R1, 4 * BLOCK),), pages_added=2 * BLOCK))
    t = DmHostSession.from_snapshot(CFG, s.snapshot())
    assert t.current_pages == s.current_pages
    assert [r.snapshot() for r in t.regions] == [r.snapshot() for r in s.regions]


# -- a guest that lists its regions one by one (GuestMemoryState.held) -------------------


def test_neighbouring_regions_the_host_lost_are_adopted_one_by_one_with_their_pages() -> None:
    """The state file lagged a batch: two neighbouring 4-block regions the guest holds are
    unknown to the host. Each becomes a host region of its own size, with exactly the
    pages the guest added in it (3 of 4 blocks each), not one region filled from the start."""
    s = with_region(backed=3 * BLOCK, added=3 * BLOCK)
    r2, r3 = R1 + 4 * BLOCK, R1 + 8 * BLOCK
    held = tuple(HeldRegion(start, 4 * BLOCK, ((start, 3 * BLOCK),)) for start in (R1, r2, r3))
    state = GuestState(regions=((R1, 12 * BLOCK),), pages_added=9 * BLOCK, held=held)
    report = reattach(s, state)
    assert report.adopted_regions == 2 and report.held_regions == 1
    assert [(r.start, r.size) for r in s.regions] == [
        (R1, 4 * BLOCK),
        (r2, 4 * BLOCK),
        (r3, 4 * BLOCK),
    ]
    for region in s.regions:
        assert list(region.added.ranges()) == [(region.start, region.start + 3 * BLOCK)]
        assert list(region.backed.ranges()) == [(region.start, region.start + 3 * BLOCK)]
    assert report.added_placed == 6 * BLOCK and report.added_removed == 0
    assert s.current_pages == BOOT + 9 * BLOCK
    # Adopted regions take no more hot-add; the one the host knew does.
    assert [r.unusable for r in s.regions] == [False, True, True]


def test_the_guests_pages_win_page_by_page_in_a_region_the_host_knows() -> None:
    """The host counted blocks 0-2 added; the guest has 0-1 and 3 (backed later into the
    top, an answer the host lost): the host's truth becomes the guest's, block for block."""
    s = with_region(backed=3 * BLOCK, added=3 * BLOCK)
    added = ((R1, 2 * BLOCK), (R1 + 3 * BLOCK, BLOCK))
    state = GuestState(
        regions=((R1, 4 * BLOCK),), pages_added=3 * BLOCK, held=(HeldRegion(R1, 4 * BLOCK, added),)
    )
    report = reattach(s, state)
    r = s.regions[0]
    assert list(r.added.ranges()) == [(R1, R1 + 2 * BLOCK), (R1 + 3 * BLOCK, R1 + 4 * BLOCK)]
    assert r.backed.covers(R1 + 3 * BLOCK, R1 + 4 * BLOCK)
    assert report.added_placed == BLOCK and report.added_removed == BLOCK
    assert s.current_pages == BOOT + 3 * BLOCK


def test_held_regions_that_cannot_be_are_noted_and_left_out() -> None:
    truth = GroundTruth(CFG)
    held = (
        HeldRegion(0, BLOCK),  # boot memory
        HeldRegion(MAX, BLOCK),  # past the maximum
        HeldRegion(R1, 4 * BLOCK, ((R1 - BLOCK, 2 * BLOCK), (R1, BLOCK))),  # one added outside
        HeldRegion(R1 + 2 * BLOCK, 4 * BLOCK),  # overlaps the one before
    )
    report = reconcile(truth, GuestState(held=held))
    assert [(r.start, r.size) for r in truth.regions] == [(R1, 4 * BLOCK)]
    assert list(truth.regions[0].added.ranges()) == [(R1, R1 + BLOCK)]
    assert sum("ignored" in n for n in report.notes) == 4 and report.adopted_regions == 1
