"""A real ``memhp guest`` against a fake hypervisor: attach, negotiation, partial backing.

The hypervisor hands over a 512 MiB region of which 192 MiB are backed (the 24-byte
hot-add form), then backs 64 MiB more (the 16-byte form, so the guest finds its
``hv_hotadd_state``); GetMemory shows blocks, regions, counters and the PageOffline
pages in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from memhp import dm
from tests.process.conftest_guest import (
    BLOCK,
    FakeHypervisor,
    GuestProcess,
    running_hypervisor,
    start_guest,
    wait_until,
)

REGION_START = 8 * BLOCK  # right after 1 GiB of boot memory


@pytest_asyncio.fixture
async def hv() -> AsyncIterator[FakeHypervisor]:
    async with running_hypervisor() as h:
        yield h


def responses(hv: FakeHypervisor) -> list[dm.HotAddResponse]:
    return [m for _, m in hv.stream.of(dm.HotAddResponse)]


async def test_attach_negotiate_and_partial_backing(
    hv: FakeHypervisor, guest_processes: list[GuestProcess], tmp_path: Path
) -> None:
    guest = await start_guest(tmp_path, hv.address, "--udev-online", "online_movable")
    guest_processes.append(guest)
    stream = await hv.negotiated()
    # First attach: who it is, no memory state yet; then 2.0 is proposed and accepted.
    assert stream.attach.vm_id == "vm1"
    assert not stream.attach.HasField("state")
    # It announces where its introspection listens (what Vm.guest_address shows).
    assert stream.attach.introspection_address == guest.address
    first = stream.received[0][1]
    assert isinstance(first, dm.VersionRequest)
    assert first.version == dm.DYNMEM_PROTOCOL_VERSION_3
    caps = stream.of(dm.CapabilitiesReport)[0][1]
    assert caps.hot_add and caps.balloon and caps.hot_add_alignment == 7  # 128 MiB

    mem = await guest.memory()
    assert mem.vm_id == "vm1"
    assert mem.block_size_bytes == 128 << 20
    assert [b.index for b in mem.blocks] == list(range(8))
    assert mem.strategy == "callback" and mem.driver_mode == "upstream"
    assert mem.dm_state == "DM_INITIALIZED"

    # 512 MiB region, 192 MiB backed: 24-byte form.
    hv.command(lambda h, now: h.hot_add(4 * BLOCK, 3 * BLOCK // 2, now))
    await wait_until(lambda: responses(hv), what="hot-add response")
    request = next(m for m in stream.sent if isinstance(m, dm.HotAddRequest))
    assert request.region == dm.PageRange(REGION_START, 4 * BLOCK)
    assert request.range == dm.PageRange(REGION_START, 3 * BLOCK // 2)
    assert responses(hv)[0].page_count == 3 * BLOCK // 2
    assert responses(hv)[0].result == 1

    mem = await guest.memory()
    added = {b.index: (b.state, b.zone) for b in mem.blocks if b.index >= 8}
    assert added == {8: ("online", "Movable"), 9: ("online", "Movable")}
    # The live view's cells: memory9 is online with its unbacked half PageOffline.
    cells = {b.index: (b.cell, b.page_offline) for b in mem.blocks if b.index >= 8}
    assert cells == {8: ("online", 0), 9: ("unbacked", BLOCK // 2)}
    (region,) = mem.regions
    assert (region.start_pfn, region.end_pfn) == (REGION_START, REGION_START + 4 * BLOCK)
    assert region.ha_end_pfn == REGION_START + 2 * BLOCK
    assert region.covered_end_pfn == REGION_START + 3 * BLOCK // 2
    assert list(region.gaps) == []
    # The unbacked half of memory9 stays PageOffline; the rest went to the buddy.
    assert mem.pages.page_offline == BLOCK // 2
    assert mem.counters.num_pages_added == 3 * BLOCK // 2
    assert mem.counters.num_pages_onlined == 3 * BLOCK // 2
    assert mem.meminfo["MemTotal"] > 0
    assert list(mem.violations) == []

    # 64 MiB more backing: the 16-byte form, right after the backed pages.
    hv.command(lambda h, now: h.back(BLOCK // 2, now))
    await wait_until(lambda: len(responses(hv)) == 2, what="second hot-add response")
    later = [m for m in stream.sent if isinstance(m, dm.HotAddRequest)][1]
    assert later.region is None
    assert later.range == dm.PageRange(REGION_START + 3 * BLOCK // 2, BLOCK // 2)
    assert responses(hv)[1].page_count == BLOCK // 2

    mem = await guest.memory()
    (region,) = mem.regions
    assert region.covered_end_pfn == REGION_START + 2 * BLOCK
    assert mem.pages.page_offline == 0  # generic_online_page on the newly backed half
    assert mem.counters.num_pages_added == 2 * BLOCK
    assert mem.counters.num_pages_onlined == 2 * BLOCK
    assert list(mem.violations) == []
    assert stream.host.protocol_errors == [] and stream.host.violations == []


async def test_host_reset_makes_the_guest_renegotiate_on_the_same_stream(
    hv: FakeHypervisor, guest_processes: list[GuestProcess], tmp_path: Path
) -> None:
    guest = await start_guest(tmp_path, hv.address)
    guest_processes.append(guest)
    stream = await hv.negotiated()
    stream.host.reset()
    hv.send_error("test-reset", "reset")
    await wait_until(
        lambda: len(stream.of(dm.VersionRequest)) == 2 and stream.host.state == "IDLE",
        what="renegotiation",
    )
    assert len(hv.streams) == 1
    assert (await guest.memory()).dm_state == "DM_INITIALIZED"
    assert stream.host.protocol_errors == []


async def test_udev_onlining_after_a_short_delay_is_not_the_5s_online_timeout(
    hv: FakeHypervisor, guest_processes: list[GuestProcess], tmp_path: Path
) -> None:
    """hv_balloon waits up to 5 s per added block for it to come online; a udev rule that
    onlines it 50 ms later must end that wait then (the agent has to wake for the rule's
    timer while a frame was answered inline), not at the timeout."""
    guest = await start_guest(
        tmp_path, hv.address, "--udev-online", "online_movable", "--onlining-delay", "0.05"
    )
    guest_processes.append(guest)
    await hv.negotiated()
    loop = asyncio.get_running_loop()
    start = loop.time()
    hv.command(lambda h, now: h.hot_add(2 * BLOCK, 2 * BLOCK, now))
    await wait_until(lambda: responses(hv), what="hot-add response", timeout=30)
    took = loop.time() - start
    # Two blocks: a timeout would cost 5 s each.
    assert took < 4.0, f"the hot-add took {took:.1f} s: the onlining wait ran into its timeout"
    mem = await guest.memory()
    assert {b.index: b.state for b in mem.blocks if b.index >= 8} == {8: "online", 9: "online"}
