"""Draw a :class:`~memhp.view.model.Fleet` in the terminal with rich: one panel per VM.

Each panel has the host's sizes, the transaction in flight, the guest's strategy and
meminfo, the block map (one cell per memory block, wrapped to the width; a huge VM gets
several blocks per cell and the legend says how many), the legend with the block count
of each kind, the violations and the recent events. Every cell kind has its own glyph
as well as its colour, so the map reads the same without colour (``--once`` into a
file or a pipe).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from memhp.units import format_size
from memhp.view.layout import MAX_MAP_ROWS, layout
from memhp.view.model import (
    CELL_BALLOONED,
    CELL_OFFLINE,
    CELL_ONLINE,
    CELL_UNBACKED,
    CELLS,
    MAP_HOST,
    Fleet,
    Run,
    VmView,
)

GLYPHS = {CELL_OFFLINE: "·", CELL_ONLINE: "█", CELL_UNBACKED: "▒", CELL_BALLOONED: "░"}
#: A block index with no memory block (never added, or removed).
ABSENT = " "
STYLES = {
    CELL_OFFLINE: "grey50",
    CELL_ONLINE: "green",
    CELL_UNBACKED: "bold yellow",
    CELL_BALLOONED: "magenta",
}
LABELS = {
    CELL_OFFLINE: "offline",
    CELL_ONLINE: "online",
    CELL_UNBACKED: "unbacked (PageOffline)",
    CELL_BALLOONED: "ballooned",
}
#: Panel border and padding, left and right.
PANEL_CHROME = 4


def map_text(runs: Sequence[Run], width: int, max_rows: int = MAX_MAP_ROWS) -> tuple[Text, int]:
    """The map as lines ``INDEX cells...`` fitting ``width``; and the blocks per cell."""
    end = max((first + count for first, count, _ in runs), default=0)
    label = len(str(max(end - 1, 0)))
    room = max(8, width - label - 1)
    columns = room if room < 16 else room - room % 8
    laid = layout(runs, columns, max_rows)
    text = Text()
    for row in range(laid.rows):
        if row:
            text.append("\n")
        text.append(f"{laid.first_block(row * laid.columns):>{label}} ", style="dim")
        for cell in laid.row(row):
            if cell is None:
                text.append(ABSENT)
            else:
                text.append(GLYPHS.get(cell, "?"), style=STYLES.get(cell, ""))
    return text, laid.per_cell


def map_caption(view: VmView, per_cell: int) -> Text:
    unit = f" of {format_size(view.block_size_bytes)}" if view.block_size_bytes else ""
    text = Text(f"memory blocks: {view.blocks}{unit}", style="dim")
    if per_cell > 1:
        text.append(f", {per_cell} blocks per cell", style="bold")
    return text


def legend(view: VmView) -> Text:
    counts = view.cell_counts()
    text = Text()
    for i, kind in enumerate(CELLS):
        if i:
            text.append("  ")
        text.append(GLYPHS[kind], style=STYLES[kind])
        text.append(f" {LABELS[kind]} {counts.get(kind, 0)}")
    return text


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)


def _pairs(text: Text, pairs: list[tuple[str, str]]) -> Text:
    for i, (name, value) in enumerate(pairs):
        if i:
            text.append("  ")
        text.append(f"{name} ", style="dim")
        text.append(value, style="bold")
    return text


def sizes_text(view: VmView) -> Text:
    """The host's sizes: target, actual, hot-add backed, ballooned, regions."""
    return _pairs(
        Text(),
        [
            ("target", _size(view.requested_bytes)),
            ("actual", format_size(view.actual_bytes)),
            ("hot-add backed", format_size(view.backed_bytes)),
            ("ballooned", format_size(view.ballooned_bytes)),
            ("regions", str(view.regions)),
        ],
    )


def status_text(view: VmView) -> Text:
    """The guest's last status report and the transaction in flight."""
    text = _pairs(
        Text(),
        [
            ("committed", format_size(view.committed_bytes)),
            ("available", format_size(view.available_bytes)),
        ],
    )
    text.append("  in flight ", style="dim")
    if view.in_flight is not None:
        text.append(view.in_flight.text(), style="bold cyan")
    else:
        text.append("busy" if view.busy else "-")
    return text


def guest_text(view: VmView) -> Text:
    text = Text()
    text.append("guest ", style="dim")
    if view.strategy or view.driver_mode:
        text.append(f"{view.strategy or '?'}/{view.driver_mode or '?'}")
    else:
        text.append("-")
    if view.guest_dm_state:
        text.append(f"  {view.guest_dm_state}")
    for key in ("MemTotal", "MemFree"):
        if key in view.meminfo:
            text.append(f"  {key} ", style="dim")
            text.append(format_size(view.meminfo[key] << 10))
    return text


def violations_text(view: VmView) -> Text:
    """The violations: the host's events (over MQTT: those seen while watching, the
    state document has no count) and the guest's findings now."""
    style = "bold red" if view.violations else "green"
    seen = " seen" if view.host_violations_partial else ""
    return Text(
        f"violations {view.violations} (host {view.host_violations}{seen}, "
        f"guest {view.guest_violations})",
        style=style,
    )


def events_text(view: VmView, limit: int | None = None) -> Text:
    events = list(view.events)[-limit:] if limit else list(view.events)
    text = Text(no_wrap=True, overflow="ellipsis")
    if not events:
        text.append("no events yet", style="dim")
        return text
    for i, e in enumerate(events):
        if i:
            text.append("\n")
        style = "red" if e.kind in ("violation", "protocol_error") else ""
        text.append(e.text(), style=style)
    return text


def vm_panel(view: VmView, width: int, *, events: int | None = None) -> Panel:
    inner = max(20, width - PANEL_CHROME)
    parts: list[RenderableType] = [sizes_text(view), status_text(view), guest_text(view)]
    if view.cells:
        cells, per_cell = map_text(view.cells, inner)
        parts += [map_caption(view, per_cell), cells, legend(view)]
        if view.map_source == MAP_HOST:
            note = view.map_note or "the host's backing only"
            parts.append(Text(f"host-only map: {note}", style="yellow"))
    else:
        note = f": {view.map_note}" if view.map_note else ""
        parts.append(Text(f"no block map yet{note}", style="dim"))
    parts.append(violations_text(view))
    if events != 0:
        parts.append(events_text(view, events))
    state = "attached" if view.attached else "detached"
    title = Text.assemble((view.vm_id, "bold"), f"  {state} {view.dm_state}".rstrip())
    subtitle = Text(f"guest {view.guest_address}", style="dim") if view.guest_address else None
    return Panel(
        Group(*parts),
        title=title,
        title_align="left",
        subtitle=subtitle,
        subtitle_align="right",
        width=width,
    )


def header(fleet: Fleet, now: float | None = None) -> Text:
    stamp = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    text = Text()
    text.append("memhp ", style="bold")
    text.append(f"{fleet.source or '-'}  {len(fleet.vms)} VM(s)  {stamp}")
    if fleet.error:
        text.append(f"\n{fleet.error}", style="bold red")
    return text


def fleet_view(
    fleet: Fleet,
    width: int,
    *,
    events: int | None = None,
    lead: Iterable[RenderableType] = (),
) -> Group:
    """The whole frame: a header, ``lead`` (e.g. the demo's progress), one panel per VM."""
    parts: list[RenderableType] = [header(fleet), *lead]
    vms = fleet.sorted()
    if not vms:
        parts.append(Text("no VM yet", style="dim"))
    parts += [vm_panel(v, width, events=events) for v in vms]
    return Group(*parts)
