"""Fixtures for the process tests: a real ``memhp hypervisor`` child and a fake DM guest.

``start_hypervisor`` (a fixture returning a starter) launches ``python -m memhp.cli
hypervisor --listen 127.0.0.1:0 --ready-file ...`` through :mod:`memhp.procs`, reads
the real port back and gives a :class:`HvProcess` with Control, health and DM stubs.
Every child started in a test is stopped by its own PID (SIGTERM, then SIGKILL) and
reaped at the end. :class:`FakeGuest` speaks the DM protocol over a real ``Connect``
stream, message by message, so a test decides exactly what the guest says.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio

from memhp import dm
from memhp.procs import Child, memhp_command, start_child
from memhp.v1 import control_pb2, control_pb2_grpc, dm_pb2, dm_pb2_grpc
from memhp.wire import from_frame, to_frame
from tests.process.conftest_guest import GuestProcess, guest_children

GIB = 1 << 30
MIB = 1 << 20
PAGE = 4096
BLOCK_PAGES = 32_768  # 128 MiB
RECV_TIMEOUT = 5.0


@dataclass
class HvProcess:
    """A running hypervisor child and stubs to it."""

    child: Child
    channel: grpc.aio.Channel
    state: Path | None

    @property
    def address(self) -> str:
        return self.child.address

    @property
    def control(self) -> Any:
        return control_pb2_grpc.ControlStub(self.channel)

    @property
    def dm(self) -> Any:
        return dm_pb2_grpc.DynamicMemoryStub(self.channel)

    async def create_vm(
        self, vm_id: str, boot: int = 4 * GIB, max_bytes: int = 16 * GIB, block: int = 128 * MIB
    ) -> control_pb2.Vm:
        spec = control_pb2.VmSpec(
            vm_id=vm_id, boot_bytes=boot, max_bytes=max_bytes, block_size_bytes=block
        )
        vm: control_pb2.Vm = await self.control.CreateVm(control_pb2.CreateVmRequest(spec=spec))
        return vm

    async def get_vm(self, vm_id: str) -> control_pb2.Vm:
        vm: control_pb2.Vm = await self.control.GetVm(control_pb2.GetVmRequest(vm_id=vm_id))
        return vm

    async def stop(self) -> int:
        await self.channel.close(None)
        return await self.child.stop()

    def log(self) -> str:
        return self.child.log_tail(200)


_trans_ids = itertools.count(1)


class FakeGuest:
    """A DM guest written by hand: every message it sends is the test's choice."""

    def __init__(self, hv: HvProcess, vm_id: str) -> None:
        self.hv = hv
        self.vm_id = vm_id
        self.call: Any = None
        self.layout: dm_pb2.VmLayout | None = None

    async def connect(self, state: dm_pb2.GuestMemoryState | None = None) -> Any:
        """Open the stream and send ``attach``; the answer is left for :meth:`recv`."""
        self.call = self.hv.dm.Connect()
        attach = dm_pb2.Attach(vm_id=self.vm_id)
        if state is not None:
            attach.state.CopyFrom(state)
        await self.call.write(dm_pb2.GuestToHost(attach=attach))
        return self.call

    async def attach(self, state: dm_pb2.GuestMemoryState | None = None) -> dm_pb2.VmLayout:
        await self.connect(state)
        msg = await self.recv()
        assert msg.WhichOneof("msg") == "attached", msg
        self.layout = msg.attached.layout
        return msg.attached.layout

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dm_pb2.HostToGuest:
        msg = await asyncio.wait_for(self.call.read(), timeout)
        # grpc.aio.EOF when the hypervisor ended the stream.
        assert isinstance(msg, dm_pb2.HostToGuest), f"stream ended: {msg!r}"
        return msg

    async def recv_frame(self, timeout: float = RECV_TIMEOUT) -> dm.DmMessage:
        msg = await self.recv(timeout)
        assert msg.WhichOneof("msg") == "frame", msg
        return from_frame(msg.frame)

    async def recv_notice(self, timeout: float = RECV_TIMEOUT) -> dm_pb2.ProtocolErrorNotice:
        msg = await self.recv(timeout)
        assert msg.WhichOneof("msg") == "error", msg
        return msg.error

    async def send(self, msg: dm.DmMessage) -> None:
        await self.call.write(dm_pb2.GuestToHost(frame=to_frame(msg)))

    async def send_raw(self, msg: dm_pb2.GuestToHost) -> None:
        await self.call.write(msg)

    async def negotiate(self, *, alignment: int = 7) -> None:
        """Linux's opening: version 2.0 (accepted), then the capabilities report."""
        await self.send(dm.VersionRequest(next(_trans_ids), dm.DYNMEM_PROTOCOL_VERSION_3))
        reply = await self.recv_frame()
        assert isinstance(reply, dm.VersionResponse) and reply.is_accepted
        await self.send(
            dm.CapabilitiesReport(
                next(_trans_ids), balloon=True, hot_add=True, hot_add_alignment=alignment
            )
        )
        reply = await self.recv_frame()
        assert isinstance(reply, dm.CapabilitiesResponse) and reply.is_accepted

    async def answer_hot_add(self, page_count: int | None = None) -> dm.HotAddRequest:
        """Read a hot-add request and answer it (all pages unless told otherwise)."""
        req = await self.recv_frame()
        assert isinstance(req, dm.HotAddRequest), req
        count = req.range.page_cnt if page_count is None else page_count
        await self.send(dm.HotAddResponse(next(_trans_ids), page_count=count, result=1))
        return req

    async def status(self, committed_pages: int, available_pages: int = 0) -> None:
        await self.send(
            dm.StatusReport(
                next(_trans_ids), num_avail=available_pages, num_committed=committed_pages
            )
        )

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None


def tid() -> int:
    return next(_trans_ids)


@dataclass
class Watcher:
    """A WatchEvents stream collected in the background."""

    call: Any
    events: list[control_pb2.Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _collect(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for event in self.call:
                self.events.append(event)

    async def wait_for(
        self, predicate: Callable[[control_pb2.Event], bool], timeout: float = RECV_TIMEOUT
    ) -> control_pb2.Event:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for e in self.events:
                if predicate(e):
                    return e
            if asyncio.get_running_loop().time() > deadline:
                kinds = [(e.vm_id, e.kind) for e in self.events]
                raise AssertionError(f"no matching event in {timeout} s; got {kinds}")
            await asyncio.sleep(0.02)

    def kinds(self, vm_id: str | None = None) -> list[str]:
        return [e.kind for e in self.events if vm_id is None or e.vm_id == vm_id]


@contextlib.asynccontextmanager
async def watching(
    hv: HvProcess, vm_ids: tuple[str, ...] = (), kinds: tuple[str, ...] = ()
) -> AsyncIterator[Watcher]:
    """Subscribe to events; returns once the hypervisor has the subscription."""
    call = hv.control.WatchEvents(
        control_pb2.WatchEventsRequest(vm_ids=list(vm_ids), kinds=list(kinds))
    )
    await asyncio.wait_for(call.initial_metadata(), RECV_TIMEOUT)
    watcher = Watcher(call)
    watcher.task = asyncio.create_task(watcher._collect())
    try:
        yield watcher
    finally:
        call.cancel()
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher.task


async def wait_vm(
    hv: HvProcess, vm_id: str, predicate: Callable[[control_pb2.Vm], Any], timeout: float = 5.0
) -> control_pb2.Vm:
    """``GetVm`` every 20 ms until ``predicate`` holds (AssertionError after ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        vm = await hv.get_vm(vm_id)
        if predicate(vm):
            return vm
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"VM {vm_id} never matched: {vm}")
        await asyncio.sleep(0.02)


StartHypervisor = Callable[..., Awaitable[HvProcess]]


@pytest_asyncio.fixture
async def start_hypervisor(tmp_path: Path) -> AsyncIterator[StartHypervisor]:
    """A starter: ``await start_hypervisor(*args, state=None)``; all stopped at teardown."""
    started: list[HvProcess] = []

    async def start(*args: str, state: Path | None = None) -> HvProcess:
        argv = memhp_command(
            "--log-level", "info", "--log-json", "hypervisor", "--listen", "127.0.0.1:0", *args
        )
        if state is not None:
            argv += ["--state", str(state)]
        child = await start_child(f"hypervisor{len(started)}", argv, log_dir=tmp_path)
        hv = HvProcess(child, grpc.aio.insecure_channel(child.address), state)
        started.append(hv)
        return hv

    try:
        yield start
    finally:
        for hv in started:
            with contextlib.suppress(Exception):
                await hv.channel.close(None)
            await hv.child.stop()


@pytest_asyncio.fixture
async def guest_processes() -> AsyncIterator[list[GuestProcess]]:
    """Real ``memhp guest`` children a test starts (append them); all stopped at the end."""
    async with guest_children() as started:
        yield started


@pytest_asyncio.fixture
async def hv(start_hypervisor: StartHypervisor) -> HvProcess:
    """A hypervisor with the default VM defaults (4G boot, 16G max, 128M blocks)."""
    return await start_hypervisor()


@pytest_asyncio.fixture
async def guests() -> AsyncIterator[list[FakeGuest]]:
    """Fake guests a test opens (append them); their streams are cancelled at the end."""
    opened: list[FakeGuest] = []
    try:
        yield opened
    finally:
        for g in opened:
            await g.close()
