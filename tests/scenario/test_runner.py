"""memhp.scenario.runner: in-process runs under a virtual clock, checks, JSON results."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from memhp.scenario.runner import ScenarioRunner, StepFailed, run_scenario
from memhp.scenario.spec import ScenarioError, load_scenario, parse_scenario
from tests.scenario.helpers import (
    BLOCK_PAGES,
    BUNDLED,
    MIB_PAGES,
    SCENARIOS_DIR,
    VM_G,
    as_json,
    doc,
    failed_expectations,
    line_of,
    run_text,
    step_result,
)

KB_PER_MIB = 1024


def canonical(result: dict[str, Any]) -> str:
    return json.dumps(result, sort_keys=True)


def violations(result: dict[str, Any], vm: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = result["vms"][vm]["violations"]
    return found


def invariants(result: dict[str, Any], vm: str) -> list[str]:
    return [v["invariant"] for v in violations(result, vm)]


def window_race(strategy: str, expect_violations: str = "[]", *extra_steps: str) -> str:
    """The online-then-reclaim window race of scenarios/strategies.yaml, on one VM ``g``.

    2 GiB boot (blocks 0..15); a 384 MiB region (blocks 16..18) with 320 MiB backed, so
    block 18 is half backed; an allocator grabs ZONE_MOVABLE inside block 18's window.
    """
    return doc(
        "vms:",
        "  - id: g",
        "    boot_memory: 2G",
        "    max_memory: 8G",
        f"    strategy: {strategy}",
        "    udev_online: online_movable",
        "    onlining_delay: 0.2",
        f"    expect_violations: {expect_violations}",
        "steps:",
        "  - allocate: {vm: g, size: 384M, zone: Movable, tag: racer, in_window: true, block: 18}",
        "  - hot_add: {vm: g, region: 384M, backed: 320M}",
        *extra_steps,
    )


#: Where block 18's unbacked half lies: [0x94000, 0x98000).
UNBACKED = (18 * BLOCK_PAGES + 64 * MIB_PAGES, 19 * BLOCK_PAGES)


# -- bundled scenarios -------------------------------------------------------------


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_scenario_passes(path: Path) -> None:
    scenario = load_scenario(path)
    result = ScenarioRunner(scenario).run()
    assert failed_expectations(result) == []
    unexpected = [
        (vm, v["invariant"], v["message"])
        for vm, view in result["vms"].items()
        for v in view["violations"]
        if not v["expected"]
    ]
    assert unexpected == []
    assert result["ok"] is True
    assert result["scenario"] == scenario.name
    assert result["seed"] == scenario.seed
    assert result["expectations"], "every bundled scenario checks something"
    assert [s["index"] for s in result["steps"]] == list(range(1, len(scenario.steps) + 1))
    assert [s["line"] for s in result["steps"]] == [s.line for s in scenario.steps]
    assert all("error" not in s for s in result["steps"])
    times = [s["time"] for s in result["steps"]]
    assert times == sorted(times)
    assert result["virtual_time"] == times[-1]
    assert set(result["vms"]) == {v.id for v in scenario.vms}


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_scenario_is_deterministic(path: Path) -> None:
    scenario = load_scenario(path)
    first = ScenarioRunner(scenario).run()
    second = ScenarioRunner(scenario).run()
    third, _ = run_scenario(load_scenario(path))
    assert canonical(first) == canonical(second) == canonical(third)


def test_bundled_scenarios_declare_what_they_find() -> None:
    # The bug scenarios really show their bug on the upstream VM and not on the fixed one.
    e2 = ScenarioRunner(load_scenario(SCENARIOS_DIR / "e2-backing-into-gap.yaml")).run()
    assert "backed-never-onlined" in invariants(e2, "upstream")
    assert invariants(e2, "fixed") == []
    strategies = ScenarioRunner(load_scenario(SCENARIOS_DIR / "strategies.yaml")).run()
    assert "unbacked-allocated" in invariants(strategies, "online-then-reclaim")
    assert invariants(strategies, "callback") == invariants(strategies, "going-online") == []


def test_seed_override() -> None:
    scenario = load_scenario(SCENARIOS_DIR / "partial-backing.yaml")
    assert ScenarioRunner(scenario).run()["seed"] == 1
    assert ScenarioRunner(scenario, seed=99).run()["seed"] == 99


# -- the JSON document -------------------------------------------------------------


def test_result_shape() -> None:
    result = ScenarioRunner(load_scenario(SCENARIOS_DIR / "strategies.yaml")).run()
    assert as_json(result) == result  # plain JSON: no tuples, no objects
    assert set(result) == {
        "scenario",
        "seed",
        "virtual_time",
        "ok",
        "steps",
        "expectations",
        "vms",
    }
    for step in result["steps"]:
        assert {"index", "kind", "line", "time"} <= set(step)
    for entry in result["expectations"]:
        assert {"step", "vm", "path", "expected", "actual", "ok"} <= set(entry)
    assert list(result["vms"]) == ["callback", "going-online", "online-then-reclaim"]
    for vm_id, vm in result["vms"].items():
        assert {"blocks", "meminfo", "counters", "regions", "pages", "violations"} <= set(vm)
        indexes = [b["index"] for b in vm["blocks"]]
        assert indexes == list(range(19))  # 2 GiB boot + 384 MiB, 128 MiB blocks
        for block in vm["blocks"]:
            assert set(block) == {"index", "state", "zone", "valid_zones"}
            assert block["state"] in ("online", "offline", "going-offline")
            assert isinstance(block["valid_zones"], list)
        assert vm["blocks"][0]["zone"] == "Normal"
        assert vm["blocks"][18]["zone"] == "Movable"
        assert {"MemTotal", "MemFree", "MemAvailable"} <= set(vm["meminfo"])
        assert all(isinstance(v, int) for v in vm["meminfo"].values())
        assert vm["meminfo"]["MemFree"] <= vm["meminfo"]["MemTotal"]
        assert set(vm["counters"]) == {
            "num_pages_added",
            "num_pages_onlined",
            "num_pages_ballooned",
        }
        assert vm["counters"]["num_pages_added"] == 384 * MIB_PAGES
        (region,) = vm["regions"]
        assert set(region) == {"start", "end", "ha_end", "covered_start", "covered_end", "gaps"}
        assert region["start"] == 16 * BLOCK_PAGES
        assert region["end"] == region["ha_end"] == 19 * BLOCK_PAGES
        assert region["covered_end"] == 19 * BLOCK_PAGES
        assert region["gaps"] == []
        assert {"buddy", "allocated", "page_offline", "ballooned"} <= set(vm["pages"])
        assert vm["pages"]["ballooned"] == 0
        for v in vm["violations"]:
            assert {"invariant", "vm", "pfn_start", "pfn_end", "step", "message", "trace"} <= set(v)
            assert v["vm"] == vm_id
            assert isinstance(v["pfn_start"], int) and isinstance(v["pfn_end"], int)
            assert v["step"].startswith(("setup", "step "))
            assert v["trace"] and all(isinstance(t, str) for t in v["trace"])
    otr = violations(result, "online-then-reclaim")
    allocated = next(v for v in otr if v["invariant"] == "unbacked-allocated")
    assert (allocated["pfn_start"], allocated["pfn_end"]) == UNBACKED
    assert allocated["step"] == "step 6 (hot_add, line 38)"
    assert allocated["expected"] is True
    assert any("allocated_in_window" in t for t in allocated["trace"])


def test_result_shape_of_a_partially_backed_region() -> None:
    result = ScenarioRunner(load_scenario(SCENARIOS_DIR / "partial-backing.yaml")).run()
    vm = result["vms"]["g1"]
    (region,) = vm["regions"]
    # 1 GiB region at 4 GiB; backed 464 MiB with a gap [+400M, +520M) between.
    assert region["start"] == 4 * 1024 * MIB_PAGES
    assert region["end"] == region["start"] + 1024 * MIB_PAGES
    assert region["gaps"] == [
        [region["start"] + 400 * MIB_PAGES, region["start"] + 520 * MIB_PAGES]
    ]
    assert vm["counters"]["num_pages_added"] == 464 * MIB_PAGES
    assert vm["pages"]["page_offline"] == 176 * MIB_PAGES  # 5 blocks (640M) - 464M backed
    assert [b["zone"] for b in vm["blocks"][32:]] == ["Movable"] * 5
    assert vm["violations"] == []


def test_each_violation_is_recorded_once() -> None:
    result = ScenarioRunner(load_scenario(SCENARIOS_DIR / "strategies.yaml")).run()
    found = violations(result, "online-then-reclaim")
    keys = [(v["invariant"], v["pfn_start"], v["pfn_end"], v["message"]) for v in found]
    assert len(keys) == len(set(keys))
    assert sorted(v["invariant"] for v in found) == [
        "counter-onlined",
        "unbacked-access",
        "unbacked-allocated",
    ]


def test_checks_only_at_the_end() -> None:
    scenario = load_scenario(SCENARIOS_DIR / "strategies.yaml")
    result = ScenarioRunner(scenario, check_every_step=False).run()
    last = scenario.steps[-1].label
    found = violations(result, "online-then-reclaim")
    assert found and {v["step"] for v in found} == {last}


# -- expectations ----------------------------------------------------------------------

PARTIAL = doc(
    "vms:",
    "  - {id: g, boot_memory: 1G, max_memory: 4G, udev_online: online, onlining_delay: 0.5}",
    "steps:",
    "  - hot_add: {vm: g, region: 256M, backed: 200M}",
)


def test_failing_expect_makes_the_run_fail_and_records_both_sides() -> None:
    text = PARTIAL + doc(
        "  - expect:",
        "      vm: g",
        "      counters.num_pages_added: 200M",
        "      counters.num_pages_onlined: 100M",
        "  - advance: 1",
    )
    result = run_text(text)
    assert result["ok"] is False
    good, bad = result["expectations"]
    assert good == {
        "step": "step 2 (expect, line 5)",
        "vm": "g",
        "path": "counters.num_pages_added",
        "expected": 200 * MIB_PAGES,
        "actual": 200 * MIB_PAGES,
        "ok": True,
    }
    assert bad == {
        "step": "step 2 (expect, line 5)",
        "vm": "g",
        "path": "counters.num_pages_onlined",
        "expected": 100 * MIB_PAGES,
        "actual": 200 * MIB_PAGES,
        "ok": False,
    }
    # A failed expectation does not stop the run.
    assert [s["kind"] for s in result["steps"]] == ["hot_add", "expect", "advance"]
    assert result["virtual_time"] == pytest.approx(step_result(result, 2)["time"] + 1)


def test_passing_expectations_keep_the_run_ok() -> None:
    text = PARTIAL + doc(
        "  - expect:",
        "      vm: g",
        "      counters.num_pages_added: 200M",
        "      counters.num_pages_onlined: 51200",
        "      pages.page_offline: 56M",
        "      blocks.8.state: online",
        "      blocks.9.zone: Normal",
        "      regions.0.gaps: []",
        "      violations: []",
    )
    result = run_text(text)
    assert result["ok"] is True
    assert [e["ok"] for e in result["expectations"]] == [True] * 7


@pytest.mark.parametrize(
    ("path", "value", "shown", "ok"),
    [
        # meminfo is in kB: sizes become kB.
        ("meminfo.MemTotal", "{ge: 1G, le: 2G}", {"ge": 1024 * 1024, "le": 2048 * 1024}, True),
        ("meminfo.MemTotal", "{ge: 1G, le: 1200M}", {"ge": 1024 * 1024, "le": 1200 * 1024}, False),
        ("meminfo.MemFree", "{gt: 512M, lt: 4G}", {"gt": 512 * 1024, "lt": 4096 * 1024}, True),
        ("meminfo.Balloon", "0", 0, True),
        # counters and pages are in pages.
        ("counters.num_pages_added", "{ge: 200M, le: 200M}", {"ge": 51200, "le": 51200}, True),
        ("counters.num_pages_added", "{gt: 200M}", {"gt": 51200}, False),
        ("counters.num_pages_added", "{ne: 128M}", {"ne": 32768}, True),
        ("counters.num_pages_onlined", "51200", 51200, True),
        ("counters.num_pages_onlined", "'200M'", 51200, True),
        ("counters.num_pages_onlined", "'51200K'", 12800, False),  # a size string: 50 MiB
        ("pages.page_offline", "56M", 14336, True),
        ("pages.page_offline", "{eq: 56M}", {"eq": 14336}, True),
        ("regions.0.ha_end", "{eq: 4608M}", {"eq": 4608 * MIB_PAGES}, False),
        # contains / excludes work on lists and strings.
        ("blocks.8.valid_zones", "{contains: Normal}", {"contains": "Normal"}, True),
        ("blocks.8.valid_zones", "{contains: Movable}", {"contains": "Movable"}, False),
        ("blocks.8.state", "{contains: line}", {"contains": "line"}, True),
        ("violations", "{excludes: unbacked-in-buddy}", {"excludes": "unbacked-in-buddy"}, True),
        ("violations", "{contains: unbacked-in-buddy}", {"contains": "unbacked-in-buddy"}, False),
        ("regions.0.gaps", "[]", [], True),
        ("host.backed", "{ge: 1G}", {"ge": 262144}, True),
    ],
)
def test_expect_operators_and_units(path: str, value: str, shown: Any, ok: bool) -> None:
    result = run_text(PARTIAL + doc(f"  - expect: {{vm: g, {path}: {value}}}"))
    (entry,) = result["expectations"]
    assert entry["path"] == path
    assert entry["expected"] == shown
    assert entry["ok"] is ok
    assert "error" not in entry
    assert result["ok"] is ok


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("counters.nope", "1", "counters.nope: no such field (have: num_pages_added,"),
        ("nope", "1", "nope: no such field (have: blocks, meminfo,"),
        ("blocks.99.state", "online", "blocks.99: no memory block 99"),
        ("blocks.x.state", "online", "blocks.x: expected an index"),
        ("regions.5.start", "0", "regions.5: index out of range (1 entries)"),
        (
            "meminfo.MemTotal.kB",
            "1",
            "meminfo.MemTotal.kB: meminfo.MemTotal is a value, not a record",
        ),
        ("counters.num_pages_added", "{between: 1}", "unknown comparison 'between'"),
        ("counters.num_pages_added", "12Q", "cannot parse size '12Q'"),
    ],
)
def test_unknown_expect_path_is_a_failed_expectation(path: str, value: str, message: str) -> None:
    text = PARTIAL + doc(f"  - expect: {{vm: g, {path}: {value}}}", "  - advance: 1")
    result = run_text(text)
    (entry,) = result["expectations"]
    assert entry["ok"] is False
    assert entry["path"] == path
    assert entry["actual"] is None
    assert entry["error"].startswith(message.split(":")[0])
    assert message in entry["error"]
    assert result["ok"] is False
    assert len(result["steps"]) == 3  # the run went on


# -- violations --------------------------------------------------------------------------


def test_undeclared_violation_fails_the_run() -> None:
    result = run_text(window_race("online-then-reclaim"))
    assert result["expectations"] == []
    found = violations(result, "g")
    assert {"unbacked-allocated", "unbacked-access"} <= {v["invariant"] for v in found}
    assert all(v["expected"] is False for v in found)
    assert result["ok"] is False


def test_declared_violation_keeps_the_run_ok() -> None:
    result = run_text(window_race("online-then-reclaim", "[unbacked-allocated, unbacked-access]"))
    found = violations(result, "g")
    assert sorted(v["invariant"] for v in found) == ["unbacked-access", "unbacked-allocated"]
    assert all(v["expected"] is True for v in found)
    assert {v["step"] for v in found} == {"step 2 (hot_add, line 11)"}
    assert result["ok"] is True


def test_partly_declared_violations_fail_the_run() -> None:
    result = run_text(window_race("online-then-reclaim", "[unbacked-allocated]"))
    flags = {v["invariant"]: v["expected"] for v in violations(result, "g")}
    assert flags == {"unbacked-allocated": True, "unbacked-access": False}
    assert result["ok"] is False


@pytest.mark.parametrize("strategy", ["callback", "going-online"])
def test_safe_strategies_show_no_violation(strategy: str) -> None:
    result = run_text(window_race(strategy))
    assert violations(result, "g") == []
    assert result["vms"]["g"]["pages"]["allocated"] == 320 * MIB_PAGES
    assert result["ok"] is True


def test_expected_violation_and_a_failing_expect() -> None:
    text = window_race(
        "online-then-reclaim",
        "[unbacked-allocated, unbacked-access]",
        "  - expect: {vm: g, violations: {contains: unbacked-allocated}, pages.allocated: 1G}",
    )
    result = run_text(text)
    assert [e["ok"] for e in result["expectations"]] == [True, False]
    assert result["expectations"][1]["actual"] == 384 * MIB_PAGES
    assert result["ok"] is False


# -- steps the host or guest refuses -------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "fragments"),
    [
        (
            "  - hot_add: {vm: g, region: 4G, backed: 128M}",
            ["step 1 (hot_add, line 4)", "region:", "do not fit under max_pages"],
        ),
        (
            "  - hot_add: {vm: g, region: 200M, backed: 128M}",
            ["step 1 (hot_add, line 4)", "region:", "not a multiple of the hot-add"],
        ),
        (
            "  - hot_add: {vm: g, region: 128M, backed: 256M}",
            ["step 1 (hot_add, line 4)", "backed:", "must be <= 32768"],
        ),
        (
            "  - back: {vm: g, size: 4M}",
            ["step 1 (back, line 4)", "region:", "no hot-add region exists yet"],
        ),
        (
            "  - balloon: {vm: g, size: 2G}",
            ["step 1 (balloon, line 4)", "size:", "exceeds the guest's current"],
        ),
        (
            "  - unballoon: {vm: g, size: 4M}",
            ["step 1 (unballoon, line 4)", "size:", "exceeds the 0 ballooned pages"],
        ),
        (
            "  - set_target: {vm: g, size: 8G}",
            ["step 1 (set_target, line 4)", "size:", "must be <="],
        ),
        (
            "  - online: {vm: g, block: 99}",
            ["step 1 (online, line 4)", "memory99/state: no such memory block", "-ENOENT"],
        ),
        (
            "  - online: {vm: g, block: 3}",
            ["step 1 (online, line 4)", "memory3 is already online", "-EINVAL"],
        ),
    ],
)
def test_refused_step_raises_step_failed(step: str, fragments: list[str]) -> None:
    runner = ScenarioRunner(parse_scenario(VM_G + doc("steps:", step, "  - advance: 1"), "t.yaml"))
    with pytest.raises(StepFailed) as info:
        runner.run()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert message.startswith("step 1 (")
    # The failed step is recorded with its error; the next one never ran.
    assert runner.step_results == [
        {"index": 1, "kind": step.split(":")[0].strip(" -"), "line": 4, "error": message}
    ]
    result = runner.result()
    assert len(result["steps"]) == 1


def test_step_failed_after_good_steps_names_its_own_line() -> None:
    text = PARTIAL + doc("  - advance: 1", "  - hot_add: {vm: g, region: 8G, backed: 8G}")
    with pytest.raises(StepFailed, match=r"^step 3 \(hot_add, line 6\): region: "):
        run_text(text)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            ["  - online: {vm: g, block: 3, expect_error: EBUSY}"],
            "expected error EBUSY, got -EINVAL",
        ),
        (
            ["  - offline: {vm: g, block: 99, expect_error: -EBUSY}"],
            "expected error -EBUSY, got -ENOENT",
        ),
        (
            [
                "  - hot_add: {vm: g, region: 128M, backed: 128M}",
                "  - online: {vm: g, block: 8, expect_error: EINVAL}",
            ],
            "expected error EINVAL, but the write succeeded",
        ),
    ],
)
def test_expect_error_mismatch_fails_the_step(steps: list[str], message: str) -> None:
    runner = ScenarioRunner(parse_scenario(VM_G + doc("steps:", *steps, "  - advance: 1")))
    with pytest.raises(StepFailed, match=re.escape(message)):
        runner.run()
    assert runner.step_results[-1]["index"] == len(steps)
    assert message in runner.step_results[-1]["error"]


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        (["  - back: {vm: g, size: 4M, offset: 0}"], "step 1 (back, line 4)"),
        (
            [
                "  - hot_add: {vm: g, region: 128M, backed: 64M}",
                "  - back: {vm: g, size: 4M, offset: 100M, region: 3}",
            ],
            "step 2 (back, line 5)",
        ),
        (["  - online: {vm: g, block: 3, expect_error: EBUSY}"], "step 1 (online, line 4)"),
        (
            [
                "  - hot_add: {vm: g, region: 128M, backed: 128M}",
                "  - online: {vm: g, block: 8, expect_error: EINVAL}",
            ],
            "step 2 (online, line 5)",
        ),
    ],
    ids=["back-offset-no-region", "back-region-index", "wrong-errno", "no-error"],
)
def test_step_failed_from_a_handler_names_the_step(steps: list[str], fragment: str) -> None:
    with pytest.raises(StepFailed) as info:
        run_text(VM_G + doc("steps:", *steps))
    assert str(info.value).startswith(fragment)


def test_unhashable_tag_is_refused() -> None:
    text = VM_G + doc("steps:", "  - allocate: {vm: g, size: 4M, tag: [1]}")
    with pytest.raises((ScenarioError, StepFailed)):
        run_text(text)


@pytest.mark.parametrize(
    ("path", "value"),
    [("counters.num_pages_ballooned", "'1000'"), ("meminfo.Balloon", "'1000'")],
)
def test_unaligned_expect_size_is_an_error(path: str, value: str) -> None:
    result = run_text(PARTIAL + doc(f"  - expect: {{vm: g, {path}: {value}}}"))
    (entry,) = result["expectations"]
    assert entry["ok"] is False


# -- virtual time -------------------------------------------------------------------------


def test_udev_onlining_delay_paces_the_hot_add() -> None:
    text = doc(
        "vms:",
        "  - {id: g, boot_memory: 1G, max_memory: 4G, udev_online: online, onlining_delay: 0.5}",
        "steps:",
        "  - hot_add: {vm: g, region: 384M, backed: 384M}",
        "  - advance: 2.25",
        "  - advance: 5",
        "  - expect: {vm: g, counters.num_pages_onlined: 384M}",
    )
    result = run_text(text)
    # udev onlines one block 0.5 s after it appears; hv_balloon adds the next block only
    # once the previous one is online: three blocks, 1.5 s.
    assert step_result(result, 1)["time"] == pytest.approx(1.5)
    assert step_result(result, 2)["time"] == pytest.approx(3.75)
    assert step_result(result, 3)["time"] == pytest.approx(8.75)
    assert result["virtual_time"] == pytest.approx(8.75)
    assert result["ok"] is True


def test_no_onlining_delay_takes_no_time() -> None:
    text = doc(
        "vms:",
        "  - {id: g, boot_memory: 1G, max_memory: 4G, auto_online: online}",
        "steps:",
        "  - hot_add: {vm: g, region: 384M, backed: 384M}",
    )
    assert run_text(text)["virtual_time"] == 0.0


def test_advance_moves_time_exactly() -> None:
    result = run_text(VM_G + doc("steps:", "- advance: 5", "- advance: 0.125", "- advance: 0"))
    assert [s["time"] for s in result["steps"]] == [5.0, 5.125, 5.125]
    assert result["virtual_time"] == 5.125


def test_offline_blocks_cost_the_onlining_wait() -> None:
    # Nobody onlines the new blocks: hv_balloon waits 5 s for each before it goes on.
    text = VM_G + doc("steps:", "  - hot_add: {vm: g, region: 256M, backed: 256M}")
    result = run_text(text)
    assert result["virtual_time"] == pytest.approx(10.0)
    assert [b["state"] for b in result["vms"]["g"]["blocks"][8:]] == ["offline", "offline"]


# -- online / offline steps ----------------------------------------------------------------

HALF_BACKED = doc(
    "vms:",
    "  - {id: g, boot_memory: 1G, max_memory: 4G, udev_online: online_movable,",
    "     onlining_delay: 0.5}",
    "steps:",
    "  - hot_add: {vm: g, region: 384M, backed: 300M}",
)


def test_offline_of_a_block_with_unbacked_page_offline_pages_is_ebusy() -> None:
    text = HALF_BACKED + doc(
        "  - offline: {vm: g, block: 10, expect_error: EBUSY}",
        "  - offline: {vm: g, block: 10, expect_error: -EBUSY}",
        "  - offline: {vm: g, block: 9}",
        "  - expect: {vm: g, blocks.9.state: offline, blocks.10.state: online}",
        "  - expect: {vm: g, counters.num_pages_onlined: 172M}",
    )
    result = run_text(text)
    assert step_result(result, 2)["result"] == {"error": "-EBUSY"}
    assert step_result(result, 3)["result"] == {"error": "-EBUSY"}
    assert "result" not in step_result(result, 4)
    assert failed_expectations(result) == []
    assert result["ok"] is True


def test_offline_ebusy_without_expect_error_fails_the_step() -> None:
    with pytest.raises(StepFailed, match=r"step 2 \(offline, line 6\).*-EBUSY"):
        run_text(HALF_BACKED + doc("  - offline: {vm: g, block: 10}"))


def test_online_of_an_online_block_is_einval() -> None:
    text = HALF_BACKED + doc(
        "  - online: {vm: g, block: 8, expect_error: EINVAL}",
        "  - online: {vm: g, block: 0, type: online_movable, expect_error: true}",
    )
    result = run_text(text)
    assert step_result(result, 2)["result"] == {"error": "-EINVAL"}
    assert step_result(result, 3)["result"] == {"error": "-EINVAL"}
    assert result["ok"] is True


def test_offline_then_online_again() -> None:
    text = HALF_BACKED + doc(
        "  - offline: {vm: g, block: 9}",
        "  - online: {vm: g, block: 9, type: online_movable}",
        "  - expect: {vm: g, blocks.9.state: online, blocks.9.zone: Movable}",
        "  - expect: {vm: g, counters.num_pages_onlined: 300M}",
    )
    result = run_text(text)
    assert failed_expectations(result) == []
    assert result["ok"] is True


# -- fault injection ----------------------------------------------------------------------


def test_injected_going_online_error_keeps_the_block_offline() -> None:
    text = doc(
        "vms:",
        "  - {id: g, boot_memory: 1G, max_memory: 4G, udev_online: online, onlining_delay: 0.5}",
        "steps:",
        "  - inject: {vm: g, notifier: MEM_GOING_ONLINE, errno: -12, count: 1}",
        "  - hot_add: {vm: g, region: 256M, backed: 256M}",
        "  - expect:",
        "      vm: g",
        "      blocks.8.state: offline",
        "      blocks.9.state: online",
        "      counters.num_pages_added: 256M",
        "      counters.num_pages_onlined: 128M",
        "  - online: {vm: g, block: 8}",
        "  - expect: {vm: g, blocks.8.state: online, counters.num_pages_onlined: 256M}",
    )
    result = run_text(text)
    assert failed_expectations(result) == []
    assert result["ok"] is True


def test_injected_going_online_error_on_a_sysfs_online() -> None:
    text = HALF_BACKED + doc(
        "  - offline: {vm: g, block: 9}",
        "  - inject: {vm: g, notifier: MEM_GOING_ONLINE, errno: -16, count: 1}",
        "  - online: {vm: g, block: 9, expect_error: EBUSY}",
        "  - online: {vm: g, block: 9}",
        "  - expect: {vm: g, blocks.9.state: online}",
    )
    result = run_text(text)
    assert step_result(result, 4)["result"] == {"error": "-EBUSY"}
    assert result["ok"] is True


def test_injected_going_offline_error() -> None:
    text = HALF_BACKED + doc(
        "  - inject: {vm: g, notifier: MEM_GOING_OFFLINE, errno: -11, count: 1}",
        "  - offline: {vm: g, block: 9, expect_error: EAGAIN}",
        "  - expect: {vm: g, blocks.9.state: online}",
        "  - offline: {vm: g, block: 9}",
        "  - expect: {vm: g, blocks.9.state: offline}",
    )
    result = run_text(text)
    assert step_result(result, 3)["result"] == {"error": "-EAGAIN"}
    assert failed_expectations(result) == []
    assert result["ok"] is True


def test_injected_error_without_count_stays() -> None:
    text = doc(
        "vms:",
        "  - {id: g, boot_memory: 1G, max_memory: 4G, udev_online: online, onlining_delay: 0.5}",
        "steps:",
        "  - inject: {vm: g, notifier: MEM_GOING_ONLINE, errno: -12}",
        "  - hot_add: {vm: g, region: 256M, backed: 256M}",
        "  - expect: {vm: g, blocks.8.state: offline, blocks.9.state: offline}",
        "  - expect: {vm: g, counters.num_pages_onlined: 0}",
    )
    result = run_text(text)
    assert failed_expectations(result) == []


# -- dump -----------------------------------------------------------------------------------


def dump_result(result: dict[str, Any], index: int) -> dict[str, int]:
    outcome: dict[str, int] = step_result(result, index)["result"]
    return outcome


def test_dump_of_a_boot_only_guest_reads_every_online_page() -> None:
    text = VM_G + doc("steps:", "  - dump: {vm: g}", "  - dump: {vm: g, skip_free: true}")
    result = run_text(text)
    full, lean = dump_result(result, 1), dump_result(result, 2)
    assert full == {
        "pages_read": 1024 * MIB_PAGES,
        "pages_skipped_offline": 0,
        "unbacked_pages_read": 0,
    }
    assert lean["pages_read"] == 1024 * MIB_PAGES - result["vms"]["g"]["pages"]["buddy"]
    assert result["ok"] is True


def test_dump_skips_unbacked_page_offline_pages() -> None:
    # online-then-reclaim without an allocator in the window: the unbacked pages are
    # pulled back at MEM_ONLINE and the dump skips them.
    text = doc(
        "vms:",
        "  - id: g",
        "    boot_memory: 2G",
        "    max_memory: 8G",
        "    strategy: online-then-reclaim",
        "    udev_online: online_movable",
        "    onlining_delay: 0.2",
        "steps:",
        "  - hot_add: {vm: g, region: 384M, backed: 320M}",
        "  - dump: {vm: g}",
    )
    result = run_text(text)
    assert dump_result(result, 2) == {
        "pages_read": (2048 + 320) * MIB_PAGES,
        "pages_skipped_offline": 64 * MIB_PAGES,
        "unbacked_pages_read": 0,
    }
    assert violations(result, "g") == []
    assert result["ok"] is True


def test_dump_reads_unbacked_pages_allocated_in_the_onlining_window() -> None:
    text = window_race(
        "online-then-reclaim",
        "[unbacked-allocated, unbacked-access, dump-read-unbacked]",
        "  - dump: {vm: g}",
        "  - dump: {vm: g, skip_free: true}",
    )
    result = run_text(text)
    full, lean = dump_result(result, 3), dump_result(result, 4)
    assert full["unbacked_pages_read"] == 64 * MIB_PAGES
    assert full["pages_skipped_offline"] == 0
    assert full["pages_read"] == (2048 + 384) * MIB_PAGES
    # Allocated pages are read even when free pages are skipped.
    assert lean["unbacked_pages_read"] == 64 * MIB_PAGES
    assert lean["pages_read"] < full["pages_read"]
    dumps = [v for v in violations(result, "g") if v["invariant"] == "dump-read-unbacked"]
    assert len(dumps) == 1  # the second dump reads the same pages: recorded once
    (dump,) = dumps
    assert (dump["pfn_start"], dump["pfn_end"]) == UNBACKED
    assert dump["step"] == f"step 3 (dump, line {line_of(text, '- dump: {vm: g}')})"
    assert dump["expected"] is True
    assert result["ok"] is True


def test_undeclared_dump_read_unbacked_fails_the_run() -> None:
    text = window_race(
        "online-then-reclaim", "[unbacked-allocated, unbacked-access]", "  - dump: {vm: g}"
    )
    result = run_text(text)
    flags = {v["invariant"]: v["expected"] for v in violations(result, "g")}
    assert flags["dump-read-unbacked"] is False
    assert result["ok"] is False


@pytest.mark.parametrize("strategy", ["callback", "going-online"])
def test_dump_after_a_safe_strategy_reads_nothing_unbacked(strategy: str) -> None:
    result = run_text(window_race(strategy, "[]", "  - dump: {vm: g}"))
    assert dump_result(result, 3)["unbacked_pages_read"] == 0
    assert dump_result(result, 3)["pages_skipped_offline"] == 64 * MIB_PAGES
    assert result["ok"] is True


def test_dump_before_the_race_reads_nothing_unbacked() -> None:
    text = doc(
        "vms:",
        "  - id: g",
        "    boot_memory: 2G",
        "    max_memory: 8G",
        "    strategy: online-then-reclaim",
        "    udev_online: online_movable",
        "    onlining_delay: 0.2",
        "    expect_violations: [unbacked-allocated, unbacked-access]",
        "steps:",
        "  - allocate: {vm: g, size: 384M, zone: Movable, tag: racer, in_window: true, block: 18}",
        "  - dump: {vm: g}",
        "  - hot_add: {vm: g, region: 384M, backed: 320M}",
    )
    result = run_text(text)
    assert dump_result(result, 2)["unbacked_pages_read"] == 0
    assert "dump-read-unbacked" not in invariants(result, "g")
    assert result["ok"] is True


def test_meminfo_is_in_kb() -> None:
    result = run_text(VM_G + doc("steps:", "  - balloon: {vm: g, size: 64M}"))
    vm = result["vms"]["g"]
    assert vm["meminfo"]["Balloon"] == 64 * KB_PER_MIB
    assert vm["counters"]["num_pages_ballooned"] == 64 * MIB_PAGES
    assert vm["pages"]["ballooned"] == 64 * MIB_PAGES
