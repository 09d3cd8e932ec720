"""Publishing to an MQTT broker without ever making the protocol wait: :class:`MqttPublisher`.

The protocol side only ever calls :meth:`MqttPublisher.offer` (or ``offer_event``),
which never blocks and never awaits: an event goes into a bounded queue, or, when the
queue is full, is dropped and counted. Retained documents (the per-VM state) are not
queued: the publisher keeps the latest one per topic, so they are superseded, never
dropped. One task (:meth:`MqttPublisher.run`) owns the broker connection through
**aiomqtt**: it connects, publishes at QoS 1 with a window of unconfirmed publishes
(paho sends them in call order, so order is kept), and when the connection fails it
reconnects with exponential backoff (0.1 s doubling to 5 s, jittered). Publishes that
were not confirmed when the connection broke go out again on the next one (QoS 1 is
at-least-once anyway), every retained document is sent again (a restarted broker has
none), and the events dropped meanwhile are reported per VM as an ``events_dropped``
event. :meth:`MqttPublisher.aclose` flushes for a short grace period and stops.

aiomqtt (and paho under it) is imported only when the publisher runs: the command lines
import this module to parse ``--mqtt``, and a process without ``--mqtt`` pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from memhp import events
from memhp.logs import get_logger

if TYPE_CHECKING:
    import aiomqtt

DEFAULT_PORT: Final = 1883
#: Events waiting for the broker before new ones are dropped.
DEFAULT_QUEUE: Final = 10_000
BACKOFF_INITIAL: Final = 0.1
BACKOFF_MAX: Final = 5.0
#: Publishes awaiting the broker's PUBACK at once.
WINDOW: Final = 32
#: Seconds the broker has to accept a connection or confirm a publish.
TIMEOUT: Final = 5.0
#: Seconds :meth:`MqttPublisher.aclose` keeps publishing what is left.
CLOSE_GRACE: Final = 1.0
QOS: Final = 1

#: paho's own chatter (a line per packet at debug) stays out of the process log.
_PAHO_LOG = logging.getLogger("memhp.mqtt.paho")


class MqttUrlError(ValueError):
    """A ``--mqtt`` value that is not ``mqtt://host[:port]``."""


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"


def parse_broker_url(text: str) -> BrokerUrl:
    """``mqtt://host[:port]`` (port 1883 by default); :class:`MqttUrlError` otherwise."""
    usage = "expected mqtt://HOST[:PORT]"
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme != "mqtt":
        raise MqttUrlError(f"{text!r}: {usage} (the scheme must be mqtt)")
    try:
        port = parts.port
    except ValueError:
        raise MqttUrlError(f"{text!r}: the port must be a number in 1..65535") from None
    if not parts.hostname:
        raise MqttUrlError(f"{text!r}: {usage} (no host)")
    if parts.username is not None or parts.password is not None:
        raise MqttUrlError(f"{text!r}: user names and passwords are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise MqttUrlError(f"{text!r}: {usage} (no path, query or fragment)")
    if port == 0:
        raise MqttUrlError(f"{text!r}: the port must be a number in 1..65535")
    return BrokerUrl(parts.hostname, port or DEFAULT_PORT)


def broker_url_arg(text: str) -> BrokerUrl:
    """An argparse ``type=``: a bad URL becomes ``argument --mqtt: ...`` and exit 2."""
    import argparse

    try:
        return parse_broker_url(text)
    except MqttUrlError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def queue_size_arg(text: str) -> int:
    """An argparse ``type=`` for ``--mqtt-queue``: a whole number >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    #: Whose events these are (an event's drop is reported to its VM); None for others.
    vm: str | None = None
    retain: bool = False


class MqttPublisher:
    """See the module doc. ``source`` (host or guest) goes into every event's envelope."""

    def __init__(
        self,
        url: BrokerUrl,
        *,
        source: str,
        client_id: str | None = None,
        max_queue: int = DEFAULT_QUEUE,
        window: int = WINDOW,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        timeout: float = TIMEOUT,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if source not in events.SOURCES:
            raise ValueError(f"source must be one of {', '.join(events.SOURCES)}, not {source!r}")
        if max_queue < 1 or window < 1:
            raise ValueError("max_queue and window must be >= 1")
        self.url = url
        self.source = source
        self.client_id = client_id
        self.max_queue = max_queue
        self.window = window
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = timeout
        self._rng = rng or random.Random()
        self._clock = clock
        self._queue: deque[_Message] = deque()
        #: The latest retained document per topic, and the topics still to publish.
        self._retained: dict[str, bytes] = {}
        self._dirty: dict[str, None] = {}
        self._seq = 0
        #: Events the broker confirmed, and events dropped because the queue was full.
        self.published = 0
        self.dropped = 0
        #: Drops per VM not reported yet in an ``events_dropped`` event.
        self._unreported: dict[str, int] = {}
        self._dropping = False
        self.connected = False
        #: Successful connections, and connections that failed or broke, so far.
        self.connects = 0
        self.losses = 0
        self._failure: BaseException | None = None
        self._closing = False
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.log = get_logger("memhp.mqtt").bind(broker=str(url), source=source)
        if _PAHO_LOG.level == logging.NOTSET:
            _PAHO_LOG.setLevel(logging.WARNING)

    # -- the protocol side: never blocks --------------------------------------------

    @property
    def queued(self) -> int:
        """Events waiting (retained documents not counted)."""
        return len(self._queue)

    def stats(self) -> dict[str, int]:
        """``{"published": n, "dropped": n}``: the state documents' ``mqtt`` object."""
        return {"published": self.published, "dropped": self.dropped}

    def offer(
        self, topic: str, payload: bytes, *, retain: bool = False, vm: str | None = None
    ) -> bool:
        """Queue one message; False when it was dropped (the queue is full).

        A retained message replaces whatever this publisher still holds for its topic
        and is never dropped.
        """
        if retain:
            self._retained[topic] = payload
            self._dirty[topic] = None
        elif len(self._queue) >= self.max_queue:
            self._drop(vm)
            return False
        else:
            self._queue.append(_Message(topic, payload, vm))
        self._wake.set()
        return True

    def offer_event(
        self,
        vm: str,
        kind: str,
        payload: Mapping[str, Any],
        *,
        timestamp: float | None = None,
    ) -> bool:
        """Queue one event (the envelope is built here); False when it was dropped.

        Every event offered takes the next ``seq``, dropped or not: a subscriber sees
        a drop as a gap.
        """
        self._seq += 1
        if len(self._queue) >= self.max_queue:
            self._drop(vm)  # not even encoded
            return False
        doc = events.envelope(
            vm=vm,
            kind=kind,
            source=self.source,
            seq=self._seq,
            payload=payload,
            timestamp=self._clock() if timestamp is None else timestamp,
        )
        return self.offer(events.event_topic(vm, kind), events.encode(doc), vm=vm)

    def _drop(self, vm: str | None) -> None:
        self.dropped += 1
        if vm is not None:
            self._unreported[vm] = self._unreported.get(vm, 0) + 1
        if not self._dropping:
            self._dropping = True
            self.log.warning(
                "mqtt_dropping_events",
                vm=vm,
                dropped=self.dropped,
                queued=len(self._queue),
                max_queue=self.max_queue,
                connected=self.connected,
            )

    def _report_drops(self) -> None:
        """One ``events_dropped`` per VM that lost events; reports bypass the bound."""
        reports, self._unreported = self._unreported, {}
        for vm, count in reports.items():
            self._seq += 1
            doc = events.envelope(
                vm=vm,
                kind=events.EVENTS_DROPPED,
                source=self.source,
                seq=self._seq,
                payload={"dropped": count},
                timestamp=self._clock(),
            )
            topic = events.event_topic(vm, events.EVENTS_DROPPED)
            self._queue.append(_Message(topic, events.encode(doc), vm))
        self._dropping = False

    # -- the connection ----------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`run` as a task of the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"mqtt-publisher:{self.source}")

    async def run(self) -> None:
        """Connect, publish, reconnect with backoff; returns once closing is done."""
        import aiomqtt

        delay = self.backoff_initial
        failures = 0
        while True:
            if self._closing and (failures or not (self._queue or self._dirty)):
                break  # closing: one last try to deliver what is left, no retries
            try:
                client = aiomqtt.Client(
                    self.url.host,
                    self.url.port,
                    identifier=self.client_id,
                    timeout=self.timeout,
                    logger=_PAHO_LOG,
                    max_inflight_messages=self.window,
                )
                async with client:
                    # aiomqtt warns at more than 10 pending publishes; we keep a window.
                    client.pending_calls_threshold = 2 * self.window + 10
                    self._on_connected()
                    failures = 0
                    delay = self.backoff_initial
                    await self._serve(client)
            except Exception as err:  # MqttError, or anything else: the protocol goes on
                self._on_lost(err, failures)
                failures += 1
                self.losses += 1
            finally:
                self.connected = False
            if self._closing:
                break
            pause = self._rng.uniform(delay / 2, delay)
            self.log.debug("mqtt_reconnect_backoff", seconds=round(pause, 3))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._closed.wait()
            delay = min(delay * 2, self.backoff_max)

    def _on_connected(self) -> None:
        self.connected = True
        self.connects += 1
        # A restarted broker has lost the retained documents: send them all again.
        for topic in self._retained:
            self._dirty.setdefault(topic, None)
        lost = sum(self._unreported.values())
        if lost:
            self.log.warning(
                "mqtt_broker_back",
                dropped=lost,
                dropped_total=self.dropped,
                queued=len(self._queue),
            )
        else:
            self.log.info("mqtt_connected", queued=len(self._queue), reconnect=self.connects > 1)

    def _on_lost(self, err: Exception, failures: int) -> None:
        error = f"{type(err).__name__}: {err}"
        if self.connected:
            self.log.warning("mqtt_disconnected", error=error, queued=len(self._queue))
        elif failures == 0:
            self.log.warning("mqtt_connect_failed", error=error, queued=len(self._queue))
        else:
            self.log.debug("mqtt_connect_failed", error=error, attempt=failures + 1)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish until closing (returns) or the connection breaks (raises)."""
        watch = asyncio.create_task(self._watch(client))
        pump = asyncio.create_task(self._pump(client))
        try:
            done, _ = await asyncio.wait({watch, pump}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, pump):
                task.cancel()
            await asyncio.gather(watch, pump, return_exceptions=True)
        (pump if pump in done else watch).result()

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        """Raises aiomqtt.MqttError when the connection drops (nothing is subscribed)."""
        async for _ in client.messages:
            pass

    async def _pump(self, client: aiomqtt.Client) -> None:
        pending: dict[asyncio.Task[None], _Message] = {}

        def done(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return
            err = task.exception()
            if err is None:
                msg = pending.pop(task, None)
                if msg is not None and not msg.retain:
                    self.published += 1
            elif self._failure is None:
                self._failure = err
            self._wake.set()

        self._failure = None
        try:
            while True:
                self._wake.clear()
                if self._failure is not None:
                    raise self._failure
                if self._dropping and len(self._queue) <= self.max_queue // 2:
                    self._report_drops()  # the backlog is draining: say what was lost
                if len(pending) >= self.window:
                    await self._wake.wait()
                    continue
                msg = self._next()
                if msg is None:
                    if self._closing and not pending:
                        return
                    await self._wake.wait()
                    continue
                task = asyncio.create_task(
                    client.publish(msg.topic, msg.payload, qos=QOS, retain=msg.retain)
                )
                pending[task] = msg
                task.add_done_callback(done)
        finally:
            unconfirmed = [
                m
                for t, m in pending.items()
                if not t.done() or t.cancelled() or t.exception() is not None
            ]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._requeue(unconfirmed)

    def _next(self) -> _Message | None:
        """Retained documents first (few, coalesced), then events in order."""
        if self._dirty:
            topic = next(iter(self._dirty))
            del self._dirty[topic]
            return _Message(topic, self._retained[topic], retain=True)
        if self._queue:
            return self._queue.popleft()
        return None

    def _requeue(self, messages: list[_Message]) -> None:
        """Unconfirmed messages go first next time, in their order (at least once)."""
        for m in reversed(messages):
            if m.retain:
                self._dirty[m.topic] = None  # whatever is latest for the topic goes
            else:
                self._queue.appendleft(m)

    async def aclose(self, grace: float = CLOSE_GRACE) -> None:
        """Publish what is left for up to ``grace`` seconds (if connected), then stop."""
        self._closing = True
        self._closed.set()
        self._wake.set()
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception:
            self.log.exception("mqtt_publisher_failed")
        self.log.info(
            "mqtt_closed",
            published=self.published,
            dropped=self.dropped,
            left=len(self._queue) + len(self._dirty),
        )


class Coalescer:
    """Calls ``flush`` at most once per ``interval`` seconds after :meth:`mark`.

    The call runs on the loop after the marking step, so it always sees the latest
    state; marks while one is scheduled cost nothing.
    """

    def __init__(
        self,
        interval: float,
        flush: Callable[[], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._flush = flush
        self._clock = clock
        self._last: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.log = get_logger("memhp.mqtt")

    def mark(self) -> None:
        if self._handle is not None:
            return
        delay = 0.0 if self._last is None else max(0.0, self._last + self.interval - self._clock())
        self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def flush_now(self) -> None:
        """Flush at once (on the way out), whatever the interval says."""
        self.close()
        self._fire()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._last = self._clock()
        try:
            self._flush()
        except Exception:
            self.log.exception("mqtt_document_failed")
