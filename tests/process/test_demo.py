"""``memhp demo`` end to end: real processes, progress, the view, the summary, the exit status.

The default story must end with exit 0 (the race of online-then-reclaim is caught and
expected); the same story without ``expect_violations`` must end with exit 1 and name
the unexpected violations. Both run at once (about 18 s of real time each). A short
story runs under a pseudo-terminal, where the demo draws the live view.
"""

from __future__ import annotations

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

import pytest

from memhp.demo import command_accepts

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scenarios" / "demo.yaml"
TIMEOUT = 180.0

SHORT = """\
name: short
vms:
  - {id: g1, boot_memory: 1G, max_memory: 4G, udev_online: online_movable, onlining_delay: 0.2}
steps:
  - hot_add: {vm: g1, region: 512M, backed: 300M}
  - back: {vm: g1, size: 84M}
  - expect: {vm: g1, pages.page_offline: 0, violations: []}
"""


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


@pytest.mark.skipif(
    command_accepts("hypervisor", "--mqtt") and command_accepts("guest", "--mqtt"),
    reason="the MQTT publisher is there",
)
def test_demo_mqtt_needs_the_publisher() -> None:
    proc = subprocess.run(
        demo_argv("--mqtt", "mqtt://127.0.0.1:1883"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "has no --mqtt option" in proc.stderr


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
