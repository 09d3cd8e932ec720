"""Kernel error numbers, raised as exceptions by the memory-manager model.

The model answers like the kernel: a sysfs write that fails with ``-EBUSY`` in
Linux raises :class:`MemoryHotplugError` with ``errno == EBUSY`` here.
"""

from __future__ import annotations

import errno as _errno

EPERM = _errno.EPERM
ENOENT = _errno.ENOENT
ENOMEM = _errno.ENOMEM
EBUSY = _errno.EBUSY
EEXIST = _errno.EEXIST
EINVAL = _errno.EINVAL
ERANGE = _errno.ERANGE
EAGAIN = _errno.EAGAIN
E2BIG = _errno.E2BIG


class MemoryHotplugError(Exception):
    """An operation failed the way the kernel fails it: with a (positive) errno."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"{message} (-{_errno.errorcode.get(errno, str(errno))})")
        self.errno = errno
        self.message = message

    @property
    def name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))
