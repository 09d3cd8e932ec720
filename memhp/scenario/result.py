"""The JSON result of a scenario: one view per VM, shared by every runner.

Sizes are 4 KiB pages except ``meminfo`` (kB, as ``/proc/meminfo`` prints
them); PFNs are plain integers. Nothing here depends on time, so an in-process
run and a multi-process run of the same scenario produce the same document
(the top-level ``virtual_time``, per-step ``time`` and violation traces aside:
:func:`without_time` drops them).

Both runners build the document with the same pieces: a VM's view (from the
guest model in process, from ``GuestMemory`` and ``Vm`` across processes), the
expectation entries, the deduplicated violations and the sysfs-step outcome.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from guest.drivers.virtio_mem import VirtioMem
from guest.mm.pages import ALLOCATED, BUDDY, OWNER_BALLOON, PAGE_OFFLINE, RESERVED
from guest.vm import GuestVm
from memhp.units import PAGE_SHIFT, SizeError, parse_size
from memhp.v1 import control_pb2, guest_pb2
from memhp.virtio_mem import VirtioMemConfig

#: ``/proc/meminfo`` fields in the order the guest model lists them.
MEMINFO_ORDER = ("MemTotal", "MemFree", "MemAvailable", "Balloon")

#: A finding before deduplication: invariant, first PFN, end PFN, message.
Finding = tuple[str, int, int, str]


class StepFailed(Exception):
    """A step could not be carried out (a bad argument for this state of the VM)."""


@dataclass
class Violation:
    invariant: str
    vm: str
    start_pfn: int
    end_pfn: int
    step: str
    message: str
    trace: list[str]
    expected: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "invariant": self.invariant,
            "vm": self.vm,
            "pfn_start": self.start_pfn,
            "pfn_end": self.end_pfn,
            "step": self.step,
            "message": self.message,
            "trace": self.trace,
            "expected": self.expected,
        }


def record_violations(
    seen: set[Finding],
    violations: list[Violation],
    findings: Iterable[Finding],
    *,
    vm: str,
    step: str,
    trace: list[str],
    expect: Iterable[str],
) -> None:
    """Append each finding not seen before (same invariant, PFNs and message) to ``violations``.

    A violation is recorded once, at the step that first showed it; it is expected when
    its invariant is one of the VM's ``expect_violations``.
    """
    expected = set(expect)
    for finding in findings:
        if finding in seen:
            continue
        seen.add(finding)
        invariant, start, end, message = finding
        violations.append(
            Violation(invariant, vm, start, end, step, message, list(trace), invariant in expected)
        )


def record_dump(
    seen: set[Finding],
    violations: list[Violation],
    unbacked_read: Iterable[tuple[int, int]],
    *,
    vm: str,
    step: str,
    trace: list[str],
    expect: Iterable[str],
) -> None:
    """A dump walk that would read unbacked pages: one ``dump-read-unbacked`` per range."""
    for s, e in unbacked_read:
        key: Finding = ("dump-read-unbacked", s, e, "")
        if key in seen:
            continue
        seen.add(key)
        violations.append(
            Violation(
                "dump-read-unbacked",
                vm,
                s,
                e,
                step,
                f"a dump would read {e - s} unbacked pages (not PageOffline)",
                list(trace),
                expected="dump-read-unbacked" in set(expect),
            )
        )


def dump_outcome(
    pages_read: int, pages_skipped_offline: int, unbacked_pages: int
) -> dict[str, int]:
    return {
        "pages_read": pages_read,
        "pages_skipped_offline": pages_skipped_offline,
        "unbacked_pages_read": unbacked_pages,
    }


def sysfs_outcome(expect_error: Any, error: str | None) -> dict[str, str] | None:
    """The result of an online/offline step whose write failed with ``-error`` (or not).

    ``error`` is the errno's name (``EINVAL``) or None when the write succeeded; raises
    :class:`StepFailed` when that is not what ``expect_error`` said.
    """
    if error is None:
        if expect_error is not None:
            raise StepFailed(f"expected error {expect_error}, but the write succeeded")
        return None
    if expect_error not in (error, f"-{error}", True):
        raise StepFailed(f"expected error {expect_error}, got -{error}")
    return {"error": f"-{error}"}


def guest_view(guest: GuestVm) -> dict[str, Any]:
    """The guest's part of a VM's view (``counters`` and ``regions`` only with hv_balloon)."""
    mm, driver = guest.mm, guest.hv_balloon
    blocks = [
        {
            "index": b.id,
            "state": b.state,
            "zone": b.zone,
            "valid_zones": mm.valid_zones(b),
        }
        for b in sorted(mm.blocks.values(), key=lambda b: b.id)
    ]
    pages = {
        "buddy": mm.count_pages(BUDDY),
        "allocated": mm.count_pages(ALLOCATED),
        "page_offline": mm.count_pages(PAGE_OFFLINE),
        "ballooned": mm.count_pages(PAGE_OFFLINE, OWNER_BALLOON),
        "reserved": mm.count_pages(RESERVED),
    }
    if driver is None:
        return {"blocks": blocks, "meminfo": mm.meminfo(), "pages": pages}
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
        "pages": pages,
    }


def virtio_mem_view(
    config: VirtioMemConfig, *, answered: dict[str, int], driver: VirtioMem | None
) -> dict[str, Any]:
    """A VM's virtio-mem device (its config space, in pages) and the guest driver's state.

    The device side is what QEMU's ``query-memory-devices`` shows (``requested``,
    ``plugged``, ``block_size``, ``region``); ``answered`` counts the requests by answer.
    """
    view: dict[str, Any] = {
        "requested": config.requested_size >> PAGE_SHIFT,
        "plugged": config.plugged_size >> PAGE_SHIFT,
        "usable_region": config.usable_region_size >> PAGE_SHIFT,
        "region": config.region_size >> PAGE_SHIFT,
        "block_size": config.block_size >> PAGE_SHIFT,
        "start_pfn": config.addr >> PAGE_SHIFT,
        "answered": dict(sorted(answered.items())),
    }
    if driver is not None:
        unit = driver.sb_size if driver.in_sbm else driver.bb_size
        view["driver"] = {
            "mode": driver.mode,
            "probed": driver.probed,
            "broken": driver.broken,
            "requested": driver.requested_size >> PAGE_SHIFT,
            "plugged": driver.plugged_size >> PAGE_SHIFT,
            "unit": unit >> PAGE_SHIFT,
            "offline": driver.offline_size >> PAGE_SHIFT,
            "offline_threshold": driver.offline_threshold >> PAGE_SHIFT,
            "retry_timer_armed": driver.retry_timer_deadline is not None,
            "retry_timer_ms": driver.retry_timer_ms,
            "blocks": {
                str(block): {"state": state, "plugged": driver.block_plugged_pages(block)}
                for block, state in driver.block_states().items()
            },
        }
    return view


def _zone(zone: str) -> str | None:
    return zone or None


def virtio_mem_view_pb(
    device: control_pb2.VirtioMemInfo, driver: guest_pb2.GuestVirtioMem | None
) -> dict[str, Any]:
    """:func:`virtio_mem_view` from ``Vm.virtio_mem`` and ``GuestMemory.virtio_mem``."""
    view: dict[str, Any] = {
        "requested": device.requested_bytes >> PAGE_SHIFT,
        "plugged": device.plugged_bytes >> PAGE_SHIFT,
        "usable_region": device.usable_region_size_bytes >> PAGE_SHIFT,
        "region": device.region_size_bytes >> PAGE_SHIFT,
        "block_size": device.block_size_bytes >> PAGE_SHIFT,
        "start_pfn": device.addr >> PAGE_SHIFT,
        "answered": dict(sorted(device.answered.items())),
    }
    if driver is not None:
        view["driver"] = {
            "mode": driver.mode,
            "probed": driver.probed,
            "broken": driver.broken,
            "requested": driver.requested_size >> PAGE_SHIFT,
            "plugged": driver.plugged_size >> PAGE_SHIFT,
            "unit": driver.unit_size >> PAGE_SHIFT,
            "offline": driver.offline_size >> PAGE_SHIFT,
            "offline_threshold": driver.offline_threshold >> PAGE_SHIFT,
            "retry_timer_armed": driver.retry_timer_armed,
            "retry_timer_ms": driver.retry_timer_ms,
            "blocks": {
                str(b.id): {"state": b.state, "plugged": b.plugged_pages} for b in driver.blocks
            },
        }
    return view


def guest_view_pb(memory: guest_pb2.GuestMemory) -> dict[str, Any]:
    """:func:`guest_view` from the guest agent's ``GetMemory`` answer (the same document)."""
    meminfo = dict(memory.meminfo)
    ordered = {k: meminfo.pop(k) for k in MEMINFO_ORDER if k in meminfo}
    ordered.update(sorted(meminfo.items()))
    c, p = memory.counters, memory.pages
    if memory.HasField("virtio_mem") and not memory.dm_state:
        # No hv_balloon: no counters, no regions (as guest_view).
        return {
            "blocks": [
                {
                    "index": b.index,
                    "state": b.state,
                    "zone": _zone(b.zone),
                    "valid_zones": list(b.valid_zones),
                }
                for b in sorted(memory.blocks, key=lambda b: b.index)
            ],
            "meminfo": ordered,
            "pages": {
                "buddy": p.buddy,
                "allocated": p.allocated,
                "page_offline": p.page_offline,
                "ballooned": p.ballooned,
                "reserved": p.reserved,
            },
        }
    return {
        "blocks": [
            {
                "index": b.index,
                "state": b.state,
                "zone": _zone(b.zone),
                "valid_zones": list(b.valid_zones),
            }
            for b in sorted(memory.blocks, key=lambda b: b.index)
        ],
        "meminfo": ordered,
        "counters": {
            "num_pages_added": c.num_pages_added,
            "num_pages_onlined": c.num_pages_onlined,
            "num_pages_ballooned": c.num_pages_ballooned,
        },
        "regions": [
            {
                "start": r.start_pfn,
                "end": r.end_pfn,
                "ha_end": r.ha_end_pfn,
                "covered_start": r.covered_start_pfn,
                "covered_end": r.covered_end_pfn,
                "gaps": [[g.start_pfn, g.end_pfn] for g in r.gaps],
            }
            for r in memory.regions
        ],
        "pages": {
            "buddy": p.buddy,
            "allocated": p.allocated,
            "page_offline": p.page_offline,
            "ballooned": p.ballooned,
            "reserved": p.reserved,
        },
    }


def host_view(target: int | None, current: int, backed: int, state: str) -> dict[str, Any]:
    """The host session's part of a VM's view (pages)."""
    return {"target": target, "current": current, "backed": backed, "state": state}


def vm_view(
    guest: dict[str, Any],
    *,
    strategy: str,
    driver_mode: str,
    host: dict[str, Any] | None,
    violations: list[Violation],
    full: bool = False,
    protocol: str = "hyperv-dm",
    virtio_mem: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A VM's view: what ``expect`` looks up, and (``full``) what the result shows.

    A Hyper-V DM VM's view is what it always was; a VM with a virtio-mem device also
    has ``protocol`` and ``virtio_mem``, and one without a DM device has no
    ``strategy``, ``driver_mode`` or ``host``.
    """
    view = dict(guest)
    if host is not None:
        view["strategy"] = strategy
        view["driver_mode"] = driver_mode
        view["host"] = host
    if protocol != "hyperv-dm":
        view["protocol"] = protocol
    if virtio_mem is not None:
        view["virtio_mem"] = virtio_mem
    view["violations"] = (
        [v.as_dict() for v in violations] if full else [v.invariant for v in violations]
    )
    return view


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


OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "ge": operator.ge,
    "gt": operator.gt,
    "le": operator.le,
    "lt": operator.lt,
    "contains": operator.contains,
    "excludes": lambda a, b: b not in a,
}


def _convert(path: str, value: Any) -> Any:
    """A size string in an expectation becomes the field's unit: kB in meminfo, else pages."""
    if not isinstance(value, str) or not value[:1].isdigit():
        return value
    size = parse_size(value)
    unit, name = (1 << 10, "kB") if path.startswith("meminfo.") else (1 << PAGE_SHIFT, "pages")
    if size % unit:
        raise TypeError(f"{path}: {value!r} is not a whole number of {name}")
    return size // unit


def compare(path: str, actual: Any, expected: Any) -> tuple[bool, Any]:
    if isinstance(expected, dict):
        ok = True
        shown: dict[str, Any] = {}
        for op, raw in expected.items():
            if op not in OPERATORS:
                raise TypeError(f"unknown comparison {op!r} (use {', '.join(OPERATORS)})")
            value = _convert(path, raw)
            shown[op] = value
            ok = ok and bool(OPERATORS[op](actual, value))
        return ok, shown
    value = _convert(path, expected)
    return actual == value, value


def expectations(
    view: dict[str, Any], args: dict[str, Any], *, step: str, vm: str
) -> list[dict[str, Any]]:
    """One entry per path of an ``expect`` step, looked up in ``view`` and compared."""
    out: list[dict[str, Any]] = []
    for path, expected in args.items():
        if path == "vm":
            continue
        entry: dict[str, Any] = {"step": step, "vm": vm, "path": path}
        try:
            actual = lookup(view, path)
            ok, shown = compare(path, actual, expected)
        except (KeyError, SizeError, TypeError) as err:
            entry.update(expected=expected, actual=None, ok=False, error=str(err).strip("'\""))
        else:
            entry.update(expected=shown, actual=actual, ok=ok)
        out.append(entry)
    return out


def scenario_result(
    *,
    name: str,
    seed: int,
    now: float,
    steps: list[dict[str, Any]],
    expectations: list[dict[str, Any]],
    vms: dict[str, dict[str, Any]],
    violations: Iterable[Violation],
) -> dict[str, Any]:
    """The whole document; ``ok`` when every expectation held and every violation was expected."""
    unexpected = [v for v in violations if not v.expected]
    failed = [e for e in expectations if not e["ok"]]
    return {
        "scenario": name,
        "seed": seed,
        "virtual_time": round(now, 6),
        "ok": not unexpected and not failed,
        "steps": steps,
        "expectations": expectations,
        "vms": vms,
    }


def without_time(result: dict[str, Any]) -> dict[str, Any]:
    """The result minus what depends on the clock: ``virtual_time``, each step's ``time``
    and each violation's ``trace``; what two runs of a scenario (in process and across
    processes) must agree on exactly."""
    out = copy.deepcopy(result)
    out.pop("virtual_time", None)
    for step in out.get("steps", []):
        step.pop("time", None)
    for vm in out.get("vms", {}).values():
        for v in vm.get("violations", []):
            if isinstance(v, dict):
                v.pop("trace", None)
    return out
