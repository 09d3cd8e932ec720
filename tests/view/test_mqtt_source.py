"""The MQTT side of the view without a broker: topic filters, messages to the model,
which documents are still missing, and the helpers' documents against the schemas.

The broker URL is :mod:`memhp.mqtt`'s (tests/test_mqtt.py); the view against a real
broker and real publishers is tests/process/test_view_mqtt.py.
"""

from __future__ import annotations

import json
from typing import Any

import aiomqtt
import jsonschema
import pytest

from memhp import events
from memhp.mqtt import BrokerUrl
from memhp.view.model import Fleet
from memhp.view.mqtt_source import MqttSource, topics
from tests.view.helpers import mqtt_event, mqtt_guest, mqtt_state


def test_topics_all_or_some_vms() -> None:
    assert topics(Fleet()) == [
        "memhp/v1/vm/+/events/+",
        "memhp/v1/vm/+/state",
        "memhp/v1/vm/+/guest",
    ]
    assert topics(Fleet(["b", "a"])) == [
        "memhp/v1/vm/a/events/+",
        "memhp/v1/vm/a/state",
        "memhp/v1/vm/a/guest",
        "memhp/v1/vm/b/events/+",
        "memhp/v1/vm/b/state",
        "memhp/v1/vm/b/guest",
    ]


def _message(
    topic: str, payload: bytes | bytearray | str | int, retain: bool = False
) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, qos=0, retain=retain, mid=1, properties=None)  # type: ignore[arg-type]


def test_messages_reach_the_model() -> None:
    fleet = Fleet()
    source = MqttSource(fleet, BrokerUrl("127.0.0.1"))
    assert fleet.source == "mqtt://127.0.0.1:1883"
    source._apply(_message("memhp/v1/vm/g1/state", mqtt_state("g1").encode(), retain=True))
    source._apply(
        _message(
            "memhp/v1/vm/g1/guest",
            bytearray(mqtt_guest("g1", [[0, 32, "online"], [32, 2, "unbacked"]]).encode()),
            retain=True,
        )
    )
    source._apply(_message("memhp/v1/vm/g1/events/ready", mqtt_event("g1", "ready")))
    source._apply(_message("memhp/v1/vm/g1/events/ready", 7))
    view = fleet.vms["g1"]
    assert view.cell_counts()["unbacked"] == 2
    assert view.in_flight is not None and view.in_flight.trans_id == 7
    assert [e.kind for e in view.events] == ["ready"]
    assert source.received == 4
    assert fleet.ignored == 1
    assert source.documents == {"g1": {"state", "guest"}}


def _source(*vm_ids: str) -> MqttSource:
    return MqttSource(Fleet(vm_ids), BrokerUrl("127.0.0.1"))


def test_missing_documents_of_every_vm_known() -> None:
    source = _source()
    assert source.missing() == {}  # nothing known: nothing to wait for
    source._apply(_message("memhp/v1/vm/g1/events/ready", mqtt_event("g1", "ready")))
    assert source.missing() == {"g1": ("state", "guest")}
    source._apply(_message("memhp/v1/vm/g1/guest", mqtt_guest("g1", [[0, 8, "online"]]), True))
    assert source.missing() == {"g1": ("state",)}
    source._apply(_message("memhp/v1/vm/g1/state", mqtt_state("g1"), True))
    assert source.missing() == {}
    assert source.last_retained > 0
    # A VM without a guest: the state says so, no guest document to wait for.
    source._apply(_message("memhp/v1/vm/g2/state", mqtt_state("g2", attached=False), True))
    assert source.missing() == {}
    # One with a guest attached that has not published (yet).
    source._apply(_message("memhp/v1/vm/g3/state", mqtt_state("g3"), True))
    assert source.missing() == {"g3": ("guest",)}
    # A document not understood does not count.
    source._apply(_message("memhp/v1/vm/g3/guest", b"{}"))
    assert source.missing() == {"g3": ("guest",)}


def test_missing_documents_of_the_vms_asked_for() -> None:
    source = _source("g1", "g2")
    assert source.missing() == {"g1": ("state", "guest"), "g2": ("state", "guest")}
    source._apply(_message("memhp/v1/vm/g2/state", mqtt_state("g2", attached=False), True))
    assert source.missing() == {"g1": ("state", "guest")}


@pytest.mark.parametrize(
    ("name", "document"),
    [
        ("state", mqtt_state("g1")),
        ("state", mqtt_state("g1", in_flight=None, requested_bytes=0, attached=False)),
        ("guest", mqtt_guest("g1", [[0, 34, "online"], [34, 1, "unbacked"]])),
        ("event", mqtt_event("g1", "hot_add_request", 3, "host", trans_id=3, form=24)),
    ],
)
def test_the_helpers_documents_are_what_the_publishers_send(name: str, document: str) -> None:
    """The view's tests build documents by hand: they must match the shipped schemas."""
    doc: dict[str, Any] = json.loads(document)
    jsonschema.Draft202012Validator(events.schema(name)).validate(doc)
