"""guest.drivers.virtio_mem: the Linux driver's flows against the QEMU device model.

Every test runs the real device (:class:`hypervisor.virtio_mem_host.VirtioMemDevice`)
and a guest (:class:`guest.vm.GuestVm`) wired in memory (``tests.guest.virtio_helpers``),
and checks the invariants of both sides as it goes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest.drivers.virtio_mem import (
    EAGAIN_LIMIT,
    MB_UNUSED,
    OWNER_FAKE_OFFLINE,
    OWNER_NEVER_ONLINED,
    VIRTIO_MEM_RETRY_TIMER_MIN_MS,
    VirtioMemProbeError,
    bit_runs,
)
from guest.introspection import set_block_state
from guest.mm.errors import MemoryHotplugError
from guest.mm.memory import HotplugLockBusy, MemoryBlock
from guest.mm.notifier import MEM_GOING_OFFLINE, NOTIFY_BAD, MemoryAction, MemoryNotify
from guest.mm.pages import ALLOCATED, BUDDY, PAGE_OFFLINE
from guest.virtio_mem_invariants import check_virtio_mem
from guest.vm import GuestConfig, GuestVm
from hypervisor.virtio_mem_host import RefusalKind, VirtioMemDevice
from memhp.virtio_mem import (
    PLUG,
    UNPLUG,
    UNPLUG_ALL,
    AccessReport,
    VirtioMemConfig,
    VirtioMemRequest,
)
from tests.guest.virtio_helpers import ADDR, BS, FIRST, GIB, MB, MIB, PAGES_PER_MIB, Rig, rig

SB_PAGES = 1024  # a 4 MiB subblock
MB_PAGES = MB >> 12


def block_pfn(block: int, subblock: int = 0) -> int:
    return block * MB_PAGES + subblock * SB_PAGES


def page_offline(r: Rig, owner: str, block: int) -> int:
    start = block_pfn(block)
    return sum(
        e - s
        for s, e, st in r.mm.pages.runs(start, start + MB_PAGES)
        if st.kind == PAGE_OFFLINE and st.owner == owner
    )


def requests(r: Rig, kind: object) -> list[tuple[int, int]]:
    return [(q.addr, q.nb_blocks) for q in r.requests if q.type == kind]


# -- virtio_mem_init: the mode ---------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "memory_block", "force_bbm", "mode", "unit", "threshold"),
    [
        (BS, MB, False, "sbm", 4 * MIB, GIB),  # subblock = max(4 MiB, 2 MiB)
        (8 * MIB, MB, False, "sbm", 8 * MIB, GIB),  # the device block wins when larger
        (BS, 2 * GIB, False, "sbm", 4 * MIB, 4 * GIB),  # threshold: two memory blocks
        (MB, MB, False, "bbm", MB, GIB),  # subblock not below the memory block
        (GIB, MB, False, "bbm", GIB, 2 * GIB),  # BBM: at least two big blocks
        (BS, MB, True, "bbm", MB, GIB),  # force_bbm: big block = memory block
    ],
)
def test_mode_is_chosen_as_linux_chooses(
    block_size: int, memory_block: int, force_bbm: bool, mode: str, unit: int, threshold: int
) -> None:
    r = rig(
        block_size=block_size,
        memory_block=memory_block,
        boot=2 * memory_block,
        region=8 * GIB,
        virtio_mem_force_bbm=force_bbm,
    )
    d = r.driver
    assert d.mode == mode
    assert (d.sb_size if mode == "sbm" else d.bb_size) == unit
    if mode == "sbm":
        assert d.sbs_per_mb == memory_block // unit
    assert d.offline_threshold == threshold
    (probe,) = r.kinds("probe")
    assert probe["mode"] == mode
    r.assert_clean()


# -- SBM plug ---------------------------------------------------------------------------


def test_sbm_plug_plugs_before_add_memory_and_keeps_unplugged_subblocks_fake_offline() -> None:
    r = rig()
    seen: list[tuple[int, int, int]] = []

    def at_add(block: MemoryBlock) -> None:
        # add_memory: the subblocks are plugged on the device and in the bitmap already.
        bits = r.driver.sb_states[block.id]
        seen.append((block.id, bin(bits).count("1"), r.device.plugged.count(*_range(block))))

    r.mm.block_added_hooks.append(at_add)
    total = r.meminfo_total_mib()
    r.resize(300 * MIB)
    assert seen == [(FIRST, 32, MB_PAGES), (FIRST + 1, 32, MB_PAGES), (FIRST + 2, 11, 11 * 1024)]
    assert requests(r, PLUG) == [
        (ADDR, 64),
        (ADDR + MB, 64),
        (ADDR + 2 * MB, 22),
    ]
    assert r.device.plugged_size == r.driver.plugged_size == 300 * MIB
    assert r.driver.block_states() == {
        FIRST: "movable",
        FIRST + 1: "movable",
        FIRST + 2: "movable_partial",
    }
    assert r.meminfo_total_mib() - total == 300
    # The 21 unplugged subblocks of the partial block stay out of the buddy.
    assert page_offline(r, OWNER_NEVER_ONLINED, FIRST + 2) == 21 * SB_PAGES
    r.assert_clean()


def _range(block: MemoryBlock) -> tuple[int, int]:
    return block.start_pfn, block.end_pfn


def test_sbm_plug_fills_partial_blocks_first_and_fake_onlines_them() -> None:
    r = rig()
    r.resize(300 * MIB)
    r.requests.clear()
    total = r.meminfo_total_mib()
    r.resize(400 * MIB)
    # 21 subblocks fill block 34 (online: fake-onlined), 4 go into a new block.
    assert requests(r, PLUG) == [(ADDR + 2 * MB + 11 * 4 * MIB, 42), (ADDR + 3 * MB, 8)]
    assert r.state(FIRST + 2) == "movable"
    assert r.state(FIRST + 3) == "movable_partial"
    assert page_offline(r, OWNER_NEVER_ONLINED, FIRST + 2) == 0
    assert r.meminfo_total_mib() - total == 100
    r.assert_clean()


def test_sbm_plug_into_an_offline_partial_block_does_not_online_it() -> None:
    r = rig(auto_online="offline")
    r.resize(200 * MIB)
    assert r.driver.block_states() == {FIRST: "offline", FIRST + 1: "offline_partial"}
    assert r.driver.offline_size == 2 * MB
    total = r.meminfo_total_mib()
    r.resize(256 * MIB)
    assert r.driver.block_states() == {FIRST: "offline", FIRST + 1: "offline"}
    assert r.meminfo_total_mib() == total  # nothing onlined
    r.guest.online_block(FIRST + 1, "online_kernel")
    assert r.state(FIRST + 1) == "kernel"
    assert r.driver.offline_size == MB
    r.assert_clean()


def test_plugging_is_in_subblocks() -> None:
    # 250 MiB is a multiple of the 2 MiB device block, not of the 4 MiB subblock.
    r = rig()
    r.resize(250 * MIB)
    assert r.device.plugged_size == 248 * MIB
    assert r.driver.requested_size == 250 * MIB
    assert r.kinds("wq_done")[-1]["rc"] == 0
    r.assert_clean()


def test_offline_threshold_stops_adding_until_memory_is_onlined() -> None:
    r = rig(auto_online="offline")
    r.resize(2 * GIB)
    # Eight offline blocks = 1 GiB: the ninth would pass the threshold (-ENOSPC, no timer).
    assert r.device.plugged_size == GIB
    assert r.driver.offline_size == GIB
    assert r.kinds("wq_done")[-1]["rc"] == -errno.ENOSPC
    assert r.driver.retry_timer_deadline is None
    for i in range(3):
        r.guest.online_block(FIRST + i, "online_movable")
        r.pump()
    # Not yet half the threshold onlined: nothing more.
    assert r.device.plugged_size == GIB
    r.guest.online_block(FIRST + 3, "online_movable")
    r.pump()
    # MEM_ONLINE with half the threshold free again: four more blocks.
    assert r.device.plugged_size == GIB + 4 * MB
    assert r.driver.offline_size == GIB
    r.assert_clean()


# -- SBM unplug -------------------------------------------------------------------------


def test_sbm_unplug_takes_offline_blocks_first_highest_first() -> None:
    r = rig(auto_online="offline")
    r.resize(512 * MIB)
    r.guest.online_block(FIRST, "online_movable")
    r.guest.online_block(FIRST + 1, "online_kernel")
    r.pump()
    r.requests.clear()
    r.resize(504 * MIB)
    # Two subblocks from the highest offline block, right to left, in one request.
    assert requests(r, UNPLUG) == [(ADDR + 3 * MB + 30 * 4 * MIB, 4)]
    assert r.state(FIRST + 3) == "offline_partial"
    r.resize(376 * MIB)
    # The partial block first (emptied and removed), then the next offline one.
    assert r.driver.block_states() == {
        FIRST: "movable",
        FIRST + 1: "kernel",
        FIRST + 2: "offline_partial",
        FIRST + 3: "unused",
    }
    assert FIRST + 3 not in r.mm.blocks
    r.resize(128 * MIB)
    # Offline memory, then ZONE_MOVABLE before the kernel zone.
    assert r.driver.block_states()[FIRST] == "unused"
    assert r.state(FIRST + 1) == "kernel"
    assert FIRST not in r.mm.blocks and FIRST + 2 not in r.mm.blocks
    assert r.device.plugged_size == 128 * MIB
    r.assert_clean()


def _busy_normal_and_movable() -> Rig:
    """Block 32 online in ZONE_NORMAL full of kernel allocations, 33 in ZONE_MOVABLE in use."""
    r = rig(auto_online="offline")
    r.resize(256 * MIB)
    normal = r.mm.zones["Normal"].free_area
    r.guest.allocate(normal.allocatable_pages, tag="boot")
    r.guest.online_block(FIRST, "online_kernel")
    r.guest.online_block(FIRST + 1, "online_movable")
    r.pump()
    assert r.guest.allocate(normal.allocatable_pages, tag="kernel") == MB_PAGES
    assert r.guest.allocate(64 * PAGES_PER_MIB, zone="Movable", tag="movable") == 64 * 256
    # Room in boot memory to migrate the movable pages to.
    r.guest.free("boot", 128 * PAGES_PER_MIB)
    r.assert_clean()
    return r


def test_unplug_fails_on_busy_normal_memory_and_succeeds_in_movable() -> None:
    r = _busy_normal_and_movable()
    r.resize(0)
    # The Movable block: its allocations migrated, the block unplugged and removed.
    assert FIRST + 1 not in r.mm.blocks
    assert r.state(FIRST + 1) == "unused"
    assert r.mm.count_pages(ALLOCATED, "movable") == 64 * PAGES_PER_MIB
    assert r.mm.allocations["movable"].disjoint(block_pfn(FIRST + 1), block_pfn(FIRST + 2))
    # The Normal block: every subblock holds unmovable pages, so every one is skipped.
    assert r.state(FIRST) == "kernel"
    # Twice 32: removing the Movable block queued the work again (virtio_mem_retry),
    # and the second run found the same busy subblocks.
    assert len(r.kinds("subblock_busy")) == 64
    assert r.device.plugged_size == 128 * MIB
    assert r.kinds("wq_done")[-1]["rc"] == -errno.EBUSY
    assert r.driver.retry_timer_deadline == r.guest.now + 50
    r.assert_clean()
    # Once the kernel lets go, the retry unplugs it.
    r.guest.free("kernel")
    r.advance(50)
    assert r.device.plugged_size == 0
    assert FIRST not in r.mm.blocks
    assert r.driver.retry_timer_deadline is None
    r.assert_clean()


def test_unplug_skips_the_one_busy_subblock_of_a_kernel_block() -> None:
    r = rig(auto_online="offline")
    r.resize(128 * MIB)
    r.guest.allocate(r.mm.zones["Normal"].free_area.allocatable_pages, tag="boot")
    r.guest.online_block(FIRST, "online_kernel")
    r.guest.allocate(1, tag="slab")
    slab = next(iter(r.mm.allocations["slab"].ranges()))[0]
    busy_sb = (slab - block_pfn(FIRST)) // SB_PAGES
    r.resize(0)
    # The whole block cannot go; each subblock is tried right to left, the busy one skipped.
    assert [e["subblock"] for e in r.kinds("subblock_busy")] == [busy_sb]
    assert r.driver.sb_states[FIRST] == 1 << busy_sb
    assert r.state(FIRST) == "kernel_partial"
    assert r.device.plugged_size == 4 * MIB
    assert page_offline(r, OWNER_FAKE_OFFLINE, FIRST) == 31 * SB_PAGES
    assert r.kinds("wq_done")[-1]["rc"] == -errno.EBUSY
    r.assert_clean()


def test_unplug_without_room_to_migrate_stops_with_enomem() -> None:
    r = rig()
    r.resize(128 * MIB)
    r.guest.allocate(r.mm.zones["Normal"].free_area.allocatable_pages, tag="pin")
    r.guest.allocate(1, zone="Movable", tag="anon")
    r.resize(0)
    # alloc_contig_range of the whole block cannot migrate the page anywhere: -ENOMEM
    # ends the attempt (only -EBUSY falls back to single subblocks).
    assert r.kinds("wq_done")[-1]["rc"] == -errno.ENOMEM
    assert r.device.plugged_size == 128 * MIB
    assert r.driver.retry_timer_deadline == r.guest.now + 50
    r.assert_clean()
    r.guest.free("pin", 256)
    r.advance(50)
    assert r.device.plugged_size == 0
    assert FIRST not in r.mm.blocks
    assert r.mm.count_pages(ALLOCATED, "anon") == 1
    r.assert_clean()


# -- BUSY, NACK and the retry timer ----------------------------------------------------


def test_busy_device_is_retried_with_backoff_50_to_300_seconds() -> None:
    r = rig()
    r.device.inject_busy()
    r.resize(128 * MIB)

    def busy_runs() -> int:
        return sum(1 for w in r.kinds("wq_done") if w["rc"] == -errno.ETXTBSY)

    assert busy_runs() == 1
    for wait in (50, 100, 200, 300, 300):
        assert r.kinds("retry_timer")[-1]["seconds"] == wait
        runs = busy_runs()
        r.advance(wait - 1)
        assert busy_runs() == runs  # not yet
        r.advance(1)
        assert busy_runs() == runs + 1
    assert [t["seconds"] for t in r.kinds("retry_timer")] == [50, 100, 200, 300, 300, 300]
    assert r.device.plugged_size == 0
    assert r.state(FIRST) == "unused"
    r.device.clear_busy()
    r.advance(300)
    assert r.device.plugged_size == 128 * MIB
    assert r.driver.retry_timer_ms == VIRTIO_MEM_RETRY_TIMER_MIN_MS
    r.assert_clean()


def test_nack_after_a_concurrent_resize_is_retried_at_once() -> None:
    r = rig()
    raced: list[bool] = []

    def shrink_first(req: VirtioMemRequest) -> None:
        if req.type == PLUG and not raced:
            raced.append(True)
            # The operator shrinks the request while the plug is on its way.
            change = r.device.resize(0, r.guest.now)
            r.guest.virtio_config_changed(change.config)

    r.before_answer = shrink_first
    r.resize(128 * MIB)
    assert [e.kind for e in r.device.protocol_errors] == [RefusalKind.PLUG_PAST_REQUESTED]
    assert r.kinds("plug_failed")[0]["rc"] == -errno.EAGAIN
    assert r.device.plugged_size == r.driver.plugged_size == 0
    assert not r.driver.broken
    assert r.driver.retry_timer_deadline is None
    assert check_virtio_mem(r.mm, r.driver, r.device.plugged, r.device.plugged_size) == []


def test_endless_nack_marks_the_device_broken_after_the_guard() -> None:
    r = rig()
    # A host that lies: its config interrupt says 128 MiB, its plug rule says 0.
    r.device.resize(256 * MIB, 0.0)
    r.device.resize(0, 0.0)  # the usable region stays
    lie = dataclasses.replace(r.device.config, requested_size=128 * MIB)
    r.guest.virtio_config_changed(lie)
    r.pump()
    assert len(r.device.protocol_errors) == EAGAIN_LIMIT
    assert r.driver.broken
    assert r.kinds("broken")[0]["rc"] == -errno.EAGAIN


def test_error_answer_marks_the_device_broken() -> None:
    r = rig()

    def misplace(req: VirtioMemRequest) -> None:
        r.device.restore({**r.device.snapshot(), "usable_region_size": 0})

    r.before_answer = misplace
    r.resize(128 * MIB)
    assert r.driver.broken
    assert r.kinds("broken")[0]["rc"] == -errno.EINVAL
    # A broken device ignores further config changes.
    r.before_answer = None
    r.resize(256 * MIB)
    assert r.device.plugged_size == 0


# -- probe ---------------------------------------------------------------------------------


def test_probe_unplugs_all_when_memory_is_still_plugged() -> None:
    device = VirtioMemDevice(VirtioMemConfig(BS, 0, ADDR, 4 * GIB, 0, 0, 64 * MIB))
    device.request(VirtioMemRequest.plug(ADDR + 10 * BS, 4), 0.0)
    guest = GuestVm(GuestConfig("g", boot_pages=GIB >> 12, protocol="virtio-mem"))
    guest.attach_virtio_mem(device.config)
    r = Rig(device, guest)
    guest.start()
    r.pump()
    assert r.requests[0].type == UNPLUG_ALL
    assert r.device.plugged_size == 64 * MIB
    assert list(r.device.plugged.ranges()) == [(ADDR >> 12, (ADDR + 64 * MIB) >> 12)]
    r.assert_clean()


def test_both_protocols_fail_at_start_as_linux_does() -> None:
    guest = GuestVm(
        GuestConfig("g", boot_pages=GIB >> 12, protocol="hyperv-dm+virtio-mem"),
    )
    device = VirtioMemDevice(VirtioMemConfig(BS, 0, ADDR, 4 * GIB, 0, 0, 0))
    driver = guest.attach_virtio_mem(device.config)
    with pytest.raises(VirtioMemProbeError) as exc:
        guest.start()
    assert exc.value.errno == errno.EINVAL
    assert exc.value.message == (
        "virtio_mem virtio0: probe failed with error -22 (EINVAL): only one "
        "online_page_callback system-wide: hv_balloon already installed it; "
        "virtio_mem cannot"
    )
    # hv_balloon keeps its callback; virtio_mem left nothing registered.
    assert guest.mm.online_page_callback_owner == "hv_balloon"
    assert not driver.probed
    assert "virtio_mem:virtio0" not in guest.mm.notifier.names
    assert guest.virtio_mem_devices.devices == []


def test_protocol_checks() -> None:
    with pytest.raises(ValueError, match="protocol: must be one of"):
        GuestConfig("g", boot_pages=GIB >> 12, protocol="xen")
    plain = GuestVm(GuestConfig("g", boot_pages=GIB >> 12))
    device = VirtioMemDevice(VirtioMemConfig(BS, 0, ADDR, 4 * GIB, 0, 0, 0))
    with pytest.raises(ValueError, match="no virtio-mem device"):
        plain.attach_virtio_mem(device.config)
    virtio = GuestVm(GuestConfig("g", boot_pages=GIB >> 12, protocol="virtio-mem"))
    with pytest.raises(ValueError, match="no Hyper-V DM device"):
        _ = virtio.driver
    assert virtio.drain_outbox() == []
    with pytest.raises(ValueError, match="attach_virtio_mem before start"):
        virtio.start()
    with pytest.raises(ValueError, match="no virtio-mem device 0"):
        virtio.drain_virtio_outbox()


def test_two_devices_share_one_callback() -> None:
    guest = GuestVm(
        GuestConfig("g", boot_pages=GIB >> 12, protocol="virtio-mem", auto_online_blocks="online")
    )
    devices = [
        VirtioMemDevice(VirtioMemConfig(BS, 0, ADDR, 2 * GIB, 0, 0, 100 * MIB)),
        VirtioMemDevice(VirtioMemConfig(BS, 0, ADDR + 2 * GIB, 2 * GIB, 0, 0, 200 * MIB)),
    ]
    for d in devices:
        guest.attach_virtio_mem(d.config)
    guest.start()
    assert guest.mm.online_page_callback_owner == "virtio_mem"
    assert len(guest.virtio_mem_devices.devices) == 2
    for _ in range(100):
        guest.run_until(guest.now)
        moved = False
        for i, d in enumerate(devices):
            for msg in guest.drain_virtio_outbox(i):
                moved = True
                if isinstance(msg, VirtioMemRequest):
                    guest.deliver_virtio(d.request(msg, 0.0), d.config, device=i)
        if not moved and not guest.busy:
            break
    assert [d.plugged_size for d in devices] == [100 * MIB, 200 * MIB]
    for d, driver in zip(devices, guest.virtio_mem, strict=True):
        assert check_virtio_mem(guest.mm, driver, d.plugged, d.plugged_size) == []
    # Each device's partial block keeps its own unplugged subblocks offline.
    assert guest.virtio_mem[1].block_states() == {48: "kernel", 49: "kernel_partial"}
    guest.virtio_mem[0].remove()
    assert guest.mm.online_page_callback_owner == "virtio_mem"
    guest.virtio_mem[1].remove()
    assert guest.mm.online_page_callback_owner is None


# -- the memory notifier and the mutex ---------------------------------------------------


def test_going_online_is_refused_for_a_block_not_offline() -> None:
    r = rig(auto_online="offline")
    r.resize(128 * MIB)
    # As in the window where the driver marked an emptied block unused before removing it.
    r.driver._sbm_set_mb_state(FIRST, MB_UNUSED)
    with pytest.raises(MemoryHotplugError) as exc:
        r.guest.online_block(FIRST, "online_movable")
    assert exc.value.errno == errno.EPERM  # NOTIFY_BAD
    assert r.mm.blocks[FIRST].state == "offline"
    assert r.driver.hotplug_mutex_owner is None  # released at MEM_CANCEL_ONLINE


def test_going_offline_drops_and_cancel_retakes_the_fake_offline_references() -> None:
    r = rig()
    r.resize(100 * MIB)
    assert r.state(FIRST) == "movable_partial"
    unplugged = 7 * SB_PAGES

    def veto(action: MemoryAction, arg: MemoryNotify) -> int:
        if action == MEM_GOING_OFFLINE:
            dropped = sum(
                e - s
                for s, e, st in r.mm.pages.runs(block_pfn(FIRST), block_pfn(FIRST + 1))
                if st.kind == PAGE_OFFLINE and st.refcount == 0
            )
            assert dropped == unplugged  # virtio_mem (priority 0) ran first
            return NOTIFY_BAD
        return 0

    r.mm.notifier.register(veto, -1, name="veto")
    with pytest.raises(MemoryHotplugError):
        r.guest.offline_block(FIRST)
    runs = list(r.mm.pages.runs(block_pfn(FIRST), block_pfn(FIRST + 1)))
    assert all(st.refcount == 1 for _, _, st in runs if st.kind == PAGE_OFFLINE)
    assert r.driver.hotplug_mutex_owner is None
    r.assert_clean()
    r.mm.notifier.unregister(veto)
    r.guest.offline_block(FIRST)
    assert r.state(FIRST) == "offline_partial"
    assert r.driver.offline_size == MB
    r.guest.online_block(FIRST, "online_kernel")
    assert r.state(FIRST) == "kernel_partial"
    assert page_offline(r, OWNER_NEVER_ONLINED, FIRST) == unplugged
    r.assert_clean()


def test_user_onlining_waits_for_the_work_holding_the_mutex() -> None:
    r = rig(auto_online="offline")
    r.resize(200 * MIB)
    change = r.device.resize(300 * MIB, r.guest.now)
    r.guest.virtio_config_changed(change.config)
    (req,) = r.step_once()
    assert isinstance(req, VirtioMemRequest)
    assert req.addr == ADDR + MB + 18 * 4 * MIB  # into the offline partial block
    assert r.driver.hotplug_mutex_owner == "wq"
    # The sysfs write waits (Linux: blocks in the driver's notifier) ...
    assert r.guest.online_block(FIRST + 1, "online_movable") is False
    assert r.mm.blocks[FIRST + 1].state == "offline"
    # ... a caller bypassing the wait gets -EBUSY from the notifier instead of a race.
    with pytest.raises(MemoryHotplugError) as exc:
        r.mm.online_block(FIRST + 1, "online_movable")
    assert exc.value.errno == errno.EBUSY
    r.answer(req)
    r.advance(1)
    assert r.state(FIRST + 1) == "movable"
    assert page_offline(r, OWNER_NEVER_ONLINED, FIRST + 1) == 0
    r.assert_clean()


async def test_sysfs_state_write_waits_for_the_work_holding_the_mutex() -> None:
    r = rig(auto_online="offline")
    r.resize(200 * MIB)
    change = r.device.resize(300 * MIB, r.guest.now)
    r.guest.virtio_config_changed(change.config)
    (req,) = r.step_once()
    assert isinstance(req, VirtioMemRequest)
    assert r.driver.hotplug_mutex_owner == "wq"
    # The write would block in the driver's notifier: retried, as for mem_hotplug_lock.
    with pytest.raises(HotplugLockBusy):
        r.guest.write_block_state(FIRST + 1, "online_movable")
    # One that never reaches the notifiers fails at once, as it would.
    with pytest.raises(MemoryHotplugError) as exc:
        r.guest.write_block_state(FIRST + 1, "offline")
    assert exc.value.errno == errno.EINVAL
    write = asyncio.create_task(set_block_state(r.guest, FIRST + 1, "online_movable"))
    await asyncio.sleep(0.02)
    assert not write.done()
    assert r.mm.blocks[FIRST + 1].state == "offline"
    r.answer(req)
    r.pump()
    block = await asyncio.wait_for(write, 1.0)
    assert (block.state, block.zone) == ("online", "Movable")
    assert r.state(FIRST + 1) == "movable"
    assert r.device.plugged_size == 300 * MIB
    r.assert_clean()


# -- BBM ---------------------------------------------------------------------------------


def test_bbm_plugs_and_adds_whole_big_blocks() -> None:
    r = rig(block_size=GIB)
    total = r.meminfo_total_mib()
    r.resize(2 * GIB)
    assert requests(r, PLUG) == [(ADDR, 1), (ADDR + GIB, 1)]
    assert r.driver.block_states() == {4: "added", 5: "added"}
    assert all(r.mm.blocks[FIRST + i].state == "online" for i in range(16))
    assert r.meminfo_total_mib() - total == 2048
    r.assert_clean()


def test_bbm_unplugs_offline_then_movable_and_skips_busy_kernel_memory() -> None:
    r = rig(block_size=GIB, auto_online="offline")
    r.resize(3 * GIB)
    # Two big blocks (the offline threshold is two big blocks): ENOSPC for the third.
    assert r.device.plugged_size == 2 * GIB
    normal = r.mm.zones["Normal"].free_area
    r.guest.allocate(normal.allocatable_pages, tag="boot")
    for i in range(8):
        r.guest.online_block(FIRST + i, "online_kernel")
    r.pump()
    # The third big block was added once the first went online; it stays offline.
    assert r.driver.block_states() == {4: "added", 5: "added", 6: "added"}
    for i in range(8, 16):
        r.guest.online_block(FIRST + i, "online_movable")
    r.pump()
    r.guest.allocate(normal.allocatable_pages, tag="kernel")
    r.guest.free("boot", 64 * PAGES_PER_MIB)
    r.guest.allocate(16 * PAGES_PER_MIB, zone="Movable", tag="movable")
    r.assert_clean()
    r.resize(2 * GIB)
    # The offline big block goes first.
    assert r.driver.block_states()[6] == "unused"
    r.resize(GIB)
    # Then the Movable one, its allocation migrated.
    assert r.driver.block_states() == {4: "added", 5: "unused", 6: "unused"}
    assert r.mm.count_pages(ALLOCATED, "movable") == 16 * PAGES_PER_MIB
    r.resize(0)
    # The kernel one is busy: fake-offlining fails, everything rolls back, retry later.
    assert r.driver.block_states()[4] == "added"
    assert r.kinds("big_block_busy")
    assert r.kinds("wq_done")[-1]["rc"] == -errno.EBUSY
    assert r.device.plugged_size == GIB
    assert page_offline(r, OWNER_FAKE_OFFLINE, FIRST) == 0
    r.assert_clean()


def test_force_bbm_with_small_device_blocks() -> None:
    r = rig(virtio_mem_force_bbm=True)
    r.resize(256 * MIB)
    assert requests(r, PLUG) == [(ADDR, 64), (ADDR + MB, 64)]
    assert r.driver.block_states() == {FIRST: "added", FIRST + 1: "added"}
    r.resize(128 * MIB)
    assert r.driver.block_states() == {FIRST: "added", FIRST + 1: "unused"}
    r.assert_clean()


@pytest.mark.parametrize("err", [errno.EPERM, errno.EINVAL, errno.EBUSY])
def test_bbm_vetoed_offline_skips_the_big_block_and_does_not_break_the_device(err: int) -> None:
    # virtio_mem_offline_and_remove_memory: any failure but -ENOMEM is -EBUSY.
    r = rig(block_size=2 * MB)
    assert r.driver.mode == "bbm"
    r.resize(4 * MB)
    assert r.driver.block_states() == {FIRST // 2: "added", FIRST // 2 + 1: "added"}
    r.guest.inject_notifier_error("MEM_GOING_OFFLINE", err, count=1)
    r.resize(2 * MB)
    # The highest big block was vetoed and skipped; the next one went instead.
    assert [e["block"] for e in r.kinds("big_block_busy")] == [FIRST // 2 + 1]
    assert not r.driver.broken
    assert r.kinds("wq_done")[-1]["rc"] == 0
    assert r.driver.block_states() == {FIRST // 2: "unused", FIRST // 2 + 1: "added"}
    assert r.device.plugged_size == 2 * MB
    r.assert_clean()
    # Vetoed every time: -EBUSY, the retry timer, never broken; then it goes through.
    r.guest.inject_notifier_error("MEM_GOING_OFFLINE", err)
    r.resize(0)
    assert not r.driver.broken
    assert r.kinds("wq_done")[-1]["rc"] == -errno.EBUSY
    assert r.driver.retry_timer_deadline is not None
    assert r.device.plugged_size == 2 * MB
    r.guest.error_inject.set(MemoryAction.MEM_GOING_OFFLINE, 0)
    r.advance(VIRTIO_MEM_RETRY_TIMER_MIN_MS / 1000)
    assert not r.driver.broken
    assert r.device.plugged_size == 0
    assert r.driver.block_states() == {FIRST // 2: "unused", FIRST // 2 + 1: "unused"}
    r.assert_clean()


# -- what the checker catches --------------------------------------------------------------


def test_a_driver_that_onlines_unplugged_memory_is_caught_on_both_sides() -> None:
    r = rig()
    r.resize(100 * MIB)
    lo = block_pfn(FIRST, 25)
    hi = block_pfn(FIRST + 1)
    # A broken driver hands its unplugged subblocks to the buddy.
    r.mm.generic_online_pages(lo, hi)
    kinds = {f.invariant for f in r.findings()}
    assert {"unplugged-allocated", "virtio-mem-online-unplugged", "virtio-mem-fake-offline"} <= (
        kinds
    )
    # Touching them is seen by the host through the access reports.
    r.guest.allocate(r.mm.zones["Movable"].free_area.allocatable_pages, zone="Movable")
    r.pump()
    reports = [v for v in r.device.violations if v.kind == "unplugged-access"]
    assert reports and reports[0].pfn_start is not None and lo <= reports[0].pfn_start < hi


def test_access_reports_only_cover_device_memory() -> None:
    r = rig()
    r.resize(128 * MIB)
    r.guest.allocate(256, tag="boot")  # boot memory: nothing for the device
    assert r.guest.drain_virtio_outbox() == []
    r.guest.allocate(256, zone="Movable", tag="dev")
    (report,) = r.guest.drain_virtio_outbox()
    assert isinstance(report, AccessReport)
    assert all(block_pfn(FIRST) <= s < e <= block_pfn(FIRST + 1) for s, e in report.ranges)
    assert r.device.check_access(report.ranges) == []


def test_checker_catches_broken_bookkeeping() -> None:
    r = rig()
    r.resize(128 * MIB)
    r.driver.sb_states[FIRST] &= ~1  # the driver forgets a plugged subblock
    kinds = {f.invariant for f in r.findings()}
    assert {
        "virtio-mem-plugged-size",
        "virtio-mem-plugged-mismatch",
        "virtio-mem-block-state",
        "virtio-mem-online-unplugged",
        "virtio-mem-fake-offline",
    } <= kinds
    assert r.mm.page_state(block_pfn(FIRST)).kind == BUDDY


@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, (1 << n) - 1))))
def test_bit_runs(case: tuple[int, int]) -> None:
    count, bits = case
    runs = list(bit_runs(bits, count))
    assert runs[0][0] == 0 and runs[-1][1] == count
    for (_, end, value), (start, _, nxt) in itertools.pairwise(runs):
        assert end == start and value != nxt
    for first, end, value in runs:
        assert all(bool(bits >> i & 1) == value for i in range(first, end))
