"""memhp/mqtt.py against a real mosquitto: the URL, the bound, drops, reconnects, order.

The publisher's promise is that :meth:`MqttPublisher.offer` never blocks, whatever
the broker does; these tests hold it to that with the broker up, down at start, and
killed and restarted on the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jsonschema
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from memhp import events
from memhp.cli import build_parser
from memhp.mqtt import (
    BrokerUrl,
    Coalescer,
    MqttPublisher,
    MqttUrlError,
    broker_url_arg,
    parse_broker_url,
)
from tests.mosquitto import Mosquitto, Subscriber, free_port

EVENT_SCHEMA = jsonschema.Draft202012Validator(events.schema("event"))


# -- the URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("mqtt://broker", BrokerUrl("broker", 1883)),
        ("mqtt://127.0.0.1:1884", BrokerUrl("127.0.0.1", 1884)),
        ("mqtt://broker:1883/", BrokerUrl("broker", 1883)),
        ("mqtt://[::1]:2000", BrokerUrl("::1", 2000)),
    ],
)
def test_parse_broker_url(text: str, url: BrokerUrl) -> None:
    assert parse_broker_url(text) == url


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("broker:1883", "scheme"),
        ("http://broker", "scheme"),
        ("mqtt://", "no host"),
        ("mqtt://broker:0", "1..65535"),
        ("mqtt://broker:99999", "1..65535"),
        ("mqtt://broker:port", "1..65535"),
        ("mqtt://user:pw@broker", "passwords"),
        ("mqtt://broker/topic", "path"),
    ],
)
def test_bad_broker_url(text: str, why: str) -> None:
    with pytest.raises(MqttUrlError, match=why):
        parse_broker_url(text)
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        broker_url_arg(text)


def test_broker_url_round_trips() -> None:
    assert str(BrokerUrl("::1", 2000)) == "mqtt://[::1]:2000"
    assert parse_broker_url(str(BrokerUrl("h", 7))) == BrokerUrl("h", 7)


@pytest.mark.parametrize(
    "argv",
    [
        ["hypervisor", "--mqtt", "tcp://localhost"],
        ["guest", "--hypervisor", "127.0.0.1:1", "--vm-id", "g", "--mqtt", "mqtt://"],
        ["hypervisor", "--mqtt", "mqtt://h", "--mqtt-queue", "0"],
    ],
)
def test_bad_mqtt_flag_exits_2_naming_it(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--mqtt" in err


def test_guest_vm_id_that_is_no_topic_level_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["guest", "--hypervisor", "127.0.0.1:1", "--vm-id", "a/b", "--mqtt", "mqtt://h"]
    args = build_parser().parse_args(argv)  # not main(): it would configure logging
    assert args.func(args) == 2
    assert "--vm-id" in capsys.readouterr().err


# -- the publisher ----------------------------------------------------------------------

Publishers = Callable[..., MqttPublisher]


@pytest_asyncio.fixture
async def publishers() -> AsyncIterator[Publishers]:
    """A maker of started publishers; every one is closed at the end."""
    made: list[MqttPublisher] = []

    def make(url: BrokerUrl, **kwargs: Any) -> MqttPublisher:
        p = MqttPublisher(url, source=kwargs.pop("source", "host"), **kwargs)
        p.start()
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            await p.aclose(grace=0.5)


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def _seqs(sub: Subscriber, kind: str = "e") -> list[int]:
    return [e["seq"] for e in sub.events() if e["kind"] == kind]


async def test_events_arrive_in_order_and_validate(
    mosquitto: Mosquitto, publishers: Publishers
) -> None:
    async with Subscriber(mosquitto.port, events.ALL_VMS) as sub:
        pub = publishers(mosquitto.broker, window=8)
        for i in range(300):
            assert pub.offer_event("g1", "e", {"i": i}, timestamp=1000.0 + i)
        await sub.wait_for(lambda ms: len(ms) >= 300, what="300 events")
        await asyncio.sleep(0.1)
    envelopes = sub.events()
    assert len(envelopes) == 300  # no duplicates on a healthy connection
    for e in envelopes:
        EVENT_SCHEMA.validate(e)
    assert [e["payload"]["i"] for e in envelopes] == list(range(300))
    assert [e["seq"] for e in envelopes] == list(range(1, 301))
    assert {m.topic for m in sub.messages} == {"memhp/v1/vm/g1/events/e"}
    assert envelopes[0] == {
        "version": 1,
        "timestamp": 1000.0,
        "vm": "g1",
        "kind": "e",
        "source": "host",
        "seq": 1,
        "payload": {"i": 0},
    }
    await wait_until(lambda: pub.published == 300, what="300 confirmed")
    assert pub.stats() == {"published": 300, "dropped": 0}


async def test_retained_documents_are_latest_per_topic(
    mosquitto: Mosquitto, publishers: Publishers
) -> None:
    pub = publishers(mosquitto.broker, max_queue=1)
    pub.offer_event("g1", "e", {})  # fills the queue
    for i in range(50):
        # Never dropped: superseded.
        assert pub.offer(events.state_topic("g1"), json.dumps({"i": i}).encode(), retain=True)
    await wait_until(lambda: pub.published == 1 and not pub._dirty, what="flushed")
    # A late subscriber gets the latest document only.
    async with Subscriber(mosquitto.port, events.state_topic("g1")) as late:
        got = await late.wait_for(lambda ms: ms, what="the retained state")
        await asyncio.sleep(0.1)
    assert len(late.messages) == 1
    assert got[0].retain and got[0].json() == {"i": 49}
    assert pub.dropped == 0


async def test_offer_never_blocks_and_counts_drops_when_the_broker_is_down(
    publishers: Publishers,
) -> None:
    # Nothing listens on this port: every connection attempt fails.
    pub = publishers(BrokerUrl("127.0.0.1", free_port()), max_queue=100, backoff_max=0.2)
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    try:
        start = time.perf_counter()
        accepted = [pub.offer_event("g1", "e", {"i": i}) for i in range(5000)]
        elapsed = time.perf_counter() - start
        await wait_until(lambda: pub.losses >= 3, what="three failed connection attempts")
    finally:
        tick.cancel()
    assert accepted.count(True) == 100 and accepted[:100] == [True] * 100
    assert pub.dropped == 4900 and pub.queued == 100
    assert pub.stats() == {"published": 0, "dropped": 4900}
    assert elapsed < 1.0, f"5000 offers took {elapsed:.3f} s"
    assert not pub.connected
    # The loop kept running while the publisher retried (connects run off the loop).
    assert lags and max(lags) < 0.2, max(lags)
    t = time.monotonic()
    await pub.aclose(grace=5.0)
    assert time.monotonic() - t < 1.0  # no broker: nothing to flush, no waiting


async def test_broker_down_at_start_then_up_reports_drops(
    mosquitto: Mosquitto, publishers: Publishers
) -> None:
    await mosquitto.stop()
    with capture_logs() as logs:
        pub = publishers(mosquitto.broker, max_queue=10, backoff_initial=1.0, backoff_max=1.0)
        for i in range(15):
            pub.offer_event("g1", "e", {"i": i})
        pub.offer_event("g2", "e", {"i": 15})
        pub.offer(events.state_topic("g1"), b'{"doc": 1}', retain=True)
        assert pub.dropped == 6 and pub.queued == 10
        # Start the broker right after a failed attempt: the next one is >= 0.5 s away,
        # time enough for the subscriber to be there first.
        await wait_until(lambda: pub.losses >= 1, what="a failed attempt")
        losses = pub.losses
        await wait_until(lambda: pub.losses > losses, what="another failed attempt")
        await mosquitto.start()
        async with Subscriber(mosquitto.port, events.ALL_VMS) as sub:
            await sub.wait_for(
                lambda ms: any("events_dropped" in m.topic for m in ms) and len(ms) >= 13,
                what="the backlog and the drop reports",
            )
            await asyncio.sleep(0.2)
    envelopes = sub.events()
    for e in envelopes:
        EVENT_SCHEMA.validate(e)
    assert [e["seq"] for e in envelopes if e["kind"] == "e"] == list(range(1, 11))
    reports = {e["vm"]: e for e in envelopes if e["kind"] == "events_dropped"}
    assert {vm: e["payload"] for vm, e in reports.items()} == {
        "g1": {"dropped": 5},
        "g2": {"dropped": 1},
    }
    assert all(e["seq"] > 16 for e in reports.values())
    state = [m for m in sub.messages if m.topic == events.state_topic("g1")]
    assert state and state[-1].json() == {"doc": 1}
    await wait_until(lambda: pub.published == 12, what="12 confirmed")
    assert pub.connects == 1
    warnings = [(e["event"], e.get("dropped")) for e in logs if e["log_level"] == "warning"]
    assert ("mqtt_dropping_events", 1) in warnings  # when drops start
    assert ("mqtt_broker_back", 6) in warnings  # when the broker is back
    assert [w for w in warnings if w[0] == "mqtt_dropping_events"] == [("mqtt_dropping_events", 1)]


async def test_reconnects_after_the_broker_restarts_on_the_same_port(
    mosquitto: Mosquitto, publishers: Publishers
) -> None:
    pub = publishers(mosquitto.broker, backoff_initial=1.0, backoff_max=1.0)
    async with Subscriber(mosquitto.port, events.ALL_VMS) as sub:
        pub.offer(events.state_topic("g1"), b'{"doc": "before"}', retain=True)
        pub.offer_event("g1", "e", {"i": 0})
        await sub.wait_for(lambda ms: len(ms) >= 2, what="the first event")
        await mosquitto.kill()  # SIGKILL: no goodbye
        await wait_until(lambda: not pub.connected, what="the publisher saw the broker die")
    for i in range(1, 4):
        assert pub.offer_event("g1", "e", {"i": i})  # queued while the broker is dead
    pub.offer(events.state_topic("g1"), b'{"doc": "after"}', retain=True)
    losses = pub.losses
    await wait_until(lambda: pub.losses > losses, what="a failed attempt on the dead broker")
    await mosquitto.start()  # the same port; no persistence: nothing retained
    async with Subscriber(mosquitto.port, events.ALL_VMS) as sub2:
        await sub2.wait_for(lambda ms: len(_seqs(sub2)) >= 3, what="the events held back")
        await asyncio.sleep(0.2)
    assert pub.connects == 2
    assert _seqs(sub2) == [2, 3, 4]
    state = [m for m in sub2.messages if m.topic == events.state_topic("g1")]
    assert state[-1].json() == {"doc": "after"}
    assert pub.dropped == 0


async def test_aclose_flushes_what_is_queued(mosquitto: Mosquitto) -> None:
    async with Subscriber(mosquitto.port, events.ALL_VMS) as sub:
        pub = MqttPublisher(mosquitto.broker, source="guest")
        pub.start()
        for i in range(200):
            pub.offer_event("g1", "e", {"i": i})
        await pub.aclose(grace=5.0)
        await sub.wait_for(lambda ms: len(ms) >= 200, what="every event")
    assert _seqs(sub) == list(range(1, 201))
    assert {e["source"] for e in sub.events()} == {"guest"}
    assert pub.published == 200


def test_publisher_rejects_bad_arguments() -> None:
    url = BrokerUrl("h")
    with pytest.raises(ValueError, match="source"):
        MqttPublisher(url, source="hypervisor")
    with pytest.raises(ValueError, match="max_queue"):
        MqttPublisher(url, source="host", max_queue=0)


async def test_offer_event_checks_the_topic_levels() -> None:
    pub = MqttPublisher(BrokerUrl("h"), source="host")
    with pytest.raises(events.TopicError):
        pub.offer_event("a/b", "e", {})
    with pytest.raises(events.TopicError):
        pub.offer_event("g1", "Bad-Kind", {})


# -- the coalescer ----------------------------------------------------------------------


async def test_coalescer_flushes_at_most_once_per_interval_and_sees_the_latest() -> None:
    state = {"value": 0}
    flushed: list[tuple[float, int]] = []
    c = Coalescer(0.2, lambda: flushed.append((time.monotonic(), state["value"])))
    start = time.monotonic()
    for i in range(100):
        state["value"] = i
        c.mark()
    await asyncio.sleep(0.05)
    assert [v for _, v in flushed] == [99]  # the first flush is immediate, with the latest
    state["value"] = 100
    c.mark()
    c.mark()
    await asyncio.sleep(0.05)
    assert len(flushed) == 1  # within the interval: waits
    await asyncio.sleep(0.3)
    assert [v for _, v in flushed] == [99, 100]
    assert flushed[1][0] - flushed[0][0] >= 0.19
    assert flushed[0][0] - start < 0.05
    c.mark()
    c.flush_now()
    assert len(flushed) == 3
    await asyncio.sleep(0.3)
    assert len(flushed) == 3  # flush_now cancelled the scheduled one
