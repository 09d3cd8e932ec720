"""Minimal DM peers for bench_wire's split: where a transaction's time goes.

    python bench/dm_peers.py guest --hypervisor ADDR --vm-id ID --ready-file PATH
    python bench/dm_peers.py host --count N --out FILE.json --ready-file PATH

``guest``: attaches to a real ``memhp hypervisor``, negotiates (version 2.0, hot-add
capability) and answers every hot-add request at once, as a success for every page
asked, with no memory model behind it. Ready once negotiated; runs until SIGTERM.

``host``: serves ``DynamicMemory.Connect`` to one real ``memhp guest``: the VM's layout
(4 GiB boot, 1 TiB max, 128 MiB blocks), the version and capabilities answers, then
``--count`` hot-adds of a fully backed 128 MiB region, each sent when the last one's
response arrives, with no session, ground truth or state file behind it. Writes the
rate to ``--out`` when done; runs until SIGTERM.

Against the bare ping-pong of ``wire_echo.py``, the first shows what the hypervisor adds
to a transaction and the second what the guest adds. Both use the same gRPC transport
as the ``memhp`` processes (the environment bench_wire starts them with).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from wire_echo import serve

from memhp import dm
from memhp.procs import write_ready_file
from memhp.v1 import dm_pb2, dm_pb2_grpc

PAGE = 4096
BLOCK_PAGES = (128 << 20) // PAGE
BOOT_PAGES = (4 << 30) // PAGE
MAX_PAGES = (1 << 40) // PAGE


def frame(trans_id: int, **body: Any) -> dm_pb2.DmFrame:
    return dm_pb2.DmFrame(trans_id=trans_id, **body)


# -- a guest with no model -------------------------------------------------------------


async def run_guest(hypervisor: str, vm_id: str, ready_file: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with grpc.aio.insecure_channel(hypervisor) as channel:
        call = dm_pb2_grpc.DynamicMemoryStub(channel).Connect(None)
        await call.write(dm_pb2.GuestToHost(attach=dm_pb2.Attach(vm_id=vm_id)))
        await call.read()  # attached
        version = dm_pb2.VersionRequest(version=dm.DYNMEM_PROTOCOL_VERSION_3)
        await call.write(dm_pb2.GuestToHost(frame=frame(1, version_request=version)))
        await call.read()
        caps = dm_pb2.CapabilitiesReport(
            balloon=True, hot_add=True, hot_add_alignment=7, max_page_number=(1 << 64) - 1
        )
        await call.write(dm_pb2.GuestToHost(frame=frame(2, capabilities_report=caps)))
        await call.read()
        write_ready_file(ready_file, vm_id)
        trans_id = 2

        async def answer() -> None:
            nonlocal trans_id
            while True:
                msg = await call.read()
                if not isinstance(msg, dm_pb2.HostToGuest):
                    return
                if msg.frame.WhichOneof("body") != "hot_add_request":
                    continue
                trans_id += 1
                pages = msg.frame.hot_add_request.range.page_cnt
                resp = dm_pb2.HotAddResponse(page_count=pages, result=1)
                await call.write(dm_pb2.GuestToHost(frame=frame(trans_id, hot_add_response=resp)))

        reader = asyncio.create_task(answer())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
        reader.cancel()
        stopping.cancel()
        call.cancel()
    return 0


# -- a host with no session ------------------------------------------------------------


class Host(dm_pb2_grpc.DynamicMemoryServicer):
    def __init__(self, count: int, out: Path) -> None:
        self.count = count
        self.out = out

    def request(self, i: int) -> dm_pb2.HostToGuest:
        start = BOOT_PAGES + i * BLOCK_PAGES
        span = dm_pb2.PageRange(start_page=start, page_cnt=BLOCK_PAGES)
        req = dm_pb2.HotAddRequest(range=span, region=span)
        return dm_pb2.HostToGuest(frame=frame(100 + i, hot_add_request=req))

    async def Connect(
        self,
        request_iterator: AsyncIterator[dm_pb2.GuestToHost],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[dm_pb2.HostToGuest]:
        # The hypervisor's shape (hypervisor/channel.py): a reader task answers each
        # guest message into an outbox, this generator writes the outbox to the stream,
        # so the next read is posted while a write is still on its way.
        stream = aiter(request_iterator)
        first = await anext(stream)
        layout = dm_pb2.VmLayout(
            vm_id=first.attach.vm_id,
            boot_pages=BOOT_PAGES,
            max_pages=MAX_PAGES,
            block_pages=BLOCK_PAGES,
        )
        outbox: asyncio.Queue[dm_pb2.HostToGuest] = asyncio.Queue()
        outbox.put_nowait(dm_pb2.HostToGuest(attached=dm_pb2.Attached(layout=layout)))
        reader = asyncio.create_task(self._read(stream, outbox))
        try:
            while True:
                yield await outbox.get()
        finally:
            reader.cancel()

    async def _read(
        self, stream: AsyncIterator[dm_pb2.GuestToHost], outbox: asyncio.Queue[dm_pb2.HostToGuest]
    ) -> None:
        sent = 0
        failed = 0
        started = 0.0
        async for msg in stream:
            f = msg.frame
            body = f.WhichOneof("body")
            if body == "version_request":
                accepted = dm_pb2.VersionResponse(is_accepted=True)
                outbox.put_nowait(
                    dm_pb2.HostToGuest(frame=frame(f.trans_id, version_response=accepted))
                )
            elif body == "capabilities_report":
                caps = dm_pb2.CapabilitiesResponse(is_accepted=True)
                outbox.put_nowait(
                    dm_pb2.HostToGuest(frame=frame(f.trans_id, capabilities_response=caps))
                )
                await asyncio.sleep(1.0)  # the guest's first status report and settling
                started = time.perf_counter()
                outbox.put_nowait(self.request(sent))
                sent += 1
            elif body == "hot_add_response" and sent:
                resp = f.hot_add_response
                if resp.result != 1 or resp.page_count != BLOCK_PAGES:
                    failed += 1
                if sent < self.count:
                    outbox.put_nowait(self.request(sent))
                    sent += 1
                    continue
                seconds = time.perf_counter() - started
                result = {
                    "transactions": sent,
                    "failed": failed,
                    "seconds": round(seconds, 4),
                    "transactions_per_s": round(sent / seconds, 1),
                }
                write_ready_file(self.out, json.dumps(result))  # whole, or not there
                sent = 0  # done: later responses are ignored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    g = sub.add_parser("guest")
    g.add_argument("--hypervisor", required=True)
    g.add_argument("--vm-id", required=True)
    g.add_argument("--ready-file", required=True)
    h = sub.add_parser("host")
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    if args.role == "guest":
        return asyncio.run(run_guest(args.hypervisor, args.vm_id, args.ready_file))
    return asyncio.run(serve(Host(args.count, args.out), args.ready_file))


if __name__ == "__main__":
    raise SystemExit(main())
