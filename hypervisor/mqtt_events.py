"""The hypervisor's events and per-VM state over MQTT (``memhp hypervisor --mqtt URL``).

:class:`HostMqtt` is a sink on the :class:`~hypervisor.runtime.EventHub`, not a
watcher subscription: the hub cuts a slow watcher off, and here the publisher's own
bounded queue is the only bound (a full queue drops and counts, see
:mod:`memhp.mqtt`). Every host event goes out as ``memhp/v1/vm/{vm}/events/{kind}``
and marks its VM for the retained summary ``memhp/v1/vm/{vm}/state``, which goes out
coalesced: at most one per VM per 100 ms, always the latest. Nothing here awaits; the
protocol never waits on the broker.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from hypervisor.runtime import Hypervisor, PublishedEvent, VmHandle
from memhp import events
from memhp.logs import get_logger
from memhp.mqtt import CLOSE_GRACE, Coalescer, MqttPublisher
from memhp.units import PAGE_SHIFT

#: Seconds between two state documents of one VM, at least.
STATE_INTERVAL: Final = 0.1

log = get_logger("hypervisor.mqtt")


def state_document(
    handle: VmHandle, mqtt: Mapping[str, int], *, timestamp: float | None = None
) -> dict[str, Any]:
    """The retained ``state`` document of one VM (``memhp/schema/state.json``)."""
    s = handle.session
    txn = s.in_flight
    device = handle.device
    return {
        "version": events.VERSION,
        "timestamp": time.time() if timestamp is None else timestamp,
        "vm": handle.vm_id,
        "attached": handle.attached,
        "dm_state": "" if device is not None else s.state,
        "requested_bytes": (s.target_pages or 0) << PAGE_SHIFT,
        "actual_bytes": s.current_pages << PAGE_SHIFT,
        "committed_bytes": (s.committed_pages or 0) << PAGE_SHIFT,
        "available_bytes": (s.available_pages or 0) << PAGE_SHIFT,
        "ballooned_bytes": len(s.ballooned) << PAGE_SHIFT,
        "busy": s.busy,
        "in_flight": None
        if txn is None
        else {"kind": txn.kind, "trans_id": txn.trans_id, "pages": txn.pages},
        "regions": s.region_count,
        "backed_bytes": s.hot_add_backed_pages << PAGE_SHIFT,
        "guest_address": handle.guest_address,
        "mqtt": dict(mqtt),
        "virtio_mem": None
        if device is None
        else {
            "requested_bytes": device.requested_size,
            "plugged_bytes": device.plugged_size,
            "block_size_bytes": device.block_size,
            "region_size_bytes": device.region_size,
            "usable_region_size_bytes": device.usable_region_size,
            "addr": device.addr,
            "node_id": device.node_id,
        },
    }


class HostMqtt:
    """Publishes the hub's events and each VM's state summary (see the module doc)."""

    def __init__(
        self, hv: Hypervisor, publisher: MqttPublisher, *, interval: float = STATE_INTERVAL
    ) -> None:
        self.hv = hv
        self.publisher = publisher
        self._dirty: set[str] = set()
        self._coalescer = Coalescer(interval, self._flush)

    def start(self) -> None:
        """Take every event from now on and publish every VM's state (the publisher's
        own task, :meth:`MqttPublisher.start`, is the caller's to start)."""
        self.hv.events.add_sink(self.on_event)
        self._dirty.update(self.hv.vms)
        if self._dirty:
            self._coalescer.mark()

    def on_event(self, event: PublishedEvent) -> None:
        self.publisher.offer_event(
            event.vm_id, event.kind, event.payload, timestamp=event.timestamp
        )
        self._dirty.add(event.vm_id)
        self._coalescer.mark()

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        stats = self.publisher.stats()
        for vm_id in sorted(dirty):
            handle = self.hv.vms.get(vm_id)
            if handle is None:
                continue  # no such VM (any more): its last document stays
            doc = state_document(handle, stats)
            self.publisher.offer(events.state_topic(vm_id), events.encode(doc), retain=True)

    async def aclose(self, grace: float = CLOSE_GRACE) -> None:
        """Stop taking events, publish the last state of every VM, flush and disconnect."""
        self.hv.events.remove_sink(self.on_event)
        self._dirty.update(self.hv.vms)
        self._coalescer.flush_now()
        await self.publisher.aclose(grace)
        log.info("mqtt_stopped", **self.publisher.stats())
