"""The view model: fed from gRPC answers and events, and from the MQTT documents (schema 1)."""

from __future__ import annotations

import json

import pytest

from guest.blockmap import CELLS as GUEST_CELLS
from memhp.view.model import (
    CELLS,
    MAP_GUEST,
    MAP_HOST,
    RECENT_EVENTS,
    Fleet,
    InFlight,
    event_detail,
    expand,
    host_cells,
    onlined_pages,
    run_length,
)
from tests.view.helpers import (
    BLOCK_PAGES,
    GIB,
    MIB,
    event_pb,
    memory_pb,
    mqtt_event,
    mqtt_guest,
    mqtt_state,
    vm_pb,
)

PAGES_PER_MIB = 256


def test_cells_are_the_guests_words() -> None:
    assert CELLS == GUEST_CELLS


def test_run_length_and_expand_round_trip() -> None:
    cells = [(0, "online"), (1, "online"), (2, "unbacked"), (4, "offline"), (5, "offline")]
    runs = run_length(cells)
    # Block 3 is absent: the offline run starts again at 4.
    assert runs == [(0, 2, "online"), (2, 1, "unbacked"), (4, 2, "offline")]
    assert list(expand(runs)) == cells


# -- gRPC ---------------------------------------------------------------------------------


def test_apply_vm_takes_the_sizes_and_the_transaction() -> None:
    fleet = Fleet()
    vm = vm_pb(
        attached=True,
        dm_state="HOT_ADD_REPLY_WAIT",
        requested_bytes=6 * GIB,
        requested_set=True,
        actual_bytes=GIB,
        committed_bytes=512 * MIB,
        available_bytes=256 * MIB,
        busy=True,
        guest_address="127.0.0.1:1234",
        violation_events=3,
        regions=[(BLOCK_PAGES * 8, BLOCK_PAGES * 4, [(BLOCK_PAGES * 8, 300 * PAGES_PER_MIB)])],
    )
    vm.in_flight.kind = "hot_add"
    vm.in_flight.trans_id = 4
    vm.in_flight.pages = 76800
    vm.in_flight.description = "hot_add trans_id=4 [0x40000, 0x52c00)"
    view = fleet.apply_vm(vm)
    assert view is fleet.vms["g1"]
    assert (view.requested_bytes, view.actual_bytes) == (6 * GIB, GIB)
    assert (view.committed_bytes, view.available_bytes) == (512 * MIB, 256 * MIB)
    assert view.backed_bytes == 300 * MIB  # of the hot-added region
    assert view.regions == 1
    assert view.in_flight == InFlight("hot_add", 4, 76800, "hot_add trans_id=4 [0x40000, 0x52c00)")
    assert view.in_flight.text() == "hot_add trans_id=4 [0x40000, 0x52c00)"
    assert view.host_violations == 3
    assert view.guest_address == "127.0.0.1:1234"


def test_a_target_never_set_is_none() -> None:
    fleet = Fleet()
    view = fleet.apply_vm(vm_pb(requested_bytes=0))
    assert view is not None and view.requested_bytes is None


def test_apply_memory_takes_the_guests_cells() -> None:
    fleet = Fleet()
    cells = [(i, "online") for i in range(8)] + [(8, "online"), (9, "unbacked"), (10, "ballooned")]
    view = fleet.apply_memory("g1", memory_pb(cells, violations=2))
    assert view is not None
    assert view.cells == [(0, 9, "online"), (9, 1, "unbacked"), (10, 1, "ballooned")]
    assert view.map_source == MAP_GUEST
    assert view.cell_counts() == {"offline": 0, "online": 9, "unbacked": 1, "ballooned": 1}
    assert view.blocks == 11
    assert (view.strategy, view.driver_mode, view.guest_dm_state) == (
        "callback",
        "upstream",
        "DM_INITIALIZED",
    )
    assert view.guest_violations == 2
    assert view.meminfo["MemTotal"] == 4 << 20


def test_only_the_vms_asked_for() -> None:
    fleet = Fleet(["g2"])
    assert fleet.apply_vm(vm_pb("g1")) is None
    assert fleet.apply_event(event_pb("g1", "attach")) is None
    assert fleet.apply_vm(vm_pb("g2")) is not None
    assert list(fleet.vms) == ["g2"]


def test_host_cells_from_what_the_host_backs() -> None:
    # 1 GiB boot (blocks 0-7); a 512 MiB region at block 8 with 300 MiB backed; 64 MiB of
    # block 1 ballooned.
    vm = vm_pb(
        regions=[(BLOCK_PAGES * 8, BLOCK_PAGES * 4, [(BLOCK_PAGES * 8, 300 * PAGES_PER_MIB)])],
        ballooned=[(BLOCK_PAGES, 64 * PAGES_PER_MIB)],
    )
    assert host_cells(vm) == [
        (0, 1, "online"),
        (1, 1, "ballooned"),
        (2, 8, "online"),  # boot blocks 2-7 and the fully backed 8 and 9
        (10, 1, "unbacked"),  # 44 MiB of 128 backed
        (11, 1, "offline"),  # nothing backed
    ]


def test_host_map_is_marked() -> None:
    fleet = Fleet()
    view = fleet.apply_host_map(vm_pb(), "no guest attached")
    assert view is not None
    assert view.map_source == MAP_HOST
    assert view.map_note == "no guest attached"
    assert view.cells == [(0, 8, "online")]
    # A later guest answer replaces it.
    fleet.apply_memory("g1", memory_pb([(0, "online")]))
    assert (view.map_source, view.map_note) == (MAP_GUEST, "")


def test_onlined_pages_leaves_out_unbacked_and_ballooned_pages() -> None:
    memory = memory_pb(
        [(0, "online"), (1, "unbacked"), (2, "ballooned"), (3, "offline")],
        page_offline={1: 1000},
        ballooned={2: 24},
    )
    assert onlined_pages(memory) == 3 * BLOCK_PAGES - 1000 - 24


def test_events_ring_and_violation_count() -> None:
    fleet = Fleet()
    for i in range(RECENT_EVENTS + 5):
        fleet.apply_event(event_pb("g1", "command_queued", float(i), command=f"c{i}"))
    view = fleet.vms["g1"]
    assert len(view.events) == RECENT_EVENTS
    assert view.events[-1].detail == f"command=c{RECENT_EVENTS + 4}"
    fleet.apply_event(
        event_pb("g1", "violation", kind="unbacked-access", message="guest allocate of unbacked")
    )
    fleet.apply_event(event_pb("g1", "protocol_error", kind="version-order", message="m"))
    assert view.host_violations == 2
    assert view.events[-2].detail == 'kind=unbacked-access message="guest allocate of unbacked"'
    # GetVm's count is the whole truth once it is ahead of the stream.
    fleet.apply_vm(vm_pb(violation_events=5))
    assert view.host_violations == 5


def test_periodic_events_collapse() -> None:
    fleet = Fleet()
    fleet.apply_event(event_pb("g1", "hot_add_request", 1.0, trans_id=1))
    for i in range(4):
        fleet.apply_event(event_pb("g1", "status_report", 2.0 + i, committed_pages=100 + i))
    fleet.apply_event(event_pb("g1", "hot_add_response", 7.0, trans_id=1))
    fleet.apply_event(event_pb("g1", "status_report", 8.0, committed_pages=200))
    events = list(fleet.vms["g1"].events)
    assert [(e.kind, e.repeat) for e in events] == [
        ("hot_add_request", 1),
        ("status_report", 4),
        ("hot_add_response", 1),
        ("status_report", 1),
    ]
    assert events[1].detail == "committed_pages=103"
    assert events[1].timestamp == 5.0
    assert "(x4)" in events[1].text()


def test_event_detail() -> None:
    payload = {
        "vm_id": "g1",
        "state": "IDLE",
        "region": None,
        "range": [524288.0, 76800.0],
        "trans_id": 3.0,
        "time": 3.540351857,
    }
    assert event_detail(payload) == "trans_id=3 range=[524288,76800] time=3.54035"


# -- MQTT ---------------------------------------------------------------------------------


def test_mqtt_event_envelope() -> None:
    fleet = Fleet()
    view = fleet.apply_mqtt(
        "memhp/v1/vm/g1/events/hot_add_request",
        mqtt_event("g1", "hot_add_request", trans_id=3, form=24).encode(),
    )
    assert view is not None
    (line,) = view.events
    assert (line.source, line.kind, line.detail) == (
        "host",
        "hot_add_request",
        "trans_id=3 form=24",
    )
    assert line.timestamp == pytest.approx(1700000001.25)
    fleet.apply_mqtt(
        "memhp/v1/vm/g1/events/block_onlined",
        mqtt_event("g1", "block_onlined", 2, "guest", block=18),
    )
    assert [e.source for e in view.events] == ["host", "guest"]
    fleet.apply_mqtt(
        "memhp/v1/vm/g1/events/violation",
        mqtt_event("g1", "violation", 3, "host", kind="unbacked-access", message="m"),
    )
    assert view.host_violations == 1


def test_mqtt_an_event_that_comes_again_is_shown_once() -> None:
    """QoS 1 is at least once: after a reconnection a publisher sends again what the
    broker had not confirmed. A restarted publisher counts from 1 again: new events."""
    fleet = Fleet()
    first = mqtt_event("g1", "violation", 5, "host", kind="unbacked-access", message="m")
    again = fleet.apply_mqtt("memhp/v1/vm/g1/events/violation", first)
    assert fleet.apply_mqtt("memhp/v1/vm/g1/events/violation", first) is again is not None
    assert fleet.ignored == 0
    assert [e.kind for e in again.events] == ["violation"]
    assert again.host_violations == 1
    # The guest's seq 5 is another publisher's.
    fleet.apply_mqtt("memhp/v1/vm/g1/events/ready", mqtt_event("g1", "ready", 5, "guest"))
    restarted = json.loads(first)
    restarted["timestamp"] += 60
    fleet.apply_mqtt("memhp/v1/vm/g1/events/violation", json.dumps(restarted))
    assert [(e.source, e.kind) for e in again.events] == [
        ("host", "violation"),
        ("guest", "ready"),
        ("host", "violation"),
    ]
    assert again.host_violations == 2


def test_mqtt_host_violations_count_what_was_seen() -> None:
    """The state document has no violation count: over MQTT the host's count is partial."""
    fleet = Fleet()
    fleet.apply_vm(vm_pb("grpc", violation_events=3))
    assert not fleet.vms["grpc"].host_violations_partial
    view = fleet.apply_mqtt("memhp/v1/vm/g1/state", mqtt_state("g1"))
    assert view is not None and view.host_violations_partial
    assert view.host_violations == 0


def test_mqtt_state_document() -> None:
    fleet = Fleet()
    view = fleet.apply_mqtt("memhp/v1/vm/g1/state", mqtt_state("g1"))
    assert view is not None
    assert view.attached and view.busy
    assert view.dm_state == "HOT_ADD_REPLY_WAIT"
    assert view.requested_bytes == 6 * GIB
    assert view.actual_bytes == 4 * GIB + 300 * MIB
    assert (view.committed_bytes, view.available_bytes) == (2 * GIB, GIB)
    assert view.backed_bytes == 300 * MIB
    assert view.regions == 1
    assert view.in_flight == InFlight("hot_add", 7, 76800)
    assert view.guest_address == "127.0.0.1:50061"
    assert view.map_note  # no guest document yet
    fleet.apply_mqtt("memhp/v1/vm/g1/state", mqtt_state("g1", in_flight=None, requested_bytes=0))
    assert view.in_flight is None
    assert view.requested_bytes is None
    # No guest attached: nothing to wait for.
    fleet.apply_mqtt("memhp/v1/vm/g1/state", mqtt_state("g1", attached=False))
    assert view.map_note == "no guest attached"


def test_mqtt_guest_document() -> None:
    fleet = Fleet()
    blocks = [[0, 34, "online"], [34, 1, "unbacked"], [35, 2, "offline"], [40, 1, "ballooned"]]
    view = fleet.apply_mqtt("memhp/v1/vm/g1/guest", mqtt_guest("g1", blocks))
    assert view is not None
    assert view.cells == [
        (0, 34, "online"),
        (34, 1, "unbacked"),
        (35, 2, "offline"),
        (40, 1, "ballooned"),
    ]
    assert view.cell_counts() == {"offline": 2, "online": 34, "unbacked": 1, "ballooned": 1}
    assert view.map_source == MAP_GUEST
    assert view.block_size_bytes == 128 * MIB
    assert view.meminfo["MemTotal"] == 4501504
    assert (view.strategy, view.driver_mode, view.guest_dm_state) == (
        "online-then-reclaim",
        "upstream",
        "DM_HOT_ADD",
    )
    assert view.guest_violations == 2
    # The state document after the guest's keeps the map.
    fleet.apply_mqtt("memhp/v1/vm/g1/state", mqtt_state("g1"))
    assert view.cells and view.map_note == ""


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("memhp/v1/vm/g1/state", b"not json"),
        ("memhp/v1/vm/g1/state", b"\xff\xfe"),
        ("memhp/v1/vm/g1/state", json.dumps([1, 2])),
        ("memhp/v1/vm/g1/state", mqtt_state("g1", version=2)),
        ("memhp/v1/vm/g1/state", mqtt_state("g2")),  # the document names another VM
        ("memhp/v2/vm/g1/state", mqtt_state("g1")),
        ("memhp/v1/vm/g1/other", mqtt_state("g1")),
        ("memhp/v1/vm/g1", mqtt_state("g1")),
        ("memhp/v1/vm/g1/guest", mqtt_guest("g1", [[0, "x"]])),  # a run needs three fields
        ("memhp/v1/vm/g1/state", mqtt_state("g1", in_flight={"kind": "hot_add"})),
        ("memhp/v1/vm/g1/events/x/y", mqtt_event("g1", "x")),
        # An event's payload is an object.
        (
            "memhp/v1/vm/g1/events/ready",
            json.dumps({**json.loads(mqtt_event("g1", "ready")), "payload": [1]}),
        ),
    ],
)
def test_mqtt_messages_not_understood_are_counted(topic: str, payload: str | bytes) -> None:
    fleet = Fleet()
    assert fleet.apply_mqtt(topic, payload) is None
    assert fleet.ignored == 1


def test_mqtt_only_the_vms_asked_for() -> None:
    fleet = Fleet(["g2"])
    assert fleet.apply_mqtt("memhp/v1/vm/g1/state", mqtt_state("g1")) is None
    assert fleet.apply_mqtt("memhp/v1/vm/g2/state", mqtt_state("g2")) is not None
    assert list(fleet.vms) == ["g2"]
