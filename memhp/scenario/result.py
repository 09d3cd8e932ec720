"""The JSON result of a scenario: one view per VM, shared by every runner.

Sizes are 4 KiB pages except ``meminfo`` (kB, as ``/proc/meminfo`` prints
them); PFNs are plain integers. Nothing here depends on time, so an in-process
run and a multi-process run of the same scenario produce the same document
(the top-level ``virtual_time`` and per-step ``time`` aside).
"""

from __future__ import annotations

from typing import Any

from guest.mm.pages import ALLOCATED, BUDDY, OWNER_BALLOON, PAGE_OFFLINE, RESERVED
from guest.vm import GuestVm


def guest_view(guest: GuestVm) -> dict[str, Any]:
    mm, driver = guest.mm, guest.driver
    blocks = [
        {
            "index": b.id,
            "state": b.state,
            "zone": b.zone,
            "valid_zones": mm.valid_zones(b),
        }
        for b in sorted(mm.blocks.values(), key=lambda b: b.id)
    ]
    regions = [
        {
            "start": has.start_pfn,
            "end": has.end_pfn,
            "ha_end": has.ha_end_pfn,
            "covered_start": has.covered_start_pfn,
            "covered_end": has.covered_end_pfn,
            "gaps": [[s, e] for s, e in has.gaps],
        }
        for has in driver.ha_regions
    ]
    c = driver.counters
    return {
        "blocks": blocks,
        "meminfo": mm.meminfo(),
        "counters": {
            "num_pages_added": c.num_pages_added,
            "num_pages_onlined": c.num_pages_onlined,
            "num_pages_ballooned": c.num_pages_ballooned,
        },
        "regions": regions,
        "pages": {
            "buddy": mm.count_pages(BUDDY),
            "allocated": mm.count_pages(ALLOCATED),
            "page_offline": mm.count_pages(PAGE_OFFLINE),
            "ballooned": mm.count_pages(PAGE_OFFLINE, OWNER_BALLOON),
            "reserved": mm.count_pages(RESERVED),
        },
    }


def lookup(view: dict[str, Any], path: str) -> Any:
    """``counters.num_pages_onlined``, ``blocks.33.state`` (block index), ``regions.0.gaps``."""
    parts = path.split(".")
    node: Any = view
    walked: list[str] = []
    for part in parts:
        walked.append(part)
        if isinstance(node, dict):
            if part not in node:
                raise KeyError(
                    f"{'.'.join(walked)}: no such field (have: {', '.join(map(str, node))})"
                )
            node = node[part]
        elif isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise KeyError(f"{'.'.join(walked)}: expected an index")
            index = int(part)
            if walked[0] == "blocks" and len(walked) == 2:
                match = [b for b in node if b["index"] == index]
                if not match:
                    raise KeyError(f"{'.'.join(walked)}: no memory block {index}")
                node = match[0]
            else:
                if not -len(node) <= index < len(node):
                    raise KeyError(f"{'.'.join(walked)}: index out of range ({len(node)} entries)")
                node = node[index]
        else:
            raise KeyError(f"{'.'.join(walked)}: {'.'.join(walked[:-1])} is a value, not a record")
    return node
