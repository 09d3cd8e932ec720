"""``ProcessRunner`` tells its progress and samples a timeline (what ``memhp demo`` shows)."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from memhp.scenario.processes import ProcessRunner, StepProgress
from memhp.scenario.spec import parse_scenario
from memhp.view.timeline import Timeline

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GIB = 1 << 30

SCENARIO = """\
name: timeline
vms:
  - {id: g, boot_memory: 1G, max_memory: 4G, udev_online: online_movable, onlining_delay: 0.05}
steps:
  - hot_add: {vm: g, region: 512M, backed: 300M}
  - set_target: {vm: g, size: 1280M}
  - back: {vm: g, size: 84M}
"""


async def test_progress_and_timeline() -> None:
    scenario = parse_scenario(SCENARIO, "timeline.yaml")
    timeline = Timeline(clock="wall time")
    heard: list[StepProgress] = []
    async with ProcessRunner(scenario, timeline=timeline, progress=heard.append) as runner:
        result = await runner.run()
    assert result["ok"], result
    assert [(p.index, p.phase) for p in heard] == [
        (0, "start"),
        (0, "done"),
        (1, "start"),
        (1, "done"),
        (2, "start"),
        (2, "done"),
        (3, "start"),
        (3, "done"),
    ]
    assert {p.total for p in heard} == {3}
    assert heard[2].text == "hot_add g: region 512M, backed 300M"
    assert heard[3].elapsed > 0

    assert len(timeline.samples) == 4
    setup, hot_add, target, back = timeline.samples
    assert setup.backed == setup.onlined == GIB
    assert setup.target is None
    assert hot_add.backed == hot_add.onlined == GIB + 300 * MIB
    # The target is below what the guest has: it balloons 44 MiB.
    assert target.target == 1280 * MIB
    assert target.backed == target.onlined == 1280 * MIB
    assert back.backed == back.onlined == 1280 * MIB + 84 * MIB
    times = [s.time for s in timeline.samples]
    assert times == sorted(times)


def test_scenario_run_processes_timeline(tmp_path: Path) -> None:
    scenario = tmp_path / "timeline.yaml"
    scenario.write_text(SCENARIO)
    path = tmp_path / "t.svg"
    argv = [sys.executable, "-m", "memhp.cli", "scenario", "run", str(scenario)]
    done = subprocess.run(
        [*argv, "--processes", "--timeline", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    root = ET.fromstring(path.read_text())
    ns = {"svg": "http://www.w3.org/2000/svg"}
    (chart,) = root.iterfind("svg:g[@class='chart']", ns)
    assert chart.attrib["data-vm"] == "g"
    series = {p.attrib["data-series"] for p in chart.iterfind("svg:path", ns)}
    assert series == {"backed", "onlined", "committed", "target"}
    labels = [t.text for t in chart.iterfind("svg:text", ns)]
    assert "wall time (s)" in labels


async def test_extra_arguments_reach_the_children() -> None:
    scenario = parse_scenario(SCENARIO, "timeline.yaml")
    runner = ProcessRunner(
        scenario,
        hypervisor_args=["--default-block-size", "256M"],
        guest_args=["--status-interval", "0.5"],
    )
    try:
        await runner.start()
        hv, guest = runner.hypervisor, runner.nodes["g"].child
        assert hv is not None and guest is not None
        hv_argv = Path(f"/proc/{hv.pid}/cmdline").read_bytes().split(b"\0")
        guest_argv = Path(f"/proc/{guest.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--default-block-size" in hv_argv and b"256M" in hv_argv
        # The runner's own --status-interval 1 comes first; the extra one wins.
        assert guest_argv.count(b"--status-interval") == 2
        assert b"0.5" in guest_argv
    finally:
        await runner.stop()
    assert runner.hypervisor is not None and runner.hypervisor.process.returncode is not None
    assert all(
        n.child is None or n.child.process.returncode is not None for n in runner.nodes.values()
    )
