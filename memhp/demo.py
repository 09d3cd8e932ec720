"""``memhp demo [SCENARIO]``: play a story across real processes and watch it live.

    memhp demo [SCENARIO] [--mqtt URL] [--no-live] [--json] [--timeline FILE]
               [--log-dir DIR] [--refresh S]

Starts a ``memhp hypervisor`` and one ``memhp guest`` per VM of the scenario on
loopback (:class:`memhp.scenario.processes.ProcessRunner`: no broker needed), plays
its steps and shows the live view of that hypervisor meanwhile (its WatchEvents,
GetVm and every guest's GetMemory, :mod:`memhp.view`), with the step running and
how far the story is. It ends with a summary per VM (regions, backed, onlined,
violations expected and not) and exits 1 when a violation occurred that the scenario
did not expect (or an expectation failed, or a step could not run), 0 otherwise, 2 for
a bad scenario or argument.

The default scenario is ``scenarios/demo.yaml``: a ``callback`` guest and an
``online-then-reclaim`` guest, a hot-add with partial backing, deferred onlining by a
udev rule, an allocation in the onlining window that catches the race of
online-then-reclaim, and later backing onlined with ``generic_online_page``.

Where stdout is not a terminal (CI, a pipe, a test), or with ``--no-live``, progress is
plain lines (``step 3/15: hot_add callback: region 1G, backed 300M ... 3.05 s``) and
the last frame of the view is printed once at the end. ``--json`` prints the
scenario's JSON result instead of the summary, with the progress on stderr.
``--mqtt URL`` has the hypervisor and the guests publish their events and retained
documents to that broker too (their ``--mqtt`` option), for ``memhp watch --mqtt URL``
or any subscriber of ``memhp/v1/vm/+/#``; the demo's own view still reads gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from memhp.mqtt import broker_url_arg
from memhp.procs import ChildFailed, sigterm_cancels_this_task
from memhp.scenario.processes import ProcessRunner, StepProgress, check_supported
from memhp.scenario.result import StepFailed
from memhp.scenario.spec import Scenario, ScenarioError, load_scenario
from memhp.units import format_size
from memhp.view.grpc_source import DEFAULT_REFRESH, GrpcSource, SourceError
from memhp.view.model import Fleet
from memhp.view.render import fleet_view
from memhp.view.timeline import Sample, Timeline, TimelineError, check_timeline_path
from memhp.view.timeline import write_timeline as write_timeline_file

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SCENARIO = Path("scenarios") / "demo.yaml"


def default_scenario() -> Path:
    """``scenarios/demo.yaml`` of the source tree, else of the working directory (an
    installed copy, as in the container image, runs from a directory that has it)."""
    for base in (REPO, Path.cwd()):
        if (base / DEFAULT_SCENARIO).exists():
            return base / DEFAULT_SCENARIO
    return REPO / DEFAULT_SCENARIO


#: Recent events per VM in the live demo (room for the progress above the panels).
LIVE_EVENTS = 6


class Progress:
    """Where the story is: the step running, the steps done; drawn above the panels."""

    def __init__(self, scenario: Scenario) -> None:
        self.total = len(scenario.steps)
        self.current: StepProgress | None = None
        self.done = 0
        self.last = ""
        self.started = time.monotonic()
        self.phase_started = time.monotonic()

    def update(self, p: StepProgress) -> None:
        if p.phase == "start":
            self.current = p
            self.phase_started = time.monotonic()
            return
        self.current = None
        if p.index:
            self.done = p.index
        outcome = "failed" if p.phase == "failed" else f"{p.elapsed:.2f} s"
        self.last = f"{_step_name(p)}: {_step_text(p)} ({outcome})"

    def renderables(self) -> list[RenderableType]:
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text(f"story {self.done}/{self.total}", style="bold"),
            ProgressBar(total=max(self.total, 1), completed=self.done, width=40),
            Text(f"{time.monotonic() - self.started:.1f} s", style="dim"),
        )
        lines: list[RenderableType] = [bar]
        if self.last:
            lines.append(Text(f"done    {self.last}", style="dim"))
        if self.current is not None:
            running = time.monotonic() - self.phase_started
            lines.append(
                Text(
                    f"running {_step_name(self.current)}: {_step_text(self.current)} "
                    f"({running:.1f} s)",
                    style="bold cyan",
                )
            )
        return [Group(*lines)]


def _step_name(p: StepProgress) -> str:
    return "setup" if p.index == 0 else f"step {p.index}/{p.total}"


def _step_text(p: StepProgress) -> str:
    return "the guests attach and settle" if p.index == 0 else p.text


class PlainProgress:
    """Progress as lines: ``step i/n: what ... 1.23 s`` (the start is flushed at once)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def update(self, p: StepProgress) -> None:
        if p.phase == "start":
            self.out.write(f"{_step_name(p)}: {_step_text(p)} ... ")
        elif p.phase == "done":
            self.out.write(f"{p.elapsed:.2f} s\n")
        else:
            self.out.write(f"FAILED after {p.elapsed:.2f} s: {p.error}\n")
        self.out.flush()


def _last_samples(timeline: Timeline) -> dict[str, Sample]:
    last: dict[str, Sample] = {}
    for s in timeline.samples:
        last[s.vm] = s
    return last


def summary_table(result: dict[str, Any], timeline: Timeline) -> Table:
    """Per VM: regions, backed, onlined, violations expected and unexpected."""
    samples = _last_samples(timeline)
    table = Table(
        title=f"scenario {result['scenario']}: violations expected / unexpected",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("VM", no_wrap=True)
    for name in ("regions", "backed", "onlined", "expected", "unexpected"):
        table.add_column(name, justify="right", no_wrap=True)
    vm_ids = list(result["vms"]) or list(samples)
    for vm_id in vm_ids:
        vm = result["vms"].get(vm_id)
        sample = samples.get(vm_id)
        violations = vm["violations"] if vm else []
        expected = sum(1 for v in violations if v["expected"])
        unexpected = len(violations) - expected
        name = vm_id
        if vm and vm["strategy"] != vm_id:
            name += f" ({vm['strategy']})"
        table.add_row(
            name,
            str(len(vm["regions"])) if vm else "-",
            format_size(sample.backed) if sample else "-",
            format_size(sample.onlined) if sample else "-",
            str(expected),
            Text(str(unexpected), style="bold red" if unexpected else "green"),
        )
    return table


def summary_lines(result: dict[str, Any]) -> list[Text]:
    lines: list[Text] = []
    unexpected = []
    for vm in result["vms"].values():
        for v in vm["violations"]:
            if not v["expected"]:
                unexpected.append(v)
    for v in unexpected:
        lines.append(
            Text(
                f"UNEXPECTED {v['invariant']} in {v['vm']} at {v['step']}: {v['message']}",
                style="bold red",
            )
        )
    failed = [e for e in result["expectations"] if not e["ok"]]
    for e in failed:
        detail = e.get("error") or f"expected {e['expected']!r}, got {e['actual']!r}"
        lines.append(
            Text(f"EXPECT FAILED {e['vm']} {e['path']} at {e['step']}: {detail}", style="red")
        )
    if "error" in result:
        lines.append(Text(f"ERROR {result['error']}", style="bold red"))
    held = sum(1 for e in result["expectations"] if e["ok"])
    caught = sum(1 for vm in result["vms"].values() for v in vm["violations"] if v["expected"])
    verdict = (
        f"OK: {held}/{len(result['expectations'])} expectations held, "
        f"{caught} expected violation(s) caught, none unexpected"
        if result["ok"]
        else f"FAILED: {len(unexpected)} unexpected violation(s), "
        f"{len(failed)} failed expectation(s)" + (", a step failed" if "error" in result else "")
    )
    lines.append(Text(verdict, style="bold green" if result["ok"] else "bold red"))
    return lines


async def demo(args: argparse.Namespace, console: Console, plain_out: IO[str]) -> int:
    path = Path(args.scenario) if args.scenario else default_scenario()
    timeline_path = Path(args.timeline) if args.timeline else None
    try:
        scenario = load_scenario(path)
        check_supported(scenario)
        if timeline_path is not None:
            check_timeline_path(timeline_path)
    except (ScenarioError, TimelineError) as err:
        sys.stderr.write(f"memhp demo: {err}\n")
        return EXIT_BAD_INPUT
    except OSError as err:
        sys.stderr.write(f"memhp demo: {path}: {err.strerror or err}\n")
        return EXIT_BAD_INPUT
    extra = [] if args.mqtt is None else ["--mqtt", str(args.mqtt)]

    live = not args.no_live and not args.json and console.is_terminal
    timeline = Timeline(clock="wall time")
    progress = Progress(scenario)
    plain = PlainProgress(plain_out)
    runner = ProcessRunner(
        scenario,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        timeline=timeline,
        progress=progress.update if live else plain.update,
        hypervisor_args=extra,
        guest_args=extra,
    )
    started = time.monotonic()
    plain_out.write(
        f"memhp demo: {scenario.name}: a hypervisor and {len(scenario.vms)} guest(s) "
        f"({', '.join(v.id for v in scenario.vms)}), {len(scenario.steps)} steps\n"
    )
    plain_out.flush()
    fleet = Fleet()
    try:
        try:
            await runner.start()
        except (ChildFailed, StepFailed, OSError) as err:
            sys.stderr.write(f"memhp demo: the processes did not start: {err}\n")
            return EXIT_FAILED
        assert runner.hypervisor is not None
        async with GrpcSource(fleet, runner.hypervisor.address) as source:
            if live:
                from memhp.watch import live_view

                stop = asyncio.Event()
                view = asyncio.create_task(
                    live_view(
                        console,
                        fleet,
                        source.run(args.refresh),
                        refresh=args.refresh,
                        events=LIVE_EVENTS,
                        lead=progress.renderables,
                        stop=stop,
                    )
                )
                try:
                    result = await runner.play()
                    with contextlib.suppress(SourceError):
                        await source.poll()
                finally:
                    stop.set()
                    await view
            else:
                watcher = asyncio.create_task(source.watch_events())
                try:
                    result = await runner.play()
                    with contextlib.suppress(SourceError):
                        await source.poll()
                finally:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
                if not args.json:
                    console.print(fleet_view(fleet, console.width, events=LIVE_EVENTS))
    finally:
        await runner.stop()
    elapsed = time.monotonic() - started
    if timeline_path is not None:
        try:
            write_timeline_file(timeline, timeline_path)
        except (TimelineError, OSError) as err:
            sys.stderr.write(f"memhp demo: timeline: {err}\n")
            return EXIT_FAILED
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(summary_table(result, timeline))
        for line in summary_lines(result):
            console.print(line, soft_wrap=True)
        console.print(Text(f"{elapsed:.1f} s", style="dim"))
    return EXIT_OK if result["ok"] else EXIT_FAILED


def _positive(value: str) -> float:
    from memhp.watch import _positive as positive

    return positive(value)


def cmd_demo(args: argparse.Namespace) -> int:
    from memhp.cli import run_async

    plain_out = sys.stderr if args.json else sys.stdout
    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console = Console(file=sys.stdout, color_system=None, force_terminal=False)

    async def main() -> int:
        with sigterm_cancels_this_task():
            return await demo(args, console, plain_out)

    try:
        return run_async(main)
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.stderr.write("memhp demo: interrupted (every child process was stopped)\n")
        return EXIT_FAILED


def add_subparser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="play a story across real processes and watch it live (default: the demo)",
        description="Start a hypervisor and the scenario's guests as processes, play the "
        "scenario while showing the live view, and end with a summary. Exit 1 when a "
        "violation occurred that the scenario did not expect.",
    )
    p.add_argument(
        "scenario",
        nargs="?",
        metavar="SCENARIO",
        help=f"a scenario file (default {DEFAULT_SCENARIO}, of the source tree or the "
        "working directory)",
    )
    p.add_argument(
        "--mqtt",
        type=broker_url_arg,
        metavar="URL",
        help="also publish the events: the processes' --mqtt mqtt://HOST[:PORT]",
    )
    p.add_argument(
        "--no-live", action="store_true", help="plain progress lines instead of the live view"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the JSON result instead of the summary (progress goes to stderr)",
    )
    p.add_argument("--timeline", metavar="FILE", help="also plot memory over time (.svg, or .png)")
    p.add_argument("--log-dir", metavar="DIR", help="keep the processes' logs in DIR")
    p.add_argument(
        "--refresh",
        type=_positive,
        default=DEFAULT_REFRESH,
        metavar="SECONDS",
        help="seconds between two updates of the live view (default %(default)s)",
    )
    p.set_defaults(func=cmd_demo)
