"""A tiny sans-I/O scheduler for the guest's kernel threads and work items.

Kernel code that waits (``wait_for_completion_timeout``, ``msleep``) is written
as generators that yield :class:`Sleep` or :class:`Wait`. The scheduler owns no
clock: the adapter tells it the time with :meth:`Scheduler.run_until` and asks
:meth:`Scheduler.next_deadline` when to call again. In process the adapter is a
virtual clock (deterministic, as fast as the CPU allows); in the guest-agent
process it is asyncio with real time. The order of work is fixed: ready tasks
run first in, first out; timers fire by (deadline, creation order).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Wait:
    """Wait for a completion; the task gets ``True`` back, or ``False`` on timeout."""

    completion: Completion
    timeout: float | None = None


Command = Sleep | Wait
Task = Generator[Command, bool | None, None]


@dataclass(eq=False)
class _Waiter:
    task: _TaskRecord
    completion: Completion | None
    cancelled: bool = False


@dataclass(eq=False)
class _TaskRecord:
    name: str
    gen: Task
    waiter: _Waiter | None = None


class Completion:
    """``struct completion``: ``complete()`` wakes every waiter; ``reinit()`` re-arms."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self.done = False
        self._waiters: list[_Waiter] = []

    def complete(self) -> None:
        self.done = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.cancelled:
                waiter.cancelled = True
                self._scheduler._make_ready(waiter.task, True)

    def reinit(self) -> None:
        self.done = False


@dataclass(order=True)
class _Timer:
    deadline: float
    seq: int
    waiter: _Waiter = field(compare=False)
    result: bool | None = field(compare=False, default=None)


class Scheduler:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self._ready: deque[tuple[_TaskRecord, bool | None]] = deque()
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        self.tasks: dict[str, int] = {}

    def spawn(self, name: str, gen: Task) -> None:
        """Start a task; it first runs at the next :meth:`run_until`."""
        self.tasks[name] = self.tasks.get(name, 0) + 1
        self._make_ready(_TaskRecord(name, gen), None)

    def completion(self) -> Completion:
        return Completion(self)

    def _make_ready(self, task: _TaskRecord, value: bool | None) -> None:
        self._ready.append((task, value))

    def next_deadline(self) -> float | None:
        """When the next timer fires (``now`` if work is ready), or None when idle."""
        if self._ready:
            return self.now
        while self._timers and self._timers[0].waiter.cancelled:
            heapq.heappop(self._timers)
        return self._timers[0].deadline if self._timers else None

    @property
    def busy(self) -> bool:
        return bool(self._ready)

    def run_until(self, now: float) -> None:
        """Run everything due at or before ``now``, in time order; the clock ends at ``now``."""
        while True:
            self._run_ready()
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                break
            timer = heapq.heappop(self._timers)
            self.now = max(self.now, timer.deadline)
            timer.waiter.cancelled = True
            self._make_ready(timer.waiter.task, timer.result)
        self.now = max(self.now, now)

    def _run_ready(self) -> None:
        while self._ready:
            task, value = self._ready.popleft()
            self._step(task, value)

    def _step(self, task: _TaskRecord, value: bool | None) -> None:
        try:
            command = task.gen.send(value)
        except StopIteration:
            self.tasks[task.name] -= 1
            if not self.tasks[task.name]:
                del self.tasks[task.name]
            return
        if isinstance(command, Sleep):
            waiter = _Waiter(task, None)
            heapq.heappush(
                self._timers, _Timer(self.now + command.seconds, next(self._seq), waiter, None)
            )
        elif isinstance(command, Wait):
            if command.completion.done:
                self._make_ready(task, True)
                return
            waiter = _Waiter(task, command.completion)
            command.completion._waiters.append(waiter)
            if command.timeout is not None:
                heapq.heappush(
                    self._timers,
                    _Timer(self.now + command.timeout, next(self._seq), waiter, False),
                )
        else:  # pragma: no cover - a programming error in a task
            raise TypeError(f"task {task.name} yielded {command!r}")


class Work:
    """``struct work_struct`` on the system workqueue.

    :meth:`schedule` queues the work unless it is already pending (``schedule_work``
    returns false then: parameters written meanwhile are simply overwritten). A work
    scheduled while it runs is pending again and runs once more afterwards.
    """

    def __init__(self, scheduler: Scheduler, name: str, body: Callable[[], Task]) -> None:
        self._scheduler = scheduler
        self.name = name
        self._body = body
        self.pending = False
        self.running = False

    def schedule(self) -> bool:
        if self.pending:
            return False
        self.pending = True
        if not self.running:
            self.running = True
            self._scheduler.spawn(self.name, self._worker())
        return True

    def _worker(self) -> Task:
        while self.pending:
            self.pending = False
            yield from self._body()
        self.running = False
