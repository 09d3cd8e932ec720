"""DmHostSession.snapshot / restore and GroundTruth.snapshot / from_snapshot."""

from __future__ import annotations

import json

import pytest

from hypervisor.dm_host import DmHostSession
from hypervisor.errors import HostCommandError
from hypervisor.ground_truth import GroundTruth
from hypervisor.vm import VmConfig
from memhp.dm import BalloonResponse, HotAddRequest, HotAddResponse, PageRange
from tests.hypervisor.helpers import BLOCK, BOOT, MAX, negotiate, ready, tid


def grown() -> DmHostSession:
    """A session with a partly backed region, a short-answered one and ballooned pages."""
    s = ready()
    s.hot_add(4 * BLOCK, BLOCK, 0.0)  # region 1: 1 of 4 blocks backed
    s.receive(HotAddResponse(tid(), BLOCK, 1), 0.0)
    s.hot_add(BLOCK, BLOCK, 0.0)  # region 2: answered short -> unusable
    s.receive(HotAddResponse(tid(), 100, 1), 0.0)
    (_req,) = s.balloon(512, 0.0)
    s.receive(BalloonResponse(tid(), False, (PageRange(0, 512),)), 0.0)
    s.set_target(s.current_pages, 0.0)  # already there: nothing to do
    assert s.state == "IDLE" and not s.busy
    return s


def view(s: DmHostSession) -> object:
    return (
        s.target_pages,
        s.hot_add_disabled,
        s.current_pages,
        list(s.backed.ranges()),
        list(s.ballooned.ranges()),
        list(s.guest_ram.ranges()),
        [
            (
                r.start,
                r.size,
                list(r.backed.ranges()),
                list(r.added.ranges()),
                r.unusable,
                r.guest_known,
            )
            for r in s.regions
        ],
    )


def test_snapshot_is_json_and_round_trips() -> None:
    s = grown()
    data = json.loads(json.dumps(s.snapshot()))
    t = DmHostSession.from_snapshot(s.config, data)
    assert view(t) == view(s)
    assert t.state == "VERSION" and t.trans_id == 0 and t.in_flight is None
    assert t.events[-1].kind == "restored"


def test_restored_session_offers_nothing_twice() -> None:
    s = grown()
    t = DmHostSession.from_snapshot(s.config, s.snapshot())
    negotiate(t)
    # The newest region was answered short: it stays closed after the restore.
    with pytest.raises(HostCommandError, match="no further hot-add"):
        t.back(BLOCK, 0.0)
    # Region 1 had its first block backed: that block cannot be backed again.
    with pytest.raises(HostCommandError, match="already backed"):
        t.back(BLOCK, 0.0, start_page=BOOT)
    (req,) = t.back(BLOCK, 0.0, start_page=BOOT + BLOCK)
    assert isinstance(req, HotAddRequest) and req.region is None
    assert req.range == PageRange(BOOT + BLOCK, BLOCK)
    t.receive(HotAddResponse(tid(), BLOCK, 1), 0.0)
    (req,) = t.hot_add(BLOCK, BLOCK, 0.0)
    assert isinstance(req, HotAddRequest) and req.region is not None
    assert req.region.start_page == BOOT + 5 * BLOCK  # after both old regions


def test_restore_keeps_hot_add_disabled_and_target() -> None:
    s = ready()
    s.hot_add(BLOCK, BLOCK, 0.0)
    s.receive(HotAddResponse(tid(), 0, 1), 0.0)  # result=1, page_count=0: disabled
    s.set_target(BOOT, 0.0)
    assert s.hot_add_disabled
    t = DmHostSession.from_snapshot(s.config, s.snapshot())
    assert t.hot_add_disabled and t.target_pages == BOOT


def test_restore_drops_queued_work() -> None:
    s = ready()
    s.hot_add(BLOCK, BLOCK, 0.0)  # in flight
    s.hot_add(BLOCK, BLOCK, 0.0)  # queued
    s.drain_events()
    snap = s.snapshot()
    s.restore(snap)
    kinds = [e.kind for e in s.drain_events()]
    # The running command and the queued one.
    assert kinds.count("command_dropped") == 2 and kinds[-1] == "restored"
    assert not s.busy and s.state == "VERSION"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["regions"][0].update(start=0), "hotplug window"),
        (lambda d: d["regions"][0].update(size=MAX), "hotplug window"),
        (
            lambda d: d["regions"][0]["added"].append([BOOT + 3 * BLOCK, BOOT + 4 * BLOCK]),
            "never backed",
        ),
        (lambda d: d["regions"][0]["backed"].append([0, 10]), "outside the region"),
        (lambda d: d["regions"].append(dict(d["regions"][0])), "overlaps"),
        (lambda d: d["ballooned"].append([MAX, MAX + 1]), "not guest RAM"),
        (lambda d: d["ballooned"].append([5, 5]), "empty range"),
        (lambda d: d["ballooned"].append([1]), "pair"),
        (lambda d: d.update(target_pages=MAX + 1), "target_pages"),
        (lambda d: d["regions"][0].update(start=-1), "non-negative"),
    ],
)
def test_restore_refuses_what_does_not_fit(mutate, message) -> None:
    s = grown()
    data = json.loads(json.dumps(s.snapshot()))
    mutate(data)
    before = view(s)
    with pytest.raises(ValueError, match=message):
        s.restore(data)
    assert view(s) == before


def test_ground_truth_snapshot_derives_backed_and_ram() -> None:
    s = grown()
    cfg = s.config
    truth = GroundTruth.from_snapshot(cfg, s.snapshot())
    assert list(truth.backed.ranges()) == list(s.backed.ranges())
    assert list(truth.ram.ranges()) == list(s.guest_ram.ranges())
    assert truth.snapshot() == GroundTruth.from_snapshot(cfg, truth.snapshot()).snapshot()


def test_empty_snapshot_is_a_fresh_vm() -> None:
    cfg = VmConfig("vm0", BOOT, MAX, BLOCK)
    t = DmHostSession.from_snapshot(cfg, {})
    assert t.current_pages == BOOT and not t.regions and t.target_pages is None


def test_region_reserved_by_queued_work_is_not_in_the_snapshot() -> None:
    s = ready()
    s.hot_add(BLOCK, BLOCK, 0.0)  # in flight: backed, offered
    s.hot_add(2 * BLOCK, BLOCK, 0.0)  # queued: only reserved
    assert len(s.regions) == 2
    snap = s.snapshot()
    assert [r["start"] for r in snap["regions"]] == [BOOT]
    t = DmHostSession.from_snapshot(s.config, snap)
    negotiate(t)
    # The reserved addresses are free again: the guest never saw them.
    (req,) = t.hot_add(BLOCK, BLOCK, 0.0)
    assert isinstance(req, HotAddRequest) and req.range.start_page == BOOT + BLOCK
