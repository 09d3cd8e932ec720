"""``memhp trace``: record DM sessions as typed JSON lines or as raw DM frames.

``memhp trace record --listen ADDR --upstream HYPERVISOR --out FILE [--format jsonl|raw]``
is a transparent proxy for the DynamicMemory service: guests dial it instead of the
hypervisor, it forwards every message both ways unchanged and writes each DM frame
as it passes. ``memhp trace show FILE`` prints a raw trace as JSON lines.

JSON lines: one object per frame, ``{"time", "vm", "direction", "trans_id", "type",
"fields"}`` (``direction`` is ``guest_to_host`` or ``host_to_guest``, ``type`` the DM
message name such as ``DM_MEM_HOT_ADD_REQUEST``, ``fields`` the message's fields with
page ranges as ``[start_page, page_cnt]``). Attach and protocol-error messages appear
with ``type`` ``attach``, ``attached`` and ``protocol_error``.

Raw: a file that starts with the 8 bytes ``MEMHPDM1``, then one record per DM frame:
``<BdH`` (direction 0 guest to host, 1 host to guest; seconds since the trace began;
length of the VM id) + the VM id in UTF-8 + the DM message exactly as Linux and QEMU
put it on the VMBus ring (:mod:`memhp.codec`; its header carries its own size).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import grpc

from memhp import codec, dm, wire
from memhp.logs import get_logger
from memhp.procs import write_ready_file
from memhp.v1 import dm_pb2, dm_pb2_grpc

log = get_logger("memhp.trace")

RAW_MAGIC = b"MEMHPDM1"
_RECORD = struct.Struct("<BdH")
GUEST_TO_HOST, HOST_TO_GUEST = 0, 1
DIRECTIONS = ("guest_to_host", "host_to_guest")

#: DM message names by dataclass (AccessReport is the emulator's own).
TYPE_NAMES: dict[type[dm.DmMessage], str] = {
    dm.VersionRequest: "DM_VERSION_REQUEST",
    dm.VersionResponse: "DM_VERSION_RESPONSE",
    dm.CapabilitiesReport: "DM_CAPABILITIES_REPORT",
    dm.CapabilitiesResponse: "DM_CAPABILITIES_RESPONSE",
    dm.StatusReport: "DM_STATUS_REPORT",
    dm.BalloonRequest: "DM_BALLOON_REQUEST",
    dm.BalloonResponse: "DM_BALLOON_RESPONSE",
    dm.UnballoonRequest: "DM_UNBALLOON_REQUEST",
    dm.UnballoonResponse: "DM_UNBALLOON_RESPONSE",
    dm.HotAddRequest: "DM_MEM_HOT_ADD_REQUEST",
    dm.HotAddResponse: "DM_MEM_HOT_ADD_RESPONSE",
    dm.InfoMessage: "DM_INFO_MESSAGE",
    dm.AccessReport: "MEMHP_ACCESS_REPORT",
}


def message_fields(msg: dm.DmMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        if f.name == "trans_id":
            continue
        value = getattr(msg, f.name)
        if isinstance(value, dm.PageRange):
            value = [value.start_page, value.page_cnt]
        elif isinstance(value, tuple):
            value = [[r.start_page, r.page_cnt] for r in value]
        out[f.name] = value
    return out


def json_record(t: float, vm: str, direction: int, msg: dm.DmMessage) -> dict[str, Any]:
    return {
        "time": round(t, 6),
        "vm": vm,
        "direction": DIRECTIONS[direction],
        "trans_id": msg.trans_id,
        "type": TYPE_NAMES[type(msg)],
        "fields": message_fields(msg),
    }


class TraceWriter:
    """Writes frames in one of the two formats; one writer serves every proxied stream."""

    def __init__(self, out: IO[bytes], fmt: str) -> None:
        if fmt not in ("jsonl", "raw"):
            raise ValueError(f"format must be jsonl or raw, not {fmt!r}")
        self.out = out
        self.fmt = fmt
        self.start = time.monotonic()
        self.frames = 0
        if fmt == "raw":
            out.write(RAW_MAGIC)

    def frame(self, vm: str, direction: int, msg: dm.DmMessage) -> None:
        t = time.monotonic() - self.start
        self.frames += 1
        if self.fmt == "raw":
            vm_bytes = vm.encode()
            self.out.write(_RECORD.pack(direction, t, len(vm_bytes)) + vm_bytes)
            self.out.write(codec.encode(msg))
        else:
            line = json.dumps(json_record(t, vm, direction, msg), separators=(",", ":"))
            self.out.write(line.encode() + b"\n")
        self.out.flush()

    def control(self, vm: str, direction: int, kind: str, fields: dict[str, Any]) -> None:
        """Attach / attached / protocol_error (JSON lines only: no DM struct exists)."""
        if self.fmt != "jsonl":
            return
        t = time.monotonic() - self.start
        record = {
            "time": round(t, 6),
            "vm": vm,
            "direction": DIRECTIONS[direction],
            "type": kind,
            "fields": fields,
        }
        self.out.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self.out.flush()


def read_raw(data: bytes) -> list[tuple[float, str, int, dm.DmMessage]]:
    """Parse a raw trace back into (time, vm, direction, message)."""
    if not data.startswith(RAW_MAGIC):
        raise ValueError("not a raw memhp DM trace (missing MEMHPDM1 magic)")
    pos = len(RAW_MAGIC)
    out = []
    while pos < len(data):
        if pos + _RECORD.size > len(data):
            raise ValueError(f"truncated record header at byte {pos}")
        direction, t, vm_len = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        vm = data[pos : pos + vm_len].decode()
        pos += vm_len
        if pos + codec.HEADER_SIZE > len(data):
            raise ValueError(f"truncated DM header at byte {pos}")
        size = struct.unpack_from("<H", data, pos + 2)[0]
        out.append((t, vm, direction, codec.decode(data[pos : pos + size])))
        pos += size
    return out


class TraceProxy(dm_pb2_grpc.DynamicMemoryServicer):
    def __init__(self, upstream: grpc.aio.Channel, writer: TraceWriter) -> None:
        self.stub = dm_pb2_grpc.DynamicMemoryStub(upstream)
        self.writer = writer

    async def Connect(
        self,
        request_iterator: AsyncIterator[dm_pb2.GuestToHost],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[dm_pb2.HostToGuest]:
        vm = ""

        async def upward() -> AsyncIterator[dm_pb2.GuestToHost]:
            nonlocal vm
            async for item in request_iterator:
                which = item.WhichOneof("msg")
                if which == "attach":
                    vm = item.attach.vm_id
                    self.writer.control(vm, GUEST_TO_HOST, "attach", {"vm_id": vm})
                elif which == "frame":
                    self._record(vm, GUEST_TO_HOST, item.frame)
                yield item

        call = self.stub.Connect(upward())
        async for reply in call:
            which = reply.WhichOneof("msg")
            if which == "frame":
                self._record(vm, HOST_TO_GUEST, reply.frame)
            elif which == "attached":
                layout = reply.attached.layout
                self.writer.control(
                    vm,
                    HOST_TO_GUEST,
                    "attached",
                    {
                        "boot_pages": layout.boot_pages,
                        "max_pages": layout.max_pages,
                        "block_pages": layout.block_pages,
                    },
                )
            elif which == "error":
                self.writer.control(
                    vm,
                    HOST_TO_GUEST,
                    "protocol_error",
                    {"kind": reply.error.kind, "message": reply.error.message},
                )
            yield reply

    def _record(self, vm: str, direction: int, frame: dm_pb2.DmFrame) -> None:
        try:
            msg = wire.from_frame(frame)
        except dm.ProtocolError as err:
            log.warning("unrecordable frame", vm=vm, error=str(err))
            return
        try:
            self.writer.frame(vm, direction, msg)
        except dm.ProtocolError as err:
            # Valid on gRPC but not encodable as a DM struct (e.g. > 510 ranges).
            log.warning("frame not encodable as DM bytes", vm=vm, error=str(err))


async def record(
    listen: str, upstream: str, out_path: Path, fmt: str, ready_file: str | None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with out_path.open("wb") as out:
        writer = TraceWriter(out, fmt)
        async with grpc.aio.insecure_channel(upstream) as channel:
            server = grpc.aio.server()
            dm_pb2_grpc.add_DynamicMemoryServicer_to_server(TraceProxy(channel, writer), server)
            port = server.add_insecure_port(listen)
            await server.start()
            host = listen.rsplit(":", 1)[0]
            log.info("trace proxy listening", address=f"{host}:{port}", upstream=upstream)
            if ready_file:
                write_ready_file(ready_file, f"{host}:{port}")
            await stop.wait()
            await server.stop(grace=1.0)
        log.info("trace written", frames=writer.frames, path=str(out_path))
    return 0


def _record_cmd(args: argparse.Namespace) -> int:
    from memhp.cli import run_async

    return run_async(
        lambda: record(args.listen, args.upstream, Path(args.out), args.format, args.ready_file)
    )


def _show_cmd(args: argparse.Namespace) -> int:
    try:
        frames = read_raw(Path(args.file).read_bytes())
    except (OSError, ValueError, dm.ProtocolError) as err:
        sys.stderr.write(f"memhp trace: {args.file}: {err}\n")
        return 2
    for t, vm, direction, msg in frames:
        sys.stdout.write(json.dumps(json_record(t, vm, direction, msg)) + "\n")
    return 0


def add_subparser(sub: Any) -> None:
    trace = sub.add_parser("trace", help="record DM sessions (a recording proxy)")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    rec = trace_sub.add_parser("record", help="proxy DynamicMemory and record every frame")
    rec.add_argument("--listen", default="127.0.0.1:50052", help="where guests dial (port 0 ok)")
    rec.add_argument("--upstream", required=True, help="the hypervisor's address")
    rec.add_argument("--out", required=True, help="the trace file")
    rec.add_argument("--format", choices=("jsonl", "raw"), default="jsonl")
    rec.add_argument("--ready-file", help="write HOST:PORT here once listening")
    rec.set_defaults(func=_record_cmd)
    show = trace_sub.add_parser("show", help="print a raw trace as JSON lines")
    show.add_argument("file")
    show.set_defaults(func=_show_cmd)
