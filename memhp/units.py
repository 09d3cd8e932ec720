"""Sizes, pages and PFN ranges: the units both sides share.

Every size inside memhp-emu is a page count of 4 KiB pages (the Hyper-V page,
``HV_HYP_PAGE_SIZE``, and the x86-64 ``PAGE_SIZE``). Human input ("128M", "1G")
is parsed once at the edge with :func:`parse_size` and turned into pages with
:func:`bytes_to_pages`.
"""

from __future__ import annotations

import re

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIX = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


class SizeError(ValueError):
    """A size string or number that cannot be understood."""


def parse_size(value: int | str) -> int:
    """Parse ``4096``, ``"128M"``, ``"1G"``, ``"1T"`` (binary units) into bytes."""
    if isinstance(value, bool):
        raise SizeError(f"size must be a number or a string like '128M', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"size must not be negative: {value}")
        return value
    if not isinstance(value, str):
        raise SizeError(f"size must be a number or a string like '128M', not {value!r}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise SizeError(
            f"cannot parse size {value!r}: expected a number with an optional binary "
            "suffix K, M, G, T (e.g. 4096, 128M, 1G)"
        )
    return int(match.group(1)) * _SUFFIX[match.group(2).upper()]


def bytes_to_pages(size: int, *, what: str = "size") -> int:
    """Bytes to 4 KiB pages; the size must be page-aligned."""
    if size % PAGE_SIZE:
        raise SizeError(f"{what} {size} bytes is not a multiple of the 4 KiB page size")
    return size >> PAGE_SHIFT


def parse_pages(value: int | str, *, what: str = "size") -> int:
    """Parse a human size straight into pages (see :func:`parse_size`)."""
    return bytes_to_pages(parse_size(value), what=what)


def format_size(size: int) -> str:
    """Bytes as lsmem prints them: ``128M``, ``2.9G``, ``4.3G``, ``0B``.

    util-linux's ``size_to_human_string``: the largest binary unit below the size, one
    decimal rounded half up (``(frac + 50) / 100`` on thousandths), dropped when zero.
    """
    exp = 0
    for shift in range(10, 70, 10):
        if size < 1 << shift:
            exp = shift - 10
            break
    letter = "BKMGTPE"[exp // 10]
    whole = size >> exp
    frac = size & ((1 << exp) - 1)
    if frac:
        frac = (frac * 1000) >> exp
        frac = (frac + 50) // 100
        if frac == 10:
            whole += 1
            frac = 0
    return f"{whole}.{frac}{letter}" if frac else f"{whole}{letter}"


def align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0
