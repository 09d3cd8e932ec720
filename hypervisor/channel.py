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
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from hypervisor.control import STATUS
from hypervisor.reconcile import GuestState
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
    )


class DynamicMemoryServicer(dm_pb2_grpc.DynamicMemoryServicer):
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor

    async def Connect(
        self, request_iterator: AsyncIterator[dm_pb2.GuestToHost], context: Context
    ) -> AsyncIterator[dm_pb2.HostToGuest]:
        stream = aiter(request_iterator)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            return
        if first.WhichOneof("msg") != "attach":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "attach: the first message on a Connect stream must be attach",
            )
        attach = first.attach
        state = guest_state_from_pb(attach.state) if attach.HasField("state") else None
        try:
            handle = self.hv.attach(attach.vm_id, state, attach.introspection_address)
        except ServiceError as err:
            log.info("attach_refused", vm=attach.vm_id, code=err.code, message=err.message)
            await context.abort(STATUS[err.code], f"{err.field}: {err.message}")
        structlog.contextvars.bind_contextvars(vm=handle.vm_id)
        epoch = handle.epoch
        outbox = handle.outbox
        assert outbox is not None
        reader = asyncio.create_task(self._read(handle, stream, outbox))
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
            self.hv.detach(handle, epoch, "hypervisor shutdown" if self.hv.stopping else reason)

    async def _read(
        self,
        handle: VmHandle,
        stream: AsyncIterator[dm_pb2.GuestToHost],
        outbox: asyncio.Queue[dm_pb2.HostToGuest | None],
    ) -> None:
        try:
            async for msg in stream:
                if handle.outbox is not outbox:
                    break  # detached meanwhile
                which = msg.WhichOneof("msg")
                if which == "frame":
                    self.hv.guest_frame(handle, msg.frame)
                elif which == "attach":
                    self.hv.guest_broke_rule(
                        handle,
                        "attach-after-attach",
                        "attach: only the first message may be attach",
                    )
                else:
                    self.hv.guest_broke_rule(
                        handle,
                        "empty-message",
                        "guest_to_host.msg: a message must carry attach or frame",
                    )
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as err:
            log.info("guest_stream_error", code=err.code().name, details=err.details())
        except Exception:
            log.exception("guest_reader_failed")
        finally:
            # The guest is gone (or broke): end the writer, which detaches.
            outbox.put_nowait(None)
