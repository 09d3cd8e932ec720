"""x86-64 geometry: units, the onlining chunk walk, buddy decomposition, block sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest.mm.errors import EINVAL, MemoryHotplugError
from guest.mm.geometry import (
    MAX_ORDER_NR_PAGES,
    MAX_PAGE_ORDER,
    MIN_MEMORY_BLOCK_SIZE,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    PAGES_PER_SECTION,
    Geometry,
    buddy_blocks,
    chunk_order,
    count_chunks,
    memmap_pages,
)

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 128 * MiB // PAGE_SIZE  # 32768 pages


def test_units_match_the_kernel() -> None:
    assert PAGE_SIZE == 4096
    assert PAGEBLOCK_NR_PAGES == 512  # 2 MiB pageblocks (pageblock_order 9)
    assert MAX_ORDER_NR_PAGES == 1024  # 4 MiB: MAX_PAGE_ORDER 10
    assert PAGES_PER_SECTION == 32768  # 128 MiB sections
    assert MIN_MEMORY_BLOCK_SIZE == 1 << 27
    # 64-byte struct page: the memmap of a 128 MiB block is one 2 MiB pageblock.
    assert memmap_pages(BLOCK) == 512
    assert memmap_pages(GiB // PAGE_SIZE) == 4096


def walk(start: int, end: int) -> list[tuple[int, int]]:
    """The kernel's online_pages_range loop, chunk by chunk: (pfn, order)."""
    out = []
    pfn = start
    while pfn < end:
        order = chunk_order(pfn, end)
        out.append((pfn, order))
        pfn += 1 << order
    return out


def test_aligned_128mib_block_is_32_order10_chunks() -> None:
    start = 8 * BLOCK
    chunks = walk(start, start + BLOCK)
    assert chunks == [(start + i * 1024, 10) for i in range(32)]
    assert count_chunks(start, start + BLOCK) == 32
    assert buddy_blocks(start, start + BLOCK) == [(10, start, 32)]


def test_pfn_zero_is_max_order() -> None:
    assert chunk_order(0, BLOCK) == MAX_PAGE_ORDER
    assert buddy_blocks(0, BLOCK) == [(10, 0, 32)]


def test_memmap_on_memory_first_chunk_is_order9() -> None:
    # The vmemmap takes the first 512 pages: online_pages() starts pageblock- but not
    # MAX_ORDER-aligned, so __ffs(pfn) gives an order-9 (2 MiB) first chunk.
    start = 8 * BLOCK
    chunks = walk(start + 512, start + BLOCK)
    assert chunks[0] == (start + 512, 9)
    assert chunks[1:] == [(start + 1024 * i, 10) for i in range(1, 32)]
    assert count_chunks(start + 512, start + BLOCK) == 32
    assert buddy_blocks(start + 512, start + BLOCK) == [(9, start + 512, 1), (10, start + 1024, 31)]


def test_unaligned_ranges_ascend_then_descend() -> None:
    assert buddy_blocks(1, 16) == [(0, 1, 1), (1, 2, 1), (2, 4, 1), (3, 8, 1)]
    assert buddy_blocks(1, 3) == [(0, 1, 1), (0, 2, 1)]
    assert buddy_blocks(1024, 1024 + 1024 * 3 + 7) == [
        (10, 1024, 3),
        (2, 4096, 1),
        (1, 4100, 1),
        (0, 4102, 1),
    ]
    assert buddy_blocks(5, 5) == []
    assert count_chunks(5, 5) == 0


@settings(max_examples=400)
@given(st.integers(0, 1 << 16), st.integers(1, 1 << 14))
def test_buddy_blocks_tile_the_range_with_maximal_aligned_blocks(start: int, length: int) -> None:
    end = start + length
    blocks = buddy_blocks(start, end)
    pfn = start
    for order, first, count in blocks:
        assert 0 <= order <= MAX_PAGE_ORDER
        assert first == pfn, "ascending and contiguous"
        assert first % (1 << order) == 0, "aligned"
        assert count >= 1
        if count > 1:
            assert order == MAX_PAGE_ORDER
        for i in range(count):
            b = first + (i << order)
            # Maximal: the parent block (same alignment, twice the size) is not inside
            # the range, unless we are already at the largest order.
            if order < MAX_PAGE_ORDER:
                parent = b & ~((2 << order) - 1)
                assert parent < start or parent + (2 << order) > end
        pfn = first + (count << order)
    assert pfn == end
    assert count_chunks(start, end) == sum(c for _, _, c in blocks)
    # Same as walking chunk by chunk.
    flat = [(f + (i << o), o) for o, f, c in blocks for i in range(c)]
    assert flat == walk(start, end)
    # Never more than ~2 * MAX_PAGE_ORDER entries, however large the range.
    assert len(blocks) <= 2 * (MAX_PAGE_ORDER + 1)


@pytest.mark.parametrize("size", [128 * MiB, 256 * MiB, 512 * MiB, GiB, 2 * GiB])
def test_valid_block_sizes(size: int) -> None:
    geo = Geometry(size)
    assert geo.block_pages == size // PAGE_SIZE
    assert geo.sections_per_block == size // (128 * MiB)
    assert geo.block_id(geo.block_pages * 3 + 5) == 3
    assert geo.block_range(3) == (3 * geo.block_pages, 4 * geo.block_pages)


@pytest.mark.parametrize(
    "size", [0, 64 * MiB, 127 * MiB, 384 * MiB, 3 * GiB, 4 * GiB, 128 * MiB + 4096]
)
def test_invalid_block_sizes(size: int) -> None:
    with pytest.raises(MemoryHotplugError) as exc:
        Geometry(size)
    assert exc.value.errno == EINVAL


def test_default_geometry_is_128mib() -> None:
    geo = Geometry()
    assert geo.block_size_bytes == 128 * MiB
    assert geo.block_pages == BLOCK
    assert geo.sections_per_block == 1
