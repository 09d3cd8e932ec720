"""VM definitions: the memory geometry the hypervisor owns and tells the guest at attach."""

from __future__ import annotations

from dataclasses import dataclass

from memhp.dm import MAX_START_PAGE
from memhp.units import is_power_of_two

#: 128 MiB: the x86 memory block size, and the smallest hot-add chunk Linux uses.
MIN_BLOCK_PAGES = 32_768
#: 2 GiB: the largest memory block size Linux picks (hyperv-dm.md §2.1).
MAX_BLOCK_PAGES = 524_288
#: PFNs on the wire have 40 bits, so guest memory ends below 2^40 pages.
MAX_GUEST_PAGES = MAX_START_PAGE + 1


@dataclass(frozen=True)
class VmConfig:
    """One VM's memory: boot RAM, the hotplug ceiling and the guest's memory block size (pages)."""

    vm_id: str
    boot_pages: int
    max_pages: int
    block_pages: int = MIN_BLOCK_PAGES

    def __post_init__(self) -> None:
        if not isinstance(self.vm_id, str) or not self.vm_id:
            raise ValueError(f"vm_id must be a non-empty string, got {self.vm_id!r}")
        for name in ("boot_pages", "max_pages", "block_pages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer page count, got {value!r}")
        block = self.block_pages
        if not (is_power_of_two(block) and MIN_BLOCK_PAGES <= block <= MAX_BLOCK_PAGES):
            raise ValueError(
                f"block_pages must be a power of two between {MIN_BLOCK_PAGES} and "
                f"{MAX_BLOCK_PAGES} pages (128 MiB..2 GiB), got {block}"
            )
        if self.boot_pages <= 0 or self.boot_pages % block:
            raise ValueError(
                f"boot_pages must be a positive multiple of block_pages ({block}), "
                f"got {self.boot_pages}"
            )
        if self.max_pages % block:
            raise ValueError(
                f"max_pages must be a multiple of block_pages ({block}), got {self.max_pages}"
            )
        if self.max_pages < self.boot_pages:
            raise ValueError(
                f"max_pages must be >= boot_pages ({self.boot_pages}), got {self.max_pages}"
            )
        if self.max_pages > MAX_GUEST_PAGES:
            raise ValueError(
                f"max_pages must be <= 2^40 pages (the 40-bit PFN limit), got {self.max_pages}"
            )
