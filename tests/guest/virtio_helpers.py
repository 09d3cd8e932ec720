"""A virtio-mem device and a guest wired together in memory, for the driver tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guest.drivers.virtio_mem import VirtioMem
from guest.invariants import Finding, check_guest
from guest.virtio_mem_invariants import check_virtio_mem
from guest.vm import GuestConfig, GuestVm
from hypervisor.virtio_mem_host import VirtioMemDevice
from memhp.virtio_mem import AccessReport, VirtioMemConfig, VirtioMemRequest, VirtioMemResponse

MIB = 1 << 20
GIB = 1 << 30
BS = 2 * MIB
MB = 128 * MIB  # the Linux memory block
ADDR = 4 * GIB
FIRST = ADDR // MB  # memory block id of the device start (32)
PAGES_PER_MIB = 256


@dataclass
class Rig:
    """One guest with one virtio-mem device, and a message pump between them."""

    device: VirtioMemDevice
    guest: GuestVm
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Called with each request before the device answers it (to interleave things).
    before_answer: Callable[[VirtioMemRequest], None] | None = None
    requests: list[VirtioMemRequest] = field(default_factory=list)

    @property
    def driver(self) -> VirtioMem:
        return self.guest.virtio_mem[0]

    @property
    def mm(self) -> Any:
        return self.guest.mm

    def pump(self, *, limit: float = 3600.0) -> None:
        """Deliver messages and run the guest until its driver work is done."""
        start = self.guest.now
        while True:
            self.guest.run_until(self.guest.now)
            msgs = self.guest.drain_virtio_outbox()
            for msg in msgs:
                if isinstance(msg, AccessReport):
                    self.device.check_access(msg.ranges, msg.what)
                    continue
                self.requests.append(msg)
                if self.before_answer is not None:
                    self.before_answer(msg)
                resp = self.device.request(msg, self.guest.now)
                self.guest.deliver_virtio(resp, self.device.config)
            if msgs:
                continue
            if not self.guest.busy:
                return
            deadline = self.guest.next_deadline()
            assert deadline is not None, "work pending but no timer"
            assert deadline - start <= limit, "did not settle"
            self.guest.run_until(deadline)

    def step_once(self) -> list[VirtioMemRequest | AccessReport]:
        """Run what is due now and return the messages for the device, unanswered."""
        self.guest.run_until(self.guest.now)
        return self.guest.drain_virtio_outbox()

    def answer(self, msg: VirtioMemRequest) -> VirtioMemResponse:
        resp = self.device.request(msg, self.guest.now)
        self.guest.deliver_virtio(resp, self.device.config)
        return resp

    def resize(self, size: int) -> None:
        change = self.device.resize(size, self.guest.now)
        self.guest.virtio_config_changed(change.config)
        self.pump()

    def advance(self, seconds: float) -> None:
        """Let time pass (timers fire), then settle."""
        end = self.guest.now + seconds
        while True:
            self.pump()
            deadline = self.guest.next_deadline()
            if deadline is None or deadline > end:
                break
            self.guest.run_until(deadline)
        self.guest.run_until(end)
        self.pump()

    def findings(self) -> list[Finding]:
        out = check_guest(self.mm, self.guest.hv_balloon, None)
        out += check_virtio_mem(self.mm, self.driver, self.device.plugged, self.device.plugged_size)
        out += [
            Finding(v.kind, v.pfn_start or 0, v.pfn_end or 0, v.message)
            for v in [*self.device.violations, *self.device.protocol_errors]
        ]
        return out

    def assert_clean(self) -> None:
        found = self.findings()
        assert found == [], found

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [d for k, d in self.events if k == kind]

    def state(self, block: int) -> str:
        return self.driver.block_states()[block]

    def meminfo_total_mib(self) -> int:
        total: int = self.mm.meminfo()["MemTotal"] // 1024
        return total


def rig(
    requested: int = 0,
    *,
    block_size: int = BS,
    region: int = 4 * GIB,
    boot: int = GIB,
    memory_block: int = MB,
    auto_online: str = "online_movable",
    udev_online: str | None = None,
    start: bool = True,
    **config: Any,
) -> Rig:
    device = VirtioMemDevice(
        VirtioMemConfig(block_size, 0, ADDR, region, 0, 0, requested), vm_id="g"
    )
    events: list[tuple[str, dict[str, Any]]] = []
    guest = GuestVm(
        GuestConfig(
            "g",
            boot_pages=boot >> 12,
            block_size_bytes=memory_block,
            protocol="virtio-mem",
            auto_online_blocks=auto_online,
            udev_online_type=udev_online,
            **config,
        ),
        on_event=lambda kind, data: events.append((kind, data)),
    )
    guest.attach_virtio_mem(device.config)
    r = Rig(device, guest, events)
    if start:
        guest.start()
        r.pump()
    return r
