"""Shared helpers for the memory-model tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from guest.mm.geometry import buddy_blocks
from guest.mm.memory import MemoryManager
from guest.mm.notifier import NOTIFY_OK, MemoryAction, MemoryNotify

BLOCK = 32768  # pages in a 128 MiB block
GIB = 262144  # pages in 1 GiB
BOOT = GIB  # 1 GiB boot memory: blocks 0..7
HOT = BOOT  # first hot-add PFN (block 8)
HOT_ID = HOT // BLOCK
BOOT_MEMMAP = BOOT // 64  # 4096 pages of struct page for 1 GiB
LOW_RESERVED = 256
BOOT_MANAGED = BOOT - BOOT_MEMMAP - LOW_RESERVED


def block_id(pfn: int) -> int:
    return pfn // BLOCK


@dataclass
class Events:
    """A notifier that records every event (and optionally runs a hook first)."""

    mm: MemoryManager
    priority: int = 0
    log: list[tuple[MemoryAction, MemoryNotify]] = field(default_factory=list)
    hook: Callable[[MemoryAction, MemoryNotify], int | None] | None = None
    shared: list[str] | None = None

    def __post_init__(self) -> None:
        self.mm.notifier.register(self, self.priority, name="test-events")

    def __call__(self, action: MemoryAction, arg: MemoryNotify) -> int:
        self.log.append((action, arg))
        if self.shared is not None:
            self.shared.append(f"notify:{action.name}")
        if self.hook is not None:
            ret = self.hook(action, arg)
            if ret is not None:
                return ret
        return NOTIFY_OK

    @property
    def actions(self) -> list[MemoryAction]:
        return [a for a, _ in self.log]


class ChunkCallback:
    """An online_page_callback that behaves as the kernel's per-chunk calls.

    It splits every run it is handed into the aligned ``(pfn, order)`` chunks the
    kernel would pass one by one, records them, then either keeps the chunk
    (PageOffline, owned by ``owner``) or hands it to ``generic_online_page``.
    """

    def __init__(
        self,
        mm: MemoryManager,
        keep: Callable[[int, int], bool] | None = None,
        owner: str = "drv",
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        self.mm = mm
        self.keep = keep or (lambda pfn, order: False)
        self.owner = owner
        self.on_chunk = on_chunk
        self.chunks: list[tuple[int, int]] = []
        self.kept: list[tuple[int, int]] = []

    def __call__(self, start_pfn: int, nr_pages: int) -> None:
        for order, first, count in buddy_blocks(start_pfn, start_pfn + nr_pages):
            for i in range(count):
                pfn = first + (i << order)
                self.chunks.append((pfn, order))
                if self.on_chunk is not None:
                    self.on_chunk(pfn, order)
                if self.keep(pfn, order):
                    self.mm.set_page_offline(pfn, pfn + (1 << order), self.owner, 1)
                    self.kept.append((pfn, order))
                else:
                    self.mm.generic_online_page(pfn, order)


class RefcountDropper:
    """A driver notifier doing the PageOffline refcount trick (virtio-mem, v5.8+).

    MEM_GOING_OFFLINE: drop the reference on every PageOffline page it owns in the
    range; MEM_CANCEL_OFFLINE: take it again.
    """

    def __init__(self, mm: MemoryManager, owner: str = "drv", priority: int = 0) -> None:
        self.mm = mm
        self.owner = owner
        self.dropped: list[tuple[int, int]] = []
        self.calls: list[MemoryAction] = []
        mm.notifier.register(self, priority, name=f"dropper-{owner}")

    def __call__(self, action: MemoryAction, arg: MemoryNotify) -> int:
        self.calls.append(action)
        end = arg.start_pfn + arg.nr_pages
        if action == MemoryAction.MEM_GOING_OFFLINE:
            for s, e, st in list(self.mm.pages.runs(arg.start_pfn, end)):
                if st.kind == "page-offline" and st.owner == self.owner and st.refcount:
                    self.mm.set_page_offline(s, e, self.owner, refcount=0)
                    self.dropped.append((s, e))
        elif action == MemoryAction.MEM_CANCEL_OFFLINE:
            for s, e in self.dropped:
                if arg.start_pfn <= s < end:
                    self.mm.set_page_offline(s, e, self.owner, refcount=1)
            self.dropped = [(s, e) for s, e in self.dropped if not arg.start_pfn <= s < end]
        elif action == MemoryAction.MEM_OFFLINE:
            self.dropped = [(s, e) for s, e in self.dropped if not arg.start_pfn <= s < end]
        return NOTIFY_OK
