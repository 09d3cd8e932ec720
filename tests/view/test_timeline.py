"""The timeline: samples from the in-process runner, the SVG and PNG pictures, the CLI flag."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from memhp.scenario.runner import ScenarioRunner
from memhp.scenario.spec import load_scenario
from memhp.view.timeline import (
    Sample,
    Timeline,
    TimelineError,
    byte_ticks,
    check_timeline_path,
    steps,
    time_ticks,
    timeline_svg,
    write_timeline,
)

REPO = Path(__file__).resolve().parents[2]
NS = {"svg": "http://www.w3.org/2000/svg"}
MIB = 1 << 20
GIB = 1 << 30


def sample(t: float, backed: int, onlined: int, target: int | None = None) -> Sample:
    return Sample(t, "g1", backed, onlined, committed=GIB, target=target)


def test_steps_hold_each_value_until_the_next_sample() -> None:
    samples = [sample(0, 1, 1), sample(2, 3, 1, 5), sample(4, 3, 3, 5), sample(5, 3, 3)]
    assert list(steps(samples, "backed")) == [[(0, 1), (2, 1), (2, 3), (4, 3), (5, 3)]]
    # No target before t=2 or after t=5: one stretch, ended where the target went away.
    assert list(steps(samples, "target")) == [[(2, 5), (4, 5), (5, 5)]]
    assert list(steps([sample(0, 1, 1)], "backed")) == [[(0, 1)]]


def test_ticks() -> None:
    assert byte_ticks(3 * GIB) == [0, 512 * MIB, GIB, 1536 * MIB, 2 * GIB, 2560 * MIB, 3 * GIB]
    assert byte_ticks(0) == [0]
    ticks = byte_ticks(4 * GIB + 300 * MIB)
    assert ticks[-1] >= 4 * GIB + 300 * MIB and 3 <= len(ticks) <= 10
    assert time_ticks(16) == [0, 5, 10, 15]
    assert time_ticks(0.3) == [0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert time_ticks(0) == [0.0]


def run_partial_backing() -> Timeline:
    timeline = Timeline()
    runner = ScenarioRunner(
        load_scenario(REPO / "scenarios" / "partial-backing.yaml"), timeline=timeline
    )
    result = runner.run()
    assert result["ok"]
    return timeline


def test_in_process_runner_samples_after_setup_and_every_step() -> None:
    timeline = run_partial_backing()
    scenario = load_scenario(REPO / "scenarios" / "partial-backing.yaml")
    assert len(timeline.samples) == 1 + len(scenario.steps)
    assert timeline.vms() == ["g1"]
    setup, after_hot_add = timeline.samples[0], timeline.samples[1]
    assert (setup.time, setup.step) == (0.0, "setup")
    assert setup.backed == setup.onlined == 4 * GIB
    assert setup.target is None
    # The 300 MiB backed of the 1 GiB region are online, the 84 MiB left of block 34 not.
    assert after_hot_add.backed == 4 * GIB + 300 * MIB
    assert after_hot_add.onlined == 4 * GIB + 300 * MIB
    assert after_hot_add.time > 0
    last = timeline.samples[-1]
    assert last.backed == last.onlined == 4 * GIB + 464 * MIB
    assert last.committed > 0  # status reports came in


def test_timeline_svg() -> None:
    timeline = run_partial_backing()
    root = ET.fromstring(timeline_svg(timeline))
    (metadata,) = root.iterfind("svg:metadata", NS)
    data = json.loads(metadata.text or "")
    assert data["clock"] == "virtual time"
    assert len(data["samples"]) == len(timeline.samples)
    assert data["samples"][1]["backed"] == 4 * GIB + 300 * MIB
    (chart,) = root.iterfind("svg:g[@class='chart']", NS)
    assert chart.attrib["data-vm"] == "g1"
    series = {p.attrib["data-series"]: p.attrib["d"] for p in chart.iterfind("svg:path", NS)}
    # No target was ever set: no line for it.
    assert set(series) == {"backed", "onlined", "committed"}
    points = [p.split() for p in series["backed"].removeprefix("M ").split(" L ")]
    assert len(points) == len(next(steps(timeline.samples, "backed")))
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    assert xs == sorted(xs)
    assert ys[0] > ys[-1]  # backed grew (SVG y grows downwards)
    assert len(set(ys)) == 4  # 4 GiB, +300M, +400M, +464M


def test_timeline_svg_has_a_chart_per_vm_and_the_target() -> None:
    timeline = Timeline(clock="wall time")
    for vm in ("a", "b"):
        timeline.add(Sample(0.0, vm, GIB, GIB, 0, None))
        timeline.add(Sample(1.5, vm, 2 * GIB, GIB, 0, 2 * GIB))
    root = ET.fromstring(timeline_svg(timeline))
    charts = list(root.iterfind("svg:g[@class='chart']", NS))
    assert [c.attrib["data-vm"] for c in charts] == ["a", "b"]
    assert {p.attrib["data-series"] for p in charts[0].iterfind("svg:path", NS)} == set(
        ("backed", "onlined", "committed", "target")
    )
    labels = [t.text for t in charts[0].iterfind("svg:text", NS)]
    assert "wall time (s)" in labels


def test_write_timeline_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "t.png"
    write_timeline(run_partial_backing(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_asks_for_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TimelineError, match=r"memhp-emu\[plot\]"):
        check_timeline_path(tmp_path / "t.png")
    with pytest.raises(TimelineError, match="matplotlib"):
        write_timeline(Timeline(), tmp_path / "t.png")


def test_other_suffixes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TimelineError, match=r"\.svg or a \.png"):
        check_timeline_path(tmp_path / "t.pdf")
    with pytest.raises(TimelineError):
        write_timeline(Timeline(), tmp_path / "t.txt")


def memhp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memhp.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_scenario_run_timeline_flag(tmp_path: Path) -> None:
    path = tmp_path / "strategies.svg"
    done = memhp("scenario", "run", "scenarios/strategies.yaml", "--timeline", path)
    assert done.returncode == 0, done.stderr
    root = ET.fromstring(path.read_text())
    charts = [c.attrib["data-vm"] for c in root.iterfind("svg:g[@class='chart']", NS)]
    assert charts == ["callback", "going-online", "online-then-reclaim"]


def test_scenario_run_timeline_bad_suffix_is_bad_input(tmp_path: Path) -> None:
    done = memhp("scenario", "run", "scenarios/strategies.yaml", "--timeline", tmp_path / "t.jpeg")
    assert done.returncode == 2
    assert "an .svg or a .png file" in done.stderr
    assert not (tmp_path / "t.jpeg").exists()
