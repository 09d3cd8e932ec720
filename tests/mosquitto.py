"""A real mosquitto broker for tests, and a subscriber that records what it receives.

:class:`Mosquitto` runs Debian's ``mosquitto -c CONF`` as a foreground child on a free
127.0.0.1 port (``listener 0`` would mean a unix socket in mosquitto 2, so the port is
picked here), anonymous, without persistence, logging to stderr into a file. It is
stopped (SIGTERM) or killed (SIGKILL) by its own PID, and can be started again on the
same port. A missing mosquitto fails the test with a message saying how to get it.

:class:`Subscriber` is an aiomqtt client that collects every message on its topic
filters in arrival order, so a test can wait for and check what a scenario published.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt
import pytest

from memhp.mqtt import BrokerUrl

#: Debian installs the broker in /usr/sbin, which is not on every PATH.
_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")
READY_TIMEOUT = 10.0


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in _CANDIDATES if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail(
            "mosquitto is not installed: the MQTT tests need Debian's mosquitto package "
            "(apt-get install mosquitto; .ci/run installs it when it is missing)",
            pytrace=False,
        )
    return found


def free_port() -> int:
    """A port nothing listens on right now (127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """One mosquitto child on a fixed loopback port (see the module doc)."""

    def __init__(self, workdir: Path, port: int | None = None, *, persistent: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        #: Keep sessions (and retained messages) in workdir across a SIGKILL: saved after
        #: every change, so a persistent subscriber's session survives a crash.
        self.persistent = persistent
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def broker(self) -> BrokerUrl:
        return BrokerUrl("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log(self) -> str:
        path = self.workdir / f"mosquitto-{self.starts}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def start(self) -> None:
        assert not self.running, "mosquitto is already running"
        binary = mosquitto_binary()
        self.starts += 1
        conf = self.workdir / "mosquitto.conf"
        persistence = (
            # As root mosquitto would switch to its own user, who cannot write here.
            f"persistence true\npersistence_location {self.workdir}/\n"
            "autosave_on_changes true\nautosave_interval 1\nuser root\n"
            if self.persistent
            else "persistence false\n"
        )
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"{persistence}"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        )
        log_path = self.workdir / f"mosquitto-{self.starts}.log"
        with open(log_path, "wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.returncode is not None:
                raise AssertionError(
                    f"mosquitto exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    await self.kill()
                    raise AssertionError(
                        f"mosquitto not listening on {self.port} after {READY_TIMEOUT} s:\n"
                        f"{self.log()}"
                    ) from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM by PID (SIGKILL after ``grace``), and reap it."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self.process = None

    async def kill(self) -> None:
        """SIGKILL by PID (a broker that dies), and reap it."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        self.process = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """An aiomqtt client collecting every message on ``topics`` (see the module doc)."""

    def __init__(self, port: int, *topics: str, identifier: str | None = None) -> None:
        """With ``identifier`` the session is persistent (clean_session off): the broker
        queues QoS 1 messages for it while it is away."""
        self.port = port
        self.identifier = identifier
        self.topics = topics or ("#",)
        self.messages: list[Received] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        client = aiomqtt.Client(
            "127.0.0.1",
            self.port,
            timeout=5,
            identifier=self.identifier,
            clean_session=False if self.identifier else None,
        )
        await client.__aenter__()
        self._client = client
        for topic in self.topics:
            await client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._collect(client))
        return self

    async def _collect(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                self.messages.append(Received(str(m.topic), payload, bool(m.retain)))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    def on(self, pattern: Callable[[str], bool]) -> list[Received]:
        return [m for m in self.messages if pattern(m.topic)]

    def events(self) -> list[dict[str, Any]]:
        """Every event envelope received, in arrival order."""
        return [m.json() for m in self.messages if "/events/" in m.topic]

    async def wait_for(
        self,
        predicate: Callable[[list[Received]], Any],
        timeout: float = 10.0,
        what: str = "messages",
    ) -> Any:
        """Poll ``predicate(messages)`` until it gives something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.messages)
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            if time.monotonic() > deadline:
                topics = sorted({m.topic for m in self.messages})
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}; "
                    f"{len(self.messages)} messages on {topics}"
                )
            await asyncio.sleep(0.02)


def kinds(events: Iterable[dict[str, Any]], source: str | None = None) -> list[str]:
    return [e["kind"] for e in events if source is None or e["source"] == source]
