"""Checks on the DM host's operator commands: refuse bad input before any state changes.

Each check reads the session's state, changes nothing, and raises
:class:`HostCommandError` naming the argument it blames with a gRPC-style code:
``invalid_argument`` (wrong whatever the state), ``failed_precondition`` (the VM or
guest state forbids it now), ``resource_exhausted`` (no room left), ``not_found``.
"""

from __future__ import annotations

from hypervisor.errors import HostCommandError
from hypervisor.ground_truth import GroundTruth, HotAddRegion
from hypervisor.vm import MAX_GUEST_PAGES
from memhp.dm import MAX_PAGE_CNT, CapabilitiesReport, compute_balloon_floor

#: Regions one batched hot-add may place (a 16 TiB hotplug window in 128 MiB blocks is 2^17).
MAX_BATCH = 1 << 20


def check_pages(field: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HostCommandError(field, f"must be an integer page count, got {value!r}")
    if value < minimum:
        raise HostCommandError(field, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise HostCommandError(field, f"must be <= {maximum}, got {value}")


def check_hot_add_allowed(caps: CapabilitiesReport | None, disabled: bool, field: str) -> None:
    # Before the caps arrive the guest's answer is unknown: accept and queue.
    if caps is not None and not caps.hot_add:
        raise HostCommandError(
            field, "the guest did not report the hot_add capability", "failed_precondition"
        )
    if disabled:
        raise HostCommandError(
            field,
            "the guest disabled hot-add (it answered result=1, page_count=0)",
            "failed_precondition",
        )


def check_new_region(
    truth: GroundTruth,
    align: int,
    caps: CapabilitiesReport | None,
    disabled: bool,
    region_pages: int,
    backed_pages: int,
    count: int = 1,
) -> int:
    """Validate ``hot_add`` of ``count`` regions; return where the first one starts."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_BATCH:
        raise HostCommandError("count", f"must be an integer from 1 to {MAX_BATCH}, got {count!r}")
    check_pages("region_pages", region_pages, 1)
    if region_pages % align:
        raise HostCommandError(
            "region_pages",
            f"{region_pages} is not a multiple of the hot-add alignment ({align} pages)",
        )
    if region_pages > MAX_PAGE_CNT:
        raise HostCommandError(
            "region_pages", f"{region_pages} exceeds the 24-bit page count ({MAX_PAGE_CNT})"
        )
    check_pages("backed_pages", backed_pages, 1, region_pages)
    check_hot_add_allowed(caps, disabled, "region_pages")
    max_pages = truth.config.max_pages
    room = max_pages - truth.reserved_pages
    if region_pages * count > room:
        what = f"{region_pages} pages" if count == 1 else f"{count} regions of {region_pages} pages"
        raise HostCommandError(
            "region_pages",
            f"{what} do not fit under max_pages {max_pages} ({room} pages left)",
            "resource_exhausted",
        )
    start = truth.next_region_start(align)
    if start + region_pages * count > MAX_GUEST_PAGES:
        raise HostCommandError(
            "region_pages",
            "the region would end beyond the 40-bit PFN limit",
            "resource_exhausted",
        )
    return start


def check_back(
    truth: GroundTruth,
    caps: CapabilitiesReport | None,
    disabled: bool,
    pages: int,
    start_page: int | None,
) -> tuple[HotAddRegion, int]:
    """Validate ``back``; return the region and the first page to back."""
    check_pages("pages", pages, 1)
    field = "region" if start_page is None else "start_page"
    if start_page is not None:
        check_pages("start_page", start_page, 0)
    if not truth.regions:
        raise HostCommandError(field, "no hot-add region exists yet", "not_found")
    if start_page is None:
        region = truth.regions[-1]
    else:
        found = truth.region_at(start_page)
        if found is None:
            raise HostCommandError(
                "start_page", f"{start_page:#x} lies in no hot-add region", "not_found"
            )
        region = found
    check_hot_add_allowed(caps, disabled, field)
    if region.unusable:
        raise HostCommandError(
            field,
            f"region [{region.start:#x}, {region.end:#x}) takes no further hot-add "
            "(the guest answered a request short)",
            "failed_precondition",
        )
    if start_page is None:
        start = region.offered_end()
        if start + pages > region.end:
            raise HostCommandError(
                "pages",
                f"{pages} pages do not fit: region [{region.start:#x}, {region.end:#x}) "
                f"has {region.end - start} pages after its backed part",
                "resource_exhausted",
            )
        return region, start
    end = start_page + pages
    if end > region.end:
        raise HostCommandError(
            "pages",
            f"[{start_page:#x}, {end:#x}) crosses the end of region "
            f"[{region.start:#x}, {region.end:#x})",
        )
    if not (region.backed.disjoint(start_page, end) and region.pending.disjoint(start_page, end)):
        raise HostCommandError(
            "start_page",
            f"[{start_page:#x}, {end:#x}) overlaps pages already backed",
            "failed_precondition",
        )
    return region, start_page


def check_back_remaining(
    truth: GroundTruth,
    caps: CapabilitiesReport | None,
    disabled: bool,
    max_pages: int,
) -> list[tuple[HotAddRegion, int, int]]:
    """Validate ``back_remaining``; return the holes to back, at most ``max_pages`` each."""
    check_hot_add_allowed(caps, disabled, "remaining")
    holes: list[tuple[HotAddRegion, int, int]] = []
    for region in truth.regions:
        if region.unusable:
            continue
        taken = region.backed.copy()
        for s, e in region.pending.ranges():
            taken.add(s, e)
        for s, e in taken.holes(region.start, region.end):
            holes.extend((region, a, min(a + max_pages, e)) for a in range(s, e, max_pages))
    if not holes:
        raise HostCommandError(
            "remaining",
            "every usable region is already backed (or its backing is queued)",
            "failed_precondition",
        )
    return holes


def check_balloon(caps: CapabilitiesReport | None, current_pages: int, pages: int) -> None:
    check_pages("pages", pages, 1)
    if caps is not None and not caps.balloon:
        raise HostCommandError(
            "pages", "the guest did not report the balloon capability", "failed_precondition"
        )
    if pages > current_pages:
        raise HostCommandError(
            "pages",
            f"{pages} exceeds the guest's current {current_pages} pages",
            "failed_precondition",
        )
    check_above_floor("pages", current_pages, current_pages - pages)


def check_above_floor(field: str, current_pages: int, target_pages: int) -> None:
    """A guest never balloons below its floor (hv_balloon's ``compute_balloon_floor``).

    The floor is computed from the guest's current size, as the guest computes it from
    its total RAM: asking for less can only be partly fulfilled, so it is refused.
    """
    floor = compute_balloon_floor(current_pages)
    if target_pages < floor:
        raise HostCommandError(
            field,
            f"would leave {target_pages} pages, below the guest's balloon floor of {floor} "
            f"pages (Linux hv_balloon keeps at least that much of {current_pages})",
            "failed_precondition",
        )


def check_unballoon(available: int, pages: int) -> None:
    """``available``: ballooned pages not already promised to a queued unballoon."""
    check_pages("pages", pages, 1)
    if pages > available:
        raise HostCommandError(
            "pages",
            f"{pages} exceeds the {available} ballooned pages not already being returned",
            "failed_precondition",
        )
