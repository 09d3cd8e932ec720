"""Feed a :class:`~memhp.view.model.Fleet` from MQTT (schema version 1).

Subscribes to ``memhp/v1/vm/+/events/+`` (every event, host and guest),
``memhp/v1/vm/+/state`` (the host's retained summary of each VM) and
``memhp/v1/vm/+/guest`` (the guest's retained document: block runs, meminfo, its
violations), or the same topics of the VMs asked for, in one SUBSCRIBE; each message
goes through :meth:`Fleet.apply_mqtt`. The retained documents arrive at once on
subscribing, so a watcher that starts late still draws every VM. A lost broker is
retried with backoff and shown as the fleet's error meanwhile.

:meth:`MqttSource.collect` is ``memhp watch --mqtt --once``: it returns when every VM
it knows of (asked for, or named by any message) has its documents (the host's
``state``; the guest's too unless the state says no guest is attached) and the
broker has sent what it holds, or after a timeout with what is still missing.

The broker URL is :mod:`memhp.mqtt`'s (``mqtt://HOST[:PORT]``), the same parser the
publishers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

import aiomqtt

from memhp import events
from memhp.logs import get_logger
from memhp.mqtt import BrokerUrl
from memhp.view.model import MQTT_PREFIX, MQTT_TOPICS, Fleet

log = get_logger("memhp.view")

#: Seconds between two connection attempts, from the first to the most.
RETRY_MIN = 0.5
RETRY_MAX = 5.0
#: ``collect``: the broker sends what it retains right after the SUBACK; this long
#: without a retained message (from the SUBACK on) and it has sent everything.
SETTLE: Final = 0.3
#: ``collect``: seconds to wait for every VM's documents at most.
WAIT: Final = 5.0
#: The documents of a VM: the host's summary and the guest's memory map.
STATE: Final = "state"
GUEST: Final = "guest"


def topics(fleet: Fleet) -> list[str]:
    """The topic filters for every VM, or for each VM the fleet is limited to."""
    if not fleet.only:
        return list(MQTT_TOPICS)
    out = []
    for vm_id in sorted(fleet.only):
        out += [
            f"{MQTT_PREFIX}/{vm_id}/events/+",
            f"{MQTT_PREFIX}/{vm_id}/state",
            f"{MQTT_PREFIX}/{vm_id}/guest",
        ]
    return out


def _payload(message: aiomqtt.Message) -> bytes | str | None:
    data = message.payload
    if isinstance(data, bytearray):
        return bytes(data)
    if isinstance(data, bytes | str):
        return data
    return None


class MqttSource:
    """See the module doc."""

    def __init__(self, fleet: Fleet, broker: BrokerUrl) -> None:
        self.fleet = fleet
        self.broker = broker
        self.received = 0
        self.last_message = 0.0
        #: When the last retained message came (monotonic; 0: none yet).
        self.last_retained = 0.0
        #: The documents received per VM (:data:`STATE`, :data:`GUEST`).
        self.documents: dict[str, set[str]] = {}
        self._connected = False
        fleet.source = str(broker)

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(self.broker.host, self.broker.port, timeout=5.0)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        await client.subscribe([(topic, 0) for topic in topics(self.fleet)])

    def _apply(self, message: aiomqtt.Message) -> None:
        payload = _payload(message)
        self.received += 1
        self.last_message = time.monotonic()
        if message.retain:
            self.last_retained = self.last_message
        if payload is None:
            self.fleet.ignored += 1
            return
        topic = str(message.topic)
        if self.fleet.apply_mqtt(topic, payload) is None:
            return
        parsed = events.parse_topic(topic)
        if parsed is not None and parsed.what in (STATE, GUEST):
            self.documents.setdefault(parsed.vm, set()).add(parsed.what)

    def missing(self) -> dict[str, tuple[str, ...]]:
        """Per VM known (asked for, or named by a message), the documents not here yet:
        the host's ``state``, and the guest's unless the state says no guest is attached."""
        out: dict[str, tuple[str, ...]] = {}
        for vm_id in sorted(set(self.fleet.only) | set(self.fleet.vms)):
            have = self.documents.get(vm_id, set())
            view = self.fleet.vms.get(vm_id)
            want = [STATE]
            if STATE not in have or (view is not None and view.attached):
                want.append(GUEST)
            lacking = tuple(doc for doc in want if doc not in have)
            if lacking:
                out[vm_id] = lacking
        return out

    async def _follow(self, on_message: Callable[[], None] | None) -> None:
        async with self._client() as client:
            await self._subscribe(client)
            self.fleet.error = ""
            self._connected = True
            async for message in client.messages:
                self._apply(message)
                if on_message is not None:
                    on_message()

    async def run(self, on_message: Callable[[], None] | None = None) -> None:
        """Follow the topics until cancelled; reconnect with backoff (from the shortest
        again after a connection that worked)."""
        delay = RETRY_MIN
        while True:
            self._connected = False
            try:
                await self._follow(on_message)
            except aiomqtt.MqttError as err:
                self.fleet.error = f"{self.broker}: {err}"
                log.debug("mqtt connection lost", error=str(err))
            if self._connected:
                delay = RETRY_MIN
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def collect(
        self, *, settle: float = SETTLE, timeout: float = WAIT
    ) -> dict[str, tuple[str, ...]]:
        """Take what the broker holds: until every VM known has its documents
        (:meth:`missing`) and no retained message came for ``settle`` seconds, at most
        ``timeout`` seconds. Returns what is still missing then (empty: everything).
        Raises ``aiomqtt.MqttError`` when the broker cannot be reached."""
        async with self._client() as client:

            async def read() -> None:
                async for message in client.messages:
                    self._apply(message)

            reader = asyncio.create_task(read())
            try:
                await self._subscribe(client)
                subscribed = time.monotonic()
                while True:
                    if reader.done():
                        reader.result()  # the connection broke: its MqttError
                        raise aiomqtt.MqttError("the broker closed the connection")
                    now = time.monotonic()
                    missing = self.missing()
                    if not missing and now - max(subscribed, self.last_retained) >= settle:
                        return {}
                    if now - subscribed >= timeout:
                        return missing
                    await asyncio.sleep(0.02)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
