"""memhp.scenario.spec: scenario files in, dataclasses out, errors with file and line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memhp.scenario.spec import (
    STEP_KEYS,
    Scenario,
    ScenarioError,
    VmSpec,
    load_scenario,
    parse_scenario,
)
from tests.scenario.helpers import BUNDLED, VM_G, doc, line_of

PATH = "t.yaml"
G = 1 << 30
M = 1 << 20


def parse(text: str) -> Scenario:
    return parse_scenario(text, PATH)


def error(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, PATH)
    return info.value


def assert_error(err: ScenarioError, line: int | None, *fragments: str) -> None:
    """The error names the file and ``line``, and its message holds every fragment."""
    assert err.path == PATH
    assert err.line == line, f"reported line {err.line}, expected {line}: {err}"
    assert str(err) == f"{PATH}:{line}: {err.message}"
    for fragment in fragments:
        assert fragment in err.message, f"{fragment!r} not in {err.message!r}"


# -- valid documents -----------------------------------------------------------------


def test_minimal_scenario_takes_every_default() -> None:
    sc = parse_scenario(
        doc("vms:", "  - id: g", "    boot_memory: 1G", "    max_memory: 2G", "steps: []"),
        "dir/my-scenario.yaml",
    )
    assert sc.path == "dir/my-scenario.yaml"
    assert sc.name == "my-scenario"  # the file's stem
    assert sc.description == ""
    assert sc.seed == 0
    assert sc.profile == "default"
    assert sc.steps == []
    assert sc.vms == [
        VmSpec(
            id="g",
            boot_memory=G,
            max_memory=2 * G,
            block_size=128 * M,
            strategy="callback",
            driver_mode="upstream",
            auto_online="offline",
            udev_online=None,
            onlining_delay=0.0,
            memmap_on_memory=False,
            pressure_report_delay=0,
            expect_violations=[],
            line=2,
        )
    ]


def test_every_vm_option_is_read() -> None:
    sc = parse(
        doc(
            "name: full",
            "description: all of it",
            "seed: 42",
            "profile: qemu",
            "vms:",
            "  - id: a",
            "    boot_memory: 2G",
            "    max_memory: 8G",
            "    block_size: 256M",
            "    strategy: online-then-reclaim",
            "    driver_mode: fixed",
            "    auto_online: online_movable",
            "    udev_online: online_kernel",
            "    onlining_delay: 0.25",
            "    memmap_on_memory: true",
            "    pressure_report_delay: 7",
            "    expect_violations: [unbacked-allocated, counter-onlined]",
            "steps: []",
        )
    )
    assert (sc.name, sc.description, sc.seed, sc.profile) == ("full", "all of it", 42, "qemu")
    assert sc.vms == [
        VmSpec(
            id="a",
            boot_memory=2 * G,
            max_memory=8 * G,
            block_size=256 * M,
            strategy="online-then-reclaim",
            driver_mode="fixed",
            auto_online="online_movable",
            udev_online="online_kernel",
            onlining_delay=0.25,
            memmap_on_memory=True,
            pressure_report_delay=7,
            expect_violations=["unbacked-allocated", "counter-onlined"],
            line=6,
        )
    ]
    assert sc.vm("a") is sc.vms[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("'4096'", 4096),
        ("8192", 8192),
        ("4K", 4096),
        ("128M", 128 * M),
        ("128m", 128 * M),
        ("1G", G),
        ("1GiB", G),
        ("2GB", 2 * G),
        ("1T", 1 << 40),
    ],
)
def test_sizes_are_bytes_with_binary_suffixes(text: str, expected: int) -> None:
    sc = parse(
        doc(
            "vms:",
            "  - {id: g, boot_memory: 1G, max_memory: 1T}",
            "steps:",
            f"  - hot_add: {{vm: g, region: 2G, backed: 1G, offset: {text}}}",
            f"  - allocate: {{vm: g, size: {text}}}",
        )
    )
    assert sc.vms[0].max_memory == 1 << 40
    assert sc.steps[0].args == {"vm": "g", "region": 2 * G, "backed": G, "offset": expected}
    assert sc.steps[1].args["size"] == expected


def test_steps_keep_kind_line_index_and_converted_arguments() -> None:
    text = doc(
        "# a comment first",
        "vms:",
        "  - {id: g, boot_memory: 1G, max_memory: 4G}",
        "steps:",
        "  - hot_add: {vm: g, region: 512M, backed: 300M, form: range}",
        "  - back:",
        "      vm: g",
        "      size: 4M",
        "      offset: 400M",
        "      region: -1",
        "  - online: {vm: g, block: 9, type: online_movable, expect_error: EINVAL}",
        "  - offline: {vm: g, block: 9}",
        "  - allocate: {vm: g, size: 8M, order: 10, zone: Movable, tag: t, block: 9}",
        "  - free: {vm: g, tag: t, size: 4M}",
        "  - inject: {vm: g, notifier: MEM_GOING_ONLINE, errno: -12, count: 2}",
        "  - inject: {vm: g, slow_onlining: 3}",
        "  - set_target: {vm: g, size: 2G}",
        "  - balloon: {vm: g, size: 64M}",
        "  - unballoon: {vm: g, size: 32M}",
        "  - dump: {vm: g, skip_free: true}",
        "  - expect: {vm: g, counters.num_pages_added: 300M, blocks.9.state: online}",
    )
    sc = parse(text)
    got = [(s.kind, s.line, s.index) for s in sc.steps]
    assert got == [
        ("hot_add", 5, 0),
        ("back", 6, 1),
        ("online", 11, 2),
        ("offline", 12, 3),
        ("allocate", 13, 4),
        ("free", 14, 5),
        ("inject", 15, 6),
        ("inject", 16, 7),
        ("set_target", 17, 8),
        ("balloon", 18, 9),
        ("unballoon", 19, 10),
        ("dump", 20, 11),
        ("expect", 21, 12),
    ]
    args = [s.args for s in sc.steps]
    assert args[0] == {"vm": "g", "region": 512 * M, "backed": 300 * M, "form": "range"}
    # back.region is a region index, not a size.
    assert args[1] == {"vm": "g", "size": 4 * M, "offset": 400 * M, "region": -1}
    assert args[2] == {"vm": "g", "block": 9, "type": "online_movable", "expect_error": "EINVAL"}
    assert args[4] == {
        "vm": "g",
        "size": 8 * M,
        "order": 10,
        "zone": "Movable",
        "tag": "t",
        "block": 9,
    }
    assert args[5] == {"vm": "g", "tag": "t", "size": 4 * M}
    assert args[6] == {"vm": "g", "notifier": "MEM_GOING_ONLINE", "errno": -12, "count": 2}
    assert args[7] == {"vm": "g", "slow_onlining": 3.0}
    assert args[8]["size"] == 2 * G
    # expect values stay as written: the runner converts them per field.
    assert args[12] == {"vm": "g", "counters.num_pages_added": "300M", "blocks.9.state": "online"}
    assert sc.steps[0].label == "step 1 (hot_add, line 5)"
    assert sc.steps[12].label == "step 13 (expect, line 21)"


@pytest.mark.parametrize(
    ("step", "seconds"),
    [
        ("- advance: 5", 5.0),
        ("- advance: 0.5", 0.5),
        ("- advance: 0", 0.0),
        ("- advance: {seconds: 2}", 2.0),
        ("- advance:\n      seconds: 1.25", 1.25),
    ],
)
def test_advance_shorthand_and_long_form(step: str, seconds: float) -> None:
    sc = parse(VM_G + "steps:\n  " + step + "\n")
    (only,) = sc.steps
    assert only.kind == "advance"
    assert only.line == 4
    assert only.args == {"seconds": seconds}
    assert isinstance(only.args["seconds"], float)


def test_steps_describe_themselves() -> None:
    scenario = parse(
        VM_G
        + doc(
            "steps:",
            "  - hot_add: {vm: g, region: 512M, backed: 300M, offset: 4M}",
            "  - back: {vm: g, size: 84M, region: 0}",
            "  - allocate: {vm: g, size: 64M, zone: Movable, in_window: true, block: 9}",
            "  - online: {vm: g, block: 9, type: online_movable}",
            "  - advance: 1.5",
            "  - dump: {vm: g}",
            "  - expect: {vm: g, pages.page_offline: 84M, violations: []}",
        )
    )
    assert [s.describe() for s in scenario.steps] == [
        "hot_add g: region 512M, backed 300M, offset 4M",
        "back g: size 84M, region 0",
        "allocate g: size 64M, zone Movable, in_window, block 9",
        "online g: block 9, type online_movable",
        "advance: seconds 1.5",
        "dump g",
        "expect g: pages.page_offline, violations",
    ]


def test_block_size_bounds_are_inclusive() -> None:
    for block_size in ("128M", "2G"):
        sc = parse(
            doc(
                "vms:",
                f"  - {{id: g, boot_memory: 2G, max_memory: 4G, block_size: {block_size}}}",
                "steps: []",
            )
        )
        assert sc.vms[0].block_size in (128 * M, 2 * G)


def test_several_vms_and_explicit_null_udev() -> None:
    sc = parse(
        doc(
            "vms:",
            "  - {id: a, boot_memory: 1G, max_memory: 2G, udev_online: null}",
            "  - id: b",
            "    boot_memory: 1G",
            "    max_memory: 1G",
            "steps:",
            "  - dump: {vm: b}",
        )
    )
    assert [(v.id, v.line, v.udev_online) for v in sc.vms] == [("a", 2, None), ("b", 3, None)]
    assert sc.steps[0].args == {"vm": "b"}


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_scenarios_parse(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.path == str(path)
    assert sc.name == path.stem
    assert sc.vms
    assert sc.steps
    # Every step refers to a declared VM (or to none: advance).
    ids = {v.id for v in sc.vms}
    assert all(s.args.get("vm", next(iter(ids))) in ids for s in sc.steps)


def test_every_step_kind_is_known() -> None:
    assert set(STEP_KEYS) == {
        "hot_add",
        "back",
        "set_target",
        "balloon",
        "unballoon",
        "online",
        "offline",
        "allocate",
        "free",
        "inject",
        "advance",
        "dump",
        "resize",
        "expect",
    }


# -- bad documents: the whole file ----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["- vms\n- steps\n", "just a string\n", "42\n", "", "# only a comment\n"],
    ids=["list", "string", "number", "empty", "comment"],
)
def test_not_a_mapping(text: str) -> None:
    assert_error(error(text), 1, "must be a mapping", "'vms'", "'steps'")


def test_missing_vms() -> None:
    text = doc("# header", "", "steps: []")
    assert_error(error(text), 3, "scenario", "missing required key 'vms'")


def test_missing_steps() -> None:
    text = doc("name: x", "vms:", "  - {id: g, boot_memory: 1G, max_memory: 2G}")
    assert_error(error(text), 1, "scenario", "missing required key 'steps'")


def test_unknown_top_level_key() -> None:
    text = VM_G + doc("steps: []", "seeed: 3")
    assert_error(
        error(text),
        4,
        "scenario",
        "unknown key 'seeed'",
        "allowed: description, name, profile, seed, steps, vms",
    )


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        (VM_G + "steps: []\nsteps: []\n", 4, "steps"),
        (doc("vms:", "  - id: g", "    boot_memory: 1G", "    boot_memory: 2G"), 4, "boot_memory"),
        (VM_G + doc("steps:", "  - hot_add:", "      vm: g", "      vm: g"), 6, "vm"),
        (
            VM_G + doc("steps:", "  - expect: {vm: g, pages.buddy: 1, pages.buddy: 2}"),
            4,
            "pages.buddy",
        ),
    ],
    ids=["top-level", "vm", "step", "expect"],
)
def test_duplicate_key_names_the_second_occurrence(text: str, line: int, key: str) -> None:
    assert_error(error(text), line, f"duplicate key {key!r}")


def test_non_string_key() -> None:
    text = VM_G + doc("steps:", "  - expect: {vm: g, 3: 4}")
    assert_error(error(text), 4, "key 3 must be a string")


@pytest.mark.parametrize("seed", ["abc", "1.5", "true"])
def test_seed_must_be_an_integer(seed: str) -> None:
    text = VM_G + doc("steps: []", f"seed: {seed}")
    assert_error(error(text), 4, "seed must be an integer")


def test_unknown_profile() -> None:
    text = doc("profile: kvm") + VM_G + "steps: []\n"
    assert_error(error(text), 1, "profile must be one of default, qemu")


@pytest.mark.parametrize("vms", ["[]", "{}", "g", "null"])
def test_vms_must_be_a_non_empty_list(vms: str) -> None:
    text = doc("steps: []", f"vms: {vms}")
    assert_error(error(text), 2, "vms must be a non-empty list")


@pytest.mark.parametrize("steps", ["{}", "dump", ""])
def test_steps_must_be_a_list(steps: str) -> None:
    text = VM_G + f"steps: {steps}\n"
    assert_error(error(text), 3, "steps must be a list")


# -- bad documents: VMs ---------------------------------------------------------------


def vm_doc(*vm_lines: str) -> str:
    """One VM in block style starting at line 2 (``  - id: g`` is line 2 if given first)."""
    return doc("vms:", *vm_lines, "steps: []")


@pytest.mark.parametrize(
    ("lines", "missing", "what"),
    [
        (("  - boot_memory: 1G", "    max_memory: 2G"), "id", "vm ?"),
        (("  - id: g", "    max_memory: 2G"), "boot_memory", "vm g"),
        (("  - id: g", "    boot_memory: 2G"), "max_memory", "vm g"),
    ],
)
def test_vm_missing_required_key(lines: tuple[str, ...], missing: str, what: str) -> None:
    assert_error(error(vm_doc(*lines)), 2, f"{what}: missing required key {missing!r}")


def test_vm_entry_must_be_a_mapping() -> None:
    assert_error(error(doc("vms: [g]", "steps: []")), 1, "each entry of vms must be a mapping")


def test_vm_unknown_key() -> None:
    text = vm_doc(
        "  - id: g", "    boot_memory: 1G", "    max_memory: 2G", "    strategi: callback"
    )
    assert_error(error(text), 5, "vm g: unknown key 'strategi'", "allowed:", "strategy")


@pytest.mark.parametrize(
    ("size", "rule"),
    [
        ("12Q", "cannot parse size '12Q'"),
        ("'-1'", "cannot parse size '-1'"),
        ("-4096", "must not be negative"),
        ("1.5G", "cannot parse size '1.5G'"),
        ("1.5", "must be a number or a string like '128M'"),
        ("true", "must be a number or a string like '128M'"),
        ("[1G]", "must be a number or a string like '128M'"),
        ("G", "cannot parse size 'G'"),
        ("''", "cannot parse size ''"),
    ],
)
def test_bad_size_strings(size: str, rule: str) -> None:
    text = vm_doc("  - id: g", "    boot_memory: 1G", f"    max_memory: {size}")
    assert_error(error(text), 4, "vm g.max_memory:", rule)


@pytest.mark.parametrize("size", ["4097", "1000", "6K", "2047"])
def test_size_must_be_whole_pages(size: str) -> None:
    text = VM_G + doc("steps:", "  - allocate:", "      vm: g", f"      size: {size}")
    assert_error(error(text), 6, "step 1 (allocate).size:", "not a multiple of 4 KiB pages")


@pytest.mark.parametrize("block_size", ["192M", "64M", "4G", "4K", "129M", "0"])
def test_block_size_power_of_two_from_128m_to_2g(block_size: str) -> None:
    text = vm_doc(
        "  - id: g",
        "    boot_memory: 4G",
        "    max_memory: 8G",
        f"    block_size: {block_size}",
    )
    assert_error(error(text), 5, "vm g.block_size:", "power of two", "128M", "2G")


@pytest.mark.parametrize(
    ("boot", "max_", "line", "key"),
    [
        ("1088M", "2G", 3, "boot_memory"),  # 8.5 blocks
        ("0", "2G", 3, "boot_memory"),
        ("1G", "2100M", 4, "max_memory"),
    ],
)
def test_memory_must_be_a_positive_multiple_of_block_size(
    boot: str, max_: str, line: int, key: str
) -> None:
    text = vm_doc("  - id: g", f"    boot_memory: {boot}", f"    max_memory: {max_}")
    assert_error(error(text), line, f"vm g.{key}:", "positive multiple of block_size (128M)")


def test_memory_multiple_of_a_larger_block_size() -> None:
    text = vm_doc(
        "  - id: g",
        "    block_size: 1G",
        "    boot_memory: 1536M",
        "    max_memory: 4G",
    )
    assert_error(error(text), 4, "vm g.boot_memory:", "multiple of block_size (1024M)")


def test_max_memory_below_boot_memory() -> None:
    text = vm_doc("  - id: g", "    max_memory: 1G", "    boot_memory: 2G")
    assert_error(error(text), 3, "vm g.max_memory:", "at least boot_memory")


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("strategy", "reclaim", "callback, going-online, online-then-reclaim"),
        ("driver_mode", "patched", "upstream, fixed"),
        ("auto_online", "always", "offline, online, online_kernel, online_movable"),
        ("auto_online", "Online", "offline, online, online_kernel, online_movable"),
        ("udev_online", "offline", "online, online_kernel, online_movable"),
        ("udev_online", "movable", "online, online_kernel, online_movable"),
    ],
)
def test_vm_unknown_choice(key: str, value: str, choices: str) -> None:
    text = vm_doc("  - id: g", "    boot_memory: 1G", "    max_memory: 2G", f"    {key}: {value}")
    assert_error(error(text), 5, f"vm g.{key}:", f"must be one of {choices}", repr(value))


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("onlining_delay", "-1", "must be a number >= 0"),
        ("onlining_delay", "soon", "must be a number >= 0"),
        ("pressure_report_delay", "1.5", "must be an integer >= 0"),
        ("memmap_on_memory", "1", "must be true or false"),
        ("expect_violations", "unbacked-allocated", "must be a list of invariant names"),
        ("expect_violations", "[1, 2]", "must be a list of invariant names"),
    ],
)
def test_vm_bad_option_value(key: str, value: str, rule: str) -> None:
    text = vm_doc("  - id: g", "    boot_memory: 1G", "    max_memory: 2G", f"    {key}: {value}")
    assert_error(error(text), 5, f"vm g.{key}:", rule)


DUPLICATE_IDS = doc(
    "vms:",
    "  - {id: g, boot_memory: 1G, max_memory: 2G}",
    "  - {id: h, boot_memory: 1G, max_memory: 2G}",
    "  - {id: g, boot_memory: 1G, max_memory: 2G}",
    "steps: []",
)


def test_duplicate_vm_ids() -> None:
    err = error(DUPLICATE_IDS)
    assert err.line in (2, 4)
    assert_error(err, err.line, "vm id 'g' is declared twice")


def test_duplicate_vm_id_points_at_the_duplicate() -> None:
    assert_error(error(DUPLICATE_IDS), 4, "vm id 'g' is declared twice")


# -- bad documents: steps -------------------------------------------------------------


def steps_doc(*step_lines: str) -> str:
    """VM ``g`` (lines 1-2), ``steps:`` on line 3, the given lines from line 4."""
    return VM_G + doc("steps:", *step_lines)


def test_step_with_two_kinds() -> None:
    text = steps_doc("  - dump: {vm: g}", "  - {hot_add: {vm: g}, back: {vm: g}}")
    assert_error(error(text), 5, "step 2:", "exactly one step kind", "hot_add, back")


def test_step_arguments_mis_indented_become_a_second_kind() -> None:
    # The classic slip: the arguments are siblings of the kind, not under it.
    text = steps_doc("  - hot_add:", "    vm: g", "    region: 1G")
    assert_error(error(text), 4, "step 1:", "exactly one step kind")


def test_empty_step() -> None:
    assert_error(error(steps_doc("  - {}")), 4, "step 1:", "exactly one step kind")


def test_unknown_step_kind() -> None:
    text = steps_doc("  - dump: {vm: g}", "  - dump: {vm: g}", "  - hotadd: {vm: g}")
    assert_error(error(text), 6, "step 3:", "unknown step kind 'hotadd'", "hot_add")


def test_step_refers_to_an_unknown_vm() -> None:
    text = steps_doc("  - hot_add:", "      region: 1G", "      vm: h", "      backed: 1G")
    assert_error(error(text), 6, "step 1 (hot_add).vm:", "no vm 'h'", "declared: g")


def test_expect_refers_to_an_unknown_vm() -> None:
    text = steps_doc("  - expect: {vm: x, pages.buddy: 1}")
    assert_error(error(text), 4, "step 1 (expect).vm:", "no vm 'x'")


def test_unknown_step_argument() -> None:
    text = steps_doc("  - dump:", "      vm: g", "      skipfree: true")
    assert_error(
        error(text), 6, "step 1 (dump):", "unknown key 'skipfree'", "allowed: skip_free, vm"
    )


def test_advance_takes_no_vm() -> None:
    text = steps_doc("  - advance: {seconds: 1, vm: g}")
    assert_error(error(text), 4, "step 1 (advance):", "unknown key 'vm'", "allowed: seconds")


@pytest.mark.parametrize(
    ("step", "line", "missing"),
    [
        (("  - hot_add:", "      vm: g", "      region: 1G"), 5, "backed"),
        (("  - online: {vm: g}",), 4, "block"),
        (("  - free: {vm: g}",), 4, "tag"),
        (("  - back: {size: 4M}",), 4, "vm"),
        (("  - advance: {}",), 4, "seconds"),
    ],
)
def test_step_missing_required_argument(step: tuple[str, ...], line: int, missing: str) -> None:
    assert_error(error(steps_doc(*step)), line, f"missing required key {missing!r}")


def test_expect_needs_a_vm() -> None:
    text = steps_doc("  - expect:", "      pages.buddy: 1")
    assert_error(error(text), 5, "step 1 (expect):", "missing required key 'vm'")


@pytest.mark.parametrize("body", ["g", "[vm, g]", "", "3"])
def test_step_body_must_be_a_mapping(body: str) -> None:
    text = steps_doc("  - dump: {vm: g}", f"  - dump: {body}")
    assert_error(error(text), 5, "step 2 (dump):", "must be a mapping of arguments")


def test_inject_notifier_without_errno() -> None:
    text = steps_doc("  - inject:", "      vm: g", "      notifier: MEM_GOING_ONLINE")
    assert_error(error(text), 5, "step 1 (inject):", "notifier needs errno")


@pytest.mark.parametrize("errno", ["12", "0", "-4096", "EBUSY", "-1.5", "true"])
def test_inject_errno_must_be_negative(errno: str) -> None:
    text = steps_doc(
        "  - inject:",
        "      vm: g",
        "      notifier: MEM_GOING_OFFLINE",
        f"      errno: {errno}",
    )
    assert_error(error(text), 7, "step 1 (inject).errno:", "negative errno in [-4095, -1]")


def test_inject_errno_bounds_are_accepted() -> None:
    for errno in (-1, -4095):
        sc = parse(steps_doc(f"  - inject: {{vm: g, notifier: MEM_GOING_ONLINE, errno: {errno}}}"))
        assert sc.steps[0].args["errno"] == errno


def test_inject_unknown_notifier_action() -> None:
    text = steps_doc("  - inject: {vm: g, notifier: MEM_ONLINE, errno: -12}")
    assert_error(error(text), 4, "step 1 (inject).notifier:", "MEM_GOING_ONLINE, MEM_GOING_OFFLINE")


def test_inject_needs_notifier_or_slow_onlining() -> None:
    text = steps_doc("  - inject:", "      vm: g", "      count: 1")
    assert_error(error(text), 5, "step 1 (inject):", "needs notifier (with errno) or slow_onlining")


def test_inject_count_at_least_one() -> None:
    text = steps_doc("  - inject: {vm: g, slow_onlining: 1, count: 0}")
    assert_error(error(text), 4, "step 1 (inject).count:", "integer >= 1")


@pytest.mark.parametrize(
    ("order", "rule"),
    [("11", "must be 0..10 (MAX_PAGE_ORDER)"), ("64", "0..10"), ("-1", "integer >= 0")],
)
def test_allocate_order_at_most_10(order: str, rule: str) -> None:
    text = steps_doc("  - allocate:", "      vm: g", "      size: 4M", f"      order: {order}")
    assert_error(error(text), 7, "step 1 (allocate).order:", rule)


@pytest.mark.parametrize(
    ("step", "field", "rule"),
    [
        ("  - allocate: {vm: g, size: 4M, zone: DMA}", "allocate).zone", "Normal, Movable"),
        ("  - online: {vm: g, block: -1}", "online).block", "integer >= 0"),
        ("  - online: {vm: g, block: 3.0}", "online).block", "integer >= 0"),
        ("  - online: {vm: g, block: 9, type: offline}", "online).type", "must be one of"),
        ("  - hot_add: {vm: g, region: 1G, backed: 1G, form: short}", "hot_add).form", "region"),
        ("  - advance: {seconds: -1}", "advance).seconds", "a number >= 0"),
        ("  - advance: soon", "advance).seconds", "a number >= 0"),
        ("  - back: {vm: g, size: 4M, region: first}", "back).region", "integer >= -1024"),
        ("  - back: {vm: g, size: 4M, region: -1025}", "back).region", "integer >= -1024"),
        ("  - inject: {vm: g, slow_onlining: -2}", "inject).slow_onlining", ">= 0"),
        ("  - hot_add: {vm: g, region: 1G, backed: 12Q}", "hot_add).backed", "cannot parse"),
        ("  - balloon: {vm: g, size: -1}", "balloon).size", "must not be negative"),
    ],
)
def test_bad_step_argument_value(step: str, field: str, rule: str) -> None:
    assert_error(error(steps_doc(step)), 4, f"step 1 ({field}:", rule)


def test_error_line_in_a_long_file() -> None:
    lines = [f"  - advance: {i}" for i in range(40)]
    lines[33] = "  - allocate: {vm: g, size: 4M, order: 11}"
    text = steps_doc(*lines)
    assert_error(error(text), line_of(text, "order: 11"), "step 34 (allocate).order:")


# -- invalid YAML ----------------------------------------------------------------------


def test_tab_indentation() -> None:
    text = steps_doc("  - dump: {vm: g}", "\t- dump: {vm: g}")
    assert_error(error(text), 5, "invalid YAML", "'\\t'")


def test_bad_indentation() -> None:
    text = steps_doc("  - dump: {vm: g}", "   - dump: {vm: g}")
    assert_error(error(text), 5, "invalid YAML")


def test_unclosed_flow_sequence() -> None:
    text = steps_doc("  - dump: [vm: g}", "  - dump: {vm: g}")
    assert_error(error(text), 4, "invalid YAML", "expected ',' or ']'")


def test_yaml_error_in_the_vm_list() -> None:
    text = doc("vms:", "  - id: g", "    boot_memory: 1G", "   max_memory: 2G", "steps: []")
    err = error(text)
    assert err.line == 4
    assert err.message.startswith("invalid YAML: ")


# -- files -----------------------------------------------------------------------------


def test_load_scenario_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    err = info.value
    assert err.path == str(path)
    assert err.line is None
    assert err.message == "cannot read: No such file or directory"
    assert str(err) == f"{path}: cannot read: No such file or directory"


def test_load_scenario_directory(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(tmp_path)
    assert info.value.line is None
    assert "cannot read" in info.value.message


def test_load_scenario_reports_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(steps_doc("  - dump: {vm: g}", "  - advance: -3"))
    with pytest.raises(ScenarioError) as info:
        load_scenario(str(path))
    assert info.value.path == str(path)
    assert info.value.line == 5
    assert str(info.value).startswith(f"{path}:5: step 2 (advance).seconds:")


def test_load_scenario_reads_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good-one.yaml"
    path.write_text(steps_doc("  - advance: 1"))
    sc = load_scenario(path)
    assert sc.name == "good-one"
    assert sc.path == os.fspath(path)


# -- known bugs ------------------------------------------------------------------------


def test_vm_reference_that_is_a_list() -> None:
    assert_error(error(steps_doc("  - dump: {vm: [g]}")), 4, "step 1 (dump).vm:")


def test_scalar_step_reports_its_own_line() -> None:
    text = steps_doc("  - dump: {vm: g}", "  - hot_add")
    assert_error(error(text), 5, "step 2:")


def test_integer_vm_id_can_be_referenced() -> None:
    sc = parse(
        doc("vms:", "  - {id: 7, boot_memory: 1G, max_memory: 2G}", "steps:", "  - dump: {vm: 7}")
    )
    assert sc.steps[0].args["vm"] == sc.vms[0].id


def test_merge_key_override() -> None:
    sc = parse(
        doc(
            "vms:",
            "  - &base {id: a, boot_memory: 1G, max_memory: 2G}",
            "  - {<<: *base, id: b}",
            "steps: []",
        )
    )
    assert [v.id for v in sc.vms] == ["a", "b"]


@pytest.mark.parametrize("seconds", [".inf", ".nan"])
def test_advance_must_be_finite(seconds: str) -> None:
    assert_error(error(steps_doc(f"  - advance: {seconds}")), 4, "step 1 (advance).seconds:")


def test_onlining_delay_must_not_be_nan() -> None:
    text = vm_doc(
        "  - id: g", "    boot_memory: 1G", "    max_memory: 2G", "    onlining_delay: .nan"
    )
    assert_error(error(text), 5, "vm g.onlining_delay:")
