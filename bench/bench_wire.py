"""Benchmark of the processes over gRPC: the raw ceiling, hot-add round trips, growth, a
fleet, and what each side adds to a transaction.

    python bench/bench_wire.py [--json] [--quick] [--only PART]... [--profile DIR] [--logs DIR]

Everything runs in one go on this machine, over loopback, with real processes that are
started with ``--ready-file`` on port 0 and stopped by their PID at the end:

1. **Ceiling.** ``bench/wire_echo.py`` echoes every DM frame; this process writes a
   ``DmFrame`` on one ``Connect`` stream and reads the echo, one at a time, for ~3 s:
   round trips per second, the most a DM stream can carry here.
2. **Hot-add round trip.** A ``memhp hypervisor`` and a ``memhp guest`` (auto-online
   online, 128 MiB blocks, 4 GiB boot, 1 TiB max), with a second echo server running
   beside them. The target row: N hot-adds of a 128 MiB region, fully backed, as ONE
   ``Control.HotAdd`` with ``count = N``, so the hypervisor sends them one DM transaction
   after another at the protocol's own pace, with no Control round trip in between. This
   runs in 3 rounds (1 with ``--quick``); before and after each round the echo ping-pong
   is measured again for a second, and the round's share is its rate over the mean of
   those two ceilings. The median round is reported, every round is listed: the ceiling
   alone moves by a factor of two or more within minutes on a shared 2-core machine.
   Round trip p50 / p99 are the hypervisor's own measurement (``Vm.transactions``:
   request sent to final response); transactions per second run from the first request
   to the last response, which the hypervisor stamps with the batch's
   ``command_started`` and ``command_done`` events (the only events watched, with those
   that mean trouble: two per batch). Completion is seen by polling
   ``ListVms`` every 20 ms, and ``GetVm`` at the end checks the guest added every page.
   Then, on the same VM, N more as one ``Control.HotAdd`` per transaction with a few
   queued behind the one in flight and a ``WatchEvents`` watcher of every request and
   response (round trips from its timestamps): what an operator's script sees. For
   reference, sequential ``Control.GetVm`` calls per second. Hypervisor and guest CPU
   shares (``/proc/PID/stat``) of both.
3. **Growth to 1 TiB.** Another VM grown from 4 GiB by one ``HotAdd`` of every 128 MiB
   region up to 1 TiB, 96 MiB of each backed (24-byte form), then one
   ``Back(remaining=true)`` backing the last 32 MiB of each (16-byte form, one request
   per hole). Each phase runs from its Control call to the ``ListVms`` poll that sees it
   settled; the hypervisor's spans (``command_started`` to ``command_done``) are shown
   too. Round trips from ``Vm.transactions``, read often enough that its windows (the
   last <= 4096 transactions) cover every transaction. The guest's final state from its
   introspection (``GetMemory``: MemTotal, ``num_pages_added``, violations) and
   ``ListVms`` (``actual_bytes``).
4. **virtio-mem.** A fresh hypervisor with one virtio-mem VM (32 GiB boot, 128 MiB
   memory blocks, a 1 TiB device of 2 MiB device blocks) and a ``memhp guest
   --protocol virtio-mem --auto-online online_movable``: one ``Control.Resize`` from 0
   to 1 TiB, and the time until the device has it all plugged (``ListVms`` polled) and
   the driver has settled. The driver works in Sub Block Mode with 4 MiB subblocks and
   plugs a whole memory block per request, so that is 8,192 PLUG requests, each a
   round trip on the ``VirtioMem.Connect`` stream, each followed by
   ``add_memory_driver_managed`` and the onlining of one block. GiB/s, plug requests/s,
   wall time, CPU of both processes; the end state checked: plugged == requested, the
   guest's MemTotal grew by 1 TiB, no violation on either side (the guest's invariants
   against the device's plugged ranges).
5. **Fleet.** A fresh hypervisor and 200 guests (``bench/loadgen.py``: a few processes,
   each guest on its own channel and ``Connect`` stream, attach, version and
   capabilities negotiation, one status report a second). The hypervisor's CPU share
   over ~20 s from ``/proc/PID/stat`` (utime + stime, all its threads), the guests
   attached (``ListVms``) and the reports that arrived (each report's
   ``num_committed`` counts the guest's reports, so ``committed_bytes`` says how many
   arrived; no watcher runs during the window).

6. **Split.** Where a transaction's time goes: the batched hot-adds of part 2 with one
   side replaced by a minimal peer of ``bench/dm_peers.py``. First a real hypervisor
   against a guest with no memory model (it answers every hot-add at once), then a host
   with no session, ground truth or state file against the real guest; each set against
   the ping-pong measured just before it, as rates and as microseconds per transaction
   beyond the ping-pong.

``--quick`` shrinks every part for a smoke run (1 s ceiling, 200 hot-adds, growth to
64 GiB, virtio-mem to 64 GiB, 50 guests for 5 s). ``--json`` prints the figures as JSON.
``--only`` runs some parts (ceiling, hot-add, growth, virtio-mem, fleet, split). ``--profile
DIR`` runs the hypervisors and guests under cProfile (``DIR/NAME.prof``, written when
they stop), to see where their time goes; ``--logs DIR`` keeps the children's logs.
Exit status 0 when every part ran and every correctness check held (a missed
performance target is reported, not failed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import wire_echo
from loadgen import COMMITTED_BASE
from machine import describe

from memhp.procs import Child, ChildFailed, memhp_command, start_child
from memhp.v1 import control_pb2, control_pb2_grpc, guest_pb2, guest_pb2_grpc

BENCH = Path(__file__).resolve().parent
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
PAGE = 4096
BLOCK = 128 * MIB
BOOT = 4 * GIB
#: Commands the per-command run keeps outstanding (the one in flight plus queued).
DEPTH = 4
#: Seconds without progress after which a part gives up.
STALL = 30.0
#: Seconds to wait for a child, an attach or a negotiation.
START_TIMEOUT = 60.0
#: Seconds between two ListVms polls while a batch runs.
POLL = 0.02
#: The most recent round trips ``Vm.transactions`` covers (control.proto).
STATS_WINDOW = 4096
#: Round trips before the ceiling's clock starts.
WARMUP = 200
#: Hard cap on the ceiling's loop.
MAX_ROUND_TRIPS = 1_000_000
GUEST_FLAGS = (
    "--auto-online",
    "online",
    "--pressure-report-delay",
    "0",
    "--status-interval",
    "1",
)
HOT_ADD_KINDS = ("hot_add_request", "hot_add_response")
#: The hypervisor's stamps of a command: its first request goes out, its last response came.
COMMAND_KINDS = ("command_started", "command_done")
#: Events that mean something went wrong with the commands the benchmark sent.
TROUBLE_KINDS = ("protocol_error", "reset", "command_dropped", "region_unusable", "detach")


@dataclasses.dataclass(frozen=True)
class Sizes:
    name: str
    ceiling_s: float
    #: Hot-adds of the round-trip part, batched and then one command each (<= STATS_WINDOW).
    round_trips: int
    #: The size the growth part grows the guest to (from BOOT).
    grow_to_bytes: int
    guests: int
    loadgens: int
    fleet_s: float
    #: The size the virtio-mem part resizes its device to (from 0).
    virtio_mem_bytes: int = 1 * TIB
    #: Batched hot-add rounds, each between two ceiling measurements (the share of the
    #: ceiling is the median round's).
    rounds: int = 3


FULL = Sizes("full", 3.0, 2000, 1 * TIB, 200, 4, 20.0, 1 * TIB)
QUICK = Sizes("quick", 1.0, 200, 64 * GIB, 50, 4, 5.0, 64 * GIB, rounds=1)
#: The virtio-mem device block (QEMU's default on x86).
DEVICE_BLOCK = 2 * MIB
#: The virtio-mem VM's boot memory: the memmap of 1 TiB (16 GiB at 64 bytes a page) comes
#: out of it, as bench_model.py's in-process row has it.
VIRTIO_BOOT = 32 * GIB

Row = tuple[str, object, str]


class BenchError(Exception):
    pass


def machine() -> str:
    return describe() + f", grpcio {grpc.__version__}"


def code_version() -> str:
    """The commit measured, and whether the working tree had changes (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=BENCH,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + {len(dirty)} changed files" if dirty else head


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After "pid (comm)": state is field 3, utime 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    return wire_echo.percentile(sorted(values), q) if values else float("nan")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- processes ------------------------------------------------------------------------


class Processes:
    """Every child this run started; :meth:`stop_all` stops each by its PID."""

    def __init__(self, log_dir: Path, profile_dir: Path | None = None) -> None:
        self.log_dir = log_dir
        self.profile_dir = profile_dir
        self.children: list[Child] = []
        self._names: dict[str, int] = {}

    async def start(
        self,
        name: str,
        argv: list[str],
        *,
        profile: bool = False,
        env: dict[str, str] | None = None,
        ready: bool = True,
    ) -> Child:
        """Start ``argv`` (``env`` added to the environment; ``ready``: wait for its
        ``--ready-file``); ``profile``: a Python child runs under cProfile (--profile DIR)."""
        n = self._names.get(name, 0)
        self._names[name] = n + 1
        if profile and self.profile_dir is not None:
            out = self.profile_dir / f"{name}{n}.prof"
            argv = [argv[0], "-m", "cProfile", "-o", str(out), *argv[1:]]
        child = await start_child(
            f"{name}{n}", argv, ready=ready, timeout=START_TIMEOUT, log_dir=self.log_dir, env=env
        )
        self.children.append(child)
        return child

    async def stop(self, child: Child) -> int:
        code = await child.stop()
        with contextlib.suppress(ValueError):
            self.children.remove(child)
        return code

    async def stop_all(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                await child.stop()
        self.children.clear()

    def tails(self) -> str:
        return "\n".join(f"--- {c.name} (pid {c.pid})\n{c.log_tail(15)}" for c in self.children)


async def start_hypervisor(procs: Processes, *args: str) -> Child:
    return await procs.start(
        "hypervisor", memhp_command("hypervisor", "--listen", "127.0.0.1:0", *args), profile=True
    )


async def start_guest(procs: Processes, hypervisor: str, vm_id: str) -> Child:
    argv = memhp_command(
        "guest",
        "--hypervisor",
        hypervisor,
        "--vm-id",
        vm_id,
        "--listen",
        "127.0.0.1:0",
        *GUEST_FLAGS,
    )
    return await procs.start(f"guest-{vm_id}-", argv, profile=True)


# -- Control and events -----------------------------------------------------------------


class Control:
    """The Control stub, with the timing of every HotAdd and Back call."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = control_pb2_grpc.ControlStub(channel)
        #: Seconds of every HotAdd and Back call, in order.
        self.calls: list[float] = []

    async def hot_add(self, request: control_pb2.HotAddCommand) -> None:
        t0 = time.perf_counter()
        await self.stub.HotAdd(request, timeout=STALL)
        self.calls.append(time.perf_counter() - t0)

    async def back(self, request: control_pb2.BackCommand) -> None:
        t0 = time.perf_counter()
        await self.stub.Back(request, timeout=STALL)
        self.calls.append(time.perf_counter() - t0)

    async def get_vm(self, vm_id: str) -> control_pb2.Vm:
        vm: control_pb2.Vm = await self.stub.GetVm(
            control_pb2.GetVmRequest(vm_id=vm_id), timeout=STALL
        )
        return vm

    async def summary(self, vm_id: str) -> control_pb2.Vm:
        """The VM's summary from ListVms (no regions: its cost does not grow with the VM)."""
        listed: control_pb2.ListVmsResponse = await self.stub.ListVms(
            control_pb2.ListVmsRequest(), timeout=STALL
        )
        for vm in listed.vms:
            if vm.spec.vm_id == vm_id:
                return vm
        raise BenchError(f"{vm_id}: not in ListVms")

    async def create_vm(self, vm_id: str, max_bytes: int) -> None:
        spec = control_pb2.VmSpec(
            vm_id=vm_id, boot_bytes=BOOT, max_bytes=max_bytes, block_size_bytes=BLOCK
        )
        await self.stub.CreateVm(control_pb2.CreateVmRequest(spec=spec), timeout=STALL)

    async def wait_idle(self, vm_id: str) -> None:
        """Until the guest is attached and negotiated (the host session is IDLE)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            vm = await self.summary(vm_id)
            if vm.attached and vm.dm_state == "IDLE":
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{vm_id}: not negotiated after {START_TIMEOUT:.0f} s: {vm}")
            await asyncio.sleep(0.02)


class Watcher:
    """A WatchEvents stream of one VM, collected in the background."""

    def __init__(self, control: Control, vm_id: str, kinds: Iterable[str]) -> None:
        self.call = control.stub.WatchEvents(
            control_pb2.WatchEventsRequest(vm_ids=[vm_id], kinds=list(kinds))
        )
        self.events: list[control_pb2.Event] = []
        #: Hypervisor timestamps of the hot-add responses, in order.
        self.response_at: list[float] = []
        self.trouble: list[str] = []
        self.progress = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    async def start(self) -> None:
        await asyncio.wait_for(self.call.initial_metadata(), STALL)
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        try:
            async for event in self.call:
                self.events.append(event)
                if event.kind == "hot_add_response":
                    self.response_at.append(event.timestamp)
                elif event.kind in TROUBLE_KINDS:
                    self.trouble.append(f"{event.kind} {dict(event.payload)}")
                self.progress.set()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err
                self.progress.set()

    @property
    def responses(self) -> int:
        return len(self.response_at)

    async def wait_responses(self, count: int, what: str) -> None:
        while self.responses < count:
            self.check()
            self.progress.clear()
            if self.responses >= count:
                break
            try:
                await asyncio.wait_for(self.progress.wait(), STALL)
            except TimeoutError:
                raise BenchError(
                    f"{what}: {self.responses} of {count} hot-add responses, none for {STALL:.0f} s"
                ) from None
        self.check()

    async def wait_commands_done(self, count: int, what: str) -> None:
        """Until ``count`` command_done events arrived (the last one trails the response)."""
        deadline = time.monotonic() + STALL
        while sum(e.kind == "command_done" for e in self.events) < count:
            self.check()
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: no command_done event after {STALL:.0f} s")
            await asyncio.sleep(0.005)
        self.check()

    def command_spans(self) -> list[float]:
        """Seconds from each command_started to the command_done after it, in order."""
        spans: list[float] = []
        started: float | None = None
        for e in self.events:
            if e.kind == "command_started":
                started = e.timestamp
            elif e.kind == "command_done" and started is not None:
                spans.append(e.timestamp - started)
                started = None
        return spans

    def check(self) -> None:
        if self.error is not None:
            raise BenchError(f"WatchEvents broke: {self.error}")
        if self.trouble:
            raise BenchError("the hypervisor reported: " + "; ".join(self.trouble[:5]))

    async def close(self) -> None:
        self.call.cancel()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def pipelined(
    send: Callable[[int], Awaitable[None]],
    count: int,
    watcher: Watcher,
    already: int,
    what: str,
) -> None:
    """Issue ``count`` commands keeping at most DEPTH unanswered; return when all are answered.

    ``already`` is the number of hot-add responses the watcher had before.
    """
    for issued in range(count):
        while issued - (watcher.responses - already) >= DEPTH:
            await watcher.wait_responses(already + issued - DEPTH + 1, what)
        await send(issued)
    await watcher.wait_responses(already + count, what)


@dataclasses.dataclass(frozen=True)
class Window:
    """One reading of ``Vm.transactions``: the round trips of the last ``size`` transactions."""

    #: perf_counter() when it was read.
    at: float
    completed: int
    size: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, vm: control_pb2.Vm, at: float) -> Window:
        t = vm.transactions
        return cls(
            at, t.completed, t.window, round(t.p50_ms, 3), round(t.p99_ms, 3), round(t.max_ms, 3)
        )


@dataclasses.dataclass
class Settled:
    """A batch seen through: when the poll saw it, the VM then, the windows read on the way."""

    at: float
    vm: control_pb2.Vm
    #: ``Vm.transactions`` read every 3/4 STATS_WINDOW transactions and at the end.
    windows: list[Window]
    #: Every transaction of the batch is in one of the windows.
    covered: bool

    @property
    def last(self) -> Window:
        return self.windows[-1]


def worst(windows: Iterable[Window]) -> Window:
    """The window with the highest p99."""
    return max(windows, key=lambda w: w.p99_ms)


def window_rates(start: float, base: int, windows: list[Window]) -> list[float]:
    """Transactions per second between ``start`` (``base`` completed) and each window."""
    rates: list[float] = []
    for w in windows:
        rates.append(round((w.completed - base) / max(w.at - start, 1e-9), 1))
        start, base = w.at, w.completed
    return rates


async def settle(
    control: Control, vm_id: str, base: int, count: int, watcher: Watcher, what: str
) -> Settled:
    """Poll ListVms every POLL s until the VM is not busy and ``count`` transactions more
    than ``base`` completed.

    ``Vm.transactions`` is kept whenever ``completed`` moved on by 3/4 of STATS_WINDOW since
    the last one kept (or ``base``), and at the end, so the windows kept overlap and cover
    every transaction of the batch (``covered`` says whether they did: a poll that came
    late could miss some).
    """
    windows: list[Window] = []
    kept = base
    covered = True
    progress_at = time.perf_counter()
    seen = -1
    while True:
        vm = await control.summary(vm_id)
        now = time.perf_counter()
        watcher.check()
        window = Window.of(vm, now)
        done = window.completed >= base + count and not vm.busy
        if done or window.completed - kept >= STATS_WINDOW * 3 // 4:
            covered = covered and window.completed - window.size <= kept
            windows.append(window)
            kept = window.completed
        if done:
            return Settled(now, vm, windows, covered)
        if window.completed != seen:
            seen, progress_at = window.completed, now
        if not vm.attached:
            raise BenchError(f"{what}: the guest detached")
        if now - progress_at > STALL:
            raise BenchError(
                f"{what}: {window.completed - base} of {count} transactions, none for {STALL:.0f} s"
            )
        await asyncio.sleep(POLL)


def round_trips(events: list[control_pb2.Event]) -> tuple[list[float], float, float]:
    """Per-transaction round trips, the first request and the last response time."""
    requests: dict[int, float] = {}
    trips: list[float] = []
    first = last = float("nan")
    for e in events:
        if e.kind not in HOT_ADD_KINDS:
            continue
        trans_id = int(e.payload.fields["trans_id"].number_value)
        if e.kind == "hot_add_request":
            requests[trans_id] = e.timestamp
            if first != first:  # nan
                first = e.timestamp
        elif e.kind == "hot_add_response" and trans_id in requests:
            trips.append(e.timestamp - requests.pop(trans_id))
            last = e.timestamp
    return trips, first, last


class Cpu:
    """CPU seconds of some processes since this was made."""

    def __init__(self, *children: Child) -> None:
        self.pids = [c.pid for c in children]
        self.start = [cpu_seconds(pid) for pid in self.pids]

    def used(self) -> list[float]:
        return [cpu_seconds(pid) - s for pid, s in zip(self.pids, self.start, strict=True)]


# -- 1. the ceiling ----------------------------------------------------------------------


async def ping_pong(
    procs: Processes, address: str, seconds: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """The ping-pong client of ``bench/wire_echo.py``, a process of its own, against the
    echo server at ``address``: one ``Connect`` stream, a frame written and its echo read,
    one at a time, for ``seconds`` (after WARMUP round trips). ``env`` is added to this
    process's environment (which carries the ``memhp`` processes' gRPC settings)."""
    out = procs.log_dir / f"ping-{time.monotonic_ns()}.json"
    argv = [
        sys.executable,
        str(BENCH / "wire_echo.py"),
        "--client",
        address,
        "--seconds",
        str(seconds),
        "--warmup",
        str(WARMUP),
        "--out",
        str(out),
    ]
    client = await procs.start("ping", argv, env=env, ready=False)
    try:
        code = await asyncio.wait_for(client.process.wait(), seconds + START_TIMEOUT)
    except TimeoutError:
        raise BenchError(f"the ping-pong client did not finish:\n{client.log_tail()}") from None
    finally:
        await procs.stop(client)
    if code != 0 or not out.exists():
        raise BenchError(f"the ping-pong client exited with {code}:\n{client.log_tail()}")
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


async def start_echo(procs: Processes, env: dict[str, str] | None = None) -> Child:
    return await procs.start("wire-echo", [sys.executable, str(BENCH / "wire_echo.py")], env=env)


async def bench_ceiling(procs: Processes, seconds: float) -> dict[str, Any]:
    """The ceiling with the ``memhp`` processes' gRPC settings, and for reference with
    gRPC's own defaults (``GRPC_EXPERIMENTS`` empty: the EventEngine TCP transport)."""
    echo = await start_echo(procs)
    cpu0 = cpu_seconds(echo.pid)
    result = await ping_pong(procs, echo.address, seconds)
    # The warm-up's share of the echo's CPU is small against the measured seconds.
    echo_cpu = cpu_seconds(echo.pid) - cpu0
    await procs.stop(echo)
    default_env = {"GRPC_EXPERIMENTS": ""}
    echo = await start_echo(procs, env=default_env)
    grpc_default = await ping_pong(procs, echo.address, seconds, env=default_env)
    await procs.stop(echo)
    return {
        **result,
        "echo_cpu_share": round(echo_cpu / result["seconds"], 3),
        "echo_cpu_ms_per_round_trip": round(echo_cpu / result["round_trips"] * 1000, 3),
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
        "grpc_default": grpc_default,
    }


# -- 2. hot-add round trip ------------------------------------------------------------------


async def unary_rate(control: Control, vm_id: str, seconds: float) -> float:
    """Sequential Control.GetVm calls per second (a small VM): the unary reference."""
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while n < MAX_ROUND_TRIPS:
        await control.get_vm(vm_id)
        n += 1
        now = time.perf_counter()
        if now >= end:
            break
    return n / (now - start)


async def check_added(control: Control, vm_id: str, regions: int, what: str) -> None:
    """The VM has ``regions`` regions and the guest added every page of each (GetVm)."""
    vm = await control.get_vm(vm_id)
    short = [r.start_page for r in vm.regions if r.added_pages != r.page_count or r.unusable]
    if len(vm.regions) != regions or short:
        raise BenchError(
            f"{what}: {len(vm.regions)} regions (expected {regions}), "
            f"{len(short)} not fully added by the guest"
        )


async def hot_add_batched(
    control: Control, hv: Child, guest: Child, vm_id: str, count: int, regions: int
) -> dict[str, Any]:
    """``count`` hot-adds as one batched HotAdd (the VM has ``regions`` before it): the
    protocol's own pace."""
    watcher = Watcher(control, vm_id, COMMAND_KINDS + TROUBLE_KINDS)
    await watcher.start()
    try:
        before = await control.summary(vm_id)
        base = before.transactions.completed
        request = control_pb2.HotAddCommand(
            vm_id=vm_id, region_bytes=BLOCK, backed_bytes=BLOCK, count=count
        )
        cpu = Cpu(hv, guest)
        t0 = time.perf_counter()
        await control.hot_add(request)
        done = await settle(control, vm_id, base, count, watcher, "hot-add batch")
        hv_cpu, guest_cpu = cpu.used()
        await watcher.wait_commands_done(1, "hot-add batch")
    finally:
        await watcher.close()
    wall = done.at - t0
    spans = watcher.command_spans()
    if len(spans) != 1:
        raise BenchError(f"hot-add batch: {len(spans)} command spans, expected 1")
    completed = done.last.completed - base
    if completed != count:
        raise BenchError(f"hot-add batch: {completed} transactions completed, expected {count}")
    if done.last.size < count:
        raise BenchError(f"hot-add batch: Vm.transactions covers {done.last.size} of {count}")
    await check_added(control, vm_id, regions + count, "hot-add batch")
    rate = count / spans[0]
    return {
        "transactions": count,
        "span_s": round(spans[0], 4),
        "transactions_per_s": round(rate, 1),
        "p50_ms": done.last.p50_ms,
        "p99_ms": done.last.p99_ms,
        "max_ms": done.last.max_ms,
        "stats_window": done.last.size,
        "wall_s": round(wall, 3),
        "hypervisor_cpu_share": round(hv_cpu / wall, 3),
        "guest_cpu_share": round(guest_cpu / wall, 3),
        "hypervisor_cpu_ms_per_transaction": round(hv_cpu / count * 1000, 3),
        "guest_cpu_ms_per_transaction": round(guest_cpu / count * 1000, 3),
        "control_call_ms": ms(control.calls[-1]),
    }


async def hot_add_per_command(
    control: Control, hv: Child, guest: Child, vm_id: str, count: int, ceiling: float | None
) -> dict[str, Any]:
    """``count`` hot-adds, one HotAdd call each, DEPTH outstanding, with a full watcher."""
    regions = len((await control.get_vm(vm_id)).regions)
    watcher = Watcher(control, vm_id, HOT_ADD_KINDS + TROUBLE_KINDS)
    await watcher.start()
    calls = len(control.calls)
    try:
        request = control_pb2.HotAddCommand(vm_id=vm_id, region_bytes=BLOCK, backed_bytes=BLOCK)

        async def send(i: int) -> None:
            await control.hot_add(request)

        cpu = Cpu(hv, guest)
        t0 = time.perf_counter()
        await pipelined(send, count, watcher, 0, "hot-add per command")
        wall = time.perf_counter() - t0
        hv_cpu, guest_cpu = cpu.used()
    finally:
        await watcher.close()
    trips, first, last = round_trips(watcher.events)
    if len(trips) != count:
        raise BenchError(f"hot-add per command: {len(trips)} round trips paired for {count}")
    await check_added(control, vm_id, regions + count, "hot-add per command")
    rate = count / (last - first)
    return {
        "transactions": count,
        "transactions_per_s": round(rate, 1),
        "share_of_ceiling": None if ceiling is None else round(rate / ceiling, 3),
        "p50_ms": ms(percentile(trips, 50)),
        "p99_ms": ms(percentile(trips, 99)),
        "max_ms": ms(max(trips)),
        "wall_s": round(wall, 3),
        "hypervisor_cpu_share": round(hv_cpu / wall, 3),
        "guest_cpu_share": round(guest_cpu / wall, 3),
        "hypervisor_cpu_ms_per_transaction": round(hv_cpu / count * 1000, 3),
        "guest_cpu_ms_per_transaction": round(guest_cpu / count * 1000, 3),
        "control_call_p50_ms": ms(percentile(control.calls[calls:], 50)),
    }


async def bench_hot_add(procs: Processes, sizes: Sizes) -> dict[str, Any]:
    """Batched rounds, each between two ping-pong measurements on an echo server that
    runs beside the hypervisor and guest, then the per-command run.

    The ceiling swings with what else the machine does (2,200 to 7,000 round trips/s
    seen on the same machine within minutes), so each round's rate is set against the
    ceiling measured just before and just after it, and the median round is reported.
    """
    count = sizes.round_trips
    if count > STATS_WINDOW:
        raise BenchError(f"hot-add: {count} round trips exceed Vm.transactions' {STATS_WINDOW}")
    echo = await start_echo(procs)
    hv = await start_hypervisor(procs)
    vm_id = "rt"
    seconds = max(1.0, sizes.ceiling_s / 3)
    rounds: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(hv.address) as channel:
        control = Control(channel)
        await control.create_vm(vm_id, TIB)
        guest = await start_guest(procs, hv.address, vm_id)
        await control.wait_idle(vm_id)
        unary = await unary_rate(control, vm_id, sizes.ceiling_s)
        after = (await ping_pong(procs, echo.address, seconds))["round_trips_per_s"]
        for i in range(sizes.rounds):
            before = after
            batched = await hot_add_batched(control, hv, guest, vm_id, count, i * count)
            after = (await ping_pong(procs, echo.address, seconds))["round_trips_per_s"]
            ceiling = (before + after) / 2
            rounds.append(
                {
                    **batched,
                    "ceiling_before": before,
                    "ceiling_after": after,
                    "share_of_ceiling": round(batched["transactions_per_s"] / ceiling, 3),
                }
            )
        median = sorted(rounds, key=lambda r: r["share_of_ceiling"])[len(rounds) // 2]
        ceiling = (median["ceiling_before"] + median["ceiling_after"]) / 2
        per_command = await hot_add_per_command(control, hv, guest, vm_id, count, ceiling)
    await procs.stop(guest)
    await procs.stop(hv)
    await procs.stop(echo)
    return {
        **median,
        "rounds": rounds,
        "per_command": per_command,
        "unary_get_vm_per_s": round(unary, 1),
    }


# -- 3. growth to 1 TiB ---------------------------------------------------------------------


async def bench_growth(procs: Processes, sizes: Sizes) -> dict[str, Any]:
    hv = await start_hypervisor(procs)
    vm_id = "grow"
    target = sizes.grow_to_bytes
    regions = (target - BOOT) // BLOCK
    backed = 96 * MIB
    async with grpc.aio.insecure_channel(hv.address) as channel:
        control = Control(channel)
        await control.create_vm(vm_id, max(TIB, target))
        guest = await start_guest(procs, hv.address, vm_id)
        await control.wait_idle(vm_id)
        async with grpc.aio.insecure_channel(guest.address) as gchannel:
            introspection = guest_pb2_grpc.GuestIntrospectionStub(gchannel)
            before: guest_pb2.GuestMemory = await introspection.GetMemory(
                guest_pb2.GetMemoryRequest(), timeout=STALL
            )
            watcher = Watcher(control, vm_id, COMMAND_KINDS + TROUBLE_KINDS)
            await watcher.start()
            try:
                base = (await control.summary(vm_id)).transactions.completed
                cpu = Cpu(hv, guest)
                t0 = time.perf_counter()
                await control.hot_add(
                    control_pb2.HotAddCommand(
                        vm_id=vm_id, region_bytes=BLOCK, backed_bytes=backed, count=regions
                    )
                )
                grown = await settle(control, vm_id, base, regions, watcher, "grow")
                grow_cpu = cpu.used()
                t1 = time.perf_counter()
                await control.back(control_pb2.BackCommand(vm_id=vm_id, remaining=True))
                # One hole per region: its last 32 MiB.
                filled = await settle(control, vm_id, base + regions, regions, watcher, "back")
                hv_cpu, guest_cpu = cpu.used()
                await watcher.wait_commands_done(2, "growth")
            finally:
                await watcher.close()
            after: guest_pb2.GuestMemory = await introspection.GetMemory(
                guest_pb2.GetMemoryRequest(), timeout=120
            )
    await procs.stop(guest)
    await procs.stop(hv)
    spans = watcher.command_spans()
    if len(spans) != 2:
        raise BenchError(f"growth: {len(spans)} command spans, expected 2")
    hot_adds = grown.last.completed - base
    backs = filled.last.completed - grown.last.completed
    expected_added = regions * BLOCK // PAGE
    added = after.counters.num_pages_added
    mem_total_growth = (after.meminfo["MemTotal"] - before.meminfo["MemTotal"]) * 1024
    actual = filled.vm.actual_bytes
    checks = {
        "hot-add transactions": hot_adds == regions,
        "back transactions": backs == regions,
        "num_pages_added": added == expected_added,
        "MemTotal grew by the backed bytes": mem_total_growth == expected_added * PAGE,
        "actual_bytes": actual == BOOT + expected_added * PAGE,
        "no violations": not after.violations and filled.vm.violation_events == 0,
    }
    grow_s = grown.at - t0
    back_s = filled.at - t1
    wall = filled.at - t0
    transactions = hot_adds + backs
    windows = grown.windows + filled.windows
    bad = worst(windows)
    return {
        "target_bytes": target,
        "regions": regions,
        "hot_add_transactions": hot_adds,
        "back_transactions": backs,
        "complete": all(checks.values()),
        "wall_s": round(wall, 3),
        "grow_s": round(grow_s, 3),
        "back_s": round(back_s, 3),
        "grow_span_s": round(spans[0], 3),
        "back_span_s": round(spans[1], 3),
        "transactions_per_s": round(transactions / wall, 1),
        "grow_per_s": round(hot_adds / spans[0], 1),
        "back_per_s": round(backs / spans[1], 1),
        "grow_window": dataclasses.asdict(grown.last),
        "back_window": dataclasses.asdict(filled.last),
        "worst_window": dataclasses.asdict(bad),
        "grow_rates": window_rates(t0, base, grown.windows),
        "back_rates": window_rates(t1, base + regions, filled.windows),
        "windows_read": len(windows),
        "windows_cover_all": grown.covered and filled.covered,
        "max_ms": max(w.max_ms for w in windows),
        "control_calls_ms": [ms(c) for c in control.calls],
        "hypervisor_cpu_s": round(hv_cpu, 3),
        "guest_cpu_s": round(guest_cpu, 3),
        "hypervisor_cpu_share": round(hv_cpu / wall, 3),
        "guest_cpu_share": round(guest_cpu / wall, 3),
        "hypervisor_cpu_ms_per_transaction": round(hv_cpu / transactions * 1000, 3),
        "guest_cpu_ms_per_transaction": round(guest_cpu / transactions * 1000, 3),
        "grow_hypervisor_cpu_s": round(grow_cpu[0], 3),
        "grow_guest_cpu_s": round(grow_cpu[1], 3),
        "guest_mem_total_kb": after.meminfo["MemTotal"],
        "guest_num_pages_added": added,
        "expected_pages_added": expected_added,
        "actual_bytes": actual,
        "violations": [v.invariant for v in after.violations],
        "checks": checks,
    }


# -- 4. the fleet -----------------------------------------------------------------------------


def committed_seq(vm: control_pb2.Vm) -> int:
    """How many status reports of a loadgen guest arrived (its num_committed minus the base)."""
    pages = vm.committed_bytes // PAGE
    return pages - COMMITTED_BASE if pages >= COMMITTED_BASE else 0


async def bench_fleet(procs: Processes, sizes: Sizes, tmp: Path) -> dict[str, Any]:
    hv = await start_hypervisor(procs)
    prefix = "fleet-"
    per = [sizes.guests // sizes.loadgens] * sizes.loadgens
    for i in range(sizes.guests % sizes.loadgens):
        per[i] += 1
    loadgens: list[tuple[Child, Path]] = []
    first = 0
    setup0 = time.perf_counter()
    for i, count in enumerate(per):
        if count == 0:
            continue
        summary = tmp / f"loadgen{i}.json"
        argv = [
            sys.executable,
            str(BENCH / "loadgen.py"),
            "--hypervisor",
            hv.address,
            "--first",
            str(first),
            "--count",
            str(count),
            "--vm-prefix",
            prefix,
            "--summary",
            str(summary),
            "--max-seconds",
            str(sizes.fleet_s + 120),
        ]
        loadgens.append((await procs.start("loadgen", argv), summary))
        first += count
    setup = time.perf_counter() - setup0
    async with grpc.aio.insecure_channel(hv.address) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        listed: control_pb2.ListVmsResponse = await stub.ListVms(
            control_pb2.ListVmsRequest(), timeout=STALL
        )
        seq0 = {vm.spec.vm_id: committed_seq(vm) for vm in listed.vms}
        attached = sum(1 for vm in listed.vms if vm.attached and vm.spec.vm_id.startswith(prefix))
        idle = sum(1 for vm in listed.vms if vm.dm_state == "IDLE")
        cpu0, t0 = cpu_seconds(hv.pid), time.perf_counter()
        lg_cpu0 = sum(cpu_seconds(c.pid) for c, _ in loadgens)
        await asyncio.sleep(sizes.fleet_s)
        cpu1, t1 = cpu_seconds(hv.pid), time.perf_counter()
        lg_cpu1 = sum(cpu_seconds(c.pid) for c, _ in loadgens)
        listed = await stub.ListVms(control_pb2.ListVmsRequest(), timeout=STALL)
        seq1 = {vm.spec.vm_id: committed_seq(vm) for vm in listed.vms}
        for child, _ in loadgens:
            await procs.stop(child)
        listed = await stub.ListVms(control_pb2.ListVmsRequest(), timeout=STALL)
        final = {vm.spec.vm_id: committed_seq(vm) for vm in listed.vms}
    await procs.stop(hv)
    summaries = [json.loads(s.read_text()) for _, s in loadgens if s.exists()]
    if len(summaries) != len(loadgens):
        raise BenchError("a load generator wrote no summary")
    window = t1 - t0
    in_window = sum(seq1[v] - seq0.get(v, 0) for v in seq1)
    sent = sum(s["reports_sent"] for s in summaries)
    host_messages: dict[str, int] = {}
    for s in summaries:
        for k, v in s["host_messages"].items():
            host_messages[k] = host_messages.get(k, 0) + v
    return {
        "guests": sizes.guests,
        "loadgens": len(loadgens),
        "setup_s": round(setup, 3),
        "attached": attached,
        "negotiated": idle,
        "window_s": round(window, 3),
        "hypervisor_cpu_share": round((cpu1 - cpu0) / window, 4),
        "loadgen_cpu_share": round((lg_cpu1 - lg_cpu0) / window, 4),
        "reports_in_window": in_window,
        "reports_expected_in_window": round(sizes.guests * window),
        "hypervisor_cpu_ms_per_report": round((cpu1 - cpu0) / max(in_window, 1) * 1000, 3),
        "reports_sent": sent,
        "reports_received": sum(final.values()),
        "host_requests": host_messages,
        "errors": [e for s in summaries for e in s["errors"]],
    }


# -- 4. virtio-mem --------------------------------------------------------------------------


async def bench_virtio_mem(procs: Processes, sizes: Sizes) -> dict[str, Any]:
    size = sizes.virtio_mem_bytes
    hv = await start_hypervisor(procs, "--no-default-vm")
    async with grpc.aio.insecure_channel(hv.address) as channel:
        control = Control(channel)
        spec = control_pb2.VmSpec(
            vm_id="vmem",
            boot_bytes=VIRTIO_BOOT,
            block_size_bytes=BLOCK,
            protocol="virtio-mem",
            virtio_mem=control_pb2.VirtioMemSpec(
                region_size_bytes=size, block_size_bytes=DEVICE_BLOCK
            ),
        )
        await control.stub.CreateVm(control_pb2.CreateVmRequest(spec=spec), timeout=STALL)
        argv = memhp_command(
            "guest",
            "--hypervisor",
            hv.address,
            "--vm-id",
            "vmem",
            "--listen",
            "127.0.0.1:0",
            "--protocol",
            "virtio-mem",
            "--auto-online",
            "online_movable",
        )
        guest = await procs.start("guest-vmem-", argv, profile=True)
        async with grpc.aio.insecure_channel(guest.address) as guest_channel:
            introspection = guest_pb2_grpc.GuestIntrospectionStub(guest_channel)
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                memory = await introspection.GetMemory(guest_pb2.GetMemoryRequest(), timeout=STALL)
                if memory.virtio_mem.probed and not memory.virtio_mem.busy:
                    break
                if time.monotonic() > deadline:
                    raise BenchError("vmem: the virtio_mem driver did not probe")
                await asyncio.sleep(POLL)
            before_kb = memory.meminfo["MemTotal"]
            cpu = Cpu(hv, guest)
            t0 = time.perf_counter()
            await control.stub.Resize(
                control_pb2.ResizeRequest(vm_id="vmem", requested_bytes=size), timeout=STALL
            )
            call_s = time.perf_counter() - t0
            last, last_progress = -1, time.monotonic()
            while True:
                vm = await control.summary("vmem")
                plugged = vm.virtio_mem.plugged_bytes
                if plugged == size:
                    break
                if plugged != last:
                    last, last_progress = plugged, time.monotonic()
                elif time.monotonic() - last_progress > STALL:
                    raise BenchError(f"vmem: stuck at {plugged} of {size} bytes plugged")
                await asyncio.sleep(POLL)
            plugged_s = time.perf_counter() - t0
            used = cpu.used()
            # The driver has added and onlined the last block once it is idle.
            while True:
                memory = await introspection.GetMemory(guest_pb2.GetMemoryRequest(), timeout=STALL)
                if memory.virtio_mem.plugged_size == size and not memory.virtio_mem.busy:
                    break
                await asyncio.sleep(POLL)
            settled_s = time.perf_counter() - t0
            full = await control.get_vm("vmem")
            truth = guest_pb2.GetMemoryRequest(
                host_truth=True,
                host_backed=[
                    guest_pb2.PfnRange(start_pfn=r.start_page, end_pfn=r.start_page + r.page_cnt)
                    for r in full.virtio_mem.plugged
                ],
            )
            checked = await introspection.GetMemory(truth, timeout=STALL)
    plugs = full.virtio_mem.answered.get("plug:ack", 0)
    requests = sum(full.virtio_mem.answered.values())
    grown_kb = checked.meminfo["MemTotal"] - before_kb
    violations = [v.invariant for v in checked.violations]
    checks = {
        "plugged == requested": full.virtio_mem.plugged_bytes
        == full.virtio_mem.requested_bytes
        == size,
        "driver plugged": checked.virtio_mem.plugged_size == size,
        "MemTotal grew by the device": grown_kb == size // 1024,
        "no refusals": full.virtio_mem.protocol_errors == 0 and plugs == requests,
        "no violations": not violations and full.virtio_mem.violations == 0,
    }
    return {
        "device_bytes": size,
        "device_block_bytes": DEVICE_BLOCK,
        "memory_block_bytes": BLOCK,
        "mode": checked.virtio_mem.mode,
        "subblock_bytes": checked.virtio_mem.unit_size,
        "plug_requests": plugs,
        "requests": requests,
        "resize_call_ms": ms(call_s),
        "plugged_s": round(plugged_s, 3),
        "settled_s": round(settled_s, 3),
        "gib_per_s": round(size / GIB / settled_s, 1),
        "plug_requests_per_s": round(plugs / plugged_s, 1),
        "hypervisor_cpu_s": round(used[0], 2),
        "guest_cpu_s": round(used[1], 2),
        "hypervisor_cpu_ms_per_request": round(used[0] * 1e3 / max(requests, 1), 3),
        "guest_cpu_ms_per_request": round(used[1] * 1e3 / max(requests, 1), 3),
        "guest_mem_total_grew_kb": grown_kb,
        "blocks_added": sum(1 for b in checked.virtio_mem.blocks if b.state != "unused"),
        "violations": violations,
        "checks": checks,
    }


# -- 6. split: what each side adds -----------------------------------------------------------


def peer_command(role: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / "dm_peers.py"), role, *args]


def added_us(rate: float, ceiling: float) -> float:
    """Microseconds a transaction at ``rate`` takes beyond a ping-pong at ``ceiling``."""
    return round((1 / rate - 1 / ceiling) * 1e6, 1)


async def bench_split(procs: Processes, sizes: Sizes) -> dict[str, Any]:
    """Batched 128 MiB hot-adds with one side replaced by a minimal peer
    (``bench/dm_peers.py``): the hypervisor against a guest with no model, and a host
    with no session against the real guest; each next to the ping-pong measured just
    before it."""
    count = sizes.round_trips
    seconds = max(1.0, sizes.ceiling_s / 3)
    echo = await start_echo(procs)
    ceiling_hv = (await ping_pong(procs, echo.address, seconds))["round_trips_per_s"]
    hv = await start_hypervisor(procs)
    vm_id = "split"
    async with grpc.aio.insecure_channel(hv.address) as channel:
        control = Control(channel)
        await control.create_vm(vm_id, TIB)
        minimal_guest = await procs.start(
            "dm-guest", peer_command("guest", "--hypervisor", hv.address, "--vm-id", vm_id)
        )
        await control.wait_idle(vm_id)
        real_hv = await hot_add_batched(control, hv, minimal_guest, vm_id, count, 0)
    await procs.stop(minimal_guest)
    await procs.stop(hv)
    ceiling_guest = (await ping_pong(procs, echo.address, seconds))["round_trips_per_s"]
    out = procs.log_dir / f"dm-host-{time.monotonic_ns()}.json"
    host = await procs.start(
        "dm-host", peer_command("host", "--count", str(count), "--out", str(out))
    )
    guest = await start_guest(procs, host.address, vm_id)
    deadline = time.monotonic() + STALL + count / 100
    while not out.exists():
        if time.monotonic() > deadline:
            raise BenchError("split: the minimal host never finished its hot-adds")
        await asyncio.sleep(POLL)
    real_guest: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    if real_guest["failed"]:
        raise BenchError(
            f"split: the real guest failed {real_guest['failed']} of {count} hot-adds "
            "(result 0, or fewer pages than asked)"
        )
    await procs.stop(guest)
    await procs.stop(host)
    await procs.stop(echo)
    hv_rate, guest_rate = real_hv["transactions_per_s"], real_guest["transactions_per_s"]
    return {
        "transactions": count,
        "hypervisor_with_minimal_guest": {
            "transactions_per_s": hv_rate,
            "ceiling": ceiling_hv,
            "share_of_ceiling": round(hv_rate / ceiling_hv, 3),
            "added_us": added_us(hv_rate, ceiling_hv),
            "hypervisor_cpu_ms_per_transaction": real_hv["hypervisor_cpu_ms_per_transaction"],
        },
        "guest_with_minimal_host": {
            "transactions_per_s": guest_rate,
            "ceiling": ceiling_guest,
            "share_of_ceiling": round(guest_rate / ceiling_guest, 3),
            "added_us": added_us(guest_rate, ceiling_guest),
        },
    }


# -- the run -------------------------------------------------------------------------------


PARTS = ("ceiling", "hot-add", "growth", "virtio-mem", "fleet", "split")


async def run(
    sizes: Sizes,
    parts: Iterable[str],
    log: Callable[[str], None],
    *,
    profile_dir: Path | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    wanted = set(parts)
    result: dict[str, Any] = {
        "machine": machine(),
        "code": code_version(),
        "quick": sizes.name == "quick",
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        procs = Processes(log_dir or Path(tmp), profile_dir)
        try:
            if "ceiling" in wanted:
                log("1/6 ceiling: raw grpc.aio bidi ping-pong")
                result["ceiling"] = await bench_ceiling(procs, sizes.ceiling_s)
            if "hot-add" in wanted:
                log(
                    f"2/6 hot-add round trips ({sizes.rounds} x {sizes.round_trips} x 128 MiB, "
                    "each between two ceiling measurements)"
                )
                result["hot_add"] = await bench_hot_add(procs, sizes)
            if "growth" in wanted:
                log(f"3/6 growth: 4 GiB -> {sizes.grow_to_bytes / GIB:.0f} GiB")
                result["growth"] = await bench_growth(procs, sizes)
            if "virtio-mem" in wanted:
                log(
                    f"4/6 virtio-mem: resize 0 -> {sizes.virtio_mem_bytes / GIB:.0f} GiB "
                    "in 2 MiB device blocks"
                )
                result["virtio_mem"] = await bench_virtio_mem(procs, sizes)
            if "fleet" in wanted:
                log(f"5/6 fleet: {sizes.guests} guests for {sizes.fleet_s:.0f} s")
                result["fleet"] = await bench_fleet(procs, sizes, Path(tmp))
            if "split" in wanted:
                log(f"6/6 split: {sizes.round_trips} hot-adds against a minimal guest, then host")
                result["split"] = await bench_split(procs, sizes)
        except (BenchError, ChildFailed, grpc.aio.AioRpcError, TimeoutError, ValueError) as err:
            result["error"] = f"{type(err).__name__}: {err}"
            tails = procs.tails()
            if tails:
                result["error"] += "\n" + tails
        finally:
            await procs.stop_all()
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return result


def passed(result: dict[str, Any]) -> bool:
    if "error" in result:
        return False
    growth, fleet = result.get("growth"), result.get("fleet")
    if growth is not None and not all(growth["checks"].values()):
        return False
    vmem = result.get("virtio_mem")
    if vmem is not None and not all(vmem["checks"].values()):
        return False
    return fleet is None or (
        fleet["attached"] == fleet["guests"] and not fleet["errors"] and not fleet["host_requests"]
    )


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def rows(r: dict[str, Any]) -> list[Row]:
    out: list[Row] = [
        ("machine", r["machine"], ""),
        ("code", r["code"], ""),
        (
            "load average (1 min) at start / end",
            f"{r['load_average_at_start']} / {r.get('load_average_at_end', '?')}",
            "",
        ),
    ]
    c = r.get("ceiling")
    if c:
        out += [
            ("1. raw bidi ping-pong: round trips/s (ceiling)", c["round_trips_per_s"], ""),
            ("   round trip p50 / p99 (ms)", f"{c['p50_ms']} / {c['p99_ms']}", ""),
            (
                "   echo server CPU share, per round trip (ms)",
                f"{c['echo_cpu_share']:.0%}, {c['echo_cpu_ms_per_round_trip']}",
                "",
            ),
            ("   GRPC_EXPERIMENTS (memhp's transport)", c["grpc_experiments"] or "(empty)", ""),
            (
                "   the same with gRPC's defaults (EventEngine): round trips/s",
                c["grpc_default"]["round_trips_per_s"],
                "",
            ),
        ]
    h = r.get("hot_add")
    if h:
        share = h["share_of_ceiling"]
        rounds = h["rounds"]
        out += [
            (
                f"2. hot-add 128 MiB, batched HotAdd (count {h['transactions']}), "
                f"{len(rounds)} rounds: transactions/s (median round)",
                h["transactions_per_s"],
                "",
            ),
            (
                "   share of the ceiling measured around the round (median round)",
                f"{share:.0%}",
                f">= 80 % {mark(share >= 0.8)}",
            ),
        ]
        for i, rd in enumerate(rounds, 1):
            out.append(
                (
                    f"     round {i}: ceiling before / after, transactions/s, share",
                    f"{rd['ceiling_before']:.0f} / {rd['ceiling_after']:.0f}, "
                    f"{rd['transactions_per_s']:.0f}, {rd['share_of_ceiling']:.0%}",
                    "",
                )
            )
        out += [
            (
                f"   round trip p50 (ms, Vm.transactions over {h['stats_window']})",
                h["p50_ms"],
                "",
            ),
            ("   round trip p99 (ms)", h["p99_ms"], f"<= 3 ms {mark(h['p99_ms'] <= 3)}"),
            ("   round trip max (ms)", h["max_ms"], ""),
            (
                "   first request to last response / to the poll that saw it (s)",
                f"{h['span_s']} / {h['wall_s']}",
                "",
            ),
            ("   the HotAdd Control call (ms)", h["control_call_ms"], ""),
            (
                "   hypervisor / guest CPU share",
                f"{h['hypervisor_cpu_share']:.0%} / {h['guest_cpu_share']:.0%}",
                "",
            ),
            (
                "   hypervisor / guest CPU per transaction (ms)",
                f"{h['hypervisor_cpu_ms_per_transaction']} / {h['guest_cpu_ms_per_transaction']}",
                "",
            ),
        ]
        p = h["per_command"]
        pshare = p["share_of_ceiling"]
        out += [
            (
                "   one Control call per transaction, with a WatchEvents watcher: transactions/s",
                p["transactions_per_s"],
                "",
            ),
        ]
        if pshare is not None:
            out.append(("     share of the ceiling", f"{pshare:.0%}", ""))
        out += [
            (
                "     round trip p50 / p99 / max (ms, from the events)",
                f"{p['p50_ms']} / {p['p99_ms']} / {p['max_ms']}",
                "",
            ),
            ("     Control.HotAdd call p50 (ms)", p["control_call_p50_ms"], ""),
            (
                "     hypervisor / guest CPU share",
                f"{p['hypervisor_cpu_share']:.0%} / {p['guest_cpu_share']:.0%}",
                "",
            ),
            (
                "     hypervisor / guest CPU per transaction (ms)",
                f"{p['hypervisor_cpu_ms_per_transaction']} / {p['guest_cpu_ms_per_transaction']}",
                "",
            ),
            ("   reference: sequential Control.GetVm calls/s", h["unary_get_vm_per_s"], ""),
        ]
    g = r.get("growth")
    if g:
        target_gib = g["target_bytes"] / GIB
        checks = g["checks"]
        wall_ok = g["complete"] and g["wall_s"] < 10
        gw, bw, ww = g["grow_window"], g["back_window"], g["worst_window"]
        out += [
            (
                f"3. growth 4 GiB -> {target_gib:.0f} GiB, one batched HotAdd "
                "(96 of each 128 MiB backed): hot-adds",
                f"{g['hot_add_transactions']} / {g['regions']}",
                f"all {mark(checks['hot-add transactions'])}",
            ),
            (
                "   then one Back(remaining): backs",
                f"{g['back_transactions']} / {g['regions']}",
                f"all {mark(checks['back transactions'])}",
            ),
            ("   wall time (s): hot-add + back", f"{g['grow_s']} + {g['back_s']}", ""),
            ("   wall time total (s)", g["wall_s"], f"< 10 s {mark(wall_ok)}"),
            (
                "   first request to last response (s): hot-add + back",
                f"{g['grow_span_s']} + {g['back_span_s']}",
                "",
            ),
            (
                "   the HotAdd / Back Control calls (ms)",
                " / ".join(map(str, g["control_calls_ms"])),
                "",
            ),
            ("   transactions/s (wall)", g["transactions_per_s"], ""),
            ("   hot-adds/s, backs/s", f"{g['grow_per_s']}, {g['back_per_s']}", ""),
            (
                "   transactions/s between windows read: hot-add | back",
                " ".join(map(str, g["grow_rates"])) + " | " + " ".join(map(str, g["back_rates"])),
                "",
            ),
            (
                f"   round trip p50 / p99 / max (ms): last {gw['size']} hot-adds",
                f"{gw['p50_ms']} / {gw['p99_ms']} / {gw['max_ms']}",
                "",
            ),
            (
                f"   round trip p50 / p99 / max (ms): last {bw['size']} transactions",
                f"{bw['p50_ms']} / {bw['p99_ms']} / {bw['max_ms']}",
                "",
            ),
            (
                f"   round trip p99, max (ms): worst of {g['windows_read']} windows "
                f"(cover all: {g['windows_cover_all']})",
                f"{ww['p99_ms']} (window of {ww['size']} to #{ww['completed']}), {g['max_ms']}",
                "",
            ),
            (
                "   hypervisor / guest CPU (s)",
                f"{g['hypervisor_cpu_s']} / {g['guest_cpu_s']}",
                "",
            ),
            (
                "   hypervisor / guest CPU share",
                f"{g['hypervisor_cpu_share']:.0%} / {g['guest_cpu_share']:.0%}",
                "",
            ),
            (
                "   hypervisor / guest CPU per transaction (ms)",
                f"{g['hypervisor_cpu_ms_per_transaction']} / {g['guest_cpu_ms_per_transaction']}",
                "",
            ),
            ("   guest MemTotal (kB)", g["guest_mem_total_kb"], ""),
            (
                "   guest num_pages_added",
                g["guest_num_pages_added"],
                f"{g['expected_pages_added']} {mark(checks['num_pages_added'])}",
            ),
            ("   ListVms actual_bytes", g["actual_bytes"], mark(checks["actual_bytes"])),
            (
                "   MemTotal grew by the backed bytes",
                checks["MemTotal grew by the backed bytes"],
                "True",
            ),
            ("   violations", ", ".join(g["violations"]) or "none", "none"),
        ]
    v = r.get("virtio_mem")
    if v:
        vchecks = v["checks"]
        out += [
            (
                f"4. virtio-mem: resize 0 -> {v['device_bytes'] / GIB:.0f} GiB in "
                f"{v['device_block_bytes'] // MIB} MiB device blocks ({v['mode']}, "
                f"{v['subblock_bytes'] // MIB} MiB subblocks, "
                f"{v['memory_block_bytes'] // MIB} MiB memory blocks): GiB/s",
                v["gib_per_s"],
                "",
            ),
            (
                "   PLUG requests, per second",
                f"{v['plug_requests']}, {v['plug_requests_per_s']}",
                "",
            ),
            (
                "   wall time (s): to all plugged / to the driver settled",
                f"{v['plugged_s']} / {v['settled_s']}",
                "",
            ),
            (
                "   hypervisor / guest CPU (s)",
                f"{v['hypervisor_cpu_s']} / {v['guest_cpu_s']}",
                "",
            ),
            (
                "   hypervisor / guest CPU per request (ms)",
                f"{v['hypervisor_cpu_ms_per_request']} / {v['guest_cpu_ms_per_request']}",
                "",
            ),
            ("   memory blocks added", v["blocks_added"], ""),
            (
                "   plugged == requested, MemTotal grew by the device",
                f"{vchecks['plugged == requested']}, {vchecks['MemTotal grew by the device']}",
                "True, True",
            ),
            ("   violations", ", ".join(v["violations"]) or "none", "none"),
        ]
    f = r.get("fleet")
    if f:
        share = f["hypervisor_cpu_share"]
        out += [
            ("5. fleet: guests attached (ListVms)", f"{f['attached']} / {f['guests']}", "all"),
            ("   negotiated (dm_state IDLE)", f["negotiated"], "all"),
            ("   load generators, setup (s)", f"{f['loadgens']}, {f['setup_s']}", ""),
            ("   window (s)", f["window_s"], ""),
            ("   hypervisor CPU share of one core", f"{share:.1%}", f"< 25 % {mark(share < 0.25)}"),
            ("   load generators' CPU share", f"{f['loadgen_cpu_share']:.1%}", ""),
            (
                "   status reports in the window",
                f"{f['reports_in_window']} / ~{f['reports_expected_in_window']}",
                "",
            ),
            ("   hypervisor CPU per report (ms)", f["hypervisor_cpu_ms_per_report"], ""),
            (
                "   status reports received / sent (all)",
                f"{f['reports_received']} / {f['reports_sent']}",
                "",
            ),
            ("   host requests to the guests", f["host_requests"] or "none", "none"),
        ]
    sp = r.get("split")
    if sp:
        hvs, gs = sp["hypervisor_with_minimal_guest"], sp["guest_with_minimal_host"]
        out += [
            (
                f"6. split, batched hot-adds (count {sp['transactions']}): the hypervisor with "
                "a guest that has no model: transactions/s",
                f"{hvs['transactions_per_s']:.0f} = {hvs['share_of_ceiling']:.0%} of "
                f"{hvs['ceiling']:.0f}",
                "",
            ),
            ("   us per transaction beyond the ping-pong", hvs["added_us"], ""),
            (
                "   a host with no session and the real guest: transactions/s",
                f"{gs['transactions_per_s']:.0f} = {gs['share_of_ceiling']:.0%} of "
                f"{gs['ceiling']:.0f}",
                "",
            ),
            ("   us per transaction beyond the ping-pong", gs["added_us"], ""),
        ]
    if "error" in r:
        out.append(("error", r["error"].splitlines()[0], ""))
    return out


def print_table(table: list[Row]) -> None:
    width = max(len(name) for name, _, _ in table)
    vwidth = max((len(str(v)) for _, v, _ in table[2:]), default=8)
    print(f"{'figure':<{width}}  {'measured':<{vwidth}}  target")
    for name, value, target in table:
        print(f"{name:<{width}}  {value!s:<{vwidth}}  {target}".rstrip())


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    for path in (args.profile, args.logs):
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if args.quick else FULL
    return await run(sizes, args.only or PARTS, log, profile_dir=args.profile, log_dir=args.logs)


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster smoke run")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the hypervisors and guests under cProfile, writing DIR/NAME.prof "
        "(slower; the figures are then not comparable)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="run only this part (repeatable; default: all)",
    )
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep the children's logs in DIR")
    args = parser.parse_args()
    try:
        result = asyncio.run(amain(args))
    except asyncio.CancelledError:
        print("bench_wire: interrupted; every child stopped", file=sys.stderr)
        return 130
    ok = passed(result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(rows(result))
        if "error" in result:
            print(result["error"], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
