"""The ``VirtioMem`` gRPC service: one bidirectional ``Connect`` stream per virtio-mem device.

The first guest message must be ``attach``; the host answers ``attached`` with the VM's
layout and the device's config space, then the guest's requests are answered in order
(each with the config as it reads after the request), access reports are checked
against what is plugged, and a ``Control.Resize`` arrives as ``config_changed``. A
reader task hands guest messages to :class:`~hypervisor.runtime.Hypervisor`; this
handler writes the VM's device outbox, so answers and config changes go out in order
through one writer. When the stream ends the device stays, with what is plugged; a
request re-sent first on the next stream after the device applied it gets its ACK again
(:meth:`~hypervisor.runtime.Hypervisor.virtio_request`), not a second application.

Refusals abort the call: NOT_FOUND (no such VM), FAILED_PRECONDITION (not a virtio-mem
VM, or the first message is not attach), ALREADY_EXISTS (a guest is attached),
INVALID_ARGUMENT (a malformed vm_id). A hostile guest gets ERROR and NACK answers and
``protocol_error`` events, never a reset: QEMU answers and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from hypervisor.control import STATUS
from hypervisor.events import HostEvent, ProtocolViolation
from hypervisor.runtime import Hypervisor, ServiceError, VmHandle
from memhp.logs import get_logger
from memhp.v1 import virtio_mem_pb2, virtio_mem_pb2_grpc

log = get_logger("hypervisor.virtio_mem")

Context = grpc.aio.ServicerContext[Any, Any]


class VirtioMemServicer(virtio_mem_pb2_grpc.VirtioMemServicer):
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor

    async def Connect(
        self, request_iterator: AsyncIterator[virtio_mem_pb2.GuestToDevice], context: Context
    ) -> AsyncIterator[virtio_mem_pb2.DeviceToGuest]:
        stream = aiter(request_iterator)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            return
        if first.WhichOneof("msg") != "attach":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "attach: the first message on a VirtioMem.Connect stream must be attach",
            )
        attach = first.attach
        try:
            handle = self.hv.attach_virtio(attach.vm_id, attach.introspection_address)
        except ServiceError as err:
            log.info("attach_refused", vm=attach.vm_id, code=err.code, message=err.message)
            await context.abort(STATUS[err.code], f"{err.field}: {err.message}")
        structlog.contextvars.bind_contextvars(vm=handle.vm_id)
        epoch = handle.epoch
        outbox = handle.device_outbox
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
            self.hv.detach_virtio(
                handle, epoch, "hypervisor shutdown" if self.hv.stopping else reason
            )

    async def _read(
        self,
        handle: VmHandle,
        stream: AsyncIterator[virtio_mem_pb2.GuestToDevice],
        outbox: asyncio.Queue[virtio_mem_pb2.DeviceToGuest | None],
    ) -> None:
        try:
            async for msg in stream:
                if handle.device_outbox is not outbox:
                    break  # detached meanwhile
                which = msg.WhichOneof("msg")
                if which == "request":
                    self.hv.virtio_request(handle, msg.request)
                elif which == "access":
                    self.hv.virtio_access(handle, msg.access)
                else:
                    # Nothing to answer: record it, as the device records every refusal.
                    kind = "attach-after-attach" if which == "attach" else "empty-message"
                    message = (
                        "attach: only the first message may be attach"
                        if which == "attach"
                        else "guest_to_device.msg: a message must carry request or access"
                    )
                    violation = ProtocolViolation(kind, message)
                    assert handle.device is not None
                    handle.device.protocol_errors.append(violation)
                    self.hv.publish_device_events(
                        handle,
                        [HostEvent("protocol_error", {**violation.as_data(), "action": "ignored"})],
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
