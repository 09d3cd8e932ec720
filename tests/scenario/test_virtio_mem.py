"""Scenarios with ``protocol: virtio-mem``: the spec, the in-process runner, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memhp.scenario.processes import check_supported
from memhp.scenario.runner import ScenarioRunner, StepFailed
from memhp.scenario.spec import ScenarioError, load_scenario, parse_scenario
from tests.scenario.helpers import SCENARIOS_DIR, doc, failed_expectations, line_of, run_text

G = 1 << 30
M = 1 << 20

VM = (
    "vms:\n"
    "  - id: v\n"
    "    boot_memory: 1G\n"
    "    protocol: virtio-mem\n"
    "    auto_online: online_movable\n"
    "    virtio_mem: {region_size: 2G, requested: 256M}\n"
)


def error(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "t.yaml")
    return info.value


# -- the spec ---------------------------------------------------------------------------


def test_virtio_mem_vm_defaults() -> None:
    sc = parse_scenario(VM + doc("steps: []"), "t.yaml")
    vm = sc.vm("v")
    assert vm.protocol == "virtio-mem"
    assert vm.max_memory == vm.boot_memory == G  # max_memory is optional here
    d = vm.virtio_mem
    assert d is not None
    assert (d.region_size, d.block_size, d.requested) == (2 * G, 2 * M, 256 * M)
    # Placed above the VM's memory, aligned to 1 GiB.
    assert d.addr == G
    assert (d.node, d.force_bbm, d.unplug_online, d.bbm_safe_unplug) == (0, False, True, True)


def test_virtio_mem_device_settings() -> None:
    text = doc(
        "vms:",
        "  - id: v",
        "    boot_memory: 1G",
        "    max_memory: 3G",
        "    block_size: 2G",
        "    protocol: hyperv-dm+virtio-mem",
        "    virtio_mem:",
        "      region_size: 4G",
        "      block_size: 1G",
        "      requested: 2G",
        "      node: 1",
        "      force_bbm: true",
        "      unplug_online: false",
        "      bbm_safe_unplug: false",
        "steps: []",
    )
    with pytest.raises(ScenarioError, match="boot_memory: must be a positive multiple"):
        parse_scenario(text, "t.yaml")
    text = text.replace("boot_memory: 1G", "boot_memory: 2G").replace(
        "max_memory: 3G", "max_memory: 4G"
    )
    d = parse_scenario(text, "t.yaml").vm("v").virtio_mem
    assert d is not None
    assert d.addr == 4 * G  # above max_memory, aligned to the 2 GiB memory block
    assert (d.block_size, d.requested, d.node) == (G, 2 * G, 1)
    assert (d.force_bbm, d.unplug_online, d.bbm_safe_unplug) == (True, False, False)


@pytest.mark.parametrize(
    ("replace", "needle", "message"),
    [
        (("protocol: virtio-mem", "protocol: xen"), "protocol", "protocol: must be one of"),
        (
            ("    virtio_mem: {region_size: 2G, requested: 256M}\n", ""),
            "id: v",
            "missing required key 'virtio_mem'",
        ),
        (
            ("protocol: virtio-mem", "protocol: hyperv-dm\n    max_memory: 2G"),
            "virtio_mem:",
            "virtio_mem: only with protocol virtio-mem",
        ),
        (("region_size: 2G", "region_size: 2G, block_size: 3M"), "virtio_mem:", "power of two"),
        (("region_size: 2G", "region_size: 2G, block_size: 512K"), "virtio_mem:", "at least 1M"),
        (("region_size: 2G", "region_size: 2049M, block_size: 2M"), "virtio_mem:", "multiple"),
        (("requested: 256M", "requested: 3G"), "virtio_mem:", "must not exceed region_size"),
        (("requested: 256M", "requested: 257M"), "virtio_mem:", "requested: must be a multiple"),
        (("region_size: 2G", "region_size: 2G, addr: 512M"), "virtio_mem:", "must not overlap"),
        (("region_size: 2G", "region_size: 0"), "virtio_mem:", "must not be 0"),
        (("region_size: 2G", "region_size: 2G, speed: 3"), "virtio_mem:", "unknown key 'speed'"),
        (("region_size: 2G", "region_size: 2G, force_bbm: 1"), "virtio_mem:", "true or false"),
    ],
)
def test_virtio_mem_spec_errors(replace: tuple[str, str], needle: str, message: str) -> None:
    text = VM.replace(*replace) + doc("steps: []")
    err = error(text)
    assert message in err.message
    assert err.line == line_of(text, needle)


def test_steps_must_fit_the_vms_devices() -> None:
    text = VM + doc("steps:", "  - hot_add: {vm: v, region: 128M, backed: 128M}")
    err = error(text)
    assert err.message == ("step 1 (hot_add): vm v has no Hyper-V DM device (protocol virtio-mem)")
    assert err.line == line_of(text, "hot_add")
    hyperv = doc("vms:", "  - {id: g, boot_memory: 1G, max_memory: 2G}", "steps:")
    err = error(hyperv + doc("  - resize: {vm: g, size: 1G}"))
    assert err.message == "step 1 (resize): vm g has no virtio-mem device (protocol hyperv-dm)"
    err = error(VM + doc("steps:", "  - resize: {vm: v}"))
    assert "missing required key 'size'" in err.message


# -- the runner -------------------------------------------------------------------------


def test_resize_and_expect_in_process() -> None:
    result = run_text(
        VM
        + doc(
            "steps:",
            "  - expect: {vm: v, virtio_mem.plugged: 256M, virtio_mem.driver.plugged: 256M}",
            "  - resize: {vm: v, size: 100M}",
            "  - allocate: {vm: v, size: 16M, zone: Movable, tag: w}",
            "  - dump: {vm: v}",
            "  - expect:",
            "      vm: v",
            "      virtio_mem.requested: 100M",
            "      virtio_mem.plugged: 100M",
            "      virtio_mem.usable_region: 512M",
            "      virtio_mem.region: 2G",
            "      virtio_mem.block_size: 2M",
            "      virtio_mem.driver.blocks.8.state: movable_partial",
            "      pages.page_offline: 28M",
            "      protocol: virtio-mem",
        )
    )
    assert failed_expectations(result) == []
    assert result["ok"] is True
    view = result["vms"]["v"]
    # A virtio-mem VM has no Hyper-V parts in its view.
    assert not {"counters", "regions", "strategy", "driver_mode", "host"} & set(view)
    dump = next(s for s in result["steps"] if s["kind"] == "dump")
    assert dump["result"]["unbacked_pages_read"] == 0
    assert dump["result"]["pages_skipped_offline"] == 28 * 256


def test_virtio_mem_violations_are_reported_like_the_others() -> None:
    text = VM + doc("steps:", "  - resize: {vm: v, size: 100M}")
    runner = ScenarioRunner(parse_scenario(text, "t.yaml"))
    runner.run()
    node = runner.nodes["v"]
    # A broken guest hands the unplugged subblocks of its partial block to the buddy.
    lo, hi = (G + 100 * M) >> 12, (G + 128 * M) >> 12
    node.guest.mm.generic_online_pages(lo, hi)
    runner.check()
    found = {(v.invariant, v.start_pfn, v.end_pfn) for v in node.violations}
    assert ("unplugged-allocated", lo, hi) in found
    assert ("virtio-mem-online-unplugged", lo, hi) in found
    result = runner.result()
    assert result["ok"] is False
    assert {v["step"] for v in result["vms"]["v"]["violations"]} == {"step 1 (resize, line 8)"}


def test_both_protocols_fail_at_setup() -> None:
    text = doc(
        "vms:",
        "  - id: g",
        "    boot_memory: 1G",
        "    max_memory: 2G",
        "    protocol: hyperv-dm+virtio-mem",
        "    virtio_mem: {region_size: 1G}",
        "steps:",
        "  - advance: 1",
    )
    runner = ScenarioRunner(parse_scenario(text, "t.yaml"))
    with pytest.raises(StepFailed) as info:
        runner.run()
    assert str(info.value) == (
        "setup: vm g: virtio_mem virtio0: probe failed with error -22 (EINVAL): only one "
        "online_page_callback system-wide: hv_balloon already installed it; virtio_mem cannot"
    )


def memhp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memhp.cli", "scenario", "run", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_runs_the_bundled_virtio_mem_scenarios() -> None:
    for name in ("virtio-mem-sbm", "virtio-mem-bbm"):
        proc = memhp(SCENARIOS_DIR / f"{name}.yaml")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"vm g (virtio-mem, {name[-3:]})" in proc.stdout
        assert "OK" in proc.stdout


def test_cli_reports_the_callback_conflict(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text(
        doc(
            "vms:",
            "  - id: g",
            "    boot_memory: 1G",
            "    max_memory: 2G",
            "    protocol: hyperv-dm+virtio-mem",
            "    virtio_mem: {region_size: 1G}",
            "steps: []",
        )
    )
    proc = memhp(path, "--json")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["ok"] is False
    assert "hv_balloon already installed it; virtio_mem cannot" in result["error"]


def test_processes_take_virtio_mem_and_refuse_both_drivers(tmp_path: Path) -> None:
    check_supported(load_scenario(SCENARIOS_DIR / "virtio-mem-sbm.yaml"))
    path = tmp_path / "both.yaml"
    path.write_text(
        doc(
            "vms:",
            "  - id: g",
            "    boot_memory: 1G",
            "    max_memory: 2G",
            "    protocol: hyperv-dm+virtio-mem",
            "    virtio_mem: {region_size: 1G}",
            "steps: []",
        )
    )
    with pytest.raises(ScenarioError, match="protocol hyperv-dm\\+virtio-mem is not supported"):
        check_supported(load_scenario(path))
    proc = memhp(path, "--processes")
    assert proc.returncode == 2
    assert "memhp guest exits 1 with both drivers" in proc.stderr


def test_bundled_virtio_mem_scenarios_show_what_they_say() -> None:
    sbm = ScenarioRunner(load_scenario(SCENARIOS_DIR / "virtio-mem-sbm.yaml"))
    result = sbm.run()
    assert result["ok"] is True
    busy = [line for line in sbm.nodes["g"].events if "subblock_busy" in line]
    assert not busy or all("block=32" in line for line in busy)
    bbm = ScenarioRunner(load_scenario(SCENARIOS_DIR / "virtio-mem-bbm.yaml")).run()
    assert bbm["vms"]["g"]["virtio_mem"]["driver"]["mode"] == "bbm"
