"""Fixtures shared by every test directory: a real mosquitto broker (tests/mosquitto.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.mosquitto import Mosquitto


@pytest_asyncio.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """A started mosquitto on a free 127.0.0.1 port; stopped by its PID at the end."""
    broker = Mosquitto(tmp_path / "mosquitto")
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
