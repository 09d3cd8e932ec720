"""Events over MQTT end to end: a real mosquitto, ``memhp hypervisor`` and ``memhp guest``.

A subscriber on ``memhp/v1/vm/+/#`` is there before the processes start. The partial
backing story (a region partly backed, later backing) must produce its events in
order, each side's in its publisher's order and across the two sides in causal order;
every message must validate against the shipped JSON Schemas and the catalogue; and
a late subscriber must find the retained ``state`` and ``guest`` documents, equal to
what Control and the guest's introspection say.

Then the broker is killed (SIGKILL) in the middle of a run: every command must still
complete, and the end state of both sides must equal that of the same run without
MQTT. Restarted on the same port, the broker gets the publishers back: they report
what they dropped (``events_dropped``, the documents' ``mqtt`` object, the logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from memhp import events
from memhp.v1 import control_pb2
from tests.mosquitto import Mosquitto, Received, Subscriber
from tests.process.conftest import HvProcess, StartHypervisor
from tests.process.conftest_guest import GuestProcess, guest_children, start_guest, wait_until

MIB = 1 << 20
GIB = 1 << 30
PAGES_PER_MIB = 256
VALIDATORS = {
    name: jsonschema.Draft202012Validator(events.schema(name)) for name in events.SCHEMA_NAMES
}
GUEST_ARGS = ("--pressure-report-delay", "0", "--udev-online", "online_movable")


def validate(m: Received) -> dict[str, Any]:
    """The message's JSON, checked against its topic's schema (and the catalogue)."""
    topic = events.parse_topic(m.topic)
    assert topic is not None, m.topic
    doc: dict[str, Any] = m.json()
    if topic.what == "events":
        VALIDATORS["event"].validate(doc)
        assert (doc["vm"], doc["kind"]) == (topic.vm, topic.kind)
        entry = events.catalogue_entry(doc["source"], doc["kind"])
        assert entry is not None, f"{doc['source']} {doc['kind']} is not catalogued"
        extra = set(doc["payload"]) - set(entry.fields)
        assert not extra, f"{doc['kind']}: undocumented payload fields {extra}"
        assert not m.retain
    else:
        VALIDATORS[topic.what].validate(doc)
        assert doc["vm"] == topic.vm
    return doc


def of(envelopes: list[dict[str, Any]], source: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in envelopes if e["source"] == source and e["kind"] == kind]


def subsequence(wanted: list[str], kinds: list[str]) -> bool:
    it = iter(kinds)
    return all(k in it for k in wanted)


async def _idle(hv: HvProcess, vm_id: str) -> bool:
    vm = await hv.get_vm(vm_id)
    return vm.attached and vm.dm_state == "IDLE" and not vm.busy


async def _added(hv: HvProcess, vm_id: str, pages: int) -> bool:
    vm = await hv.get_vm(vm_id)
    return sum(r.added_pages for r in vm.regions) == pages and not vm.busy


async def _online(guest: GuestProcess, blocks: range) -> bool:
    memory = await guest.memory()
    states = {b.index: b.state for b in memory.blocks}
    return all(states.get(i) == "online" for i in blocks)


async def test_partial_backing_story_events_in_order_and_retained_documents(
    mosquitto: Mosquitto, start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    async with Subscriber(mosquitto.port, events.ALL_VMS) as sub:
        hv = await start_hypervisor("--no-default-vm", "--mqtt", mosquitto.url)
        await hv.create_vm("g1", boot=2 * GIB, max_bytes=8 * GIB)
        async with guest_children() as children:
            guest = await start_guest(
                tmp_path, hv.address, *GUEST_ARGS, "--mqtt", mosquitto.url, vm_id="g1"
            )
            children.append(guest)
            await wait_until(lambda: _idle(hv, "g1"), what="g1 attached and idle")
            # 512 MiB with 300 MiB backed (blocks 16-18), then 100 MiB more: 84 MiB
            # fill block 18 at once, 16 MiB come with block 19.
            await hv.control.HotAdd(
                control_pb2.HotAddCommand(
                    vm_id="g1", region_bytes=512 * MIB, backed_bytes=300 * MIB
                )
            )
            await wait_until(lambda: _added(hv, "g1", 300 * PAGES_PER_MIB), what="added")
            await wait_until(lambda: _online(guest, range(16, 19)), what="blocks 16-18 online")
            await hv.control.Back(control_pb2.BackCommand(vm_id="g1", size_bytes=100 * MIB))
            await wait_until(lambda: _added(hv, "g1", 400 * PAGES_PER_MIB), what="backed")
            await wait_until(lambda: _online(guest, range(16, 20)), what="block 19 online")
            vm = await hv.get_vm("g1")
            memory = await guest.memory()

            def settled(ms: list[Received]) -> bool:
                state = [m.json() for m in ms if m.topic == events.state_topic("g1")]
                docs = [m.json() for m in ms if m.topic == events.guest_topic("g1")]
                return bool(
                    state
                    and docs
                    and state[-1]["backed_bytes"] == 400 * MIB
                    and not state[-1]["busy"]
                    and docs[-1]["meminfo"] == dict(memory.meminfo)
                    and any("pages_onlined" in m.topic for m in ms)
                )

            await sub.wait_for(settled, what="the documents of the settled VM")

            # A late subscriber gets both retained documents at once.
            async with Subscriber(
                mosquitto.port, events.state_topic("g1"), events.guest_topic("g1")
            ) as late:
                await late.wait_for(lambda ms: len(ms) >= 2, what="the retained documents")
            retained = {m.topic: m for m in late.messages}

    # -- every message is valid -------------------------------------------------------
    assert sub.messages
    for m in sub.messages:
        validate(m)
    envelopes = sub.events()

    # -- each side's events in its publisher's order -------------------------------
    for source in ("host", "guest"):
        seqs = [e["seq"] for e in envelopes if e["source"] == source]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), source
        assert seqs[0] == 1 and seqs[-1] == len(seqs), f"{source}: a gap, nothing was dropped"
    host = [e["kind"] for e in envelopes if e["source"] == "host"]
    guest_kinds = [e["kind"] for e in envelopes if e["source"] == "guest"]
    assert subsequence(
        [
            "vm_created",
            "attach",
            "negotiated",
            "hot_add_request",
            "hot_add_response",
            "hot_add_request",
            "hot_add_response",
        ],
        host,
    ), host
    assert subsequence(
        [
            "negotiated",
            "block_added",
            "block_onlined",
            "block_added",
            "block_onlined",
            "block_added",
            "block_onlined",
            "hot_add_done",
            "pages_onlined",
            "block_added",
            "block_onlined",
            "hot_add_done",
        ],
        guest_kinds,
    ), guest_kinds
    assert all(e["vm"] == "g1" for e in envelopes)

    # -- what they say ------------------------------------------------------------------
    first_request, later_request = of(envelopes, "host", "hot_add_request")[:2]
    assert first_request["payload"]["form"] == 24
    assert first_request["payload"]["range"] == [2 * GIB // 4096, 300 * PAGES_PER_MIB]
    assert first_request["payload"]["region"] == [2 * GIB // 4096, 512 * PAGES_PER_MIB]
    assert later_request["payload"]["form"] == 16 and later_request["payload"]["region"] is None
    responses = of(envelopes, "host", "hot_add_response")
    assert [r["payload"]["page_count"] for r in responses[:2]] == [
        300 * PAGES_PER_MIB,
        100 * PAGES_PER_MIB,
    ]
    added = of(envelopes, "guest", "block_added")
    assert [e["payload"]["block"] for e in added] == [16, 17, 18, 19]
    onlined = of(envelopes, "guest", "block_onlined")
    assert [(e["payload"]["block"], e["payload"]["online_type"]) for e in onlined] == [
        (b, "online_movable") for b in (16, 17, 18, 19)
    ]
    assert {e["payload"]["zone"] for e in onlined} == {"Movable"}
    (pages_onlined,) = of(envelopes, "guest", "pages_onlined")
    start = (2 * GIB + 300 * MIB) // 4096
    assert pages_onlined["payload"] == {
        "start_pfn": start,
        "end_pfn": start + 84 * PAGES_PER_MIB,
        "pages": 84 * PAGES_PER_MIB,
    }

    # -- across the two sides, causal order (one clock: the same machine) -----------
    def ts(e: dict[str, Any]) -> float:
        return float(e["timestamp"])

    (attach,) = of(envelopes, "host", "attach")
    assert ts(attach) <= ts(of(envelopes, "guest", "negotiated")[0])
    done = of(envelopes, "guest", "hot_add_done")
    assert ts(first_request) <= ts(added[0]) <= ts(done[0]) <= ts(responses[0])
    assert ts(later_request) <= ts(pages_onlined) <= ts(done[1]) <= ts(responses[1])

    # -- the retained documents, as Control and the guest's introspection say -------
    state = validate(retained[events.state_topic("g1")])
    assert retained[events.state_topic("g1")].retain
    assert state["attached"] is True and state["dm_state"] == "IDLE"
    assert state["actual_bytes"] == vm.actual_bytes == 2 * GIB + 400 * MIB
    assert state["regions"] == len(vm.regions) == 1
    assert state["backed_bytes"] == 400 * MIB
    assert state["in_flight"] is None and state["busy"] is False
    assert state["guest_address"] == vm.guest_address != ""
    assert state["mqtt"]["dropped"] == 0 and state["mqtt"]["published"] > 0
    doc = validate(retained[events.guest_topic("g1")])
    assert retained[events.guest_topic("g1")].retain
    runs: list[list[Any]] = []
    for b in memory.blocks:
        if runs and runs[-1][2] == b.cell and runs[-1][0] + runs[-1][1] == b.index:
            runs[-1][1] += 1
        else:
            runs.append([b.index, 1, b.cell])
    assert doc["blocks"] == runs == [[0, 19, "online"], [19, 1, "unbacked"]]
    assert doc["meminfo"] == dict(memory.meminfo)
    assert (doc["strategy"], doc["driver_mode"], doc["dm_state"]) == (
        "callback",
        "upstream",
        "DM_INITIALIZED",
    )
    assert doc["violations"] == 0 and doc["mqtt"]["dropped"] == 0


# -- the broker dies mid-run -----------------------------------------------------------


async def _story(
    hv: HvProcess, guest: GuestProcess, after_first: Callable[[], Awaitable[None]]
) -> float:
    """Hot-add, later backing, another region, balloon, unballoon; returns the slowest RPC."""
    slowest = 0.0

    async def rpc(call: Awaitable[Any]) -> None:
        nonlocal slowest
        t = time.monotonic()
        await asyncio.wait_for(call, 10)
        slowest = max(slowest, time.monotonic() - t)

    c = hv.control
    await rpc(
        c.HotAdd(
            control_pb2.HotAddCommand(vm_id="g", region_bytes=512 * MIB, backed_bytes=300 * MIB)
        )
    )
    await wait_until(lambda: _added(hv, "g", 300 * PAGES_PER_MIB), what="first hot-add")
    await wait_until(lambda: _online(guest, range(16, 19)), what="blocks 16-18 online")
    await after_first()
    await rpc(c.Back(control_pb2.BackCommand(vm_id="g", size_bytes=100 * MIB)))
    await wait_until(lambda: _added(hv, "g", 400 * PAGES_PER_MIB), what="later backing")
    await rpc(
        c.HotAdd(
            control_pb2.HotAddCommand(vm_id="g", region_bytes=256 * MIB, backed_bytes=128 * MIB)
        )
    )
    await wait_until(lambda: _added(hv, "g", 528 * PAGES_PER_MIB), what="second region")
    # Backing follows in the newest region: 112 MiB of block 21.
    await rpc(c.Back(control_pb2.BackCommand(vm_id="g", size_bytes=112 * MIB)))
    await wait_until(lambda: _added(hv, "g", 640 * PAGES_PER_MIB), what="more backing")
    await wait_until(lambda: _online(guest, range(16, 22)), what="blocks 16-21 online")
    await rpc(c.Balloon(control_pb2.BalloonCommand(vm_id="g", size_bytes=64 * MIB)))

    async def ballooned(size: int) -> bool:
        vm = await hv.get_vm("g")
        return vm.ballooned_bytes == size and not vm.busy

    await wait_until(lambda: ballooned(64 * MIB), what="ballooned")
    await rpc(c.Unballoon(control_pb2.UnballoonCommand(vm_id="g", size_bytes=32 * MIB)))
    await wait_until(lambda: ballooned(32 * MIB), what="unballooned")
    return slowest


async def _outcome(hv: HvProcess, guest: GuestProcess) -> dict[str, Any]:
    """What the protocol did, on both sides (no timings, no MQTT counters)."""

    async def settled() -> bool:
        memory = await guest.memory()
        return (await _idle(hv, "g")) and not memory.busy and memory.unsent_messages == 0

    await wait_until(settled, what="both sides settled")
    vm = await hv.get_vm("g")
    memory = await guest.memory()
    return {
        "host": {
            "actual_bytes": vm.actual_bytes,
            "ballooned_bytes": vm.ballooned_bytes,
            "regions": [
                (
                    r.start_page,
                    r.page_count,
                    [(b.start_page, b.page_cnt) for b in r.backed],
                    r.added_pages,
                    r.unusable,
                )
                for r in vm.regions
            ],
            "ballooned": [(b.start_page, b.page_cnt) for b in vm.ballooned],
            "violation_events": vm.violation_events,
        },
        "guest": {
            "blocks": [(b.index, b.state, b.zone, b.cell) for b in memory.blocks],
            "meminfo": dict(memory.meminfo),
            "counters": (
                memory.counters.num_pages_added,
                memory.counters.num_pages_onlined,
                memory.counters.num_pages_ballooned,
            ),
            "pages": (
                memory.pages.buddy,
                memory.pages.allocated,
                memory.pages.page_offline,
                memory.pages.ballooned,
            ),
            "violations": [v.invariant for v in memory.violations],
        },
    }


@contextlib.asynccontextmanager
async def _pair(
    start_hypervisor: StartHypervisor,
    workdir: Path,
    hv_args: tuple[str, ...],
    guest_args: tuple[str, ...],
) -> AsyncIterator[tuple[HvProcess, GuestProcess]]:
    workdir.mkdir()
    hv = await start_hypervisor("--no-default-vm", *hv_args)
    await hv.create_vm("g", boot=2 * GIB, max_bytes=8 * GIB)
    async with guest_children() as children:
        guest = await start_guest(workdir, hv.address, *GUEST_ARGS, *guest_args, vm_id="g")
        children.append(guest)
        await wait_until(lambda: _idle(hv, "g"), what="attached and idle")
        yield hv, guest
    await hv.stop()


def _log_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


async def test_a_broker_killed_mid_run_changes_nothing_in_the_protocol(
    start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    # The same run without MQTT: what the protocol must do.
    async def nothing() -> None:
        return None

    async with _pair(start_hypervisor, tmp_path / "plain", (), ()) as (hv, guest):
        await _story(hv, guest, nothing)
        expected = await _outcome(hv, guest)
    assert expected["guest"]["violations"] == []

    # The broker keeps its sessions across the crash, so a persistent subscriber
    # (subscribed before anything starts) also gets what is published while it is away.
    broker = Mosquitto(tmp_path / "broker", persistent=True)
    await broker.start()
    try:
        async with Subscriber(broker.port, events.ALL_VMS, identifier="watcher") as sub:
            mqtt_hv = ("--mqtt", broker.url, "--mqtt-queue", "10")
            mqtt_guest = ("--mqtt", broker.url, "--mqtt-queue", "3")
            async with _pair(start_hypervisor, tmp_path / "mqtt", mqtt_hv, mqtt_guest) as (
                hv,
                guest,
            ):
                await sub.wait_for(
                    lambda ms: any(m.topic == events.guest_topic("g") for m in ms),
                    what="the guest's first document",
                )

                async def kill_broker() -> None:
                    await broker.kill()

                slowest = await _story(hv, guest, kill_broker)
                outcome = await _outcome(hv, guest)
                # The protocol did exactly what it does without MQTT, at its usual pace.
                assert outcome == expected
                assert slowest < 2.0, f"a Control call took {slowest:.2f} s"

                # The broker comes back on the same port; the publishers reconnect.
                await broker.start()
                async with Subscriber(broker.port, events.ALL_VMS, identifier="watcher") as back:

                    def reported(ms: list[Received]) -> bool:
                        drops = [m for m in ms if m.topic.endswith("/events/events_dropped")]
                        return {m.json()["source"] for m in drops} == {"host", "guest"}

                    await back.wait_for(reported, timeout=20.0, what="events_dropped of both")
                    # Fresh documents, with what was dropped.
                    await back.wait_for(
                        lambda ms: (
                            _latest_dropped(ms, events.state_topic("g")) > 0
                            and _latest_dropped(ms, events.guest_topic("g")) > 0
                        ),
                        what="documents counting the drops",
                    )
                    # New events flow again.
                    await hv.control.HotAdd(
                        control_pb2.HotAddCommand(
                            vm_id="g", region_bytes=128 * MIB, backed_bytes=128 * MIB
                        )
                    )
                    await back.wait_for(
                        lambda ms: any(m.topic.endswith("/events/hot_add_done") for m in ms),
                        what="an event after the restart",
                    )
                messages = sub.messages + back.messages
                hv_log = hv.child.log_path
                guest_log = guest.log_path
                assert hv_log is not None
        for m in messages:
            validate(m)
        envelopes = [m.json() for m in messages if "/events/" in m.topic]
        for source in ("host", "guest"):
            mine = {e["seq"]: e for e in envelopes if e["source"] == source}  # QoS 1: dups
            reports = [e for e in mine.values() if e["kind"] == "events_dropped"]
            dropped = sum(e["payload"]["dropped"] for e in reports)
            missing = set(range(1, max(mine) + 1)) - set(mine)
            assert dropped > 0, source
            assert len(missing) == dropped, (source, sorted(missing), dropped)
            assert all(e["vm"] == "g" for e in reports)
        state = [m.json() for m in messages if m.topic == events.state_topic("g")][-1]
        doc = [m.json() for m in messages if m.topic == events.guest_topic("g")][-1]
        host_reports = [
            e for e in envelopes if e["kind"] == "events_dropped" and e["source"] == "host"
        ]
        assert state["mqtt"]["dropped"] == sum(e["payload"]["dropped"] for e in host_reports)
        assert doc["mqtt"]["dropped"] > 0
        # Logged: when the drops started, and when the broker came back.
        for path in (hv_log, guest_log):
            logged = [e.get("event") for e in _log_events(path) if e.get("level") == "warning"]
            assert "mqtt_dropping_events" in logged, path
            assert "mqtt_broker_back" in logged, path
            assert "mqtt_disconnected" in logged, path
    finally:
        await broker.stop()


def _latest_dropped(ms: list[Received], topic: str) -> int:
    docs = [m.json() for m in ms if m.topic == topic]
    return int(docs[-1]["mqtt"]["dropped"]) if docs else 0


@pytest.mark.parametrize("which", ["hypervisor", "guest"])
async def test_a_broker_down_from_the_start_blocks_nothing(
    which: str, start_hypervisor: StartHypervisor, tmp_path: Path
) -> None:
    nobody = Mosquitto(tmp_path / "nobody")  # never started: nothing listens on its port
    hv_args = ("--mqtt", nobody.url) if which == "hypervisor" else ()
    guest_args = ("--mqtt", nobody.url) if which == "guest" else ()
    async with _pair(start_hypervisor, tmp_path / "run", hv_args, guest_args) as (hv, guest):
        await hv.control.HotAdd(
            control_pb2.HotAddCommand(vm_id="g", region_bytes=256 * MIB, backed_bytes=200 * MIB)
        )
        await wait_until(lambda: _added(hv, "g", 200 * PAGES_PER_MIB), what="hot-add")
        memory = await guest.memory()
        assert memory.counters.num_pages_added == 200 * PAGES_PER_MIB
        assert list(memory.violations) == []
