"""The ``memhp hypervisor`` process: a grpc.aio server around :class:`Hypervisor`.

Serves the DM channel, the virtio-mem channel, ``Control``, gRPC health (SERVING for ""
and each service) and reflection (so grpcurl works), ticks the host sessions, publishes
events and each VM's state to MQTT with ``--mqtt`` (:mod:`hypervisor.mqtt_events`), and
shuts down gracefully on SIGTERM or SIGINT: health goes NOT_SERVING, guest streams and
watchers end, the server stops with a grace period, the last states go to the broker, the
state file is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hypervisor.channel import DynamicMemoryServicer
from hypervisor.control import ControlServicer
from hypervisor.mqtt_events import HostMqtt
from hypervisor.runtime import Defaults, Hypervisor, ServiceError
from hypervisor.store import StateStore
from hypervisor.virtio_mem_channel import VirtioMemServicer
from hypervisor.vm import VmConfig
from memhp.logs import get_logger
from memhp.mqtt import DEFAULT_QUEUE, BrokerUrl, MqttPublisher
from memhp.procs import write_ready_file
from memhp.v1 import (
    control_pb2,
    control_pb2_grpc,
    dm_pb2,
    dm_pb2_grpc,
    virtio_mem_pb2,
    virtio_mem_pb2_grpc,
)

log = get_logger("hypervisor.server")

#: ``grpc_health.v1.health.aio`` (the installed stubs predate it).
_HEALTH_AIO: Any = health.aio  # type: ignore[attr-defined]

SERVICE_NAMES = (
    dm_pb2.DESCRIPTOR.services_by_name["DynamicMemory"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["Control"].full_name,
    virtio_mem_pb2.DESCRIPTOR.services_by_name["VirtioMem"].full_name,
)


@dataclass
class Options:
    listen: str = "127.0.0.1:50051"
    ready_file: Path | None = None
    state: Path | None = None
    vms: tuple[VmConfig, ...] = ()
    defaults: Defaults | None = None
    post_init_delay: float = 0.0
    tick: float = 0.1
    grace: float = 2.0
    #: Publish events and state here (None: no MQTT at all).
    mqtt: BrokerUrl | None = None
    mqtt_queue: int = DEFAULT_QUEUE


def _host_of(listen: str) -> str:
    host, _, _ = listen.rpartition(":")
    return host


async def _ticker(hv: Hypervisor, interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        delay = interval
        wakeup = hv.next_wakeup()
        if wakeup is not None:
            delay = min(delay, wakeup)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        try:
            hv.tick_all()
        except Exception:
            log.exception("tick_failed")


def _start_mqtt(hv: Hypervisor, opts: Options) -> HostMqtt | None:
    if opts.mqtt is None:
        return None
    publisher = MqttPublisher(
        opts.mqtt,
        source="host",
        client_id=f"memhp-hypervisor-{os.getpid()}",
        max_queue=opts.mqtt_queue,
    )
    bridge = HostMqtt(hv, publisher)
    bridge.start()
    publisher.start()
    log.info("mqtt_publishing", broker=str(opts.mqtt), max_queue=opts.mqtt_queue)
    return bridge


async def _stop(store: StateStore, bridge: HostMqtt | None) -> None:
    if bridge is not None:
        await bridge.aclose()
    store.close()


async def serve(opts: Options) -> int:
    structlog.contextvars.bind_contextvars(component="hypervisor")
    store = StateStore(opts.state)
    hv = Hypervisor(store, defaults=opts.defaults, post_init_delay=opts.post_init_delay)
    hv.load()
    # Before the VMs of --config are made: their vm_created events go out too.
    bridge = _start_mqtt(hv, opts)
    for config in opts.vms:
        existing = hv.vms.get(config.vm_id)
        if existing is None:
            try:
                hv.create_vm(config)
            except ServiceError as err:
                log.error("bad_vm_definition", vm=config.vm_id, error=str(err))
                await _stop(store, bridge)
                return 2
        elif existing.config != config:
            log.warning(
                "config_differs_from_state",
                vm=config.vm_id,
                state=str(existing.config),
                config=str(config),
                using="state",
            )
    server = grpc.aio.server()
    dm_pb2_grpc.add_DynamicMemoryServicer_to_server(DynamicMemoryServicer(hv), server)
    control_pb2_grpc.add_ControlServicer_to_server(ControlServicer(hv), server)
    virtio_mem_pb2_grpc.add_VirtioMemServicer_to_server(VirtioMemServicer(hv), server)
    health_servicer = _HEALTH_AIO.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(opts.listen)
    except RuntimeError as err:
        log.error("listen_failed", listen=opts.listen, error=str(err))
        await _stop(store, bridge)
        return 1
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{_host_of(opts.listen)}:{port}"
    if opts.ready_file is not None:
        write_ready_file(opts.ready_file, address)
    log.info("listening", address=address, vms=len(hv.vms), state=str(opts.state or ":memory:"))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(_ticker(hv, opts.tick, stop))
    try:
        await stop.wait()
    finally:
        log.info("shutting_down", grace=opts.grace)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await health_servicer.enter_graceful_shutdown()
        hv.shutdown()
        await server.stop(opts.grace)
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await _stop(store, bridge)
        log.info("stopped")
    return 0
