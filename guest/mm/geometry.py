"""x86-64 memory geometry: pages, pageblocks, buddy orders, sections, memory blocks."""

from __future__ import annotations

from dataclasses import dataclass

from guest.mm.errors import EINVAL, MemoryHotplugError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: MAX_PAGE_ORDER (6.8+; MAX_ORDER - 1 in v5.4): the largest buddy block is 4 MiB.
MAX_PAGE_ORDER = 10
MAX_ORDER_NR_PAGES = 1 << MAX_PAGE_ORDER
#: pageblock_order on x86-64 (HUGETLB_PAGE_ORDER): 2 MiB.
PAGEBLOCK_ORDER = 9
PAGEBLOCK_NR_PAGES = 1 << PAGEBLOCK_ORDER
#: SECTION_SIZE_BITS 27: 128 MiB sections.
SECTION_SIZE_BITS = 27
PAGES_PER_SECTION = 1 << (SECTION_SIZE_BITS - PAGE_SHIFT)
MIN_MEMORY_BLOCK_SIZE = 1 << SECTION_SIZE_BITS
#: MAX_BLOCK_SIZE in arch/x86/mm/init_64.c.
MAX_MEMORY_BLOCK_SIZE = 2 << 30
#: sizeof(struct page): the memmap costs 64 bytes per 4 KiB page (1/64 of the memory).
STRUCT_PAGE_SIZE = 64
#: MAX_PHYSMEM_BITS 46 (4-level paging).
MAX_PHYSMEM_BITS = 46
MAX_PFN = 1 << (MAX_PHYSMEM_BITS - PAGE_SHIFT)


def memmap_pages(nr_pages: int) -> int:
    """Pages of struct page needed to describe ``nr_pages`` pages."""
    return nr_pages * STRUCT_PAGE_SIZE // PAGE_SIZE


@dataclass(frozen=True)
class Geometry:
    """The memory block size of one guest (``memory_block_size_bytes()``)."""

    block_size_bytes: int = MIN_MEMORY_BLOCK_SIZE

    def __post_init__(self) -> None:
        size = self.block_size_bytes
        if size < MIN_MEMORY_BLOCK_SIZE or size > MAX_MEMORY_BLOCK_SIZE or size & (size - 1):
            raise MemoryHotplugError(
                EINVAL,
                f"memory block size {size:#x} must be a power of two between 128 MiB and 2 GiB",
            )

    @property
    def block_pages(self) -> int:
        return self.block_size_bytes >> PAGE_SHIFT

    @property
    def sections_per_block(self) -> int:
        return self.block_size_bytes // MIN_MEMORY_BLOCK_SIZE

    def block_id(self, pfn: int) -> int:
        return pfn // self.block_pages

    def block_range(self, block_id: int) -> tuple[int, int]:
        start = block_id * self.block_pages
        return start, start + self.block_pages


def chunk_order(pfn: int, end: int) -> int:
    """The order of the aligned chunk that starts at ``pfn`` in the onlining walk.

    Current kernels: ``order = pfn ? min(MAX_PAGE_ORDER, __ffs(pfn)) : MAX_PAGE_ORDER``,
    then smaller until the chunk fits before ``end`` (``end > pfn``).
    (v5.4 used ``min(MAX_ORDER - 1, get_order(end - pfn))``; for block-aligned ranges the
    two walks are the same.)
    """
    if end <= pfn:
        raise ValueError(f"chunk_order: empty range [{pfn:#x}, {end:#x})")
    # __ffs(pfn) is the index of the lowest set bit; the largest fitting order is
    # floor(log2(end - pfn)).
    fits = (end - pfn).bit_length() - 1
    order = MAX_PAGE_ORDER if pfn == 0 else (pfn & -pfn).bit_length() - 1
    return min(order, fits, MAX_PAGE_ORDER)


def count_chunks(start: int, end: int) -> int:
    """How many callback invocations the onlining walk makes over ``[start, end)``."""
    return sum(count for _, _, count in buddy_blocks(start, end))


def buddy_blocks(start: int, end: int) -> list[tuple[int, int, int]]:
    """Split ``[start, end)`` into maximal aligned buddy blocks, in ascending order.

    Returns ``(order, first_pfn, count)`` triples: ``count`` consecutive blocks of
    ``order`` starting at ``first_pfn``. Only ``MAX_PAGE_ORDER`` runs have count > 1,
    so the list has at most ~2 * MAX_PAGE_ORDER entries whatever the size.
    """
    out: list[tuple[int, int, int]] = []
    pfn = start
    while pfn < end:
        order = chunk_order(pfn, end)
        if order == MAX_PAGE_ORDER:
            run = (end - pfn) >> MAX_PAGE_ORDER
            out.append((MAX_PAGE_ORDER, pfn, run))
            pfn += run << MAX_PAGE_ORDER
        else:
            out.append((order, pfn, 1))
            pfn += 1 << order
    return out
