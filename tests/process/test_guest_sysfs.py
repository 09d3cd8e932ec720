"""A real ``memhp guest``: SetBlockState with sysfs semantics, and ``--sysfs-dir`` read by lsmem.

Blocks the hypervisor hot-adds stay offline (no auto-online, no udev) until the test
writes their state with SetBlockState; every error comes back with the status and
errno name the kernel's ``state`` write would give. The real
util-linux ``lsmem --sysroot DIR`` reads the live tree and must agree with GetMemory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from memhp import dm
from memhp.units import format_size
from memhp.v1 import guest_pb2
from tests.process.conftest_guest import (
    BLOCK,
    FakeHypervisor,
    GuestProcess,
    running_hypervisor,
    start_guest,
    wait_until,
)

LSMEM = shutil.which("lsmem") or "/usr/bin/lsmem"
COLUMNS = "RANGE,SIZE,STATE,REMOVABLE,BLOCK,ZONES"


@pytest_asyncio.fixture
async def hv() -> AsyncIterator[FakeHypervisor]:
    async with running_hypervisor() as h:
        yield h


def lsmem_rows(root: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [LSMEM, "--sysroot", str(root), "-J", "-o", COLUMNS],
        capture_output=True,
        text=True,
        env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)["memory"]
    return rows


def expected_rows(mem: guest_pb2.GuestMemory) -> list[dict[str, Any]]:
    """What lsmem prints for GetMemory's blocks (rows split by state, removable, zones)."""
    rows: list[dict[str, Any]] = []
    last = -2
    for b in sorted(mem.blocks, key=lambda b: b.index):
        state = {"going-offline": "on->off"}.get(b.state, b.state)
        zones = [b.zone] if b.state == "online" else list(b.valid_zones)
        key = (state, b.state == "online", "/".join(zones))
        if rows and rows[-1]["key"] == key and last + 1 == b.index:
            rows[-1]["last"] = b.index
        else:
            rows.append({"key": key, "first": b.index, "last": b.index})
        last = b.index
    out = []
    bs = mem.block_size_bytes
    for r in rows:
        start, end = r["first"] * bs, (r["last"] + 1) * bs
        state, removable, zones = r["key"]
        block = str(r["first"]) if r["first"] == r["last"] else f"{r['first']}-{r['last']}"
        out.append(
            {
                "range": f"0x{start:016x}-0x{end - 1:016x}",
                "size": format_size(end - start),
                "state": state,
                "removable": removable,
                "block": block,
                "zones": zones,
            }
        )
    return out


async def lsmem_matches(guest: GuestProcess, root: Path) -> guest_pb2.GuestMemory:
    """Wait until lsmem (the tree is rewritten at most every 100 ms) shows GetMemory."""
    mem = await guest.memory()

    def same() -> bool:
        return (root / "sys/devices/system/memory").is_dir() and lsmem_rows(root) == expected_rows(
            mem
        )

    await wait_until(same, timeout=5.0, what="lsmem to match GetMemory")
    return mem


async def expect_error(
    guest: GuestProcess, index: int, state: str, code: grpc.StatusCode, errno: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await guest.set_state(index, state)
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    assert f"-{errno}" in details and f"memory{index}" in details, details


@pytest.mark.skipif(not os.access(LSMEM, os.X_OK), reason="util-linux lsmem is not installed")
async def test_set_block_state_and_lsmem(
    hv: FakeHypervisor, guest_processes: list[GuestProcess], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    guest = await start_guest(tmp_path, hv.address, "--sysfs-dir", str(root))
    guest_processes.append(guest)
    await hv.negotiated()
    await lsmem_matches(guest, root)

    # Fully backed 256 MiB: the driver adds memory8 and waits for someone to online it.
    hv.command(lambda h, now: h.hot_add(2 * BLOCK, 2 * BLOCK, now))

    async def has_block(index: int) -> bool:
        return any(b.index == index for b in (await guest.memory()).blocks)

    await wait_until(lambda: has_block(8), what="memory8")
    mem = await lsmem_matches(guest, root)
    block8 = next(b for b in mem.blocks if b.index == 8)
    assert (block8.state, block8.zone) == ("offline", "")
    assert list(block8.valid_zones) == ["Normal", "Movable"]

    reply = await guest.set_state(8, "online_movable")
    assert (reply.index, reply.state, reply.zone) == (8, "online", "Movable")
    # The hot-add goes on with memory9; "online" picks the default zone (kernel: Normal).
    await wait_until(lambda: has_block(9), what="memory9")
    reply = await guest.set_state(9, "online")
    assert (reply.state, reply.zone) == ("online", "Normal")
    stream = hv.stream
    await wait_until(lambda: stream.of(dm.HotAddResponse), what="hot-add response")
    assert stream.of(dm.HotAddResponse)[0][1].page_count == 2 * BLOCK
    await lsmem_matches(guest, root)

    # The kernel's errors, as gRPC statuses with the errno name.
    await expect_error(guest, 8, "online", grpc.StatusCode.INVALID_ARGUMENT, "EINVAL")
    await expect_error(guest, 8, "sideways", grpc.StatusCode.INVALID_ARGUMENT, "EINVAL")
    await expect_error(guest, 99, "offline", grpc.StatusCode.NOT_FOUND, "ENOENT")
    # memory0 holds memblock-reserved pages: unmovable.
    await expect_error(guest, 0, "offline", grpc.StatusCode.FAILED_PRECONDITION, "EBUSY")

    reply = await guest.set_state(9, "offline")
    assert (reply.state, reply.zone) == ("offline", "")
    await expect_error(guest, 9, "offline", grpc.StatusCode.INVALID_ARGUMENT, "EINVAL")
    mem = await lsmem_matches(guest, root)
    assert [b.state for b in mem.blocks if b.index >= 8] == ["online", "offline"]
    assert list(mem.violations) == []
