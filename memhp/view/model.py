"""What the live view knows about each VM, whichever way it learnt it.

A :class:`Fleet` holds one :class:`VmView` per VM: the host's sizes (target, actual,
committed, available, ballooned, backed), the DM transaction in flight, the memory
block map as run-length cells, the recent events (a ring of :data:`RECENT_EVENTS`)
and how many violations were seen. It is fed

* over gRPC (:mod:`memhp.view.grpc_source`): :meth:`Fleet.apply_vm` with a
  ``Control.GetVm`` answer, :meth:`Fleet.apply_memory` with the guest's
  ``GuestIntrospection.GetMemory`` answer (or :meth:`Fleet.apply_host_map` when the
  guest announced no address: a map drawn from what the host backed, marked so), and
  :meth:`Fleet.apply_event` with each ``Control.WatchEvents`` event;
* over MQTT (:mod:`memhp.view.mqtt_source`): :meth:`Fleet.apply_mqtt` with each
  message of ``memhp/v1/vm/+/events/+`` (the event envelope), ``memhp/v1/vm/+/state``
  (the host's retained summary) and ``memhp/v1/vm/+/guest`` (the guest's retained
  document with its block runs), as :mod:`memhp.events` defines them. An event that
  comes again (QoS 1 is at least once: a publisher sends what the broker had not
  confirmed again after a reconnection) is shown once. The state document has no
  count of the host's violations, so over MQTT the host's count is what the view saw
  (:attr:`VmView.host_violations_partial`).

A cell is the guest's own word for a memory block (``GuestIntrospection``'s
``MemoryBlock.cell``, computed by ``guest/blockmap.py``): ``offline``, ``online``
(online and fully backed), ``unbacked`` (online with PageOffline pages the host has
not backed) or ``ballooned``.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf import json_format

from extents import RangeSet
from memhp import events as mqtt_events
from memhp.units import PAGE_SHIFT
from memhp.v1 import control_pb2, guest_pb2

CELL_OFFLINE: Final = "offline"
CELL_ONLINE: Final = "online"
CELL_UNBACKED: Final = "unbacked"
CELL_BALLOONED: Final = "ballooned"
#: Every cell kind, in the order a legend lists them (as guest/blockmap.py's CELLS).
CELLS: Final = (CELL_OFFLINE, CELL_ONLINE, CELL_UNBACKED, CELL_BALLOONED)

#: Where a VM's map came from: the guest itself, or the host's backing only.
MAP_GUEST: Final = "guest"
MAP_HOST: Final = "host"

#: How many recent events each VM keeps.
RECENT_EVENTS: Final = 12

#: MQTT topics (schema version 1) the view subscribes to.
MQTT_PREFIX: Final = f"{mqtt_events.TOPIC_ROOT}/vm"
MQTT_TOPICS: Final = (
    f"{MQTT_PREFIX}/+/events/+",
    f"{MQTT_PREFIX}/+/state",
    f"{MQTT_PREFIX}/+/guest",
)
SCHEMA_VERSION: Final = mqtt_events.VERSION
#: MQTT events remembered per VM to recognise one that comes again.
RECENT_KEYS: Final = 256

#: A run of consecutive memory blocks with the same cell: (first index, count, cell).
Run = tuple[int, int, str]

#: Event payload keys every event repeats; not worth a place in a one-line summary.
_NOISE = ("vm_id", "state")
#: Payload keys shown first, in this order.
_FIRST = ("kind", "message", "command", "trans_id", "reason")
#: Events that come on a timer: one in a row replaces the last (and counts it), so they
#: do not push everything else out of the ring.
PERIODIC: Final = frozenset({"status_report", "policy_decision"})


@dataclass(frozen=True)
class InFlight:
    """The host-initiated DM transaction waiting for the guest's answer."""

    kind: str
    trans_id: int
    pages: int
    description: str = ""

    def text(self) -> str:
        return self.description or f"{self.kind} trans_id={self.trans_id} {self.pages} pages"


@dataclass(frozen=True)
class EventLine:
    """One event as the view keeps it: when, which side, what, and its payload in short."""

    timestamp: float
    source: str
    kind: str
    detail: str
    #: How many events of a periodic kind in a row this line stands for (the last shown).
    repeat: int = 1

    def text(self) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(self.timestamp))
        millis = int((self.timestamp % 1) * 1000)
        line = f"{clock}.{millis:03d} {self.source} {self.kind}"
        if self.repeat > 1:
            line += f" (x{self.repeat})"
        return f"{line} {self.detail}" if self.detail else line


@dataclass
class VmView:
    vm_id: str
    attached: bool = False
    #: The host session's DM state (VERSION, CAPS, IDLE, *_REPLY_WAIT).
    dm_state: str = ""
    boot_bytes: int = 0
    max_bytes: int = 0
    #: The target size (None: never set).
    requested_bytes: int | None = None
    actual_bytes: int = 0
    committed_bytes: int = 0
    available_bytes: int = 0
    ballooned_bytes: int = 0
    #: What the host backed through hot-add: the regions' backed pages (the MQTT state
    #: document's ``backed_bytes``).
    backed_bytes: int = 0
    regions: int = 0
    busy: bool = False
    in_flight: InFlight | None = None
    guest_address: str = ""
    block_size_bytes: int = 0
    cells: list[Run] = field(default_factory=list)
    #: MAP_GUEST, MAP_HOST, or "" (no map yet).
    map_source: str = ""
    #: Why the map is not the guest's own (shown under the map).
    map_note: str = ""
    strategy: str = ""
    driver_mode: str = ""
    #: The guest driver's state (DM_INITIALIZED, DM_HOT_ADD, ...).
    guest_dm_state: str = ""
    meminfo: dict[str, int] = field(default_factory=dict)
    #: The host's violation and protocol_error events so far.
    host_violations: int = 0
    #: True when ``host_violations`` counts only the events seen while watching (MQTT:
    #: the state document has no count, a late watcher misses the earlier events).
    host_violations_partial: bool = False
    #: Invariant findings the guest reports now.
    guest_violations: int = 0
    events: deque[EventLine] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    #: Wall time of the last update of any kind.
    updated: float = 0.0
    _host_events_seen: int = 0
    #: (source, seq, timestamp) of the last MQTT events, to drop one that comes again.
    _mqtt_keys: deque[tuple[str, int, float]] = field(
        default_factory=lambda: deque(maxlen=RECENT_KEYS)
    )

    @property
    def violations(self) -> int:
        return self.host_violations + self.guest_violations

    @property
    def blocks(self) -> int:
        """Memory blocks present (the map's cells)."""
        return sum(count for _, count, _ in self.cells)

    def cell_counts(self) -> dict[str, int]:
        """Blocks per cell kind, every kind present (0 when none)."""
        counts = dict.fromkeys(CELLS, 0)
        for _, count, cell in self.cells:
            counts[cell] = counts.get(cell, 0) + count
        return counts


class Fleet:
    """Every VM the view shows (only ``vm_ids`` when given), by VM id."""

    def __init__(self, vm_ids: Iterable[str] = ()) -> None:
        self.only: frozenset[str] = frozenset(vm_ids)
        self.vms: dict[str, VmView] = {}
        #: Where the data comes from, for the header ("hypervisor 127.0.0.1:50051").
        self.source = ""
        #: The last problem reaching the source ("" when all is well).
        self.error = ""
        #: MQTT messages that were not understood (bad topic, JSON or version).
        self.ignored = 0

    def wants(self, vm_id: str) -> bool:
        return bool(vm_id) and (not self.only or vm_id in self.only)

    def vm(self, vm_id: str) -> VmView:
        view = self.vms.get(vm_id)
        if view is None:
            view = self.vms[vm_id] = VmView(vm_id)
        return view

    def sorted(self) -> list[VmView]:
        return [self.vms[k] for k in sorted(self.vms)]

    # -- gRPC ------------------------------------------------------------------------

    def apply_vm(self, vm: control_pb2.Vm) -> VmView | None:
        """A ``Control.GetVm`` answer (or a ``ListVms`` summary: no regions or ranges)."""
        if not self.wants(vm.spec.vm_id):
            return None
        view = self.vm(vm.spec.vm_id)
        view.attached = vm.attached
        view.dm_state = vm.dm_state
        view.boot_bytes = vm.spec.boot_bytes
        view.max_bytes = vm.spec.max_bytes
        view.block_size_bytes = view.block_size_bytes or vm.spec.block_size_bytes
        view.requested_bytes = vm.requested_bytes if vm.requested_set else None
        view.actual_bytes = vm.actual_bytes
        view.committed_bytes = vm.committed_bytes
        view.available_bytes = vm.available_bytes
        view.ballooned_bytes = vm.ballooned_bytes
        if vm.regions or vm.backed:  # GetVm (a ListVms summary has neither)
            view.backed_bytes = (
                sum(r.page_cnt for region in vm.regions for r in region.backed) << PAGE_SHIFT
            )
            view.regions = len(vm.regions)
        view.busy = vm.busy
        view.in_flight = (
            InFlight(
                vm.in_flight.kind,
                vm.in_flight.trans_id,
                vm.in_flight.pages,
                vm.in_flight.description,
            )
            if vm.HasField("in_flight")
            else None
        )
        view.guest_address = vm.guest_address
        view.host_violations = max(vm.violation_events, view._host_events_seen)
        view.updated = time.time()
        return view

    def apply_memory(self, vm_id: str, memory: guest_pb2.GuestMemory) -> VmView | None:
        """The guest's ``GetMemory`` answer: its block cells, meminfo and findings."""
        if not self.wants(vm_id):
            return None
        view = self.vm(vm_id)
        view.block_size_bytes = memory.block_size_bytes
        view.cells = run_length((b.index, b.cell or CELL_OFFLINE) for b in memory.blocks)
        view.map_source = MAP_GUEST
        view.map_note = ""
        view.strategy = memory.strategy
        view.driver_mode = memory.driver_mode
        view.guest_dm_state = memory.dm_state
        view.meminfo = dict(memory.meminfo)
        view.guest_violations = len(memory.violations)
        view.updated = time.time()
        return view

    def apply_host_map(self, vm: control_pb2.Vm, note: str) -> VmView | None:
        """A map from the host's side only (``GetVm`` with its regions and ranges)."""
        view = self.apply_vm(vm)
        if view is None:
            return None
        view.cells = host_cells(vm)
        view.map_source = MAP_HOST
        view.map_note = note
        return view

    def apply_event(self, event: control_pb2.Event) -> VmView | None:
        """One ``Control.WatchEvents`` event."""
        payload = json_format.MessageToDict(event.payload)
        return self.add_event(
            event.vm_id, event.timestamp, event.source or "host", event.kind, payload
        )

    def add_event(
        self, vm_id: str, timestamp: float, source: str, kind: str, payload: Mapping[str, Any]
    ) -> VmView | None:
        if not self.wants(vm_id):
            return None
        view = self.vm(vm_id)
        line = EventLine(timestamp, source, kind, event_detail(payload))
        last = view.events[-1] if view.events else None
        if kind in PERIODIC and last is not None and (last.source, last.kind) == (source, kind):
            view.events[-1] = EventLine(
                timestamp, source, kind, line.detail, repeat=last.repeat + 1
            )
        else:
            view.events.append(line)
        if source == "host" and kind in ("violation", "protocol_error"):
            view._host_events_seen += 1
            view.host_violations = max(view.host_violations, view._host_events_seen)
        view.updated = time.time()
        return view

    # -- MQTT ------------------------------------------------------------------------

    def apply_mqtt(self, topic: str, payload: bytes | str) -> VmView | None:
        """One MQTT message; None (and :attr:`ignored` counts it) when not understood."""
        view = self._apply_mqtt(topic, payload)
        if view is None:
            self.ignored += 1
        return view

    def _apply_mqtt(self, topic: str, payload: bytes | str) -> VmView | None:
        parsed = mqtt_events.parse_topic(topic)
        if parsed is None:
            return None
        vm_id = parsed.vm
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(doc, dict) or doc.get("version") != SCHEMA_VERSION:
            return None
        if doc.get("vm", vm_id) != vm_id or not self.wants(vm_id):
            return None
        try:
            if parsed.what == "events":
                return self._mqtt_event(vm_id, parsed.kind or "", doc)
            if parsed.what == "state":
                return self._mqtt_state(vm_id, doc)
            if parsed.what == "guest":
                return self._mqtt_guest(vm_id, doc)
        except (TypeError, ValueError, KeyError, AttributeError):
            return None
        return None

    def _mqtt_event(self, vm_id: str, kind: str, doc: dict[str, Any]) -> VmView | None:
        source = str(doc.get("source", "host"))
        timestamp = float(doc.get("timestamp", 0.0))
        payload = doc.get("payload") or {}
        if not isinstance(payload, dict):
            return None
        view = self.vm(vm_id)
        view.host_violations_partial = True
        seq = doc.get("seq")
        if isinstance(seq, int):
            key = (source, seq, timestamp)
            if key in view._mqtt_keys:
                return view  # the same event again (at least once): shown once
            view._mqtt_keys.append(key)
        return self.add_event(vm_id, timestamp, source, str(doc.get("kind", kind)), payload)

    def _mqtt_state(self, vm_id: str, doc: dict[str, Any]) -> VmView:
        view = self.vm(vm_id)
        view.attached = bool(doc.get("attached", False))
        view.dm_state = str(doc.get("dm_state", ""))
        requested = int(doc.get("requested_bytes") or 0)
        view.requested_bytes = requested or None
        view.actual_bytes = int(doc.get("actual_bytes") or 0)
        view.committed_bytes = int(doc.get("committed_bytes") or 0)
        view.available_bytes = int(doc.get("available_bytes") or 0)
        view.ballooned_bytes = int(doc.get("ballooned_bytes") or 0)
        view.backed_bytes = int(doc.get("backed_bytes") or 0)
        view.regions = int(doc.get("regions") or 0)
        view.busy = bool(doc.get("busy", False))
        flight = doc.get("in_flight")
        view.in_flight = (
            InFlight(str(flight["kind"]), int(flight["trans_id"]), int(flight["pages"]))
            if flight
            else None
        )
        view.guest_address = str(doc.get("guest_address") or "")
        view.host_violations_partial = True
        if not view.cells:
            view.map_note = (
                "waiting for the guest's retained document"
                if view.attached
                else "no guest attached"
            )
        view.updated = time.time()
        return view

    def _mqtt_guest(self, vm_id: str, doc: dict[str, Any]) -> VmView:
        runs: list[Run] = []
        for first, count, cell in doc.get("blocks") or []:
            runs.append((int(first), int(count), str(cell)))
        view = self.vm(vm_id)
        view.block_size_bytes = int(doc.get("block_size_bytes") or view.block_size_bytes)
        view.cells = runs
        view.map_source = MAP_GUEST
        view.map_note = ""
        view.meminfo = {str(k): int(v) for k, v in (doc.get("meminfo") or {}).items()}
        view.strategy = str(doc.get("strategy", ""))
        view.driver_mode = str(doc.get("driver_mode", ""))
        view.guest_dm_state = str(doc.get("dm_state", ""))
        view.guest_violations = int(doc.get("violations") or 0)
        view.host_violations_partial = True
        view.updated = time.time()
        return view


# -- cells ---------------------------------------------------------------------------


def run_length(cells: Iterable[tuple[int, str]]) -> list[Run]:
    """``(first_index, count, cell)`` runs of consecutive blocks with the same cell."""
    runs: list[Run] = []
    for index, cell in cells:
        if runs:
            first, count, kind = runs[-1]
            if kind == cell and first + count == index:
                runs[-1] = (first, count + 1, kind)
                continue
        runs.append((index, 1, cell))
    return runs


def expand(runs: Iterable[Run]) -> Iterator[tuple[int, str]]:
    """Every block of ``runs`` as ``(index, cell)``."""
    for first, count, cell in runs:
        for index in range(first, first + count):
            yield index, cell


def host_cells(vm: control_pb2.Vm) -> list[Run]:
    """The map as the host alone can draw it (``GetVm`` with regions and ranges).

    Boot blocks and blocks the host backs fully are ``online``, partly backed blocks
    ``unbacked``, blocks of a region the host has not backed at all ``offline``; a
    block with ballooned pages is ``ballooned``. Whether the guest has onlined a block
    is not the host's to know: this is what the host backs, not what the guest did.
    """
    block_pages = vm.spec.block_size_bytes >> PAGE_SHIFT
    if block_pages <= 0:
        return []
    backed = RangeSet()
    for r in vm.backed:
        backed.add(r.start_page, r.start_page + r.page_cnt)
    ballooned = RangeSet()
    for r in vm.ballooned:
        ballooned.add(r.start_page, r.start_page + r.page_cnt)
    blocks: set[int] = set(range((vm.spec.boot_bytes >> PAGE_SHIFT) // block_pages))
    for region in vm.regions:
        first = region.start_page // block_pages
        last = -(-(region.start_page + region.page_count) // block_pages)
        blocks.update(range(first, last))
    cells: list[tuple[int, str]] = []
    for index in sorted(blocks):
        start, end = index * block_pages, (index + 1) * block_pages
        if ballooned.count(start, end):
            cell = CELL_BALLOONED
        else:
            have = backed.count(start, end)
            cell = CELL_ONLINE if have == block_pages else CELL_UNBACKED if have else CELL_OFFLINE
        cells.append((index, cell))
    return run_length(cells)


def onlined_pages(memory: guest_pb2.GuestMemory) -> int:
    """Pages of online memory blocks the guest can use: neither unbacked nor ballooned."""
    block_pages = memory.block_size_bytes >> PAGE_SHIFT
    return sum(
        block_pages - b.page_offline - b.ballooned for b in memory.blocks if b.state == "online"
    )


def event_detail(payload: Mapping[str, Any]) -> str:
    """An event's payload on one line: ``key=value`` without the keys every event has,
    the telling ones first (a protobuf Struct does not keep the publisher's order)."""
    keys = [k for k in _FIRST if payload.get(k) is not None]
    keys += sorted(
        k for k in payload if k not in _FIRST and k not in _NOISE and payload[k] is not None
    )
    return " ".join(f"{key}={_short(payload[key])}" for key in keys)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.6g}"
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    if isinstance(value, list | dict):
        return json.dumps(_ints(value), separators=(",", ":"))
    return str(value)


def _ints(value: Any) -> Any:
    """Whole floats (a protobuf Struct has only floats) back to ints, deeply."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    return value
