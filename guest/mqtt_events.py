"""The guest agent's events and memory map over MQTT (``memhp guest --mqtt URL``).

:class:`GuestMqtt` is the agent's event sink: every guest event (the driver's, the
VM's, the workload's) goes out as ``memhp/v1/vm/{vm}/events/{kind}`` with source
``guest``, and marks the retained document ``memhp/v1/vm/{vm}/guest`` (one cell per
memory block, run-length encoded, meminfo, the driver's state, the checker's count)
for an update, coalesced to at most one per 200 ms and always the latest. Building
that document runs the invariant checker without host truth (what ``GetMemory``
answers without ``host_truth``); a finding that was not there in the previous
document is published as a ``violation`` event. Nothing here awaits: the guest never
waits on the broker. Without ``--mqtt`` the agent has no sink and does no MQTT work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from guest.blockmap import block_cells, run_length
from guest.invariants import check_guest
from guest.virtio_mem_invariants import check_virtio_mem
from guest.vm import GuestVm
from memhp import events
from memhp.logs import get_logger
from memhp.mqtt import CLOSE_GRACE, Coalescer, MqttPublisher

#: Seconds between two guest documents, at least.
GUEST_INTERVAL: Final = 0.2

log = get_logger("guest.mqtt")


def guest_document(
    vm: GuestVm,
    *,
    violations: int,
    mqtt: Mapping[str, int],
    timestamp: float | None = None,
) -> dict[str, Any]:
    """The retained ``guest`` document (``memhp/schema/guest.json``)."""
    mm = vm.mm
    return {
        "version": events.VERSION,
        "timestamp": time.time() if timestamp is None else timestamp,
        "vm": vm.config.vm_id,
        "block_size_bytes": mm.geometry.block_size_bytes,
        "blocks": [list(run) for run in run_length(block_cells(mm))],
        "meminfo": mm.meminfo(),
        "strategy": vm.config.strategy,
        "driver_mode": vm.config.driver_mode,
        "dm_state": vm.hv_balloon.state if vm.hv_balloon is not None else "",
        "violations": violations,
        "mqtt": dict(mqtt),
    }


class GuestMqtt:
    """Publishes one guest's events and memory map (see the module doc)."""

    def __init__(
        self,
        vm_id: str,
        publisher: MqttPublisher,
        get_vm: Callable[[], GuestVm | None],
        *,
        interval: float = GUEST_INTERVAL,
    ) -> None:
        events.check_vm_level(vm_id)
        self.vm_id = vm_id
        self.publisher = publisher
        self._get_vm = get_vm
        self._coalescer = Coalescer(interval, self._flush)
        #: The checker's findings in the last document: (invariant, start_pfn, end_pfn).
        self._known: set[tuple[str, int, int]] = set()

    def on_event(self, kind: str, data: Mapping[str, Any]) -> None:
        """One guest event (the agent calls this for every one it keeps).

        Called in line with the driver and the model: whatever goes wrong here is
        logged and never reaches them.
        """
        try:
            self.publisher.offer_event(self.vm_id, kind, data)
            self._coalescer.mark()
        except Exception:
            log.exception("mqtt_event_failed", kind=kind)

    def state_changed(self) -> None:
        """The model changed without an event (a sysfs write): refresh the document."""
        self._coalescer.mark()

    def _flush(self) -> None:
        vm = self._get_vm()
        if vm is None:
            return  # not attached yet: no layout, no memory map
        findings = check_guest(vm.mm, vm.hv_balloon, None, None)
        for driver in vm.virtio_mem:
            findings += check_virtio_mem(vm.mm, driver)
        known: set[tuple[str, int, int]] = set()
        for f in findings:
            key = (f.invariant, f.start_pfn, f.end_pfn)
            known.add(key)
            if key not in self._known:
                self.publisher.offer_event(
                    self.vm_id,
                    "violation",
                    {
                        "invariant": f.invariant,
                        "start_pfn": f.start_pfn,
                        "end_pfn": f.end_pfn,
                        "message": f.message,
                    },
                )
        self._known = known
        doc = guest_document(vm, violations=len(findings), mqtt=self.publisher.stats())
        self.publisher.offer(events.guest_topic(self.vm_id), events.encode(doc), retain=True)

    async def aclose(self, grace: float = CLOSE_GRACE) -> None:
        """Publish the last document, flush for ``grace`` seconds and disconnect."""
        self._coalescer.flush_now()
        await self.publisher.aclose(grace)
        log.info("mqtt_stopped", **self.publisher.stats())
