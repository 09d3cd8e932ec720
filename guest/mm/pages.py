"""What the memory model knows about a page: its kind, owner and reference count.

One :class:`PageState` value describes a whole run of pages in the page map
(:class:`extents.RangeMap`), so a 2 GiB block that is half in the buddy and half
PageOffline costs two entries, not half a million objects.
"""

from __future__ import annotations

from typing import NamedTuple

#: No struct page: a hole, or memory that was never added (``!pfn_valid``).
ABSENT = "absent"
#: Added, memmap allocated but not initialised: the block is offline.
UNINIT = "uninit"
#: Free in the buddy allocator (PageBuddy).
BUDDY = "buddy"
#: Allocated (refcount >= 1), by a tagged user of the model.
ALLOCATED = "allocated"
#: PageOffline: logically offline although its section may be online.
PAGE_OFFLINE = "page-offline"
#: PG_reserved: memblock-reserved boot memory, the kernel image, memmap.
RESERVED = "reserved"

#: Owner of the PageOffline pages the core leaves after memmap init (6.11+).
OWNER_CORE = ""
#: Owner of ballooned pages.
OWNER_BALLOON = "balloon"


class PageState(NamedTuple):
    kind: str
    owner: str = ""
    refcount: int = 1
    movable: bool = False


ABSENT_PAGE = PageState(ABSENT, refcount=0)
UNINIT_PAGE = PageState(UNINIT, refcount=0)
BUDDY_PAGE = PageState(BUDDY, refcount=0)
#: Every page of a block right after memmap init: PageOffline, refcount 1, no owner.
CORE_OFFLINE_PAGE = PageState(PAGE_OFFLINE, OWNER_CORE, 1)


def page_offline(owner: str, refcount: int = 1) -> PageState:
    return PageState(PAGE_OFFLINE, owner, refcount)


def allocated(tag: str, movable: bool) -> PageState:
    return PageState(ALLOCATED, tag, 1, movable)


def reserved(owner: str) -> PageState:
    return PageState(RESERVED, owner, 1)


#: memmap_on_memory: the pages at the start of a block that hold its own memmap.
VMEMMAP_PAGE = reserved("vmemmap")
