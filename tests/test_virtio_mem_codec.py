"""memhp.virtio_mem: the 24-byte request, 10-byte response and config space, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memhp.virtio_mem import (
    CONFIG_SIZE,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    VIRTIO_ID_MEM,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VirtioMemConfig,
    VirtioMemProtocolError,
    VirtioMemReqType,
    VirtioMemRequest,
    VirtioMemResponse,
    VirtioMemRespType,
    VirtioMemState,
    decode_config,
    decode_request,
    decode_response,
    encode_config,
    encode_request,
    encode_response,
)


def hx(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_uapi_constants() -> None:
    assert VIRTIO_ID_MEM == 24
    assert (REQUEST_SIZE, RESPONSE_SIZE, CONFIG_SIZE) == (24, 10, 56)
    assert [int(t) for t in VirtioMemReqType] == [0, 1, 2, 3]
    assert [int(t) for t in VirtioMemRespType] == [0, 1, 2, 3]
    assert [int(s) for s in VirtioMemState] == [0, 1, 2]
    assert (
        VIRTIO_MEM_F_ACPI_PXM,
        VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
        VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    ) == (0, 1, 2)


GOLDEN_REQUESTS = [
    # PLUG 64 blocks at 5 GiB
    (
        VirtioMemRequest.plug(0x1_4000_0000, 64),
        "0000 000000000000 0000004001000000 4000 000000000000",
    ),
    # UNPLUG one block at 0x1_0020_0000
    (
        VirtioMemRequest.unplug(0x1_0020_0000, 1),
        "0100 000000000000 0000200001000000 0100 000000000000",
    ),
    (VirtioMemRequest.unplug_all(), "0200 000000000000 0000000000000000 0000 000000000000"),
    # STATE of 0xffff blocks at the top of the 64-bit space
    (
        VirtioMemRequest.state(0xFFFF_FFFF_FFE0_0000, 0xFFFF),
        "0300 000000000000 0000e0ffffffffff ffff 000000000000",
    ),
]


@pytest.mark.parametrize(("req", "golden"), GOLDEN_REQUESTS)
def test_request_golden_bytes(req: VirtioMemRequest, golden: str) -> None:
    data = encode_request(req)
    assert data == hx(golden)
    assert len(data) == 24
    assert decode_request(data) == req


GOLDEN_RESPONSES = [
    (VirtioMemResponse(VirtioMemRespType.VIRTIO_MEM_RESP_ACK), "0000 000000000000 0000"),
    (VirtioMemResponse(VirtioMemRespType.VIRTIO_MEM_RESP_NACK), "0100 000000000000 0000"),
    (VirtioMemResponse(VirtioMemRespType.VIRTIO_MEM_RESP_BUSY), "0200 000000000000 0000"),
    (VirtioMemResponse(VirtioMemRespType.VIRTIO_MEM_RESP_ERROR), "0300 000000000000 0000"),
    (
        VirtioMemResponse(
            VirtioMemRespType.VIRTIO_MEM_RESP_ACK, VirtioMemState.VIRTIO_MEM_STATE_UNPLUGGED
        ),
        "0000 000000000000 0100",
    ),
    (
        VirtioMemResponse(
            VirtioMemRespType.VIRTIO_MEM_RESP_ACK, VirtioMemState.VIRTIO_MEM_STATE_MIXED
        ),
        "0000 000000000000 0200",
    ),
]


@pytest.mark.parametrize(("resp", "golden"), GOLDEN_RESPONSES)
def test_response_golden_bytes(resp: VirtioMemResponse, golden: str) -> None:
    data = encode_response(resp)
    assert data == hx(golden)
    assert len(data) == 10
    assert decode_response(data) == resp


def test_config_golden_bytes() -> None:
    config = VirtioMemConfig(
        block_size=2 << 20,
        node_id=1,
        addr=0x1_4000_0000,
        region_size=4 << 30,
        usable_region_size=(1 << 30) + (256 << 20),
        plugged_size=512 << 20,
        requested_size=1 << 30,
    )
    golden = hx(
        "0000200000000000"  # block_size 2 MiB
        "0100 000000000000"  # node_id 1, padding[6]
        "0000004001000000"  # addr 5 GiB
        "0000000001000000"  # region_size 4 GiB
        "0000005000000000"  # usable_region_size 1.25 GiB
        "0000002000000000"  # plugged_size 512 MiB
        "0000004000000000"  # requested_size 1 GiB
    )
    assert encode_config(config) == golden
    assert decode_config(golden) == config
    assert config.end == 0x2_4000_0000


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (hx("0400 000000000000 0000000000000000 0000 000000000000"), "unknown request type 4"),
        (hx("0000 010000000000 0000000000000000 0000 000000000000"), "virtio_mem_req.padding"),
        (hx("0000 000000000000 0000000000000000 0000 000000000100"), "virtio_mem_req.u.padding"),
        (bytes(23), "23 bytes, the struct has 24"),
    ],
)
def test_decode_request_refuses(data: bytes, message: str) -> None:
    with pytest.raises(VirtioMemProtocolError, match=message):
        decode_request(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (hx("0400 000000000000 0000"), "unknown response type 4"),
        (hx("0000 000000000100 0000"), "virtio_mem_resp.padding"),
        (hx("0000 000000000000 0300"), "virtio_mem_resp.state: 3"),
        (bytes(11), "11 bytes, the struct has 10"),
    ],
)
def test_decode_response_refuses(data: bytes, message: str) -> None:
    with pytest.raises(VirtioMemProtocolError, match=message):
        decode_response(data)


def test_decode_config_refuses_padding_and_size() -> None:
    good = encode_config(VirtioMemConfig(2 << 20, 0, 0, 0, 0, 0, 0))
    bad = good[:10] + b"\x01" + good[11:]
    with pytest.raises(VirtioMemProtocolError, match=r"virtio_mem_config\.padding"):
        decode_config(bad)
    with pytest.raises(VirtioMemProtocolError, match="55 bytes"):
        decode_config(good[:-1])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: VirtioMemRequest.plug(-1, 1), "virtio_mem_req.addr"),
        (lambda: VirtioMemRequest.plug(1 << 64, 1), "virtio_mem_req.addr"),
        (lambda: VirtioMemRequest.plug(0, 1 << 16), "virtio_mem_req.nb_blocks"),
        (lambda: VirtioMemRequest(7, 0, 0), "unknown request"),  # type: ignore[arg-type]
        (lambda: VirtioMemResponse(VirtioMemRespType.VIRTIO_MEM_RESP_ACK, 5), "state: 5"),
        (lambda: VirtioMemConfig(2 << 20, 1 << 16, 0, 0, 0, 0, 0), "node_id"),
        (lambda: VirtioMemConfig(2 << 20, 0, 0, 0, 0, 0, -1), "requested_size"),
    ],
)
def test_values_that_do_not_fit_their_fields(make: object, message: str) -> None:
    with pytest.raises(VirtioMemProtocolError, match=message):
        make()  # type: ignore[operator]


@given(
    st.sampled_from(list(VirtioMemReqType)),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 16) - 1),
)
def test_request_round_trip(req_type: VirtioMemReqType, addr: int, nb_blocks: int) -> None:
    req = VirtioMemRequest(req_type, addr, nb_blocks)
    assert decode_request(encode_request(req)) == req


@given(st.lists(st.integers(0, (1 << 64) - 1), min_size=6, max_size=6), st.integers(0, 0xFFFF))
def test_config_round_trip(values: list[int], node_id: int) -> None:
    block, addr, region, usable, plugged, requested = values
    config = VirtioMemConfig(block, node_id, addr, region, usable, plugged, requested)
    assert decode_config(encode_config(config)) == config
