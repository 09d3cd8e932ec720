"""Protobuf documents and MQTT JSON documents the view tests build by hand."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import struct_pb2

from memhp.v1 import control_pb2, dm_pb2, guest_pb2

MIB = 1 << 20
GIB = 1 << 30
BLOCK = 128 * MIB
BLOCK_PAGES = BLOCK >> 12


def vm_pb(
    vm_id: str = "g1",
    *,
    boot: int = GIB,
    regions: Sequence[tuple[int, int, Sequence[tuple[int, int]]]] = (),
    ballooned: Sequence[tuple[int, int]] = (),
    **fields: Any,
) -> control_pb2.Vm:
    """A ``GetVm`` answer: ``regions`` are (start page, pages, backed (start, pages) ranges);
    ``backed`` is boot memory plus every region's backing minus ``ballooned``."""
    backed = [(0, boot >> 12)]
    for _, _, ranges in regions:
        backed += list(ranges)
    vm = control_pb2.Vm(
        spec=control_pb2.VmSpec(
            vm_id=vm_id, boot_bytes=boot, max_bytes=16 * GIB, block_size_bytes=BLOCK
        ),
        **fields,
    )
    holes = sorted(ballooned)
    for start, count in backed:
        end = start + count
        for hs, hc in holes:
            if hs >= start and hs + hc <= end:
                if hs > start:
                    vm.backed.add(start_page=start, page_cnt=hs - start)
                start = hs + hc
        if end > start:
            vm.backed.add(start_page=start, page_cnt=end - start)
    for start, count in ballooned:
        vm.ballooned.add(start_page=start, page_cnt=count)
    for start, count, ranges in regions:
        vm.regions.add(
            start_page=start,
            page_count=count,
            backed=[dm_pb2.PageRange(start_page=s, page_cnt=c) for s, c in ranges],
        )
    return vm


def memory_pb(
    cells: list[tuple[int, str]],
    *,
    vm_id: str = "g1",
    page_offline: dict[int, int] | None = None,
    ballooned: dict[int, int] | None = None,
    violations: int = 0,
) -> guest_pb2.GuestMemory:
    """A ``GetMemory`` answer with one block per (index, cell)."""
    memory = guest_pb2.GuestMemory(
        vm_id=vm_id,
        block_size_bytes=BLOCK,
        strategy="callback",
        driver_mode="upstream",
        dm_state="DM_INITIALIZED",
        meminfo={"MemTotal": 4 << 20, "MemFree": 3 << 20},
    )
    for index, cell in cells:
        memory.blocks.add(
            index=index,
            state="offline" if cell == "offline" else "online",
            cell=cell,
            page_offline=(page_offline or {}).get(index, 0),
            ballooned=(ballooned or {}).get(index, 0),
        )
    for _ in range(violations):
        memory.violations.add(invariant="unbacked-allocated")
    return memory


def event_pb(vm_id: str, kind: str, timestamp: float = 1.0, /, **payload: Any) -> control_pb2.Event:
    data = struct_pb2.Struct()
    data.update(payload)
    return control_pb2.Event(
        version=1, timestamp=timestamp, vm_id=vm_id, kind=kind, payload=data, source="host"
    )


def mqtt_event(vm: str, kind: str, seq: int = 1, source: str = "host", /, **payload: Any) -> str:
    return json.dumps(
        {
            "version": 1,
            "timestamp": 1700000000.25 + seq,
            "vm": vm,
            "kind": kind,
            "source": source,
            "seq": seq,
            "payload": payload,
        }
    )


def mqtt_state(vm: str, **overrides: Any) -> str:
    doc: dict[str, Any] = {
        "version": 1,
        "timestamp": 1700000000.5,
        "vm": vm,
        "attached": True,
        "dm_state": "HOT_ADD_REPLY_WAIT",
        "requested_bytes": 6 * GIB,
        "actual_bytes": 4 * GIB + 300 * MIB,
        "committed_bytes": 2 * GIB,
        "available_bytes": GIB,
        "ballooned_bytes": 0,
        "busy": True,
        "in_flight": {"kind": "hot_add", "trans_id": 7, "pages": 76800},
        "regions": 1,
        "backed_bytes": 300 * MIB,
        "guest_address": "127.0.0.1:50061",
        "mqtt": {"published": 12, "dropped": 0},
    }
    doc.update(overrides)
    return json.dumps(doc)


def mqtt_guest(vm: str, blocks: list[list[Any]], **overrides: Any) -> str:
    doc: dict[str, Any] = {
        "version": 1,
        "timestamp": 1700000000.75,
        "vm": vm,
        "block_size_bytes": BLOCK,
        "blocks": blocks,
        "meminfo": {"MemTotal": 4501504, "MemFree": 4000000, "MemAvailable": 4000000},
        "strategy": "online-then-reclaim",
        "driver_mode": "upstream",
        "dm_state": "DM_HOT_ADD",
        "violations": 2,
        "mqtt": {"published": 3, "dropped": 0},
    }
    doc.update(overrides)
    return json.dumps(doc)
