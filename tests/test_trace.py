"""memhp trace: the recording proxy between a guest and a hypervisor, both formats."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from memhp import codec, dm, wire
from memhp.trace import RAW_MAGIC, TraceProxy, TraceWriter, json_record, read_raw
from memhp.v1 import dm_pb2, dm_pb2_grpc

HOT_ADD = dm.HotAddRequest(7, dm.PageRange(0x100000, 0x4B00), dm.PageRange(0x100000, 0x40000))


class FakeHost(dm_pb2_grpc.DynamicMemoryServicer):
    """Accepts the attach, accepts the version, then sends one hot-add request."""

    async def Connect(
        self,
        request_iterator: AsyncIterator[dm_pb2.GuestToHost],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[dm_pb2.HostToGuest]:
        async for item in request_iterator:
            if item.WhichOneof("msg") == "attach":
                layout = dm_pb2.VmLayout(vm_id=item.attach.vm_id, boot_pages=1 << 20)
                yield dm_pb2.HostToGuest(attached=dm_pb2.Attached(layout=layout))
                continue
            msg = wire.from_frame(item.frame)
            if isinstance(msg, dm.VersionRequest):
                reply = dm.VersionResponse(msg.trans_id, True)
                yield dm_pb2.HostToGuest(frame=wire.to_frame(reply))
                yield dm_pb2.HostToGuest(frame=wire.to_frame(HOT_ADD))


async def _session(fmt: str) -> tuple[bytes, list[dm_pb2.HostToGuest]]:
    upstream = grpc.aio.server()
    dm_pb2_grpc.add_DynamicMemoryServicer_to_server(FakeHost(), upstream)
    up_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    out = io.BytesIO()
    writer = TraceWriter(out, fmt)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{up_port}")
    proxy = grpc.aio.server()
    dm_pb2_grpc.add_DynamicMemoryServicer_to_server(TraceProxy(channel, writer), proxy)
    proxy_port = proxy.add_insecure_port("127.0.0.1:0")
    await proxy.start()
    received: list[dm_pb2.HostToGuest] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}") as guest:
            # grpc-stubs predates the read/write style of grpc.aio streams.
            call = dm_pb2_grpc.DynamicMemoryStub(guest).Connect()  # type: ignore[call-arg]
            await call.write(dm_pb2.GuestToHost(attach=dm_pb2.Attach(vm_id="g1")))
            received.append(cast(dm_pb2.HostToGuest, await call.read()))
            version = dm.VersionRequest(1, dm.DYNMEM_PROTOCOL_VERSION_3)
            await call.write(dm_pb2.GuestToHost(frame=wire.to_frame(version)))
            received.append(cast(dm_pb2.HostToGuest, await call.read()))
            received.append(cast(dm_pb2.HostToGuest, await call.read()))
            await call.done_writing()
    finally:
        await proxy.stop(None)
        await channel.close(None)
        await upstream.stop(None)
    return out.getvalue(), received


async def test_jsonl_trace_has_every_frame_in_order() -> None:
    data, received = await _session("jsonl")
    assert [r.WhichOneof("msg") for r in received] == ["attached", "frame", "frame"]
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert [(r["direction"], r["type"]) for r in lines] == [
        ("guest_to_host", "attach"),
        ("host_to_guest", "attached"),
        ("guest_to_host", "DM_VERSION_REQUEST"),
        ("host_to_guest", "DM_VERSION_RESPONSE"),
        ("host_to_guest", "DM_MEM_HOT_ADD_REQUEST"),
    ]
    hot_add = lines[-1]
    assert hot_add["vm"] == "g1"
    assert hot_add["trans_id"] == 7
    assert hot_add["fields"] == {"range": [0x100000, 0x4B00], "region": [0x100000, 0x40000]}
    assert lines[2]["fields"] == {"version": 0x20000, "is_last_attempt": False}


async def test_raw_trace_holds_the_exact_wire_bytes() -> None:
    data, _ = await _session("raw")
    assert data.startswith(RAW_MAGIC)
    frames = read_raw(data)
    assert [(vm, d, type(m)) for _, vm, d, m in frames] == [
        ("g1", 0, dm.VersionRequest),
        ("g1", 1, dm.VersionResponse),
        ("g1", 1, dm.HotAddRequest),
    ]
    assert frames[-1][3] == HOT_ADD
    # The 24-byte dm_hot_add_with_region, exactly as QEMU puts it on the ring.
    assert codec.encode(HOT_ADD) in data
    assert data.endswith(codec.encode(HOT_ADD))
    times = [t for t, _, _, _ in frames]
    assert times == sorted(times)


def test_read_raw_rejects_other_files() -> None:
    with pytest.raises(ValueError, match="MEMHPDM1"):
        read_raw(b"not a trace")
    with pytest.raises(ValueError, match="truncated"):
        read_raw(RAW_MAGIC + b"\x00\x01")


def test_json_record_of_a_balloon_response() -> None:
    msg = dm.BalloonResponse(3, True, (dm.PageRange(0x200, 512), dm.PageRange(0x400, 512)))
    record = json_record(1.5, "g", 0, msg)
    assert record == {
        "time": 1.5,
        "vm": "g",
        "direction": "guest_to_host",
        "trans_id": 3,
        "type": "DM_BALLOON_RESPONSE",
        "fields": {"more_pages": True, "ranges": [[0x200, 512], [0x400, 512]]},
    }
