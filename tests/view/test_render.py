"""The terminal view: the map laid out in cells, the panels as text."""

from __future__ import annotations

import io

from rich.console import Console, RenderableType

from memhp.view.layout import layout
from memhp.view.model import Fleet
from memhp.view.render import GLYPHS, fleet_view, map_text, vm_panel
from tests.view.helpers import event_pb, memory_pb, mqtt_state, vm_pb

WIDTH = 80


def text_of(renderable: RenderableType, width: int = WIDTH) -> str:
    console = Console(width=width, color_system=None, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_one_cell_per_block_when_they_fit() -> None:
    laid = layout([(0, 30, "online"), (30, 2, "unbacked"), (34, 1, "offline")], columns=16)
    assert laid.per_cell == 1
    assert laid.rows == 3
    assert laid.cells[:30] == ["online"] * 30
    assert laid.cells[30:] == ["unbacked", "unbacked", None, None, "offline"]
    assert laid.first_block(16) == 16


def test_many_blocks_share_a_cell_and_the_telling_kind_wins() -> None:
    # 8192 blocks (1 TiB of 128 MiB blocks) in at most 8 rows of 64: 16 blocks a cell.
    runs = [(0, 5000, "online"), (5000, 1, "unbacked"), (5001, 3000, "online")]
    runs += [(8001, 100, "offline"), (8101, 91, "ballooned")]
    laid = layout(runs, columns=64, max_rows=8)
    assert laid.per_cell == 16
    assert laid.rows == 8
    assert laid.cells[5000 // 16] == "unbacked"
    assert laid.cells[8001 // 16] == "offline"  # 8000 online and 8001.. offline
    assert laid.cells[8101 // 16] == "ballooned"  # 8096.. offline and 8101.. ballooned
    assert laid.cells[0] == "online"


def test_map_text_fits_the_width_and_labels_rows() -> None:
    text, per_cell = map_text([(0, 200, "online")], width=60)
    lines = text.plain.splitlines()
    assert per_cell == 1
    assert all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("  0 ")
    columns = len(lines[0]) - 4
    assert columns % 8 == 0
    assert lines[1].startswith(f"{columns:>3} ")
    assert sum(line.count(GLYPHS["online"]) for line in lines) == 200


def test_panel_shows_sizes_map_legend_and_events() -> None:
    fleet = Fleet()
    fleet.apply_vm(
        vm_pb(
            attached=True,
            dm_state="IDLE",
            requested_bytes=6 << 30,
            requested_set=True,
            actual_bytes=(4 << 30) + (300 << 20),
            guest_address="127.0.0.1:50061",
        )
    )
    cells = [(i, "online") for i in range(33)] + [(33, "unbacked"), (34, "ballooned")]
    cells += [(35, "offline"), (36, "offline")]
    fleet.apply_memory("g1", memory_pb(cells))
    fleet.apply_event(event_pb("g1", "hot_add_request", 1.0, trans_id=3))
    out = text_of(vm_panel(fleet.vms["g1"], WIDTH))
    assert "g1  attached IDLE" in out
    assert "target 6G" in out
    assert "actual 4.3G" in out
    assert "guest callback/upstream" in out
    assert "memory blocks: 37 of 128M" in out
    assert out.count(GLYPHS["online"]) == 33 + 1  # the legend's swatch
    assert out.count(GLYPHS["unbacked"]) == 1 + 1
    assert "· offline 2  █ online 33  ▒ unbacked (PageOffline) 1  ░ ballooned 1" in out
    assert "host hot_add_request trans_id=3" in out
    assert "guest 127.0.0.1:50061" in out
    assert all(len(line) <= WIDTH for line in out.splitlines())


def test_host_only_map_says_so() -> None:
    fleet = Fleet()
    fleet.apply_host_map(vm_pb(), "no guest attached: the host's backing")
    out = text_of(vm_panel(fleet.vms["g1"], WIDTH))
    assert "host-only map: no guest attached" in out
    assert "no events yet" in out


def test_waiting_for_the_guest_over_mqtt_is_not_a_host_map() -> None:
    fleet = Fleet()
    fleet.apply_mqtt("memhp/v1/vm/g1/state", mqtt_state("g1"))
    out = text_of(vm_panel(fleet.vms["g1"], WIDTH))
    assert "no block map yet: waiting for the guest's retained document" in out
    assert "host-only" not in out
    assert "in flight hot_add trans_id=7 76800 pages" in out
    # The state document has no count of the host's violations: what was seen.
    assert "violations 0 (host 0 seen, guest 0)" in out


def test_aggregated_map_says_how_many_blocks_a_cell_holds() -> None:
    fleet = Fleet()
    fleet.apply_memory("g1", memory_pb([(i, "online") for i in range(4000)]))
    out = text_of(vm_panel(fleet.vms["g1"], WIDTH))
    assert "memory blocks: 4000 of 128M, 8 blocks per cell" in out
    assert "█ online 4000" in out


def test_frame_has_a_header_and_every_vm() -> None:
    fleet = Fleet()
    fleet.source = "hypervisor 127.0.0.1:1"
    fleet.error = "hypervisor 127.0.0.1:1: UNAVAILABLE"
    fleet.apply_vm(vm_pb("b"))
    fleet.apply_vm(vm_pb("a"))
    out = text_of(fleet_view(fleet, WIDTH))
    assert out.startswith("memhp hypervisor 127.0.0.1:1  2 VM(s)")
    assert "UNAVAILABLE" in out
    assert out.index("─ a ") < out.index("─ b ")
    assert "no block map yet" in out
    assert "no VM yet" in text_of(fleet_view(Fleet(), WIDTH))
