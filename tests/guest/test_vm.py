"""guest.vm.GuestVm: configuration, sysfs-like user space, fault injection and workloads."""

from __future__ import annotations

import contextlib
import errno
import re
from typing import Any

import pytest

from guest.drivers.hv_balloon import DM_INITIALIZED
from guest.mm.errors import MemoryHotplugError
from guest.mm.memory import PHASE_CALLBACKS_DONE, PHASE_WINDOW, MemoryBlock
from guest.mm.pages import BUDDY, UNINIT
from guest.vm import GuestConfig, GuestVm
from memhp.dm import (
    CapabilitiesResponse,
    DmMessage,
    HotAddRequest,
    HotAddResponse,
    PageRange,
    VersionResponse,
)

MIB = 256
BLOCK = 128 * MIB
BOOT = 32 * BLOCK  # 4 GiB
R = BOOT


def guest(**kw: Any) -> tuple[GuestVm, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    kw.setdefault("pressure_report_delay", 10**9)
    g = GuestVm(
        GuestConfig("vm", boot_pages=BOOT, **kw),
        on_event=lambda kind, data: events.append((kind, data)),
    )
    g.start()
    g.run_until(0)
    (ver,) = g.drain_outbox()
    g.deliver(VersionResponse(ver.trans_id, True))
    g.run_until(0)
    (caps,) = g.drain_outbox()
    g.deliver(CapabilitiesResponse(caps.trans_id, True))
    g.run_until(0)
    assert g.driver.state == DM_INITIALIZED
    return g, events


def response(g: GuestVm, limit: float = 100.0) -> HotAddResponse:
    while True:
        g.run_until(g.now)
        out: list[DmMessage] = [m for m in g.drain_outbox() if isinstance(m, HotAddResponse)]
        if out:
            (resp,) = out
            assert isinstance(resp, HotAddResponse)
            return resp
        deadline = g.next_deadline()
        assert deadline is not None and deadline <= limit
        g.run_until(deadline)


def kinds(g: GuestVm, start: int, end: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for s, e, st in g.mm.pages.runs(start, end):
        out[st.kind] = out.get(st.kind, 0) + e - s
    return out


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"auto_online_blocks": "sometimes"}, "auto_online", "sometimes"),
        ({"udev_online_type": "offline"}, "udev_online", "offline"),
        ({"udev_online_type": "online_fast"}, "udev_online", "online_fast"),
        ({"onlining_delay": -0.5}, "onlining_delay", None),
    ],
)
def test_guest_config_validation_names_the_field(
    kwargs: dict[str, Any], field: str, value: str | None
) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: ") as err:
        GuestConfig("vm", boot_pages=BOOT, **kwargs)
    if value is not None:
        assert repr(value) in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"auto_online_blocks": "online_movable"},
        {"udev_online_type": "online_kernel", "onlining_delay": 0.0},
        {"udev_online_type": None},
    ],
)
def test_guest_config_accepts_valid_values(kwargs: dict[str, Any]) -> None:
    GuestConfig("vm", boot_pages=BOOT, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"strategy": "hope"}, r"strategy"),
        ({"driver_mode": "downstream"}, r"driver.mode"),
    ],
)
def test_guest_vm_rejects_unknown_strategy_and_mode(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as err:
        GuestVm(GuestConfig("vm", boot_pages=BOOT, **kwargs))
    assert repr(next(iter(kwargs.values()))) in str(err.value)


def test_guest_vm_rejects_boot_memory_not_in_whole_blocks() -> None:
    with pytest.raises(MemoryHotplugError) as err:
        GuestVm(GuestConfig("vm", boot_pages=BOOT + 1))
    assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_guest_config_rejects_non_positive_status_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="status_interval"):
        GuestConfig("vm", boot_pages=BOOT, status_interval=interval)


def test_guest_config_rejects_nan_onlining_delay() -> None:
    with pytest.raises(ValueError, match="onlining_delay"):
        GuestConfig("vm", boot_pages=BOOT, onlining_delay=float("nan"))


# -- notifier error injection ------------------------------------------------------------------


def test_going_online_error_fails_online_and_leaves_block_offline() -> None:
    g, _ = guest()
    g.mm.add_memory(R, BLOCK)
    g.inject_notifier_error("MEM_GOING_ONLINE", errno.ENOMEM, count=1)
    with pytest.raises(MemoryHotplugError) as err:
        g.online_block(32)
    assert err.value.errno == errno.ENOMEM
    block = g.mm.blocks[32]
    assert block.state == "offline" and block.zone is None
    assert not g.mm.online_section_nr(32)
    assert kinds(g, R, R + BLOCK) == {UNINIT: BLOCK}
    assert g.mm.zones["Normal"].span_end == BOOT
    # count=1: the next attempt goes through.
    g.online_block(32)
    assert block.state == "online"
    assert kinds(g, R, R + BLOCK) == {BUDDY: BLOCK}


def test_injected_errno_sign_does_not_matter() -> None:
    g, _ = guest()
    g.mm.add_memory(R, BLOCK)
    g.inject_notifier_error("MEM_GOING_ONLINE", -errno.EBUSY)
    for _ in range(2):
        with pytest.raises(MemoryHotplugError) as err:
            g.online_block(32)
        assert err.value.errno == errno.EBUSY


def test_going_offline_error_keeps_block_online() -> None:
    g, _ = guest()
    g.mm.add_memory(R, BLOCK)
    g.online_block(32, "online_movable")
    g.inject_notifier_error("MEM_GOING_OFFLINE", errno.EAGAIN)
    with pytest.raises(MemoryHotplugError) as err:
        g.offline_block(32)
    assert err.value.errno == errno.EAGAIN
    assert g.mm.blocks[32].state == "online"
    assert kinds(g, R, R + BLOCK) == {BUDDY: BLOCK}
    assert g.mm.check() == []


def test_unknown_notifier_action_is_rejected() -> None:
    g, _ = guest()
    with pytest.raises(ValueError, match="MEM_GOING_ONLINE"):
        g.inject_notifier_error("MEM_GONE", errno.ENOMEM)


def test_udev_onlining_failure_is_an_event_and_hot_add_does_not_wait_5s() -> None:
    g, events = guest(udev_online_type="online", onlining_delay=0.5)
    g.inject_notifier_error("MEM_GOING_ONLINE", errno.ENOMEM)
    g.deliver(HotAddRequest(1, PageRange(R, 2 * BLOCK), PageRange(R, 2 * BLOCK)))
    resp = response(g)
    # MEM_CANCEL_ONLINE completes hv_balloon's wait just like MEM_ONLINE.
    assert g.now == pytest.approx(1.0)
    assert (resp.page_count, resp.result) == (2 * BLOCK, 1)
    failed = [d for k, d in events if k == "online_failed"]
    assert [(d["block"], d["errno"]) for d in failed] == [(32, "ENOMEM"), (33, "ENOMEM")]
    assert all(g.mm.blocks[b].state == "offline" for b in (32, 33))
    assert g.driver.counters.num_pages_onlined == 0


# -- slow onlining ------------------------------------------------------------------------------


def test_slow_onlining_runs_as_a_task() -> None:
    g, events = guest()
    g.mm.add_memory(R, 2 * BLOCK)
    g.inject_slow_onlining(3.0, count=1)
    g.run_until(10)
    g.online_block(32)
    block = g.mm.blocks[32]
    assert block.state == "offline"
    assert kinds(g, R, R + BLOCK) == {UNINIT: BLOCK}  # nothing ran yet
    g.run_until(10)
    # The callbacks ran (pages are free), but the sections are not online yet.
    assert kinds(g, R, R + BLOCK) == {BUDDY: BLOCK}
    assert block.state == "offline"
    assert not g.mm.online_section_nr(32)
    assert not g.busy  # user space does not hold up protocol steps
    assert g.scheduler.tasks.get("online:memory32") == 1
    g.run_until(12.999)
    assert block.state == "offline" and not g.mm.online_section_nr(32)
    assert not [k for k, _ in events if k == "block_onlined"]
    g.run_until(13.0)
    assert block.state == "online" and g.mm.online_section_nr(32)
    assert [d["block"] for k, d in events if k == "block_onlined"] == [32]
    # count=1: the next onlining is immediate again.
    g.online_block(33)
    assert g.mm.blocks[33].state == "online"


def test_hot_add_waits_for_the_hotplug_lock_held_by_a_slow_onlining() -> None:
    g, _ = guest()
    g.mm.add_memory(R + 8 * BLOCK, BLOCK)
    g.inject_slow_onlining(2.0, count=1)
    g.online_block(40)
    g.run_until(0)
    assert g.mm.hotplug_lock_holder == "online memory40"
    g.deliver(HotAddRequest(1, PageRange(R, BLOCK), PageRange(R, BLOCK)))
    g.run_until(1.99)
    assert 32 not in g.mm.blocks  # add_memory waits for mem_hotplug_lock
    assert g.busy or g.scheduler.tasks.get("hv_balloon:hot_add") == 1
    g.run_until(2.0)
    assert g.mm.blocks[40].state == "online"
    resp = response(g)
    # Added just after the lock was released (1 ms retries). As in Linux, ol_waitevent was
    # re-armed before add_memory blocked, so block 40's MEM_ONLINE already completed it:
    # no 5 s wait for block 32, which stays offline.
    assert 2.0 < g.now <= 2.002
    assert resp.page_count == BLOCK
    assert g.mm.blocks[32].state == "offline"


def test_sysfs_write_during_slow_onlining_waits_for_the_lock() -> None:
    g, _ = guest()
    g.mm.add_memory(R, 2 * BLOCK)
    g.inject_slow_onlining(3.0, count=1)
    g.online_block(32)
    g.run_until(0)
    with contextlib.suppress(MemoryHotplugError):  # refusing the write cleanly would do too
        g.online_block(33)
    g.run_until(5)
    assert g.mm.blocks[32].state == "online"


# -- udev and busy ------------------------------------------------------------------------------


def test_udev_onlines_each_new_block_after_its_delay() -> None:
    g, events = guest(udev_online_type="online_movable", onlining_delay=0.75)
    g.deliver(HotAddRequest(1, PageRange(R, 2 * BLOCK), PageRange(R, 2 * BLOCK)))
    g.run_until(0)
    assert g.busy
    assert g.mm.blocks[32].state == "offline"
    g.run_until(0.75)
    assert g.mm.blocks[32].state == "online" and g.mm.blocks[32].zone == "Movable"
    assert 33 in g.mm.blocks and g.mm.blocks[33].state == "offline"
    g.run_until(1.5)
    assert g.mm.blocks[33].state == "online"
    assert not g.busy
    onlined = [(d["block"], d["online_type"]) for k, d in events if k == "block_onlined"]
    assert onlined == [(32, "online_movable"), (33, "online_movable")]


def test_busy_only_for_protocol_work() -> None:
    g, _ = guest()
    assert not g.busy
    g.deliver(HotAddRequest(1, PageRange(R, BLOCK), PageRange(R, BLOCK)))
    assert g.busy
    g.run_until(4.9)
    assert g.busy  # waiting for the block to be onlined
    g.run_until(5.0)
    assert not g.busy
    assert g.next_deadline() is not None  # the status thread keeps ticking


# -- workloads ------------------------------------------------------------------------------------


def test_allocate_and_free() -> None:
    g, events = guest()
    free = g.mm.free_pages
    assert g.allocate(1024, order=9, tag="w") == 1024
    assert g.mm.free_pages == free - 1024
    assert g.free("w", 24) == 24
    assert g.free("w") == 1000
    assert g.mm.free_pages == free
    assert [k for k, _ in events].count("allocated") == 1
    with pytest.raises(ValueError, match="zone"):
        g.allocate(1, zone="DMA")
    with pytest.raises(ValueError, match="zone"):
        g.allocate_in_window(1, zone="DMA")


def test_allocation_in_window_only_hits_its_block() -> None:
    g, events = guest(udev_online_type="online_movable")
    seen: list[tuple[int, str, int]] = []

    def observer(block: MemoryBlock, phase: str) -> None:
        seen.append((block.id, phase, len(g.mm.allocations.get("racer", ()))))

    g.phase_observers.append(observer)
    armed = g.allocate_in_window(3 * BLOCK, zone="Movable", tag="racer", block=33)
    g.deliver(HotAddRequest(1, PageRange(R, 2 * BLOCK), PageRange(R, 2 * BLOCK)))
    response(g)
    assert armed.done
    # Block 32's window passed untouched; block 33's window took all of ZONE_MOVABLE.
    assert seen == [
        (32, PHASE_CALLBACKS_DONE, 0),
        (32, PHASE_WINDOW, 0),
        (33, PHASE_CALLBACKS_DONE, 0),
        (33, PHASE_WINDOW, 0),
    ]
    assert sum(e - s for s, e in armed.result) == 2 * BLOCK
    assert g.window_allocations == []
    assert [d["pages"] for k, d in events if k == "allocated_in_window"] == [2 * BLOCK]
    assert kinds(g, R, R + 2 * BLOCK) == {"allocated": 2 * BLOCK}


def test_memmap_on_memory_reserves_the_start_of_each_block() -> None:
    g, _ = guest(memmap_on_memory=True)
    g.mm.add_memory(R, 2 * BLOCK, owner="dimm")
    g.online_block(33)
    memmap = BLOCK // 64  # 64-byte struct page per 4 KiB page
    for start in (R, R + BLOCK):
        assert kinds(g, start, start + memmap) == {"reserved": memmap}
    assert kinds(g, R + memmap, R + BLOCK) == {UNINIT: BLOCK - memmap}
    assert kinds(g, R + BLOCK + memmap, R + 2 * BLOCK) == {BUDDY: BLOCK - memmap}


def test_error_messages_mention_the_offending_value() -> None:
    with pytest.raises(ValueError) as err:
        GuestConfig("vm", boot_pages=BOOT, auto_online_blocks="Online")
    assert re.search(r"offline, online, online_kernel, online_movable", str(err.value))
