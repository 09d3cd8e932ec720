"""Random operator commands against a well-behaved guest keep the host's invariants.

The guest here is a small protocol-level fake (not the Linux model in ``guest/``): it
balloons free pages from the top, answers hot-adds fully or short, answers unballoon
once, reports status and touches its own free pages. It asserts, from its side, that
the host never has two transactions in flight; the host must record no protocol error
and no unbacked access from it.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from extents import RangeSet
from hypervisor.dm_host import DmHostSession
from hypervisor.errors import HostCommandError
from memhp.dm import (
    MAX_RANGES_PER_MESSAGE,
    AccessReport,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesResponse,
    DmMessage,
    HotAddRequest,
    HotAddResponse,
    PageRange,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionResponse,
)
from tests.hypervisor.helpers import BLOCK, BOOT, MAX, negotiate, new_session, snapshot

FLOOR = BLOCK // 2


class FakeGuest:
    """A guest that follows the protocol, with random (seeded) choices."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ram = RangeSet()
        self.ram.add(0, BOOT)
        self.ballooned = RangeSet()
        self.outbox: deque[DmMessage] = deque()
        self.outstanding: str | None = None
        self.disabled = False
        self.next_id = 1

    def tid(self) -> int:
        self.next_id += 1
        return self.next_id

    def free_ranges(self) -> list[tuple[int, int]]:
        out = []
        for start, end in self.ram.ranges():
            out += list(self.ballooned.holes(start, end))
        return out

    def deliver(self, msg: DmMessage) -> None:
        if isinstance(msg, UnballoonRequest):
            assert self.outstanding in (None, "unballoon"), "request while one is in flight"
            self.outstanding = "unballoon"
            for r in msg.ranges:
                assert self.ballooned.covers(r.start_page, r.end_page), "unballoon of own pages"
                self.ballooned.remove(r.start_page, r.end_page)
            if not msg.more_pages:
                self.outbox.append(UnballoonResponse(self.tid()))
            return
        assert self.outstanding is None, "request while one is in flight"
        if isinstance(msg, BalloonRequest):
            self.outstanding = "balloon"
            self._balloon(msg.num_pages)
        elif isinstance(msg, HotAddRequest):
            self.outstanding = "hot_add"
            self._hot_add(msg)
        else:
            raise AssertionError(f"unexpected host message {msg!r}")

    def _balloon(self, asked: int) -> None:
        free = sum(e - s for s, e in self.free_ranges())
        pages = min(asked, max(0, free - FLOOR))
        if self.rng.random() < 0.3:
            pages = self.rng.randint(0, pages)
        taken: list[PageRange] = []
        for start, end in reversed(self.free_ranges()):
            if pages == 0:
                break
            n = min(end - start, pages)
            taken.append(PageRange(end - n, n))
            self.ballooned.add(end - n, end)
            pages -= n
        per_msg = self.rng.randint(1, 3)
        chunks = [taken[i : i + per_msg] for i in range(0, len(taken), per_msg)] or [[]]
        assert all(len(c) <= MAX_RANGES_PER_MESSAGE for c in chunks)
        for i, chunk in enumerate(chunks):
            more = i < len(chunks) - 1
            self.outbox.append(BalloonResponse(self.tid(), more_pages=more, ranges=tuple(chunk)))

    def _hot_add(self, msg: HotAddRequest) -> None:
        n = msg.range.page_cnt
        roll = self.rng.random()
        if self.disabled:
            page_count, result = 0, 1
        elif roll < 0.03:
            self.disabled = True
            page_count, result = 0, 1
        elif roll < 0.08:
            page_count, result = 0, 0
        elif roll < 0.15 and n > 1:
            page_count, result = self.rng.randint(1, n - 1), 1
        else:
            page_count, result = n, 1
        self.ram.add(msg.range.start_page, msg.range.start_page + page_count)
        self.outbox.append(HotAddResponse(self.tid(), page_count=page_count, result=result))

    def touch(self) -> None:
        free = self.free_ranges()
        picks = self.rng.sample(free, min(3, len(free)))
        ranges = []
        for start, end in picks:
            n = min(end - start, self.rng.randint(1, 4096))
            ranges.append(PageRange(start, n))
        self.outbox.append(AccessReport(self.tid(), ranges=tuple(ranges)))

    def sent(self, msg: DmMessage) -> None:
        """``msg`` reached the host: a final response closes the guest's transaction."""
        final = isinstance(msg, (UnballoonResponse, HotAddResponse)) or (
            isinstance(msg, BalloonResponse) and not msg.more_pages
        )
        if final:
            self.outstanding = None


class DmHostMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.host: DmHostSession = new_session()
        self.guest = FakeGuest(random.Random(0))

    @initialize(seed=st.integers(0, 2**32 - 1), alignment=st.sampled_from([7, 8]))
    def start(self, seed: int, alignment: int) -> None:
        self.guest = FakeGuest(random.Random(seed))
        out = negotiate(self.host, alignment=alignment)
        assert [type(m) for m in out] == [VersionResponse, CapabilitiesResponse]

    def to_guest(self, msgs: list[DmMessage]) -> None:
        for msg in msgs:
            self.guest.deliver(msg)

    def command(self, call: Callable[[], list[DmMessage]]) -> None:
        before = snapshot(self.host)
        try:
            msgs = call()
        except HostCommandError:
            assert snapshot(self.host) == before
            return
        self.to_guest(msgs)

    @rule(pages=st.integers(0, MAX))
    def set_target(self, pages: int) -> None:
        self.command(lambda: self.host.set_target(pages, self.now))

    @rule(blocks=st.integers(1, 8), data=st.data())
    def hot_add(self, blocks: int, data: st.DataObject) -> None:
        region = blocks * 2 * BLOCK  # a multiple of both 128 and 256 MiB
        backed = data.draw(st.integers(1, region))
        self.command(lambda: self.host.hot_add(region, backed, self.now))

    @rule(pages=st.integers(1, 3 * BLOCK), offset=st.none() | st.integers(0, 16 * BLOCK))
    def back(self, pages: int, offset: int | None) -> None:
        start = None
        if offset is not None and self.host.regions:
            start = self.host.regions[-1].start + offset
        self.command(lambda: self.host.back(pages, self.now, start_page=start))

    @rule(pages=st.integers(1, 2 * BOOT))
    def balloon(self, pages: int) -> None:
        self.command(lambda: self.host.balloon(pages, self.now))

    @rule(pages=st.integers(1, 2 * BOOT))
    def unballoon(self, pages: int) -> None:
        self.command(lambda: self.host.unballoon(pages, self.now))

    @rule(count=st.integers(1, 8))
    def deliver(self, count: int) -> None:
        for _ in range(count):
            if not self.guest.outbox:
                return
            msg = self.guest.outbox.popleft()
            self.guest.sent(msg)
            self.to_guest(self.host.receive(msg, self.now))

    @rule()
    def status(self) -> None:
        g = self.guest
        committed = len(g.ram) - len(g.ballooned) + len(g.ballooned)
        self.guest.outbox.append(StatusReport(g.tid(), num_avail=FLOOR, num_committed=committed))

    @rule()
    def touch(self) -> None:
        self.guest.touch()

    @rule(dt=st.floats(0.0, 5.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.to_guest(self.host.tick(self.now))

    @invariant()
    def backed_and_ballooned_disjoint(self) -> None:
        host = self.host
        for start, end in host.ballooned.ranges():
            assert host.backed.disjoint(start, end)
            assert host.guest_ram.covers(start, end)

    @invariant()
    def current_pages_consistent(self) -> None:
        host = self.host
        added = sum(r.added_pages for r in host.regions)
        assert host.current_pages == BOOT + added - len(host.ballooned)
        assert host.current_pages == len(host.guest_ram) - len(host.ballooned)
        assert BOOT + sum(r.size for r in host.regions) <= MAX

    @invariant()
    def hot_add_backed_total_is_the_regions_sum(self) -> None:
        host = self.host
        assert host.hot_add_backed_pages == sum(r.backed_pages for r in host.regions)

    @invariant()
    def regions_consistent(self) -> None:
        host = self.host
        previous_end = BOOT
        for r in host.regions:
            assert r.start >= previous_end and r.start % BLOCK == 0
            previous_end = r.end
            for start, end in r.backed.ranges():
                assert r.contains(start, end)
                assert r.pending.disjoint(start, end)
            for start, end in r.added.ranges():
                assert r.backed.covers(start, end)

    @invariant()
    def one_transaction_in_flight(self) -> None:
        host = self.host
        waiting = host.state.endswith("_REPLY_WAIT")
        assert waiting == (host.in_flight is not None)
        if host.in_flight is not None:
            assert host.state.startswith(host.in_flight.kind.upper())

    @invariant()
    def guest_and_host_agree_when_quiet(self) -> None:
        host, guest = self.host, self.guest
        assert host.protocol_errors == []
        assert host.violations == []
        if not guest.outbox and guest.outstanding is None:
            assert host.ballooned == guest.ballooned
            assert host.guest_ram == guest.ram


DmHostMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDmHostProperties = DmHostMachine.TestCase
