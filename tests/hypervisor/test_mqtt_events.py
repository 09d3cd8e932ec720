"""hypervisor.mqtt_events: every hub event becomes an MQTT event, each VM a state document.

The publisher is not started here (no broker): what it was offered is read from its
queue and its retained documents, so the test sees exactly what would go out. A
:class:`Hypervisor` in process is driven through attach, negotiation, a hot-add with
partial backing, a policy decision and a detach, the runtime's own events included.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema

from hypervisor.mqtt_events import HostMqtt, state_document
from hypervisor.policy import make_dynamic
from hypervisor.runtime import Defaults, EventHub, Hypervisor, PublishedEvent
from hypervisor.store import StateStore
from hypervisor.vm import VmConfig
from memhp import events, wire
from memhp.dm import (
    DYNMEM_PROTOCOL_VERSION_3,
    CapabilitiesReport,
    DmMessage,
    HotAddResponse,
    StatusReport,
    VersionRequest,
)
from memhp.mqtt import BrokerUrl, MqttPublisher
from tests.hypervisor.helpers import BLOCK, BOOT, MAX, tid

EVENT = jsonschema.Draft202012Validator(events.schema("event"))
STATE = jsonschema.Draft202012Validator(events.schema("state"))
PAGE = 4096


def offered(pub: MqttPublisher) -> list[dict[str, Any]]:
    """The event envelopes waiting in the (not started) publisher's queue."""
    return [json.loads(m.payload) for m in pub._queue]


def retained(pub: MqttPublisher, topic: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(pub._retained[topic])
    return doc


async def test_every_hub_event_goes_out_and_the_state_follows() -> None:
    hv = Hypervisor(StateStore(None), defaults=Defaults(BOOT, MAX, BLOCK))
    hv.create_vm(VmConfig("before", BOOT, MAX, BLOCK))  # before the bridge: no event
    pub = MqttPublisher(BrokerUrl("127.0.0.1"), source="host")
    bridge = HostMqtt(hv, pub, interval=0.01)
    hub_events: list[PublishedEvent] = []
    hv.events.add_sink(hub_events.append)
    bridge.start()

    def frame(h: Any, msg: DmMessage) -> None:
        hv.guest_frame(h, wire.to_frame(msg))

    handle = hv.attach("g1", None, guest_address="127.0.0.1:5")  # made from the defaults
    frame(handle, VersionRequest(tid(), DYNMEM_PROTOCOL_VERSION_3))
    frame(handle, CapabilitiesReport(tid(), balloon=True, hot_add=True, hot_add_alignment=7))
    hv.command("g1", lambda s, now: s.hot_add(2 * BLOCK, BLOCK + 100, now))
    await asyncio.sleep(0.05)
    busy = retained(pub, events.state_topic("g1"))
    assert busy["busy"] and busy["in_flight"] == {
        "kind": "hot_add",
        "trans_id": busy["in_flight"]["trans_id"],
        "pages": BLOCK + 100,
    }
    frame(handle, HotAddResponse(tid(), page_count=BLOCK + 100, result=1))
    hv.set_policy("g1", make_dynamic(handle.config, 10, 0, 0))
    # Little committed: the policy shrinks the VM (a balloon request goes out).
    frame(handle, StatusReport(tid(), num_avail=1000, num_committed=BOOT // 4))
    hv.detach(handle, handle.epoch, "test")
    await asyncio.sleep(0.05)

    out = offered(pub)
    # One MQTT event per hub event, in order, with the same payload and timestamp.
    assert [(e["vm"], e["kind"]) for e in out] == [(e.vm_id, e.kind) for e in hub_events]
    assert [e["payload"] for e in out] == [json.loads(json.dumps(e.payload)) for e in hub_events]
    assert [e["timestamp"] for e in out] == [e.timestamp for e in hub_events]
    assert [e["seq"] for e in out] == list(range(1, len(out) + 1))
    kinds = [e["kind"] for e in out]
    for k in (
        "vm_created",
        "attach",
        "negotiated",
        "hot_add_request",
        "hot_add_response",
        "policy",
        "status_report",
        "policy_decision",
        "detach",
    ):
        assert k in kinds, k
    assert kinds.index("attach") < kinds.index("hot_add_request") < kinds.index("detach")
    for e in out:
        EVENT.validate(e)
        assert e["source"] == "host"
        entry = events.catalogue_entry("host", e["kind"])
        assert entry is not None, e["kind"]
        assert set(e["payload"]) <= set(entry.fields), (e["kind"], set(e["payload"]))

    # The retained state: every VM, the latest, valid.
    assert set(pub._retained) == {events.state_topic("before"), events.state_topic("g1")}
    before = retained(pub, events.state_topic("before"))
    STATE.validate(before)
    assert before["attached"] is False and before["regions"] == 0
    doc = retained(pub, events.state_topic("g1"))
    STATE.validate(doc)
    session = handle.session
    assert doc == {
        "version": 1,
        "timestamp": doc["timestamp"],
        "vm": "g1",
        "attached": False,
        "dm_state": session.state,
        # committed * 1.1 rounded up to a block: 2 blocks.
        "requested_bytes": 2 * BLOCK * PAGE,
        "actual_bytes": (BOOT + BLOCK + 100) * PAGE,
        "committed_bytes": BOOT // 4 * PAGE,
        "available_bytes": 1000 * PAGE,
        "ballooned_bytes": 0,
        "busy": session.busy,
        "in_flight": {
            "kind": "balloon",
            "trans_id": doc["in_flight"]["trans_id"],
            "pages": BOOT + BLOCK + 100 - 2 * BLOCK,
        },
        "regions": 1,
        "backed_bytes": (BLOCK + 100) * PAGE,
        "guest_address": "",
        "mqtt": {"published": 0, "dropped": 0},
        "virtio_mem": None,
    }

    # Closing publishes the last state of every VM and stops taking events.
    await bridge.aclose(grace=0.01)
    n = len(hv.events._sinks)
    hv.create_vm(VmConfig("after", BOOT, MAX, BLOCK))
    assert len(offered(pub)) == len(out)
    assert len(hv.events._sinks) == n


async def test_state_documents_are_coalesced_per_vm() -> None:
    interval = 0.5
    hv = Hypervisor(StateStore(None), defaults=Defaults(BOOT, MAX, BLOCK))
    pub = MqttPublisher(BrokerUrl("127.0.0.1"), source="host")
    bridge = HostMqtt(hv, pub, interval=interval)
    bridge.start()
    loop = asyncio.get_running_loop()
    written: list[tuple[str, float]] = []
    original = pub.offer

    def spy(topic: str, payload: bytes, **kw: Any) -> bool:
        if kw.get("retain"):
            written.append((topic, loop.time()))
        return original(topic, payload, **kw)

    pub.offer = spy  # type: ignore[method-assign]
    handle = hv.attach("g1", None)
    for _ in range(50):
        hv.guest_frame(handle, wire.to_frame(StatusReport(tid(), 1, 2)))
    await asyncio.sleep(0.05)
    # The first at once, then at most one per interval however many changes come.
    assert [t for t, _ in written] == [events.state_topic("g1")]
    for _ in range(50):
        hv.guest_frame(handle, wire.to_frame(StatusReport(tid(), 1, 2)))
    await asyncio.sleep(0.05)
    assert len(written) == 1
    deadline = loop.time() + 10
    while len(written) < 2 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert [t for t, _ in written] == [events.state_topic("g1")] * 2
    assert written[1][1] - written[0][1] >= interval * 0.9
    await bridge.aclose(grace=0.01)


def test_a_failing_sink_does_not_stop_the_others() -> None:
    hub = EventHub()
    got: list[str] = []

    def broken(event: PublishedEvent) -> None:
        raise RuntimeError("boom")

    hub.add_sink(broken)
    hub.add_sink(lambda e: got.append(e.kind))
    sub = hub.subscribe()
    hub.publish(PublishedEvent(0.0, "g", "k", {}))
    assert got == ["k"]
    assert sub.queue.qsize() == 1
    hub.remove_sink(broken)
    hub.remove_sink(broken)  # twice: nothing happens


def test_state_document_of_a_fresh_vm() -> None:
    hv = Hypervisor(StateStore(None), defaults=None)
    handle = hv.create_vm(VmConfig("g", BOOT, MAX, BLOCK))
    doc = state_document(handle, {"published": 3, "dropped": 4}, timestamp=5.0)
    STATE.validate(doc)
    assert doc["timestamp"] == 5.0
    assert doc["actual_bytes"] == BOOT * PAGE
    assert doc["requested_bytes"] == 0 and doc["in_flight"] is None
    assert doc["mqtt"] == {"published": 3, "dropped": 4}


def test_a_virtio_mem_vms_state_document_has_its_device() -> None:
    from hypervisor.vm import VirtioMemSettings

    hv = Hypervisor(StateStore(None), defaults=None)
    settings = VirtioMemSettings(region_size=1 << 30, addr=4 << 30)
    handle = hv.create_vm(VmConfig("v", 262_144, 262_144, 32_768, "virtio-mem", settings))
    hv.resize("v", 64 << 20)
    doc = state_document(handle, {"published": 0, "dropped": 0}, timestamp=1.0)
    assert doc["dm_state"] == ""
    assert doc["virtio_mem"] == {
        "requested_bytes": 64 << 20,
        "plugged_bytes": 0,
        "block_size_bytes": 2 << 20,
        "region_size_bytes": 1 << 30,
        "usable_region_size_bytes": 320 << 20,
        "addr": 4 << 30,
        "node_id": 0,
    }
    STATE.validate(doc)
