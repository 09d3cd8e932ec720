"""guest.blockmap: one cell per memory block, from the page map."""

from __future__ import annotations

from guest.blockmap import (
    CELL_BALLOONED,
    CELL_OFFLINE,
    CELL_ONLINE,
    CELL_UNBACKED,
    block_cells,
    run_length,
)
from guest.mm.memory import MMOP_ONLINE
from guest.mm.pages import OWNER_BALLOON
from memhp.dm import HotAddRequest, PageRange
from tests.guest.test_vm import BLOCK, BOOT, R, guest, response


def test_partial_backing_leaves_one_block_unbacked_and_the_rest_offline() -> None:
    g, _ = guest(auto_online_blocks=MMOP_ONLINE, strategy="callback")
    # Region of 3 blocks, 1.5 blocks backed.
    g.deliver(HotAddRequest(1, PageRange(R, BLOCK + BLOCK // 2), PageRange(R, 3 * BLOCK)))
    assert response(g).page_count == BLOCK + BLOCK // 2
    cells = {c.index: c for c in block_cells(g.mm)}
    first = BOOT // BLOCK
    assert all(cells[i].cell == CELL_ONLINE for i in range(first))
    assert cells[first].cell == CELL_ONLINE
    assert cells[first + 1].cell == CELL_UNBACKED
    assert cells[first + 1].page_offline == BLOCK // 2
    assert first + 2 not in cells  # not added: the region's last block waits for backing
    assert run_length(block_cells(g.mm)) == [
        (0, first + 1, CELL_ONLINE),
        (first + 1, 1, CELL_UNBACKED),
    ]


def test_offline_and_ballooned_cells() -> None:
    g, _ = guest(strategy="callback")  # auto-online offline: added blocks stay offline
    g.deliver(HotAddRequest(1, PageRange(R, BLOCK), PageRange(R, BLOCK)))
    response(g)
    g.mm.set_page_offline(64, 128, OWNER_BALLOON)
    cells = {c.index: c for c in block_cells(g.mm)}
    assert cells[BOOT // BLOCK].cell == CELL_OFFLINE
    assert cells[0].cell == CELL_BALLOONED
    assert cells[0].ballooned == 64
    assert cells[0].page_offline == 0
