"""``memhp map VM --svg FILE``: the block map of one VM as an SVG picture (written by hand).

The picture has a title with the VM's sizes, one square per memory block in rows of
:data:`COLUMNS` (each row labelled with its first block index), and a legend with the
number of blocks of each kind. Every square is a ``rect`` of class ``cell`` with
``data-index`` (its first block), ``data-count`` (blocks it stands for) and
``data-cell`` (the kind), and a tooltip naming the block, so a script can read the
picture back. A VM of more than :data:`MAX_CELLS` blocks gets several blocks per
square (the legend says how many).
"""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from memhp.units import format_size
from memhp.view.layout import layout
from memhp.view.model import (
    CELL_BALLOONED,
    CELL_OFFLINE,
    CELL_ONLINE,
    CELL_UNBACKED,
    CELLS,
    MAP_HOST,
    VmView,
)

COLOURS = {
    CELL_OFFLINE: "#b0b0b0",
    CELL_ONLINE: "#2e7d32",
    CELL_UNBACKED: "#f9a825",
    CELL_BALLOONED: "#8e24aa",
}
LABELS = {
    CELL_OFFLINE: "offline",
    CELL_ONLINE: "online, fully backed",
    CELL_UNBACKED: "online, unbacked pages (PageOffline)",
    CELL_BALLOONED: "ballooned",
}
COLUMNS = 32
MAX_CELLS = 4096
CELL = 14
GAP = 2
MARGIN = 12
LABEL_WIDTH = 48
LINE = 18
FONT = "font-family='monospace' font-size='12'"


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)


def title_lines(view: VmView) -> list[str]:
    guest = f"{view.strategy}/{view.driver_mode}" if view.strategy else "guest unknown"
    state = "attached" if view.attached else "detached"
    return [
        f"{view.vm_id}: {guest}, {state} {view.dm_state}".rstrip(),
        f"target {_size(view.requested_bytes)}, actual {format_size(view.actual_bytes)}, "
        f"committed {format_size(view.committed_bytes)}, "
        f"available {format_size(view.available_bytes)}, "
        f"ballooned {format_size(view.ballooned_bytes)}, "
        f"hot-add backed {format_size(view.backed_bytes)}",
    ]


def map_svg(view: VmView, *, columns: int = COLUMNS, max_cells: int = MAX_CELLS) -> str:
    """The SVG document (a string) of ``view``'s block map."""
    laid = layout(view.cells, columns, max_rows=max(1, max_cells // columns))
    pitch = CELL + GAP
    grid_width = columns * pitch
    width = 2 * MARGIN + LABEL_WIDTH + max(grid_width, 560)
    lines = title_lines(view)
    top = MARGIN + LINE * len(lines) + 6
    grid_height = laid.rows * pitch
    legend_top = top + grid_height + 10
    notes: list[str] = []
    unit = format_size(view.block_size_bytes) if view.block_size_bytes else "?"
    notes.append(
        f"1 square = {laid.per_cell} memory block{'s' if laid.per_cell > 1 else ''} of {unit}"
    )
    if view.in_flight is not None:
        notes.append(f"in flight: {view.in_flight.text()}")
    notes.append(f"violations: {view.violations}")
    if view.map_source == MAP_HOST:
        notes.append(f"host-only map: {view.map_note or 'the host backing only'}")
    height = legend_top + LINE * (len(CELLS) + len(notes)) + MARGIN
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' data-vm={quoteattr(view.vm_id)}>",
        f"<title>{escape(lines[0])}</title>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
    ]
    for i, text in enumerate(lines):
        weight = " font-weight='bold'" if i == 0 else ""
        out.append(
            f"<text class='title' x='{MARGIN}' y='{MARGIN + LINE * i + 12}' {FONT}{weight}>"
            f"{escape(text)}</text>"
        )
    out.append("<g class='map'>")
    for row in range(laid.rows):
        y = top + row * pitch
        out.append(
            f"<text class='row-label' x='{MARGIN + LABEL_WIDTH - 6}' y='{y + CELL - 2}' "
            f"text-anchor='end' {FONT} fill='#555'>{laid.first_block(row * columns)}</text>"
        )
        for col, cell in enumerate(laid.row(row)):
            if cell is None:
                continue
            index = laid.first_block(row * columns + col)
            x = MARGIN + LABEL_WIDTH + col * pitch
            tip = (
                f"memory{index}: {cell}"
                if laid.per_cell == 1
                else f"memory{index}-{index + laid.per_cell - 1}: {cell}"
            )
            out.append(
                f"<rect class='cell' x='{x}' y='{y}' width='{CELL}' height='{CELL}' "
                f"fill='{COLOURS.get(cell, '#000')}' data-index='{index}' "
                f"data-count='{laid.per_cell}' data-cell={quoteattr(cell)}>"
                f"<title>{escape(tip)}</title></rect>"
            )
    out.append("</g>")
    counts = view.cell_counts()
    out.append("<g class='legend'>")
    for i, kind in enumerate(CELLS):
        y = legend_top + i * LINE
        out.append(
            f"<rect class='swatch' x='{MARGIN}' y='{y}' width='{CELL}' height='{CELL}' "
            f"fill='{COLOURS[kind]}' data-cell='{kind}'/>"
        )
        out.append(
            f"<text class='legend-label' x='{MARGIN + CELL + 8}' y='{y + CELL - 2}' {FONT} "
            f"data-cell='{kind}' data-blocks='{counts.get(kind, 0)}'>"
            f"{escape(LABELS[kind])}: {counts.get(kind, 0)} blocks</text>"
        )
    for i, note in enumerate(notes):
        y = legend_top + (len(CELLS) + i) * LINE
        out.append(
            f"<text class='note' x='{MARGIN}' y='{y + CELL - 2}' {FONT} fill='#333'>"
            f"{escape(note)}</text>"
        )
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
