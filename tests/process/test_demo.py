"""``memhp demo`` end to end: real processes, progress, the view, the summary, the exit status.

The default story must end with exit 0 (the race of online-then-reclaim is caught and
expected); the same story without ``expect_violations`` must end with exit 1 and name
the unexpected violations. Both run at once (about 18 s of real time each). A short
story runs under a pseudo-terminal, where the demo draws the live view. With ``--mqtt``
against a real mosquitto, a subscriber there before the demo starts must see both
sides of both VMs publish, each publisher in its order, the violations the story
expects, and the retained documents must be left for a later subscriber.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from memhp import events
from tests.mosquitto import Mosquitto, Received, Subscriber

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scenarios" / "demo.yaml"
TIMEOUT = 180.0
#: The VMs of scenarios/demo.yaml.
VMS = ("callback", "online-then-reclaim")
VALIDATORS = {
    name: jsonschema.Draft202012Validator(events.schema(name)) for name in events.SCHEMA_NAMES
}

SHORT = """\
name: short
vms:
  - {id: g1, boot_memory: 1G, max_memory: 4G, udev_online: online_movable, onlining_delay: 0.2}
steps:
  - hot_add: {vm: g1, region: 512M, backed: 300M}
  - back: {vm: g1, size: 84M}
  - expect: {vm: g1, pages.page_offline: 0, violations: []}
"""


def _validate(m: Received) -> dict[str, Any]:
    """The message's JSON, checked against its topic's schema."""
    topic = events.parse_topic(m.topic)
    assert topic is not None, m.topic
    doc: dict[str, Any] = m.json()
    VALIDATORS["event" if topic.what == "events" else topic.what].validate(doc)
    assert doc["vm"] == topic.vm
    return doc


def _subsequence(wanted: list[str], kinds: list[str]) -> bool:
    it = iter(kinds)
    return all(k in it for k in wanted)


def demo_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "memhp.cli", "demo", *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO)}


def start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        demo_argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env(),
    )


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (the demo stops its own children by PID), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        raise AssertionError(f"memhp demo did not end in {TIMEOUT} s:\n{out}\n{err}") from None
    return proc.returncode, out, err


def test_demo_default_story_and_an_unexpected_violation(tmp_path: Path) -> None:
    unexpected = tmp_path / "demo-unexpected.yaml"
    text = DEMO.read_text()
    assert "    expect_violations: [unbacked-allocated, unbacked-access, counter-onlined]\n" in text
    unexpected.write_text(
        text.replace(
            "    expect_violations: [unbacked-allocated, unbacked-access, counter-onlined]\n", ""
        )
    )
    timeline = tmp_path / "demo.svg"
    default = start("--timeline", timeline)
    bad = start(unexpected)
    try:
        code, out, err = finish(default)
        bad_code, bad_out, bad_err = finish(bad)
    finally:
        for proc in (default, bad):
            stop(proc)

    # The default story: progress for every step, the last frame, the summary, exit 0.
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == (
        "memhp demo: demo: a hypervisor and 2 guest(s) (callback, online-then-reclaim), 15 steps"
    )
    assert lines[1].startswith("setup: the guests attach and settle ... ")
    assert lines[2].startswith("step 1/15: allocate callback: size 384M")
    assert any(
        line.startswith("step 3/15: hot_add callback: region 1G, backed 300M ... ")
        and line.endswith(" s")
        for line in lines
    )
    assert any(line.startswith("step 15/15: expect online-then-reclaim") for line in lines)
    assert "─ callback  attached IDLE" in out
    assert "─ online-then-reclaim  attached IDLE" in out
    assert "█ online 24  ▒ unbacked (PageOffline) 0" in out
    table = [line.split() for line in lines if line.startswith((" callback", " online-then"))]
    rows = {row[0]: row[1:] for row in table}
    assert rows["callback"] == ["1", "3G", "3G", "0", "0"]
    assert rows["online-then-reclaim"] == ["1", "3G", "3G", "4", "0"]
    assert "OK: 15/15 expectations held, 4 expected violation(s) caught, none unexpected" in out
    assert "\x1b[" not in out  # not a terminal: plain

    root = ET.fromstring(timeline.read_text())
    charts = [c.attrib["data-vm"] for c in root.iterfind("{*}g[@class='chart']")]
    assert charts == ["callback", "online-then-reclaim"]

    # Without expect_violations: the same race, now unexpected: exit 1.
    assert bad_code == 1, bad_out + bad_err
    assert "UNEXPECTED unbacked-allocated in online-then-reclaim at step 4 (hot_add" in bad_out
    assert "UNEXPECTED unbacked-access in online-then-reclaim" in bad_out
    assert "FAILED: 4 unexpected violation(s), 0 failed expectation(s)" in bad_out
    assert "UNEXPECTED" not in bad_out.split("callback")[0]


def test_demo_json_puts_progress_on_stderr(tmp_path: Path) -> None:
    story = tmp_path / "short.yaml"
    story.write_text(SHORT)
    code, out, err = finish(start(story, "--json"))
    assert code == 0, out + err
    result = json.loads(out)
    assert result["scenario"] == "short"
    assert result["ok"] is True
    assert [s["kind"] for s in result["steps"]] == ["hot_add", "back", "expect"]
    assert "step 2/3: back g1: size 84M ... " in err


def wait_child(pid: int, grace: float = 15.0) -> int:
    """Reap the forked demo; SIGTERM it (it stops its own children) if it hangs on."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    return os.waitpid(pid, 0)[1]


def test_demo_under_a_terminal_draws_the_live_view(tmp_path: Path) -> None:
    story = tmp_path / "short.yaml"
    story.write_text(SHORT)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the demo on a terminal of 100 x 60
        os.environ.update(env(), LINES="60", TERM="xterm-256color")
        os.execv(sys.executable, demo_argv(story, "--refresh", "0.1"))
    chunks: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        status = wait_child(pid)
        os.close(fd)
    raw = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, raw
    assert "\x1b[" in raw  # colours and cursor movement
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "story 3/3" in screen
    assert "running step 1/3: hot_add g1: region 512M, backed 300M" in screen
    assert "─ g1 " in screen
    assert "OK: 2/2 expectations held" in screen


def test_demo_bad_input() -> None:
    proc = subprocess.run(
        demo_argv("no-such-file.yaml"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "no-such-file.yaml" in proc.stderr
    proc = subprocess.run(
        demo_argv("--mqtt", "localhost:1883"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "mqtt://HOST[:PORT]" in proc.stderr


async def test_demo_publishes_both_sides_over_mqtt(mosquitto: Mosquitto) -> None:
    """``--mqtt``: the hypervisor and both guests publish the story to a real broker."""
    async with Subscriber(mosquitto.port, events.ALL_VMS) as sub:
        proc = await asyncio.create_subprocess_exec(
            *demo_argv("--no-live", "--json", "--mqtt", mosquitto.url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        finally:
            if proc.returncode is None:  # SIGTERM: the demo stops its own children
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        assert proc.returncode == 0, (out + err).decode()
        result = json.loads(out)
        assert result["ok"] is True

        def detached(ms: list[Received]) -> bool:
            """The last word of the hypervisor (its guests stopped first): both detached."""
            states = {m.topic: m.json() for m in ms if m.topic.endswith("/state")}
            return all(
                events.state_topic(vm) in states and not states[events.state_topic(vm)]["attached"]
                for vm in VMS
            )

        await sub.wait_for(detached, what="both VMs detached")
    for m in sub.messages:
        _validate(m)
    envelopes = sub.events()

    # -- both sides of both VMs, each publisher's events in its order ---------------
    for vm in VMS:
        for source in ("host", "guest"):
            assert any(e["vm"] == vm and e["source"] == source for e in envelopes), (vm, source)
    # One host publisher for every VM, one guest publisher per VM: seq 1, 2, 3, ...
    # in arrival order (nothing dropped, nothing again).
    host_seqs = [e["seq"] for e in envelopes if e["source"] == "host"]
    assert host_seqs == list(range(1, len(host_seqs) + 1))
    for vm in VMS:
        seqs = [e["seq"] for e in envelopes if e["source"] == "guest" and e["vm"] == vm]
        assert seqs == list(range(1, len(seqs) + 1)), vm
        host = [e["kind"] for e in envelopes if e["source"] == "host" and e["vm"] == vm]
        assert _subsequence(
            [
                "vm_created",
                "attach",
                "negotiated",
                "hot_add_request",
                "hot_add_response",  # 300M of the 1G region
                "hot_add_request",
                "hot_add_response",  # 100M more
                "hot_add_request",
                "hot_add_response",  # the rest
                "detach",
            ],
            host,
        ), (vm, host)
        guest = [e for e in envelopes if e["source"] == "guest" and e["vm"] == vm]
        added = [e["payload"]["block"] for e in guest if e["kind"] == "block_added"]
        onlined = [e["payload"]["block"] for e in guest if e["kind"] == "block_onlined"]
        assert added == onlined == list(range(16, 24)), vm
        assert any(e["kind"] == "pages_onlined" for e in guest), vm

    # -- the violations: online-then-reclaim's race, as the story expects ---------------
    def violations(vm: str) -> dict[str, list[dict[str, Any]]]:
        return {
            source: [
                e
                for e in envelopes
                if e["vm"] == vm
                and e["source"] == source
                and e["kind"] in ("violation", "protocol_error", "driver_violation")
            ]
            for source in ("host", "guest")
        }

    assert violations("callback") == {"host": [], "guest": []}
    otr = violations("online-then-reclaim")
    # The host saw the guest touch what it does not back, during the first hot-add.
    assert {e["payload"]["kind"] for e in otr["host"]} == {"unbacked-access"}
    assert all(e["kind"] == "violation" for e in otr["host"])
    # (one host publisher: its seq orders the events of both VMs).
    otr_host = [e for e in envelopes if e["vm"] == "online-then-reclaim" and e["source"] == "host"]
    request = next(e for e in otr_host if e["kind"] == "hot_add_request")
    response = next(e for e in otr_host if e["kind"] == "hot_add_response")
    for e in otr["host"]:
        assert request["seq"] < e["seq"] < response["seq"]
        assert e["payload"]["state"] == "HOT_ADD_REPLY_WAIT"
    # The guest's checker runs without host truth: counter-onlined, not unbacked-allocated
    # (that one needs to know what the host backs; the host's unbacked-access is it).
    assert {e["payload"]["invariant"] for e in otr["guest"]} == {"counter-onlined"}
    expected = {"unbacked-allocated", "unbacked-access", "counter-onlined"}
    seen = {e["payload"]["kind"] for e in otr["host"]}
    seen |= {e["payload"]["invariant"] for e in otr["guest"]}
    assert seen <= expected
    found = result["vms"]["online-then-reclaim"]["violations"]
    assert {v["invariant"] for v in found} == expected
    assert all(v["expected"] for v in found)
    assert result["vms"]["callback"]["violations"] == []

    # -- the retained documents, for whoever subscribes later ---------------------------
    async with Subscriber(
        mosquitto.port, f"{events.TOPIC_ROOT}/vm/+/state", f"{events.TOPIC_ROOT}/vm/+/guest"
    ) as late:
        await late.wait_for(lambda ms: len(ms) >= 4, what="the retained documents")
    retained = {m.topic: m for m in late.messages}
    assert sorted(retained) == sorted(
        topic(vm) for vm in VMS for topic in (events.state_topic, events.guest_topic)
    )
    assert all(m.retain for m in late.messages)
    for vm, strategy in zip(VMS, ("callback", "online-then-reclaim"), strict=True):
        state = _validate(retained[events.state_topic(vm)])
        assert state["attached"] is False and state["dm_state"] == "IDLE"
        assert state["regions"] == 1 and state["backed_bytes"] == 1 << 30
        assert state["actual_bytes"] == 3 << 30
        assert state["busy"] is False and state["in_flight"] is None
        assert state["mqtt"]["dropped"] == 0
        assert state["mqtt"]["published"] > 0
        doc = _validate(retained[events.guest_topic(vm)])
        assert doc["blocks"] == [[0, 24, "online"]]
        assert (doc["strategy"], doc["dm_state"]) == (strategy, "DM_INITIALIZED")
        assert doc["mqtt"]["dropped"] == 0
    assert _validate(retained[events.guest_topic("callback")])["violations"] == 0
    assert _validate(retained[events.guest_topic("online-then-reclaim")])["violations"] >= 1


def test_default_scenario_of_an_installed_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memhp.demo

    assert memhp.demo.default_scenario() == DEMO
    # Installed elsewhere (the container image): scenarios/ of the working directory.
    monkeypatch.setattr(memhp.demo, "REPO", tmp_path / "site-packages")
    (tmp_path / "app" / "scenarios").mkdir(parents=True)
    (tmp_path / "app" / "scenarios" / "demo.yaml").write_text("name: x\n")
    monkeypatch.chdir(tmp_path / "app")
    assert memhp.demo.default_scenario() == tmp_path / "app" / "scenarios" / "demo.yaml"
