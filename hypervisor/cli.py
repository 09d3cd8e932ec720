"""``memhp hypervisor``: the command line of the hypervisor process.

    memhp hypervisor [--listen HOST:PORT] [--ready-file PATH] [--state FILE]
                     [--config FILE] [--default-boot-memory 4G]
                     [--default-max-memory 16G] [--default-block-size 128M]
                     [--no-default-vm] [--profile default|qemu] [--tick 0.1]
                     [--grace 2] [--mqtt mqtt://HOST[:PORT] [--mqtt-queue 10000]]

Exit status 0 after a graceful shutdown (SIGTERM, SIGINT), 1 when the address cannot
be bound, 2 for bad arguments, a bad VM file or a state file this version cannot use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hypervisor.config import ConfigError, load_vms
from hypervisor.dm_host import QEMU_POST_INIT_DELAY
from hypervisor.runtime import Defaults
from hypervisor.store import StateFileError
from hypervisor.vm import VmConfig
from memhp.mqtt import DEFAULT_QUEUE, broker_url_arg, queue_size_arg
from memhp.units import SizeError, parse_pages

EXIT_BAD_INPUT = 2

#: Post-init wait per profile: QEMU waits 50 s before its first DM request.
PROFILES = {"default": 0.0, "qemu": QEMU_POST_INIT_DELAY}


def add_subparser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "hypervisor",
        help="run the hypervisor (DM channel, Control, health, reflection)",
        description="Run the hypervisor: the DM channel for guest agents, Control for "
        "operators, gRPC health and reflection. Exit 0 on SIGTERM/SIGINT.",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="address to serve on; port 0 picks one (default %(default)s)",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help='after binding, write "HOST:PORT" here (atomically)',
    )
    p.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="SQLite state file (VMs, policies, backing); in memory when absent",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML list of VM definitions (vm_id, boot_memory, max_memory, block_size)",
    )
    p.add_argument(
        "--default-boot-memory",
        default="4G",
        metavar="SIZE",
        help="boot memory of a VM made on first attach (default %(default)s)",
    )
    p.add_argument(
        "--default-max-memory",
        default="16G",
        metavar="SIZE",
        help="max memory of a VM made on first attach (default %(default)s)",
    )
    p.add_argument(
        "--default-block-size",
        default="128M",
        metavar="SIZE",
        help="memory block size of such a VM and of --config entries "
        "without one (default %(default)s)",
    )
    p.add_argument(
        "--no-default-vm",
        action="store_true",
        help="refuse guests of undefined VMs instead of making them from the defaults",
    )
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="default",
        help="host behaviour: qemu waits 50 s after negotiation (default %(default)s)",
    )
    p.add_argument(
        "--tick",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="session timer interval (default %(default)s)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="shutdown grace period for open streams (default %(default)s)",
    )
    p.add_argument(
        "--mqtt",
        type=broker_url_arg,
        metavar="URL",
        help="publish every event and each VM's retained state to this broker "
        "(mqtt://HOST[:PORT], port 1883 by default); the protocol never waits on it",
    )
    p.add_argument(
        "--mqtt-queue",
        type=queue_size_arg,
        default=DEFAULT_QUEUE,
        metavar="N",
        help="events held while the broker is slow or away; more are dropped and "
        "counted (default %(default)s)",
    )
    p.set_defaults(func=main)


def _fail(message: str) -> int:
    sys.stderr.write(f"memhp hypervisor: {message}\n")
    return EXIT_BAD_INPUT


def main(args: argparse.Namespace) -> int:
    from hypervisor.server import Options, serve
    from memhp.cli import run_async

    if not args.tick > 0:
        return _fail(f"--tick must be > 0, got {args.tick}")
    if ":" not in args.listen:
        return _fail(f"--listen must be HOST:PORT, got {args.listen!r}")
    try:
        block = parse_pages(args.default_block_size, what="--default-block-size")
        boot = parse_pages(args.default_boot_memory, what="--default-boot-memory")
        max_pages = parse_pages(args.default_max_memory, what="--default-max-memory")
        VmConfig("default", boot, max_pages, block)
    except (SizeError, ValueError) as err:
        return _fail(f"bad default VM: {err}")
    vms: list[VmConfig] = []
    if args.config is not None:
        try:
            vms = load_vms(args.config, default_block_pages=block)
        except ConfigError as err:
            return _fail(str(err))
    opts = Options(
        listen=args.listen,
        ready_file=args.ready_file,
        state=args.state,
        vms=tuple(vms),
        defaults=None if args.no_default_vm else Defaults(boot, max_pages, block),
        post_init_delay=PROFILES[args.profile],
        tick=args.tick,
        grace=args.grace,
        mqtt=args.mqtt,
        mqtt_queue=args.mqtt_queue,
    )
    try:
        return run_async(lambda: serve(opts))
    except StateFileError as err:
        return _fail(str(err))
    except ValueError as err:  # a state file whose contents do not fit
        return _fail(f"state file {args.state}: {err}")
