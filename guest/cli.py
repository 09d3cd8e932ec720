"""``memhp guest``: the guest-agent process.

Dials the hypervisor's DM channel as one VM (``--protocol virtio-mem``: its virtio-mem
device's channel), runs the emulated guest (memory model, the ``hv_balloon`` or
``virtio_mem`` driver, udev, an optional workload) in real time, and serves its
``GuestIntrospection``, ``GuestControl`` and gRPC health on ``--listen``. The VM id is
``--vm-id``, else ``$MEMHP_VM_ID``, else the hostname (a container replica names its
VM after itself). Health: "" is SERVING while the DM stream is attached, the two
services once the first attach built the guest. ``--ready-file`` gets
``HOST:PORT`` of that server (atomically) once it listens and the first attach
succeeded. SIGTERM or SIGINT closes the stream and the server and exits 0; 1 is a
fatal error (the hypervisor refused the VM for good, or changed its layout), 2 bad
input. ``--protocol hyperv-dm+virtio-mem`` exits 1 at once with the probe failure Linux
gives (one ``online_page_callback`` system-wide). With ``--mqtt URL`` every guest event
and the retained memory map go to an MQTT broker (:mod:`guest.mqtt_events`); the guest
never waits on it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from guest.agent import AgentOptions, GrpcTransport, GuestAgent
from guest.drivers.hv_balloon import MODES, STRATEGIES
from guest.drivers.virtio_mem import VirtioMemProbeError
from guest.introspection import GuestControl, GuestIntrospection
from guest.mm.memory import MMOP_OFFLINE, ONLINE_TYPES
from guest.mqtt_events import GuestMqtt
from guest.vm import HYPERV_DM, PROTOCOLS, VIRTIO_MEM, GuestConfig, GuestVm
from guest.workload import WorkloadError, WorkloadSpec
from memhp.events import TopicError, check_vm_level
from memhp.logs import get_logger
from memhp.mqtt import DEFAULT_QUEUE, MqttPublisher, broker_url_arg, queue_size_arg
from memhp.procs import write_ready_file
from memhp.v1 import guest_pb2, guest_pb2_grpc
from memhp.virtio_mem import VirtioMemConfig

log = get_logger("guest.cli")

#: The environment variable ``--vm-id`` falls back to (then the hostname).
VM_ID_ENV = "MEMHP_VM_ID"

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_BAD_INPUT = 2
#: Seconds in-flight introspection calls get when the agent stops.
SERVER_GRACE = 0.5
#: Seconds between looks at the DM link for the health status of "".
HEALTH_POLL = 0.2
#: ``grpc_health.v1.health.aio`` (the installed stubs predate it).
_HEALTH_AIO: Any = health.aio  # type: ignore[attr-defined]
#: The services whose health the agent reports (besides "", the agent as a whole).
SERVICE_NAMES = (
    guest_pb2.DESCRIPTOR.services_by_name["GuestIntrospection"].full_name,
    guest_pb2.DESCRIPTOR.services_by_name["GuestControl"].full_name,
)


def _number(minimum: float, *, strict: bool, unit: str = "seconds") -> Any:
    """An argparse type: a finite number above (``strict``) or at least ``minimum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
        if not ok:
            rule = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be a finite number {rule} {minimum}: {text}")
        return value

    return parse


def _workload(text: str) -> WorkloadSpec:
    try:
        return WorkloadSpec.parse(text)
    except WorkloadError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_subparser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "guest",
        help="run a guest agent attached to a hypervisor",
        description="Run one VM's guest agent: dial the hypervisor's DM channel, run the "
        "emulated guest in real time and serve its introspection on --listen. Exit 0 on "
        "SIGTERM/SIGINT, 1 on a fatal error, 2 on bad input.",
    )
    p.add_argument("--hypervisor", required=True, metavar="ADDR", help="HOST:PORT of the DM server")
    p.add_argument(
        "--vm-id",
        metavar="ID",
        help=f"the VM this guest is (default: ${VM_ID_ENV}, else this host's name, so a "
        "container's hostname names its VM); the hypervisor checks it: 1-64 letters, "
        "digits, '.', '_' or '-', starting with a letter or digit",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="introspection server address (port 0: any free port; default %(default)s)",
    )
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the introspection address announced to the hypervisor (default: the --listen "
        "address with the bound port; the hostname when it listens on 0.0.0.0)",
    )
    p.add_argument("--ready-file", type=Path, metavar="PATH", help="write HOST:PORT here when up")
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=HYPERV_DM,
        help="the guest's memory device: hyperv-dm (the DM channel, default), virtio-mem "
        "(the VirtioMem channel of one device; the VM must be a virtio-mem VM), or both, "
        "which fails as in Linux (exit 1)",
    )
    for name, default, what in (
        ("force-bbm", False, "use Big Block Mode even where Sub Block Mode fits"),
        ("unplug-online", True, "unplug online memory (fake-offlining it first)"),
        ("bbm-safe-unplug", True, "in Big Block Mode, offline only blocks it can unplug"),
    ):
        p.add_argument(
            f"--{name}",
            action=argparse.BooleanOptionalAction,
            default=default,
            help=f"virtio_mem module parameter: {what} (default %(default)s)",
        )
    p.add_argument("--strategy", choices=STRATEGIES, default="callback")
    p.add_argument("--driver-mode", choices=MODES, default="upstream")
    p.add_argument(
        "--auto-online",
        choices=ONLINE_TYPES,
        default=MMOP_OFFLINE,
        help="auto_online_blocks (the kernel onlines new blocks itself; default %(default)s)",
    )
    p.add_argument(
        "--udev-online",
        choices=ONLINE_TYPES[1:],
        metavar="TYPE",
        help="a udev rule onlines every new block with TYPE (online, online_kernel, "
        "online_movable) after --onlining-delay",
    )
    p.add_argument(
        "--onlining-delay",
        type=_number(0, strict=False),
        default=0.0,
        metavar="S",
        help="seconds the --udev-online rule waits before onlining (default %(default)s)",
    )
    p.add_argument(
        "--status-interval",
        type=_number(0, strict=True),
        default=1.0,
        metavar="S",
        help="seconds between status reports (default %(default)s)",
    )
    p.add_argument(
        "--pressure-report-delay",
        type=_number(0, strict=False),
        default=45.0,
        metavar="S",
        help="seconds before the first status report (hv_balloon module parameter; "
        "default %(default)s)",
    )
    p.add_argument(
        "--access-batch-ms",
        type=_number(0, strict=False, unit="milliseconds"),
        default=50.0,
        metavar="MS",
        help="coalesce page-access reports for this long (default %(default)s)",
    )
    p.add_argument(
        "--sysfs-dir",
        type=Path,
        metavar="DIR",
        help="keep DIR/sys/devices/system/memory current (for lsmem --sysroot DIR)",
    )
    p.add_argument(
        "--workload",
        type=_workload,
        metavar="SPEC",
        help="steady:SIZE or ramp:FROM:TO:SECONDS (movable allocations, e.g. ramp:0:1G:30)",
    )
    p.add_argument(
        "--mqtt",
        type=broker_url_arg,
        metavar="URL",
        help="publish every guest event and the retained memory map to this broker "
        "(mqtt://HOST[:PORT], port 1883 by default); the guest never waits on it",
    )
    p.add_argument(
        "--mqtt-queue",
        type=queue_size_arg,
        default=DEFAULT_QUEUE,
        metavar="N",
        help="events held while the broker is slow or away; more are dropped and "
        "counted (default %(default)s)",
    )
    p.set_defaults(func=_run)


def resolve_vm_id(flag: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The VM id: ``--vm-id``, else ``$MEMHP_VM_ID`` (when not empty), else the hostname.

    A container started by ``docker compose up --scale guest=N`` is told nothing but
    its hostname, which is what makes each replica a VM of its own. An empty id is
    refused here; its form is the hypervisor's to check at attach, as for ``--vm-id``
    (an INVALID_ARGUMENT there is fatal: the agent exits 1).
    """
    if flag is not None:
        if not flag.strip():
            raise ValueError("--vm-id is empty")
        return flag
    env = os.environ if environ is None else environ
    value = env.get(VM_ID_ENV, "").strip()
    if value:
        return value
    hostname = socket.gethostname()
    if not hostname:
        raise ValueError(f"no --vm-id, no ${VM_ID_ENV} and no hostname to take the VM id from")
    return hostname


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    return AgentOptions(
        vm_id=args.vm_id,
        strategy=args.strategy,
        driver_mode=args.driver_mode,
        auto_online=args.auto_online,
        udev_online=args.udev_online,
        onlining_delay=args.onlining_delay,
        status_interval=args.status_interval,
        pressure_report_delay=args.pressure_report_delay,
        access_batch=args.access_batch_ms / 1000.0,
        sysfs_dir=args.sysfs_dir,
        workload=args.workload,
        protocol=args.protocol,
        virtio_mem_force_bbm=args.force_bbm,
        virtio_mem_unplug_online=args.unplug_online,
        virtio_mem_bbm_safe_unplug=args.bbm_safe_unplug,
    )


def probe_failure(protocol: str) -> str | None:
    """Why a guest with these devices cannot start (None: it can).

    hv_balloon and virtio_mem cannot both install the one ``online_page_callback``: the
    guest is booted with both drivers (a nominal device; the failure does not depend on
    it) and the probe's error is the answer, word for word.
    """
    if HYPERV_DM not in protocol.split("+") or VIRTIO_MEM not in protocol.split("+"):
        return None
    vm = GuestVm(GuestConfig("probe", 32_768, protocol=protocol))
    vm.attach_virtio_mem(VirtioMemConfig(2 << 20, 0, 1 << 32, 1 << 30, 0, 0, 0))
    try:
        vm.start()
    except VirtioMemProbeError as err:
        return str(err)
    return None


def advertised_address(host: str, port: int) -> str:
    """The address others reach a server on: a wildcard host becomes this host's name."""
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def _run(args: argparse.Namespace) -> int:
    from memhp.cli import run_async

    try:
        args.vm_id = resolve_vm_id(args.vm_id)
    except ValueError as err:
        sys.stderr.write(f"memhp guest: {err}\n")
        return EXIT_BAD_INPUT
    failure = probe_failure(args.protocol)
    if failure is not None:
        sys.stderr.write(f"memhp guest: --protocol {args.protocol}: {failure}\n")
        log.error("probe_failed", protocol=args.protocol, reason=failure)
        return EXIT_FATAL
    if args.mqtt is not None:
        try:
            check_vm_level(args.vm_id)
        except TopicError as err:
            sys.stderr.write(f"memhp guest: --vm-id with --mqtt: {err}\n")
            return EXIT_BAD_INPUT
    return run_async(lambda: serve(args))


def _mqtt_sink(args: argparse.Namespace, get_vm: Callable[[], GuestVm | None]) -> GuestMqtt | None:
    if args.mqtt is None:
        return None
    publisher = MqttPublisher(
        args.mqtt,
        source="guest",
        client_id=f"memhp-guest-{args.vm_id}-{os.getpid()}",
        max_queue=args.mqtt_queue,
    )
    sink = GuestMqtt(args.vm_id, publisher, get_vm)
    publisher.start()
    log.info("mqtt_publishing", broker=str(args.mqtt), max_queue=args.mqtt_queue)
    return sink


async def serve(args: argparse.Namespace) -> int:
    """The process: introspection server, agent, signals, ready file."""
    structlog.contextvars.bind_contextvars(vm=args.vm_id, component="guest")
    options = options_from_args(args)
    sink = _mqtt_sink(args, lambda: agent.vm)
    agent = GuestAgent(options, GrpcTransport(args.hypervisor, args.protocol), event_sink=sink)
    server = grpc.aio.server()
    guest_pb2_grpc.add_GuestIntrospectionServicer_to_server(
        GuestIntrospection(
            lambda: agent.vm, trace=lambda: tuple(agent.events), on_change=agent.state_changed
        ),
        server,
    )
    guest_pb2_grpc.add_GuestControlServicer_to_server(
        GuestControl(lambda: agent.vm, on_change=agent.state_changed), server
    )
    health_servicer = _HEALTH_AIO.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Nothing serves until the first attach built the guest (the servicer says SERVING
    # for "" by default).
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        port = server.add_insecure_port(args.listen)
    except RuntimeError as err:
        log.error("listen_failed", listen=args.listen, error=str(err))
        if sink is not None:
            await sink.aclose()
        return EXIT_BAD_INPUT
    host = args.listen.rpartition(":")[0] or "127.0.0.1"
    address = f"{host}:{port}"
    options.introspection_address = args.advertise or advertised_address(host, port)
    await server.start()
    log.info("introspection_listening", address=address, hypervisor=args.hypervisor)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    agent_task = asyncio.create_task(agent.run(), name="agent")
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    ready_task = asyncio.create_task(_ready_when_attached(agent, args.ready_file, address))
    health_task = asyncio.create_task(_report_health(agent, health_servicer), name="health")
    code = EXIT_OK
    try:
        done, _ = await asyncio.wait({agent_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if agent_task in done:
            code = agent_task.result()
        else:
            log.info("stopping", reason="signal")
    finally:
        tasks = (agent_task, stop_task, ready_task, health_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(SERVER_GRACE)
        if sink is not None:
            await sink.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped", exit_code=code)
    return code


async def _report_health(agent: GuestAgent, servicer: Any) -> None:
    """gRPC health of the agent.

    The introspection services serve once the first attach built the guest (before
    that they have nothing to answer with) and go on serving through reconnects; ""
    (the agent as a whole, what a container health check asks) serves while the DM
    stream is attached. The agent has no hook for its link going up and down, so this
    polls it.
    """
    await agent.attached.wait()
    for name in SERVICE_NAMES:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    serving: bool | None = None
    while True:
        if agent.connected != serving:
            serving = agent.connected
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else (health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            await servicer.set("", status)
        await asyncio.sleep(HEALTH_POLL)


async def _ready_when_attached(agent: GuestAgent, path: Path | None, address: str) -> None:
    await agent.attached.wait()
    if path is not None:
        write_ready_file(path, address)
        log.info("ready", address=address, ready_file=str(path))
