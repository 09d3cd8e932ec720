"""The events hv_balloon announces for the live view and MQTT: later backing, unballoon.

``pages_onlined`` is what later backing brought online in blocks that were online
already (not what onlining a block did: that is ``block_onlined``); ``unballooned`` is
one unballoon request's pages going back to the buddy.
"""

from __future__ import annotations

from typing import Any

import pytest

from guest.drivers.hv_balloon import MODES
from guest.vm import GuestConfig, GuestVm
from tests.guest.test_hv_balloon import BOOT, GIB, MIB, NO_REPORTS, Host, R, negotiate


def rig(**kw: Any) -> tuple[Host, list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    g = GuestVm(
        GuestConfig("g", boot_pages=BOOT, pressure_report_delay=NO_REPORTS, **kw),
        on_event=lambda kind, data: seen.append((kind, dict(data))),
    )
    negotiate(g)
    h = Host(g)
    h.backed.add(0, BOOT)
    h.pump()
    return h, seen


def of(seen: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [data for k, data in seen if k == kind]


@pytest.mark.parametrize("mode", MODES)
def test_later_backing_of_an_online_block_announces_the_pages_it_onlined(mode: str) -> None:
    h, seen = rig(driver_mode=mode, udev_online_type="online", onlining_delay=0.5)
    h.hot_add(R, 300 * MIB, (R, GIB))
    assert of(seen, "pages_onlined") == []  # block onlining is not later backing
    assert [d["block"] for d in of(seen, "block_onlined")] == [32, 33, 34]
    seen.clear()
    start = R + 300 * MIB
    h.hot_add(start, 100 * MIB)
    # 84 MiB fill the online block 34 at once; the other 16 MiB come with block 35,
    # which udev onlines (the callback onlines them: no pages_onlined for those).
    assert of(seen, "pages_onlined") == [
        {"start_pfn": start, "end_pfn": start + 84 * MIB, "pages": 84 * MIB}
    ]
    assert [d["block"] for d in of(seen, "block_onlined")] == [35]
    kinds = [k for k, _ in seen]
    assert kinds.index("pages_onlined") < kinds.index("block_added") < kinds.index("hot_add_done")
    assert h.findings() == set()


def test_later_backing_of_an_offline_block_announces_nothing_onlined() -> None:
    h, seen = rig()
    h.hot_add(R, 300 * MIB, (R, GIB))
    h.hot_add(R + 300 * MIB, 20 * MIB)
    assert of(seen, "pages_onlined") == []  # left to the callback when user space onlines
    assert of(seen, "hot_add_done")[-1] == {"page_count": 20 * MIB, "result": 1}


def test_unballoon_announces_each_request() -> None:
    h, seen = rig()
    resps = h.balloon(2 * 512)
    assert of(seen, "balloon_done") == [{"pages": 1024}]
    (a, b) = [(x.start_page, x.page_cnt) for r in resps for x in r.ranges]
    h.unballoon([a], more=True)
    h.unballoon([b], more=False)
    assert of(seen, "unballooned") == [
        {"pages": 512, "more_pages": True},
        {"pages": 512, "more_pages": False},
    ]
