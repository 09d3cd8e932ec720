"""Feed a :class:`~memhp.view.model.Fleet` from MQTT (schema version 1).

Subscribes to ``memhp/v1/vm/+/events/+`` (every event, host and guest),
``memhp/v1/vm/+/state`` (the host's retained summary of each VM) and
``memhp/v1/vm/+/guest`` (the guest's retained document: block runs, meminfo, its
violations), or the same topics of the VMs asked for; each message goes through
:meth:`Fleet.apply_mqtt`. The retained documents arrive at once on subscribing, so a
watcher that starts late still draws every VM. A lost broker is retried with backoff
and shown as the fleet's error meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt

from memhp.logs import get_logger
from memhp.view.model import MQTT_PREFIX, MQTT_TOPICS, Fleet

log = get_logger("memhp.view")

DEFAULT_PORT = 1883
#: Seconds between two connection attempts, from the first to the most.
RETRY_MIN = 0.5
RETRY_MAX = 5.0


class MqttUrlError(ValueError):
    """An ``--mqtt`` value that is not ``mqtt://HOST[:PORT]``."""


@dataclass(frozen=True)
class Broker:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> Broker:
    """``mqtt://HOST[:PORT]`` (port 1883 by default)."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise MqttUrlError(f"--mqtt: expected mqtt://HOST[:PORT], got {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise MqttUrlError(f"--mqtt: bad port in {url!r}") from None
    if parts.path not in ("", "/"):
        raise MqttUrlError(f"--mqtt: expected mqtt://HOST[:PORT] without a path, got {url!r}")
    return Broker(parts.hostname, port)


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

    def __init__(self, fleet: Fleet, broker: Broker) -> None:
        self.fleet = fleet
        self.broker = broker
        self.received = 0
        self.last_message = 0.0
        fleet.source = str(broker)

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(self.broker.host, self.broker.port, timeout=5.0)

    def _apply(self, message: aiomqtt.Message) -> None:
        payload = _payload(message)
        self.received += 1
        self.last_message = time.monotonic()
        if payload is None:
            self.fleet.ignored += 1
            return
        self.fleet.apply_mqtt(str(message.topic), payload)

    async def _follow(self, on_message: Callable[[], None] | None) -> None:
        async with self._client() as client:
            for topic in topics(self.fleet):
                await client.subscribe(topic, qos=0)
            self.fleet.error = ""
            async for message in client.messages:
                self._apply(message)
                if on_message is not None:
                    on_message()

    async def run(self, on_message: Callable[[], None] | None = None) -> None:
        """Follow the topics until cancelled; reconnect with backoff."""
        delay = RETRY_MIN
        while True:
            try:
                await self._follow(on_message)
            except aiomqtt.MqttError as err:
                self.fleet.error = f"{self.broker}: {err}"
                log.debug("mqtt connection lost", error=str(err))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def collect(self, *, quiet: float = 0.5, limit: float = 3.0) -> None:
        """Take what the broker holds now: until no message came for ``quiet`` seconds
        (after the first), at most ``limit`` seconds. Raises ``aiomqtt.MqttError`` when
        the broker cannot be reached."""
        start = time.monotonic()
        async with self._client() as client:
            for topic in topics(self.fleet):
                await client.subscribe(topic, qos=0)

            async def read() -> None:
                async for message in client.messages:
                    self._apply(message)

            reader = asyncio.create_task(read())
            try:
                while True:
                    now = time.monotonic()
                    if now - start >= limit:
                        break
                    if self.received and now - self.last_message >= quiet:
                        break
                    await asyncio.sleep(0.05)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
