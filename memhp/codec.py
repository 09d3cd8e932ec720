"""Byte-exact codec between the :mod:`memhp.dm` dataclasses and the packed DM wire structs.

The layouts are those of Linux (``include/linux/hyperv.h``, ``drivers/hv/hv_balloon.c``)
and QEMU (``include/hw/hyperv/dynmem-proto.h``), summarised in hyperv-dm.md §1.4-1.5:
every struct is ``__packed`` and little-endian, every message starts with the 8-byte
``struct dm_header`` (``<HHI``: type, size of the whole message, trans_id), and
bitfields are packed first-field-least-significant (GCC x86). Bitfields are handled
with explicit shifts and masks, never ``ctypes`` bitfields.

:func:`decode` checks hyperv-dm.md §5 invariant 1 (size field equals the bytes given and
covers the fixed struct, ranged messages are exactly ``16 + 8·range_count`` bytes, no
message exceeds 4096 bytes, reserved bits are zero, the type is known) and raises
:class:`memhp.dm.ProtocolError` naming the struct field and the broken rule.
:func:`encode` refuses dataclasses whose fields do not fit their wire fields.

:class:`memhp.dm.AccessReport` has no kernel struct. It travels as the emulator-private
type :data:`DM_ACCESS_REPORT` (``0xff00``, far outside the DM type range 0-14) laid out
like ``dm_unballoon_request``::

    @0  dm_header  (type 0xff00, size, trans_id)
    @8  u32 kind          index into ACCESS_KINDS ("allocate" = 0, "dump" = 1)
    @12 u32 range_count
    @16 union dm_mem_page_range range_array[range_count]

It exists only between the emulator's own guest agent and host service; it never goes
to a real guest or a real Hyper-V/QEMU host.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from memhp.dm import (
    INFO_TYPE_MAX_PAGE_CNT,
    MAX_MESSAGE_SIZE,
    MAX_PAGE_CNT,
    MAX_RANGES_PER_MESSAGE,
    MAX_START_PAGE,
    AccessReport,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesReport,
    CapabilitiesResponse,
    DmMessage,
    DmType,
    HotAddRequest,
    HotAddResponse,
    InfoMessage,
    PageRange,
    ProtocolError,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionRequest,
    VersionResponse,
)

__all__ = [
    "ACCESS_KINDS",
    "DM_ACCESS_REPORT",
    "HEADER_SIZE",
    "decode",
    "encode",
    "pack_page_range",
    "unpack_page_range",
]

#: Emulator-private message type of :class:`memhp.dm.AccessReport` (never on a real channel).
DM_ACCESS_REPORT = 0xFF00
#: ``AccessReport.what`` values, by their wire code (the index).
ACCESS_KINDS: tuple[str, ...] = ("allocate", "dump")

HEADER_SIZE = 8
#: Fixed part of the ranged messages (header + two u32) before ``range_array``.
RANGED_FIXED_SIZE = 16

_HEADER = struct.Struct("<HHI")
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

# union dm_mem_page_range
_START_PAGE_BITS = 40
_START_PAGE_MASK = (1 << _START_PAGE_BITS) - 1

# union dm_caps
_CAPS_BALLOON = 1 << 0
_CAPS_HOT_ADD = 1 << 1
_CAPS_ALIGN_SHIFT = 2
_CAPS_ALIGN_MASK = 0xF
_CAPS_HOT_REMOVE = 1 << 6
_CAPS_KNOWN = _CAPS_BALLOON | _CAPS_HOT_ADD | (_CAPS_ALIGN_MASK << _CAPS_ALIGN_SHIFT)
_CAPS_KNOWN |= _CAPS_HOT_REMOVE

# dm_capabilities_resp_msg
_CAPS_RESP_ACCEPTED = 1 << 0
_CAPS_RESP_HOT_REMOVE = 1 << 1
_CAPS_RESP_SUPPRESS = 1 << 2
_CAPS_RESP_KNOWN = _CAPS_RESP_ACCEPTED | _CAPS_RESP_HOT_REMOVE | _CAPS_RESP_SUPPRESS

_MORE_PAGES = 1 << 0

# Full message formats (header included).
_VERSION_REQUEST = struct.Struct("<HHIII")  # dm_version_request, 16
_VERSION_RESPONSE = struct.Struct("<HHIQ")  # dm_version_response, 16
_CAPABILITIES = struct.Struct("<HHIQQQ")  # dm_capabilities, 32
_CAPABILITIES_RESP = struct.Struct("<HHIQ")  # dm_capabilities_resp_msg, 16
_STATUS = struct.Struct("<HHIQQQQII")  # dm_status, 48
_BALLOON = struct.Struct("<HHIII")  # dm_balloon, 16
_RANGED = struct.Struct("<HHIII")  # dm_balloon_response / dm_unballoon_request head, 16
_UNBALLOON_RESPONSE = _HEADER  # dm_unballoon_response, 8
_HOT_ADD = struct.Struct("<HHIQ")  # dm_hot_add, 16
_HOT_ADD_REGION = struct.Struct("<HHIQQ")  # dm_hot_add_with_region, 24
_HOT_ADD_RESPONSE = struct.Struct("<HHIII")  # dm_hot_add_response, 16
_INFO = struct.Struct("<HHIIIIIQ")  # dm_info_msg + dm_info_header + u64 data, 32
_INFO_HEADER_SIZE = 8
_INFO_MAX_PAGE_CNT_DATA = 8

_STRUCT_NAMES: dict[int, str] = {
    DmType.DM_VERSION_REQUEST: "dm_version_request",
    DmType.DM_VERSION_RESPONSE: "dm_version_response",
    DmType.DM_CAPABILITIES_REPORT: "dm_capabilities",
    DmType.DM_CAPABILITIES_RESPONSE: "dm_capabilities_resp_msg",
    DmType.DM_STATUS_REPORT: "dm_status",
    DmType.DM_BALLOON_REQUEST: "dm_balloon",
    DmType.DM_BALLOON_RESPONSE: "dm_balloon_response",
    DmType.DM_UNBALLOON_REQUEST: "dm_unballoon_request",
    DmType.DM_UNBALLOON_RESPONSE: "dm_unballoon_response",
    DmType.DM_MEM_HOT_ADD_REQUEST: "dm_hot_add",
    DmType.DM_MEM_HOT_ADD_RESPONSE: "dm_hot_add_response",
    DmType.DM_INFO_MESSAGE: "dm_info_msg",
    DM_ACCESS_REPORT: "dm_access_report",
}


# -- shared pieces -------------------------------------------------------------------


def _check_uint(where: str, value: int, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where} {value!r} is not an integer")
    if not 0 <= value < (1 << bits):
        raise ProtocolError(f"{where} {value} does not fit u{bits}")
    return value


def pack_page_range(r: PageRange, where: str = "page_range") -> int:
    """``union dm_mem_page_range``: start_page in bits 0-39, page_cnt in bits 40-63."""
    if not 0 <= r.start_page <= MAX_START_PAGE:
        raise ProtocolError(f"{where}.start_page {r.start_page:#x} does not fit 40 bits")
    if not 0 <= r.page_cnt <= MAX_PAGE_CNT:
        raise ProtocolError(f"{where}.page_cnt {r.page_cnt} does not fit 24 bits")
    return r.start_page | (r.page_cnt << _START_PAGE_BITS)


def unpack_page_range(value: int) -> PageRange:
    """Inverse of :func:`pack_page_range` (every u64 is a valid page range)."""
    return PageRange(value & _START_PAGE_MASK, value >> _START_PAGE_BITS)


def _check_trans_id(name: str, msg: DmMessage) -> int:
    return _check_uint(f"{name}.hdr.trans_id", msg.trans_id, 32)


def _pack_ranges(name: str, ranges: tuple[PageRange, ...]) -> tuple[int, bytes]:
    """Size of the whole ranged message and the packed ``range_array``."""
    if len(ranges) > MAX_RANGES_PER_MESSAGE:
        raise ProtocolError(
            f"{name}.range_count {len(ranges)} exceeds {MAX_RANGES_PER_MESSAGE} "
            f"(message would be {RANGED_FIXED_SIZE + 8 * len(ranges)} > "
            f"{MAX_MESSAGE_SIZE} bytes)"
        )
    words = [pack_page_range(r, f"{name}.range_array[{i}]") for i, r in enumerate(ranges)]
    return RANGED_FIXED_SIZE + 8 * len(words), struct.pack(f"<{len(words)}Q", *words)


def _unpack_ranges(data: bytes, count: int) -> tuple[PageRange, ...]:
    words = struct.unpack_from(f"<{count}Q", data, RANGED_FIXED_SIZE)
    return tuple(unpack_page_range(w) for w in words)


def _check_reserved(where: str, value: int) -> None:
    if value:
        raise ProtocolError(f"{where} must be 0, got {value:#x}")


# -- encode --------------------------------------------------------------------------


def encode(msg: DmMessage) -> bytes:
    """Pack ``msg`` into its wire bytes (header ``size`` = the returned length).

    Raises :class:`ProtocolError` if a field does not fit its wire field (more than 510
    ranges, a page range beyond 40/24 bits, ``hot_add_alignment`` > 15, an unknown
    :attr:`AccessReport.what`, an integer wider than its u32/u64).
    """
    match msg:
        case VersionRequest():
            t = DmType.DM_VERSION_REQUEST
            n = "dm_version_request"
            return _VERSION_REQUEST.pack(
                t,
                _VERSION_REQUEST.size,
                _check_trans_id(n, msg),
                _check_uint(f"{n}.version", msg.version, 32),
                int(bool(msg.is_last_attempt)),
            )
        case VersionResponse():
            n = "dm_version_response"
            return _VERSION_RESPONSE.pack(
                DmType.DM_VERSION_RESPONSE,
                _VERSION_RESPONSE.size,
                _check_trans_id(n, msg),
                int(bool(msg.is_accepted)),
            )
        case CapabilitiesReport():
            n = "dm_capabilities"
            align = msg.hot_add_alignment
            if isinstance(align, bool) or not isinstance(align, int) or not 0 <= align <= 15:
                raise ProtocolError(
                    f"{n}.caps.hot_add_alignment {align!r} does not fit 4 bits (0..15)"
                )
            caps = align << _CAPS_ALIGN_SHIFT
            caps |= _CAPS_BALLOON if msg.balloon else 0
            caps |= _CAPS_HOT_ADD if msg.hot_add else 0
            caps |= _CAPS_HOT_REMOVE if msg.hot_remove else 0
            return _CAPABILITIES.pack(
                DmType.DM_CAPABILITIES_REPORT,
                _CAPABILITIES.size,
                _check_trans_id(n, msg),
                caps,
                _check_uint(f"{n}.min_page_cnt", msg.min_page_cnt, 64),
                _check_uint(f"{n}.max_page_number", msg.max_page_number, 64),
            )
        case CapabilitiesResponse():
            n = "dm_capabilities_resp_msg"
            word = _CAPS_RESP_ACCEPTED if msg.is_accepted else 0
            word |= _CAPS_RESP_HOT_REMOVE if msg.hot_remove else 0
            word |= _CAPS_RESP_SUPPRESS if msg.suppress_pressure_reports else 0
            return _CAPABILITIES_RESP.pack(
                DmType.DM_CAPABILITIES_RESPONSE,
                _CAPABILITIES_RESP.size,
                _check_trans_id(n, msg),
                word,
            )
        case StatusReport():
            n = "dm_status"
            return _STATUS.pack(
                DmType.DM_STATUS_REPORT,
                _STATUS.size,
                _check_trans_id(n, msg),
                _check_uint(f"{n}.num_avail", msg.num_avail, 64),
                _check_uint(f"{n}.num_committed", msg.num_committed, 64),
                _check_uint(f"{n}.page_file_size", msg.page_file_size, 64),
                _check_uint(f"{n}.zero_free", msg.zero_free, 64),
                _check_uint(f"{n}.page_file_writes", msg.page_file_writes, 32),
                _check_uint(f"{n}.io_diff", msg.io_diff, 32),
            )
        case BalloonRequest():
            n = "dm_balloon"
            return _BALLOON.pack(
                DmType.DM_BALLOON_REQUEST,
                _BALLOON.size,
                _check_trans_id(n, msg),
                _check_uint(f"{n}.num_pages", msg.num_pages, 32),
                0,
            )
        case BalloonResponse():
            n = "dm_balloon_response"
            size, body = _pack_ranges(n, msg.ranges)
            word = (len(msg.ranges) << 1) | (_MORE_PAGES if msg.more_pages else 0)
            head = _RANGED.pack(DmType.DM_BALLOON_RESPONSE, size, _check_trans_id(n, msg), 0, word)
            return head + body
        case UnballoonRequest():
            n = "dm_unballoon_request"
            size, body = _pack_ranges(n, msg.ranges)
            head = _RANGED.pack(
                DmType.DM_UNBALLOON_REQUEST,
                size,
                _check_trans_id(n, msg),
                _MORE_PAGES if msg.more_pages else 0,
                len(msg.ranges),
            )
            return head + body
        case UnballoonResponse():
            n = "dm_unballoon_response"
            return _UNBALLOON_RESPONSE.pack(
                DmType.DM_UNBALLOON_RESPONSE, _UNBALLOON_RESPONSE.size, _check_trans_id(n, msg)
            )
        case HotAddRequest():
            n = "dm_hot_add"
            rng = pack_page_range(msg.range, f"{n}.range")
            if msg.region is None:
                return _HOT_ADD.pack(
                    DmType.DM_MEM_HOT_ADD_REQUEST, _HOT_ADD.size, _check_trans_id(n, msg), rng
                )
            return _HOT_ADD_REGION.pack(
                DmType.DM_MEM_HOT_ADD_REQUEST,
                _HOT_ADD_REGION.size,
                _check_trans_id(n, msg),
                rng,
                pack_page_range(msg.region, f"{n}.region"),
            )
        case HotAddResponse():
            n = "dm_hot_add_response"
            return _HOT_ADD_RESPONSE.pack(
                DmType.DM_MEM_HOT_ADD_RESPONSE,
                _HOT_ADD_RESPONSE.size,
                _check_trans_id(n, msg),
                _check_uint(f"{n}.page_count", msg.page_count, 32),
                _check_uint(f"{n}.result", msg.result, 32),
            )
        case InfoMessage():
            n = "dm_info_msg"
            return _INFO.pack(
                DmType.DM_INFO_MESSAGE,
                _INFO.size,
                _check_trans_id(n, msg),
                0,
                _INFO_HEADER_SIZE + _INFO_MAX_PAGE_CNT_DATA,
                INFO_TYPE_MAX_PAGE_CNT,
                _INFO_MAX_PAGE_CNT_DATA,
                _check_uint(f"{n}.max_page_count", msg.max_page_count, 64),
            )
        case AccessReport():
            n = "dm_access_report"
            if msg.what not in ACCESS_KINDS:
                raise ProtocolError(f"{n}.kind {msg.what!r} is not one of {ACCESS_KINDS}")
            size, body = _pack_ranges(n, msg.ranges)
            head = _RANGED.pack(
                DM_ACCESS_REPORT,
                size,
                _check_trans_id(n, msg),
                ACCESS_KINDS.index(msg.what),
                len(msg.ranges),
            )
            return head + body
    raise ProtocolError(f"cannot encode {type(msg).__name__}: no DM wire struct")


# -- decode --------------------------------------------------------------------------


def _exact(name: str, data: bytes, size: int) -> None:
    if len(data) < size:
        raise ProtocolError(f"{name}.hdr.size {len(data)} is below the struct size {size}")
    if len(data) > size:
        raise ProtocolError(
            f"{name}.hdr.size {len(data)} has {len(data) - size} trailing bytes "
            f"after the {size}-byte struct"
        )


def _ranged(name: str, data: bytes, count: int) -> None:
    need = RANGED_FIXED_SIZE + 8 * count
    if need != len(data):
        raise ProtocolError(f"{name}.range_count {count} needs {need} bytes, got {len(data)}")


def _dec_version_request(data: bytes) -> DmMessage:
    n = "dm_version_request"
    _exact(n, data, _VERSION_REQUEST.size)
    _, _, tid, version, word = _VERSION_REQUEST.unpack(data)
    _check_reserved(f"{n}.reservedz (bits 1-31 of the word @12)", word & ~1)
    return VersionRequest(tid, version, bool(word & 1))


def _dec_version_response(data: bytes) -> DmMessage:
    n = "dm_version_response"
    _exact(n, data, _VERSION_RESPONSE.size)
    _, _, tid, word = _VERSION_RESPONSE.unpack(data)
    _check_reserved(f"{n}.reservedz (bits 1-63 of the word @8)", word & ~1)
    return VersionResponse(tid, bool(word & 1))


def _dec_capabilities(data: bytes) -> DmMessage:
    n = "dm_capabilities"
    _exact(n, data, _CAPABILITIES.size)
    _, _, tid, caps, min_page_cnt, max_page_number = _CAPABILITIES.unpack(data)
    _check_reserved(f"{n}.caps.reservedz (bits 7-63)", caps & ~_CAPS_KNOWN)
    return CapabilitiesReport(
        tid,
        balloon=bool(caps & _CAPS_BALLOON),
        hot_add=bool(caps & _CAPS_HOT_ADD),
        hot_add_alignment=(caps >> _CAPS_ALIGN_SHIFT) & _CAPS_ALIGN_MASK,
        hot_remove=bool(caps & _CAPS_HOT_REMOVE),
        min_page_cnt=min_page_cnt,
        max_page_number=max_page_number,
    )


def _dec_capabilities_resp(data: bytes) -> DmMessage:
    n = "dm_capabilities_resp_msg"
    _exact(n, data, _CAPABILITIES_RESP.size)
    _, _, tid, word = _CAPABILITIES_RESP.unpack(data)
    _check_reserved(f"{n}.reservedz (bits 3-63 of the word @8)", word & ~_CAPS_RESP_KNOWN)
    return CapabilitiesResponse(
        tid,
        is_accepted=bool(word & _CAPS_RESP_ACCEPTED),
        hot_remove=bool(word & _CAPS_RESP_HOT_REMOVE),
        suppress_pressure_reports=bool(word & _CAPS_RESP_SUPPRESS),
    )


def _dec_status(data: bytes) -> DmMessage:
    _exact("dm_status", data, _STATUS.size)
    _, _, tid, avail, committed, pf_size, zero_free, pf_writes, io_diff = _STATUS.unpack(data)
    return StatusReport(tid, avail, committed, pf_size, zero_free, pf_writes, io_diff)


def _dec_balloon(data: bytes) -> DmMessage:
    n = "dm_balloon"
    _exact(n, data, _BALLOON.size)
    _, _, tid, num_pages, reserved = _BALLOON.unpack(data)
    _check_reserved(f"{n}.reservedz", reserved)
    return BalloonRequest(tid, num_pages)


def _dec_balloon_response(data: bytes) -> DmMessage:
    n = "dm_balloon_response"
    _, _, tid, reserved, word = _RANGED.unpack_from(data)
    _check_reserved(f"{n}.reservedz", reserved)
    count = word >> 1
    _ranged(n, data, count)
    return BalloonResponse(tid, bool(word & _MORE_PAGES), _unpack_ranges(data, count))


def _dec_unballoon_request(data: bytes) -> DmMessage:
    n = "dm_unballoon_request"
    _, _, tid, word, count = _RANGED.unpack_from(data)
    _check_reserved(f"{n}.reservedz (bits 1-31 of the word @8)", word & ~_MORE_PAGES)
    _ranged(n, data, count)
    return UnballoonRequest(tid, bool(word & _MORE_PAGES), _unpack_ranges(data, count))


def _dec_unballoon_response(data: bytes) -> DmMessage:
    _exact("dm_unballoon_response", data, _UNBALLOON_RESPONSE.size)
    _, _, tid = _UNBALLOON_RESPONSE.unpack(data)
    return UnballoonResponse(tid)


def _dec_hot_add(data: bytes) -> DmMessage:
    if len(data) == _HOT_ADD.size:
        _, _, tid, rng = _HOT_ADD.unpack(data)
        return HotAddRequest(tid, unpack_page_range(rng))
    if len(data) == _HOT_ADD_REGION.size:
        _, _, tid, rng, region = _HOT_ADD_REGION.unpack(data)
        return HotAddRequest(tid, unpack_page_range(rng), unpack_page_range(region))
    raise ProtocolError(
        f"dm_hot_add.hdr.size {len(data)} is neither {_HOT_ADD.size} (dm_hot_add) "
        f"nor {_HOT_ADD_REGION.size} (dm_hot_add_with_region)"
    )


def _dec_hot_add_response(data: bytes) -> DmMessage:
    _exact("dm_hot_add_response", data, _HOT_ADD_RESPONSE.size)
    _, _, tid, page_count, result = _HOT_ADD_RESPONSE.unpack(data)
    return HotAddResponse(tid, page_count, result)


def _dec_info(data: bytes) -> DmMessage:
    n = "dm_info_msg"
    _, _, tid, reserved, info_size = struct.unpack_from("<HHIII", data)
    _check_reserved(f"{n}.reserved", reserved)
    if info_size != len(data) - 16:
        raise ProtocolError(
            f"{n}.info_size {info_size} needs {16 + info_size} bytes, got {len(data)}"
        )
    if info_size < _INFO_HEADER_SIZE:
        raise ProtocolError(
            f"{n}.info_size {info_size} is below the {_INFO_HEADER_SIZE}-byte dm_info_header"
        )
    info_type, data_size = struct.unpack_from("<II", data, 16)
    if data_size != info_size - _INFO_HEADER_SIZE:
        raise ProtocolError(
            f"dm_info_header.data_size {data_size} does not match info_size {info_size} "
            f"- {_INFO_HEADER_SIZE}"
        )
    if info_type != INFO_TYPE_MAX_PAGE_CNT:
        raise ProtocolError(f"dm_info_header.type {info_type} is unknown")
    if data_size != _INFO_MAX_PAGE_CNT_DATA:
        raise ProtocolError(
            f"dm_info_header.data_size {data_size} must be {_INFO_MAX_PAGE_CNT_DATA} "
            "for INFO_TYPE_MAX_PAGE_CNT"
        )
    (max_page_count,) = struct.unpack_from("<Q", data, 24)
    return InfoMessage(tid, max_page_count)


def _dec_access_report(data: bytes) -> DmMessage:
    n = "dm_access_report"
    _, _, tid, kind, count = _RANGED.unpack_from(data)
    if kind >= len(ACCESS_KINDS):
        raise ProtocolError(f"{n}.kind {kind} is unknown (0..{len(ACCESS_KINDS) - 1})")
    _ranged(n, data, count)
    return AccessReport(tid, _unpack_ranges(data, count), ACCESS_KINDS[kind])


#: Known DM types this codec has no dataclass for.
_UNSUPPORTED_NAMES = {
    0: "DM_ERROR",
    13: "DM_MEM_HOT_REMOVE_REQUEST",
    14: "DM_MEM_HOT_REMOVE_RESPONSE",
}

#: type -> (decoder, smallest valid message size)
_DECODERS: dict[int, tuple[Callable[[bytes], DmMessage], int]] = {
    DmType.DM_VERSION_REQUEST: (_dec_version_request, _VERSION_REQUEST.size),
    DmType.DM_VERSION_RESPONSE: (_dec_version_response, _VERSION_RESPONSE.size),
    DmType.DM_CAPABILITIES_REPORT: (_dec_capabilities, _CAPABILITIES.size),
    DmType.DM_CAPABILITIES_RESPONSE: (_dec_capabilities_resp, _CAPABILITIES_RESP.size),
    DmType.DM_STATUS_REPORT: (_dec_status, _STATUS.size),
    DmType.DM_BALLOON_REQUEST: (_dec_balloon, _BALLOON.size),
    DmType.DM_BALLOON_RESPONSE: (_dec_balloon_response, RANGED_FIXED_SIZE),
    DmType.DM_UNBALLOON_REQUEST: (_dec_unballoon_request, RANGED_FIXED_SIZE),
    DmType.DM_UNBALLOON_RESPONSE: (_dec_unballoon_response, _UNBALLOON_RESPONSE.size),
    DmType.DM_MEM_HOT_ADD_REQUEST: (_dec_hot_add, _HOT_ADD.size),
    DmType.DM_MEM_HOT_ADD_RESPONSE: (_dec_hot_add_response, _HOT_ADD_RESPONSE.size),
    DmType.DM_INFO_MESSAGE: (_dec_info, 16 + _INFO_HEADER_SIZE),
    DM_ACCESS_REPORT: (_dec_access_report, RANGED_FIXED_SIZE),
}


def decode(data: bytes) -> DmMessage:
    """Unpack one whole DM message (exactly the bytes of one VMBus packet).

    Raises :class:`ProtocolError` for anything hyperv-dm.md §5 invariant 1 forbids.
    DM_ERROR (0) and the hot-remove messages (13, 14) have no dataclass and count as
    unknown types.
    """
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"dm_header truncated: needs {HEADER_SIZE} bytes, got {len(data)}")
    if len(data) > MAX_MESSAGE_SIZE:
        raise ProtocolError(
            f"dm_header.size: message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}"
        )
    msg_type, size, _ = _HEADER.unpack_from(data)
    if size != len(data):
        raise ProtocolError(f"dm_header.size {size} != {len(data)} bytes received")
    entry = _DECODERS.get(msg_type)
    if entry is None:
        name = _UNSUPPORTED_NAMES.get(msg_type)
        label = f" ({name})" if name else ""
        raise ProtocolError(f"dm_header.type {msg_type}{label} is unknown or unsupported")
    decoder, min_size = entry
    if size < min_size:
        raise ProtocolError(
            f"{_STRUCT_NAMES[msg_type]}.hdr.size {size} is below the struct size {min_size}"
        )
    return decoder(data)
