"""Batched commands: HotAdd with a count, Back of everything remaining."""

from __future__ import annotations

import pytest

from hypervisor.dm_host import DmHostSession
from hypervisor.errors import HostCommandError
from memhp.dm import HotAddRequest, HotAddResponse, PageRange
from tests.hypervisor.helpers import BLOCK, BOOT, MAX, negotiate, ready, snapshot, tid


def answer(s: DmHostSession, req: object) -> list[HotAddRequest]:
    assert isinstance(req, HotAddRequest)
    out = s.receive(HotAddResponse(tid(), page_count=req.range.page_cnt, result=1), 1.0)
    assert all(isinstance(m, HotAddRequest) for m in out)
    return [m for m in out if isinstance(m, HotAddRequest)]


def test_hot_add_count_sends_one_region_after_another_as_one_command() -> None:
    s = ready()
    (req,) = s.hot_add(2 * BLOCK, BLOCK, 0.0, count=3)
    assert isinstance(req, HotAddRequest)
    assert s.queued == ()  # running, nothing waits behind it
    seen = [req]
    for _ in range(2):
        (nxt,) = answer(s, seen[-1])
        seen.append(nxt)
    assert answer(s, seen[-1]) == []
    assert [r.region for r in seen] == [
        PageRange(BOOT + i * 2 * BLOCK, 2 * BLOCK) for i in range(3)
    ]
    assert [r.range for r in seen] == [PageRange(BOOT + i * 2 * BLOCK, BLOCK) for i in range(3)]
    assert [r.trans_id for r in seen] == [0, 1, 2]
    assert [r.added_pages for r in s.regions] == [BLOCK] * 3
    assert not s.busy and s.protocol_errors == []
    kinds = [e.kind for e in s.events]
    assert kinds.count("command_started") == 1 and kinds.count("command_done") == 1


def test_hot_add_count_that_does_not_fit_places_nothing() -> None:
    s = ready()
    before = snapshot(s)
    room = MAX - BOOT
    with pytest.raises(HostCommandError) as err:
        s.hot_add(BLOCK, BLOCK, 0.0, count=room // BLOCK + 1)
    assert err.value.field == "region_pages" and "regions of" in str(err.value)
    assert snapshot(s) == before
    with pytest.raises(HostCommandError) as err:
        s.hot_add(BLOCK, BLOCK, 0.0, count=0)
    assert err.value.field == "count"
    assert snapshot(s) == before


def test_reset_in_a_batch_keeps_the_unsent_rest_queued() -> None:
    s = ready()
    (req,) = s.hot_add(BLOCK, BLOCK, 0.0, count=3)
    (second,) = answer(s, req)
    s.reset()
    # The region in flight is given up; the third waits for the renegotiation.
    assert s.regions[1].unusable
    assert len(s.queued) == 1
    out = negotiate(s)
    (third,) = [m for m in out if isinstance(m, HotAddRequest)]
    assert third.region == PageRange(BOOT + 2 * BLOCK, BLOCK)
    assert answer(s, third) == []
    assert [r.added_pages for r in s.regions] == [BLOCK, 0, BLOCK]
    assert second.trans_id == 1


def test_back_remaining_backs_every_hole_lowest_first() -> None:
    s = ready()
    (req,) = s.hot_add(2 * BLOCK, BLOCK, 0.0, count=2)
    (nxt,) = answer(s, req)
    answer(s, nxt)
    (gap,) = s.back(100, 0.0, start_page=BOOT + BLOCK + 1000)
    answer(s, gap)
    (first,) = s.back_remaining(0.0)
    assert isinstance(first, HotAddRequest)
    sent = [first]
    while True:
        out = answer(s, sent[-1])
        if not out:
            break
        sent.append(out[0])
    assert [(r.range.start_page, r.range.page_cnt, r.region) for r in sent] == [
        (BOOT + BLOCK, 1000, None),
        (BOOT + BLOCK + 1100, BLOCK - 1100, None),
        (BOOT + 3 * BLOCK, BLOCK, None),
    ]
    assert s.backed.covers(BOOT, BOOT + 4 * BLOCK)
    with pytest.raises(HostCommandError) as err:
        s.back_remaining(0.0)
    assert err.value.field == "remaining"


def test_a_batch_the_guest_can_no_longer_take_is_dropped_with_one_event() -> None:
    s = ready()
    (first,) = s.hot_add(BLOCK, BLOCK, 0.0, count=50)
    assert isinstance(first, HotAddRequest)
    s.drain_events()
    # The guest disables hot-add (result 1, nothing added): the other 49 cannot go out.
    assert s.receive(HotAddResponse(tid(), page_count=0, result=1), 1.0) == []
    dropped = [e for e in s.drain_events() if e.kind == "command_dropped"]
    assert len(dropped) == 1 and dropped[0].data["offers"] == 49
    assert s.hot_add_disabled and not s.busy
    assert all(r.unusable and not r.pending for r in s.regions[1:])
