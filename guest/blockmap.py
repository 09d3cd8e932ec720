"""The memory map a person looks at: one cell per memory block, coloured by what it holds.

A cell is ``offline`` (the block is not online, or going offline), ``unbacked`` (online,
but some of its pages are PageOffline because the host has not backed them yet),
``ballooned`` (online, some pages given back to the host) or ``online`` (online and all
of it usable). The live view, ``memhp map --svg`` and the guest's retained MQTT state all
draw from :func:`block_cells`; :func:`run_length` is their compact form.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from guest.mm.memory import STATE_ONLINE, MemoryBlock, MemoryManager
from guest.mm.pages import OWNER_BALLOON, PAGE_OFFLINE

CELL_OFFLINE: Final = "offline"
CELL_ONLINE: Final = "online"
CELL_UNBACKED: Final = "unbacked"
CELL_BALLOONED: Final = "ballooned"
#: Every cell kind, in the order a legend lists them.
CELLS: Final = (CELL_OFFLINE, CELL_ONLINE, CELL_UNBACKED, CELL_BALLOONED)


@dataclass(frozen=True)
class BlockCell:
    """One memory block: its kernel state and how many of its pages are not usable."""

    index: int
    state: str
    #: PageOffline pages the host has not backed (not ballooned ones).
    page_offline: int
    ballooned: int
    nr_pages: int

    @property
    def cell(self) -> str:
        if self.state != STATE_ONLINE:
            return CELL_OFFLINE
        if self.page_offline:
            return CELL_UNBACKED
        if self.ballooned:
            return CELL_BALLOONED
        return CELL_ONLINE


def block_cell(mm: MemoryManager, block: MemoryBlock) -> BlockCell:
    """One block's cell, with its PageOffline and ballooned pages."""
    offline = ballooned = 0
    for start, end, page in mm.pages.runs(block.start_pfn, block.end_pfn):
        if page.kind == PAGE_OFFLINE:
            if page.owner == OWNER_BALLOON:
                ballooned += end - start
            else:
                offline += end - start
    return BlockCell(block.id, block.state, offline, ballooned, block.nr_pages)


def block_cells(mm: MemoryManager) -> list[BlockCell]:
    """Every present memory block in index order."""
    return [block_cell(mm, mm.blocks[i]) for i in sorted(mm.blocks)]


def run_length(cells: Iterable[BlockCell]) -> list[tuple[int, int, str]]:
    """``(first_index, count, cell)`` runs of consecutive blocks with the same cell."""
    runs: list[tuple[int, int, str]] = []
    for c in cells:
        if runs:
            first, count, kind = runs[-1]
            if kind == c.cell and first + count == c.index:
                runs[-1] = (first, count + 1, kind)
                continue
        runs.append((c.index, 1, c.cell))
    return runs
