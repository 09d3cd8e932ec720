"""Byte-exact DM codec (memhp/codec.py).

The golden bytes here are written by hand from the layouts of hyperv-dm.md §1.4-1.5
(literal hex or ``struct.pack`` with the documented formats), not from the codec's
own constants.
"""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memhp.codec import ACCESS_KINDS, DM_ACCESS_REPORT, decode, encode
from memhp.dm import (
    AccessReport,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesReport,
    CapabilitiesResponse,
    DmMessage,
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

U64_MAX = (1 << 64) - 1


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def raw_range(start_page: int, page_cnt: int) -> PageRange:
    """A PageRange that skips ``__post_init__`` (to reach the encoder's own checks)."""
    r = object.__new__(PageRange)
    object.__setattr__(r, "start_page", start_page)
    object.__setattr__(r, "page_cnt", page_cnt)
    return r


def check_golden(msg: DmMessage, wire: bytes) -> None:
    assert encode(msg) == wire
    assert decode(wire) == msg
    assert struct.unpack_from("<H", wire, 2)[0] == len(wire)


# -- golden bytes ----------------------------------------------------------------------


def test_version_request_2_0() -> None:
    check_golden(
        VersionRequest(1, version=0x0002_0000, is_last_attempt=False),
        h("0100 1000 01000000 0000 0200 00000000"),
    )


def test_version_request_0_3_last_attempt() -> None:
    # minor u16 @8 = 3, major u16 @10 = 0, bit0 of the u32 @12.
    check_golden(
        VersionRequest(0x1234_5678, version=0x0000_0003, is_last_attempt=True),
        h("0100 1000 78563412 0300 0000 01000000"),
    )


def test_version_request_1_0() -> None:
    check_golden(VersionRequest(2, version=0x0001_0000), h("0100 1000 02000000 0000 0100 00000000"))


@pytest.mark.parametrize(("accepted", "word"), [(True, "0100000000000000"), (False, "00" * 8)])
def test_version_response(accepted: bool, word: str) -> None:
    check_golden(VersionResponse(7, is_accepted=accepted), h("0200 1000 07000000" + word))


@pytest.mark.parametrize(
    ("alignment", "caps_byte"),
    [
        (7, 0x1F),  # 1 | 2 | 7 << 2 (128 MiB blocks)
        (11, 0x2F),  # 1 | 2 | 11 << 2 (2 GiB blocks)
        (0, 0x03),
        (15, 0x3F),
    ],
)
def test_capabilities_report_linux(alignment: int, caps_byte: int) -> None:
    msg = CapabilitiesReport(3, balloon=True, hot_add=True, hot_add_alignment=alignment)
    wire = (
        h("0300 2000 03000000")
        + bytes([caps_byte])
        + bytes(7)
        + bytes(8)  # min_page_cnt 0
        + b"\xff" * 8  # max_page_number all ones
    )
    check_golden(msg, wire)


def test_capabilities_report_bits() -> None:
    msg = CapabilitiesReport(
        9,
        balloon=False,
        hot_add=True,
        hot_add_alignment=11,
        hot_remove=True,
        min_page_cnt=0x1122,
        max_page_number=0x0102_0304_0506_0708,
    )
    caps = (1 << 1) | (11 << 2) | (1 << 6)
    assert caps == 0x6E
    wire = struct.pack("<HHIQQQ", 3, 32, 9, caps, 0x1122, 0x0102_0304_0506_0708)
    check_golden(msg, wire)
    # balloon only, alignment 0
    check_golden(
        CapabilitiesReport(10, balloon=True, hot_add=False, hot_add_alignment=0),
        struct.pack("<HHIQQQ", 3, 32, 10, 1, 0, U64_MAX),
    )


@pytest.mark.parametrize(
    ("accepted", "hot_remove", "suppress", "word"),
    [
        (True, True, True, 0x07),  # QEMU with status-report=off
        (True, True, False, 0x03),  # QEMU default
        (True, False, False, 0x01),
        (False, False, False, 0x00),
        (False, False, True, 0x04),
    ],
)
def test_capabilities_response(accepted: bool, hot_remove: bool, suppress: bool, word: int) -> None:
    check_golden(
        CapabilitiesResponse(
            5, is_accepted=accepted, hot_remove=hot_remove, suppress_pressure_reports=suppress
        ),
        h("0400 1000 05000000") + bytes([word]) + bytes(7),
    )


def test_status_report() -> None:
    msg = StatusReport(
        11,
        num_avail=0x1_0000_0001,
        num_committed=0x2_0000_0002,
        page_file_size=3,
        zero_free=4,
        page_file_writes=5,
        io_diff=0xFFFF_FFFF,
    )
    wire = (
        h("0500 3000 0b000000")
        + h("0100000001000000")
        + h("0200000002000000")
        + h("0300000000000000")
        + h("0400000000000000")
        + h("05000000")
        + h("ffffffff")
    )
    assert len(wire) == 48
    check_golden(msg, wire)


def test_balloon_request() -> None:
    # QEMU's largest request, 585,728 = 0x8f000 pages.
    check_golden(BalloonRequest(2, num_pages=585_728), h("0600 1000 02000000 00f00800 00000000"))


def test_balloon_response_small() -> None:
    msg = BalloonResponse(
        4, more_pages=False, ranges=(PageRange(0x200, 512), PageRange(0x12_3456_7800, 1))
    )
    wire = (
        h("0700 2000 04000000")
        + h("00000000")  # reservedz
        + h("04000000")  # more_pages 0, range_count 2 << 1
        + h("0002000000000200")  # start 0x200, cnt 0x200
        + h("0078563412010000")  # start 0x12_3456_7800, cnt 1
    )
    check_golden(msg, wire)


def test_balloon_response_empty_last() -> None:
    check_golden(
        BalloonResponse(4, more_pages=False, ranges=()), h("0700 1000 04000000 00000000 00000000")
    )


def test_balloon_response_510_ranges_more_pages() -> None:
    # 16 + 8 * 510 = 4096: exactly one receive buffer (Linux's own cap).
    ranges = tuple(PageRange(0x10_0000 + 512 * i, 512) for i in range(510))
    msg = BalloonResponse(0xDEAD_BEEF, more_pages=True, ranges=ranges)
    wire = struct.pack("<HHIII", 7, 4096, 0xDEAD_BEEF, 0, (510 << 1) | 1)
    wire += b"".join(struct.pack("<Q", (512 << 40) | (0x10_0000 + 512 * i)) for i in range(510))
    assert len(wire) == 4096
    assert wire[2:4] == h("0010")
    assert wire[12:16] == h("fd030000")
    check_golden(msg, wire)


def test_unballoon_request_bit_placement() -> None:
    ranges = (PageRange(0x4_0000, 0x8_0000), PageRange(0x100, 16))
    unb = UnballoonRequest(6, more_pages=True, ranges=ranges)
    unb_wire = (
        h("0800 2000 06000000")
        + h("01000000")  # more_pages in bit0 of the word @8
        + h("02000000")  # plain u32 range_count @12
        + h("0000040000000008")
        + h("0001000000100000")
    )
    check_golden(unb, unb_wire)
    # The balloon response with the same content puts both in the word @12.
    bal_wire = encode(BalloonResponse(6, more_pages=True, ranges=ranges))
    assert bal_wire[8:16] == h("00000000 05000000")
    assert bal_wire[16:] == unb_wire[16:]
    assert bal_wire[8:16] != unb_wire[8:16]


def test_unballoon_request_last_empty() -> None:
    check_golden(
        UnballoonRequest(1, more_pages=False, ranges=()), h("0800 1000 01000000 00000000 00000000")
    )


def test_unballoon_response() -> None:
    check_golden(UnballoonResponse(0x0102_0304), h("0900 0800 04030201"))


def test_hot_add_linux_16_byte_form() -> None:
    msg = HotAddRequest(3, range=PageRange(0x10_0000, 0x8000))
    check_golden(msg, h("0a00 1000 03000000 0000100000008000"))


def test_hot_add_qemu_24_byte_form() -> None:
    r = PageRange(0x14_0000, 0x8_0000)  # 2 GiB at 5 GiB
    msg = HotAddRequest(8, range=r, region=r)
    check_golden(msg, h("0a00 1800 08000000 0000140000000008 0000140000000008"))


def test_hot_add_region_differs_from_range() -> None:
    msg = HotAddRequest(8, range=PageRange(0x10_0000, 100), region=PageRange(0x10_0000, 0x8000))
    wire = struct.pack("<HHIQQ", 10, 24, 8, (100 << 40) | 0x10_0000, (0x8000 << 40) | 0x10_0000)
    check_golden(msg, wire)


def test_hot_add_24_byte_zero_region_is_not_none() -> None:
    msg = decode(struct.pack("<HHIQQ", 10, 24, 1, (1 << 40) | 5, 0))
    assert msg == HotAddRequest(1, PageRange(5, 1), PageRange(0, 0))


@pytest.mark.parametrize(("page_count", "result"), [(0x8000, 1), (0, 1), (0, 0)])
def test_hot_add_response(page_count: int, result: int) -> None:
    check_golden(
        HotAddResponse(12, page_count=page_count, result=result),
        struct.pack("<HHIII", 11, 16, 12, page_count, result),
    )
    assert encode(HotAddResponse(12, 0x8000, 1)) == h("0b00 1000 0c000000 00800000 01000000")


def test_info_message_max_page_cnt() -> None:
    msg = InfoMessage(2, max_page_count=0x40_0000)
    wire = (
        h("0c00 2000 02000000")
        + h("00000000")  # reserved
        + h("10000000")  # info_size = 8 (dm_info_header) + 8 (u64)
        + h("00000000")  # dm_info_header.type = INFO_TYPE_MAX_PAGE_CNT
        + h("08000000")  # dm_info_header.data_size
        + h("0000400000000000")
    )
    check_golden(msg, wire)


def test_access_report_private_type() -> None:
    assert DM_ACCESS_REPORT == 0xFF00
    assert ACCESS_KINDS[0] == "allocate"
    msg = AccessReport(5, ranges=(PageRange(0x1000, 3),), what="allocate")
    check_golden(msg, h("00ff 1800 05000000 00000000 01000000 0010000000030000"))
    dump = AccessReport(6, ranges=(), what="dump")
    check_golden(dump, h("00ff 1000 06000000 01000000 00000000"))


@pytest.mark.parametrize(
    ("start", "cnt", "word"),
    [
        ((1 << 40) - 1, (1 << 24) - 1, "ffffffffffffffff"),
        ((1 << 40) - 1, 0, "ffffffffff000000"),
        (0, (1 << 24) - 1, "0000000000ffffff"),
        (0, 1, "0000000000010000"),
        (1, 0, "0100000000000000"),
        (1 << 39, 1 << 23, "0000000080000080"),
    ],
)
def test_page_range_bit_packing(start: int, cnt: int, word: str) -> None:
    msg = HotAddRequest(1, PageRange(start, cnt))
    check_golden(msg, h("0a00 1000 01000000") + h(word))


# -- round trips -----------------------------------------------------------------------

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, U64_MAX)
page_ranges = st.builds(PageRange, st.integers(0, (1 << 40) - 1), st.integers(0, (1 << 24) - 1))
range_tuples = st.lists(page_ranges, max_size=510).map(tuple)

messages: st.SearchStrategy[DmMessage] = st.one_of(
    st.builds(VersionRequest, u32, u32, st.booleans()),
    st.builds(VersionResponse, u32, st.booleans()),
    st.builds(
        CapabilitiesReport,
        u32,
        st.booleans(),
        st.booleans(),
        st.integers(0, 15),
        st.booleans(),
        u64,
        u64,
    ),
    st.builds(CapabilitiesResponse, u32, st.booleans(), st.booleans(), st.booleans()),
    st.builds(StatusReport, u32, u64, u64, u64, u64, u32, u32),
    st.builds(BalloonRequest, u32, u32),
    st.builds(BalloonResponse, u32, st.booleans(), range_tuples),
    st.builds(UnballoonRequest, u32, st.booleans(), range_tuples),
    st.builds(UnballoonResponse, u32),
    st.builds(HotAddRequest, u32, page_ranges, st.none() | page_ranges),
    st.builds(HotAddResponse, u32, u32, u32),
    st.builds(InfoMessage, u32, u64),
    st.builds(AccessReport, u32, range_tuples, st.sampled_from(ACCESS_KINDS)),
)


@settings(max_examples=400)
@given(messages)
def test_round_trip(msg: DmMessage) -> None:
    wire = encode(msg)
    assert len(wire) <= 4096
    assert struct.unpack_from("<H", wire, 2)[0] == len(wire)
    assert decode(wire) == msg
    assert encode(decode(wire)) == wire


@pytest.mark.parametrize(
    "msg",
    [
        VersionRequest(0, 0),
        VersionResponse(0, False),
        CapabilitiesReport(0, False, False, 0),
        CapabilitiesResponse(0, False),
        StatusReport(0, 0, 0),
        BalloonRequest(0, 0),
        BalloonResponse(0, False, ()),
        UnballoonRequest(0, False, ()),
        UnballoonResponse(0),
        HotAddRequest(0, PageRange(0, 0)),
        HotAddRequest(0, PageRange(0, 0), PageRange(0, 0)),
        HotAddResponse(0, 0, 0),
        InfoMessage(0, 0),
        AccessReport(0, ()),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip_each_type_minimal(msg: DmMessage) -> None:
    assert decode(encode(msg)) == msg


TYPES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0xFF00]


@settings(max_examples=1000)
@given(st.sampled_from(TYPES), st.binary(max_size=64), u32)
def test_decode_is_canonical_or_rejects(msg_type: int, body: bytes, tid: int) -> None:
    """Any accepted byte string re-encodes to itself; anything else is a ProtocolError."""
    wire = struct.pack("<HHI", msg_type, 8 + len(body), tid) + body
    try:
        msg = decode(wire)
    except ProtocolError:
        return
    assert encode(msg) == wire


# -- decode rejections -----------------------------------------------------------------

VREQ = h("0100 1000 01000000 0000 0200 00000000")


def rejects(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode(wire)


def test_reject_size_field_too_large() -> None:
    bad = VREQ[:2] + struct.pack("<H", 17) + VREQ[4:]
    rejects(bad, "dm_header.size 17 != 16 bytes received")


def test_reject_size_field_too_small() -> None:
    bad = VREQ[:2] + struct.pack("<H", 8) + VREQ[4:]
    rejects(bad, "dm_header.size 8 != 16 bytes received")


@pytest.mark.parametrize("n", range(8))
def test_reject_truncated_header(n: int) -> None:
    rejects(VREQ[:n], f"dm_header truncated: needs 8 bytes, got {n}")


def test_reject_truncated_packet() -> None:
    # Size field still says 16, only 12 bytes arrived.
    rejects(VREQ[:12], "dm_header.size 16 != 12 bytes received")


@pytest.mark.parametrize(
    ("msg_type", "name", "fixed"),
    [
        (1, "dm_version_request", 16),
        (2, "dm_version_response", 16),
        (3, "dm_capabilities", 32),
        (4, "dm_capabilities_resp_msg", 16),
        (5, "dm_status", 48),
        (6, "dm_balloon", 16),
        (7, "dm_balloon_response", 16),
        (8, "dm_unballoon_request", 16),
        (10, "dm_hot_add", 16),
        (11, "dm_hot_add_response", 16),
        (12, "dm_info_msg", 24),
        (0xFF00, "dm_access_report", 16),
    ],
)
def test_reject_below_struct_size(msg_type: int, name: str, fixed: int) -> None:
    size = fixed - 4
    wire = struct.pack("<HHI", msg_type, size, 1) + bytes(size - 8)
    rejects(wire, f"{name}.hdr.size {size} is below the struct size {fixed}")


@pytest.mark.parametrize(
    ("msg", "name"),
    [
        (VersionRequest(1, 0x20000), "dm_version_request"),
        (VersionResponse(1, True), "dm_version_response"),
        (CapabilitiesReport(1, True, True, 7), "dm_capabilities"),
        (CapabilitiesResponse(1, True), "dm_capabilities_resp_msg"),
        (StatusReport(1, 2, 3), "dm_status"),
        (BalloonRequest(1, 5), "dm_balloon"),
        (UnballoonResponse(1), "dm_unballoon_response"),
        (HotAddResponse(1, 2, 1), "dm_hot_add_response"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_reject_trailing_bytes(msg: DmMessage, name: str) -> None:
    wire = encode(msg) + bytes(8)
    wire = wire[:2] + struct.pack("<H", len(wire)) + wire[4:]
    rejects(wire, f"{name}.hdr.size {len(wire)} has 8 trailing bytes")


def test_reject_hot_add_other_size() -> None:
    wire = struct.pack("<HHIQI", 10, 20, 1, 1 << 40, 0)
    rejects(wire, "dm_hot_add.hdr.size 20 is neither 16 (dm_hot_add) nor 24")
    wire = struct.pack("<HHIQQQ", 10, 32, 1, 1 << 40, 1 << 40, 0)
    rejects(wire, "dm_hot_add.hdr.size 32 is neither")


def test_reject_balloon_response_range_count_mismatch() -> None:
    wire = struct.pack("<HHIII", 7, 32, 1, 0, 3 << 1) + bytes(16)
    rejects(wire, "dm_balloon_response.range_count 3 needs 40 bytes, got 32")
    wire = struct.pack("<HHIII", 7, 32, 1, 0, (1 << 1) | 1) + bytes(16)
    rejects(wire, "dm_balloon_response.range_count 1 needs 24 bytes, got 32")


def test_reject_balloon_response_huge_range_count() -> None:
    wire = struct.pack("<HHIII", 7, 24, 1, 0, 0xFFFF_FFFE) + bytes(8)
    rejects(wire, f"dm_balloon_response.range_count {0x7FFF_FFFF} needs")


def test_reject_unballoon_request_range_count_mismatch() -> None:
    wire = struct.pack("<HHIII", 8, 24, 1, 0, 2) + bytes(8)
    rejects(wire, "dm_unballoon_request.range_count 2 needs 32 bytes, got 24")
    # The balloon response's placement (count << 1 in the word @12) read as an unballoon.
    wire = struct.pack("<HHIII", 8, 24, 1, 0, 1 << 1) + bytes(8)
    rejects(wire, "dm_unballoon_request.range_count 2 needs 32 bytes, got 24")


def test_reject_access_report_range_count_mismatch() -> None:
    wire = struct.pack("<HHIII", 0xFF00, 16, 1, 0, 1)
    rejects(wire, "dm_access_report.range_count 1 needs 24 bytes, got 16")


def test_reject_over_4096_bytes() -> None:
    wire = struct.pack("<HHIII", 7, 4104, 1, 0, 511 << 1) + bytes(8 * 511)
    assert len(wire) == 4104
    rejects(wire, "dm_header.size: message of 4104 bytes exceeds 4096")
    rejects(bytes(5000), "message of 5000 bytes exceeds 4096")


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            struct.pack("<HHIII", 1, 16, 1, 0x20000, 0b10),
            "dm_version_request.reservedz (bits 1-31 of the word @12) must be 0, got 0x2",
        ),
        (
            struct.pack("<HHIII", 1, 16, 1, 0x20000, 0x8000_0001),
            "dm_version_request.reservedz (bits 1-31 of the word @12) must be 0, got 0x80000000",
        ),
        (
            struct.pack("<HHIQ", 2, 16, 1, 1 << 63 | 1),
            "dm_version_response.reservedz (bits 1-63 of the word @8) must be 0",
        ),
        (
            struct.pack("<HHIQQQ", 3, 32, 1, 0x1F | 1 << 7, 0, U64_MAX),
            "dm_capabilities.caps.reservedz (bits 7-63) must be 0, got 0x80",
        ),
        (
            struct.pack("<HHIQ", 4, 16, 1, 0b1001),
            "dm_capabilities_resp_msg.reservedz (bits 3-63 of the word @8) must be 0, got 0x8",
        ),
        (
            struct.pack("<HHIII", 6, 16, 1, 10, 1),
            "dm_balloon.reservedz must be 0, got 0x1",
        ),
        (
            struct.pack("<HHIII", 7, 16, 1, 4, 0),
            "dm_balloon_response.reservedz must be 0, got 0x4",
        ),
        (
            struct.pack("<HHIII", 8, 16, 1, 0b11, 0),
            "dm_unballoon_request.reservedz (bits 1-31 of the word @8) must be 0, got 0x2",
        ),
        (
            struct.pack("<HHIIIIIQ", 12, 32, 1, 9, 16, 0, 8, 5),
            "dm_info_msg.reserved must be 0, got 0x9",
        ),
    ],
)
def test_reject_nonzero_reserved(wire: bytes, message: str) -> None:
    rejects(wire, message)


@pytest.mark.parametrize(
    ("msg_type", "label"),
    [
        (0, "dm_header.type 0 (DM_ERROR) is unknown or unsupported"),
        (13, "dm_header.type 13 (DM_MEM_HOT_REMOVE_REQUEST) is unknown or unsupported"),
        (14, "dm_header.type 14 (DM_MEM_HOT_REMOVE_RESPONSE) is unknown or unsupported"),
        (15, "dm_header.type 15 is unknown or unsupported"),
        (0xFF01, "dm_header.type 65281 is unknown or unsupported"),
        (0xFFFF, "dm_header.type 65535 is unknown or unsupported"),
    ],
)
def test_reject_unknown_type(msg_type: int, label: str) -> None:
    rejects(struct.pack("<HHIII", msg_type, 16, 1, 0, 0), label)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            struct.pack("<HHIIIIIQ", 12, 32, 1, 0, 24, 0, 8, 5),
            "dm_info_msg.info_size 24 needs 40 bytes, got 32",
        ),
        (
            struct.pack("<HHIIIIIQ", 12, 32, 1, 0, 16, 0, 4, 5),
            "dm_info_header.data_size 4 does not match info_size 16",
        ),
        (
            struct.pack("<HHIIIIIQ", 12, 32, 1, 0, 16, 1, 8, 5),
            "dm_info_header.type 1 is unknown",
        ),
        (
            struct.pack("<HHIIIII", 12, 28, 1, 0, 12, 0, 4) + bytes(4),
            "dm_info_header.data_size 4 must be 8 for INFO_TYPE_MAX_PAGE_CNT",
        ),
        (
            struct.pack("<HHIIIII", 12, 24, 1, 0, 8, 0, 0),
            "dm_info_header.data_size 0 must be 8",
        ),
    ],
)
def test_reject_bad_info(wire: bytes, message: str) -> None:
    rejects(wire, message)


def test_reject_unknown_access_kind() -> None:
    rejects(
        struct.pack("<HHIII", 0xFF00, 16, 1, len(ACCESS_KINDS), 0),
        f"dm_access_report.kind {len(ACCESS_KINDS)} is unknown",
    )


# -- encode refusals -------------------------------------------------------------------


def refuses(msg: DmMessage, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        encode(msg)


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (BalloonResponse, "dm_balloon_response"),
        (UnballoonRequest, "dm_unballoon_request"),
    ],
)
def test_refuse_511_ranges(cls: type[BalloonResponse] | type[UnballoonRequest], name: str) -> None:
    ranges = tuple(PageRange(i, 1) for i in range(511))
    refuses(cls(1, True, ranges), f"{name}.range_count 511 exceeds 510 (message would be 4104")
    assert len(encode(cls(1, True, ranges[:510]))) == 4096
    assert len(encode(cls(1, True, ranges[:509]))) == 4088


def test_refuse_511_ranges_access_report() -> None:
    ranges = tuple(PageRange(i, 1) for i in range(511))
    refuses(AccessReport(1, ranges), "dm_access_report.range_count 511 exceeds 510")


def test_refuse_page_cnt_over_24_bits() -> None:
    refuses(
        BalloonResponse(1, False, (PageRange(0, 1), raw_range(0, 1 << 24))),
        "dm_balloon_response.range_array[1].page_cnt 16777216 does not fit 24 bits",
    )
    refuses(HotAddRequest(1, raw_range(0, 1 << 24)), "dm_hot_add.range.page_cnt 16777216")


def test_refuse_start_page_over_40_bits() -> None:
    refuses(
        UnballoonRequest(1, False, (raw_range(1 << 40, 1),)),
        "dm_unballoon_request.range_array[0].start_page 0x10000000000 does not fit 40 bits",
    )
    refuses(
        HotAddRequest(1, PageRange(0, 1), raw_range(1 << 40, 0)),
        "dm_hot_add.region.start_page 0x10000000000",
    )
    refuses(HotAddRequest(1, raw_range(-1, 0)), "dm_hot_add.range.start_page")


@pytest.mark.parametrize("alignment", [16, 255, -1])
def test_refuse_hot_add_alignment(alignment: int) -> None:
    refuses(
        CapabilitiesReport(1, True, True, alignment),
        f"dm_capabilities.caps.hot_add_alignment {alignment} does not fit 4 bits",
    )


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (VersionRequest(1 << 32, 0x20000), "dm_version_request.hdr.trans_id 4294967296"),
        (VersionRequest(-1, 0x20000), "dm_version_request.hdr.trans_id -1 does not fit u32"),
        (VersionRequest(1, 1 << 32), "dm_version_request.version 4294967296 does not fit u32"),
        (BalloonRequest(1, -5), "dm_balloon.num_pages -5 does not fit u32"),
        (HotAddResponse(1, 1 << 32, 1), "dm_hot_add_response.page_count"),
        (HotAddResponse(1, 0, -1), "dm_hot_add_response.result -1"),
        (StatusReport(1, 1 << 64, 0), "dm_status.num_avail"),
        (StatusReport(1, 0, 0, io_diff=1 << 32), "dm_status.io_diff"),
        (CapabilitiesReport(1, True, True, 7, max_page_number=1 << 64), "max_page_number"),
        (InfoMessage(1, -1), "dm_info_msg.max_page_count -1 does not fit u64"),
        (UnballoonResponse(1 << 40), "dm_unballoon_response.hdr.trans_id"),
        (AccessReport(1, (), what="bogus"), "dm_access_report.kind 'bogus' is not one of"),
        (DmMessage(1), "cannot encode DmMessage"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_refuse_unencodable_fields(msg: DmMessage, message: str) -> None:
    refuses(msg, message)
