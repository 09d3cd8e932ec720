"""Shared helpers for the scenario tests: documents built line by line, runs in process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memhp.scenario.runner import ScenarioRunner
from memhp.scenario.spec import parse_scenario

REPO = Path(__file__).resolve().parents[2]
SCENARIOS_DIR = REPO / "scenarios"
BUNDLED = sorted(SCENARIOS_DIR.glob("*.yaml"))

MIB_PAGES = 256  # 4 KiB pages in 1 MiB
BLOCK_PAGES = 128 * MIB_PAGES  # one 128 MiB memory block

#: One VM, 1 GiB boot (blocks 0..7), 4 GiB max. Lines 1-3 of every ``doc()``.
VM_G = "vms:\n  - {id: g, boot_memory: 1G, max_memory: 4G}\n"


def doc(*lines: str) -> str:
    """A YAML document, one argument per line: line N of the file is ``lines[N - 1]``."""
    return "\n".join(lines) + "\n"


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """The 1-based line of the ``nth`` line of ``text`` that contains ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) >= nth, f"{needle!r} not found {nth} time(s) in the document"
    return hits[nth - 1]


def run_text(text: str, path: str = "t.yaml") -> dict[str, Any]:
    """Parse and run a scenario; the JSON result."""
    return ScenarioRunner(parse_scenario(text, path)).run()


def as_json(result: dict[str, Any]) -> Any:
    """The result as the CLI prints it (tuples become lists)."""
    return json.loads(json.dumps(result))


def failed_expectations(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in result["expectations"] if not e["ok"]]


def step_result(result: dict[str, Any], index: int) -> dict[str, Any]:
    """The record of step ``index`` (1-based, as the runner numbers them)."""
    record: dict[str, Any] = next(s for s in result["steps"] if s["index"] == index)
    return record
