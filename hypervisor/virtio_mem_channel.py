"""The ``VirtioMem`` gRPC service: one bidirectional ``Connect`` stream per virtio-mem device.

The first guest message must be ``attach``; the host answers ``attached`` with the VM's
layout and the device's config space, then the guest's requests are answered in order
(each with the config as it reads after the request), access reports are checked
against what is plugged, and a ``Control.Resize`` arrives as ``config_changed``. A
reader task hands guest messages to :class:`~hypervisor.runtime.Hypervisor` and the
handler writes the VM's device outbox (:func:`hypervisor.channel.serve_stream`, as for
the DM channel), so answers and config changes go out in order through one writer.
When the stream ends the device stays, with what is plugged; a request re-sent first
on the next stream after the device applied it gets its ACK again
(:meth:`~hypervisor.runtime.Hypervisor.virtio_request`), not a second application.

Refusals abort the call: NOT_FOUND (no such VM), FAILED_PRECONDITION (not a virtio-mem
VM, or the first message is not attach), ALREADY_EXISTS (a guest is attached),
INVALID_ARGUMENT (a malformed vm_id). A hostile guest gets ERROR and NACK answers and
``protocol_error`` events, never a reset: QEMU answers and carries on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from hypervisor.channel import serve_stream
from hypervisor.events import HostEvent, ProtocolViolation
from hypervisor.runtime import Hypervisor, VmHandle
from memhp.v1 import virtio_mem_pb2, virtio_mem_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class VirtioMemServicer(virtio_mem_pb2_grpc.VirtioMemServicer):
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor

    async def Connect(
        self, request_iterator: AsyncIterator[virtio_mem_pb2.GuestToDevice], context: Context
    ) -> AsyncIterator[virtio_mem_pb2.DeviceToGuest]:
        # gRPC wants the handler itself to be an async generator.
        async for msg in serve_stream(
            request_iterator,
            context,
            stream_name="VirtioMem.Connect",
            attach=lambda first: self.hv.attach_virtio(
                first.attach.vm_id, first.attach.introspection_address
            ),
            outbox_of=lambda h: h.device_outbox,
            dispatch=self._dispatch,
            detach=self.hv.detach_virtio,
            stopping=lambda: self.hv.stopping,
        ):
            yield msg

    def _dispatch(self, handle: VmHandle, msg: virtio_mem_pb2.GuestToDevice) -> None:
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
