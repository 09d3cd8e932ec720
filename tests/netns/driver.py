"""The runner host of the netns topology test: an operator on the test network.

Run inside its own namespace (``ip netns exec NS python -m tests.netns.driver ...``),
it reaches every service by name, as a container of the compose project would:

1. subscribes to every topic on the broker (raw MQTT 3.1.1 over a socket: no client
   library needed), so that what the services publish meanwhile is seen;
2. waits for gRPC health (``memhp.health``) of the hypervisor and of each guest;
3. lists the VMs over ``hypervisor:50051`` until every guest is attached and idle;
4. hot-adds a 1 GiB region with 300 MiB backed to the first guest, waits until the
   hypervisor has added it and the guest's udev onlined the new blocks, then backs
   100 MiB more and waits again;
5. reads both guests' introspection at the addresses they announced (their
   hostnames), and the first guest's blocks through ``memhp ctl blocks`` (lsmem);
6. publishes a probe and reads until it comes back;

then prints one JSON object on stdout (progress goes to stderr) and exits 0; any
failure exits 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from memhp.ctl import blocks_report, to_json
from memhp.health import CHANNEL_OPTIONS, wait_serving
from memhp.v1 import control_pb2, control_pb2_grpc, guest_pb2, guest_pb2_grpc

MIB = 1 << 20
PAGE = 4096
RPC_TIMEOUT = 10.0
PROBE_TOPIC = "memhp/netns-test/probe"

T = TypeVar("T")


def log(message: str) -> None:
    sys.stderr.write(f"driver: {message}\n")
    sys.stderr.flush()


def wait_for(what: str, fn: Callable[[], T | None], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# -- MQTT 3.1.1, just enough to subscribe, publish and read back -----------------------


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, body: bytes) -> bytes:
    length = bytearray()
    n = len(body)
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([kind]) + bytes(length) + body


class MqttProbe:
    """One MQTT connection subscribed to ``#`` (QoS 0, clean session, no keep-alive)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.address = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        connect = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0)
        self.sock.sendall(_packet(0x10, connect + _string("memhp-netns-driver")))
        kind, body = self._read()
        if kind != 0x20 or body[1] != 0:
            raise RuntimeError(f"CONNACK expected, got {kind:#x} {body!r}")
        self.sock.sendall(_packet(0x82, struct.pack("!H", 1) + _string("#") + b"\x00"))
        kind, body = self._read()
        if kind != 0x90 or body[2] != 0:
            raise RuntimeError(f"SUBACK for QoS 0 expected, got {kind:#x} {body!r}")

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("the broker closed the connection")
            data += chunk
        return data

    def _read(self) -> tuple[int, bytes]:
        kind = self._exactly(1)[0]
        length = shift = 0
        while True:
            byte = self._exactly(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return kind & 0xF0, self._exactly(length)

    def finish(self) -> dict[str, Any]:
        """Publish the probe, read until it returns; the topics others published to."""
        payload = f"probe {time.time()}".encode()
        self.sock.sendall(_packet(0x30, _string(PROBE_TOPIC) + payload))
        topics: dict[str, int] = {}
        while True:
            kind, body = self._read()
            if kind != 0x30:
                continue
            (size,) = struct.unpack("!H", body[:2])
            topic = body[2 : 2 + size].decode()
            if topic == PROBE_TOPIC and body[2 + size :] == payload:
                break
            topics[topic] = topics.get(topic, 0) + 1
        self.sock.sendall(_packet(0xE0, b""))
        self.sock.close()
        return {"broker": self.address, "probe_returned": True, "topics": topics}


# -- the hypervisor and the guests ------------------------------------------------------


def _vms(control: Any) -> dict[str, control_pb2.Vm]:
    reply = control.ListVms(control_pb2.ListVmsRequest(), timeout=RPC_TIMEOUT)
    return {vm.spec.vm_id: vm for vm in reply.vms}


def _memory(address: str) -> guest_pb2.GuestMemory:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = guest_pb2_grpc.GuestIntrospectionStub(channel)
        reply: guest_pb2.GuestMemory = stub.GetMemory(
            guest_pb2.GetMemoryRequest(), timeout=RPC_TIMEOUT
        )
        return reply


def _settled(control: Any, vm_id: str, added_bytes: int) -> guest_pb2.GuestMemory | None:
    """The guest's memory once the host added ``added_bytes`` and every block is online."""
    vm = control.GetVm(control_pb2.GetVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)
    added = sum(r.added_pages for r in vm.regions) * PAGE
    if added != added_bytes or vm.HasField("in_flight") or vm.dm_state != "IDLE":
        return None
    memory = _memory(vm.guest_address)
    if memory.busy or memory.counters.num_pages_added * PAGE != added_bytes:
        return None
    if any(b.state != "online" for b in memory.blocks):
        return None
    return memory


def guest_report(control: Any, vm_id: str) -> dict[str, Any]:
    vm = control.GetVm(control_pb2.GetVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)
    memory = _memory(vm.guest_address)
    rows, summary = blocks_report(memory)
    return {
        "vm_id": memory.vm_id,
        "guest_address": vm.guest_address,
        "host_actual_bytes": vm.actual_bytes,
        "host_added_pages": sum(r.added_pages for r in vm.regions),
        "counters": to_json(memory.counters),
        "pages": to_json(memory.pages),
        "blocks": len(memory.blocks),
        "online_blocks": sum(1 for b in memory.blocks if b.state == "online"),
        "movable_blocks": sorted(b.index for b in memory.blocks if b.zone == "Movable"),
        "lsmem": rows,
        "lsmem_summary": summary,
        "violations": [to_json(v) for v in memory.violations],
    }


def ctl_blocks(hypervisor: str, vm_id: str, guest: str) -> dict[str, Any]:
    """``memhp ctl blocks VM --guest ADDR --json``, the real command line, on this host."""
    argv = [sys.executable, "-m", "memhp.cli", "ctl", "--hypervisor", hypervisor]
    argv += ["blocks", vm_id, "--guest", guest, "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr}")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def run(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.mqtt.rpartition(":")
    mqtt = MqttProbe(host, int(port), args.timeout)
    log(f"subscribed to # at {args.mqtt}")

    health = {}
    for address in (args.hypervisor, *(f"{g}:{args.guest_port}" for g in args.guest)):
        answer = wait_serving(address, timeout=3.0, wait=args.timeout)
        health[address] = str(answer)
        if not answer.serving:
            raise RuntimeError(f"{address}: {answer}")
    log(f"healthy: {health}")

    with grpc.insecure_channel(args.hypervisor, options=CHANNEL_OPTIONS) as channel:
        control = control_pb2_grpc.ControlStub(channel)

        def all_attached() -> dict[str, control_pb2.Vm] | None:
            vms = _vms(control)
            ready = all(
                g in vms and vms[g].attached and vms[g].dm_state == "IDLE" for g in args.guest
            )
            return vms if ready else None

        vms = wait_for("every guest attached", all_attached, args.timeout)
        log(f"attached: {sorted(vms)}")
        first, *others = args.guest

        control.HotAdd(
            control_pb2.HotAddCommand(vm_id=first, region_bytes=1024 * MIB, backed_bytes=300 * MIB),
            timeout=RPC_TIMEOUT,
        )
        wait_for("hot-add settled", lambda: _settled(control, first, 300 * MIB), args.timeout)
        after_hot_add = guest_report(control, first)
        log("hot-add settled")

        control.Back(control_pb2.BackCommand(vm_id=first, size_bytes=100 * MIB), timeout=10)
        wait_for("back settled", lambda: _settled(control, first, 400 * MIB), args.timeout)
        after_back = guest_report(control, first)
        log("back settled")

        others_report = {g: guest_report(control, g) for g in others}
        lsmem = ctl_blocks(args.hypervisor, first, vms[first].guest_address)
        vm_list = [
            {
                "vm_id": vm.spec.vm_id,
                "attached": vm.attached,
                "dm_state": vm.dm_state,
                "guest_address": vm.guest_address,
                "boot_bytes": vm.spec.boot_bytes,
                "block_size_bytes": vm.spec.block_size_bytes,
            }
            for vm in _vms(control).values()
        ]
    return {
        "health": health,
        "vms": sorted(vm_list, key=lambda v: str(v["vm_id"])),
        "after_hot_add": after_hot_add,
        "after_back": after_back,
        "others": others_report,
        "ctl_blocks": lsmem,
        "mqtt": mqtt.finish(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns.driver")
    parser.add_argument("--hypervisor", required=True, metavar="HOST:PORT")
    parser.add_argument("--guest", action="append", required=True, metavar="HOSTNAME")
    parser.add_argument("--guest-port", type=int, default=50061)
    parser.add_argument("--mqtt", required=True, metavar="HOST:PORT")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except Exception as err:
        log(f"FAILED: {type(err).__name__}: {err}")
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
