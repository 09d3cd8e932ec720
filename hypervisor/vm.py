"""VM definitions: the memory geometry the hypervisor owns and tells the guest at attach.

A VM has one memory device: Hyper-V Dynamic Memory (``hyperv-dm``, the default) or a
virtio-mem device (``virtio-mem``) with its :class:`VirtioMemSettings` (QEMU's
``virtio-mem-pci`` properties; the device itself checks them as QEMU's realize does).
"""

from __future__ import annotations

from dataclasses import dataclass

from memhp.dm import MAX_START_PAGE
from memhp.units import PAGE_SHIFT, GiB, MiB, align_up, is_power_of_two
from memhp.virtio_mem import VirtioMemConfig

#: 128 MiB: the x86 memory block size, and the smallest hot-add chunk Linux uses.
MIN_BLOCK_PAGES = 32_768
#: 2 GiB: the largest memory block size Linux picks (hyperv-dm.md §2.1).
MAX_BLOCK_PAGES = 524_288
#: PFNs on the wire have 40 bits, so guest memory ends below 2^40 pages.
MAX_GUEST_PAGES = MAX_START_PAGE + 1
HYPERV_DM = "hyperv-dm"
VIRTIO_MEM = "virtio-mem"
#: The memory devices a VM of the hypervisor can have.
PROTOCOLS = (HYPERV_DM, VIRTIO_MEM)
#: QEMU's default virtio-mem block size on x86 (the THP size).
DEFAULT_VIRTIO_MEM_BLOCK = 2 * MiB


def default_virtio_mem_addr(max_bytes: int, block_bytes: int, device_block: int) -> int:
    """Where the device region starts unless told: above the VM's memory (its hot-add
    window included), aligned to max(1 GiB, the memory block, the device block), as the
    scenario format places it."""
    align = max(GiB, block_bytes, device_block)
    return align_up(max_bytes, align)


@dataclass(frozen=True)
class VirtioMemSettings:
    """A VM's virtio-mem device (bytes): region, device block, initial requested size, place."""

    region_size: int
    addr: int
    block_size: int = DEFAULT_VIRTIO_MEM_BLOCK
    requested: int = 0
    node_id: int = 0

    def device_config(self) -> VirtioMemConfig:
        """The config the device is realized from (nothing plugged yet)."""
        return VirtioMemConfig(
            block_size=self.block_size,
            node_id=self.node_id,
            addr=self.addr,
            region_size=self.region_size,
            usable_region_size=0,
            plugged_size=0,
            requested_size=self.requested,
        )

    def as_data(self) -> dict[str, int]:
        return {
            "region_size": self.region_size,
            "addr": self.addr,
            "block_size": self.block_size,
            "requested": self.requested,
            "node_id": self.node_id,
        }

    @classmethod
    def from_data(cls, data: dict[str, int]) -> VirtioMemSettings:
        return cls(
            region_size=data["region_size"],
            addr=data["addr"],
            block_size=data["block_size"],
            requested=data["requested"],
            node_id=data["node_id"],
        )


@dataclass(frozen=True)
class VmConfig:
    """One VM's memory: boot RAM, the hotplug ceiling and the guest's memory block size (pages)."""

    vm_id: str
    boot_pages: int
    max_pages: int
    block_pages: int = MIN_BLOCK_PAGES
    #: hyperv-dm | virtio-mem
    protocol: str = HYPERV_DM
    #: The virtio-mem device (with protocol virtio-mem only, and then required).
    virtio_mem: VirtioMemSettings | None = None

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
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.protocol == VIRTIO_MEM and self.virtio_mem is None:
            raise ValueError("virtio_mem is required with protocol virtio-mem")
        if self.protocol != VIRTIO_MEM and self.virtio_mem is not None:
            raise ValueError(f"virtio_mem needs protocol virtio-mem, this VM has {self.protocol}")
        if self.virtio_mem is not None and self.virtio_mem.addr < self.max_pages << PAGE_SHIFT:
            raise ValueError(
                f"virtio_mem.addr must not overlap the VM's memory (below "
                f"{self.max_pages << PAGE_SHIFT:#x}), got {self.virtio_mem.addr:#x}"
            )

    @property
    def is_virtio_mem(self) -> bool:
        return self.protocol == VIRTIO_MEM
