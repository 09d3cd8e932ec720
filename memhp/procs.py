"""Start and stop memhp processes as children: ready files, port 0, clean teardown.

Every memhp server takes ``--ready-file PATH`` and writes ``HOST:PORT`` there once it
listens, so callers bind port 0 and read the real port back. :class:`Child` is one
such process; it is stopped by its own PID only (SIGTERM, then SIGKILL after a grace
period) and always waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class ChildFailed(Exception):
    """A child exited, or did not get ready in time."""


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    address: str = ""
    log_path: Path | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return self.process.returncode if self.process.returncode is not None else -1

    def kill(self) -> None:
        """SIGKILL (what a crash looks like); call :meth:`stop` afterwards to reap it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


def memhp_command(*args: str) -> list[str]:
    """``memhp ARGS`` run with this interpreter (works without the console script)."""
    return [sys.executable, "-m", "memhp.cli", *args]


def write_ready_file(path: Path | str, text: str) -> None:
    """Write ``text`` and a newline to ``path`` atomically (a temporary file in the same
    folder, then a rename): a reader polling for the file sees all of it or nothing.
    The other side of :func:`start_child`'s ``--ready-file``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{text}\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def start_child(
    name: str,
    argv: list[str],
    *,
    ready: bool = True,
    timeout: float = 20.0,
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Child:
    """Start ``argv`` with ``--ready-file`` appended (when ``ready``) and wait for it."""
    tmp = tempfile.TemporaryDirectory(prefix=f"memhp-{name}-")
    ready_file = Path(tmp.name) / "ready"
    log_path = (log_dir or Path(tmp.name)) / f"{name}.log"
    full = [*argv, "--ready-file", str(ready_file)] if ready else argv
    log = log_path.open("wb")
    try:
        process = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    finally:
        log.close()
    child = Child(name, process, log_path=log_path, _tmp=tmp)
    if not ready:
        return child
    deadline = time.monotonic() + timeout
    while True:
        if ready_file.exists():
            child.address = ready_file.read_text().strip()
            return child
        if process.returncode is not None or time.monotonic() > deadline:
            tail = child.log_tail()
            await child.stop(grace=1.0)
            why = (
                f"exited with {process.returncode}"
                if process.returncode is not None
                else (f"not ready after {timeout:.0f} s")
            )
            raise ChildFailed(f"{name} {why}:\n{tail}")
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def sigterm_cancels_this_task() -> Iterator[None]:
    """While inside, SIGTERM cancels the current task (so its ``finally`` stops the
    children it started); where signal handlers cannot be set, nothing changes."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    handled = False
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            handled = True
    try:
        yield
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGTERM)
