"""``memhp map --svg``'s picture: well-formed, one square per block, a legend that counts."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from memhp.view.model import Fleet, VmView, expand
from memhp.view.svg import map_svg
from tests.view.helpers import memory_pb, vm_pb

NS = {"svg": "http://www.w3.org/2000/svg"}


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def squares(root: ET.Element) -> dict[int, tuple[str, int]]:
    out = {}
    for rect in root.iterfind(".//svg:rect[@class='cell']", NS):
        out[int(rect.attrib["data-index"])] = (
            rect.attrib["data-cell"],
            int(rect.attrib["data-count"]),
        )
    return out


def view_of(cells: list[tuple[int, str]]) -> VmView:
    fleet = Fleet()
    fleet.apply_vm(vm_pb(attached=True, dm_state="IDLE", actual_bytes=5 << 30))
    fleet.apply_memory("g1", memory_pb(cells))
    return fleet.vms["g1"]


def test_map_svg_has_one_square_per_block() -> None:
    cells = [(i, "online") for i in range(32)] + [(32, "unbacked"), (33, "ballooned")]
    cells += [(35, "offline")]  # block 34 is absent
    view = view_of(cells)
    root = parse(map_svg(view))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.attrib["data-vm"] == "g1"
    assert squares(root) == {i: (cell, 1) for i, cell in cells}
    titles = [t.text or "" for t in root.iterfind("svg:text[@class='title']", NS)]
    assert titles[0] == "g1: callback/upstream, attached IDLE"
    assert "actual 5G" in titles[1]
    labels = [t.text for t in root.iterfind(".//svg:text[@class='row-label']", NS)]
    assert labels == ["0", "32"]
    legend = {
        t.attrib["data-cell"]: int(t.attrib["data-blocks"])
        for t in root.iterfind(".//svg:text[@class='legend-label']", NS)
    }
    assert legend == {"offline": 1, "online": 32, "unbacked": 1, "ballooned": 1}
    tips = [t.text for t in root.iterfind(".//svg:rect[@class='cell']/svg:title", NS)]
    assert tips[32] == "memory32: unbacked"


def test_map_svg_aggregates_a_huge_vm() -> None:
    cells = [(i, "online") for i in range(10_000)]
    cells[7777] = (7777, "unbacked")
    root = parse(map_svg(view_of(cells)))
    found = squares(root)
    assert {count for _, count in found.values()} == {3}
    assert len(found) == 3334
    assert found[7776] == ("unbacked", 3)
    assert sum(1 for cell, _ in found.values() if cell == "unbacked") == 1
    notes = [t.text or "" for t in root.iterfind(".//svg:text[@class='note']", NS)]
    assert notes[0] == "1 square = 3 memory blocks of 128M"


def test_map_svg_escapes_and_marks_a_host_only_map() -> None:
    fleet = Fleet()
    view = fleet.apply_host_map(vm_pb("a<b&c"), "no guest attached")
    assert view is not None
    root = parse(map_svg(view))
    assert root.attrib["data-vm"] == "a<b&c"
    notes = [t.text or "" for t in root.iterfind(".//svg:text[@class='note']", NS)]
    assert "host-only map: no guest attached" in notes
    assert squares(root) == {i: (c, 1) for i, c in expand(view.cells)}
