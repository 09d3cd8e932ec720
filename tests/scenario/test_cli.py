"""The ``memhp scenario run`` command, run as a subprocess, and real lsmem on its sysfs trees."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from memhp.scenario.runner import ScenarioRunner
from memhp.scenario.spec import load_scenario
from memhp.units import format_size
from tests.scenario.helpers import REPO, SCENARIOS_DIR, VM_G, as_json, doc

PARTIAL_BACKING = SCENARIOS_DIR / "partial-backing.yaml"
LSMEM = shutil.which("lsmem") or "/usr/bin/lsmem"
LSMEM_COLUMNS = "RANGE,SIZE,STATE,REMOVABLE,BLOCK,ZONES"

needs_lsmem = pytest.mark.skipif(not Path(LSMEM).exists(), reason="util-linux lsmem not found")


def memhp_command() -> list[str]:
    """This interpreter's ``memhp`` script (another ``memhp`` on PATH may be another
    install of the project), else ``python -m memhp.cli``."""
    exe = Path(sys.executable).with_name("memhp")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "memhp.cli"]


def memhp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*memhp_command(), "scenario", "run", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FAILING_EXPECT = VM_G + doc(
    "steps:",
    "  - hot_add: {vm: g, region: 128M, backed: 128M}",
    "  - expect: {vm: g, counters.num_pages_added: 128M, blocks.8.state: online}",
)


# -- exit status and output ----------------------------------------------------------------


def test_partial_backing_exits_0_with_a_summary() -> None:
    proc = memhp(PARTIAL_BACKING)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == "scenario partial-backing (seed 1): 9 steps, 7.500 s of virtual time"
    assert lines[1].startswith("  vm g1")
    assert lines[1].endswith(
        "blocks 37/37 online, added 118784 onlined 118784 ballooned 0 pages, "
        "PageOffline 45056 pages"
    ), lines[1]
    assert lines[-1] == "  18/18 expectations held; OK"
    assert "VIOLATION" not in proc.stdout
    assert "EXPECT FAILED" not in proc.stdout


@pytest.mark.parametrize(
    "name", ["partial-backing.yaml", "strategies.yaml", "e1-misaligned-hot-add.yaml"]
)
def test_json_output_equals_the_in_process_result(name: str) -> None:
    path = SCENARIOS_DIR / name
    proc = memhp(path, "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    expected = ScenarioRunner(load_scenario(path)).run()
    assert printed == as_json(expected)
    assert printed["ok"] is True


def test_summary_shows_expected_violations(tmp_path: Path) -> None:
    proc = memhp(SCENARIOS_DIR / "e1-misaligned-hot-add.yaml")
    assert proc.returncode == 0
    assert re.search(
        r"^    expected region-bookkeeping pfn \[0x100000, 0x108000\) at step 1 \(hot_add, "
        r"line 23\): ",
        proc.stdout,
        re.MULTILINE,
    )
    assert "VIOLATION" not in proc.stdout


def test_seed_option(tmp_path: Path) -> None:
    proc = memhp(PARTIAL_BACKING, "--json", "--seed", "7")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["seed"] == 7
    assert memhp(PARTIAL_BACKING, "--seed", "7").stdout.startswith(
        "scenario partial-backing (seed 7):"
    )


def test_failing_expect_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, "fails.yaml", FAILING_EXPECT)
    proc = memhp(path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "  EXPECT FAILED g blocks.8.state at step 2 (expect, line 5): "
        "expected 'online', got 'offline'"
    ) in proc.stdout.splitlines()
    assert proc.stdout.splitlines()[-1] == "  1/2 expectations held; FAILED"
    as_json_proc = memhp(path, "--json")
    assert as_json_proc.returncode == 1
    result = json.loads(as_json_proc.stdout)
    assert result["ok"] is False
    assert [e["ok"] for e in result["expectations"]] == [True, False]


def test_unexpected_violation_exits_1(tmp_path: Path) -> None:
    text = (SCENARIOS_DIR / "strategies.yaml").read_text()
    text = text.replace(
        "expect_violations: [unbacked-allocated, unbacked-access, counter-onlined]",
        "expect_violations: [unbacked-access, counter-onlined]",
    )
    proc = memhp(write(tmp_path, "strategies.yaml", text))
    assert proc.returncode == 1
    assert re.search(
        r"^    VIOLATION unbacked-allocated pfn \[0x94000, 0x98000\) at step 6 \(hot_add, "
        r"line 38\): 16384 unbacked pages allocated by 'racer'$",
        proc.stdout,
        re.MULTILINE,
    ), proc.stdout
    # An unexpected violation comes with its trace.
    assert re.search(r"^      \| t=\d+\.\d{3} ", proc.stdout, re.MULTILINE)
    assert proc.stdout.splitlines()[-1].endswith("FAILED")


def test_refused_step_exits_1_with_the_error(tmp_path: Path) -> None:
    text = VM_G + doc(
        "steps:",
        "  - advance: 1",
        "  - hot_add: {vm: g, region: 8G, backed: 1G}",
        "  - advance: 1",
    )
    path = write(tmp_path, "refused.yaml", text)
    proc = memhp(path)
    assert proc.returncode == 1
    assert re.search(r"^  ERROR step 2 \(hot_add, line 5\): region: ", proc.stdout, re.MULTILINE), (
        proc.stdout
    )
    result = json.loads(memhp(path, "--json").stdout)
    assert result["ok"] is False
    assert result["error"].startswith("step 2 (hot_add, line 5): region:")
    assert [s["index"] for s in result["steps"]] == [1, 2]
    assert "error" in result["steps"][1]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (VM_G + doc("steps:", "  - hot_add: {vm: h, region: 1G, backed: 1G}"), 4, "no vm 'h'"),
        (VM_G + doc("steps:", "  - allocate: {vm: g, size: 4M, order: 11}"), 4, "order"),
        (VM_G + doc("steps:", "\t- advance: 1"), 4, "invalid YAML"),
        (doc("vms:", "  - {id: g, boot_memory: 12Q, max_memory: 2G}", "steps: []"), 2, "12Q"),
        ("- not a mapping\n", 1, "must be a mapping"),
    ],
)
def test_bad_file_exits_2_with_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, "bad.yaml", text)
    proc = memhp(path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"memhp: {path}:{line}: ")
    assert message in proc.stderr
    assert len(proc.stderr.splitlines()) == 1  # one line, no traceback


def test_missing_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    proc = memhp(path, "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"memhp: {path}: cannot read: No such file or directory\n"


def test_undecodable_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfevms: []\n")
    proc = memhp(path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"memhp: {path}")
    assert "Traceback" not in proc.stderr


# -- --sysfs-out and the real lsmem ---------------------------------------------------------


def human(size: int) -> str:
    """util-linux ``size_to_human_string(SIZE_SUFFIX_1LETTER, size)`` (lib/strutils.c)."""
    exp = 0
    for shift in range(10, 70, 10):
        if size < 1 << shift:
            exp = shift - 10
            break
    letter = "BKMGTPE"[exp // 10]
    dec, frac = (size >> exp, size % (1 << exp)) if exp else (size, 0)
    if frac:
        frac = (frac * 1000) >> exp  # three digits after the point
        frac = ((frac + 50) // 100) * 10  # round 4/5, keep one digit
        if frac == 100:
            dec, frac = dec + 1, 0
    if frac:
        return f"{dec}.{frac // 10}{letter}"
    return f"{dec}{letter}"


def test_human_matches_util_linux_examples() -> None:
    assert human(0) == "0B"
    assert human(128 << 20) == "128M"
    assert human(1 << 30) == "1G"
    assert human(4429185024) == "4.1G"  # 4.125G
    assert human((4 << 30) + (256 << 20)) == "4.3G"  # 4.25G rounds half up


@dataclass
class Row:
    start: int
    end: int  # inclusive, as lsmem prints it
    state: str
    removable: str
    first: int
    last: int
    zones: str

    def as_lsmem(self) -> dict[str, str]:
        return {
            "RANGE": f"0x{self.start:016x}-0x{self.end:016x}",
            "SIZE": human(self.end + 1 - self.start),
            "STATE": self.state,
            "REMOVABLE": self.removable,
            "BLOCK": f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}",
            "ZONES": self.zones,
        }


#: lsmem's zone names (zone_names[] in sys-utils/lsmem.c); any other token is unknown.
LSMEM_ZONES = {"dma", "dma32", "normal", "highmem", "movable", "device"}


def expected_rows(blocks: list[dict[str, Any]], block_size: int) -> list[Row]:
    """lsmem's table for these JSON blocks: contiguous blocks merged while STATE,
    REMOVABLE and ZONES agree (split by the columns shown, is_mergeable())."""
    rows: list[Row] = []
    for b in sorted(blocks, key=lambda b: b["index"]):
        zones_known = all(z.lower() in LSMEM_ZONES for z in b["valid_zones"])
        zones = "/".join(z if z.lower() in LSMEM_ZONES else "None" for z in b["valid_zones"])
        state = b["state"]
        removable = "yes" if state == "online" else ""  # lsmem shows it for online blocks
        start = b["index"] * block_size
        prev = rows[-1] if rows else None
        if (
            prev is not None
            and prev.last + 1 == b["index"]
            and prev.state == state
            and prev.removable == removable
            and prev.zones == zones
            and zones_known
        ):
            prev.last = b["index"]
            prev.end = start + block_size - 1
            continue
        rows.append(
            Row(start, start + block_size - 1, state, removable, b["index"], b["index"], zones)
        )
    return rows


def lsmem(root: Path, *extra: str) -> str:
    proc = subprocess.run(
        [LSMEM, "--sysroot", str(root), "-o", LSMEM_COLUMNS, *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, f"{shlex.join(proc.args)}: {proc.stderr}"
    return proc.stdout


def lsmem_pairs(root: Path) -> list[dict[str, str]]:
    rows = []
    for line in lsmem(root, "--pairs").splitlines():
        rows.append(dict(re.findall(r'(\w+)="([^"]*)"', line)))
    return rows


def lsmem_summary(root: Path) -> dict[str, str]:
    out = lsmem(root)
    return dict(
        (key.strip(), value.strip())
        for key, value in re.findall(r"^(Memory block size|Total \w+ memory):\s+(\S+)$", out, re.M)
    )


def run_with_sysfs(tmp_path: Path, scenario: Path) -> tuple[dict[str, Any], Path]:
    out = tmp_path / "sysfs"
    proc = memhp(scenario, "--json", "--sysfs-out", out)
    assert proc.returncode in (0, 1), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result, out


def check_lsmem_layout(result: dict[str, Any], out: Path, block_sizes: dict[str, int]) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(result["vms"])
    for vm_id, vm in result["vms"].items():
        root = out / vm_id
        block_size = block_sizes[vm_id]
        rows = expected_rows(vm["blocks"], block_size)
        assert lsmem_pairs(root) == [r.as_lsmem() for r in rows], vm_id
        online = sum(block_size for b in vm["blocks"] if b["state"] == "online")
        offline = sum(block_size for b in vm["blocks"] if b["state"] == "offline")
        assert lsmem_summary(root) == {
            "Memory block size": human(block_size),
            "Total online memory": human(online),
            "Total offline memory": human(offline),
        }
        # The plain table has the same rows in the same order.
        table = lsmem(root).split("\n\n")[0].splitlines()
        assert table[0].split() == LSMEM_COLUMNS.split(",")
        assert len(table) == 1 + len(rows)
        for line, row in zip(table[1:], rows, strict=True):
            assert line.split()[0] == row.as_lsmem()["RANGE"]


@needs_lsmem
def test_lsmem_reads_the_partial_backing_tree(tmp_path: Path) -> None:
    result, out = run_with_sysfs(tmp_path, PARTIAL_BACKING)
    assert result["ok"] is True
    check_lsmem_layout(result, out, {"g1": 128 << 20})
    # Boot memory in ZONE_NORMAL, the hot-added blocks in ZONE_MOVABLE.
    assert [r["ZONES"] for r in lsmem_pairs(out / "g1")] == ["Normal", "Movable"]
    assert [r["BLOCK"] for r in lsmem_pairs(out / "g1")] == ["0-31", "32-36"]


LAYOUT = doc(
    "name: lsmem-layout",
    "vms:",
    "  - {id: a, boot_memory: 4G, max_memory: 8G, auto_online: online}",
    "  - {id: b, boot_memory: 1G, max_memory: 4G}",
    "  - {id: c, boot_memory: 2G, max_memory: 8G, block_size: 256M, udev_online: online}",
    "steps:",
    "  - hot_add: {vm: a, region: 256M, backed: 256M}",
    "  - hot_add: {vm: b, region: 768M, backed: 700M}",
    "  - online: {vm: b, block: 8, type: online_movable}",
    "  - online: {vm: b, block: 10, type: online_kernel}",
    "  - online: {vm: b, block: 11}",
    "  - online: {vm: b, block: 13, type: online_movable}",
    "  - hot_add: {vm: c, region: 1G, backed: 800M}",
    "  - offline: {vm: c, block: 9}",
)


@needs_lsmem
def test_lsmem_reads_a_mixed_layout(tmp_path: Path) -> None:
    path = write(tmp_path, "layout.yaml", LAYOUT)
    result, out = run_with_sysfs(tmp_path, path)
    assert result["ok"] is True
    check_lsmem_layout(result, out, {"a": 128 << 20, "b": 128 << 20, "c": 256 << 20})
    b = lsmem_pairs(out / "b")
    assert [(r["BLOCK"], r["STATE"]) for r in b] == [
        ("0-7", "online"),
        ("8", "online"),
        ("9", "offline"),
        ("10-11", "online"),
        ("12", "offline"),
        ("13", "online"),
    ]
    c = lsmem_pairs(out / "c")
    assert [(r["BLOCK"], r["STATE"], r["SIZE"]) for r in c][-2:] == [
        ("9", "offline", "256M"),
        ("10-11", "online", "512M"),
    ]


@needs_lsmem
def test_sysfs_out_is_rewritten_in_place(tmp_path: Path) -> None:
    # A second run into the same directory replaces the first tree (here: fewer blocks).
    out = tmp_path / "sysfs"
    first = write(
        tmp_path,
        "first.yaml",
        VM_G + doc("steps:", "  - hot_add: {vm: g, region: 384M, backed: 384M}"),
    )
    second = write(tmp_path, "second.yaml", VM_G + doc("steps: []"))
    assert memhp(first, "--sysfs-out", out).returncode == 0
    assert lsmem_summary(out / "g")["Total offline memory"] == "384M"
    proc = memhp(second, "--json", "--sysfs-out", out)
    assert proc.returncode == 0
    check_lsmem_layout(json.loads(proc.stdout), out, {"g": 128 << 20})


@needs_lsmem
def test_format_size_matches_lsmem(tmp_path: Path) -> None:
    text = doc(
        "vms:",
        "  - {id: a, boot_memory: 4G, max_memory: 8G, auto_online: online}",
        "steps:",
        "  - hot_add: {vm: a, region: 256M, backed: 256M}",
    )
    result, out = run_with_sysfs(tmp_path, write(tmp_path, "a.yaml", text))
    (row,) = lsmem_pairs(out / "a")
    assert row["SIZE"] == "4.3G"
    assert format_size(len(result["vms"]["a"]["blocks"]) * (128 << 20)) == row["SIZE"]
