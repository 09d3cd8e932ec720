"""The pieces of ``--processes`` that need no process: views, findings, options, GuestControl.

The multi-process runs themselves are in tests/process/test_scenario_processes.py;
here the guest agent's answers are built from guests the in-process runner played, so
the two runners' building blocks can be compared exactly.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from extents import RangeSet
from guest.introspection import GuestControl, guest_memory_pb, pfn_ranges, write_failure
from guest.invariants import check_guest
from guest.virtio_mem_invariants import check_virtio_mem
from guest.vm import GuestConfig, GuestVm
from memhp.procs import memhp_command
from memhp.scenario.processes import check_supported, guest_argv
from memhp.scenario.result import guest_view, guest_view_pb, without_time
from memhp.scenario.runner import Node, ScenarioRunner
from memhp.scenario.spec import ScenarioError, load_scenario, parse_scenario
from memhp.v1 import guest_pb2, guest_pb2_grpc
from tests.scenario.helpers import BUNDLED, SCENARIOS_DIR, VM_G, doc

MIB_PAGES = 256


def _played(path: Path) -> ScenarioRunner:
    runner = ScenarioRunner(load_scenario(path))
    runner.run()
    return runner


def _truth(node: Node) -> guest_pb2.GetMemoryRequest:
    if node.device is not None:
        # A virtio-mem guest: the device's plugged memory (what the process runner sends).
        return guest_pb2.GetMemoryRequest(
            host_truth=True, host_backed=pfn_ranges(node.device.plugged.ranges())
        )
    offered = RangeSet()
    for region in node.host.regions:
        for s, e in region.backed.ranges():
            offered.add(s, e)
    return guest_pb2.GetMemoryRequest(
        host_truth=True,
        host_backed=pfn_ranges(node.host.backed.ranges()),
        host_offered=pfn_ranges(offered.ranges()),
    )


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_the_guest_agents_answer_gives_the_in_process_view(path: Path) -> None:
    for node in _played(path).nodes.values():
        memory = guest_memory_pb(node.guest)
        assert json.dumps(guest_view_pb(memory)) == json.dumps(guest_view(node.guest))


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_get_memory_with_the_host_truth_finds_what_the_runner_checks(path: Path) -> None:
    for node in _played(path).nodes.values():
        if node.device is not None:
            findings = check_guest(node.guest.mm, None, None, None)
            for driver in node.guest.virtio_mem:
                findings += check_virtio_mem(
                    node.guest.mm, driver, node.device.plugged, node.device.plugged_size
                )
        else:
            offered = RangeSet()
            for region in node.host.regions:
                for s, e in region.backed.ranges():
                    offered.add(s, e)
            findings = check_guest(node.guest.mm, node.guest.driver, node.host.backed, offered)
        expected = [(f.invariant, f.start_pfn, f.end_pfn, f.message) for f in findings]
        memory = guest_memory_pb(node.guest, (), _truth(node))
        got = [(v.invariant, v.pfn_start, v.pfn_end, v.message) for v in memory.violations]
        assert got == expected


RACE = doc(
    "vms:",
    "  - {id: otr, boot_memory: 2G, max_memory: 8G, strategy: online-then-reclaim,",
    "     udev_online: online_movable, onlining_delay: 0.2}",
    "steps:",
    "  - allocate: {vm: otr, size: 384M, zone: Movable, tag: r, in_window: true, block: 18}",
    "  - hot_add: {vm: otr, region: 384M, backed: 320M}",
)


def test_without_the_host_truth_only_guest_invariants_are_checked() -> None:
    runner = ScenarioRunner(parse_scenario(RACE))
    runner.run()
    node = runner.nodes["otr"]
    with_truth = {v.invariant for v in guest_memory_pb(node.guest, (), _truth(node)).violations}
    without = {v.invariant for v in guest_memory_pb(node.guest).violations}
    assert "unbacked-allocated" in with_truth
    assert "unbacked-allocated" not in without


def test_without_time_drops_the_clock_and_nothing_else() -> None:
    result = ScenarioRunner(parse_scenario((SCENARIOS_DIR / "strategies.yaml").read_text())).run()
    before = json.dumps(result)
    stripped = without_time(result)
    assert json.dumps(result) == before  # the input is left alone
    assert "virtual_time" not in stripped
    assert all("time" not in s for s in stripped["steps"])
    violations = stripped["vms"]["online-then-reclaim"]["violations"]
    assert violations and all("trace" not in v for v in violations)
    assert violations[0]["step"] == "step 6 (hot_add, line 38)"
    assert stripped["expectations"] == result["expectations"]


def test_guest_argv_takes_the_vm_entry() -> None:
    scenario = parse_scenario(
        doc(
            "vms:",
            "  - {id: a, boot_memory: 1G, max_memory: 4G, strategy: going-online,",
            "     driver_mode: fixed, auto_online: online_movable, onlining_delay: 0.25,",
            "     pressure_report_delay: 3}",
            "  - {id: b, boot_memory: 1G, max_memory: 4G, udev_online: online_kernel}",
            "steps: []",
        )
    )
    a = guest_argv(scenario.vms[0], "127.0.0.1:5", log_args=[], sysfs=None)
    assert a == memhp_command(
        "guest",
        "--hypervisor",
        "127.0.0.1:5",
        "--vm-id",
        "a",
        "--listen",
        "127.0.0.1:0",
        "--strategy",
        "going-online",
        "--driver-mode",
        "fixed",
        "--auto-online",
        "online_movable",
        "--onlining-delay",
        "0.25",
        "--status-interval",
        "1",
        "--pressure-report-delay",
        "3",
    )
    b = guest_argv(scenario.vms[1], "h:1", log_args=["--log-level", "info"], sysfs=Path("/s/b"))
    assert b[-4:] == ["--udev-online", "online_kernel", "--sysfs-dir", "/s/b"]
    assert b[3:5] == ["--log-level", "info"]


def test_options_the_agent_lacks_are_refused_with_the_line() -> None:
    text = doc(
        "vms:",
        "  - {id: g, boot_memory: 1G, max_memory: 4G}",
        "  - {id: j, boot_memory: 1G, max_memory: 4G, onlining_jitter: 0.5}",
        "steps: []",
    )
    with pytest.raises(ScenarioError) as err:
        check_supported(parse_scenario(text, "j.yaml"))
    assert str(err.value) == (
        "j.yaml:3: vm j: onlining_jitter is not supported with --processes "
        "(memhp guest has no such option)"
    )
    check_supported(parse_scenario(VM_G + "steps: []\n"))


def test_a_failed_sysfs_write_is_read_back_from_its_status_message() -> None:
    details = "memory9/state: write 'online' failed with -ENOMEM: notifier said no: x"
    assert write_failure(details) == ("ENOMEM", "notifier said no: x")
    assert write_failure("memory9/state: something else") is None


# -- GuestControl over a real in-process gRPC server (no agent: the guest as built) --------


@pytest_asyncio.fixture
async def control() -> AsyncIterator[tuple[GuestVm, Any]]:
    vm = GuestVm(GuestConfig(vm_id="g", boot_pages=8 * 128 * MIB_PAGES, pressure_report_delay=0))
    vm.start()
    server = grpc.aio.server()
    guest_pb2_grpc.add_GuestControlServicer_to_server(GuestControl(lambda: vm), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield vm, guest_pb2_grpc.GuestControlStub(channel)
    finally:
        await channel.close(None)
        await server.stop(None)


async def test_allocate_and_free_by_tag(control: tuple[GuestVm, Any]) -> None:
    vm, stub = control
    got = await stub.Allocate(
        guest_pb2.AllocateRequest(pages=1024, order=2, zone="Normal", tag="w")
    )
    assert got.allocated_pages == 1024
    assert len(vm.mm.allocations["w"]) == 1024
    freed = await stub.Free(guest_pb2.FreeRequest(tag="w", pages=512))
    assert freed.freed_pages == 512
    freed = await stub.Free(guest_pb2.FreeRequest(tag="w"))
    assert freed.freed_pages == 512


async def test_a_bad_argument_is_invalid_argument_with_the_guests_text(
    control: tuple[GuestVm, Any],
) -> None:
    _, stub = control
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Allocate(guest_pb2.AllocateRequest(pages=1, zone="DMA"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "zone: must be one of Normal, Movable, not 'DMA'"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.InjectNotifierError(
            guest_pb2.InjectNotifierErrorRequest(action="MEM_BOGUS", errno=-12)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MEM_GOING_ONLINE or MEM_GOING_OFFLINE" in (err.value.details() or "")


async def test_injections_and_armed_allocations_reach_the_guest(
    control: tuple[GuestVm, Any],
) -> None:
    vm, stub = control
    await stub.InjectSlowOnlining(guest_pb2.InjectSlowOnliningRequest(seconds=3, count=1))
    assert (vm.slow_onlining, vm.slow_onlining_count) == (3, 1)
    await stub.InjectNotifierError(
        guest_pb2.InjectNotifierErrorRequest(action="MEM_GOING_ONLINE", errno=-12, count=2)
    )
    await stub.AllocateInWindow(
        guest_pb2.AllocateInWindowRequest(pages=64, zone="Movable", tag="r", block=9)
    )
    [armed] = vm.window_allocations
    assert (armed.pages, armed.zone, armed.tag, armed.block) == (64, "Movable", "r", 9)


async def test_dump_reports_unbacked_reads_against_the_given_truth(
    control: tuple[GuestVm, Any],
) -> None:
    _, stub = control
    boot = 8 * 128 * MIB_PAGES
    reply = await stub.Dump(guest_pb2.DumpRequest(skip_free=False))
    assert reply.pages_read == boot and not reply.unbacked_read
    half = guest_pb2.PfnRange(start_pfn=0, end_pfn=boot // 2)
    reply = await stub.Dump(guest_pb2.DumpRequest(host_truth=True, host_backed=[half]))
    unbacked = RangeSet()
    for r in reply.unbacked_read:
        unbacked.add(r.start_pfn, r.end_pfn)
    assert list(unbacked.ranges()) == [(boot // 2, boot)]
