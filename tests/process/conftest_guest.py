"""Helpers for the ``memhp guest`` process tests: a tiny fake hypervisor and the guest child.

:class:`FakeHypervisor` is a ``DynamicMemory`` server on 127.0.0.1 in the test's own
event loop. Each ``Connect`` stream gets a fresh :class:`hypervisor.dm_host.DmHostSession`
(the real host state machine) for the VM's layout, so negotiation, hot-add with partial
backing and ballooning are answered correctly; the test drives the host through
:meth:`FakeHypervisor.command` and looks at what arrived. It can be stopped and
started again on the same port (a hypervisor restart).

:class:`GuestProcess` is a real ``python -m memhp.cli guest`` child: started with
``asyncio.create_subprocess_exec``, ready when its ``--ready-file`` appears, stopped
by its own PID only (SIGTERM, then SIGKILL) and always reaped.

Import from test files (``from tests.process.conftest_guest import ...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from hypervisor.dm_host import DmHostSession
from hypervisor.vm import VmConfig
from memhp import dm
from memhp.v1 import dm_pb2, dm_pb2_grpc, guest_pb2, guest_pb2_grpc
from memhp.wire import from_frame, to_frame

REPO = Path(__file__).resolve().parents[2]
BLOCK = 32_768  # 128 MiB in pages
#: 1 GiB of boot memory (blocks 0-7), room for 8 GiB.
LAYOUT = VmConfig("vm1", boot_pages=8 * BLOCK, max_pages=64 * BLOCK, block_pages=BLOCK)
READY_TIMEOUT = 20.0


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``predicate`` (plain or async) until it gives something truthy, at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class HostStream:
    """One ``Connect`` stream as the fake hypervisor sees it."""

    attach: dm_pb2.Attach
    host: DmHostSession
    #: What goes to the guest; None ends the stream.
    out: asyncio.Queue[dm_pb2.HostToGuest | None] = field(default_factory=asyncio.Queue)
    #: (loop time, message) of every DM message the guest sent on this stream.
    received: list[tuple[float, dm.DmMessage]] = field(default_factory=list)
    #: Every DM message the host sent on this stream.
    sent: list[dm.DmMessage] = field(default_factory=list)
    ended: bool = False

    def send(self, msgs: list[dm.DmMessage]) -> None:
        for m in msgs:
            self.sent.append(m)
            self.out.put_nowait(dm_pb2.HostToGuest(frame=to_frame(m)))

    def of(self, kind: type[dm.DmMessage]) -> list[tuple[float, Any]]:
        return [(t, m) for t, m in self.received if isinstance(m, kind)]


class FakeHypervisor(dm_pb2_grpc.DynamicMemoryServicer):
    """See the module doc."""

    def __init__(self, layout: VmConfig = LAYOUT) -> None:
        self.layout = layout
        self.streams: list[HostStream] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stream(self) -> HostStream:
        """The newest stream."""
        assert self.streams, "no guest attached yet"
        return self.streams[-1]

    async def start(self) -> str:
        server = grpc.aio.server()
        dm_pb2_grpc.add_DynamicMemoryServicer_to_server(self, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server
        return self.address

    async def stop(self) -> None:
        """Stop at once (a crashed hypervisor): open streams break with CANCELLED/UNAVAILABLE."""
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    async def Connect(
        self, request_iterator: AsyncIterator[dm_pb2.GuestToHost], context: Any
    ) -> AsyncIterator[dm_pb2.HostToGuest]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("msg") != "attach":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "attach must come first")
            return
        cfg = self.layout
        stream = HostStream(first.attach, DmHostSession(cfg))
        self.streams.append(stream)
        layout = dm_pb2.VmLayout(
            vm_id=cfg.vm_id,
            boot_pages=cfg.boot_pages,
            max_pages=cfg.max_pages,
            block_pages=cfg.block_pages,
        )
        yield dm_pb2.HostToGuest(attached=dm_pb2.Attached(layout=layout))
        reader = asyncio.create_task(self._reader(stream, requests))
        try:
            while (out := await stream.out.get()) is not None:
                yield out
        finally:
            stream.ended = True
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _reader(
        self, stream: HostStream, requests: AsyncIterator[dm_pb2.GuestToHost]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for req in requests:
                msg = from_frame(req.frame)
                now = loop.time()
                stream.received.append((now, msg))
                stream.send(stream.host.receive(msg, now))
        finally:
            stream.out.put_nowait(None)  # the guest ended the stream: end ours too

    def command(self, fn: Callable[[DmHostSession, float], list[dm.DmMessage]]) -> None:
        """Run an operator command on the newest stream's host session and send its output."""
        stream = self.stream
        stream.send(fn(stream.host, asyncio.get_running_loop().time()))

    def send_error(self, kind: str, action: str) -> None:
        notice = dm_pb2.ProtocolErrorNotice(kind=kind, message="test", action=action)
        self.stream.out.put_nowait(dm_pb2.HostToGuest(error=notice))

    async def negotiated(self, timeout: float = 10.0) -> HostStream:
        """Wait until the newest stream's host session is idle (negotiation done)."""
        await wait_until(
            lambda: self.streams and self.stream.host.state == "IDLE", timeout, "negotiation"
        )
        return self.stream


@dataclass
class GuestProcess:
    """A running ``memhp guest`` child and a GuestIntrospection stub to it."""

    process: asyncio.subprocess.Process
    log_path: Path
    address: str = ""
    channel: grpc.aio.Channel | None = None
    stub: Any = None

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    async def memory(self) -> guest_pb2.GuestMemory:
        reply: guest_pb2.GuestMemory = await self.stub.GetMemory(guest_pb2.GetMemoryRequest())
        return reply

    async def set_state(self, index: int, state: str) -> guest_pb2.MemoryBlock:
        req = guest_pb2.SetBlockStateRequest(index=index, state=state)
        reply: guest_pb2.MemoryBlock = await self.stub.SetBlockState(req, timeout=10)
        return reply

    async def signal_and_wait(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
            self.channel = None
        if self.process.returncode is None:
            try:
                await self.signal_and_wait(signal.SIGTERM, 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()


async def start_guest(
    tmp_path: Path, hypervisor: str, *args: str, vm_id: str = "vm1"
) -> GuestProcess:
    ready = tmp_path / f"{vm_id}.ready"
    log_path = tmp_path / f"{vm_id}.log"
    with open(log_path, "wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "memhp.cli",
            "--log-level",
            "debug",
            "--log-json",
            "guest",
            "--hypervisor",
            hypervisor,
            "--vm-id",
            vm_id,
            "--ready-file",
            str(ready),
            *args,
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    guest = GuestProcess(process, log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if process.returncode is not None:
                raise AssertionError(
                    f"memhp guest exited with {process.returncode}:\n{log_path.read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"memhp guest not ready:\n{log_path.read_text()}")
            await asyncio.sleep(0.02)
        guest.address = ready.read_text().strip()
        guest.channel = grpc.aio.insecure_channel(guest.address)
        guest.stub = guest_pb2_grpc.GuestIntrospectionStub(guest.channel)
    except BaseException:
        await guest.close()
        raise
    return guest


@contextlib.asynccontextmanager
async def running_hypervisor(layout: VmConfig = LAYOUT) -> AsyncIterator[FakeHypervisor]:
    """A started :class:`FakeHypervisor`, stopped at the end (wrap it in a fixture)."""
    hv = FakeHypervisor(layout)
    await hv.start()
    try:
        yield hv
    finally:
        await hv.stop()


@contextlib.asynccontextmanager
async def guest_children() -> AsyncIterator[list[GuestProcess]]:
    """Guest children a test starts (append them); all stopped and reaped at the end."""
    started: list[GuestProcess] = []
    try:
        yield started
    finally:
        for g in started:
            await g.close()
