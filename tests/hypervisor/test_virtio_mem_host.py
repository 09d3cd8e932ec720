"""hypervisor.virtio_mem_host.VirtioMemDevice: QEMU's rules, a hostile guest, resize, snapshots."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hypervisor.errors import HostCommandError
from hypervisor.virtio_mem_host import (
    VIRTIO_MEM_USABLE_EXTENT,
    RefusalKind,
    VirtioMemDevice,
)
from memhp.virtio_mem import (
    ACK,
    BUSY,
    ERROR,
    MIXED,
    NACK,
    PLUGGED,
    UNPLUGGED,
    ConfigChange,
    VirtioMemConfig,
    VirtioMemRequest,
    VirtioMemResponse,
)

MIB = 1 << 20
GIB = 1 << 30
BS = 2 * MIB
ADDR = 4 * GIB
REGION = 4 * GIB


def device(
    requested: int = GIB, *, block: int = BS, region: int = REGION, **kw: Any
) -> VirtioMemDevice:
    return VirtioMemDevice(
        VirtioMemConfig(block, 0, ADDR, region, 0, 0, requested), vm_id="g", **kw
    )


def plug(d: VirtioMemDevice, offset: int, blocks: int = 1) -> VirtioMemResponse:
    return d.request(VirtioMemRequest.plug(ADDR + offset, blocks), 0.0)


def unplug(d: VirtioMemDevice, offset: int, blocks: int = 1) -> VirtioMemResponse:
    return d.request(VirtioMemRequest.unplug(ADDR + offset, blocks), 0.0)


def kinds(d: VirtioMemDevice) -> list[str]:
    return [v.kind for v in d.protocol_errors]


# -- realize ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        (VirtioMemConfig(512 << 10, 0, ADDR, REGION, 0, 0, 0), "block_size", "at least 0x100000"),
        (VirtioMemConfig(3 * MIB, 0, ADDR, REGION, 0, 0, 0), "block_size", "power of two"),
        (VirtioMemConfig(BS, 0, ADDR + MIB, REGION, 0, 0, 0), "addr", "multiples of 'block_size'"),
        (VirtioMemConfig(BS, 0, ADDR, REGION + MIB, 0, 0, 0), "region_size", "multiples"),
        (VirtioMemConfig(BS, 0, ADDR, REGION, 0, 0, MIB), "requested_size", "multiples"),
        (VirtioMemConfig(BS, 0, ADDR, REGION, 0, 0, 2 * REGION), "requested_size", "cannot exceed"),
        (VirtioMemConfig(BS, 0, ADDR, 0, 0, 0, 0), "region_size", "must not be 0"),
        (VirtioMemConfig(BS, 0, ADDR, REGION, 0, BS, 0), "plugged_size", "nothing plugged"),
        (VirtioMemConfig(BS, 0, 1 << 46, REGION, 0, 0, 0), "region_size", "address space"),
    ],
)
def test_realize_refuses_what_qemu_refuses(
    config: VirtioMemConfig, field: str, message: str
) -> None:
    with pytest.raises(HostCommandError, match=message) as info:
        VirtioMemDevice(config)
    assert info.value.field == field


def test_config_space_of_a_new_device() -> None:
    d = device(GIB)
    assert d.config == VirtioMemConfig(
        block_size=BS,
        node_id=0,
        addr=ADDR,
        region_size=REGION,
        usable_region_size=GIB + VIRTIO_MEM_USABLE_EXTENT,
        plugged_size=0,
        requested_size=GIB,
    )
    assert not d.plugged
    assert d.drain_events()[0].kind == "attach"


@pytest.mark.parametrize(
    ("requested", "block", "region", "usable"),
    [
        (0, BS, REGION, 0),  # nothing requested: nothing usable
        (GIB, BS, REGION, GIB + 256 * MIB),  # requested + 256 MiB
        (REGION - 128 * MIB, BS, REGION, REGION),  # clamped to the region
        (GIB, GIB, 4 * GIB, 2 * GIB),  # 1.25 GiB rounded up to the block size
    ],
)
def test_usable_region_size(requested: int, block: int, region: int, usable: int) -> None:
    assert device(requested, block=block, region=region).usable_region_size == usable


# -- plug and unplug ----------------------------------------------------------------------


def test_plug_backs_memory_and_reports_the_size_change() -> None:
    d = device(GIB)
    d.drain_events()
    assert plug(d, 0, 64) == VirtioMemResponse(ACK)
    assert d.plugged_size == 128 * MIB
    assert list(d.plugged.ranges()) == [(ADDR >> 12, (ADDR + 128 * MIB) >> 12)]
    assert d.config.plugged_size == 128 * MIB
    events = [(e.kind, e.data) for e in d.drain_events()]
    assert [k for k, _ in events] == ["virtio_mem_request", "size_change", "virtio_mem_response"]
    assert events[1][1] == {"vm_id": "g", "plugged_size": 128 * MIB, "requested_size": GIB}
    assert events[2][1]["response"] == "ack"
    assert d.answered == {"plug:ack": 1}


def test_unplug_discards_memory() -> None:
    d = device(GIB)
    plug(d, 0, 4)
    assert unplug(d, 2 * BS, 2) == VirtioMemResponse(ACK)
    assert d.plugged_size == 2 * BS
    assert list(d.plugged.ranges()) == [(ADDR >> 12, (ADDR + 2 * BS) >> 12)]
    assert d.protocol_errors == []


@pytest.mark.parametrize(
    ("req", "kind"),
    [
        (VirtioMemRequest.plug(ADDR + MIB, 1), RefusalKind.MISALIGNED),
        (VirtioMemRequest.plug(ADDR, 0), RefusalKind.SIZE_ZERO),
        (VirtioMemRequest.plug((1 << 64) - BS, 2), RefusalKind.OVERFLOW),
        (VirtioMemRequest.plug(ADDR - BS, 1), RefusalKind.OUT_OF_RANGE),  # below the region
        (VirtioMemRequest.plug(ADDR - BS, 2), RefusalKind.OUT_OF_RANGE),  # straddles the start
        # the usable region is 1.25 GiB: a plug that reaches past it
        (VirtioMemRequest.plug(ADDR + GIB + 255 * MIB - MIB, 2), RefusalKind.OUT_OF_RANGE),
        (VirtioMemRequest.plug(ADDR + GIB + 256 * MIB, 1), RefusalKind.OUT_OF_RANGE),
        (VirtioMemRequest.unplug(ADDR + REGION, 1), RefusalKind.OUT_OF_RANGE),
        (VirtioMemRequest.state(ADDR + 3, 1), RefusalKind.MISALIGNED),
        (VirtioMemRequest.state(ADDR + 2 * GIB, 1), RefusalKind.OUT_OF_RANGE),
    ],
)
def test_invalid_ranges_answer_error(req: VirtioMemRequest, kind: RefusalKind) -> None:
    d = device(GIB)
    assert d.request(req, 0.0) == VirtioMemResponse(ERROR)
    assert kinds(d) == [kind]
    assert d.plugged_size == 0
    # A protocol answer, not a reset: the device serves the next request.
    assert plug(d, 0) == VirtioMemResponse(ACK)


def test_misaligned_overflow_and_zero_are_checked_in_qemus_order() -> None:
    d = device(GIB)
    # Misaligned and empty: QEMU tests the alignment first.
    assert d.request(VirtioMemRequest.plug(ADDR + 1, 0), 0.0) == VirtioMemResponse(ERROR)
    assert kinds(d) == [RefusalKind.MISALIGNED]


def test_plug_past_requested_size_is_nacked() -> None:
    d = device(8 * BS)
    assert plug(d, 0, 6) == VirtioMemResponse(ACK)
    assert plug(d, 6 * BS, 3) == VirtioMemResponse(NACK)
    assert kinds(d) == [RefusalKind.PLUG_PAST_REQUESTED]
    assert d.plugged_size == 6 * BS
    assert plug(d, 6 * BS, 2) == VirtioMemResponse(ACK)
    assert d.plugged_size == d.requested_size


def test_nack_comes_before_the_state_check() -> None:
    d = device(2 * BS)
    plug(d, 0, 2)
    # Plugging plugged blocks past the requested size: NACK, not ERROR (QEMU's order).
    assert plug(d, 0, 1) == VirtioMemResponse(NACK)
    # An invalid range still is ERROR first.
    assert plug(d, 1, 1) == VirtioMemResponse(ERROR)
    assert kinds(d) == [RefusalKind.PLUG_PAST_REQUESTED, RefusalKind.MISALIGNED]


def test_every_block_must_be_in_the_opposite_state() -> None:
    d = device(GIB)
    plug(d, BS)
    assert plug(d, 0, 2) == VirtioMemResponse(ERROR)  # block 1 is plugged already
    assert unplug(d, BS, 2) == VirtioMemResponse(ERROR)  # block 2 is not plugged
    assert unplug(d, 0) == VirtioMemResponse(ERROR)
    assert kinds(d) == [
        RefusalKind.NOT_ALL_UNPLUGGED,
        RefusalKind.NOT_ALL_PLUGGED,
        RefusalKind.NOT_ALL_PLUGGED,
    ]
    assert d.plugged_size == BS
    assert all(v.pfn_start is not None for v in d.protocol_errors)


def test_busy_when_state_changes_are_inhibited() -> None:
    d = device(GIB)
    d.inject_busy(count=1)
    assert plug(d, 0) == VirtioMemResponse(BUSY)
    assert d.plugged_size == 0
    assert plug(d, 0) == VirtioMemResponse(ACK)
    d.inject_busy()
    assert unplug(d, 0) == VirtioMemResponse(BUSY)
    assert plug(d, BS) == VirtioMemResponse(BUSY)
    # Validation comes first: a bad request is still ERROR while busy.
    assert unplug(d, BS) == VirtioMemResponse(ERROR)
    d.clear_busy()
    assert unplug(d, 0) == VirtioMemResponse(ACK)
    assert d.answered == {
        "plug:busy": 2,
        "plug:ack": 1,
        "unplug:busy": 1,
        "unplug:error": 1,
        "unplug:ack": 1,
    }
    # BUSY is no refusal of the guest's request: only the ERROR is recorded.
    assert kinds(d) == [RefusalKind.NOT_ALL_PLUGGED]


def test_inject_busy_refuses_a_bad_count() -> None:
    with pytest.raises(HostCommandError, match="positive integer"):
        device().inject_busy(0)


# -- unplug all and state -----------------------------------------------------------------


def test_unplug_all_resets_and_shrinks_the_usable_region() -> None:
    d = device(GIB)
    plug(d, 0, 100)
    d.resize(BS, 1.0)
    # A smaller requested size does not shrink the usable region ...
    assert d.usable_region_size == GIB + 256 * MIB
    d.drain_events()
    assert d.request(VirtioMemRequest.unplug_all(), 2.0) == VirtioMemResponse(ACK)
    # ... UNPLUG_ALL does.
    assert d.plugged_size == 0 and not d.plugged
    assert d.usable_region_size == BS + 256 * MIB
    assert [e.kind for e in d.drain_events()] == [
        "virtio_mem_request",
        "size_change",
        "virtio_mem_response",
    ]


def test_unplug_all_is_busy_only_when_something_is_plugged() -> None:
    d = device(GIB)
    d.inject_busy()
    assert d.request(VirtioMemRequest.unplug_all(), 0.0) == VirtioMemResponse(ACK)
    d.clear_busy()
    plug(d, 0)
    d.inject_busy()
    assert d.request(VirtioMemRequest.unplug_all(), 0.0) == VirtioMemResponse(BUSY)
    assert d.plugged_size == BS


def test_state_request() -> None:
    d = device(GIB)
    plug(d, BS, 2)
    state = VirtioMemRequest.state
    assert d.request(state(ADDR + BS, 2), 0.0) == VirtioMemResponse(ACK, PLUGGED)
    assert d.request(state(ADDR + 3 * BS, 5), 0.0) == VirtioMemResponse(ACK, UNPLUGGED)
    assert d.request(state(ADDR, 3), 0.0) == VirtioMemResponse(ACK, MIXED)
    assert d.request(state(ADDR, 0), 0.0) == VirtioMemResponse(ERROR)
    responses = [e.data for e in d.drain_events() if e.kind == "virtio_mem_response"]
    assert [r.get("state") for r in responses][-4:] == ["plugged", "unplugged", "mixed", None]


# -- resize -------------------------------------------------------------------------------


def test_resize_notifies_and_grows_the_usable_region() -> None:
    d = device(0)
    assert d.usable_region_size == 0
    change = d.resize(2 * GIB, 5.0)
    assert isinstance(change, ConfigChange)
    assert change.config == d.config
    assert change.config.requested_size == 2 * GIB
    assert change.config.usable_region_size == 2 * GIB + 256 * MIB
    events = [e for e in d.drain_events() if e.kind == "resize"]
    assert events[0].data == {
        "vm_id": "g",
        "requested_size": 2 * GIB,
        "usable_region_size": 2 * GIB + 256 * MIB,
        "plugged_size": 0,
        "time": 5.0,
    }
    # The same size again still notifies (QEMU triggers the update anyway).
    assert d.resize(2 * GIB, 6.0).config == change.config
    assert [e.kind for e in d.drain_events()] == ["resize"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (MIB, "multiples of 'block_size'"),
        (REGION + BS, "cannot exceed the memory backend size"),
        (-BS, "a size in bytes"),
        (True, "a size in bytes"),
        ("1G", "a size in bytes"),
    ],
)
def test_resize_refuses(value: Any, message: str) -> None:
    d = device(GIB)
    with pytest.raises(HostCommandError, match=message) as info:
        d.resize(value, 0.0)
    assert info.value.field == "requested_size"
    assert d.requested_size == GIB


def test_a_smaller_request_makes_plugging_nack() -> None:
    d = device(GIB)
    plug(d, 0, 8)
    d.resize(4 * BS, 0.0)
    assert plug(d, 8 * BS) == VirtioMemResponse(NACK)
    assert unplug(d, 4 * BS, 4) == VirtioMemResponse(ACK)
    assert d.plugged_size == d.requested_size


def test_system_reset_unplugs_everything_unless_busy() -> None:
    d = device(GIB)
    plug(d, 0, 4)
    d.inject_busy()
    d.system_reset(1.0)
    assert d.plugged_size == 4 * BS
    d.clear_busy()
    d.system_reset(2.0)
    assert d.plugged_size == 0
    assert [e.data["unplugged"] for e in d.drain_events() if e.kind == "system_reset"] == [
        0,
        4 * BS,
    ]


# -- the access side channel ----------------------------------------------------------------


def test_touching_unplugged_device_memory_is_a_violation() -> None:
    d = device(GIB)
    plug(d, 0, 2)
    first = ADDR >> 12
    assert d.check_access([(first, first + 1024)]) == []  # plugged
    assert d.check_access([(0, 1024)]) == []  # boot memory: not the device's
    found = d.check_access([(first + 512, first + 2048)], "allocate")
    assert [(v.kind, v.pfn_start, v.pfn_end) for v in found] == [
        ("unplugged-access", first + 1024, first + 2048)
    ]
    assert d.violations == found
    assert [e.kind for e in d.drain_events()][-1] == "violation"


def test_reads_of_unplugged_memory_need_unplugged_inaccessible() -> None:
    legacy = device(GIB, features=0)
    first = ADDR >> 12
    assert legacy.check_access([(first, first + 1)], "dump") == []
    assert len(legacy.check_access([(first, first + 1)], "allocate")) == 1
    assert len(device(GIB).check_access([(first, first + 1)], "dump")) == 1


# -- snapshot -------------------------------------------------------------------------------


def test_snapshot_and_restore() -> None:
    d = device(GIB)
    plug(d, 0, 3)
    plug(d, 10 * BS, 1)
    d.resize(512 * MIB, 0.0)
    snap = d.snapshot()
    assert snap == {
        "block_size": BS,
        "node_id": 0,
        "addr": ADDR,
        "region_size": REGION,
        "usable_region_size": GIB + 256 * MIB,
        "plugged_size": 4 * BS,
        "requested_size": 512 * MIB,
        "plugged": [[ADDR, ADDR + 3 * BS], [ADDR + 10 * BS, ADDR + 11 * BS]],
    }
    again = VirtioMemDevice.from_snapshot(d.config, snap, vm_id="g")
    assert again.config == d.config
    assert again.plugged == d.plugged
    assert again.snapshot() == snap
    assert unplug(again, 10 * BS) == VirtioMemResponse(ACK)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"addr": ADDR + BS}, "addr: the snapshot has"),
        ({"block_size": 4 * MIB}, "block_size"),
        ({"requested_size": MIB}, "requested_size"),
        ({"usable_region_size": 2 * REGION}, "usable_region_size"),
        ({"plugged": "all"}, "list of"),
        ({"plugged": [[ADDR, ADDR + MIB]]}, "not whole blocks"),
        ({"plugged": [[ADDR + 2 * GIB, ADDR + 2 * GIB + BS]]}, "outside the usable region"),
        ({"plugged": [[ADDR, ADDR + 2 * BS], [ADDR + BS, ADDR + 3 * BS]]}, "overlaps"),
        ({"plugged_size": 0}, "plugged_size"),
    ],
)
def test_restore_refuses_a_snapshot_that_does_not_fit(change: dict[str, Any], message: str) -> None:
    d = device(GIB)
    plug(d, 0, 2)
    snap = {**d.snapshot(), **change}
    fresh = device(GIB)
    with pytest.raises(ValueError, match=message):
        fresh.restore(snap)
    assert fresh.plugged_size == 0 and not fresh.plugged


# -- a hostile guest, at random -------------------------------------------------------------

NB = 64  # blocks in the small region of the state machine
SMALL = NB * BS


class HostileGuest(RuleBasedStateMachine):
    """Random (often invalid) requests and resizes against an independent reference model."""

    def __init__(self) -> None:
        super().__init__()
        self.dev = VirtioMemDevice(VirtioMemConfig(BS, 0, ADDR, SMALL, 0, 0, 16 * BS))
        self.blocks = [False] * NB
        self.requested = 16 * BS
        self.usable = min(SMALL, 16 * BS + VIRTIO_MEM_USABLE_EXTENT)
        self.busy = False
        self.errors = 0

    def _expected(self, plug: bool, index: int, nb: int, aligned: bool) -> VirtioMemResponse:
        size = nb * BS
        if not aligned or nb == 0 or index < 0 or index + nb > self.usable // BS:
            return VirtioMemResponse(ERROR)
        if plug and sum(self.blocks) * BS + size > self.requested:
            return VirtioMemResponse(NACK)
        if any(self.blocks[index + i] == plug for i in range(nb)):
            return VirtioMemResponse(ERROR)
        if self.busy:
            return VirtioMemResponse(BUSY)
        for i in range(nb):
            self.blocks[index + i] = plug
        return VirtioMemResponse(ACK)

    @rule(
        plug=st.booleans(),
        index=st.integers(-4, NB + 4),
        nb=st.integers(0, 12),
        aligned=st.booleans(),
    )
    def state_change(self, plug: bool, index: int, nb: int, aligned: bool) -> None:
        addr = ADDR + index * BS + (0 if aligned else MIB)
        make = VirtioMemRequest.plug if plug else VirtioMemRequest.unplug
        expected = self._expected(plug, index, nb, aligned)
        got = self.dev.request(make(addr, nb), 0.0)
        assert got == expected
        if got.type in (ERROR, NACK):
            self.errors += 1

    @rule()
    def unplug_all(self) -> None:
        got = self.dev.request(VirtioMemRequest.unplug_all(), 0.0)
        if self.busy and any(self.blocks):
            assert got == VirtioMemResponse(BUSY)
            return
        assert got == VirtioMemResponse(ACK)
        self.blocks = [False] * NB
        self.usable = min(SMALL, self.requested + VIRTIO_MEM_USABLE_EXTENT) if self.requested else 0

    @rule(blocks=st.integers(0, NB))
    def resize(self, blocks: int) -> None:
        change = self.dev.resize(blocks * BS, 0.0)
        if blocks * BS != self.requested:
            grown = min(SMALL, blocks * BS + VIRTIO_MEM_USABLE_EXTENT) if blocks else 0
            self.usable = max(self.usable, grown)
            self.requested = blocks * BS
        assert change.config.requested_size == self.requested

    @rule(busy=st.booleans())
    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        if busy:
            self.dev.inject_busy()
        else:
            self.dev.clear_busy()

    @rule()
    def restore_from_snapshot(self) -> None:
        self.dev = VirtioMemDevice.from_snapshot(self.dev.config, self.dev.snapshot())
        self.busy = False

    @invariant()
    def matches_the_reference(self) -> None:
        d = self.dev
        assert d.plugged_size == sum(self.blocks) * BS == len(d.plugged) << 12
        for i, plugged in enumerate(self.blocks):
            pfn = (ADDR + i * BS) >> 12
            assert (pfn in d.plugged) == plugged
        assert d.usable_region_size == self.usable
        assert d.usable_region_size % BS == 0 and d.usable_region_size <= SMALL
        assert all(
            d.addr >> 12 <= s and e <= (d.addr + d.usable_region_size) >> 12
            for s, e in d.plugged.ranges()
        )


TestHostileGuest = HostileGuest.TestCase
TestHostileGuest.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_an_access_over_fragmented_memory_is_one_violation_per_reported_range() -> None:
    d = device(GIB)
    for i in range(0, 64, 2):
        plug(d, i * BS)  # every other block plugged: 32 holes
    d.drain_events()
    first = ADDR >> 12
    span = 64 * BS >> 12
    (found,) = d.check_access([(first, first + span)], "allocate")
    assert (found.kind, found.pfn_start, found.pfn_end) == (
        "unplugged-access",
        first + (BS >> 12),
        first + span,
    )
    assert "32 pieces" in found.message and f"{32 * (BS >> 12)} pages" in found.message
    assert [e.kind for e in d.drain_events()] == ["violation"]
