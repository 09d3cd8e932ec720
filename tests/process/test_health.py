"""``memhp health`` against a real ``memhp hypervisor`` and a real ``memhp guest``.

Also what the guest reports: nothing serves before its first attach, "" follows the
DM stream (NOT_SERVING while the hypervisor is gone), the introspection services go
on serving. And a guest given no ``--vm-id`` takes it from ``$MEMHP_VM_ID`` or the
hostname.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from memhp.procs import Child, memhp_command, start_child
from memhp.v1 import control_pb2
from tests.process.conftest import HvProcess, StartHypervisor
from tests.process.conftest_guest import wait_until

INTROSPECTION = "memhp.v1.GuestIntrospection"
CONTROL = "memhp.v1.Control"


async def health(*args: str) -> tuple[int, str]:
    """``memhp health ARGS``: exit status and stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "memhp.cli",
        "health",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    assert not err, err.decode()
    return proc.returncode, out.decode().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest_asyncio.fixture
async def children() -> AsyncIterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            await child.stop()


async def start_guest(
    children: list[Child], tmp_path: Path, hypervisor: str, *args: str, env: dict[str, str]
) -> Child:
    argv = memhp_command("--log-level", "info", "guest", "--hypervisor", hypervisor, *args)
    child = await start_child(f"guest{len(children)}", argv, log_dir=tmp_path, env=env)
    children.append(child)
    return child


async def _attached_vm(hv: HvProcess, vm_id: str) -> control_pb2.Vm | None:
    reply = await hv.control.ListVms(control_pb2.ListVmsRequest())
    return next((vm for vm in reply.vms if vm.spec.vm_id == vm_id and vm.attached), None)


async def test_hypervisor_health(start_hypervisor: StartHypervisor) -> None:
    hv = await start_hypervisor()
    assert await health(hv.address) == (0, "SERVING")
    assert await health(hv.address, "--service", CONTROL) == (0, "SERVING")
    code, out = await health(hv.address, "--service", "nope.Nope")
    assert (code, out.split(":")[0]) == (1, "SERVICE_UNKNOWN")


async def test_nobody_listening_is_unreachable() -> None:
    code, out = await health(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert code == 1
    assert out.startswith("UNREACHABLE: UNAVAILABLE"), out


async def test_bad_arguments_exit_2() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "memhp.cli", "health", "127.0.0.1:1", "--wait", "soon",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"not a number of seconds" in err


async def test_guest_health_follows_its_link(
    start_hypervisor: StartHypervisor, children: list[Child], tmp_path: Path
) -> None:
    # Before the first attach nothing serves (the hypervisor is not there yet).
    hv_port = free_port()
    guest_port = free_port()
    argv = memhp_command(
        "guest",
        "--hypervisor",
        f"127.0.0.1:{hv_port}",
        "--vm-id",
        "h1",
        "--listen",
        f"127.0.0.1:{guest_port}",
    )
    guest = await start_child("guest", argv, ready=False, log_dir=tmp_path)
    children.append(guest)
    address = f"127.0.0.1:{guest_port}"

    async def answer_is(expected: str) -> bool:
        return (await health(address))[1] == expected

    await wait_until(lambda: answer_is("NOT_SERVING"), what="guest listening, not serving")
    assert await health(address, "--service", INTROSPECTION) == (1, "NOT_SERVING")

    # Attached: everything serves.
    hv = await start_hypervisor("--listen", f"127.0.0.1:{hv_port}")
    assert await health(address, "--wait", "15") == (0, "SERVING")
    assert await health(address, "--service", INTROSPECTION) == (0, "SERVING")

    # The hypervisor gone: the guest as a whole is not serving, its introspection is.
    await hv.stop()
    await wait_until(lambda: answer_is("NOT_SERVING"), what="link down")
    assert await health(address, "--service", INTROSPECTION) == (0, "SERVING")
    assert guest.process.returncode is None


async def test_vm_id_from_the_environment(
    start_hypervisor: StartHypervisor, children: list[Child], tmp_path: Path
) -> None:
    hv = await start_hypervisor()
    await start_guest(children, tmp_path, hv.address, env={"MEMHP_VM_ID": "from-env"})
    vm = await wait_until(lambda: _attached_vm(hv, "from-env"), what="from-env attached")
    assert vm.spec.vm_id == "from-env"


async def test_vm_id_from_the_hostname(
    start_hypervisor: StartHypervisor, children: list[Child], tmp_path: Path
) -> None:
    hv = await start_hypervisor()
    # An empty MEMHP_VM_ID is none (whatever this machine's environment says).
    guest = await start_guest(children, tmp_path, hv.address, env={"MEMHP_VM_ID": ""})
    hostname = socket.gethostname()
    vm = await wait_until(lambda: _attached_vm(hv, hostname), what=f"{hostname} attached")
    assert vm.guest_address == guest.address
