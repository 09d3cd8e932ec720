"""The memory notifier chain (``register_memory_notifier``) and its error injection.

Same constants, same priority order (higher first, then registration order),
same veto rule as ``kernel/notifier.c``: a callback that returns a value with
``NOTIFY_STOP_MASK`` stops the chain, and ``notifier_to_errno`` turns the
result into the errno the sysfs write fails with. :class:`NotifierErrorInject`
is ``memory-notifier-error-inject``: a notifier at a chosen priority that
answers ``MEM_GOING_ONLINE`` / ``MEM_GOING_OFFLINE`` with an injected errno.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag


class MemoryAction(IntFlag):
    """``include/linux/memory.h``: block states and notifier events."""

    MEM_ONLINE = 1 << 0
    MEM_GOING_OFFLINE = 1 << 1
    MEM_OFFLINE = 1 << 2
    MEM_GOING_ONLINE = 1 << 3
    MEM_CANCEL_ONLINE = 1 << 4
    MEM_CANCEL_OFFLINE = 1 << 5


MEM_ONLINE = MemoryAction.MEM_ONLINE
MEM_GOING_OFFLINE = MemoryAction.MEM_GOING_OFFLINE
MEM_OFFLINE = MemoryAction.MEM_OFFLINE
MEM_GOING_ONLINE = MemoryAction.MEM_GOING_ONLINE
MEM_CANCEL_ONLINE = MemoryAction.MEM_CANCEL_ONLINE
MEM_CANCEL_OFFLINE = MemoryAction.MEM_CANCEL_OFFLINE

NOTIFY_DONE = 0x0000
NOTIFY_OK = 0x0001
NOTIFY_STOP_MASK = 0x8000
NOTIFY_BAD = NOTIFY_STOP_MASK | 0x0002

#: Documented priorities (current kernels).
DEFAULT_CALLBACK_PRI = 0
SLAB_CALLBACK_PRI = 1


def notifier_from_errno(err: int) -> int:
    """``notifier_from_errno``: a negative errno to a chain result; 0 to NOTIFY_OK."""
    if err:
        return NOTIFY_STOP_MASK | (NOTIFY_OK - err)
    return NOTIFY_OK


def notifier_to_errno(ret: int) -> int:
    """``notifier_to_errno``: the negative errno a chain result carries (NOTIFY_BAD: -EPERM)."""
    ret &= ~NOTIFY_STOP_MASK
    return NOTIFY_OK - ret if ret > NOTIFY_OK else 0


@dataclass(frozen=True)
class MemoryNotify:
    """``struct memory_notify`` (current form: the range only)."""

    start_pfn: int
    nr_pages: int


NotifierFn = Callable[[MemoryAction, MemoryNotify], int]


@dataclass(order=True)
class _Entry:
    sort_key: tuple[int, int]
    name: str = field(compare=False)
    fn: NotifierFn = field(compare=False)


class MemoryNotifierChain:
    """A blocking notifier chain for memory hotplug events."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self._seq = itertools.count()
        #: Every call made, newest last: (action, start_pfn, nr_pages, name, result).
        self.history: list[tuple[MemoryAction, int, int, str, int]] = []
        self.keep_history = False

    def register(
        self, fn: NotifierFn, priority: int = DEFAULT_CALLBACK_PRI, name: str = ""
    ) -> None:
        self._entries.append(_Entry((-priority, next(self._seq)), name or _name(fn), fn))
        self._entries.sort()

    def unregister(self, fn: NotifierFn) -> None:
        # == rather than "is": a bound method is a new object on every access.
        self._entries = [e for e in self._entries if e.fn != fn]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def call(self, action: MemoryAction, arg: MemoryNotify) -> int:
        """``memory_notify``: run the chain; returns the last result."""
        ret = NOTIFY_DONE
        for entry in list(self._entries):
            ret = entry.fn(action, arg)
            if self.keep_history:
                self.history.append((action, arg.start_pfn, arg.nr_pages, entry.name, ret))
            if ret & NOTIFY_STOP_MASK:
                break
        return ret


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class NotifierErrorInject:
    """``memory-notifier-error-inject``: fail MEM_GOING_ONLINE / MEM_GOING_OFFLINE on demand.

    ``actions[MEM_GOING_ONLINE] = -12`` is ``echo -12 > .../actions/MEM_GOING_ONLINE/error``.
    ``remaining`` limits how many times an injection fires (None: until cleared).
    """

    def __init__(self, chain: MemoryNotifierChain, priority: int = 0) -> None:
        self.actions: dict[MemoryAction, int] = {}
        self.remaining: dict[MemoryAction, int | None] = {}
        chain.register(self._notify, priority, name="memory-notifier-error-inject")

    def set(self, action: MemoryAction, error: int, count: int | None = None) -> None:
        if error and not -4095 <= error <= -1:
            raise ValueError(f"injected error must be a negative errno in [-4095, -1], not {error}")
        self.actions[action] = error
        self.remaining[action] = count

    def _notify(self, action: MemoryAction, arg: MemoryNotify) -> int:
        error = self.actions.get(action, 0)
        if not error:
            return NOTIFY_DONE
        left = self.remaining.get(action)
        if left is not None:
            if left <= 0:
                return NOTIFY_DONE
            self.remaining[action] = left - 1
        return notifier_from_errno(error)
