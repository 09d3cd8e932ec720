"""Events and state documents as they go out over MQTT: envelope, topics, schemas, catalogue.

Every state change on either side is an *event*: a JSON envelope (schema version,
timestamp, VM, kind, source, the publisher's sequence number, a kind-specific payload)
published to ``memhp/v1/vm/{vm}/events/{kind}``. Next to the events each VM has two
retained documents that a late subscriber gets at once: the hypervisor's summary
(``memhp/v1/vm/{vm}/state``) and the guest agent's memory map (``.../guest``).

This module is the contract, shared by the publishers and by whoever reads the topics:
topic names, the envelope, the JSON Schemas of the envelope and of both documents
(``memhp/schema/*.json``, shipped as package data), and the catalogue of event kinds,
from which the README's table is written. The formats only grow: new fields, new kinds.
Base layer: it imports neither side and no I/O library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from typing import Any, Final

#: The schema version of the envelope and of both documents.
VERSION: Final = 1
TOPIC_ROOT: Final = "memhp/v1"
#: Everything about every VM (what a live view subscribes to).
ALL_VMS: Final = f"{TOPIC_ROOT}/vm/+/#"
SOURCES: Final = ("host", "guest")
#: The event a publisher sends after it had to drop events (payload ``{"dropped": n}``).
EVENTS_DROPPED: Final = "events_dropped"

#: What an MQTT topic level may not contain (a separator, the wildcards, NUL).
_BAD_LEVEL = re.compile(r"[/+#\x00]")
_KIND = re.compile(r"^[a-z][a-z0-9_]*$")
_TOPIC = re.compile(r"^memhp/v1/vm/([^/]+)/(events/([^/]+)|state|guest)$")


class TopicError(ValueError):
    """A VM id or kind that cannot be an MQTT topic level."""


def check_vm_level(vm: str) -> str:
    """``vm`` if it can be one topic level (non-empty; no ``/``, ``+``, ``#``)."""
    if not vm or _BAD_LEVEL.search(vm):
        raise TopicError(f"VM id {vm!r} cannot be an MQTT topic level (no '/', '+', '#')")
    return vm


def event_topic(vm: str, kind: str) -> str:
    """``memhp/v1/vm/{vm}/events/{kind}``: one event, not retained, QoS 1."""
    if not _KIND.match(kind):
        raise TopicError(f"event kind {kind!r} must match {_KIND.pattern}")
    return f"{TOPIC_ROOT}/vm/{check_vm_level(vm)}/events/{kind}"


def state_topic(vm: str) -> str:
    """``memhp/v1/vm/{vm}/state``: the hypervisor's retained summary of the VM."""
    return f"{TOPIC_ROOT}/vm/{check_vm_level(vm)}/state"


def guest_topic(vm: str) -> str:
    """``memhp/v1/vm/{vm}/guest``: the guest agent's retained memory map."""
    return f"{TOPIC_ROOT}/vm/{check_vm_level(vm)}/guest"


@dataclass(frozen=True)
class Topic:
    """A parsed memhp topic: ``what`` is ``events``, ``state`` or ``guest``."""

    vm: str
    what: str
    kind: str | None = None


def parse_topic(topic: str) -> Topic | None:
    """The VM and the kind of document a topic carries; None for anything else."""
    m = _TOPIC.match(topic)
    if m is None:
        return None
    if m.group(3) is not None:
        return Topic(m.group(1), "events", m.group(3))
    return Topic(m.group(1), m.group(2))


def envelope(
    *,
    vm: str,
    kind: str,
    source: str,
    seq: int,
    payload: Mapping[str, Any],
    timestamp: float,
) -> dict[str, Any]:
    """One event as published: the envelope around the kind-specific payload."""
    return {
        "version": VERSION,
        "timestamp": timestamp,
        "vm": vm,
        "kind": kind,
        "source": source,
        "seq": seq,
        "payload": dict(payload),
    }


def _jsonable(value: Any) -> Any:
    """What ``json`` cannot encode by itself: tuples and sets become lists, the rest text."""
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if isinstance(value, Enum):
        return value.value
    return str(value)


def encode(document: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON (what goes on the wire)."""
    return json.dumps(
        document, separators=(",", ":"), ensure_ascii=False, default=_jsonable
    ).encode()


# -- JSON Schemas ---------------------------------------------------------------------

#: The shipped schemas: ``event`` (the envelope), ``state`` and ``guest`` (the documents).
SCHEMA_NAMES: Final = ("event", "state", "guest")


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) called ``name``, from the package data."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"no schema {name!r}; there are {', '.join(SCHEMA_NAMES)}")
    text = resources.files("memhp").joinpath("schema", f"{name}.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


# -- the catalogue of event kinds -------------------------------------------------------


@dataclass(frozen=True)
class EventKind:
    """One kind of event: who publishes it, what it means, its payload's fields."""

    source: str
    kind: str
    meaning: str
    fields: tuple[str, ...]


def _host(kind: str, meaning: str, *fields: str) -> EventKind:
    return EventKind("host", kind, meaning, fields)


def _session(kind: str, meaning: str, *fields: str) -> EventKind:
    """A host event from the DM session: its payload also carries the session ``state``."""
    return EventKind("host", kind, meaning, ("state", *fields))


def _guest(kind: str, meaning: str, *fields: str) -> EventKind:
    return EventKind("guest", kind, meaning, fields)


_PROTOCOL_ERROR = ("kind", "message", "trans_id", "pfn_start", "pfn_end")

CATALOGUE: Final[tuple[EventKind, ...]] = (
    # -- the hypervisor ------------------------------------------------------------
    _host(
        "vm_created",
        "a VM was defined (Control.CreateVm, --config, or a first attach with defaults)",
        "boot_pages",
        "max_pages",
        "block_pages",
    ),
    _host(
        "attach",
        "a guest opened the VM's DM channel; `reconcile` says what a reattach kept",
        "boot_pages",
        "max_pages",
        "block_pages",
        "created",
        "reattach",
        "guest_state",
        "guest_address",
        "reconcile",
    ),
    _host(
        "detach", "the guest's stream ended; the session and its backing stay", "reason", "dm_state"
    ),
    _session(
        "restored",
        "the session was rebuilt from the state file",
        "regions",
        "current_pages",
        "ballooned_pages",
    ),
    _session(
        "reset", "the channel was reset (a protocol error, a reattach); in-flight work is void"
    ),
    _session("version", "a version request was answered", "version", "accepted", "is_last_attempt"),
    _session(
        "negotiated",
        "the capabilities were accepted: the channel is up",
        "version",
        "balloon",
        "hot_add",
        "hot_add_alignment",
        "post_init_until",
    ),
    _session("ready", "the post-negotiation wait is over (`--profile qemu`)"),
    _session(
        "status_report",
        "the guest's status report (every second)",
        "committed_pages",
        "available_pages",
        "time",
    ),
    _session(
        "target", "a target size was set (operator or policy)", "target_pages", "current_pages"
    ),
    _session(
        "target_plan",
        "how a target splits into unballoon, hot-add and balloon",
        "target_pages",
        "current_pages",
        "unballoon_pages",
        "hot_add_pages",
        "balloon_pages",
    ),
    _session("command_queued", "an operator command waits for the channel", "command"),
    _session("command_started", "a command began", "command"),
    _session("command_done", "a command finished", "command"),
    _session("command_dropped", "a command was given up", "command", "reason", "offers"),
    _session(
        "hot_add_request",
        "hot-add request sent: `range` backed, `region` the whole "
        "region (24-byte form) or null (16-byte form: later backing)",
        "trans_id",
        "range",
        "region",
        "form",
    ),
    _session(
        "hot_add_response",
        "the guest's hot-add response",
        "trans_id",
        "page_count",
        "result",
        "accepted",
        "requested",
    ),
    _session(
        "region_unusable",
        "the guest added less than offered: no more backing goes to the region",
        "region",
        "added",
        "requested",
    ),
    _session("hot_add_disabled", "the guest refused hot-add for good", "trans_id"),
    _session("balloon_request", "balloon request sent", "trans_id", "num_pages"),
    _session(
        "balloon_response",
        "one balloon response (of possibly several)",
        "trans_id",
        "ranges",
        "pages",
        "received",
        "requested",
        "more_pages",
        "at_floor",
    ),
    _session(
        "unballoon_request", "unballoon request sent (page ranges)", "trans_id", "pages", "ranges"
    ),
    _session("unballoon_response", "the guest acknowledged the unballoon", "trans_id", "pages"),
    _session(
        "violation",
        "the guest touched memory the host does not back (ground truth)",
        *_PROTOCOL_ERROR,
        "what",
    ),
    _session(
        "protocol_error",
        "the guest broke the DM protocol; `action` is what the host did",
        *_PROTOCOL_ERROR,
        "action",
    ),
    _host(
        "policy",
        "the VM's target policy changed",
        "kind",
        "buffer_percent",
        "minimum_pages",
        "maximum_pages",
    ),
    _host(
        "policy_decision",
        "the dynamic policy chose a new target from a status report",
        "policy",
        "committed_pages",
        "buffer_percent",
        "minimum_pages",
        "maximum_pages",
        "previous_target_pages",
        "target_pages",
    ),
    _host(
        EVENTS_DROPPED,
        "the publisher dropped this many of the VM's events (queue full) since its last report",
        "dropped",
    ),
    # -- the guest agent -------------------------------------------------------------
    _guest("version_accepted", "hv_balloon: the host accepted a protocol version", "version"),
    _guest("negotiated", "hv_balloon: version and capabilities accepted", "version"),
    _guest("probe_failed", "hv_balloon: negotiation failed", "reason"),
    _guest("renegotiate", "hv_balloon negotiates again (host reset, new stream)", "generation"),
    _guest("hot_add_done", "hv_balloon answered a hot-add request", "page_count", "result"),
    _guest("hot_add_stale", "a hot-add finished after a reset; no answer sent", "page_count"),
    _guest("block_added", "`add_memory`: a memory block appeared (offline)", "block", "start_pfn"),
    _guest(
        "block_onlined",
        "a memory block went online (udev, a sysfs write, auto_online_blocks); "
        "`online_type` null when not known",
        "block",
        "online_type",
        "zone",
    ),
    _guest("block_offlined", "a memory block went offline", "block"),
    _guest("online_failed", "onlining a block failed", "block", "errno", "message"),
    _guest("offline_failed", "offlining a block failed", "block", "errno", "message"),
    _guest(
        "pages_onlined",
        "later backing: `generic_online_page` on newly backed pages of online blocks",
        "start_pfn",
        "end_pfn",
        "pages",
    ),
    _guest("balloon_done", "hv_balloon answered a balloon request", "pages"),
    _guest("balloon_stale", "a balloon request cut short by a reset", "pages"),
    _guest(
        "unballooned", "hv_balloon gave ballooned pages back to the buddy", "pages", "more_pages"
    ),
    _guest(
        "driver_violation",
        "hv_balloon caught the host breaking a rule",
        "kind",
        "start_pfn",
        "end_pfn",
        "message",
    ),
    _guest(
        "violation",
        "the invariant checker found a new violation",
        "invariant",
        "start_pfn",
        "end_pfn",
        "message",
    ),
    _guest(
        "allocated", "an allocation (workload, GuestControl)", "tag", "zone", "requested", "pages"
    ),
    _guest(
        "allocated_in_window",
        "an allocation armed to land inside an onlining window",
        "block",
        "tag",
        "zone",
        "pages",
    ),
    _guest("freed", "pages freed", "tag", "pages"),
    _guest("workload_short", "the workload cannot allocate what its curve asks", "target", "short"),
    _guest("workload_caught_up", "the workload has what its curve asks again", "target"),
    _guest("log", "a line hv_balloon would print to the kernel log", "message"),
    _guest(
        EVENTS_DROPPED,
        "the publisher dropped this many events (queue full) since its last report",
        "dropped",
    ),
    # -- virtio-mem: the device (hypervisor) and the driver (guest) -------------------
    _host(
        "virtio_mem_request",
        "virtio-mem: the guest's request on the guest-request virtqueue",
        "request",
        "addr",
        "nb_blocks",
        "time",
    ),
    _host("virtio_mem_response", "virtio-mem: the device's answer", "request", "response"),
    _host(
        "size_change",
        "virtio-mem: the plugged size changed (QEMU's MEMORY_DEVICE_SIZE_CHANGE)",
        "plugged_size",
        "requested_size",
    ),
    _host(
        "resize",
        "virtio-mem: the host set requested_size (a config-change interrupt)",
        "requested_size",
        "usable_region_size",
        "plugged_size",
        "time",
    ),
    _host("busy_injected", "virtio-mem: the device answers BUSY (fault injection)", "count"),
    _host(
        "system_reset",
        "virtio-mem: a system reset unplugged everything",
        "unplugged",
        "response",
        "time",
    ),
    _guest(
        "probe",
        "virtio_mem: the driver probed the device (mode sbm or bbm)",
        "device",
        "mode",
        "block_size",
        "subblock_size",
        "big_block_size",
        "offline_threshold",
    ),
    _guest(
        "config",
        "virtio_mem: the driver read the device's config",
        "device",
        "plugged_size",
        "requested_size",
        "usable_region_size",
    ),
    _guest(
        "wq_done",
        "virtio_mem: one run of the work loop ended",
        "device",
        "rc",
        "plugged_size",
        "requested_size",
    ),
    _guest("retry_timer", "virtio_mem: retry the work after this long", "device", "seconds"),
    _guest("plug_failed", "virtio_mem: a PLUG request failed", "device", "addr", "size", "rc"),
    _guest("unplug_failed", "virtio_mem: an UNPLUG request failed", "device", "addr", "size", "rc"),
    _guest("unplug_all_failed", "virtio_mem: UNPLUG_ALL failed", "device", "rc"),
    _guest(
        "add_failed",
        "virtio_mem: add_memory of a plugged block failed",
        "device",
        "addr",
        "size",
        "rc",
        "message",
    ),
    _guest(
        "offline_and_remove_failed",
        "virtio_mem: offline_and_remove_memory failed",
        "device",
        "addr",
        "size",
        "rc",
    ),
    _guest(
        "subblock_busy",
        "virtio_mem: a subblock could not be fake-offlined (unmovable pages)",
        "device",
        "block",
        "subblock",
    ),
    _guest(
        "big_block_busy",
        "virtio_mem: a big block could not be offlined (unmovable pages)",
        "device",
        "block",
    ),
    _guest(
        "broken",
        "virtio_mem: an unknown error; the device is marked broken",
        "device",
        "rc",
        "message",
    ),
    _guest("warning", "virtio_mem: a warning the driver would print", "device", "message"),
    _guest("removed", "virtio_mem: the driver was removed", "device"),
)

_BY_KEY: Final = {(e.source, e.kind): e for e in CATALOGUE}


def catalogue_entry(source: str, kind: str) -> EventKind | None:
    """The catalogue's entry for ``kind`` published by ``source``, or None."""
    return _BY_KEY.get((source, kind))


def markdown_table() -> str:
    """The README's table of event kinds, from the catalogue."""
    lines = ["| kind | source | meaning | payload |", "|---|---|---|---|"]
    for e in CATALOGUE:
        payload = ", ".join(f"`{f}`" for f in e.fields) or "(empty)"
        lines.append(f"| `{e.kind}` | {e.source} | {e.meaning} | {payload} |")
    return "\n".join(lines) + "\n"
