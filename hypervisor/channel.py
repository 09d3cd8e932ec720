"""The ``DynamicMemory`` gRPC service: one bidirectional ``Connect`` stream per guest.

The first guest message must be ``attach``; the host answers ``attached`` with the
VM's layout, then DM frames flow both ways. A reader task feeds guest frames to the
VM's session; this handler writes the VM's outbox to the stream, so host messages
from a frame, an operator command or a tick go out in order through one writer.
When the stream ends the VM is detached and its session kept for a reattach.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.message import Message

from hypervisor.control import STATUS
from hypervisor.reconcile import GuestState, HeldRegion
from hypervisor.runtime import Hypervisor, ServiceError, VmHandle
from memhp.logs import get_logger
from memhp.v1 import dm_pb2, dm_pb2_grpc

log = get_logger("hypervisor.channel")

Context = grpc.aio.ServicerContext[Any, Any]


def guest_state_from_pb(state: dm_pb2.GuestMemoryState) -> GuestState:
    return GuestState(
        regions=tuple((r.start_page, r.page_cnt) for r in state.regions),
        pages_added=state.pages_added,
        ballooned=tuple((r.start_page, r.page_cnt) for r in state.ballooned),
        held=tuple(
            HeldRegion(
                h.start_page, h.page_count, tuple((a.start_page, a.page_cnt) for a in h.added)
            )
            for h in state.held
        ),
    )


#: A guest-to-host stream message: a oneof ``msg`` whose first case is ``attach``.
M = TypeVar("M", bound=Message)
Out = TypeVar("Out")


async def serve_stream(
    request_iterator: AsyncIterator[M],
    context: Context,
    *,
    stream_name: str,
    attach: Callable[[M], VmHandle],
    outbox_of: Callable[[VmHandle], asyncio.Queue[Out | None] | None],
    dispatch: Callable[[VmHandle, M], None],
    detach: Callable[[VmHandle, int, str], None],
    stopping: Callable[[], bool],
) -> AsyncIterator[Out]:
    """One guest stream of either channel: ``attach`` first (a refusal aborts the call
    with its status and ``field: rule``), then a reader task hands every later message
    to ``dispatch`` while this generator writes the VM's outbox, so host messages from a
    message, a command or a tick go out in order through one writer. When the stream
    ends the VM is detached (``detach``) and keeps its state for a reattach."""
    stream = aiter(request_iterator)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        return
    if first.WhichOneof("msg") != "attach":
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"attach: the first message on a {stream_name} stream must be attach",
        )
    try:
        handle = attach(first)
    except ServiceError as err:
        vm_id = getattr(getattr(first, "attach", None), "vm_id", "")
        log.info("attach_refused", vm=vm_id, code=err.code, message=err.message)
        await context.abort(STATUS[err.code], f"{err.field}: {err.message}")
    structlog.contextvars.bind_contextvars(vm=handle.vm_id)
    epoch = handle.epoch
    outbox = outbox_of(handle)
    assert outbox is not None
    reader = asyncio.create_task(_read(handle, stream, outbox, outbox_of, dispatch))
    reason = "stream ended"
    try:
        while True:
            msg = await outbox.get()
            if msg is None:
                break
            yield msg
    except asyncio.CancelledError:
        reason = "stream cancelled"
        raise
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        detach(handle, epoch, "hypervisor shutdown" if stopping() else reason)


async def _read(
    handle: VmHandle,
    stream: AsyncIterator[M],
    outbox: asyncio.Queue[Out | None],
    outbox_of: Callable[[VmHandle], asyncio.Queue[Out | None] | None],
    dispatch: Callable[[VmHandle, M], None],
) -> None:
    try:
        async for msg in stream:
            if outbox_of(handle) is not outbox:
                break  # detached meanwhile
            dispatch(handle, msg)
    except asyncio.CancelledError:
        raise
    except grpc.aio.AioRpcError as err:
        log.info("guest_stream_error", code=err.code().name, details=err.details())
    except Exception:
        log.exception("guest_reader_failed")
    finally:
        # The guest is gone (or broke): end the writer, which detaches.
        outbox.put_nowait(None)


class DynamicMemoryServicer(dm_pb2_grpc.DynamicMemoryServicer):
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor

    async def Connect(
        self, request_iterator: AsyncIterator[dm_pb2.GuestToHost], context: Context
    ) -> AsyncIterator[dm_pb2.HostToGuest]:
        # gRPC wants the handler itself to be an async generator.
        async for msg in serve_stream(
            request_iterator,
            context,
            stream_name="Connect",
            attach=self._attach,
            outbox_of=lambda h: h.outbox,
            dispatch=self._dispatch,
            detach=self.hv.detach,
            stopping=lambda: self.hv.stopping,
        ):
            yield msg

    def _attach(self, first: dm_pb2.GuestToHost) -> VmHandle:
        attach = first.attach
        state = guest_state_from_pb(attach.state) if attach.HasField("state") else None
        return self.hv.attach(attach.vm_id, state, attach.introspection_address)

    def _dispatch(self, handle: VmHandle, msg: dm_pb2.GuestToHost) -> None:
        which = msg.WhichOneof("msg")
        if which == "frame":
            self.hv.guest_frame(handle, msg.frame)
        elif which == "attach":
            self.hv.guest_broke_rule(
                handle, "attach-after-attach", "attach: only the first message may be attach"
            )
        else:
            self.hv.guest_broke_rule(
                handle,
                "empty-message",
                "guest_to_host.msg: a message must carry attach or frame",
            )
