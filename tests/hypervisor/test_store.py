"""The SQLite state file: VM definitions, policies and truth survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.dm_host import DmHostSession
from hypervisor.policy import make_dynamic
from hypervisor.store import SCHEMA_VERSION, StateFileError, StateStore, TruthWriter
from hypervisor.vm import VmConfig
from memhp.dm import HotAddResponse
from tests.hypervisor.helpers import BLOCK, BOOT, MAX, negotiate, tid

CFG = VmConfig("vm0", BOOT, MAX, BLOCK)


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    policy = make_dynamic(CFG, 20, 0, 0)
    store.add_vm(CFG, policy.as_data())
    s = DmHostSession(CFG)
    negotiate(s)
    writer = TruthWriter(store, CFG.vm_id)
    assert writer.save(s, check_all=True)
    s.hot_add(4 * BLOCK, BLOCK, 0.0)
    assert writer.save(s)  # the region is new (backed, in flight)
    s.receive(HotAddResponse(tid(), BLOCK, 1), 0.0)
    assert writer.save(s, also=(s.regions[0],))
    assert not writer.save(s)  # nothing changed
    s.set_target(BOOT + BLOCK, 0.0)
    assert writer.save(s)
    store.close()

    again = StateStore(path)
    (vm,) = again.load()
    assert vm.config == CFG and vm.policy == policy.as_data()
    assert vm.snapshot is not None
    t = DmHostSession.from_snapshot(CFG, vm.snapshot)
    assert t.snapshot() == s.snapshot()
    again.close()


def test_changed_region_is_found_without_a_full_check(tmp_path: Path) -> None:
    store = StateStore(None)
    store.add_vm(CFG, {"kind": "manual"})
    s = DmHostSession(CFG)
    negotiate(s)
    writer = TruthWriter(store, CFG.vm_id)
    s.hot_add(4 * BLOCK, BLOCK, 0.0)
    writer.save(s)
    # The answer completes the transaction; the caller passes the region it was in.
    before = s.in_flight.target_region if s.in_flight else None
    s.receive(HotAddResponse(tid(), BLOCK, 1), 0.0)
    writer.save(s, also=(before,))
    (vm,) = store.load()
    assert vm.snapshot is not None and vm.snapshot["regions"][0]["added"] == [[BOOT, BOOT + BLOCK]]


def test_schema_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateStore(path).close()
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StateFileError, match="schema version"):
        StateStore(path)


def test_a_version_1_file_is_upgraded_and_keeps_its_vms(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "state.db"
    store = StateStore(path)
    store.add_vm(VmConfig("old", BOOT, 8 * BOOT, BLOCK), {"kind": "manual"})
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.execute("DROP TABLE virtio_mem")  # version 1 had no virtio-mem devices
    db.commit()
    db.close()
    store = StateStore(path)
    assert [v.config.vm_id for v in store.load()] == ["old"]
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
    db.close()


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateFileError):
        StateStore(path)


def test_region_reserved_by_queued_work_is_not_written() -> None:
    store = StateStore(None)
    store.add_vm(CFG, {"kind": "manual"})
    s = DmHostSession(CFG)
    negotiate(s)
    writer = TruthWriter(store, CFG.vm_id)
    s.hot_add(BLOCK, BLOCK, 0.0)
    s.hot_add(2 * BLOCK, BLOCK, 0.0)  # queued behind the first
    writer.save(s)
    (vm,) = store.load()
    assert vm.snapshot is not None and len(vm.snapshot["regions"]) == 1
    # Once its request goes out it is written.
    before = s.in_flight.target_region if s.in_flight else None
    s.receive(HotAddResponse(tid(), BLOCK, 1), 0.0)
    writer.save(s, also=(before,))
    (vm,) = store.load()
    assert vm.snapshot is not None and len(vm.snapshot["regions"]) == 2


def test_a_virtio_mem_vm_and_its_device_survive(tmp_path: Path) -> None:
    from hypervisor.virtio_mem_host import VirtioMemDevice
    from hypervisor.vm import VirtioMemSettings
    from memhp.virtio_mem import VirtioMemRequest

    settings = VirtioMemSettings(region_size=1 << 30, addr=4 << 30, requested=64 << 20)
    cfg = VmConfig("v", BOOT, BOOT, BLOCK, "virtio-mem", settings)
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.add_vm(cfg, {"kind": "manual"})
    device = VirtioMemDevice(settings.device_config(), vm_id="v")
    device.request(VirtioMemRequest.plug(4 << 30, 16), 0.0)
    store.write_device("v", device.snapshot())
    store.close()

    again = StateStore(path)
    (vm,) = again.load()
    assert vm.config == cfg and vm.device == device.snapshot()
    restored = VirtioMemDevice.from_snapshot(settings.device_config(), vm.device, vm_id="v")
    assert restored.plugged_size == 32 << 20 and restored.requested_size == 64 << 20
    again.close()
