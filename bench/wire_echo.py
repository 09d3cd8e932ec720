"""A DynamicMemory server that echoes every frame: the raw gRPC ceiling for bench_wire.

    python bench/wire_echo.py --ready-file PATH

Listens on 127.0.0.1 (port 0), writes HOST:PORT to the ready file, and answers each
GuestToHost frame with the same frame as HostToGuest, until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from memhp.v1 import dm_pb2, dm_pb2_grpc


class Echo(dm_pb2_grpc.DynamicMemoryServicer):
    async def Connect(
        self,
        request_iterator: AsyncIterator[dm_pb2.GuestToHost],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[dm_pb2.HostToGuest]:
        async for item in request_iterator:
            yield dm_pb2.HostToGuest(frame=item.frame)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = grpc.aio.server()
    dm_pb2_grpc.add_DynamicMemoryServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = Path(args.ready_file + ".tmp")
    tmp.write_text(f"127.0.0.1:{port}\n")
    tmp.replace(args.ready_file)
    await stop.wait()
    await server.stop(grace=0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
