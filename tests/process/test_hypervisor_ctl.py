"""``memhp ctl`` as a process against a real hypervisor (and a stand-in guest introspection)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest_asyncio

from memhp.procs import memhp_command
from memhp.v1 import guest_pb2, guest_pb2_grpc
from tests.process.conftest import GIB, MIB, FakeGuest, HvProcess


async def ctl(hv: HvProcess | str, *args: str) -> tuple[int, str, str]:
    address = hv if isinstance(hv, str) else hv.address
    proc = await asyncio.create_subprocess_exec(
        *memhp_command("ctl", "--hypervisor", address, *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_vms_show_and_commands(hv: HvProcess, guests: list[FakeGuest]) -> None:
    await hv.create_vm("c1", boot=2 * GIB, max_bytes=8 * GIB)
    rc, out, err = await ctl(hv, "vms")
    assert rc == 0, err
    header, row = out.splitlines()
    assert header.split() == [
        "VM",
        "ATTACHED",
        "STATE",
        "ACTUAL",
        "REQUESTED",
        "MAX",
        "REGIONS",
        "POLICY",
    ]
    assert row.split() == ["c1", "no", "VERSION", "2G", "-", "8G", "0", "manual"]

    rc, out, _ = await ctl(hv, "vms", "--json")
    (vm,) = json.loads(out)
    assert vm["spec"] == {
        "vm_id": "c1",
        "boot_bytes": 2 * GIB,
        "max_bytes": 8 * GIB,
        "block_size_bytes": 128 * MIB,
        "protocol": "hyperv-dm",
        "virtio_mem": None,
    }
    assert vm["in_flight"] is None and vm["policy"] == {"manual": {}}

    # Errors: status and message on stderr, exit 1.
    rc, out, err = await ctl(hv, "target", "nope", "4G")
    assert (rc, out) == (1, "")
    assert err == "memhp ctl: NOT_FOUND: vm_id: no VM 'nope'\n"
    rc, _, err = await ctl(hv, "hot-add", "c1", "1G", "--backed", "256M")
    assert rc == 1 and err.startswith("memhp ctl: FAILED_PRECONDITION: vm_id: ")
    rc, _, err = await ctl(hv, "balloon", "c1", "12Q")
    assert rc == 2 and "cannot parse size" in err

    # With a guest: hot-add with partial backing, then show the region.
    guest = FakeGuest(hv, "c1")
    guests.append(guest)
    await guest.attach()
    await guest.negotiate()
    rc, out, err = await ctl(hv, "hot-add", "c1", "1G", "--backed", "256M", "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["in_flight"]["kind"] == "hot_add"
    await guest.answer_hot_add()
    rc, out, _ = await ctl(hv, "show", "c1")
    assert "VM c1: attached, DM state IDLE, protocol 2.0" in out
    assert "[0x80000, 0xc0000) 1G: backed 256M [0x80000, 0x90000), added 256M" in out
    rc, out, err = await ctl(
        hv, "policy", "c1", "dynamic", "--buffer", "25", "--minimum", "2G", "--json"
    )
    assert rc == 0, err
    assert json.loads(out)["policy"]["dynamic"] == {
        "buffer_percent": 25,
        "minimum_bytes": 2 * GIB,
        "maximum_bytes": 8 * GIB,
    }
    rc, _, err = await ctl(hv, "back", "c1", "1M", "--start-page", "0x80000")
    assert rc == 1 and err.startswith("memhp ctl: FAILED_PRECONDITION: start_page: ")

    # A batch of two regions, then everything remaining: one command each.
    await ctl(hv, "policy", "c1", "manual")
    rc, out, err = await ctl(hv, "hot-add", "c1", "256M", "--backed", "128M", "--count", "2")
    assert rc == 0, err
    for _ in range(2):
        await guest.answer_hot_add()
    rc, out, err = await ctl(hv, "back", "c1", "--remaining", "--json")
    assert rc == 0, err
    backs = [await guest.answer_hot_add() for _ in range(3)]
    assert [(b.range.start_page, b.range.page_cnt) for b in backs] == [
        (0x90000, 0x30000),
        (0xC0000 + 0x8000, 0x8000),
        (0xD0000 + 0x8000, 0x8000),
    ]
    rc, _, err = await ctl(hv, "back", "c1")
    assert rc == 2 and "give SIZE or --remaining" in err
    rc, _, err = await ctl(hv, "hot-add", "c1", "128M", "--backed", "128M", "--count", "0")
    assert rc == 2 and "--count" in err


async def test_watch_prints_events(hv: HvProcess) -> None:
    proc = await asyncio.create_subprocess_exec(
        *memhp_command(
            "ctl", "--hypervisor", hv.address, "watch", "--kind", "vm_created", "--count", "1",
            "--json",
        ),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        communicate = asyncio.ensure_future(proc.communicate())
        n = 0
        # The watcher subscribes at some point after it starts: create VMs until it saw one.
        while not communicate.done() and n < 100:
            await hv.create_vm(f"w{n}")
            n += 1
            await asyncio.sleep(0.1)
        out, err = await asyncio.wait_for(communicate, 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    event = json.loads(out)
    assert event["kind"] == "vm_created" and event["source"] == "host"
    assert event["version"] == 1 and event["payload"]["max_pages"] == 16 * GIB // 4096


class FakeIntrospection(guest_pb2_grpc.GuestIntrospectionServicer):
    """Blocks 0-7 online (Normal, removable), 8-9 online Movable, 10-11 offline."""

    async def GetMemory(self, request: Any, context: Any) -> guest_pb2.GuestMemory:
        blocks = [
            guest_pb2.MemoryBlock(
                index=i, state="online", zone="Normal", valid_zones=["Normal"], removable=True
            )
            for i in range(8)
        ]
        blocks += [
            guest_pb2.MemoryBlock(
                index=i, state="online", zone="Movable", valid_zones=["Movable"], removable=True
            )
            for i in (8, 9)
        ]
        blocks += [
            guest_pb2.MemoryBlock(index=i, state="offline", valid_zones=["Normal", "Movable"])
            for i in (10, 11)
        ]
        return guest_pb2.GuestMemory(vm_id="lg", block_size_bytes=128 * MIB, blocks=blocks)

    async def SetBlockState(self, request: Any, context: Any) -> guest_pb2.MemoryBlock:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "read-only")
        raise AssertionError


@pytest_asyncio.fixture
async def introspection() -> AsyncIterator[str]:
    server = grpc.aio.server()
    guest_pb2_grpc.add_GuestIntrospectionServicer_to_server(FakeIntrospection(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_blocks_is_an_lsmem_table(introspection: str) -> None:
    rc, out, err = await ctl("127.0.0.1:1", "blocks", "lg", "--guest", introspection)
    assert rc == 0, err
    assert out == (
        "RANGE                                 SIZE   STATE REMOVABLE BLOCK          ZONES\n"
        "0x0000000000000000-0x000000003fffffff   1G  online       yes   0-7         Normal\n"
        "0x0000000040000000-0x000000004fffffff 256M  online       yes   8-9        Movable\n"
        "0x0000000050000000-0x000000005fffffff 256M offline           10-11 Normal/Movable\n"
        "\n"
        "Memory block size:       128M\n"
        "Total online memory:     1.3G\n"
        "Total offline memory:    256M\n"
    )
    rc, out, _ = await ctl("127.0.0.1:1", "blocks", "lg", "--guest", introspection, "--json")
    data = json.loads(out)
    assert data["memory"][0] == {
        "range": "0x0000000000000000-0x000000003fffffff",
        "size": GIB,
        "state": "online",
        "removable": True,
        "block": "0-7",
        "zones": "Normal",
    }
    assert data["summary"] == {"block_size": 128 * MIB, "online": 1280 * MIB, "offline": 256 * MIB}
    rc, _, err = await ctl("127.0.0.1:1", "blocks", "other", "--guest", introspection)
    assert rc == 1 and "is VM 'lg', not 'other'" in err
