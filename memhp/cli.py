"""The ``memhp`` command.

``memhp scenario run FILE [--json] [--sysfs-out DIR] [--seed N] [--processes]
[--timeline FILE.svg|FILE.png]`` plays a scenario in one process under a virtual
clock (or, with ``--processes``, across a real ``memhp hypervisor`` and one ``memhp
guest`` per VM) and prints a summary (or the whole JSON result); ``--timeline``
plots backed, onlined, committed and target memory of every VM over time. The exit
status is 0 when every ``expect`` held and every violation was declared expected, 1
otherwise, 2 for a bad scenario file or timeline path.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from memhp.logs import configure_logging
from memhp.units import format_size

#: Modules with ``add_subparser(subparsers)``: ``memhp hypervisor``, ``memhp guest``, ...
PROCESS_COMMANDS: tuple[str, ...] = (
    "memhp.trace",
    "guest.cli",
    "hypervisor.cli",
    "memhp.ctl",
    "memhp.health",
    "memhp.watch",
    "memhp.demo",
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _scenario_run(args: argparse.Namespace) -> int:
    from guest.sysfs import write_sysfs_tree
    from memhp.scenario.runner import ScenarioRunner, StepFailed
    from memhp.scenario.spec import ScenarioError, load_scenario
    from memhp.view.timeline import Timeline, TimelineError, check_timeline_path, write_timeline

    timeline_path = Path(args.timeline) if args.timeline else None
    try:
        scenario = load_scenario(args.file)
        if args.processes:
            from memhp.scenario.processes import check_supported

            check_supported(scenario)
        if timeline_path is not None:
            check_timeline_path(timeline_path)
    except (ScenarioError, TimelineError) as err:
        sys.stderr.write(f"memhp: {err}\n")
        return EXIT_BAD_INPUT
    timeline = (
        Timeline(clock="wall time" if args.processes else "virtual time")
        if timeline_path is not None
        else None
    )
    if args.processes:
        from memhp.scenario.processes import run_processes

        sysfs_out = Path(args.sysfs_out) if args.sysfs_out else None
        try:
            result = asyncio.run(
                run_processes(scenario, seed=args.seed, sysfs_out=sysfs_out, timeline=timeline)
            )
        except (KeyboardInterrupt, asyncio.CancelledError):
            sys.stderr.write("memhp: interrupted (every child process was stopped)\n")
            return EXIT_FAILED
    else:
        runner = ScenarioRunner(scenario, seed=args.seed, timeline=timeline)
        try:
            result = runner.run()
        except StepFailed as err:
            result = runner.result()
            result["ok"] = False
            result["error"] = str(err)
        if args.sysfs_out:
            for vm_id, node in runner.nodes.items():
                write_sysfs_tree(node.guest.mm, Path(args.sysfs_out) / vm_id)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(summary(result))
    if timeline is not None and timeline_path is not None:
        try:
            write_timeline(timeline, timeline_path)
        except (TimelineError, OSError) as err:
            sys.stderr.write(f"memhp: timeline: {err}\n")
            return EXIT_FAILED
    return EXIT_OK if result["ok"] else EXIT_FAILED


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"scenario {result['scenario']} (seed {result['seed']}): "
        f"{len(result['steps'])} steps, {result['virtual_time']:.3f} s of virtual time"
    ]
    if "error" in result:
        lines.append(f"  ERROR {result['error']}")
    for vm_id, vm in result["vms"].items():
        mi = vm["meminfo"]
        online = sum(1 for b in vm["blocks"] if b["state"] == "online")
        memory = (
            f"MemTotal {format_size(mi['MemTotal'] << 10)}, "
            f"MemFree {format_size(mi['MemFree'] << 10)}, "
            f"blocks {online}/{len(vm['blocks'])} online, "
        )
        if "counters" in vm:
            c = vm["counters"]
            lines.append(
                f"  vm {vm_id} ({vm['strategy']}, {vm['driver_mode']}): {memory}"
                f"added {c['num_pages_added']} onlined {c['num_pages_onlined']} "
                f"ballooned {c['num_pages_ballooned']} pages, "
                f"PageOffline {vm['pages']['page_offline']} pages"
            )
        else:
            v = vm.get("virtio_mem", {})
            mode = v.get("driver", {}).get("mode", "?")
            lines.append(
                f"  vm {vm_id} ({vm.get('protocol', '?')}, {mode}): {memory}"
                f"requested {format_size(v.get('requested', 0) << 12)} "
                f"plugged {format_size(v.get('plugged', 0) << 12)}, "
                f"PageOffline {vm['pages']['page_offline']} pages"
            )
        for v in vm["violations"]:
            tag = "expected" if v["expected"] else "VIOLATION"
            lines.append(
                f"    {tag} {v['invariant']} pfn [{v['pfn_start']:#x}, {v['pfn_end']:#x}) "
                f"at {v['step']}: {v['message']}"
            )
            if not v["expected"]:
                lines.extend(f"      | {t}" for t in v["trace"])
    for e in result["expectations"]:
        if not e["ok"]:
            detail = e.get("error") or f"expected {e['expected']!r}, got {e['actual']!r}"
            lines.append(f"  EXPECT FAILED {e['vm']} {e['path']} at {e['step']}: {detail}")
    passed = sum(1 for e in result["expectations"] if e["ok"])
    lines.append(
        f"  {passed}/{len(result['expectations'])} expectations held; "
        f"{'OK' if result['ok'] else 'FAILED'}"
    )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memhp",
        description="memhp-emu: a hypervisor-guest memory hot-add and balloon protocol emulator",
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")
    sub = parser.add_subparsers(dest="command", required=True)
    scenario = sub.add_parser("scenario", help="scenario files")
    scenario_sub = scenario.add_subparsers(dest="scenario_command", required=True)
    run = scenario_sub.add_parser(
        "run", help="run a scenario in process (virtual clock) or across processes"
    )
    run.add_argument("file")
    run.add_argument("--json", action="store_true", help="print the whole JSON result")
    run.add_argument("--sysfs-out", metavar="DIR", help="write DIR/<vm>/sys/devices/system/memory")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument(
        "--processes",
        action="store_true",
        help="run across real processes: one memhp hypervisor and one memhp guest per VM "
        "on loopback (real time; same JSON as in process, times aside)",
    )
    run.add_argument(
        "--timeline",
        metavar="FILE",
        help="plot backed, onlined, committed and target memory of every VM over time "
        "(.svg; .png with matplotlib, the 'plot' extra)",
    )
    run.set_defaults(func=_scenario_run)
    # The process commands register themselves (each module adds its own subcommand).
    for module in PROCESS_COMMANDS:
        importlib.import_module(module).add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    code: int = args.func(args)
    return code


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a process command's coroutine to completion and return its exit status."""
    return asyncio.run(main())


if __name__ == "__main__":
    raise SystemExit(main())
