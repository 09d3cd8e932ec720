"""guest.mqtt_events: the guest's events and its retained memory map, without a broker.

The publisher is not started: what it was offered is read back from its queue and its
retained documents. The guest is a GuestVm driven by hand (tests/guest/test_hv_balloon).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from guest.blockmap import block_cells, run_length
from guest.mqtt_events import GuestMqtt, guest_document
from guest.vm import GuestConfig, GuestVm
from memhp import events
from memhp.mqtt import BrokerUrl, MqttPublisher
from tests.guest.test_hv_balloon import BOOT, GIB, MIB, NO_REPORTS, Host, R, negotiate

EVENT = jsonschema.Draft202012Validator(events.schema("event"))
GUEST = jsonschema.Draft202012Validator(events.schema("guest"))


def rig(**kw: Any) -> tuple[Host, GuestMqtt, MqttPublisher]:
    pub = MqttPublisher(BrokerUrl("127.0.0.1"), source="guest")
    holder: list[GuestVm] = []
    sink = GuestMqtt("g", pub, lambda: holder[0] if holder else None, interval=0.01)
    g = GuestVm(
        GuestConfig("g", boot_pages=BOOT, pressure_report_delay=NO_REPORTS, **kw),
        on_event=sink.on_event,
    )
    holder.append(g)
    negotiate(g)
    h = Host(g)
    h.backed.add(0, BOOT)
    h.pump()
    return h, sink, pub


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until the publisher's coalescer has caught up (a loaded machine may take a while)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "the publisher did not catch up"
        await asyncio.sleep(0.01)


def envelopes(pub: MqttPublisher) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in pub._queue]


def document(pub: MqttPublisher) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(pub._retained[events.guest_topic("g")])
    return doc


async def test_events_and_the_memory_map_after_partial_backing() -> None:
    h, _sink, pub = rig(auto_online_blocks="online")
    h.hot_add(R, 300 * MIB, (R, GIB))
    expected_map = [[0, 34, "online"], [34, 1, "unbacked"]]
    await until(
        lambda: events.guest_topic("g") in pub._retained and document(pub)["blocks"] == expected_map
    )
    out = envelopes(pub)
    for e in out:
        EVENT.validate(e)
        assert e["source"] == "guest" and e["vm"] == "g"
        assert events.catalogue_entry("guest", e["kind"]) is not None
    kinds = [e["kind"] for e in out]
    assert kinds[:2] == ["version_accepted", "negotiated"]
    assert kinds.count("block_onlined") == 3 and kinds[-1] == "hot_add_done"
    assert out[-1]["payload"] == {"page_count": 300 * MIB, "result": 1}
    assert [e["seq"] for e in out] == list(range(1, len(out) + 1))

    doc = document(pub)
    GUEST.validate(doc)
    g = h.g
    # Blocks 0-31 boot memory, 32 and 33 fully backed, 34 partly (unbacked pages).
    assert doc["blocks"] == [[0, 34, "online"], [34, 1, "unbacked"]]
    assert doc["blocks"] == [list(r) for r in run_length(block_cells(g.mm))]
    assert doc["meminfo"] == g.mm.meminfo()
    assert doc["block_size_bytes"] == 128 << 20
    assert (doc["strategy"], doc["driver_mode"], doc["dm_state"]) == (
        "callback",
        "upstream",
        "DM_INITIALIZED",
    )
    assert doc["violations"] == 0
    assert doc["mqtt"] == {"published": 0, "dropped": 0}
    assert "violation" not in kinds


async def test_a_new_checker_finding_is_published_once() -> None:
    h, sink, pub = rig()
    await until(lambda: events.guest_topic("g") in pub._retained)
    # The host unballoons boot memory that was never ballooned (E6): the driver's finding.
    h.unballoon([(0x10000, 512)])
    await until(lambda: document(pub)["violations"] == 1)
    found = [e for e in envelopes(pub) if e["kind"] == "violation"]
    assert [e["payload"]["invariant"] for e in found] == ["unballoon-not-ballooned"]
    assert found[0]["payload"]["start_pfn"] == 0x10000
    assert document(pub)["violations"] == 1
    sink.state_changed()
    await asyncio.sleep(0.05)
    assert len([e for e in envelopes(pub) if e["kind"] == "violation"]) == 1
    await sink.aclose(grace=0.01)


async def test_no_document_before_the_guest_exists() -> None:
    pub = MqttPublisher(BrokerUrl("127.0.0.1"), source="guest")
    sink = GuestMqtt("g", pub, lambda: None, interval=0.01)
    sink.on_event("log", {"message": "x"})
    await asyncio.sleep(0.05)
    assert pub._retained == {}
    assert [e["kind"] for e in envelopes(pub)] == ["log"]


def test_guest_mqtt_refuses_a_vm_id_that_is_not_a_topic_level() -> None:
    pub = MqttPublisher(BrokerUrl("127.0.0.1"), source="guest")
    with pytest.raises(events.TopicError):
        GuestMqtt("a/b", pub, lambda: None)


def test_guest_document_of_a_fresh_guest() -> None:
    g = GuestVm(GuestConfig("g", boot_pages=BOOT))
    doc = guest_document(g, violations=0, mqtt={"published": 1, "dropped": 2}, timestamp=3.0)
    GUEST.validate(doc)
    assert doc["blocks"] == [[0, 32, "online"]]
    assert doc["timestamp"] == 3.0 and doc["dm_state"] == "DM_INITIALIZING"


async def test_a_failing_publisher_never_reaches_the_guest() -> None:
    pub = MqttPublisher(BrokerUrl("127.0.0.1"), source="guest")

    def broken(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("boom")

    pub.offer_event = broken  # type: ignore[method-assign]
    sink = GuestMqtt("g", pub, lambda: None)
    sink.on_event("log", {"message": "x"})  # logged, not raised
