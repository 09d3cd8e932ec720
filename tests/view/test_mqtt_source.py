"""The MQTT side of the view without a broker: URLs, topic filters, messages to the model."""

from __future__ import annotations

import aiomqtt
import pytest

from memhp.view.model import Fleet
from memhp.view.mqtt_source import Broker, MqttSource, MqttUrlError, parse_mqtt_url, topics
from tests.view.helpers import mqtt_event, mqtt_guest, mqtt_state


def test_parse_mqtt_url() -> None:
    assert parse_mqtt_url("mqtt://127.0.0.1:1884") == Broker("127.0.0.1", 1884)
    assert parse_mqtt_url("mqtt://broker") == Broker("broker", 1883)
    assert str(Broker("broker", 1883)) == "mqtt://broker:1883"


@pytest.mark.parametrize(
    "url", ["127.0.0.1:1883", "http://h:1", "mqtt://", "mqtt://h:99999", "mqtt://h/topic"]
)
def test_bad_mqtt_urls(url: str) -> None:
    with pytest.raises(MqttUrlError):
        parse_mqtt_url(url)


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
    source = MqttSource(fleet, Broker("127.0.0.1"))
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
