"""The memory notifier chain (kernel/notifier.c semantics) and its error injection."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest.mm.notifier import (
    MEM_CANCEL_OFFLINE,
    MEM_CANCEL_ONLINE,
    MEM_GOING_OFFLINE,
    MEM_GOING_ONLINE,
    MEM_OFFLINE,
    MEM_ONLINE,
    NOTIFY_BAD,
    NOTIFY_DONE,
    NOTIFY_OK,
    NOTIFY_STOP_MASK,
    MemoryAction,
    MemoryNotifierChain,
    MemoryNotify,
    NotifierErrorInject,
    NotifierFn,
    notifier_from_errno,
    notifier_to_errno,
)

ARG = MemoryNotify(0x40000, 0x8000)


def test_constants_match_include_linux() -> None:
    assert (MEM_ONLINE, MEM_GOING_OFFLINE, MEM_OFFLINE) == (1, 2, 4)
    assert (MEM_GOING_ONLINE, MEM_CANCEL_ONLINE, MEM_CANCEL_OFFLINE) == (8, 16, 32)
    assert (NOTIFY_DONE, NOTIFY_OK, NOTIFY_STOP_MASK, NOTIFY_BAD) == (0, 1, 0x8000, 0x8002)


def test_errno_round_trip_selftest_value() -> None:
    # mem-on-off-test.sh injects -12: the sysfs write then fails with ENOMEM.
    ret = notifier_from_errno(-12)
    assert ret & NOTIFY_STOP_MASK
    assert notifier_to_errno(ret) == -errno.ENOMEM


def test_notify_bad_is_eperm_and_ok_is_zero() -> None:
    assert notifier_to_errno(NOTIFY_BAD) == -errno.EPERM
    assert notifier_to_errno(NOTIFY_OK) == 0
    assert notifier_to_errno(NOTIFY_DONE) == 0
    assert notifier_to_errno(NOTIFY_STOP_MASK | NOTIFY_OK) == 0  # NOTIFY_STOP: no error
    assert notifier_from_errno(0) == NOTIFY_OK


@given(st.integers(1, 4095))
def test_errno_round_trip_all(err: int) -> None:
    assert notifier_to_errno(notifier_from_errno(-err)) == -err


def recorder(log: list[str], name: str, ret: int = NOTIFY_OK) -> NotifierFn:
    def fn(action: MemoryAction, arg: MemoryNotify) -> int:
        log.append(f"{name}:{action.name}")
        return ret

    return fn


def test_priority_order_higher_first_then_registration() -> None:
    chain = MemoryNotifierChain()
    log: list[str] = []
    chain.register(recorder(log, "a0"), 0)
    chain.register(recorder(log, "b10"), 10)
    chain.register(recorder(log, "c0"), 0)
    chain.register(recorder(log, "d100"), 100)
    chain.register(recorder(log, "e-5"), -5)
    chain.register(recorder(log, "f10"), 10)
    assert chain.call(MEM_ONLINE, ARG) == NOTIFY_OK
    assert log == [f"{n}:MEM_ONLINE" for n in ("d100", "b10", "f10", "a0", "c0", "e-5")]


def test_veto_stops_chain_and_returns_result() -> None:
    chain = MemoryNotifierChain()
    log: list[str] = []
    chain.register(recorder(log, "high"), 10)
    chain.register(recorder(log, "veto", notifier_from_errno(-errno.EBUSY)), 5)
    chain.register(recorder(log, "low"), 0)
    ret = chain.call(MEM_GOING_OFFLINE, ARG)
    assert log == ["high:MEM_GOING_OFFLINE", "veto:MEM_GOING_OFFLINE"]
    assert notifier_to_errno(ret) == -errno.EBUSY


def test_notify_stop_stops_chain_without_error() -> None:
    chain = MemoryNotifierChain()
    log: list[str] = []
    chain.register(recorder(log, "stop", NOTIFY_STOP_MASK | NOTIFY_OK), 1)
    chain.register(recorder(log, "after"), 0)
    ret = chain.call(MEM_GOING_ONLINE, ARG)
    assert log == ["stop:MEM_GOING_ONLINE"]
    assert notifier_to_errno(ret) == 0


def test_result_is_the_last_callers() -> None:
    chain = MemoryNotifierChain()
    assert chain.call(MEM_ONLINE, ARG) == NOTIFY_DONE  # empty chain
    log: list[str] = []
    chain.register(recorder(log, "ok", NOTIFY_OK), 1)
    chain.register(recorder(log, "done", NOTIFY_DONE), 0)
    assert chain.call(MEM_ONLINE, ARG) == NOTIFY_DONE


def test_unregister_and_names_and_history() -> None:
    chain = MemoryNotifierChain()
    log: list[str] = []
    a = recorder(log, "a")
    chain.register(a, 0, name="alpha")
    chain.register(recorder(log, "b"), 1, name="beta")
    assert chain.names == ["beta", "alpha"]
    chain.keep_history = True
    chain.call(MEM_OFFLINE, ARG)
    assert [(h[0], h[1], h[2], h[3]) for h in chain.history] == [
        (MEM_OFFLINE, ARG.start_pfn, ARG.nr_pages, "beta"),
        (MEM_OFFLINE, ARG.start_pfn, ARG.nr_pages, "alpha"),
    ]
    chain.unregister(a)
    assert chain.names == ["beta"]
    log.clear()
    chain.call(MEM_ONLINE, ARG)
    assert log == ["b:MEM_ONLINE"]


class _Listener:
    def __init__(self) -> None:
        self.seen: list[MemoryAction] = []

    def notify(self, action: MemoryAction, arg: MemoryNotify) -> int:
        self.seen.append(action)
        return NOTIFY_OK


def test_unregister_bound_method() -> None:
    chain = MemoryNotifierChain()
    listener = _Listener()
    chain.register(listener.notify)
    chain.unregister(listener.notify)
    chain.call(MEM_ONLINE, ARG)
    assert listener.seen == []
    assert chain.names == []


def test_error_inject_fires_only_on_its_action() -> None:
    chain = MemoryNotifierChain()
    inject = NotifierErrorInject(chain)
    assert chain.names == ["memory-notifier-error-inject"]
    inject.set(MEM_GOING_ONLINE, -errno.ENOMEM)
    assert notifier_to_errno(chain.call(MEM_GOING_ONLINE, ARG)) == -errno.ENOMEM
    assert chain.call(MEM_GOING_OFFLINE, ARG) == NOTIFY_DONE
    assert chain.call(MEM_ONLINE, ARG) == NOTIFY_DONE
    inject.set(MEM_GOING_ONLINE, 0)  # echo 0 > .../error: cleared
    assert chain.call(MEM_GOING_ONLINE, ARG) == NOTIFY_DONE


def test_error_inject_count_and_priority() -> None:
    chain = MemoryNotifierChain()
    log: list[str] = []
    chain.register(recorder(log, "low"), 0)
    inject = NotifierErrorInject(chain, priority=5)
    inject.set(MEM_GOING_OFFLINE, -errno.EBUSY, count=2)
    for _ in range(2):
        assert notifier_to_errno(chain.call(MEM_GOING_OFFLINE, ARG)) == -errno.EBUSY
    assert log == []  # the injector runs first and stops the chain
    assert notifier_to_errno(chain.call(MEM_GOING_OFFLINE, ARG)) == 0
    assert log == ["low:MEM_GOING_OFFLINE"]


@pytest.mark.parametrize("bad", [1, 12, -4096, -100000])
def test_error_inject_rejects_non_errno(bad: int) -> None:
    inject = NotifierErrorInject(MemoryNotifierChain())
    with pytest.raises(ValueError):
        inject.set(MEM_GOING_ONLINE, bad)
