"""HvBalloon.renegotiate / GuestVm.renegotiate: the channel starts over, the memory stays.

What the guest agent needs when the host resets the session (``error`` with action
``reset``) or a new stream replaces a broken one; and the status thread paced by a
status interval below one second.
"""

from __future__ import annotations

from typing import Any

from guest.drivers.hv_balloon import DM_INIT_ERROR, DM_INITIALIZED, DM_INITIALIZING
from guest.vm import GuestConfig, GuestVm
from memhp.dm import (
    DYNMEM_PROTOCOL_VERSION_3,
    AccessReport,
    CapabilitiesReport,
    CapabilitiesResponse,
    DmMessage,
    HotAddRequest,
    HotAddResponse,
    PageRange,
    StatusReport,
    VersionRequest,
    VersionResponse,
)

BLOCK = 32_768
BOOT = 8 * BLOCK


def make(**kw: Any) -> tuple[GuestVm, list[str]]:
    events: list[str] = []
    kw.setdefault("pressure_report_delay", 10**9)
    g = GuestVm(GuestConfig("vm", boot_pages=BOOT, **kw), on_event=lambda k, d: events.append(k))
    g.start()
    return g, events


def negotiate(g: GuestVm) -> list[DmMessage]:
    """Answer the version request and the capabilities; returns anything else sent."""
    g.run_until(g.now)
    (ver,) = g.drain_outbox()
    assert isinstance(ver, VersionRequest) and ver.version == DYNMEM_PROTOCOL_VERSION_3
    g.deliver(VersionResponse(ver.trans_id, True))
    g.run_until(g.now)
    out = g.drain_outbox()
    caps = out.pop(0)
    assert isinstance(caps, CapabilitiesReport)
    g.deliver(CapabilitiesResponse(caps.trans_id, True))
    g.run_until(g.now)
    assert g.driver.state == DM_INITIALIZED
    return out + g.drain_outbox()


def test_renegotiate_starts_the_probe_again_from_version_2() -> None:
    g, events = make()
    negotiate(g)
    g.run_until(3.0)
    g.renegotiate()
    assert g.driver.state == DM_INITIALIZING
    assert "renegotiate" in events
    negotiate(g)
    assert events.count("negotiated") == 2


def test_renegotiate_keeps_one_status_thread() -> None:
    g, _ = make(pressure_report_delay=0)
    negotiate(g)
    g.run_until(2.5)
    g.drain_outbox()
    g.renegotiate()
    negotiate(g)
    g.drain_outbox()
    start = g.now
    times: list[float] = []
    for i in range(1, 41):
        g.run_until(start + i / 4)
        times += [g.now for m in g.drain_outbox() if isinstance(m, StatusReport)]
    assert g.scheduler.tasks.get("hv_balloon:status") == 1
    assert len(times) == 10  # one a second, not two threads' worth


def test_old_probe_timing_out_does_not_break_the_new_negotiation() -> None:
    g, events = make()
    g.run_until(0)
    g.drain_outbox()  # the version request nobody answers
    g.run_until(1.0)
    g.renegotiate()
    # The old probe wakes up with the new one, but sends nothing.
    assert not [m for m in negotiate(g) if isinstance(m, CapabilitiesReport)]
    g.run_until(20.0)  # the first probe's 5 s wait is long over
    assert g.driver.state == DM_INITIALIZED
    assert "probe_failed" not in events
    assert g.driver.state != DM_INIT_ERROR


def test_hot_add_in_flight_sends_no_response_after_renegotiate() -> None:
    g, events = make()
    negotiate(g)
    region = PageRange(BOOT, 2 * BLOCK)
    g.deliver(HotAddRequest(100, region, region))
    g.run_until(g.now + 0.1)  # memory8 added, the work waits for it to be onlined
    assert 8 in g.mm.blocks
    g.renegotiate()
    negotiate(g)
    g.online_block(8, "online_movable")
    g.run_until(g.now + 0.1)
    g.online_block(9, "online_movable")
    g.run_until(g.now + 0.1)
    assert not [m for m in g.drain_outbox() if isinstance(m, HotAddResponse)]
    assert "hot_add_stale" in events
    # The memory work itself finished: regions, blocks and counters are all there.
    assert g.driver.counters.num_pages_added == 2 * BLOCK
    assert g.driver.ha_regions[0].covered_end_pfn == BOOT + 2 * BLOCK
    assert g.driver.state == DM_INITIALIZED


def test_renegotiate_drops_channel_messages_but_keeps_access_reports() -> None:
    g, _ = make()
    negotiate(g)
    g.allocate(64)  # an access report in the outbox
    g.driver.post_status()
    g.driver.pressure_report_delay = 0
    g.driver.post_status()
    before = g.driver.outbox
    assert any(isinstance(m, StatusReport) for m in before)
    g.renegotiate()
    g.run_until(g.now)
    out = g.drain_outbox()
    assert [type(m) for m in out] == [AccessReport, VersionRequest]


def test_status_interval_below_a_second_paces_reports() -> None:
    g, _ = make(pressure_report_delay=0, status_interval=0.25)
    negotiate(g)
    g.drain_outbox()
    times: list[float] = []
    for i in range(1, 17):
        g.run_until(i / 8)
        times += [g.now for m in g.drain_outbox() if isinstance(m, StatusReport)]
    assert times == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
