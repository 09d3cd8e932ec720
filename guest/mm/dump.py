"""A PFN walker like makedumpfile, hibernation and /proc/kcore.

It visits every page that ``pfn_to_online_page`` returns (pages of online
sections), skips PageOffline pages as those readers do, optionally skips free
pages (makedumpfile's dump level 16, hibernation's free-page check), and reads
the rest. Given which pages are really backed, it reports every unbacked page it
would have read: exactly the crash P3 (hyperv-dm.md §4) was about.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extents import RangeSet
from guest.mm.memory import MemoryManager
from guest.mm.pages import BUDDY, PAGE_OFFLINE


@dataclass
class DumpReport:
    pages_read: int = 0
    pages_skipped_offline: int = 0
    pages_skipped_free: int = 0
    #: Ranges that would be read although the host does not back them.
    unbacked_read: list[tuple[int, int]] = field(default_factory=list)

    @property
    def unbacked_pages(self) -> int:
        return sum(e - s for s, e in self.unbacked_read)


def walk_dump(
    mm: MemoryManager, backed: RangeSet | None = None, *, skip_free: bool = False
) -> DumpReport:
    report = DumpReport()
    for s, e in mm.online_sections.ranges():
        for rs, re_, state in mm.pages.runs(s, e):
            n = re_ - rs
            if state.kind == PAGE_OFFLINE:
                report.pages_skipped_offline += n
                continue
            if skip_free and state.kind == BUDDY:
                report.pages_skipped_free += n
                continue
            report.pages_read += n
            if backed is not None:
                report.unbacked_read.extend(backed.holes(rs, re_))
    return report
