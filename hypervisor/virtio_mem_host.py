"""The virtio-mem device of one VM (QEMU ``hw/virtio/virtio-mem.c``), as a sans-I/O state machine.

:class:`VirtioMemDevice` answers the guest's requests exactly as QEMU's
``virtio_mem_handle_request`` does (mm-model.md §5.1):

* PLUG / UNPLUG (``virtio_mem_state_change_request``): ERROR unless the range is
  valid (``addr`` block-aligned, size neither 0 nor wrapping 64 bits, inside
  ``[addr, addr + usable_region_size)``); NACK for a plug past ``requested_size``;
  ERROR unless *every* block is in the opposite state; BUSY when the state change is
  inhibited (QEMU: migration running, a failed discard or preallocation; here
  :meth:`VirtioMemDevice.inject_busy`); else ACK, the blocks change state and
  ``plugged_size`` moves, with a ``size_change`` event (QEMU's size-change notifiers,
  behind QMP's ``MEMORY_DEVICE_SIZE_CHANGE``).
* UNPLUG_ALL: BUSY when something is plugged and state changes are inhibited; else
  everything is discarded, ``plugged_size`` = 0 and the usable region is resized for
  ``requested_size``, possibly shrinking (no config interrupt, as in QEMU); ACK.
* STATE: ERROR for an invalid range, else ACK with PLUGGED, UNPLUGGED or MIXED.

The host backs memory on plug and discards it on unplug: the set of plugged blocks
(:attr:`VirtioMemDevice.plugged`, PFNs) is the ground truth of what the guest may
touch. :meth:`~VirtioMemDevice.check_access` checks the guest's access reports (the
emulator-only side channel) against it: a touch of unplugged device memory is an
``unplugged-access`` violation (a read is one only with
``VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE``, which the device offers by default, as QEMU
does on x86 since 8.1; legacy guests may read unplugged memory).

A hostile guest gets protocol answers, not a reset: QEMU answers ERROR or NACK and
carries on, so the device does too, and records every refusal with its reason in
:attr:`VirtioMemDevice.protocol_errors`.

:meth:`~VirtioMemDevice.resize` is QEMU's ``requested-size`` property setter: a
multiple of the block size, at most the region size; the usable region grows to
``requested_size`` + 256 MiB (x86's ``VIRTIO_MEM_USABLE_EXTENT``) but never shrinks
here; the answer is the config-change notification (:class:`memhp.virtio_mem.ConfigChange`),
sent even when nothing changed, as QEMU does.

Nothing here does I/O or reads a clock; events collect in
:attr:`VirtioMemDevice.events` (see :meth:`~VirtioMemDevice.drain_events`):
``attach``, ``virtio_mem_request``, ``virtio_mem_response`` (with ``reason`` for a
refusal), ``size_change`` (``plugged_size``, ``requested_size``), ``resize``,
``protocol_error``, ``violation``, ``busy_injected``, ``system_reset``, ``restored``.

For the transports (the interface the gRPC side builds on): ``request(req, now)``
answers a :class:`memhp.virtio_mem.VirtioMemRequest` with a
:class:`~memhp.virtio_mem.VirtioMemResponse`; the guest should get :attr:`config` along
with every response (``plugged_size`` changes without a config interrupt and UNPLUG_ALL
may shrink the usable region: a real guest would read them from the config space).
``resize`` returns the :class:`~memhp.virtio_mem.ConfigChange` to send as the config
interrupt. ``check_access(ranges, what)`` takes the guest's
:class:`~memhp.virtio_mem.AccessReport` ranges, ``[start_pfn, end_pfn)``.
``snapshot()`` / ``restore()`` / ``from_snapshot()`` persist the plugged state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

from extents import RangeSet
from hypervisor.errors import HostCommandError
from hypervisor.events import HostEvent, ProtocolViolation
from memhp.units import PAGE_SHIFT, MiB, align_up, is_power_of_two
from memhp.virtio_mem import (
    ACK,
    BUSY,
    ERROR,
    MIXED,
    NACK,
    PLUG,
    PLUGGED,
    STATE,
    STATE_NAMES,
    UNPLUG,
    UNPLUG_ALL,
    UNPLUGGED,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    ConfigChange,
    VirtioMemConfig,
    VirtioMemRequest,
    VirtioMemResponse,
    VirtioMemRespType,
    VirtioMemState,
)

__all__ = [
    "VIRTIO_MEM_MIN_BLOCK_SIZE",
    "VIRTIO_MEM_USABLE_EXTENT",
    "RefusalKind",
    "VirtioMemDevice",
]

_U64 = (1 << 64) - 1
#: QEMU: blocks smaller than 1 MiB are refused (to keep the bitmap small).
VIRTIO_MEM_MIN_BLOCK_SIZE = 1 * MiB
#: QEMU (x86): the usable region reaches this far beyond ``requested_size``, so Linux
#: can add whole memory blocks of which it plugs only a part.
VIRTIO_MEM_USABLE_EXTENT = 2 * 128 * MiB
#: Guest physical addresses end here for the memory model (MAX_PHYSMEM_BITS 46).
MAX_PHYS_ADDR = 1 << 46


class RefusalKind(StrEnum):
    """Why the device answered ERROR or NACK (recorded; the device carries on)."""

    MISALIGNED = "virtio-mem-misaligned"
    SIZE_ZERO = "virtio-mem-size-zero"
    OVERFLOW = "virtio-mem-overflow"
    OUT_OF_RANGE = "virtio-mem-out-of-range"
    PLUG_PAST_REQUESTED = "virtio-mem-plug-past-requested"
    NOT_ALL_UNPLUGGED = "virtio-mem-plug-of-plugged"
    NOT_ALL_PLUGGED = "virtio-mem-unplug-of-unplugged"


#: The ground-truth violation of the access side channel.
UNPLUGGED_ACCESS = "unplugged-access"


def _check_bytes(field: str, value: object, *, what: str = "a size in bytes") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64:
        raise HostCommandError(field, f"must be {what} (0..2^64-1), got {value!r}")
    return value


class VirtioMemDevice:
    """One virtio-mem device: config space, request handling, plugged ground truth."""

    def __init__(
        self,
        config: VirtioMemConfig,
        *,
        vm_id: str = "",
        features: int = 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    ) -> None:
        """Realize the device (QEMU ``virtio_mem_device_realize``) from ``config``.

        ``block_size``, ``node_id``, ``addr``, ``region_size`` and ``requested_size``
        are taken from it; a fresh device has nothing plugged (``plugged_size`` must
        be 0: use :meth:`restore` for a device with state), and its usable region is
        computed as QEMU does (``usable_region_size`` of ``config`` is ignored).
        Raises :class:`HostCommandError` naming the field QEMU would refuse.
        """
        block = config.block_size
        if block < VIRTIO_MEM_MIN_BLOCK_SIZE:
            raise HostCommandError(
                "block_size", f"has to be at least {VIRTIO_MEM_MIN_BLOCK_SIZE:#x}, got {block:#x}"
            )
        if not is_power_of_two(block):
            raise HostCommandError("block_size", f"has to be a power of two, got {block:#x}")
        for field in ("requested_size", "addr", "region_size"):
            value = getattr(config, field)
            if value % block:
                raise HostCommandError(
                    field, f"has to be multiples of 'block_size' ({block:#x}), got {value:#x}"
                )
        if config.region_size == 0:
            raise HostCommandError("region_size", "must not be 0")
        if config.addr + config.region_size > MAX_PHYS_ADDR:
            raise HostCommandError(
                "region_size",
                f"the region [{config.addr:#x}, {config.end:#x}) ends beyond the "
                f"{MAX_PHYS_ADDR:#x} bytes of guest physical address space",
            )
        if config.requested_size > config.region_size:
            raise HostCommandError(
                "requested_size",
                f"cannot exceed the memory backend size ({config.region_size:#x}), "
                f"got {config.requested_size:#x}",
            )
        if config.plugged_size:
            raise HostCommandError(
                "plugged_size", "a new device has nothing plugged (restore a snapshot instead)"
            )
        self.vm_id = vm_id
        self.features = features
        self.block_size = block
        self.node_id = config.node_id
        self.addr = config.addr
        self.region_size = config.region_size
        self.requested_size = config.requested_size
        self.usable_region_size = 0
        self.plugged_size = 0
        self._plugged = RangeSet()
        self.events: list[HostEvent] = []
        #: Every ERROR and NACK, with the reason (the guest asked for something invalid).
        self.protocol_errors: list[ProtocolViolation] = []
        #: Ground-truth violations: the guest touched unplugged device memory.
        self.violations: list[ProtocolViolation] = []
        #: Requests answered, by request and response name ("plug:ack": 12).
        self.answered: dict[str, int] = {}
        self._busy_remaining = 0
        self._busy_forever = False
        self._resize_usable_region(self.requested_size, can_shrink=True)
        self._emit("attach", **self._config_data())

    # -- the config space ------------------------------------------------------

    @property
    def config(self) -> VirtioMemConfig:
        """The config space as the guest reads it now (``virtio_mem_get_config``)."""
        return VirtioMemConfig(
            block_size=self.block_size,
            node_id=self.node_id,
            addr=self.addr,
            region_size=self.region_size,
            usable_region_size=self.usable_region_size,
            plugged_size=self.plugged_size,
            requested_size=self.requested_size,
        )

    @property
    def plugged(self) -> RangeSet:
        """The plugged (host-backed) PFNs of the device region (read it, do not change it)."""
        return self._plugged

    @property
    def start_pfn(self) -> int:
        return self.addr >> PAGE_SHIFT

    @property
    def end_pfn(self) -> int:
        return (self.addr + self.region_size) >> PAGE_SHIFT

    @property
    def busy(self) -> bool:
        """Requests are answered at once: the device never has work in flight."""
        return False

    def next_deadline(self) -> float | None:
        return None

    def drain_events(self) -> list[HostEvent]:
        events, self.events = self.events, []
        return events

    # -- fault injection -----------------------------------------------------------

    def inject_busy(self, count: int | None = None) -> None:
        """The next ``count`` state changes (all until :meth:`clear_busy` if None) are inhibited.

        QEMU answers BUSY while a migration runs (``virtio_mem_is_busy``) or when a
        discard or a preallocation fails.
        """
        if count is not None and (isinstance(count, bool) or count < 1):
            raise HostCommandError("count", f"must be a positive integer or None, got {count!r}")
        self._busy_remaining = count or 0
        self._busy_forever = count is None
        self._emit("busy_injected", count=count)

    def clear_busy(self) -> None:
        self._busy_remaining = 0
        self._busy_forever = False

    def _inhibited(self) -> bool:
        if self._busy_forever:
            return True
        if self._busy_remaining:
            self._busy_remaining -= 1
            return True
        return False

    # -- requests ------------------------------------------------------------------

    def request(self, req: VirtioMemRequest, now: float) -> VirtioMemResponse:
        """Answer one guest request (``virtio_mem_handle_request``)."""
        self._emit(
            "virtio_mem_request",
            request=req.name,
            addr=req.addr,
            nb_blocks=req.nb_blocks,
            time=now,
        )
        reason: str | None = None
        if req.type in (PLUG, UNPLUG):
            resp, reason = self._state_change_request(req, plug=req.type == PLUG)
        elif req.type == UNPLUG_ALL:
            resp = self._unplug_all_request()
        else:
            assert req.type == STATE
            resp, reason = self._state_request(req)
        key = f"{req.name}:{resp.name}"
        self.answered[key] = self.answered.get(key, 0) + 1
        data: dict[str, object] = {"request": req.name, "response": resp.name}
        if req.type == STATE and resp.type == ACK:
            data["state"] = STATE_NAMES[VirtioMemState(resp.state)]
        if reason is not None:
            data["reason"] = reason
        self._emit("virtio_mem_response", **data)
        return resp

    def _valid_range(self, gpa: int, nb_blocks: int) -> tuple[RefusalKind, str] | None:
        """``virtio_mem_valid_range``: None when valid, else why not."""
        size = (nb_blocks * self.block_size) & _U64
        if gpa % self.block_size:
            return RefusalKind.MISALIGNED, (
                f"addr {gpa:#x} is not aligned to the block size {self.block_size:#x}"
            )
        if gpa + size > _U64:
            return RefusalKind.OVERFLOW, f"addr {gpa:#x} + size {size:#x} wraps 64 bits"
        if not size:
            return RefusalKind.SIZE_ZERO, "nb_blocks 0: the range is empty"
        usable_end = self.addr + self.usable_region_size
        if gpa < self.addr or gpa >= usable_end or gpa + size > usable_end:
            return RefusalKind.OUT_OF_RANGE, (
                f"[{gpa:#x}, {gpa + size:#x}) is not inside the usable region "
                f"[{self.addr:#x}, {usable_end:#x})"
            )
        return None

    def _refuse(
        self, kind: RefusalKind, message: str, gpa: int, nb_blocks: int, resp: VirtioMemRespType
    ) -> tuple[VirtioMemResponse, str]:
        start = gpa >> PAGE_SHIFT
        end = (min(gpa + nb_blocks * self.block_size, _U64)) >> PAGE_SHIFT
        violation = ProtocolViolation(str(kind), message, None, start, end)
        self.protocol_errors.append(violation)
        self._emit("protocol_error", **violation.as_data())
        return VirtioMemResponse(resp), str(kind)

    def _state_change_request(
        self, req: VirtioMemRequest, *, plug: bool
    ) -> tuple[VirtioMemResponse, str | None]:
        """``virtio_mem_state_change_request``, rule for rule in QEMU's order."""
        gpa, nb = req.addr, req.nb_blocks
        invalid = self._valid_range(gpa, nb)
        if invalid is not None:
            return self._refuse(*invalid, gpa, nb, ERROR)
        size = nb * self.block_size
        if plug and self.plugged_size + size > self.requested_size:
            return self._refuse(
                RefusalKind.PLUG_PAST_REQUESTED,
                f"plugging {size:#x} bytes onto {self.plugged_size:#x} plugged exceeds the "
                f"requested size {self.requested_size:#x}",
                gpa,
                nb,
                NACK,
            )
        start, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        if plug and not self._plugged.disjoint(start, end):
            return self._refuse(
                RefusalKind.NOT_ALL_UNPLUGGED,
                f"plug of [{gpa:#x}, {gpa + size:#x}): not every block is unplugged",
                gpa,
                nb,
                ERROR,
            )
        if not plug and not self._plugged.covers(start, end):
            return self._refuse(
                RefusalKind.NOT_ALL_PLUGGED,
                f"unplug of [{gpa:#x}, {gpa + size:#x}): not every block is plugged",
                gpa,
                nb,
                ERROR,
            )
        if self._inhibited():
            return VirtioMemResponse(BUSY), "state changes are inhibited"
        if plug:
            # The host backs the blocks before it says so.
            self._plugged.add(start, end)
            self.plugged_size += size
        else:
            # ram_block_discard_range: the memory goes back to the host.
            self._plugged.remove(start, end)
            self.plugged_size -= size
        self._size_changed()
        return VirtioMemResponse(ACK), None

    def _unplug_all_request(self) -> VirtioMemResponse:
        """``virtio_mem_unplug_all``."""
        if self.plugged_size:
            if self._inhibited():
                return VirtioMemResponse(BUSY)
            self._plugged = RangeSet()
            self.plugged_size = 0
            self._size_changed()
        self._resize_usable_region(self.requested_size, can_shrink=True)
        return VirtioMemResponse(ACK)

    def _state_request(self, req: VirtioMemRequest) -> tuple[VirtioMemResponse, str | None]:
        """``virtio_mem_state_request``."""
        invalid = self._valid_range(req.addr, req.nb_blocks)
        if invalid is not None:
            return self._refuse(*invalid, req.addr, req.nb_blocks, ERROR)
        start = req.addr >> PAGE_SHIFT
        end = (req.addr + req.nb_blocks * self.block_size) >> PAGE_SHIFT
        if self._plugged.covers(start, end):
            state = PLUGGED
        elif self._plugged.disjoint(start, end):
            state = UNPLUGGED
        else:
            state = MIXED
        return VirtioMemResponse(ACK, state), None

    def _size_changed(self) -> None:
        # QEMU: notifier_list_notify(&vmem->size_change_notifiers) -> MEMORY_DEVICE_SIZE_CHANGE.
        self._emit(
            "size_change", plugged_size=self.plugged_size, requested_size=self.requested_size
        )

    def _resize_usable_region(self, requested: int, *, can_shrink: bool) -> None:
        """``virtio_mem_resize_usable_region``."""
        new = min(self.region_size, requested + VIRTIO_MEM_USABLE_EXTENT)
        new = align_up(new, self.block_size)
        if not requested:
            new = 0
        if new < self.usable_region_size and not can_shrink:
            return
        self.usable_region_size = new

    # -- the operator -------------------------------------------------------------

    def resize(self, requested_bytes: int, now: float) -> ConfigChange:
        """QEMU's ``requested-size`` setter (``qom-set``); returns the config interrupt."""
        value = _check_bytes("requested_size", requested_bytes)
        if value % self.block_size:
            raise HostCommandError(
                "requested_size",
                f"has to be multiples of 'block_size' ({self.block_size:#x}), got {value:#x}",
            )
        if value > self.region_size:
            raise HostCommandError(
                "requested_size",
                f"cannot exceed the memory backend size ({self.region_size:#x}), got {value:#x}",
            )
        if value != self.requested_size:
            self._resize_usable_region(value, can_shrink=False)
            self.requested_size = value
        # QEMU triggers the config update even when the size did not change.
        self._emit(
            "resize",
            requested_size=self.requested_size,
            usable_region_size=self.usable_region_size,
            plugged_size=self.plugged_size,
            time=now,
        )
        return ConfigChange(self.config)

    def system_reset(self, now: float) -> None:
        """A system reset (``virtio_mem_system_reset_hold``): unplug everything if possible.

        When state changes are inhibited the memory stays plugged and the guest must
        unplug it itself (UNPLUG_ALL at probe, as Linux does when ``plugged_size`` != 0).
        """
        before = self.plugged_size
        resp = self._unplug_all_request()
        self._emit(
            "system_reset", unplugged=before - self.plugged_size, response=resp.name, time=now
        )

    # -- the access side channel -------------------------------------------------

    def check_access(
        self, ranges: Iterable[tuple[int, int]], what: str = "allocate"
    ) -> list[ProtocolViolation]:
        """Guest PFN ranges ``[start, end)`` touched; returns (and records) the violations.

        Only device memory is looked at. Without ``VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE``
        a read (``what != "allocate"``) of unplugged memory is allowed (legacy guests).
        """
        if what != "allocate" and not self.features & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE):
            return []
        found: list[ProtocolViolation] = []
        lo, hi = self.start_pfn, self.end_pfn
        for s, e in ranges:
            s, e = max(s, lo), min(e, hi)
            if s >= e:
                continue
            holes = list(self._plugged.holes(s, e))
            if not holes:
                continue
            # One violation per reported range, spanning its unplugged pages: a report
            # over fragmented memory must not become one event per hole.
            hs, he = holes[0][0], holes[-1][1]
            pages = sum(b - a for a, b in holes)
            pieces = f" in {len(holes)} pieces" if len(holes) > 1 else ""
            violation = ProtocolViolation(
                UNPLUGGED_ACCESS,
                f"guest {what} of {pages} pages of unplugged device memory in "
                f"[{hs:#x}, {he:#x}){pieces}",
                None,
                hs,
                he,
            )
            found.append(violation)
            self._emit("violation", **violation.as_data(), what=what)
        self.violations += found
        return found

    # -- snapshot ------------------------------------------------------------------

    def _config_data(self) -> dict[str, object]:
        return {
            "block_size": self.block_size,
            "node_id": self.node_id,
            "addr": self.addr,
            "region_size": self.region_size,
            "usable_region_size": self.usable_region_size,
            "plugged_size": self.plugged_size,
            "requested_size": self.requested_size,
        }

    def snapshot(self) -> dict[str, Any]:
        """JSON-friendly state that outlives the process (QEMU's migration state).

        The fixed config (checked on restore, like QEMU's migration sanity checks), the
        requested and usable sizes, and the plugged ranges as ``[start, end)`` byte
        addresses. Injected busy state and recorded errors are not part of it.
        """
        return {
            **self._config_data(),
            "plugged": [[s << PAGE_SHIFT, e << PAGE_SHIFT] for s, e in self._plugged.ranges()],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take the state of a :meth:`snapshot`; ValueError (and no change) if it does not fit."""
        for field in ("block_size", "node_id", "addr", "region_size"):
            if data.get(field) != getattr(self, field):
                raise ValueError(
                    f"{field}: the snapshot has {data.get(field)!r}, this device "
                    f"{getattr(self, field)!r}"
                )
        requested = data.get("requested_size")
        usable = data.get("usable_region_size")
        for field, value in (("requested_size", requested), ("usable_region_size", usable)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field}: must be an integer, got {value!r}")
            if value % self.block_size or not 0 <= value <= self.region_size:
                raise ValueError(
                    f"{field}: {value:#x} is not a multiple of {self.block_size:#x} "
                    f"within 0..{self.region_size:#x}"
                )
        assert isinstance(requested, int) and isinstance(usable, int)
        raw = data.get("plugged")
        if not isinstance(raw, list):
            raise ValueError(f"plugged: must be a list of [start, end) pairs, got {raw!r}")
        plugged = RangeSet()
        total = 0
        for i, pair in enumerate(raw):
            ok = (
                isinstance(pair, list | tuple)
                and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            )
            if not ok:
                raise ValueError(f"plugged[{i}]: must be a [start, end) pair, got {pair!r}")
            start, end = pair
            if start % self.block_size or end % self.block_size or start >= end:
                raise ValueError(f"plugged[{i}]: [{start:#x}, {end:#x}) is not whole blocks")
            if start < self.addr or end > self.addr + usable:
                raise ValueError(
                    f"plugged[{i}]: [{start:#x}, {end:#x}) outside the usable region "
                    f"[{self.addr:#x}, {self.addr + usable:#x})"
                )
            if not plugged.disjoint(start >> PAGE_SHIFT, end >> PAGE_SHIFT):
                raise ValueError(f"plugged[{i}]: [{start:#x}, {end:#x}) overlaps another range")
            plugged.add(start >> PAGE_SHIFT, end >> PAGE_SHIFT)
            total += end - start
        if data.get("plugged_size") != total:
            raise ValueError(
                f"plugged_size: {data.get('plugged_size')!r} but the ranges hold {total:#x} bytes"
            )
        self._plugged = plugged
        self.plugged_size = total
        self.requested_size = requested
        self.usable_region_size = usable
        self._emit("restored", plugged_size=total, requested_size=requested)

    @classmethod
    def from_snapshot(
        cls, config: VirtioMemConfig, data: Mapping[str, Any], *, vm_id: str = ""
    ) -> VirtioMemDevice:
        """A device realized from ``config`` (fixed fields) that took ``data``'s state."""
        fresh = VirtioMemConfig(
            block_size=config.block_size,
            node_id=config.node_id,
            addr=config.addr,
            region_size=config.region_size,
            usable_region_size=0,
            plugged_size=0,
            requested_size=0,
        )
        device = cls(fresh, vm_id=vm_id)
        device.restore(data)
        return device

    # -- recording -----------------------------------------------------------------

    def _emit(self, kind: str, /, **data: object) -> None:
        self.events.append(HostEvent(kind, {"vm_id": self.vm_id, **data}))
