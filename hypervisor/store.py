"""The hypervisor's state file: VM definitions, policies and ground truth in SQLite.

Written after every change, so a stopped hypervisor loses nothing and its guests
reattach to the same state (``--state FILE``; an in-memory database when absent). While
a transaction is in flight the runtime may hold a write back for a few milliseconds
(``runtime.STATE_WRITE_DELAY``) so that the steps of a batch share one; once a command
is done (nothing in flight), and when the hypervisor stops, everything is written. A
hypervisor killed in the middle of a batch may lose those last milliseconds: the
guests' reports at reattach tell it which regions they hold (``reconcile``).
A VM's truth is one row for the VM-wide part (target, hot-add disabled, ballooned
ranges) plus one row per hot-add region, so a change rewrites only what changed: a
guest grown to 1 TiB in 128 MiB steps has 8192 regions, and each transaction touches
one or two. A virtio-mem VM has one more row: its device settings and the device's
snapshot (requested, usable and plugged sizes, the plugged ranges), rewritten whenever
they change.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisor.dm_host import DmHostSession
from hypervisor.ground_truth import HotAddRegion
from hypervisor.vm import VIRTIO_MEM, VirtioMemSettings, VmConfig

#: 2 added the virtio_mem table (a version-1 file is upgraded in place: the table is
#: created empty); a version-1 hypervisor refuses a version-2 file instead of reading
#: its virtio-mem VMs as Hyper-V ones.
SCHEMA_VERSION = 2
_UPGRADABLE = frozenset({"1"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    vm_id TEXT PRIMARY KEY,
    boot_pages INTEGER NOT NULL,
    max_pages INTEGER NOT NULL,
    block_pages INTEGER NOT NULL,
    policy TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vm_state (
    vm_id TEXT PRIMARY KEY REFERENCES vms(vm_id),
    target_pages INTEGER,
    hot_add_disabled INTEGER NOT NULL,
    ballooned TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS regions (
    vm_id TEXT NOT NULL REFERENCES vms(vm_id),
    start_page INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (vm_id, start_page)
);
CREATE TABLE IF NOT EXISTS virtio_mem (
    vm_id TEXT PRIMARY KEY REFERENCES vms(vm_id),
    settings TEXT NOT NULL,
    snapshot TEXT
);
"""


class StateFileError(Exception):
    """The state file cannot be opened or does not hold what this version writes."""


@dataclass
class StoredVm:
    config: VmConfig
    policy: dict[str, Any]
    snapshot: dict[str, Any] | None
    #: The virtio-mem device's snapshot (None: never saved, or no device).
    device: dict[str, Any] | None = None


class StateStore:
    """SQLite persistence; ``path=None`` keeps it in memory (lost on exit)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        try:
            self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path))
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a crash of this process (not of the machine)
            # without an fsync per transaction.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                self._db.commit()
            elif row[0] in _UPGRADABLE:
                self._db.execute(
                    "UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),)
                )
                self._db.commit()
            elif row[0] != str(SCHEMA_VERSION):
                raise StateFileError(
                    f"{self.path}: schema version {row[0]}, this hypervisor writes {SCHEMA_VERSION}"
                )
        except sqlite3.Error as err:
            raise StateFileError(f"{self.path}: {err}") from None

    def close(self) -> None:
        self._db.close()

    # -- reading ---------------------------------------------------------------

    def load(self) -> list[StoredVm]:
        """Every VM in creation order, with its policy and truth snapshot (None if never saved)."""
        out: list[StoredVm] = []
        rows = self._db.execute(
            "SELECT vm_id, boot_pages, max_pages, block_pages, policy FROM vms ORDER BY seq"
        ).fetchall()
        for vm_id, boot, max_pages, block, policy in rows:
            vmem = self._db.execute(
                "SELECT settings, snapshot FROM virtio_mem WHERE vm_id=?", (vm_id,)
            ).fetchone()
            device: dict[str, Any] | None = None
            try:
                if vmem is None:
                    config = VmConfig(vm_id, boot, max_pages, block)
                else:
                    settings = VirtioMemSettings.from_data(json.loads(vmem[0]))
                    config = VmConfig(vm_id, boot, max_pages, block, VIRTIO_MEM, settings)
                    device = None if vmem[1] is None else json.loads(vmem[1])
            except (ValueError, KeyError, TypeError) as err:
                raise StateFileError(f"{self.path}: VM {vm_id!r}: {err}") from None
            state = self._db.execute(
                "SELECT target_pages, hot_add_disabled, ballooned FROM vm_state WHERE vm_id=?",
                (vm_id,),
            ).fetchone()
            snapshot: dict[str, Any] | None = None
            if state is not None:
                regions = [
                    json.loads(data)
                    for (data,) in self._db.execute(
                        "SELECT data FROM regions WHERE vm_id=? ORDER BY start_page", (vm_id,)
                    )
                ]
                snapshot = {
                    "target_pages": state[0],
                    "hot_add_disabled": bool(state[1]),
                    "ballooned": json.loads(state[2]),
                    "regions": regions,
                }
            out.append(StoredVm(config, json.loads(policy), snapshot, device))
        return out

    # -- writing ---------------------------------------------------------------

    def add_vm(self, config: VmConfig, policy: dict[str, Any]) -> None:
        with self._db:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM vms").fetchone()[0]
            self._db.execute(
                "INSERT INTO vms VALUES (?, ?, ?, ?, ?, ?)",
                (
                    config.vm_id,
                    config.boot_pages,
                    config.max_pages,
                    config.block_pages,
                    json.dumps(policy),
                    seq,
                ),
            )
            if config.virtio_mem is not None:
                self._db.execute(
                    "INSERT INTO virtio_mem VALUES (?, ?, NULL)",
                    (config.vm_id, json.dumps(config.virtio_mem.as_data())),
                )

    def write_device(self, vm_id: str, snapshot: dict[str, Any]) -> None:
        """The virtio-mem device's snapshot (:meth:`VirtioMemDevice.snapshot`)."""
        with self._db:
            self._db.execute(
                "UPDATE virtio_mem SET snapshot=? WHERE vm_id=?", (json.dumps(snapshot), vm_id)
            )

    def set_policy(self, vm_id: str, policy: dict[str, Any]) -> None:
        with self._db:
            self._db.execute("UPDATE vms SET policy=? WHERE vm_id=?", (json.dumps(policy), vm_id))

    def write_truth(
        self,
        vm_id: str,
        vm_state: tuple[int | None, bool, list[list[int]]] | None,
        regions: list[tuple[int, dict[str, Any]]],
        deleted: list[int],
    ) -> None:
        """One transaction: the VM-wide row (when given), changed regions, deleted regions."""
        with self._db:
            for start in deleted:
                self._db.execute(
                    "DELETE FROM regions WHERE vm_id=? AND start_page=?", (vm_id, start)
                )
            if vm_state is not None:
                target, disabled, ballooned = vm_state
                self._db.execute(
                    "INSERT OR REPLACE INTO vm_state VALUES (?, ?, ?, ?)",
                    (vm_id, target, int(disabled), json.dumps(ballooned)),
                )
            self._db.executemany(
                "INSERT OR REPLACE INTO regions VALUES (?, ?, ?)",
                [(vm_id, start, json.dumps(data)) for start, data in regions],
            )


class TruthWriter:
    """Writes one VM's truth to the store, only the parts that changed since the last write.

    Regions are only ever appended and only a few change per step (the one in flight
    before and after, new ones), so :meth:`save` checks those unless told to check all.
    A caller that writes later (several steps in one write) tells :meth:`note` what each
    step would have had :meth:`save` check; the next :meth:`save` checks all of it.
    """

    def __init__(self, store: StateStore, vm_id: str) -> None:
        self.store = store
        self.vm_id = vm_id
        self._vm_row: tuple[Any, ...] | None = None
        self._regions: dict[int, tuple[int, int, bool, bool]] = {}
        self._count = 0
        #: What :meth:`note` asked the next :meth:`save` to check as well.
        self._noted_all = False
        self._noted: list[HotAddRegion] = []

    @property
    def pending(self) -> bool:
        """:meth:`note` was called since the last :meth:`save`."""
        return self._noted_all or bool(self._noted)

    def note(self, *, check_all: bool = False, also: tuple[HotAddRegion | None, ...] = ()) -> None:
        """A step whose write is deferred: the next :meth:`save` checks what this one would."""
        self._noted_all = self._noted_all or check_all
        self._noted.extend(r for r in also if r is not None)

    def save(
        self,
        session: DmHostSession,
        *,
        check_all: bool = False,
        also: tuple[HotAddRegion | None, ...] = (),
    ) -> bool:
        """Persist what changed (and what :meth:`note` saw); True when something was written."""
        check_all = check_all or self._noted_all
        noted, self._noted, self._noted_all = self._noted, [], False
        count = session.region_count
        if count < self._count:
            check_all = True  # the session was restored with fewer regions
        candidates = session.regions_from(0 if check_all else self._count)
        if not check_all:
            candidates += noted
            candidates += [r for r in also if r is not None]
        txn = session.in_flight
        if txn is not None and txn.target_region is not None:
            candidates.append(txn.target_region)
        # start -> (region, fingerprint): a region among the candidates twice is written once.
        changed: dict[int, tuple[HotAddRegion, tuple[int, int, bool, bool]]] = {}
        known = self._regions
        for region in candidates:
            if not region.offered:
                continue  # reserved by queued work only: nothing to keep yet
            fp = region.fingerprint()
            if known.get(region.start) != fp:
                changed[region.start] = (region, fp)
        ballooned = session.ballooned
        vm_row = (
            session.target_pages,
            session.hot_add_disabled,
            len(ballooned),
            # The lowest range: a different set of the same size shows here.
            ballooned.first(),
        )
        if not changed and vm_row == self._vm_row and not check_all:
            return False
        deleted: list[int] = []
        if check_all:
            live = {r.start for r in session.regions_from(0)}
            deleted = [s for s in known if s not in live]
        vm_state = None
        if vm_row != self._vm_row or check_all:
            vm_state = (
                session.target_pages,
                session.hot_add_disabled,
                [[s, e] for s, e in ballooned.ranges()],
            )
        try:
            self.store.write_truth(
                self.vm_id, vm_state, [(s, r.snapshot()) for s, (r, _) in changed.items()], deleted
            )
        except Exception:
            # Nothing was written: the next save must look at these again.
            self._noted = noted + self._noted
            self._noted_all = self._noted_all or check_all
            raise
        for start in deleted:
            del known[start]
        for start, (_, fp) in changed.items():
            known[start] = fp
        self._vm_row = vm_row
        self._count = count
        return True
