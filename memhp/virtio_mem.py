"""virtio-mem messages, device config and their byte-exact codec (``uapi/linux/virtio_mem.h``).

What both sides of a virtio-mem device speak: the guest's requests on the one
virtqueue ("guest-request"), the device's responses, and the device config space.
The layouts are those of the uapi header (mm-model.md §5.1), all little-endian::

    struct virtio_mem_req   (24 bytes)  le16 type; le16 padding[3];
                                        union { le64 addr; le16 nb_blocks; le16 padding[3]; }
    struct virtio_mem_resp  (10 bytes)  le16 type; le16 padding[3]; le16 state
    struct virtio_mem_config (56 bytes) le64 block_size; le16 node_id; u8 padding[6];
                                        le64 addr; le64 region_size; le64 usable_region_size;
                                        le64 plugged_size; le64 requested_size

Addresses and sizes are bytes (guest physical), as on the real device; the memory
model speaks PFNs, and the conversion happens in the driver and the host device.

Emulator additions (no virtio structure, never sent to a real device): the guest's
:class:`AccessReport` (which guest pages it touched, so the host can catch an access
to unplugged memory, like the Hyper-V side channel) and :class:`ConfigChange` (the
config interrupt, carrying the config the guest would read right after it). Neither
has a byte encoding; the transports carry them as typed messages.

Decoding is stricter than QEMU, which ignores the padding: a request or response
with non-zero padding, an unknown type or a response ``state`` outside 0..2 raises
:class:`VirtioMemProtocolError` naming the field (Linux always zeroes the padding, so
anything else is a broken peer). A request's ``addr``/``nb_blocks`` for UNPLUG_ALL are
kept as given (QEMU ignores them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "CONFIG_SIZE",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "VIRTIO_ID_MEM",
    "VIRTIO_MEM_F_ACPI_PXM",
    "VIRTIO_MEM_F_PERSISTENT_SUSPEND",
    "VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE",
    "AccessReport",
    "ConfigChange",
    "VirtioMemConfig",
    "VirtioMemProtocolError",
    "VirtioMemReqType",
    "VirtioMemRequest",
    "VirtioMemRespType",
    "VirtioMemResponse",
    "VirtioMemState",
    "decode_config",
    "decode_request",
    "decode_response",
    "encode_config",
    "encode_request",
    "encode_response",
]

#: ``include/uapi/linux/virtio_ids.h``.
VIRTIO_ID_MEM = 24

#: Feature bits (bit numbers): ``node_id`` is an ACPI PXM.
VIRTIO_MEM_F_ACPI_PXM = 0
#: Unplugged memory must not be accessed, not even read (Linux 5.16+).
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
#: Plugged memory survives suspend (2024).
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2

REQUEST_SIZE = 24
RESPONSE_SIZE = 10
CONFIG_SIZE = 56

_U16 = (1 << 16) - 1
_U64 = (1 << 64) - 1

_REQUEST = struct.Struct("<H3HQH3H")
_RESPONSE = struct.Struct("<H3HH")
_CONFIG = struct.Struct("<QH6sQQQQQ")
assert _REQUEST.size == REQUEST_SIZE and _RESPONSE.size == RESPONSE_SIZE
assert _CONFIG.size == CONFIG_SIZE


class VirtioMemProtocolError(Exception):
    """Bytes or values that no virtio-mem structure can hold, or that break its rules."""


class VirtioMemReqType(IntEnum):
    VIRTIO_MEM_REQ_PLUG = 0
    VIRTIO_MEM_REQ_UNPLUG = 1
    VIRTIO_MEM_REQ_UNPLUG_ALL = 2
    VIRTIO_MEM_REQ_STATE = 3


class VirtioMemRespType(IntEnum):
    VIRTIO_MEM_RESP_ACK = 0
    VIRTIO_MEM_RESP_NACK = 1
    VIRTIO_MEM_RESP_BUSY = 2
    VIRTIO_MEM_RESP_ERROR = 3


class VirtioMemState(IntEnum):
    """``virtio_mem_resp_state.state``: the answer to a STATE request."""

    VIRTIO_MEM_STATE_PLUGGED = 0
    VIRTIO_MEM_STATE_UNPLUGGED = 1
    VIRTIO_MEM_STATE_MIXED = 2


PLUG = VirtioMemReqType.VIRTIO_MEM_REQ_PLUG
UNPLUG = VirtioMemReqType.VIRTIO_MEM_REQ_UNPLUG
UNPLUG_ALL = VirtioMemReqType.VIRTIO_MEM_REQ_UNPLUG_ALL
STATE = VirtioMemReqType.VIRTIO_MEM_REQ_STATE
ACK = VirtioMemRespType.VIRTIO_MEM_RESP_ACK
NACK = VirtioMemRespType.VIRTIO_MEM_RESP_NACK
BUSY = VirtioMemRespType.VIRTIO_MEM_RESP_BUSY
ERROR = VirtioMemRespType.VIRTIO_MEM_RESP_ERROR
PLUGGED = VirtioMemState.VIRTIO_MEM_STATE_PLUGGED
UNPLUGGED = VirtioMemState.VIRTIO_MEM_STATE_UNPLUGGED
MIXED = VirtioMemState.VIRTIO_MEM_STATE_MIXED

#: Short names for events and logs.
REQUEST_NAMES = {PLUG: "plug", UNPLUG: "unplug", UNPLUG_ALL: "unplug_all", STATE: "state"}
RESPONSE_NAMES = {ACK: "ack", NACK: "nack", BUSY: "busy", ERROR: "error"}
STATE_NAMES = {PLUGGED: "plugged", UNPLUGGED: "unplugged", MIXED: "mixed"}


def _check_width(what: str, value: int, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        bits = limit.bit_length()
        raise VirtioMemProtocolError(f"{what}: {value!r} does not fit an unsigned {bits}-bit field")


@dataclass(frozen=True)
class VirtioMemRequest:
    """``struct virtio_mem_req``; ``addr``/``nb_blocks`` are the union's (0 for UNPLUG_ALL)."""

    type: VirtioMemReqType
    addr: int = 0
    nb_blocks: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.type, VirtioMemReqType):
            raise VirtioMemProtocolError(f"virtio_mem_req.type: unknown request {self.type!r}")
        _check_width("virtio_mem_req.addr", self.addr, _U64)
        _check_width("virtio_mem_req.nb_blocks", self.nb_blocks, _U16)

    @classmethod
    def plug(cls, addr: int, nb_blocks: int) -> VirtioMemRequest:
        return cls(PLUG, addr, nb_blocks)

    @classmethod
    def unplug(cls, addr: int, nb_blocks: int) -> VirtioMemRequest:
        return cls(UNPLUG, addr, nb_blocks)

    @classmethod
    def unplug_all(cls) -> VirtioMemRequest:
        return cls(UNPLUG_ALL)

    @classmethod
    def state(cls, addr: int, nb_blocks: int) -> VirtioMemRequest:
        return cls(STATE, addr, nb_blocks)

    @property
    def name(self) -> str:
        return REQUEST_NAMES[self.type]


@dataclass(frozen=True)
class VirtioMemResponse:
    """``struct virtio_mem_resp``; ``state`` means something only in the ACK of a STATE."""

    type: VirtioMemRespType
    state: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.type, VirtioMemRespType):
            raise VirtioMemProtocolError(f"virtio_mem_resp.type: unknown response {self.type!r}")
        if isinstance(self.state, bool) or self.state not in tuple(VirtioMemState):
            raise VirtioMemProtocolError(
                f"virtio_mem_resp.state: {self.state!r} is none of PLUGGED (0), "
                "UNPLUGGED (1), MIXED (2)"
            )

    @property
    def name(self) -> str:
        return RESPONSE_NAMES[self.type]


@dataclass(frozen=True)
class VirtioMemConfig:
    """``struct virtio_mem_config``, in bytes (``node_id`` aside), in the struct's order."""

    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "addr",
            "region_size",
            "usable_region_size",
            "plugged_size",
            "requested_size",
        ):
            _check_width(f"virtio_mem_config.{name}", getattr(self, name), _U64)
        _check_width("virtio_mem_config.node_id", self.node_id, _U16)

    @property
    def end(self) -> int:
        """The first byte after the device region."""
        return self.addr + self.region_size


@dataclass(frozen=True)
class AccessReport:
    """Emulator-only: guest pages ``[start_pfn, end_pfn)`` the guest touched (no virtio struct)."""

    ranges: tuple[tuple[int, int], ...]
    what: str = "allocate"


@dataclass(frozen=True)
class ConfigChange:
    """Emulator-only form of the config interrupt: the config as the guest reads it now."""

    config: VirtioMemConfig


def encode_request(req: VirtioMemRequest) -> bytes:
    return _REQUEST.pack(int(req.type), 0, 0, 0, req.addr, req.nb_blocks, 0, 0, 0)


def decode_request(data: bytes) -> VirtioMemRequest:
    """24 bytes of ``struct virtio_mem_req``; raises VirtioMemProtocolError."""
    if len(data) != REQUEST_SIZE:
        raise VirtioMemProtocolError(
            f"virtio_mem_req: {len(data)} bytes, the struct has {REQUEST_SIZE}"
        )
    type_, p0, p1, p2, addr, nb_blocks, q0, q1, q2 = _REQUEST.unpack(data)
    if p0 or p1 or p2:
        raise VirtioMemProtocolError("virtio_mem_req.padding: must be zero")
    if q0 or q1 or q2:
        raise VirtioMemProtocolError("virtio_mem_req.u.padding: must be zero")
    try:
        req_type = VirtioMemReqType(type_)
    except ValueError:
        raise VirtioMemProtocolError(f"virtio_mem_req.type: unknown request type {type_}") from None
    return VirtioMemRequest(req_type, addr, nb_blocks)


def encode_response(resp: VirtioMemResponse) -> bytes:
    return _RESPONSE.pack(int(resp.type), 0, 0, 0, int(resp.state))


def decode_response(data: bytes) -> VirtioMemResponse:
    """10 bytes of ``struct virtio_mem_resp``; raises VirtioMemProtocolError."""
    if len(data) != RESPONSE_SIZE:
        raise VirtioMemProtocolError(
            f"virtio_mem_resp: {len(data)} bytes, the struct has {RESPONSE_SIZE}"
        )
    type_, p0, p1, p2, state = _RESPONSE.unpack(data)
    if p0 or p1 or p2:
        raise VirtioMemProtocolError("virtio_mem_resp.padding: must be zero")
    try:
        resp_type = VirtioMemRespType(type_)
    except ValueError:
        raise VirtioMemProtocolError(
            f"virtio_mem_resp.type: unknown response type {type_}"
        ) from None
    return VirtioMemResponse(resp_type, state)


def encode_config(config: VirtioMemConfig) -> bytes:
    return _CONFIG.pack(
        config.block_size,
        config.node_id,
        bytes(6),
        config.addr,
        config.region_size,
        config.usable_region_size,
        config.plugged_size,
        config.requested_size,
    )


def decode_config(data: bytes) -> VirtioMemConfig:
    """56 bytes of ``struct virtio_mem_config``; raises VirtioMemProtocolError."""
    if len(data) != CONFIG_SIZE:
        raise VirtioMemProtocolError(
            f"virtio_mem_config: {len(data)} bytes, the struct has {CONFIG_SIZE}"
        )
    block_size, node_id, padding, addr, region, usable, plugged, requested = _CONFIG.unpack(data)
    if any(padding):
        raise VirtioMemProtocolError("virtio_mem_config.padding: must be zero")
    return VirtioMemConfig(block_size, node_id, addr, region, usable, plugged, requested)
