"""The block map laid out in rows of cells, for the terminal and for the SVG picture.

A VM with more blocks than fit gets several blocks per cell; such a cell shows the
first kind of :data:`PRIORITY` among its blocks, so an unbacked or ballooned block is
never hidden by its online neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memhp.view.model import CELL_BALLOONED, CELL_OFFLINE, CELL_ONLINE, CELL_UNBACKED, Run

#: A cell standing for several blocks shows the first kind of this list among them.
PRIORITY = (CELL_UNBACKED, CELL_BALLOONED, CELL_OFFLINE, CELL_ONLINE)
#: The terminal map takes at most this many lines; more blocks share a cell.
MAX_MAP_ROWS = 8


@dataclass(frozen=True)
class BlockMap:
    """The map laid out: ``per_cell`` blocks per cell, one entry per cell (None: absent)."""

    per_cell: int
    columns: int
    cells: list[str | None]

    @property
    def rows(self) -> int:
        return -(-len(self.cells) // self.columns) if self.cells else 0

    def row(self, index: int) -> list[str | None]:
        return self.cells[index * self.columns : (index + 1) * self.columns]

    def first_block(self, cell: int) -> int:
        return cell * self.per_cell


def layout(runs: Sequence[Run], columns: int, max_rows: int = MAX_MAP_ROWS) -> BlockMap:
    """Cells for ``runs`` in rows of ``columns``, aggregated so they fit in ``max_rows``."""
    columns = max(1, columns)
    if not runs:
        return BlockMap(1, columns, [])
    end = max(first + count for first, count, _ in runs)
    per_cell = max(1, -(-end // (columns * max(1, max_rows))))
    kinds: list[set[str]] = [set() for _ in range(-(-end // per_cell))]
    for first, count, cell in runs:
        for i in range(first // per_cell, (first + count - 1) // per_cell + 1):
            kinds[i].add(cell)
    cells: list[str | None] = []
    for found in kinds:
        if not found:
            cells.append(None)
            continue
        cells.append(next((k for k in PRIORITY if k in found), min(found)))
    return BlockMap(per_cell, columns, cells)
