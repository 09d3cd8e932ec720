"""guest.kernel: the generator-task scheduler (Sleep / Wait / Completion).

The order of work is part of the contract (kernel.py docstring): ready tasks run
first in, first out; timers fire by deadline, then by creation order; the clock
only moves with run_until, and run_until runs only what is due.
"""

from __future__ import annotations

import pytest

from guest.kernel import Completion, Scheduler, Sleep, Task, Wait


def recorder(log: list[str], name: str, *commands: Sleep | Wait) -> Task:
    """A task that logs its name before and after each command (and its result)."""
    log.append(f"{name}:start")
    for i, cmd in enumerate(commands):
        result = yield cmd
        log.append(f"{name}:{i}:{result}")


def test_fresh_scheduler_is_idle() -> None:
    s = Scheduler(3.0)
    assert s.now == 3.0
    assert s.next_deadline() is None
    assert not s.busy
    assert s.tasks == {}


def test_spawn_does_not_run_until_run_until() -> None:
    s = Scheduler()
    log: list[str] = []
    s.spawn("a", recorder(log, "a"))
    assert log == []
    assert s.busy
    assert s.next_deadline() == 0.0
    assert s.tasks == {"a": 1}
    s.run_until(0)
    assert log == ["a:start"]
    assert s.tasks == {}
    assert not s.busy
    assert s.next_deadline() is None


def test_ready_tasks_run_first_in_first_out() -> None:
    s = Scheduler()
    log: list[str] = []
    for name in ("c", "a", "b"):
        s.spawn(name, recorder(log, name, Sleep(0)))
    s.run_until(0)
    # Spawn order, twice: the three starts, then the three zero-second timers in creation order.
    assert log == ["c:start", "a:start", "b:start", "c:0:None", "a:0:None", "b:0:None"]


def test_timers_fire_by_deadline() -> None:
    s = Scheduler()
    log: list[str] = []
    s.spawn("late", recorder(log, "late", Sleep(3)))
    s.spawn("early", recorder(log, "early", Sleep(1)))
    s.spawn("mid", recorder(log, "mid", Sleep(2)))
    s.run_until(10)
    assert [e for e in log if not e.endswith("start")] == [
        "early:0:None",
        "mid:0:None",
        "late:0:None",
    ]


def test_equal_deadlines_fire_in_timer_creation_order_not_spawn_order() -> None:
    s = Scheduler()
    log: list[str] = []
    # "first" is spawned first but creates its 1 s timer only after a zero sleep, i.e.
    # after "second" created its own 1 s timer: "second" must fire first at t=1.
    s.spawn("first", recorder(log, "first", Sleep(0), Sleep(1)))
    s.spawn("second", recorder(log, "second", Sleep(1)))
    s.run_until(0)
    assert log == ["first:start", "second:start", "first:0:None"]
    s.run_until(1)
    assert log[3:] == ["second:0:None", "first:1:None"]


def test_task_sees_its_own_deadline_as_now() -> None:
    s = Scheduler()
    seen: list[float] = []

    def task() -> Task:
        yield Sleep(1.5)
        seen.append(s.now)
        yield Sleep(2.0)
        seen.append(s.now)

    s.spawn("t", task())
    s.run_until(10)
    assert seen == [1.5, 3.5]
    assert s.now == 10


def test_run_until_only_runs_what_is_due() -> None:
    s = Scheduler()
    log: list[str] = []
    s.spawn("a", recorder(log, "a", Sleep(1), Sleep(1)))
    s.run_until(0.999)
    assert log == ["a:start"]
    assert s.now == 0.999
    assert s.next_deadline() == 1.0
    s.run_until(1.0)
    assert log == ["a:start", "a:0:None"]
    assert s.next_deadline() == 2.0
    s.run_until(1.5)
    assert log == ["a:start", "a:0:None"]
    s.run_until(2.0)
    assert log[-1] == "a:1:None"
    assert s.next_deadline() is None


def test_clock_never_goes_back() -> None:
    s = Scheduler()
    s.run_until(5)
    s.run_until(3)
    assert s.now == 5


def test_wait_times_out_with_false() -> None:
    s = Scheduler()
    c = s.completion()
    log: list[str] = []
    s.spawn("w", recorder(log, "w", Wait(c, 2.0)))
    s.run_until(0)
    assert s.next_deadline() == 2.0
    s.run_until(1.999)
    assert log == ["w:start"]
    s.run_until(2.0)
    assert log == ["w:start", "w:0:False"]
    assert not c.done


def test_wait_completed_returns_true_and_cancels_its_timer() -> None:
    s = Scheduler()
    c = s.completion()
    log: list[str] = []
    s.spawn("w", recorder(log, "w", Wait(c, 5.0)))
    s.run_until(1)
    c.complete()
    assert c.done
    # The waiter is ready now (not at its timeout) and its timer no longer counts.
    assert s.next_deadline() == 1
    s.run_until(1)
    assert log == ["w:start", "w:0:True"]
    assert s.next_deadline() is None
    s.run_until(10)
    assert log == ["w:start", "w:0:True"]


def test_wait_on_done_completion_returns_true_at_once() -> None:
    s = Scheduler()
    c = s.completion()
    c.complete()
    log: list[str] = []
    s.spawn("w", recorder(log, "w", Wait(c, 5.0)))
    s.run_until(0)
    assert log == ["w:start", "w:0:True"]
    assert s.next_deadline() is None


def test_reinit_rearms_the_completion() -> None:
    s = Scheduler()
    c = s.completion()
    c.complete()
    c.reinit()
    assert not c.done
    log: list[str] = []
    s.spawn("w", recorder(log, "w", Wait(c, 1.0)))
    s.run_until(1)
    assert log == ["w:start", "w:0:False"]


def test_wait_without_timeout_waits_forever() -> None:
    s = Scheduler()
    c = s.completion()
    log: list[str] = []
    s.spawn("w", recorder(log, "w", Wait(c)))
    s.run_until(1e9)
    assert log == ["w:start"]
    assert s.next_deadline() is None
    assert s.tasks == {"w": 1}
    c.complete()
    s.run_until(1e9)
    assert log == ["w:start", "w:0:True"]
    assert s.tasks == {}


def test_complete_wakes_every_waiter_in_wait_order() -> None:
    s = Scheduler()
    c = s.completion()
    log: list[str] = []
    for name in ("x", "y", "z"):
        s.spawn(name, recorder(log, name, Wait(c, 10)))
    s.run_until(0)
    c.complete()
    s.run_until(0)
    assert log[3:] == ["x:0:True", "y:0:True", "z:0:True"]


def test_timeout_and_completion_at_the_same_instant_follow_timer_creation_order() -> None:
    # The completer's 1 s timer is created before the waiter's 1 s timeout: it fires
    # first, so the waiter sees True.
    s = Scheduler()
    c = s.completion()
    log: list[str] = []

    def completer() -> Task:
        yield Sleep(1)
        log.append("complete")
        c.complete()

    s.spawn("completer", completer())
    s.spawn("w", recorder(log, "w", Wait(c, 1)))
    s.run_until(1)
    assert log == ["w:start", "complete", "w:0:True"]

    # The other way round: the timeout fires first and a later complete() is ignored.
    s2 = Scheduler()
    c2 = s2.completion()
    log2: list[str] = []

    def completer2() -> Task:
        yield Sleep(1)
        log2.append("complete")
        c2.complete()

    s2.spawn("w", recorder(log2, "w", Wait(c2, 1)))
    s2.spawn("completer", completer2())
    s2.run_until(1)
    assert log2 == ["w:start", "w:0:False", "complete"]


def test_task_woken_by_a_timer_task_runs_before_the_next_timer() -> None:
    s = Scheduler()
    c = s.completion()
    log: list[str] = []

    def waker() -> Task:
        yield Sleep(1)
        log.append("waker")
        c.complete()

    s.spawn("waiter", recorder(log, "waiter", Wait(c)))
    s.spawn("waker", waker())
    s.spawn("other", recorder(log, "other", Sleep(1)))
    s.run_until(1)
    assert log == ["waiter:start", "other:start", "waker", "waiter:0:True", "other:0:None"]


def test_next_deadline_skips_cancelled_timers_and_reports_the_earliest() -> None:
    s = Scheduler()
    c = s.completion()
    s.spawn("w", recorder([], "w", Wait(c, 1.0)))
    s.spawn("sleeper", recorder([], "sleeper", Sleep(4.0)))
    s.run_until(0)
    assert s.next_deadline() == 1.0
    c.complete()
    s.run_until(0)
    assert s.next_deadline() == 4.0


def test_tasks_counts_live_tasks_by_name() -> None:
    s = Scheduler()
    s.spawn("job", recorder([], "a", Sleep(1)))
    s.spawn("job", recorder([], "b", Sleep(2)))
    s.run_until(0)
    assert s.tasks == {"job": 2}
    s.run_until(1)
    assert s.tasks == {"job": 1}
    s.run_until(2)
    assert s.tasks == {}


def test_completion_belongs_to_its_scheduler() -> None:
    s = Scheduler()
    assert isinstance(s.completion(), Completion)


def test_yielding_something_else_is_a_type_error() -> None:
    s = Scheduler()

    def bad() -> Task:
        yield "nonsense"  # type: ignore[misc]

    s.spawn("bad", bad())
    with pytest.raises(TypeError, match="bad"):
        s.run_until(0)
