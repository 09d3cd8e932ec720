"""The raw gRPC ceiling for bench_wire: an echo server and a ping-pong client.

    python bench/wire_echo.py --ready-file PATH
    python bench/wire_echo.py --client HOST:PORT --seconds S --out FILE.json

The server listens on 127.0.0.1 (port 0), writes HOST:PORT to the ready file, and
answers each GuestToHost frame with the same frame as HostToGuest, until SIGTERM.

The client opens one ``Connect`` stream, writes a 128 MiB ``HotAddRequest`` frame and
reads the echo, one at a time: ``--warmup`` round trips, then as many as fit in
``--seconds``. It writes the round trips per second and p50 / p99 to ``--out``.

Both run as processes of their own, started by bench_wire with the environment the
``memhp`` processes get (``GRPC_EXPERIMENTS``: see ``memhp/__init__.py``), so the
ceiling and the DM stream use the same gRPC transport.
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

from memhp.procs import write_ready_file
from memhp.v1 import dm_pb2, dm_pb2_grpc

PAGE = 4096
BLOCK = 128 << 20
#: Hard cap on the client's loop.
MAX_ROUND_TRIPS = 1_000_000


class Echo(dm_pb2_grpc.DynamicMemoryServicer):
    async def Connect(
        self,
        request_iterator: AsyncIterator[dm_pb2.GuestToHost],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[dm_pb2.HostToGuest]:
        async for item in request_iterator:
            yield dm_pb2.HostToGuest(frame=item.frame)


async def serve(servicer: dm_pb2_grpc.DynamicMemoryServicer, ready_file: str) -> int:
    """Serve ``servicer`` on 127.0.0.1 (port 0; the address goes to ``ready_file``) until
    SIGTERM or SIGINT (bench/dm_peers.py's host serves through this too)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = grpc.aio.server()
    dm_pb2_grpc.add_DynamicMemoryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_ready_file(ready_file, f"127.0.0.1:{port}")
    await stop.wait()
    await server.stop(grace=0.5)
    return 0


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def ping_pong(address: str, seconds: float, warmup: int) -> dict[str, Any]:
    region = dm_pb2.PageRange(start_page=1 << 20, page_cnt=BLOCK // PAGE)
    msg = dm_pb2.GuestToHost(
        frame=dm_pb2.DmFrame(
            trans_id=1, hot_add_request=dm_pb2.HotAddRequest(range=region, region=region)
        )
    )
    trips: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = dm_pb2_grpc.DynamicMemoryStub(channel).Connect(None)
        try:
            for _ in range(warmup):
                await call.write(msg)
                await call.read()
            start = time.perf_counter()
            end = start + seconds
            now = start
            while now < end and len(trips) < MAX_ROUND_TRIPS:
                await call.write(msg)
                reply = await call.read()
                if not isinstance(reply, dm_pb2.HostToGuest):
                    raise SystemExit("wire_echo: the echo server ended the stream")
                t = time.perf_counter()
                trips.append(t - now)
                now = t
            elapsed = now - start
        finally:
            call.cancel()
    ordered = sorted(trips)
    return {
        "round_trips": len(trips),
        "seconds": round(elapsed, 3),
        "round_trips_per_s": round(len(trips) / elapsed, 1),
        "p50_ms": round(percentile(ordered, 50) * 1000, 3),
        "p99_ms": round(percentile(ordered, 99) * 1000, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ready-file", help="serve; write HOST:PORT here once listening")
    parser.add_argument("--client", metavar="HOST:PORT", help="ping-pong against this server")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--out", help="the client's figures as JSON (default: stdout)")
    args = parser.parse_args()
    if args.client:
        result = asyncio.run(ping_pong(args.client, args.seconds, args.warmup))
        text = json.dumps(result)
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            print(text)
        return 0
    if not args.ready_file:
        parser.error("give --ready-file (serve) or --client HOST:PORT")
    return asyncio.run(serve(Echo(), args.ready_file))


if __name__ == "__main__":
    raise SystemExit(main())
