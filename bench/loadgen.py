"""Many DM guests in one process, for bench_wire's fleet figure: real Connect streams.

    python bench/loadgen.py --hypervisor HOST:PORT --first 0 --count 50 \\
        --summary FILE --ready-file PATH [--vm-prefix fleet-] [--interval 1]

Each guest is what the hypervisor sees of a Linux ``hv_balloon`` driver on its own
channel (a fresh gRPC channel per guest, as ``memhp guest`` dials): ``attach``, version
2.0 and a capabilities report (balloon, hot-add, 128 MiB alignment), then one
``StatusReport`` every ``--interval`` seconds, the guests spread evenly over the
interval. ``num_committed`` is ``COMMITTED_BASE + n`` for the guest's n-th report, so
the hypervisor's ``committed_bytes`` says how many of its reports arrived (the stream is
ordered and reliable). Host requests should not come; they are answered the way a
guest at its limits answers (hot-add: all pages added; balloon: nothing to give;
unballoon: done) and counted. A protocol error notice stops that guest's reports.

The ready file (``HOST:PORT`` of the hypervisor, written atomically) appears once every
guest negotiated. On SIGTERM, SIGINT or after ``--max-seconds`` the streams are closed
and ``--summary`` gets a JSON object: guests, negotiated, reports sent, the host
messages seen by kind, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from memhp import dm
from memhp.procs import write_ready_file
from memhp.v1 import dm_pb2, dm_pb2_grpc
from memhp.wire import from_frame, to_frame

#: Pages added to every report's sequence number in ``num_committed`` (1 GiB).
COMMITTED_BASE = 262_144
#: Seconds a guest has to attach and negotiate.
NEGOTIATE_TIMEOUT = 30.0
#: Guests connecting at the same time.
CONNECT_CONCURRENCY = 16
#: hot_add_alignment 7: 2^7 MiB = 128 MiB (Linux: log2 of the memory block size in MiB).
ALIGNMENT = 7


class GuestFailed(Exception):
    pass


class LoadGuest:
    """One guest's stream: attach, negotiate, status reports, answers to host requests."""

    def __init__(self, target: str, vm_id: str, phase: float, interval: float) -> None:
        self.target = target
        self.vm_id = vm_id
        self.phase = phase
        self.interval = interval
        self.channel: grpc.aio.Channel | None = None
        self.call: Any = None
        self.trans_ids = itertools.count(1)
        self.write_lock = asyncio.Lock()
        self.negotiated = False
        self.reports_sent = 0
        self.stopped_reporting = False
        self.host_messages: Counter[str] = Counter()
        self.errors: list[str] = []

    async def write(self, msg: dm.DmMessage) -> None:
        async with self.write_lock:
            await self.call.write(dm_pb2.GuestToHost(frame=to_frame(msg)))

    async def read(self) -> dm_pb2.HostToGuest:
        msg = await self.call.read()
        if not isinstance(msg, dm_pb2.HostToGuest):
            raise GuestFailed(f"{self.vm_id}: the hypervisor ended the stream")
        return msg

    async def read_frame(self) -> dm.DmMessage:
        msg = await self.read()
        if msg.WhichOneof("msg") != "frame":
            raise GuestFailed(f"{self.vm_id}: expected a DM frame, got {msg}")
        return from_frame(msg.frame)

    async def connect(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.target)
        self.call = dm_pb2_grpc.DynamicMemoryStub(self.channel).Connect(None)
        await self.call.write(dm_pb2.GuestToHost(attach=dm_pb2.Attach(vm_id=self.vm_id)))
        first = await self.read()
        if first.WhichOneof("msg") != "attached":
            raise GuestFailed(f"{self.vm_id}: expected attached, got {first}")
        await self.write(
            dm.VersionRequest(next(self.trans_ids), dm.DYNMEM_PROTOCOL_VERSION_3, False)
        )
        reply = await self.read_frame()
        if not (isinstance(reply, dm.VersionResponse) and reply.is_accepted):
            raise GuestFailed(f"{self.vm_id}: version 2.0 not accepted: {reply}")
        await self.write(
            dm.CapabilitiesReport(
                next(self.trans_ids), balloon=True, hot_add=True, hot_add_alignment=ALIGNMENT
            )
        )
        reply = await self.read_frame()
        if not (isinstance(reply, dm.CapabilitiesResponse) and reply.is_accepted):
            raise GuestFailed(f"{self.vm_id}: capabilities not accepted: {reply}")
        self.negotiated = True

    async def answer(self) -> None:
        """Read host messages until the stream ends; answer the requests that should not come."""
        while True:
            msg = await self.call.read()
            if not isinstance(msg, dm_pb2.HostToGuest):
                return
            which = msg.WhichOneof("msg")
            if which == "error":
                self.host_messages["error"] += 1
                self.errors.append(f"protocol error notice: {msg.error.kind}: {msg.error.message}")
                self.stopped_reporting = True
                continue
            if which != "frame":
                self.host_messages[str(which)] += 1
                continue
            req = from_frame(msg.frame)
            self.host_messages[type(req).__name__] += 1
            if isinstance(req, dm.HotAddRequest):
                await self.write(dm.HotAddResponse(next(self.trans_ids), req.range.page_cnt, 1))
            elif isinstance(req, dm.BalloonRequest):
                await self.write(dm.BalloonResponse(next(self.trans_ids), False, ()))
            elif isinstance(req, dm.UnballoonRequest) and not req.more_pages:
                await self.write(dm.UnballoonResponse(next(self.trans_ids)))

    async def report(self, start: float) -> None:
        """A status report every interval, at this guest's phase of the interval."""
        n = 0
        loop = asyncio.get_running_loop()
        while not self.stopped_reporting:
            due = start + self.phase + n * self.interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            n += 1
            await self.write(
                dm.StatusReport(
                    next(self.trans_ids), num_avail=COMMITTED_BASE, num_committed=COMMITTED_BASE + n
                )
            )
            self.reports_sent = n

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close(None)


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    guests = [
        LoadGuest(
            args.hypervisor,
            f"{args.vm_prefix}{args.first + i}",
            args.interval * i / args.count,
            args.interval,
        )
        for i in range(args.count)
    ]
    tasks: list[asyncio.Task[None]] = []
    code = 0
    failure = ""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(g: LoadGuest) -> None:
        async with gate:
            await g.connect()

    try:
        async with asyncio.timeout(NEGOTIATE_TIMEOUT):
            await asyncio.gather(*(connect(g) for g in guests))
        start = loop.time()
        for g in guests:
            tasks.append(asyncio.create_task(g.answer()))
            tasks.append(asyncio.create_task(g.report(start)))
        if args.ready_file is not None:
            write_ready_file(args.ready_file, args.hypervisor)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.max_seconds)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                code = 1
                failure = repr(t.exception())
    except (GuestFailed, grpc.aio.AioRpcError, TimeoutError) as err:
        code = 1
        failure = f"{type(err).__name__}: {err}"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(g.close() for g in guests), return_exceptions=True)
    seen: Counter[str] = Counter()
    for g in guests:
        seen.update(g.host_messages)
    summary = {
        "guests": len(guests),
        "negotiated": sum(g.negotiated for g in guests),
        "reports_sent": sum(g.reports_sent for g in guests),
        "host_messages": dict(seen),
        "errors": [e for g in guests for e in g.errors][:20] + ([failure] if failure else []),
        "cpu_s": round(time.process_time(), 3),
    }
    args.summary.write_text(json.dumps(summary) + "\n")
    if failure:
        sys.stderr.write(f"loadgen: {failure}\n")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hypervisor", required=True, metavar="HOST:PORT")
    parser.add_argument("--first", type=int, default=0, help="number of the first guest")
    parser.add_argument("--count", type=int, required=True, help="guests in this process")
    parser.add_argument("--vm-prefix", default="fleet-")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reports")
    parser.add_argument("--summary", type=Path, required=True, help="JSON summary at exit")
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="exit after this long")
    args = parser.parse_args()
    if args.count < 1 or not args.interval > 0 or not args.max_seconds > 0:
        parser.error("--count must be >= 1, --interval and --max-seconds > 0")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
