"""``memhp scenario run --timeline FILE``: memory over time, one chart per VM.

The runners take a :class:`Sample` per VM after setup and after every step: what the
host backs (boot memory plus hot-added backing, minus ballooned pages), what the guest
has onlined and can use (online blocks less their unbacked and ballooned pages), the
guest's committed memory from its last status report, and the target (when one is
set). Values hold until the next sample, so each series is drawn as steps.

:func:`write_timeline` writes an SVG (written here by hand; the samples are also kept
in its ``metadata`` element as JSON) or, with matplotlib installed (the ``plot``
extra), a PNG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from memhp.units import format_size

SERIES = ("backed", "onlined", "committed", "target")
COLOURS = {
    "backed": "#1565c0",
    "onlined": "#2e7d32",
    "committed": "#ef6c00",
    "target": "#6a1b9a",
}
STROKES = {"backed": 4.0, "onlined": 1.8, "committed": 1.5, "target": 1.5}
DASHES = {"target": "6 4"}

WIDTH = 820
CHART_HEIGHT = 200
LEFT = 72
RIGHT = 20
TOP = 40
BOTTOM = 36
MARGIN = 12
FONT = "font-family='sans-serif' font-size='11'"
TITLE_FONT = "font-family='sans-serif' font-size='13' font-weight='bold'"


class TimelineError(Exception):
    """The timeline cannot be written in the format asked for."""


@dataclass(frozen=True)
class Sample:
    """One VM at one time; sizes in bytes (``target`` None while no target is set)."""

    time: float
    vm: str
    backed: int
    onlined: int
    committed: int
    target: int | None
    step: str = ""

    def value(self, series: str) -> int | None:
        value: int | None = getattr(self, series)
        return value


@dataclass
class Timeline:
    """Samples of every VM; ``clock`` names the time axis (virtual or wall seconds)."""

    clock: str = "virtual time"
    samples: list[Sample] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def vms(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.samples:
            seen.setdefault(s.vm)
        return list(seen)

    def of(self, vm: str) -> list[Sample]:
        return [s for s in self.samples if s.vm == vm]

    def as_dict(self) -> dict[str, Any]:
        return {"clock": self.clock, "samples": [asdict(s) for s in self.samples]}


# -- scales ------------------------------------------------------------------------------


def byte_ticks(top: int) -> list[int]:
    """Ticks from 0 for sizes up to ``top``: a power-of-two step, 3 to 8 ticks."""
    if top <= 0:
        return [0]
    step = 1 << max(0, (top // 4).bit_length() - 1)
    while top // step > 8:
        step <<= 1
    return list(range(0, top + step, step))


def time_ticks(end: float) -> list[float]:
    """Ticks from 0 to ``end`` seconds on a 1-2-5 step, 3 to 10 ticks."""
    if end <= 0:
        return [0.0]
    raw = end / 6
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    count = int(end / step + 1e-9)
    return [round(i * step, 9) for i in range(count + 1)]


def _seconds(value: float) -> str:
    return f"{value:g}"


def steps(samples: list[Sample], series: str) -> Iterator[list[tuple[float, int]]]:
    """Each stretch where ``series`` has a value, as step points (value held till the next)."""
    stretch: list[tuple[float, int]] = []
    for s in samples:
        value = s.value(series)
        if value is None:
            if stretch:
                stretch.append((s.time, stretch[-1][1]))
                yield stretch
                stretch = []
            continue
        if not stretch:
            stretch.append((s.time, value))
            continue
        held = stretch[-1][1]
        if stretch[-1][0] != s.time:
            stretch.append((s.time, held))
        if value != held:
            stretch.append((s.time, value))
    if stretch:
        yield stretch


# -- SVG ---------------------------------------------------------------------------------


def timeline_svg(timeline: Timeline) -> str:
    vms = timeline.vms()
    end = max((s.time for s in timeline.samples), default=0.0)
    span = end if end > 0 else 1.0
    chart = TOP + CHART_HEIGHT + BOTTOM
    height = MARGIN * 2 + chart * max(1, len(vms))
    plot_w = WIDTH - LEFT - RIGHT
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height}' "
        f"viewBox='0 0 {WIDTH} {height}'>",
        "<title>memhp timeline: backed, onlined, committed and target memory</title>",
        f"<metadata>{escape(json.dumps(timeline.as_dict()))}</metadata>",
        f"<rect width='{WIDTH}' height='{height}' fill='white'/>",
    ]
    for n, vm in enumerate(vms):
        samples = timeline.of(vm)
        y0 = MARGIN + n * chart
        top = max(
            (v for s in samples for v in (s.value(k) for k in SERIES) if v is not None),
            default=0,
        )
        yticks = byte_ticks(top)
        ymax = max(yticks[-1], 1)

        def x_of(t: float) -> float:
            return round(LEFT + plot_w * t / span, 2)

        def y_of(v: int, y0: int = y0, ymax: int = ymax) -> float:
            return round(y0 + TOP + CHART_HEIGHT * (1 - v / ymax), 2)

        out.append(f"<g class='chart' data-vm={quoteattr(vm)}>")
        out.append(f"<text x='{LEFT}' y='{y0 + 14}' {TITLE_FONT}>{escape(vm)}</text>")
        lx = LEFT + 12 + 8 * len(vm)
        for name in SERIES:
            dash = f" stroke-dasharray='{DASHES[name]}'" if name in DASHES else ""
            out.append(
                f"<line x1='{lx}' y1='{y0 + 10}' x2='{lx + 18}' y2='{y0 + 10}' "
                f"stroke='{COLOURS[name]}' stroke-width='3'{dash}/>"
            )
            out.append(f"<text x='{lx + 22}' y='{y0 + 14}' {FONT}>{name}</text>")
            lx += 40 + 7 * len(name)
        for tick in yticks:
            y = y_of(tick)
            out.append(
                f"<line x1='{LEFT}' y1='{y}' x2='{LEFT + plot_w}' y2='{y}' stroke='#e0e0e0'/>"
            )
            out.append(
                f"<text x='{LEFT - 6}' y='{y + 4}' text-anchor='end' {FONT}>"
                f"{format_size(tick)}</text>"
            )
        base = y0 + TOP + CHART_HEIGHT
        for when in time_ticks(span):
            x = x_of(when)
            out.append(f"<line x1='{x}' y1='{base}' x2='{x}' y2='{base + 4}' stroke='#333'/>")
            out.append(
                f"<text x='{x}' y='{base + 16}' text-anchor='middle' {FONT}>{_seconds(when)}</text>"
            )
        out.append(
            f"<text x='{LEFT + plot_w}' y='{base + 30}' text-anchor='end' {FONT}>"
            f"{escape(timeline.clock)} (s)</text>"
        )
        out.append(
            f"<rect x='{LEFT}' y='{y0 + TOP}' width='{plot_w}' height='{CHART_HEIGHT}' "
            "fill='none' stroke='#333'/>"
        )
        for name in SERIES:
            d = " ".join(
                "M "
                + " L ".join(f"{x_of(t)} {y_of(v)}" for t, v in stretch)
                # A single instant (one sample at t=0) still gets a visible line.
                + (f" L {x_of(span)} {y_of(stretch[-1][1])}" if end <= 0 else "")
                for stretch in steps(samples, name)
            )
            if not d:
                continue
            dash = f" stroke-dasharray='{DASHES[name]}'" if name in DASHES else ""
            opacity = " stroke-opacity='0.45'" if name == "backed" else ""
            out.append(
                f"<path class='series' data-vm={quoteattr(vm)} data-series='{name}' d='{d}' "
                f"fill='none' stroke='{COLOURS[name]}' stroke-width='{STROKES[name]}'"
                f"{dash}{opacity}/>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- PNG ---------------------------------------------------------------------------------


def timeline_png(timeline: Timeline, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TimelineError(
            f"{path}: a PNG timeline needs matplotlib: pip install 'memhp-emu[plot]' "
            "(or write an .svg, which needs nothing)"
        ) from None
    vms = timeline.vms()
    fig, axes = plt.subplots(
        max(1, len(vms)), 1, figsize=(9, 2.6 * max(1, len(vms))), squeeze=False
    )
    gib = float(1 << 30)
    for ax, vm in zip(axes[:, 0], vms, strict=False):
        samples = timeline.of(vm)
        for name in SERIES:
            for stretch in steps(samples, name):
                ax.step(
                    [t for t, _ in stretch],
                    [v / gib for _, v in stretch],
                    where="post",
                    color=COLOURS[name],
                    linewidth=STROKES[name],
                    linestyle="--" if name in DASHES else "-",
                    alpha=0.5 if name == "backed" else 1.0,
                    label=name,
                )
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(
            unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8
        )
        ax.set_title(vm, loc="left", fontsize=10)
        ax.set_ylabel("GiB")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel(f"{timeline.clock} (s)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def write_timeline(timeline: Timeline, path: Path) -> None:
    """Write ``path`` as SVG or PNG, by its suffix; :class:`TimelineError` otherwise."""
    suffix = path.suffix.lower()
    if suffix == ".svg":
        path.write_text(timeline_svg(timeline))
    elif suffix == ".png":
        timeline_png(timeline, path)
    else:
        raise TimelineError(f"{path}: the timeline is an .svg or a .png file")


def check_timeline_path(path: Path) -> None:
    """Fail early (before a long run) on a suffix or a PNG that cannot be written."""
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise TimelineError(f"{path}: the timeline is an .svg or a .png file")
    if suffix == ".png":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise TimelineError(
                f"{path}: a PNG timeline needs matplotlib: pip install 'memhp-emu[plot]' "
                "(or write an .svg, which needs nothing)"
            ) from None
