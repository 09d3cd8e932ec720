"""Benchmark of the processes over gRPC: the raw ceiling, hot-add round trips, growth, a fleet.

    python bench/bench_wire.py [--json] [--quick] [--only PART]... [--growth-budget S]
                               [--profile DIR] [--logs DIR]

Everything runs in one go on this machine, over loopback, with real processes that are
started with ``--ready-file`` on port 0 and stopped by their PID at the end:

1. **Ceiling.** ``bench/wire_echo.py`` echoes every DM frame; this process writes a
   ``DmFrame`` on one ``Connect`` stream and reads the echo, one at a time, for ~3 s:
   round trips per second, the most a DM stream can carry here.
2. **Hot-add round trip.** A ``memhp hypervisor`` and a ``memhp guest`` (auto-online
   online, 128 MiB blocks, 4 GiB boot, 1 TiB max); ``Control.HotAdd`` of a 128 MiB region,
   fully backed, issued again and again with a few commands queued behind the one in
   flight. Round trips come from the hypervisor's own ``WatchEvents`` timestamps:
   ``hot_add_request`` to the ``hot_add_response`` of the same ``trans_id``. Transactions
   per second (first request to last response) as a share of the ceiling; for
   reference, sequential ``Control.GetVm`` calls per second on the same hypervisor.
3. **Growth to 1 TiB.** Another VM grown from 4 GiB in 128 MiB regions of which 96 MiB
   are backed (24-byte form), then every region's last 32 MiB backed with ``Back``
   at an explicit ``start_page`` (16-byte form). Wall time from the first command to
   the last response, and the guest's final state from its introspection
   (``GetMemory``: MemTotal, ``num_pages_added``, violations) and ``GetVm``
   (``actual_bytes``). The part has a time budget (110 s; ``--growth-budget``): it stops
   hot-adding while backing what it added still fits, so the run stays bounded when the
   servers are slow. The table then says how far it got, and projects the full growth
   from a linear fit of the time per transaction against the number of regions.
4. **Fleet.** A fresh hypervisor and 200 guests (``bench/loadgen.py``: a few processes,
   each guest on its own channel and ``Connect`` stream, attach, version and
   capabilities negotiation, one status report a second). The hypervisor's CPU share
   over ~20 s from ``/proc/PID/stat`` (utime + stime, all its threads), the guests
   attached (``ListVms``) and the reports that arrived (each report's
   ``num_committed`` counts the guest's reports, so ``committed_bytes`` says how many
   arrived; no watcher runs during the window).

``--quick`` shrinks every part for a smoke run (1 s ceiling, 200 hot-adds, growth to
64 GiB, 50 guests for 5 s). ``--json`` prints the figures as JSON. ``--only`` runs some
parts (ceiling, hot-add, growth, fleet). ``--profile DIR`` runs the hypervisors and
guests under cProfile (``DIR/NAME.prof``, written when they stop), to see where their
time goes; ``--logs DIR`` keeps the children's logs.
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
from google.protobuf.message import Message
from loadgen import COMMITTED_BASE
from machine import describe

from memhp.procs import Child, ChildFailed, memhp_command, start_child
from memhp.v1 import control_pb2, control_pb2_grpc, dm_pb2, dm_pb2_grpc, guest_pb2, guest_pb2_grpc

BENCH = Path(__file__).resolve().parent
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
PAGE = 4096
BLOCK = 128 * MIB
BOOT = 4 * GIB
#: Commands the benchmark keeps outstanding (the one in flight plus queued; the host takes 16).
DEPTH = 4
#: Seconds without progress after which a part gives up.
STALL = 30.0
#: Seconds to wait for a child, an attach or a negotiation.
START_TIMEOUT = 60.0
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
#: Events that mean something went wrong with the commands the benchmark sent.
TROUBLE_KINDS = ("protocol_error", "reset", "command_dropped", "region_unusable", "detach")


@dataclasses.dataclass(frozen=True)
class Sizes:
    name: str
    ceiling_s: float
    round_trips: int
    #: The size the growth part grows the guest to (from BOOT).
    grow_to_bytes: int
    #: Seconds the growth part may take (hot-add and back): it stops hot-adding while
    #: backing what it added still fits, at the rate it is going.
    growth_budget_s: float
    guests: int
    loadgens: int
    fleet_s: float


FULL = Sizes("full", 3.0, 500, 1 * TIB, 110.0, 200, 4, 20.0)
QUICK = Sizes("quick", 1.0, 200, 64 * GIB, 30.0, 50, 4, 5.0)

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
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


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

    async def start(self, name: str, argv: list[str], *, profile: bool = False) -> Child:
        """Start ``argv``; ``profile``: a Python child runs under cProfile (--profile DIR)."""
        n = self._names.get(name, 0)
        self._names[name] = n + 1
        if profile and self.profile_dir is not None:
            out = self.profile_dir / f"{name}{n}.prof"
            argv = [argv[0], "-m", "cProfile", "-o", str(out), *argv[1:]]
        child = await start_child(f"{name}{n}", argv, timeout=START_TIMEOUT, log_dir=self.log_dir)
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


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class Control:
    """Control stubs; commands whose (growing) Vm answer is kept as bytes, never parsed."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = control_pb2_grpc.ControlStub(channel)
        self._raw: dict[str, Any] = {
            name: channel.unary_unary(
                f"/memhp.v1.Control/{name}",
                request_serializer=_serialize,
                response_deserializer=None,
            )
            for name in ("HotAdd", "Back")
        }
        #: (seconds, response bytes) of every raw command, in order.
        self.calls: list[tuple[float, int]] = []

    async def command(self, name: str, request: Message) -> None:
        t0 = time.perf_counter()
        reply: bytes = await self._raw[name](request, timeout=STALL)
        self.calls.append((time.perf_counter() - t0, len(reply)))

    async def get_vm(self, vm_id: str) -> control_pb2.Vm:
        vm: control_pb2.Vm = await self.stub.GetVm(
            control_pb2.GetVmRequest(vm_id=vm_id), timeout=STALL
        )
        return vm

    async def create_vm(self, vm_id: str, max_bytes: int) -> None:
        spec = control_pb2.VmSpec(
            vm_id=vm_id, boot_bytes=BOOT, max_bytes=max_bytes, block_size_bytes=BLOCK
        )
        await self.stub.CreateVm(control_pb2.CreateVmRequest(spec=spec), timeout=STALL)

    async def wait_idle(self, vm_id: str) -> None:
        """Until the guest is attached and negotiated (the host session is IDLE)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            vm = await self.get_vm(vm_id)
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
    stop: Callable[[int], bool],
    what: str,
) -> int:
    """Issue ``count`` commands keeping at most DEPTH unanswered, until ``stop(issued)``.

    ``already`` is the number of hot-add responses the watcher had before. Returns how
    many commands were issued (all of them answered when this returns).
    """
    issued = 0
    while issued < count and not stop(issued):
        while issued - (watcher.responses - already) >= DEPTH:
            await watcher.wait_responses(already + issued - DEPTH + 1, what)
        await send(issued)
        issued += 1
    await watcher.wait_responses(already + issued, what)
    return issued


def tenth_rates(times: list[float]) -> tuple[float, float]:
    """Responses per second over the first and the last tenth of ``times``."""
    k = max(2, len(times) // 10)
    if len(times) < k:
        return float("nan"), float("nan")
    first = (k - 1) / max(times[k - 1] - times[0], 1e-9)
    last = (k - 1) / max(times[-1] - times[-k], 1e-9)
    return round(first, 1), round(last, 1)


def project_growth(grow: list[float], back: list[float], regions: int) -> dict[str, float]:
    """What growing to ``regions`` regions and backing them would take at the measured costs.

    A linear fit of the time between two hot-add responses against the region count
    (``a + b * n``) gives the hot-add phase (``a N + b N^2 / 2``); every back of a full
    run costs the measured back interval plus ``b`` per region beyond those measured.
    """
    if len(grow) < 10 or len(back) < 10:
        return {}
    xs = list(range(1, len(grow)))
    ys = [grow[i] - grow[i - 1] for i in xs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    n = len(grow)
    per_back = (back[-1] - back[0]) / (len(back) - 1) + b * (regions - n)
    hot_add = a * regions + b * regions**2 / 2
    return {
        "per_transaction_ms_at_0": ms(a),
        "per_transaction_us_per_region": round(b * 1e6, 3),
        "projected_full_s": round(hot_add + regions * per_back, 1),
    }


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


# -- 1. the ceiling ----------------------------------------------------------------------


async def bench_ceiling(procs: Processes, seconds: float) -> dict[str, Any]:
    echo = await procs.start("wire-echo", [sys.executable, str(BENCH / "wire_echo.py")])
    frame = dm_pb2.DmFrame(
        trans_id=1,
        hot_add_request=dm_pb2.HotAddRequest(
            range=dm_pb2.PageRange(start_page=1 << 20, page_cnt=BLOCK // PAGE),
            region=dm_pb2.PageRange(start_page=1 << 20, page_cnt=BLOCK // PAGE),
        ),
    )
    msg = dm_pb2.GuestToHost(frame=frame)
    trips: list[float] = []
    async with grpc.aio.insecure_channel(echo.address) as channel:
        call = dm_pb2_grpc.DynamicMemoryStub(channel).Connect(None)
        try:
            for _ in range(WARMUP):
                await call.write(msg)
                await call.read()
            cpu0 = cpu_seconds(echo.pid)
            start = time.perf_counter()
            end = start + seconds
            now = start
            while now < end and len(trips) < MAX_ROUND_TRIPS:
                await call.write(msg)
                reply = await call.read()
                if not isinstance(reply, dm_pb2.HostToGuest):
                    raise BenchError("the echo server ended the stream")
                t = time.perf_counter()
                trips.append(t - now)
                now = t
            elapsed = now - start
            echo_cpu = cpu_seconds(echo.pid) - cpu0
        finally:
            call.cancel()
    await procs.stop(echo)
    return {
        "round_trips": len(trips),
        "seconds": round(elapsed, 3),
        "round_trips_per_s": round(len(trips) / elapsed, 1),
        "p50_ms": ms(percentile(trips, 50)),
        "p99_ms": ms(percentile(trips, 99)),
        "echo_cpu_share": round(echo_cpu / elapsed, 3),
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


async def bench_hot_add(procs: Processes, sizes: Sizes, ceiling: float | None) -> dict[str, Any]:
    count = sizes.round_trips
    hv = await start_hypervisor(procs)
    vm_id = "rt"
    async with grpc.aio.insecure_channel(hv.address) as channel:
        control = Control(channel)
        await control.create_vm(vm_id, TIB)
        guest = await start_guest(procs, hv.address, vm_id)
        await control.wait_idle(vm_id)
        unary = await unary_rate(control, vm_id, sizes.ceiling_s)
        watcher = Watcher(control, vm_id, HOT_ADD_KINDS + TROUBLE_KINDS)
        await watcher.start()
        try:
            request = control_pb2.HotAddCommand(vm_id=vm_id, region_bytes=BLOCK, backed_bytes=BLOCK)

            async def send(i: int) -> None:
                await control.command("HotAdd", request)

            cpu0 = cpu_seconds(hv.pid)
            wall0 = time.perf_counter()
            deadline = time.monotonic() + 120

            def late(issued: int) -> bool:
                return time.monotonic() > deadline

            done = await pipelined(send, count, watcher, 0, late, "hot-add")
            wall = time.perf_counter() - wall0
            hv_cpu = cpu_seconds(hv.pid) - cpu0
            vm = await control.get_vm(vm_id)
        finally:
            await watcher.close()
    await procs.stop(guest)
    await procs.stop(hv)
    trips, first, last = round_trips(watcher.events)
    if len(trips) != done:
        raise BenchError(f"hot-add: {len(trips)} round trips paired for {done} commands")
    added = sum(r.added_pages for r in vm.regions)
    if added != done * BLOCK // PAGE:
        raise BenchError(f"hot-add: the guest added {added} pages, expected {done * BLOCK // PAGE}")
    span = last - first
    rate = done / span
    tenth = max(1, done // 10)
    rate_first, rate_last = tenth_rates(watcher.response_at)
    calls = control.calls
    return {
        "transactions": done,
        "transactions_per_s": round(rate, 1),
        "share_of_ceiling": None if ceiling is None else round(rate / ceiling, 3),
        "unary_get_vm_per_s": round(unary, 1),
        "p50_ms": ms(percentile(trips, 50)),
        "p99_ms": ms(percentile(trips, 99)),
        "max_ms": ms(max(trips)),
        "p50_first_tenth_ms": ms(percentile(trips[:tenth], 50)),
        "p50_last_tenth_ms": ms(percentile(trips[-tenth:], 50)),
        "per_s_first_tenth": rate_first,
        "per_s_last_tenth": rate_last,
        "wall_s": round(wall, 3),
        "hypervisor_cpu_share": round(hv_cpu / wall, 3),
        "control_call_p50_ms": ms(percentile([c for c, _ in calls], 50)),
        "control_reply_bytes_last": calls[-1][1],
        "actual_bytes": vm.actual_bytes,
    }


# -- 3. growth to 1 TiB ---------------------------------------------------------------------


async def bench_growth(procs: Processes, sizes: Sizes) -> dict[str, Any]:
    hv = await start_hypervisor(procs)
    vm_id = "grow"
    target = sizes.grow_to_bytes
    regions = (target - BOOT) // BLOCK
    backed = 96 * MIB
    rest = BLOCK - backed
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
            watcher = Watcher(control, vm_id, HOT_ADD_KINDS + TROUBLE_KINDS)
            await watcher.start()
            try:
                grow_req = control_pb2.HotAddCommand(
                    vm_id=vm_id, region_bytes=BLOCK, backed_bytes=backed
                )

                async def grow(i: int) -> None:
                    await control.command("HotAdd", grow_req)

                budget_end = time.monotonic() + sizes.growth_budget_s

                def enough(issued: int) -> bool:
                    """Stop growing while backing every region still fits in the budget."""
                    done = watcher.response_at
                    if len(done) < 100:
                        return time.monotonic() > budget_end
                    # A back costs about what a hot-add costs at the same region count.
                    per = (done[-1] - done[-100]) / 99
                    return time.monotonic() + 1.1 * per * issued > budget_end

                def late(issued: int) -> bool:
                    return time.monotonic() > budget_end

                cpu0 = cpu_seconds(hv.pid)
                guest_cpu0 = cpu_seconds(guest.pid)
                t0 = time.perf_counter()
                grown = await pipelined(grow, regions, watcher, 0, enough, "grow")
                t1 = time.perf_counter()
                grow_calls = list(control.calls)
                starts = [
                    int(e.payload.fields["region"].list_value.values[0].number_value)
                    for e in watcher.events
                    if e.kind == "hot_add_request"
                ]
                if len(starts) != grown:
                    raise BenchError(f"grow: {len(starts)} hot-add requests for {grown} commands")

                async def back(i: int) -> None:
                    req = control_pb2.BackCommand(
                        vm_id=vm_id, size_bytes=rest, start_page=starts[i] + backed // PAGE
                    )
                    await control.command("Back", req)

                backed_regions = await pipelined(back, grown, watcher, grown, late, "back")
                t2 = time.perf_counter()
                hv_cpu = cpu_seconds(hv.pid) - cpu0
                guest_cpu = cpu_seconds(guest.pid) - guest_cpu0
                back_calls = control.calls[len(grow_calls) :]
            finally:
                await watcher.close()
            vm = await control.get_vm(vm_id)
            after: guest_pb2.GuestMemory = await introspection.GetMemory(
                guest_pb2.GetMemoryRequest(), timeout=120
            )
    await procs.stop(guest)
    await procs.stop(hv)
    trips, _, _ = round_trips(watcher.events)
    grown_bytes = grown * BLOCK
    complete = grown == regions and backed_regions == grown
    expected_added = (grown * backed + backed_regions * rest) // PAGE
    added = after.counters.num_pages_added
    mem_total_growth = (after.meminfo["MemTotal"] - before.meminfo["MemTotal"]) * 1024
    checks = {
        "num_pages_added": added == expected_added,
        "MemTotal grew by the backed bytes": mem_total_growth == expected_added * PAGE,
        "actual_bytes": vm.actual_bytes == BOOT + expected_added * PAGE,
        "no violations": not after.violations,
    }
    wall = t2 - t0
    transactions = grown + backed_regions
    done_at = watcher.response_at
    grow_first, grow_last = tenth_rates(done_at[:grown])
    back_first, back_last = tenth_rates(done_at[grown:])
    projection = project_growth(done_at[:grown], done_at[grown:], regions)
    return {
        "target_bytes": target,
        "complete": complete,
        "regions_hot_added": grown,
        "regions_planned": regions,
        "regions_fully_backed": backed_regions,
        "grown_to_bytes": BOOT + grown_bytes,
        "wall_s": round(wall, 3),
        "grow_s": round(t1 - t0, 3),
        "back_s": round(t2 - t1, 3),
        "transactions": transactions,
        "transactions_per_s": round(transactions / wall, 1),
        "grow_per_s_first_tenth": grow_first,
        "grow_per_s_last_tenth": grow_last,
        "back_per_s_first_tenth": back_first,
        "back_per_s_last_tenth": back_last,
        **projection,
        "round_trip_p50_ms": ms(percentile(trips, 50)),
        "round_trip_p99_ms": ms(percentile(trips, 99)),
        "control_reply_bytes_last": (back_calls or grow_calls)[-1][1],
        "control_call_ms_last": ms((back_calls or grow_calls)[-1][0]),
        "hypervisor_cpu_s": round(hv_cpu, 3),
        "guest_cpu_s": round(guest_cpu, 3),
        "guest_mem_total_kb": after.meminfo["MemTotal"],
        "guest_num_pages_added": added,
        "expected_pages_added": expected_added,
        "actual_bytes": vm.actual_bytes,
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


# -- the run -------------------------------------------------------------------------------


PARTS = ("ceiling", "hot-add", "growth", "fleet")


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
            ceiling: float | None = None
            if "ceiling" in wanted:
                log("1/4 ceiling: raw grpc.aio bidi ping-pong")
                result["ceiling"] = await bench_ceiling(procs, sizes.ceiling_s)
                ceiling = result["ceiling"]["round_trips_per_s"]
            if "hot-add" in wanted:
                log(f"2/4 hot-add round trips ({sizes.round_trips} x 128 MiB)")
                result["hot_add"] = await bench_hot_add(procs, sizes, ceiling)
            if "growth" in wanted:
                log(
                    f"3/4 growth: 4 GiB -> {sizes.grow_to_bytes / GIB:.0f} GiB "
                    f"(budget {sizes.growth_budget_s:.0f} s)"
                )
                result["growth"] = await bench_growth(procs, sizes)
            if "fleet" in wanted:
                log(f"4/4 fleet: {sizes.guests} guests for {sizes.fleet_s:.0f} s")
                result["fleet"] = await bench_fleet(procs, sizes, Path(tmp))
        except (BenchError, ChildFailed, grpc.aio.AioRpcError) as err:
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
        ]
    h = r.get("hot_add")
    if h:
        share = h["share_of_ceiling"]
        out += [
            ("2. hot-add 128 MiB: transactions", h["transactions"], ""),
            ("   transactions/s", h["transactions_per_s"], ""),
        ]
        if share is not None:
            out.append(("   share of the ceiling", f"{share:.0%}", f">= 80 % {mark(share >= 0.8)}"))
        out += [
            ("   round trip p50 (ms)", h["p50_ms"], ""),
            ("   round trip p99 (ms)", h["p99_ms"], f"<= 3 ms {mark(h['p99_ms'] <= 3)}"),
            (
                "   round trip p50 first / last tenth (ms)",
                f"{h['p50_first_tenth_ms']} / {h['p50_last_tenth_ms']}",
                "",
            ),
            (
                "   transactions/s: first / last tenth",
                f"{h['per_s_first_tenth']} / {h['per_s_last_tenth']}",
                "",
            ),
            ("   hypervisor CPU share", f"{h['hypervisor_cpu_share']:.0%}", ""),
            ("   reference: sequential Control.GetVm calls/s", h["unary_get_vm_per_s"], ""),
            ("   HotAdd reply size at the end (bytes)", h["control_reply_bytes_last"], ""),
        ]
    g = r.get("growth")
    if g:
        target_gib = g["target_bytes"] / GIB
        reached = g["grown_to_bytes"] / GIB
        wall_ok = g["complete"] and g["wall_s"] < 10
        out += [
            (
                f"3. growth 4 GiB -> {target_gib:.0f} GiB: regions hot-added",
                f"{g['regions_hot_added']} / {g['regions_planned']}",
                "all",
            ),
            ("   regions fully backed afterwards", g["regions_fully_backed"], "all"),
            ("   reached (GiB)", f"{reached:.0f}", f"{target_gib:.0f}"),
            ("   wall time (s): hot-add + back", f"{g['grow_s']} + {g['back_s']}", ""),
            ("   wall time total (s)", g["wall_s"], f"< 10 s {mark(wall_ok)}"),
        ]
        if "projected_full_s" in g and not g["complete"]:
            out += [
                (
                    "   time per transaction: at 0 regions (ms), + per region (us)",
                    f"{g['per_transaction_ms_at_0']} + {g['per_transaction_us_per_region']}",
                    "",
                ),
                (
                    f"   projected wall time to {target_gib:.0f} GiB (s, linear fit)",
                    g["projected_full_s"],
                    "< 10 s",
                ),
            ]
        out += [
            ("   transactions/s", g["transactions_per_s"], ""),
            (
                "   hot-adds/s: first / last tenth",
                f"{g['grow_per_s_first_tenth']} / {g['grow_per_s_last_tenth']}",
                "",
            ),
            (
                "   backs/s: first / last tenth",
                f"{g['back_per_s_first_tenth']} / {g['back_per_s_last_tenth']}",
                "",
            ),
            (
                "   round trip p50 / p99 (ms)",
                f"{g['round_trip_p50_ms']} / {g['round_trip_p99_ms']}",
                "",
            ),
            (
                "   last Control reply: bytes, ms",
                f"{g['control_reply_bytes_last']}, {g['control_call_ms_last']}",
                "",
            ),
            ("   hypervisor / guest CPU (s)", f"{g['hypervisor_cpu_s']} / {g['guest_cpu_s']}", ""),
            ("   guest MemTotal (kB)", g["guest_mem_total_kb"], ""),
            (
                "   guest num_pages_added",
                g["guest_num_pages_added"],
                f"{g['expected_pages_added']} {mark(g['checks']['num_pages_added'])}",
            ),
            ("   GetVm actual_bytes", g["actual_bytes"], mark(g["checks"]["actual_bytes"])),
            (
                "   MemTotal grew by the backed bytes",
                g["checks"]["MemTotal grew by the backed bytes"],
                "True",
            ),
            ("   violations", ", ".join(g["violations"]) or "none", "none"),
        ]
    f = r.get("fleet")
    if f:
        share = f["hypervisor_cpu_share"]
        out += [
            ("4. fleet: guests attached (ListVms)", f"{f['attached']} / {f['guests']}", "all"),
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
    if args.growth_budget is not None:
        sizes = dataclasses.replace(sizes, growth_budget_s=args.growth_budget)
    return await run(sizes, args.only or PARTS, log, profile_dir=args.profile, log_dir=args.logs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    parser.add_argument(
        "--growth-budget",
        type=float,
        metavar="SECONDS",
        help="time budget of the growth part (default 110, --quick 30)",
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
