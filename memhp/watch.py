"""``memhp watch`` and ``memhp map``: the live view of every VM, and one VM's map as a picture.

    memhp watch [--hypervisor ADDR | --mqtt URL] [--vm ID]... [--once] [--refresh S]
                [--events N] [--wait S]
    memhp map VM [--svg FILE] [--hypervisor ADDR] [--guest ADDR]

``watch`` draws one panel per VM (block map, sizes, transaction in flight, recent
events) and redraws it every ``--refresh`` seconds, from the hypervisor's Control
service and each guest's introspection (:mod:`memhp.view.grpc_source`) or from MQTT
(:mod:`memhp.view.mqtt_source`). ``--once`` prints a single frame without colour or
cursor movement and exits: what a script or a test reads. Over MQTT it first waits,
``--wait`` seconds at most, until every VM it knows of (``--vm``, or named by any
message) has its retained documents: the hypervisor's ``state``, and the guest's
memory map unless no guest is attached; then it prints the frame, and names what did
not come on stderr. ``map`` asks once and writes the VM's block map as SVG (or prints
its panel without ``--svg``).

Exit status: 0, 1 when the hypervisor, a VM or the broker cannot be reached (over MQTT:
a VM's documents did not all come in time), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live

from memhp.mqtt import BrokerUrl, broker_url_arg
from memhp.view.grpc_source import DEFAULT_REFRESH, GrpcSource, SourceError
from memhp.view.model import Fleet
from memhp.view.render import fleet_view, vm_panel
from memhp.view.svg import map_svg

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
DEFAULT_HYPERVISOR = "127.0.0.1:50051"
#: --once over MQTT: seconds to wait for every VM's retained documents (--wait).
MQTT_WAIT = 5.0
#: What publishes each document, for the message naming what did not come.
_PUBLISHERS = {"state": "memhp hypervisor", "guest": "its memhp guest"}


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def events_per_vm(vms: int, requested: int | None) -> int:
    """How many recent events each panel shows: all 12 for a few VMs, fewer for many."""
    if requested is not None:
        return requested
    return 12 if vms <= 2 else 6 if vms <= 4 else 3


def frame(fleet: Fleet, console: Console, events: int | None = None) -> RenderableType:
    return fleet_view(fleet, console.width, events=events_per_vm(len(fleet.vms), events))


async def live_view(
    console: Console,
    fleet: Fleet,
    feed: Awaitable[None],
    *,
    refresh: float,
    events: int | None = None,
    lead: Callable[[], Iterable[RenderableType]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Redraw ``fleet`` every ``refresh`` seconds while ``feed`` runs, until ``stop`` is
    set (a last frame is drawn then) or this is cancelled.

    Drawing happens on the event loop (no refresh thread), so the model is never read
    while a source changes it. ``lead`` gives renderables drawn above the panels.
    """
    task = asyncio.ensure_future(feed)
    stop = stop or asyncio.Event()

    def render() -> RenderableType:
        return fleet_view(
            fleet,
            console.width,
            events=events_per_vm(len(fleet.vms), events),
            lead=list(lead()) if lead is not None else [],
        )

    try:
        with Live(render(), console=console, auto_refresh=False, vertical_overflow="crop") as live:
            while not stop.is_set():
                if task.done():
                    task.result()  # a source that gave up: its exception
                    return
                live.update(render(), refresh=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), refresh)
            live.update(render(), refresh=True)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def watch(args: argparse.Namespace, console: Console) -> int:
    fleet = Fleet(args.vm or [])
    if args.mqtt is not None:
        return await _watch_mqtt(args, console, fleet, args.mqtt)
    async with GrpcSource(fleet, args.hypervisor) as source:
        if args.once:
            try:
                await source.poll()
            except SourceError as err:
                sys.stderr.write(f"memhp watch: {err}\n")
                return EXIT_FAILED
            console.print(frame(fleet, console, args.events))
            return EXIT_OK
        await live_view(
            console, fleet, source.run(args.refresh), refresh=args.refresh, events=args.events
        )
    return EXIT_OK


async def _watch_mqtt(
    args: argparse.Namespace, console: Console, fleet: Fleet, broker: BrokerUrl
) -> int:
    import aiomqtt

    from memhp.view.mqtt_source import MqttSource

    source = MqttSource(fleet, broker)
    if args.once:
        try:
            missing = await source.collect(timeout=args.wait)
        except aiomqtt.MqttError as err:
            sys.stderr.write(f"memhp watch: {broker}: {err}\n")
            return EXIT_FAILED
        console.print(frame(fleet, console, args.events))
        if missing:
            sys.stderr.write(f"memhp watch: {broker}: {missing_text(missing, args.wait)}\n")
            return EXIT_FAILED
        return EXIT_OK
    await live_view(console, fleet, source.run(), refresh=args.refresh, events=args.events)
    return EXIT_OK


def missing_text(missing: dict[str, tuple[str, ...]], waited: float) -> str:
    """``after 5 s, no state document of VM a, b (...); no guest document of VM c (...)``."""
    parts = []
    for doc in ("state", "guest"):
        vms = [vm_id for vm_id, docs in missing.items() if doc in docs]
        if vms:
            parts.append(
                f"no {doc} document of VM {', '.join(vms)} "
                f"(does {_PUBLISHERS[doc]} publish to this broker with --mqtt?)"
            )
    return f"after {waited:g} s, " + "; ".join(parts)


def _console(plain: bool) -> Console:
    if plain:
        # One frame for a file, a pipe or a test: no colour, no cursor movement.
        return Console(file=sys.stdout, color_system=None, force_terminal=False)
    return Console(file=sys.stdout)


def cmd_watch(args: argparse.Namespace) -> int:
    from memhp.cli import run_async

    console = _console(args.once)
    try:
        return run_async(lambda: watch(args, console))
    except KeyboardInterrupt:
        return EXIT_OK


async def map_vm(args: argparse.Namespace, console: Console) -> int:
    fleet = Fleet([args.vm])
    guests = {args.vm: args.guest} if args.guest else None
    async with GrpcSource(fleet, args.hypervisor, guests=guests) as source:
        try:
            await source.poll()
        except SourceError as err:
            sys.stderr.write(f"memhp map: {err}\n")
            return EXIT_FAILED
    view = fleet.vms.get(args.vm)
    if view is None:
        sys.stderr.write(f"memhp map: the hypervisor {args.hypervisor} has no VM {args.vm!r}\n")
        return EXIT_FAILED
    if args.svg is None:
        console.print(vm_panel(view, console.width, events=0))
        return EXIT_OK
    path = Path(args.svg)
    try:
        path.write_text(map_svg(view))
    except OSError as err:
        sys.stderr.write(f"memhp map: {path}: {err.strerror or err}\n")
        return EXIT_FAILED
    counts = ", ".join(f"{kind} {n}" for kind, n in view.cell_counts().items())
    origin = "guest" if view.map_source == "guest" else "host only"
    console.print(f"{path}: {view.vm_id}, {view.blocks} blocks ({counts}; from the {origin})")
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    from memhp.cli import run_async

    return run_async(lambda: map_vm(args, _console(True)))


def add_subparser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "watch",
        help="the live view of every VM (block maps, sizes, transactions, events)",
        description="Show every VM: a map of its memory blocks (offline, online, unbacked "
        "PageOffline pages, ballooned), the target, actual, committed and available sizes, "
        "the DM transaction in flight and the recent events, updated live.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--hypervisor",
        default=DEFAULT_HYPERVISOR,
        metavar="ADDR",
        help="the hypervisor's Control address (default %(default)s)",
    )
    source.add_argument(
        "--mqtt", type=broker_url_arg, metavar="URL", help="read MQTT instead: mqtt://HOST[:PORT]"
    )
    p.add_argument("--vm", action="append", metavar="ID", help="only this VM (repeatable)")
    p.add_argument("--once", action="store_true", help="print one plain frame and exit")
    p.add_argument(
        "--refresh",
        type=_positive,
        default=DEFAULT_REFRESH,
        metavar="SECONDS",
        help="seconds between two updates (default %(default)s)",
    )
    p.add_argument(
        "--events",
        type=int,
        metavar="N",
        help="recent events per VM (default: 12 for up to two VMs, fewer for more)",
    )
    p.add_argument(
        "--wait",
        type=_positive,
        default=MQTT_WAIT,
        metavar="SECONDS",
        help="with --mqtt --once: how long to wait for every VM's retained documents "
        "(default %(default)s)",
    )
    p.set_defaults(func=cmd_watch)

    m: argparse.ArgumentParser = subparsers.add_parser(
        "map",
        help="one VM's block map as an SVG picture",
        description="Ask the hypervisor and the VM's guest once and write the VM's memory "
        "block map as SVG (without --svg: print it).",
    )
    m.add_argument("vm", metavar="VM")
    m.add_argument("--svg", metavar="FILE", help="write the map to FILE as SVG")
    m.add_argument(
        "--hypervisor",
        default=DEFAULT_HYPERVISOR,
        metavar="ADDR",
        help="the hypervisor's Control address (default %(default)s)",
    )
    m.add_argument(
        "--guest",
        metavar="ADDR",
        help="the guest agent's introspection address (default: what the guest announced)",
    )
    m.set_defaults(func=cmd_map)
