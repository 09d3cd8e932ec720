"""Scenario files: YAML in, validated dataclasses out, errors that name file and line.

A scenario declares VMs and a list of steps. Every size accepts ``4096``,
``128M``, ``1G``, ``1T`` (binary units). The format is documented in the
README; this module is its one parser, used by the in-process runner and, later,
by the multi-process one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memhp.units import SizeError, align_up, format_size, is_power_of_two, parse_size

STRATEGIES = ("callback", "going-online", "online-then-reclaim")
DRIVER_MODES = ("upstream", "fixed")
ONLINE_TYPES = ("offline", "online", "online_kernel", "online_movable")
ZONES = ("Normal", "Movable")
NOTIFIER_ACTIONS = ("MEM_GOING_ONLINE", "MEM_GOING_OFFLINE")
PROFILES = ("default", "qemu")
HYPERV_DM = "hyperv-dm"
VIRTIO_MEM = "virtio-mem"
PROTOCOLS = (HYPERV_DM, VIRTIO_MEM, f"{HYPERV_DM}+{VIRTIO_MEM}")
#: Steps that talk to a Hyper-V DM device, and to a virtio-mem device.
HYPERV_STEPS = ("hot_add", "back", "set_target", "balloon", "unballoon")
VIRTIO_STEPS = ("resize",)
#: QEMU's smallest virtio-mem block.
VIRTIO_MEM_MIN_BLOCK = 1 << 20


class ScenarioError(Exception):
    """A bad scenario file: says which file, which line, what is wrong."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.message = message


class _Map(dict[str, Any]):
    """A YAML mapping that remembers its line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[str, int]


class _Loader(yaml.SafeLoader):
    pass


class _Seq(list[Any]):
    """A YAML sequence that remembers the line of each item (1-based)."""

    item_lines: list[int]


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    explicit = [kv for kv in node.value if kv[0].tag != "tag:yaml.org,2002:merge"]
    loader.flatten_mapping(node)
    # flatten_mapping puts the pairs merged in with "<<" first; explicit keys override them.
    merged = node.value[: len(node.value) - len(explicit)]
    out = _Map()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    seen: set[str] = set()
    for pairs, explicit_pairs in ((merged, False), (explicit, True)):
        for key_node, value_node in pairs:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ScenarioError("", line, f"key {key!r} must be a string")
            if explicit_pairs:
                if key in seen:
                    raise ScenarioError("", line, f"duplicate key {key!r}")
                seen.add(key)
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_lines[key] = line
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class VirtioMemSpec:
    """A VM's virtio-mem device (bytes): QEMU's ``virtio-mem-pci`` properties."""

    region_size: int
    block_size: int = 2 << 20
    requested: int = 0
    #: Default (set by the parser): the first address above ``max_memory`` aligned to
    #: max(1 GiB, the memory block, the device block).
    addr: int = 0
    node: int = 0
    #: virtio_mem module parameters of the guest.
    force_bbm: bool = False
    unplug_online: bool = True
    bbm_safe_unplug: bool = True
    line: int = 0


@dataclass
class VmSpec:
    id: str
    boot_memory: int
    max_memory: int
    block_size: int = 128 << 20
    strategy: str = "callback"
    driver_mode: str = "upstream"
    auto_online: str = "offline"
    udev_online: str | None = None
    onlining_delay: float = 0.0
    onlining_jitter: float = 0.0
    memmap_on_memory: bool = False
    pressure_report_delay: int = 0
    expect_violations: list[str] = field(default_factory=list)
    line: int = 0
    protocol: str = HYPERV_DM
    virtio_mem: VirtioMemSpec | None = None

    @property
    def protocols(self) -> tuple[str, ...]:
        return tuple(self.protocol.split("+"))


@dataclass
class Step:
    kind: str
    args: dict[str, Any]
    line: int
    index: int

    @property
    def label(self) -> str:
        return f"step {self.index + 1} ({self.kind}, line {self.line})"

    def describe(self) -> str:
        """What the step does, in a line: ``hot_add g1: region 1G, backed 300M``."""
        sizes = SIZE_KEYS.get(self.kind, DEFAULT_SIZE_KEYS) if self.kind != "expect" else set()
        parts = []
        for key, value in self.args.items():
            if key == "vm":
                continue
            if self.kind == "expect":
                parts.append(key)
            elif key in sizes and isinstance(value, int):
                parts.append(f"{key} {format_size(value)}")
            elif value is True:
                parts.append(key)
            else:
                parts.append(f"{key} {value}")
        head = f"{self.kind} {self.args['vm']}" if "vm" in self.args else self.kind
        return f"{head}: {', '.join(parts)}" if parts else head


@dataclass
class Scenario:
    path: str
    name: str
    description: str
    seed: int
    profile: str
    vms: list[VmSpec]
    steps: list[Step]

    def vm(self, vm_id: str) -> VmSpec:
        return next(v for v in self.vms if v.id == vm_id)


# step kind -> (required keys, optional keys)
STEP_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "hot_add": ({"vm", "region", "backed"}, {"offset", "form"}),
    "back": ({"vm", "size"}, {"offset", "region"}),
    "set_target": ({"vm", "size"}, set()),
    "balloon": ({"vm", "size"}, set()),
    "unballoon": ({"vm", "size"}, set()),
    "online": ({"vm", "block"}, {"type", "expect_error"}),
    "offline": ({"vm", "block"}, {"expect_error"}),
    "allocate": ({"vm", "size"}, {"order", "zone", "tag", "movable", "in_window", "block"}),
    "free": ({"vm", "tag"}, {"size"}),
    "inject": ({"vm"}, {"notifier", "errno", "count", "slow_onlining"}),
    "advance": ({"seconds"}, set()),
    "dump": ({"vm"}, {"skip_free"}),
    "resize": ({"vm", "size"}, set()),
    "expect": ({"vm"}, set()),  # any other key is a result path
}

#: Keys that take sizes, per step kind (``back.region`` is a region index, not a size).
SIZE_KEYS: dict[str, set[str]] = {
    "hot_add": {"region", "backed", "offset"},
    "back": {"size", "offset"},
}
DEFAULT_SIZE_KEYS = {"size"}


def load_scenario(path: str | Path) -> Scenario:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ScenarioError(path, None, f"cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        line = text_line_of(Path(path).read_bytes(), err.start)
        raise ScenarioError(path, line, f"not UTF-8 text ({err.reason})") from None
    return parse_scenario(text, path)


def text_line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _item_line(items: Any, index: int, fallback: int) -> int:
    lines = getattr(items, "item_lines", None)
    return lines[index] if lines and index < len(lines) else fallback


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    try:
        doc = yaml.load(text, Loader=_Loader)
    except ScenarioError as err:
        raise ScenarioError(path, err.line, err.message) from None
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else None
        raise ScenarioError(path, line, f"invalid YAML: {err.problem}") from None
    if not isinstance(doc, _Map):
        raise ScenarioError(path, 1, "a scenario must be a mapping with 'vms' and 'steps'")
    p = _Parser(path)
    p.keys(doc, {"vms", "steps"}, {"name", "description", "seed", "profile"}, "scenario")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ScenarioError(path, doc.key_lines.get("seed"), "seed must be an integer")
    profile = doc.get("profile", "default")
    if profile not in PROFILES:
        raise ScenarioError(
            path, doc.key_lines.get("profile"), f"profile must be one of {', '.join(PROFILES)}"
        )
    vms_raw = doc["vms"]
    if not isinstance(vms_raw, list) or not vms_raw:
        raise ScenarioError(path, doc.key_lines["vms"], "vms must be a non-empty list")
    vms: list[VmSpec] = []
    for i, raw in enumerate(vms_raw):
        vm = p.vm(raw, _item_line(vms_raw, i, doc.key_lines["vms"]))
        if any(other.id == vm.id for other in vms):
            raise ScenarioError(path, vm.line, f"vm id {vm.id!r} is declared twice")
        vms.append(vm)
    ids = [v.id for v in vms]
    steps_raw = doc["steps"]
    if not isinstance(steps_raw, list):
        raise ScenarioError(path, doc.key_lines["steps"], "steps must be a list")
    steps = [
        p.step(s, i, set(ids), _item_line(steps_raw, i, doc.key_lines["steps"]))
        for i, s in enumerate(steps_raw)
    ]
    by_id = {v.id: v for v in vms}
    for step in steps:
        target = by_id.get(step.args.get("vm", ""))
        if target is None:
            continue
        if step.kind in HYPERV_STEPS and HYPERV_DM not in target.protocols:
            raise ScenarioError(
                path,
                step.line,
                f"step {step.index + 1} ({step.kind}): vm {target.id} has no Hyper-V DM device "
                f"(protocol {target.protocol})",
            )
        if step.kind in VIRTIO_STEPS and VIRTIO_MEM not in target.protocols:
            raise ScenarioError(
                path,
                step.line,
                f"step {step.index + 1} ({step.kind}): vm {target.id} has no virtio-mem device "
                f"(protocol {target.protocol})",
            )
    return Scenario(
        path=path,
        name=str(doc.get("name", Path(path).stem)),
        description=str(doc.get("description", "")),
        seed=seed,
        profile=profile,
        vms=vms,
        steps=steps,
    )


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, line: int | None, message: str) -> ScenarioError:
        return ScenarioError(self.path, line, message)

    def keys(self, m: _Map, required: set[str], optional: set[str], what: str) -> None:
        for key in sorted(required - m.keys()):
            raise self.fail(m.line, f"{what}: missing required key {key!r}")
        unknown = sorted(m.keys() - required - optional)
        if unknown:
            allowed = ", ".join(sorted(required | optional))
            raise self.fail(
                m.key_lines[unknown[0]], f"{what}: unknown key {unknown[0]!r} (allowed: {allowed})"
            )

    def size(self, m: _Map, key: str, what: str) -> int:
        try:
            value = parse_size(m[key])
        except SizeError as err:
            raise self.fail(m.key_lines[key], f"{what}.{key}: {err}") from None
        if value % 4096:
            raise self.fail(
                m.key_lines[key], f"{what}.{key}: {value} bytes is not a multiple of 4 KiB pages"
            )
        return value

    def choice(self, m: _Map, key: str, choices: tuple[str, ...], what: str) -> str:
        value = m[key]
        if value not in choices:
            raise self.fail(
                m.key_lines[key],
                f"{what}.{key}: must be one of {', '.join(choices)}, not {value!r}",
            )
        return str(value)

    def number(
        self, m: _Map, key: str, what: str, *, integer: bool = False, minimum: float = 0
    ) -> Any:
        value = m[key]
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if not ok or isinstance(value, bool) or not math.isfinite(value) or value < minimum:
            kind = "an integer" if integer else "a number"
            raise self.fail(
                m.key_lines[key], f"{what}.{key}: must be {kind} >= {minimum}, not {value!r}"
            )
        return value

    def vm(self, raw: Any, line: int) -> VmSpec:
        if not isinstance(raw, _Map):
            raise self.fail(line, "each entry of vms must be a mapping")
        what = f"vm {raw.get('id', '?')}"
        protocol = raw.get("protocol", HYPERV_DM)
        if protocol not in PROTOCOLS:
            raise self.fail(
                raw.key_lines["protocol"],
                f"{what}.protocol: must be one of {', '.join(PROTOCOLS)}, not {protocol!r}",
            )
        virtio = VIRTIO_MEM in protocol.split("+")
        self.keys(
            raw,
            {"id", "boot_memory"}
            | ({"virtio_mem"} if virtio else set())
            | ({"max_memory"} if HYPERV_DM in protocol.split("+") else set()),
            {
                "max_memory",
                "protocol",
                "virtio_mem",
                "block_size",
                "strategy",
                "driver_mode",
                "auto_online",
                "udev_online",
                "onlining_delay",
                "onlining_jitter",
                "memmap_on_memory",
                "pressure_report_delay",
                "expect_violations",
            },
            what,
        )
        boot = self.size(raw, "boot_memory", what)
        spec = VmSpec(
            id=str(raw["id"]),
            boot_memory=boot,
            max_memory=self.size(raw, "max_memory", what) if "max_memory" in raw else boot,
            line=raw.line,
            protocol=str(protocol),
        )
        if "virtio_mem" in raw and not virtio:
            raise self.fail(
                raw.key_lines["virtio_mem"],
                f"{what}.virtio_mem: only with protocol {VIRTIO_MEM} (this vm has {protocol})",
            )
        if "block_size" in raw:
            spec.block_size = self.size(raw, "block_size", what)
            bs = spec.block_size
            if bs < 128 << 20 or bs > 2 << 30 or bs & (bs - 1):
                raise self.fail(
                    raw.key_lines["block_size"],
                    f"{what}.block_size: must be a power of two from 128M to 2G",
                )
        for key, attr, choices in (
            ("strategy", "strategy", STRATEGIES),
            ("driver_mode", "driver_mode", DRIVER_MODES),
            ("auto_online", "auto_online", ONLINE_TYPES),
        ):
            if key in raw:
                setattr(spec, attr, self.choice(raw, key, choices, what))
        if raw.get("udev_online") is not None:
            spec.udev_online = self.choice(raw, "udev_online", ONLINE_TYPES[1:], what)
        if "onlining_delay" in raw:
            spec.onlining_delay = float(self.number(raw, "onlining_delay", what))
        if "onlining_jitter" in raw:
            spec.onlining_jitter = float(self.number(raw, "onlining_jitter", what))
        if "memmap_on_memory" in raw:
            if not isinstance(raw["memmap_on_memory"], bool):
                raise self.fail(
                    raw.key_lines["memmap_on_memory"],
                    f"{what}.memmap_on_memory: must be true or false",
                )
            spec.memmap_on_memory = raw["memmap_on_memory"]
        if "pressure_report_delay" in raw:
            spec.pressure_report_delay = int(
                self.number(raw, "pressure_report_delay", what, integer=True)
            )
        if "expect_violations" in raw:
            ev = raw["expect_violations"]
            if not isinstance(ev, list) or not all(isinstance(x, str) for x in ev):
                raise self.fail(
                    raw.key_lines["expect_violations"],
                    f"{what}.expect_violations: must be a list of invariant names",
                )
            spec.expect_violations = list(ev)
        for key in ("boot_memory", "max_memory"):
            if getattr(spec, key) % spec.block_size or getattr(spec, key) == 0:
                raise self.fail(
                    raw.key_lines[key],
                    f"{what}.{key}: must be a positive multiple of block_size "
                    f"({spec.block_size >> 20}M)",
                )
        if spec.max_memory < spec.boot_memory:
            raise self.fail(
                raw.key_lines["max_memory"], f"{what}.max_memory: must be at least boot_memory"
            )
        if virtio:
            spec.virtio_mem = self.virtio_mem(raw["virtio_mem"], raw.key_lines["virtio_mem"], spec)
        return spec

    def virtio_mem(self, raw: Any, line: int, vm: VmSpec) -> VirtioMemSpec:
        """A vm's ``virtio_mem:`` mapping, checked with QEMU's rules (realize)."""
        what = f"vm {vm.id}.virtio_mem"
        if not isinstance(raw, _Map):
            raise self.fail(line, f"{what}: must be a mapping (region_size, block_size, ...)")
        self.keys(
            raw,
            {"region_size"},
            {
                "block_size",
                "requested",
                "addr",
                "node",
                "force_bbm",
                "unplug_online",
                "bbm_safe_unplug",
            },
            what,
        )
        spec = VirtioMemSpec(region_size=self.size(raw, "region_size", what), line=raw.line)
        if "block_size" in raw:
            spec.block_size = self.size(raw, "block_size", what)
        block = spec.block_size
        if block < VIRTIO_MEM_MIN_BLOCK or not is_power_of_two(block):
            raise self.fail(
                raw.key_lines.get("block_size", raw.line),
                f"{what}.block_size: must be a power of two of at least 1M",
            )
        if "requested" in raw:
            spec.requested = self.size(raw, "requested", what)
        # QEMU places the device above the VM's memory (and its hot-add window).
        align = max(1 << 30, vm.block_size, block)
        spec.addr = align_up(vm.max_memory, align)
        if "addr" in raw:
            spec.addr = self.size(raw, "addr", what)
            if spec.addr < vm.max_memory:
                raise self.fail(
                    raw.key_lines["addr"],
                    f"{what}.addr: must not overlap the vm's memory (below {vm.max_memory >> 20}M)",
                )
        for key in ("region_size", "requested", "addr"):
            value = getattr(spec, key)
            if value % block:
                raise self.fail(
                    raw.key_lines.get(key, raw.line),
                    f"{what}.{key}: must be a multiple of block_size ({block >> 20}M)",
                )
        if spec.region_size == 0:
            raise self.fail(raw.key_lines["region_size"], f"{what}.region_size: must not be 0")
        if spec.requested > spec.region_size:
            raise self.fail(
                raw.key_lines["requested"], f"{what}.requested: must not exceed region_size"
            )
        if spec.addr + spec.region_size > 1 << 46:
            raise self.fail(
                raw.key_lines["region_size"],
                f"{what}: the region ends beyond the 64 TiB of guest physical addresses",
            )
        if "node" in raw:
            spec.node = int(self.number(raw, "node", what, integer=True))
            if spec.node > 0xFFFF:
                raise self.fail(raw.key_lines["node"], f"{what}.node: must be 0..65535")
        for key in ("force_bbm", "unplug_online", "bbm_safe_unplug"):
            if key in raw:
                if not isinstance(raw[key], bool):
                    raise self.fail(raw.key_lines[key], f"{what}.{key}: must be true or false")
                setattr(spec, key, raw[key])
        return spec

    def step(self, raw: Any, index: int, vm_ids: set[str], line: int) -> Step:
        if not isinstance(raw, _Map) or len(raw) != 1:
            raise self.fail(
                getattr(raw, "line", line),
                f"step {index + 1}: must be a mapping with exactly one step kind "
                f"(one of {', '.join(STEP_KEYS)})",
            )
        kind, body = next(iter(raw.items()))
        step_line = raw.key_lines[kind]
        if kind not in STEP_KEYS:
            raise self.fail(
                step_line,
                f"step {index + 1}: unknown step kind {kind!r} (one of {', '.join(STEP_KEYS)})",
            )
        what = f"step {index + 1} ({kind})"
        if kind == "advance" and not isinstance(body, _Map):
            body_map = _Map(seconds=body)
            body_map.line = step_line
            body_map.key_lines = {"seconds": step_line}
            body = body_map
        if not isinstance(body, _Map):
            raise self.fail(step_line, f"{what}: must be a mapping of arguments")
        required, optional = STEP_KEYS[kind]
        if kind != "expect":
            self.keys(body, required, optional, what)
        elif "vm" not in body:
            raise self.fail(body.line, f"{what}: missing required key 'vm'")
        args: dict[str, Any] = dict(body)
        if "vm" in body:
            ref = body["vm"]
            # An id written as 7 is the vm declared with id: 7 (ids are strings).
            name = str(ref) if isinstance(ref, str | int) and not isinstance(ref, bool) else None
            if name is None or name not in vm_ids:
                raise self.fail(
                    body.key_lines["vm"],
                    f"{what}.vm: no vm {ref!r} (declared: {', '.join(sorted(vm_ids))})",
                )
            args["vm"] = name
        if "tag" in body and not isinstance(body["tag"], str):
            raise self.fail(body.key_lines["tag"], f"{what}.tag: must be a string")
        if kind != "expect":
            for key in SIZE_KEYS.get(kind, DEFAULT_SIZE_KEYS) & body.keys():
                args[key] = self.size(body, key, what)
        if kind == "back" and "region" in body:
            args["region"] = int(self.number(body, "region", what, integer=True, minimum=-1024))
        if kind == "advance":
            args["seconds"] = float(self.number(body, "seconds", what))
        if kind in ("online", "offline"):
            args["block"] = int(self.number(body, "block", what, integer=True))
            if "type" in body:
                args["type"] = self.choice(body, "type", ONLINE_TYPES[1:], what)
        if kind == "allocate":
            if "zone" in body:
                args["zone"] = self.choice(body, "zone", ZONES, what)
            if "order" in body:
                args["order"] = int(self.number(body, "order", what, integer=True))
                if args["order"] > 10:
                    raise self.fail(
                        body.key_lines["order"], f"{what}.order: must be 0..10 (MAX_PAGE_ORDER)"
                    )
            if "block" in body:
                args["block"] = int(self.number(body, "block", what, integer=True))
        if kind == "hot_add" and "form" in body:
            args["form"] = self.choice(body, "form", ("region", "range"), what)
        if kind == "inject":
            if "notifier" in body and "slow_onlining" in body:
                raise self.fail(
                    body.line, f"{what}: notifier and slow_onlining go in separate inject steps"
                )
            if "notifier" in body:
                args["notifier"] = self.choice(body, "notifier", NOTIFIER_ACTIONS, what)
                if "errno" not in body:
                    raise self.fail(body.line, f"{what}: notifier needs errno (e.g. -12)")
                errno = body["errno"]
                if not isinstance(errno, int) or not -4095 <= errno <= -1:
                    raise self.fail(
                        body.key_lines["errno"],
                        f"{what}.errno: must be a negative errno in [-4095, -1]",
                    )
            elif "slow_onlining" in body:
                args["slow_onlining"] = float(self.number(body, "slow_onlining", what))
            else:
                raise self.fail(body.line, f"{what}: needs notifier (with errno) or slow_onlining")
            if "count" in body:
                args["count"] = int(self.number(body, "count", what, integer=True, minimum=1))
        return Step(kind, args, step_line, index)
