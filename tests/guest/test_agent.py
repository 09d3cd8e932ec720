"""guest.agent: the asyncio adapter, against an in-process fake hypervisor stream.

The transport is swapped for :class:`FakeTransport` (queues instead of gRPC); the host
end of each stream is a real :class:`hypervisor.dm_host.DmHostSession`, so the DM
conversation is the true one. Covers attach then build, negotiation and a hot-add,
a host reset, reconnect with backoff and ``GuestMemoryState``, fatal errors, access
batching and ordering, and the sysfs tree's rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from guest.agent import (
    SYSFS_MIN_INTERVAL,
    AccessBatcher,
    AgentOptions,
    GuestAgent,
    Layout,
    LinkClosed,
    memory_state,
    pressure_report_calls,
)
from guest.kernel import Sleep
from guest.mm.pages import PAGE_OFFLINE
from guest.sysfs import write_sysfs_tree
from guest.workload import WorkloadSpec
from hypervisor.dm_host import DmHostSession
from hypervisor.vm import VmConfig
from memhp import dm
from memhp.v1 import dm_pb2
from memhp.wire import from_frame, to_frame

BLOCK = 32_768
CONFIG = VmConfig("vm1", boot_pages=8 * BLOCK, max_pages=64 * BLOCK, block_pages=BLOCK)


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)


# -- the fake stream ------------------------------------------------------------------


class FakeLink:
    def __init__(self) -> None:
        self.to_host: asyncio.Queue[dm_pb2.GuestToHost] = asyncio.Queue()
        self.to_guest: asyncio.Queue[dm_pb2.HostToGuest | LinkClosed | None] = asyncio.Queue()
        self.closed = False

    async def write(self, msg: dm_pb2.GuestToHost) -> None:
        if self.closed:
            raise LinkClosed("closed")
        self.to_host.put_nowait(msg)

    async def read(self) -> dm_pb2.HostToGuest | None:
        item = await self.to_guest.get()
        if isinstance(item, LinkClosed):
            self.closed = True
            raise item
        return item

    async def close(self) -> None:
        self.closed = True

    def break_(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.to_guest.put_nowait(LinkClosed(f"{code.name}: broken", code))


class FakeTransport:
    def __init__(self) -> None:
        self.links: asyncio.Queue[FakeLink] = asyncio.Queue()
        self.refuse: list[LinkClosed] = []
        self.opened = 0
        self.closed = False

    async def open(self) -> FakeLink:
        self.opened += 1
        if self.refuse:
            raise self.refuse.pop(0)
        link = FakeLink()
        self.links.put_nowait(link)
        return link

    async def close(self) -> None:
        self.closed = True


class FakeHost:
    """The host end of one FakeLink: attach, then a DmHostSession answering frames."""

    def __init__(self, link: FakeLink, config: VmConfig = CONFIG) -> None:
        self.link = link
        self.config = config
        self.session = DmHostSession(config)
        self.attach: dm_pb2.Attach | None = None
        self.received: list[dm.DmMessage] = []
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        first = await self.link.to_host.get()
        self.attach = first.attach
        c = self.config
        layout = dm_pb2.VmLayout(
            vm_id=c.vm_id, boot_pages=c.boot_pages, max_pages=c.max_pages, block_pages=c.block_pages
        )
        self.link.to_guest.put_nowait(dm_pb2.HostToGuest(attached=dm_pb2.Attached(layout=layout)))
        while True:
            req = await self.link.to_host.get()
            msg = from_frame(req.frame)
            self.received.append(msg)
            self.send(self.session.receive(msg, time.monotonic()))

    def send(self, msgs: list[dm.DmMessage]) -> None:
        for m in msgs:
            self.link.to_guest.put_nowait(dm_pb2.HostToGuest(frame=to_frame(m)))

    def of(self, kind: type[dm.DmMessage]) -> list[Any]:
        return [m for m in self.received if isinstance(m, kind)]

    async def negotiated(self) -> None:
        await wait_until(lambda: self.session.state == "IDLE", what="negotiation")

    def stop(self) -> None:
        self.task.cancel()


async def next_host(transport: FakeTransport, config: VmConfig = CONFIG) -> FakeHost:
    link = await asyncio.wait_for(transport.links.get(), 5.0)
    return FakeHost(link, config)


@contextlib.contextmanager
def debug_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every log event at any level (capture_logs keeps the configured level filter)."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            yield logs
    finally:
        structlog.configure(**old)


def options(**kw: Any) -> AgentOptions:
    kw.setdefault("pressure_report_delay", 1000.0)
    kw.setdefault("backoff_initial", 0.01)
    kw.setdefault("backoff_max", 0.04)
    return AgentOptions(vm_id="vm1", **kw)


@contextlib.asynccontextmanager
async def running(agent: GuestAgent) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- pure helpers -----------------------------------------------------------------------


def test_pressure_report_delay_is_seconds_turned_into_status_calls() -> None:
    assert pressure_report_calls(45, 1.0) == 45
    assert pressure_report_calls(45, 0.5) == 90
    assert pressure_report_calls(1, 0.3) == 4
    assert pressure_report_calls(0, 0.2) == 0


def test_guest_config_takes_the_layout_and_the_options() -> None:
    opts = options(
        strategy="going-online",
        driver_mode="fixed",
        auto_online="online_movable",
        udev_online="online",
        onlining_delay=0.5,
        status_interval=0.5,
        pressure_report_delay=10,
    )
    cfg = opts.guest_config(Layout("vm1", 8 * BLOCK, 64 * BLOCK, BLOCK))
    assert (cfg.vm_id, cfg.boot_pages, cfg.block_size_bytes) == ("vm1", 8 * BLOCK, 128 << 20)
    assert (cfg.strategy, cfg.driver_mode) == ("going-online", "fixed")
    assert (cfg.auto_online_blocks, cfg.udev_online_type, cfg.onlining_delay) == (
        "online_movable",
        "online",
        0.5,
    )
    assert (cfg.status_interval, cfg.pressure_report_delay) == (0.5, 20)


def test_access_batcher_merges_per_kind_and_reuses_trans_ids() -> None:
    b = AccessBatcher(0.05)
    assert not b and b.deadline is None
    b.add(dm.AccessReport(7, (dm.PageRange(100, 10),), "allocate"), now=1.0)
    b.add(dm.AccessReport(8, (dm.PageRange(110, 5), dm.PageRange(300, 1)), "allocate"), now=1.02)
    b.add(dm.AccessReport(9, (dm.PageRange(50, 1),), "dump"), now=1.03)
    assert b.deadline == pytest.approx(1.05)
    assert not b.due(1.04) and b.due(1.05)
    out = b.take()
    assert out == [
        dm.AccessReport(7, (dm.PageRange(100, 15), dm.PageRange(300, 1)), "allocate"),
        dm.AccessReport(8, (dm.PageRange(50, 1),), "dump"),
    ]
    assert not b and b.deadline is None


def test_access_batcher_splits_at_510_ranges_and_24_bits() -> None:
    b = AccessBatcher(0.05)
    b.add(dm.AccessReport(1, tuple(dm.PageRange(2 * i, 1) for i in range(510)), "allocate"), 0)
    b.add(
        dm.AccessReport(2, tuple(dm.PageRange(5000 + 2 * i, 1) for i in range(10)), "allocate"), 0
    )
    b.add(dm.AccessReport(3, (dm.PageRange(1 << 30, dm.MAX_PAGE_CNT),), "allocate"), 0)
    b.add(dm.AccessReport(4, (dm.PageRange((1 << 30) + dm.MAX_PAGE_CNT, 5),), "allocate"), 0)
    out = b.take()
    assert [m.trans_id for m in out] == [1, 2]
    assert [len(m.ranges) for m in out] == [510, 12]
    assert out[1].ranges[-2:] == (
        dm.PageRange(1 << 30, dm.MAX_PAGE_CNT),
        dm.PageRange((1 << 30) + dm.MAX_PAGE_CNT, 5),
    )


# -- the adapter -----------------------------------------------------------------------------


async def test_attach_comes_first_and_the_guest_is_built_from_the_layout() -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(status_interval=0.5), transport)
    async with running(agent):
        link = await asyncio.wait_for(transport.links.get(), 5.0)
        first = await asyncio.wait_for(link.to_host.get(), 5.0)
        assert first.WhichOneof("msg") == "attach"
        assert first.attach.vm_id == "vm1" and not first.attach.HasField("state")
        await asyncio.sleep(0.05)
        assert agent.vm is None and not agent.attached.is_set()
        link.to_host.put_nowait(first)  # let a FakeHost answer it
        host = FakeHost(link)
        await asyncio.wait_for(agent.attached.wait(), 5.0)
        assert agent.vm is not None
        assert agent.vm.config.boot_pages == CONFIG.boot_pages
        assert agent.vm.config.status_interval == 0.5
        assert agent.vm.driver.status_interval == 0.5
        await host.negotiated()
        assert isinstance(host.received[0], dm.VersionRequest)
        assert isinstance(host.received[1], dm.CapabilitiesReport)


async def test_hot_add_with_partial_backing_over_the_stream() -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(udev_online="online_movable"), transport)
    async with running(agent):
        host = await next_host(transport)
        await host.negotiated()
        host.send(host.session.hot_add(4 * BLOCK, BLOCK + BLOCK // 4, time.monotonic()))
        await wait_until(lambda: host.of(dm.HotAddResponse), what="hot-add response")
        assert host.of(dm.HotAddResponse)[0].page_count == BLOCK + BLOCK // 4
        assert agent.vm is not None
        assert agent.vm.mm.count_pages(PAGE_OFFLINE) == 3 * BLOCK // 4
        assert host.session.protocol_errors == []


async def test_host_reset_renegotiates_on_the_same_stream() -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(), transport)
    async with running(agent):
        host = await next_host(transport)
        await host.negotiated()
        host.session.reset()
        notice = dm_pb2.ProtocolErrorNotice(kind="version-order", message="x", action="reset")
        host.link.to_guest.put_nowait(dm_pb2.HostToGuest(error=notice))
        await wait_until(lambda: len(host.of(dm.VersionRequest)) == 2, what="new version request")
        await host.negotiated()
        assert transport.opened == 1
        assert host.session.protocol_errors == []


async def test_reconnect_reattaches_with_memory_state_and_keeps_the_guest() -> None:
    transport = FakeTransport()
    with debug_logs() as logs:
        agent = GuestAgent(options(udev_online="online_movable"), transport)
        async with running(agent):
            host = await next_host(transport)
            await host.negotiated()
            host.send(host.session.hot_add(2 * BLOCK, BLOCK, time.monotonic()))
            await wait_until(lambda: host.of(dm.HotAddResponse), what="hot-add response")
            await host.negotiated()
            host.send(host.session.balloon(1024, time.monotonic()))
            await wait_until(lambda: host.of(dm.BalloonResponse), what="balloon response")
            vm = agent.vm
            assert vm is not None
            expected = memory_state(vm)

            transport.refuse = [LinkClosed("refused", grpc.StatusCode.UNAVAILABLE)] * 2
            host.stop()
            host.link.break_()
            again = await next_host(transport)
            await again.negotiated()
            assert agent.vm is vm and agent.attach_count == 2
            assert again.attach is not None and again.attach.HasField("state")
            assert again.attach.state == expected
            assert [(r.start_page, r.page_cnt) for r in expected.regions] == [
                (CONFIG.boot_pages, 2 * BLOCK)
            ]
            assert expected.pages_added == BLOCK
            assert sum(r.page_cnt for r in expected.ballooned) == 1024
            assert transport.opened == 4
    pauses = [e["seconds"] for e in logs if e["event"] == "reconnect_backoff"]
    assert len(pauses) == 3
    # 0.01, then doubling (jittered into [d/2, d]).
    for pause, delay in zip(pauses, [0.01, 0.02, 0.04], strict=True):
        assert delay / 2 - 0.001 <= pause <= delay + 0.001
    assert all(e.get("vm") == "vm1" for e in logs if e["event"] == "disconnected")


async def test_backoff_caps_at_the_maximum() -> None:
    transport = FakeTransport()
    transport.refuse = [LinkClosed("refused", grpc.StatusCode.UNAVAILABLE)] * 6
    with debug_logs() as logs:
        agent = GuestAgent(
            options(backoff_initial=0.004, backoff_max=0.016), transport, rng=random.Random(1)
        )
        async with running(agent):
            host = await next_host(transport)
            await host.negotiated()
    pauses = [e["seconds"] for e in logs if e["event"] == "reconnect_backoff"]
    assert len(pauses) == 6
    assert max(pauses) <= 0.016 + 0.001
    assert all(p >= 0.008 - 0.001 for p in pauses[2:])


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED]
)
async def test_a_refusal_reconnecting_cannot_fix_exits_1(code: grpc.StatusCode) -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(), transport)
    task = asyncio.create_task(agent.run())
    link = await asyncio.wait_for(transport.links.get(), 5.0)
    link.break_(code)
    assert await asyncio.wait_for(task, 5.0) == 1
    assert transport.closed


async def test_a_changed_layout_on_reattach_exits_1() -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(), transport)
    task = asyncio.create_task(agent.run())
    host = await next_host(transport)
    await host.negotiated()
    host.stop()
    host.link.break_()
    bigger = VmConfig("vm1", boot_pages=16 * BLOCK, max_pages=64 * BLOCK, block_pages=BLOCK)
    await next_host(transport, bigger)
    assert await asyncio.wait_for(task, 5.0) == 1


async def test_access_reports_wait_for_the_batch_but_never_overtake() -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(access_batch=30.0), transport)
    async with running(agent):
        host = await next_host(transport)
        await host.negotiated()
        vm = agent.vm
        assert vm is not None
        vm.allocate(100, tag="a")
        vm.allocate(100, tag="a")
        agent.wake()
        await asyncio.sleep(0.1)
        assert host.of(dm.AccessReport) == []  # still batching
        host.send(host.session.balloon(512, time.monotonic()))
        await wait_until(lambda: host.of(dm.BalloonResponse), what="balloon response")
        (access,) = host.of(dm.AccessReport)
        sent = host.received
        assert sent.index(access) < sent.index(host.of(dm.BalloonResponse)[0])
        assert sum(r.page_cnt for r in access.ranges) == 200
        assert len(access.ranges) == 1  # the two allocations merged


async def test_access_reports_flush_after_the_batch_window() -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(access_batch=0.05), transport)
    async with running(agent):
        host = await next_host(transport)
        await host.negotiated()
        assert agent.vm is not None
        start = time.monotonic()
        agent.vm.allocate(64, tag="a")
        agent.wake()
        await wait_until(lambda: host.of(dm.AccessReport), what="access report")
        assert time.monotonic() - start >= 0.04
        assert host.session.violations == []


async def test_while_disconnected_channel_messages_drop_and_accesses_wait() -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(access_batch=0.0, backoff_initial=0.2, backoff_max=0.2), transport)
    async with running(agent):
        host = await next_host(transport)
        await host.negotiated()
        host.stop()
        host.link.break_()
        await wait_until(lambda: not agent.connected, what="disconnect")
        assert agent.vm is not None
        agent.vm.allocate(64, tag="while-away")
        agent.vm.driver.pressure_report_delay = 0
        agent.vm.driver.post_status()  # a channel message with no channel: dropped
        agent.wake()
        again = await next_host(transport)
        await again.negotiated()
        assert isinstance(again.received[0], dm.AccessReport)
        assert isinstance(again.received[1], dm.VersionRequest)
        assert not again.of(dm.StatusReport)
        assert agent.frames_dropped >= 1


async def test_ramp_workload_allocates_over_time_and_reports_accesses() -> None:
    transport = FakeTransport()
    spec = WorkloadSpec.parse("ramp:0:64M:0.3")
    agent = GuestAgent(options(workload=spec), transport)
    async with running(agent):
        host = await next_host(transport)
        await host.negotiated()
        assert agent.workload is not None
        await wait_until(lambda: agent.workload and agent.workload.allocated >= 64 * 256)
        await wait_until(
            lambda: sum(r.page_cnt for m in host.of(dm.AccessReport) for r in m.ranges) >= 64 * 256,
            what="access reports",
        )


async def test_sysfs_tree_follows_changes_at_most_every_100_ms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[float] = []
    real = write_sysfs_tree

    def counting(mm: Any, root: Path) -> None:
        writes.append(time.monotonic())
        real(mm, root)

    monkeypatch.setattr("guest.agent.write_sysfs_tree", counting)
    transport = FakeTransport()
    agent = GuestAgent(options(sysfs_dir=tmp_path), transport)
    state = tmp_path / "sys/devices/system/memory/memory8/state"
    async with running(agent):
        host = await next_host(transport)
        await host.negotiated()
        await wait_until(lambda: writes, what="first sysfs write")
        host.send(host.session.hot_add(2 * BLOCK, 2 * BLOCK, time.monotonic()))
        await wait_until(state.exists, what="memory8 in sysfs")
        assert state.read_text() == "offline\n"
        vm = agent.vm
        assert vm is not None
        for _ in range(5):  # five changes in a burst
            vm.online_block(8, "online_movable")
            vm.offline_block(8)
            agent.state_changed()
            await asyncio.sleep(0.005)
        vm.online_block(8, "online_movable")
        agent.state_changed()
        await wait_until(lambda: state.read_text() == "online\n", what="memory8 online in sysfs")
        gaps = [b - a for a, b in itertools.pairwise(writes)]
        assert all(g >= 0.095 for g in gaps), gaps


def test_an_inline_answer_wakes_the_pump_only_for_something_due_before_it(
    tmp_path: Path,
) -> None:
    agent = GuestAgent(options(sysfs_dir=tmp_path), FakeTransport())
    agent._build(Layout("vm1", CONFIG.boot_pages, CONFIG.max_pages, CONFIG.block_pages))
    vm = agent.vm
    assert vm is not None and vm.next_deadline() is None

    def woken() -> bool:
        was = agent._wake.is_set()
        agent._wake.clear()
        return was

    # The pump wrote sysfs at 1.0; a change answered inline waits for the 100 ms limit,
    # and the pump already sleeps until then: no wake-up per answer.
    agent._sysfs_written_at, agent._sysfs_dirty = 1.0, True
    agent._pump_wakes_at = 1.0 + SYSFS_MIN_INTERVAL
    agent._wake_if_sooner()
    assert not woken()
    # A pump asleep until woken (or later than the rewrite) is woken for it.
    for later in (None, 5.0):
        agent._pump_wakes_at = later
        agent._wake_if_sooner()
        assert woken()
    # A rewrite the limit allows now is due now.
    agent._pump_wakes_at, agent._sysfs_written_at = 5.0, -1.0
    agent._wake_if_sooner()
    assert woken()
    # Nothing to do: the pump sleeps on.
    agent._sysfs_dirty, agent._pump_wakes_at = False, None
    agent._wake_if_sooner()
    assert not woken()

    # A guest timer before the pump's wake-up wakes it; one after does not.
    def timer() -> Any:
        yield Sleep(2.0)

    vm.scheduler.spawn("timer", timer())
    vm.run_until(0.0)
    assert vm.next_deadline() == 2.0
    agent._pump_wakes_at = 3.0
    agent._wake_if_sooner()
    assert woken()
    agent._pump_wakes_at = 2.0
    agent._wake_if_sooner()
    assert not woken()


async def test_a_dm_frame_is_delivered_under_the_step_lock() -> None:
    transport = FakeTransport()
    agent = GuestAgent(options(udev_online="online_movable"), transport)
    async with running(agent):
        host = await next_host(transport)
        await host.negotiated()
        received = agent.frames_received
        async with agent._step_lock:  # a step in progress (the pump's)
            host.send(host.session.hot_add(BLOCK, BLOCK, time.monotonic()))
            await asyncio.sleep(0.05)
            # Not delivered while the step runs: frames reach the guest one step at a time.
            assert agent.frames_received == received
            assert agent.vm is not None and not agent.vm.driver.ha_regions
        await wait_until(lambda: host.of(dm.HotAddResponse), what="hot-add response")
        assert agent.frames_received == received + 1
