"""Random resizes, allocations, sysfs writes and a busy device against the virtio-mem pair.

The QEMU device model and the Linux driver on the memory model run together
(``tests.guest.virtio_helpers.Rig``); after every step every invariant of both sides
must hold: the guest never uses memory the host has not plugged, the driver's view of
what is plugged is the device's, fake-offline pages are where the states say, block
states match the memory blocks, the device answers no ERROR or NACK, and the model is
consistent. Once the device stops being busy, the guest frees its allocations and onlines
its blocks, and time passes, the plugged size comes within one subblock (big block) of
what the operator asked for.
"""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from guest.mm.errors import MemoryHotplugError
from tests.guest.virtio_helpers import FIRST, GIB, MIB, Rig, rig

SB = 4 * MIB
REGION = 2 * GIB  # blocks FIRST .. FIRST + 15 (more than the 1 GiB offline threshold)


class VirtioMemSystem(RuleBasedStateMachine):
    r: Rig

    @initialize(
        mode=st.sampled_from(["sbm", "bbm-small", "bbm"]),
        auto_online=st.sampled_from(["offline", "online", "online_kernel", "online_movable"]),
        requested=st.integers(0, REGION // SB),
    )
    def boot(self, mode: str, auto_online: str, requested: int) -> None:
        block_size = 128 * MIB if mode == "bbm" else 2 * MIB
        self.r = rig(
            requested * SB if mode == "sbm" else 0,
            block_size=block_size,
            region=REGION,
            boot=256 * MIB,
            auto_online=auto_online,
            virtio_mem_force_bbm=mode == "bbm-small",
        )
        self.busy = False

    @rule(size=st.integers(0, REGION // SB))
    def resize(self, size: int) -> None:
        unit = self.r.device.block_size if not self.r.driver.in_sbm else SB
        value = size * SB // unit * unit
        self.r.resize(value)

    @rule(
        block=st.integers(FIRST, FIRST + 15),
        online_type=st.sampled_from(["online", "online_kernel", "online_movable"]),
    )
    def online(self, block: int, online_type: str) -> None:
        with contextlib.suppress(MemoryHotplugError):
            self.r.guest.online_block(block, online_type)
        self.r.pump()

    @rule(block=st.integers(FIRST, FIRST + 15))
    def offline(self, block: int) -> None:
        with contextlib.suppress(MemoryHotplugError):
            self.r.guest.offline_block(block)
        self.r.pump()

    @rule(
        mib=st.sampled_from([1, 16, 128, 512]),
        zone=st.sampled_from(["Normal", "Movable"]),
        order=st.sampled_from([0, 9]),
        tag=st.sampled_from(["a", "b"]),
    )
    def allocate(self, mib: int, zone: str, order: int, tag: str) -> None:
        self.r.guest.allocate(mib * 256, zone=zone, order=order, tag=tag)
        self.r.pump()

    @rule(tag=st.sampled_from(["a", "b"]))
    def free(self, tag: str) -> None:
        self.r.guest.free(tag)
        self.r.pump()

    @rule(busy=st.booleans())
    def device_busy(self, busy: bool) -> None:
        self.busy = busy
        if busy:
            self.r.device.inject_busy()
        else:
            self.r.device.clear_busy()

    @rule(seconds=st.sampled_from([1, 50, 300]))
    def advance(self, seconds: int) -> None:
        self.r.advance(seconds)

    @precondition(lambda self: not self.busy)
    @rule()
    def settle_and_converge(self) -> None:
        """Free everything, online every added block, wait out the timers: the target is met."""
        r = self.r
        for tag in ("a", "b"):
            r.guest.free(tag)
        for _ in range(16):
            for block in sorted(r.mm.blocks):
                if block >= FIRST and r.mm.blocks[block].state == "offline":
                    with contextlib.suppress(MemoryHotplugError):
                        r.guest.online_block(block, "online_movable")
            r.advance(600)
        d = r.driver
        unit = d.sb_size if d.in_sbm else d.bb_size
        assert not d.broken
        # Linux (un)plugs whole units: it stops less than one unit away from the target.
        assert abs(r.device.plugged_size - r.device.requested_size) < unit

    @invariant()
    def every_invariant_holds(self) -> None:
        if hasattr(self, "r"):
            self.r.assert_clean()


TestVirtioMemSystem = VirtioMemSystem.TestCase
TestVirtioMemSystem.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
