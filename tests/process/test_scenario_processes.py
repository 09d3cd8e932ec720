"""``memhp scenario run FILE --processes``: the same JSON as in process, times aside.

Every bundled scenario (and one that uses every step kind, and one whose expectation
fails) runs twice through the real command line: in process under the virtual clock,
and across a real ``memhp hypervisor`` and one ``memhp guest`` per VM. All the runs
start at once (the E3 race alone takes 15 s of real time, virtio-mem-sbm 155 s: it waits
out the virtio_mem driver's retry timer twice) and the results must be equal
once :func:`memhp.scenario.result.without_time` dropped the clock: ``virtual_time``,
each step's ``time`` and the violation traces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from memhp.scenario.processes import ProcessRunner
from memhp.scenario.result import StepFailed, without_time
from memhp.scenario.spec import parse_scenario

REPO = Path(__file__).resolve().parents[2]
#: Every bundled scenario, virtio-mem ones included.
BUNDLED = sorted((REPO / "scenarios").glob("*.yaml"))
#: virtio-mem-sbm waits out the driver's retry timer (50 s, then 100 s) in real time.
RUN_TIMEOUT = 240.0

#: Every step kind the bundled scenarios leave out: sysfs writes with and without
#: errors, allocations, frees, notifier injection, ballooning both ways, a target,
#: dumps, a 16-byte hot-add and backing at an offset of an older region.
EVERY_STEP = """\
name: every-step
seed: 3
vms:
  - id: g
    boot_memory: 1G
    max_memory: 4G
    auto_online: online
    pressure_report_delay: 2
steps:
  - hot_add: {vm: g, region: 256M, backed: 256M}
  - offline: {vm: g, block: 8}
  - offline: {vm: g, block: 8, expect_error: EINVAL}
  - online: {vm: g, block: 8, type: online_movable}
  - allocate: {vm: g, size: 64M, zone: Movable, tag: a, order: 2}
  - allocate: {vm: g, size: 16M, tag: b, movable: true}
  - free: {vm: g, tag: a, size: 32M}
  - free: {vm: g, tag: a}
  - offline: {vm: g, block: 9}
  - inject: {vm: g, notifier: MEM_GOING_ONLINE, errno: -12, count: 1}
  - online: {vm: g, block: 9, expect_error: -ENOMEM}
  - online: {vm: g, block: 9}
  - hot_add: {vm: g, region: 512M, backed: 128M, offset: 128M, form: range}
  - back: {vm: g, offset: 384M, size: 64M}
  - balloon: {vm: g, size: 128M}
  - dump: {vm: g, skip_free: true}
  - dump: {vm: g}
  - advance: 1.5
  - unballoon: {vm: g, size: 64M}
  - set_target: {vm: g, size: 1280M}
  - expect:
      vm: g
      host.target: 1280M
      blocks.8.zone: Movable
      blocks.9.state: online
"""

#: An expectation that does not hold: exit status 1, in both runners.
FAILING_EXPECT = """\
name: failing-expect
vms:
  - {id: g, boot_memory: 1G, max_memory: 4G, auto_online: online}
steps:
  - hot_add: {vm: g, region: 128M, backed: 128M}
  - expect: {vm: g, counters.num_pages_added: 256M, blocks.8.state: online}
"""


@dataclass
class Run:
    code: int
    result: dict[str, Any]
    stderr: str


@dataclass
class Pair:
    """One scenario run both ways."""

    in_process: Run
    processes: Run


def _start(path: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "memhp.cli", "scenario", "run", str(path), "--json", *extra]
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        return subprocess.Popen(argv, cwd=REPO, stdout=stdout, stderr=stderr)


def _finish(proc: subprocess.Popen[bytes], out: Path, deadline: float) -> Run:
    try:
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its PID
        proc.wait()
        raise
    stderr = out.with_suffix(".err").read_text()
    text = out.read_text()
    return Run(code, json.loads(text) if text else {}, stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """Every case, both ways, all started at once."""
    tmp = tmp_path_factory.mktemp("scenario-processes")
    cases = {path.stem: path for path in BUNDLED}
    for name, text in (("every-step", EVERY_STEP), ("failing-expect", FAILING_EXPECT)):
        cases[name] = tmp / f"{name}.yaml"
        cases[name].write_text(text)
    started = {
        name: (
            _start(path, tmp / f"{name}.in.json"),
            _start(path, tmp / f"{name}.proc.json", "--processes"),
        )
        for name, path in cases.items()
    }
    deadline = time.monotonic() + RUN_TIMEOUT
    out: dict[str, Pair] = {}
    try:
        for name, (in_proc, procs) in started.items():
            out[name] = Pair(
                _finish(in_proc, tmp / f"{name}.in.json", deadline),
                _finish(procs, tmp / f"{name}.proc.json", deadline),
            )
    finally:
        for pair in started.values():
            for proc in pair:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return out


@pytest.mark.parametrize("name", [path.stem for path in BUNDLED])
def test_bundled_scenario_gives_the_in_process_json(runs: dict[str, Pair], name: str) -> None:
    pair = runs[name]
    assert pair.in_process.code == 0, pair.in_process.stderr
    assert pair.processes.code == 0, (pair.processes.stderr, pair.processes.result.get("error"))
    assert pair.processes.stderr == ""
    assert without_time(pair.processes.result) == without_time(pair.in_process.result)
    # The keys come in the same order too: the same document, not just equal data.
    assert json.dumps(without_time(pair.processes.result)) == json.dumps(
        without_time(pair.in_process.result)
    )


def test_every_step_kind_gives_the_in_process_json(runs: dict[str, Pair]) -> None:
    pair = runs["every-step"]
    assert pair.in_process.code == 0, pair.in_process.result.get("error")
    assert pair.processes.code == 0, pair.processes.result.get("error")
    assert without_time(pair.processes.result) == without_time(pair.in_process.result)
    steps = pair.processes.result["steps"]
    assert steps[2]["result"] == {"error": "-EINVAL"}
    assert steps[10]["result"] == {"error": "-ENOMEM"}


def test_a_failing_expectation_exits_1_across_processes(runs: dict[str, Pair]) -> None:
    pair = runs["failing-expect"]
    assert pair.in_process.code == 1
    assert pair.processes.code == 1
    result = pair.processes.result
    assert result["ok"] is False
    failed = [e for e in result["expectations"] if not e["ok"]]
    assert [e["path"] for e in failed] == ["counters.num_pages_added"]
    assert without_time(result) == without_time(pair.in_process.result)


def test_the_virtual_time_is_real_time_across_processes(runs: dict[str, Pair]) -> None:
    """The E3 race waits out hv_balloon's 5 s onlining timeout twice, then 5 s more."""
    result = runs["e3-online-race"].processes.result
    assert result["virtual_time"] >= 14.5
    assert [s["time"] for s in result["steps"]] == sorted(s["time"] for s in result["steps"])


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memhp.cli", "scenario", "run", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_an_option_the_guest_agent_lacks_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "memmap.yaml"
    path.write_text(
        "vms:\n"
        "  - {id: g, boot_memory: 1G, max_memory: 4G}\n"
        "  - {id: h, boot_memory: 1G, max_memory: 4G, memmap_on_memory: true}\n"
        "steps: []\n"
    )
    proc = _cli(path, "--processes")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        f"memhp: {path}:3: vm h: memmap_on_memory is not supported with --processes "
        "(memhp guest has no such option)\n"
    )
    assert _cli(path).returncode == 0  # in process it runs


def test_a_bad_file_exits_2_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("vms: []\nsteps: []\n")
    proc = _cli(path, "--processes", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "vms must be a non-empty list" in proc.stderr


async def test_every_child_is_stopped_when_a_step_fails() -> None:
    scenario = parse_scenario(
        "vms:\n"
        "  - {id: g, boot_memory: 1G, max_memory: 4G}\n"
        "steps:\n"
        "  - unballoon: {vm: g, size: 128M}\n",
        "unballoon.yaml",
    )
    runner = ProcessRunner(scenario)
    try:
        await runner.start()
        with pytest.raises(StepFailed) as failed:
            await runner.run()
    finally:
        await runner.stop()
    assert str(failed.value) == (
        "step 1 (unballoon, line 4): size: 32768 exceeds the 0 ballooned pages not already "
        "being returned"
    )
    children = [runner.hypervisor, *(n.child for n in runner.nodes.values())]
    assert len(children) == 2
    for child in children:
        assert child is not None
        assert child.process.returncode is not None
