"""Hyper-V Dynamic Memory messages (``include/linux/hyperv.h`` / QEMU ``dynmem-proto.h``).

One frozen dataclass per DM message type, field for field, in 4 KiB page units.
Both protocol state machines (host and guest driver) speak these; the gRPC and
byte-exact codecs convert them at the process edge. :class:`AccessReport` is the
one emulator-only message: the guest tells the host which pages it touched, so
the host can catch an access to memory it never backed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class DmType(IntEnum):
    DM_ERROR = 0
    DM_VERSION_REQUEST = 1
    DM_VERSION_RESPONSE = 2
    DM_CAPABILITIES_REPORT = 3
    DM_CAPABILITIES_RESPONSE = 4
    DM_STATUS_REPORT = 5
    DM_BALLOON_REQUEST = 6
    DM_BALLOON_RESPONSE = 7
    DM_UNBALLOON_REQUEST = 8
    DM_UNBALLOON_RESPONSE = 9
    DM_MEM_HOT_ADD_REQUEST = 10
    DM_MEM_HOT_ADD_RESPONSE = 11
    DM_INFO_MESSAGE = 12


def dynmem_make_version(major: int, minor: int) -> int:
    return (major << 16) | minor


DYNMEM_PROTOCOL_VERSION_1 = dynmem_make_version(0, 3)  # WIN7
DYNMEM_PROTOCOL_VERSION_2 = dynmem_make_version(1, 0)  # WIN8
DYNMEM_PROTOCOL_VERSION_3 = dynmem_make_version(2, 0)  # WIN10
DYNMEM_PROTOCOL_VERSION_CURRENT = DYNMEM_PROTOCOL_VERSION_3
#: What the Linux guest proposes, in order.
GUEST_VERSION_ORDER = (
    DYNMEM_PROTOCOL_VERSION_3,
    DYNMEM_PROTOCOL_VERSION_2,
    DYNMEM_PROTOCOL_VERSION_1,
)

#: 40-bit start PFN and 24-bit count in ``union dm_mem_page_range``.
MAX_START_PAGE = (1 << 40) - 1
MAX_PAGE_CNT = (1 << 24) - 1
#: Every DM message fits one 4 KiB receive buffer: 16-byte header part + 8 per range.
MAX_MESSAGE_SIZE = 4096
MAX_RANGES_PER_MESSAGE = (MAX_MESSAGE_SIZE - 16) // 8  # 510
#: QEMU: HV_BALLOON_HR_CHUNK_PAGES, the largest balloon request Windows honours.
HV_BALLOON_HR_CHUNK_PAGES = 585_728
#: QEMU: largest hot-add chunk (2 GiB) unless the alignment is larger.
HOT_ADD_CHUNK_MAX_PAGES = 524_288
#: QEMU: largest unballoon range.
UNBALLOON_RANGE_MAX_PAGES = 524_288
INFO_TYPE_MAX_PAGE_CNT = 0


def mb2pages(mb: int) -> int:
    return mb << 8


def compute_balloon_floor(totalram_pages: int) -> int:
    """``compute_balloon_floor``: the memory the balloon never takes."""
    n = totalram_pages
    if n < mb2pages(128):
        return mb2pages(8) + (n >> 1)
    if n < mb2pages(512):
        return mb2pages(40) + (n >> 2)
    if n < mb2pages(2048):
        return mb2pages(104) + (n >> 3)
    if n < mb2pages(8192):
        return mb2pages(232) + (n >> 4)
    return mb2pages(488) + (n >> 5)


class ProtocolError(Exception):
    """A message that breaks the DM protocol (its shape, its order or its content)."""


@dataclass(frozen=True)
class PageRange:
    """``union dm_mem_page_range``: 40-bit start page, 24-bit page count."""

    start_page: int
    page_cnt: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_page <= MAX_START_PAGE:
            raise ProtocolError(f"page range start_page {self.start_page:#x} outside 40 bits")
        if not 0 <= self.page_cnt <= MAX_PAGE_CNT:
            raise ProtocolError(f"page range page_cnt {self.page_cnt} outside 24 bits")

    @property
    def end_page(self) -> int:
        return self.start_page + self.page_cnt


@dataclass(frozen=True)
class DmMessage:
    trans_id: int


@dataclass(frozen=True)
class VersionRequest(DmMessage):
    version: int
    is_last_attempt: bool = False


@dataclass(frozen=True)
class VersionResponse(DmMessage):
    is_accepted: bool


@dataclass(frozen=True)
class CapabilitiesReport(DmMessage):
    balloon: bool
    hot_add: bool
    hot_add_alignment: int
    hot_remove: bool = False
    min_page_cnt: int = 0
    max_page_number: int = (1 << 64) - 1


@dataclass(frozen=True)
class CapabilitiesResponse(DmMessage):
    is_accepted: bool
    hot_remove: bool = False
    suppress_pressure_reports: bool = False


@dataclass(frozen=True)
class StatusReport(DmMessage):
    num_avail: int
    num_committed: int
    page_file_size: int = 0
    zero_free: int = 0
    page_file_writes: int = 0
    io_diff: int = 0


@dataclass(frozen=True)
class BalloonRequest(DmMessage):
    num_pages: int


@dataclass(frozen=True)
class BalloonResponse(DmMessage):
    more_pages: bool
    ranges: tuple[PageRange, ...]


@dataclass(frozen=True)
class UnballoonRequest(DmMessage):
    more_pages: bool
    ranges: tuple[PageRange, ...]


@dataclass(frozen=True)
class UnballoonResponse(DmMessage):
    pass


@dataclass(frozen=True)
class HotAddRequest(DmMessage):
    """``dm_hot_add`` (16 bytes, ``region is None``) or ``dm_hot_add_with_region`` (24 bytes)."""

    range: PageRange
    region: PageRange | None = None


@dataclass(frozen=True)
class HotAddResponse(DmMessage):
    page_count: int
    result: int


@dataclass(frozen=True)
class InfoMessage(DmMessage):
    """``DM_INFO_MESSAGE`` with ``INFO_TYPE_MAX_PAGE_CNT``."""

    max_page_count: int


@dataclass(frozen=True)
class AccessReport(DmMessage):
    """Emulator-only: guest pages the guest touched (allocated, read for a dump)."""

    ranges: tuple[PageRange, ...]
    what: str = "allocate"


HOST_TO_GUEST = (
    VersionResponse,
    CapabilitiesResponse,
    BalloonRequest,
    UnballoonRequest,
    HotAddRequest,
    InfoMessage,
)
GUEST_TO_HOST = (
    VersionRequest,
    CapabilitiesReport,
    StatusReport,
    BalloonResponse,
    UnballoonResponse,
    HotAddResponse,
    AccessReport,
)


def split_ranges(start: int, count: int, max_cnt: int = MAX_PAGE_CNT) -> list[PageRange]:
    """``[start, start+count)`` as page ranges no longer than ``max_cnt`` pages each."""
    out = []
    while count > 0:
        n = min(count, max_cnt)
        out.append(PageRange(start, n))
        start += n
        count -= n
    return out
