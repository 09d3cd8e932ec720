"""``memhp ctl``: the operator's command line over ``Control`` and guest introspection.

    memhp ctl [--hypervisor ADDR] [--timeout S] COMMAND [--json]

    vms                                   list VMs
    show VM                               one VM: sizes, regions, transaction in flight
    target VM SIZE                        set the target size (unballoon/hot-add or balloon)
    hot-add VM REGION --backed SIZE [--offset SIZE] [--range-only] [--count N]
    back VM SIZE [--start-page N]         back more of the newest (or the given) region
    back VM --remaining                   back every page of every region not backed yet
    balloon VM SIZE / unballoon VM SIZE
    resize VM SIZE                        virtio-mem: set requested_size (QEMU's requested-size)
    policy VM manual|dynamic [--buffer PCT --minimum SIZE --maximum SIZE]
    watch [--vm ID]... [--kind K]... [--count N]   stream events (JSON lines with --json)
    blocks VM --guest ADDR                an lsmem-like table of the guest's memory blocks

Sizes take binary suffixes (128M, 4G). A gRPC error prints ``memhp ctl: STATUS:
message`` on stderr and exits 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from memhp.units import PAGE_SHIFT, SizeError, format_size, parse_size
from memhp.v1 import control_pb2, control_pb2_grpc, guest_pb2, guest_pb2_grpc

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
DEFAULT_HYPERVISOR = "127.0.0.1:50051"


# -- helpers ---------------------------------------------------------------------


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except SizeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int(value: str) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _count(value: str) -> int:
    n = _int(value)
    if not 1 <= n < 1 << 32:
        raise argparse.ArgumentTypeError(f"must be from 1 to {(1 << 32) - 1}, got {n}")
    return n


_INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
}


def to_json(msg: Message) -> dict[str, Any]:
    """A message as a dict with proto field names, every field present, integers as numbers.

    (The proto3 JSON mapping writes 64-bit integers as strings; a script wants numbers.)
    """
    if isinstance(msg, struct_pb2.Struct):
        return json_format.MessageToDict(msg)
    out: dict[str, Any] = {}
    fd: Any
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            out[fd.name] = dict(value)
        elif fd.is_repeated:
            out[fd.name] = [_value(fd, v) for v in value]
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            out[fd.name] = _value(fd, value) if msg.HasField(fd.name) else None
        elif fd.has_presence and not msg.HasField(fd.name):
            out[fd.name] = None
        else:
            out[fd.name] = _value(fd, value)
    for oneof in msg.DESCRIPTOR.oneofs:
        # Real oneofs: only the set member is meaningful.
        if oneof.name.startswith("_"):
            continue
        which = msg.WhichOneof(oneof.name)
        for fd in oneof.fields:
            if fd.name != which:
                out.pop(fd.name, None)
    return out


def _value(fd: Any, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    if fd.type in _INT_TYPES:
        return int(value)
    return value


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _table(headers: list[str], rows: Iterable[list[str]], left: int = 1) -> str:
    """Columns separated by one space; the first ``left`` left-aligned, the rest right."""
    rows = list(rows)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return " ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)]) + "\n"


def _version(v: int) -> str:
    return f"{v >> 16}.{v & 0xFFFF}" if v else "-"


def _policy_text(policy: control_pb2.Policy) -> str:
    if policy.WhichOneof("policy") == "dynamic":
        d = policy.dynamic
        return (
            f"dynamic buffer {d.buffer_percent}% "
            f"{format_size(d.minimum_bytes)}..{format_size(d.maximum_bytes)}"
        )
    return "manual"


# -- Control commands --------------------------------------------------------------


def _vm_row(vm: control_pb2.Vm) -> list[str]:
    if vm.HasField("virtio_mem"):
        v = vm.virtio_mem
        return [
            vm.spec.vm_id,
            "yes" if vm.attached else "no",
            "virtio-mem",
            format_size(vm.spec.boot_bytes + v.plugged_bytes),
            format_size(v.requested_bytes),
            format_size(vm.spec.boot_bytes + v.region_size_bytes),
            "-",
            "manual",
        ]
    return [
        vm.spec.vm_id,
        "yes" if vm.attached else "no",
        vm.dm_state,
        format_size(vm.actual_bytes),
        format_size(vm.requested_bytes) if vm.requested_bytes else "-",
        format_size(vm.spec.max_bytes),
        str(len(vm.regions)),
        "dynamic" if vm.policy.WhichOneof("policy") == "dynamic" else "manual",
    ]


def vms_text(vms: Iterable[control_pb2.Vm]) -> str:
    headers = ["VM", "ATTACHED", "STATE", "ACTUAL", "REQUESTED", "MAX", "REGIONS", "POLICY"]
    return _table(headers, [_vm_row(vm) for vm in vms])


def virtio_mem_text(vm: control_pb2.Vm) -> str:
    """``memhp ctl show`` of a virtio-mem VM: the device, as QEMU's info memory-devices."""
    s, v = vm.spec, vm.virtio_mem
    answered = ", ".join(f"{k} {n}" for k, n in sorted(v.answered.items())) or "-"
    lines = [
        f"VM {s.vm_id}: {'attached' if vm.attached else 'detached'}, protocol virtio-mem",
        f"  boot {format_size(s.boot_bytes)}, block {format_size(s.block_size_bytes)}",
        f"  virtio-mem: requested {format_size(v.requested_bytes)}, "
        f"plugged {format_size(v.plugged_bytes)}, block {format_size(v.block_size_bytes)}, "
        f"region {format_size(v.region_size_bytes)} at {v.addr:#x} "
        f"(usable {format_size(v.usable_region_size_bytes)}), node {v.node_id}",
        f"  answered: {answered}; protocol errors {v.protocol_errors}, violations {v.violations}",
    ]
    for r in v.plugged:
        start, end = r.start_page << PAGE_SHIFT, (r.start_page + r.page_cnt) << PAGE_SHIFT
        lines.append(f"    plugged [{start:#x}, {end:#x}) {format_size(end - start)}")
    return "\n".join(lines) + "\n"


def vm_text(vm: control_pb2.Vm) -> str:
    if vm.HasField("virtio_mem"):
        return virtio_mem_text(vm)
    s = vm.spec
    lines = [
        f"VM {s.vm_id}: {'attached' if vm.attached else 'detached'}, DM state {vm.dm_state}, "
        f"protocol {_version(vm.protocol_version)}"
        + (", hot-add disabled" if vm.hot_add_disabled else ""),
        f"  boot {format_size(s.boot_bytes)}, max {format_size(s.max_bytes)}, "
        f"block {format_size(s.block_size_bytes)}",
        f"  requested {format_size(vm.requested_bytes) if vm.requested_bytes else '-'}, "
        f"actual {format_size(vm.actual_bytes)}, committed {format_size(vm.committed_bytes)}, "
        f"available {format_size(vm.available_bytes)}, "
        f"ballooned {format_size(vm.ballooned_bytes)}",
        f"  policy {_policy_text(vm.policy)}",
    ]
    if vm.HasField("in_flight"):
        lines.append(f"  in flight: {vm.in_flight.description}")
    if vm.regions:
        lines.append("  regions:")
        for r in vm.regions:
            backed = sum(b.page_cnt for b in r.backed)
            ranges = ", ".join(
                f"[{b.start_page:#x}, {b.start_page + b.page_cnt:#x})" for b in r.backed
            )
            lines.append(
                f"    [{r.start_page:#x}, {r.start_page + r.page_count:#x}) "
                f"{format_size(r.page_count << PAGE_SHIFT)}: "
                f"backed {format_size(backed << PAGE_SHIFT)} {ranges or '-'}, "
                f"added {format_size(r.added_pages << PAGE_SHIFT)}"
                + (", unusable" if r.unusable else "")
            )
    return "\n".join(lines) + "\n"


def event_text(e: control_pb2.Event) -> str:
    payload = json_format.MessageToDict(e.payload)
    fields = " ".join(f"{k}={json.dumps(v)}" for k, v in payload.items())
    return f"{e.timestamp:.3f} {e.vm_id} {e.source}/{e.kind} {fields}".rstrip() + "\n"


@dataclass
class Ctl:
    channel: grpc.Channel
    timeout: float

    @property
    def control(self) -> control_pb2_grpc.ControlStub:
        return control_pb2_grpc.ControlStub(self.channel)


def _show(vm: control_pb2.Vm, as_json: bool) -> None:
    if as_json:
        _print_json(to_json(vm))
    else:
        sys.stdout.write(vm_text(vm))


def cmd_vms(ctl: Ctl, args: argparse.Namespace) -> int:
    reply = ctl.control.ListVms(control_pb2.ListVmsRequest(), timeout=ctl.timeout)
    if args.json:
        _print_json([to_json(vm) for vm in reply.vms])
    else:
        sys.stdout.write(vms_text(reply.vms))
    return EXIT_OK


def cmd_show(ctl: Ctl, args: argparse.Namespace) -> int:
    _show(
        ctl.control.GetVm(control_pb2.GetVmRequest(vm_id=args.vm), timeout=ctl.timeout), args.json
    )
    return EXIT_OK


def _command(call: Callable[[], control_pb2.Vm], args: argparse.Namespace) -> int:
    _show(call(), args.json)
    return EXIT_OK


def cmd_target(ctl: Ctl, args: argparse.Namespace) -> int:
    req = control_pb2.SetTargetRequest(vm_id=args.vm, requested_bytes=args.size)
    return _command(lambda: ctl.control.SetTarget(req, timeout=ctl.timeout), args)


def cmd_hot_add(ctl: Ctl, args: argparse.Namespace) -> int:
    req = control_pb2.HotAddCommand(
        vm_id=args.vm,
        region_bytes=args.region,
        backed_bytes=args.backed,
        offset_bytes=args.offset,
        range_only=args.range_only,
        count=args.count,
    )
    return _command(lambda: ctl.control.HotAdd(req, timeout=ctl.timeout), args)


def cmd_back(ctl: Ctl, args: argparse.Namespace) -> int:
    if args.remaining == (args.size is not None):
        sys.stderr.write("memhp ctl back: give SIZE or --remaining (one of them)\n")
        return 2
    req = control_pb2.BackCommand(vm_id=args.vm, size_bytes=args.size or 0)
    req.remaining = args.remaining
    if args.start_page is not None:
        req.start_page = args.start_page
    return _command(lambda: ctl.control.Back(req, timeout=ctl.timeout), args)


def cmd_balloon(ctl: Ctl, args: argparse.Namespace) -> int:
    req = control_pb2.BalloonCommand(vm_id=args.vm, size_bytes=args.size)
    return _command(lambda: ctl.control.Balloon(req, timeout=ctl.timeout), args)


def cmd_unballoon(ctl: Ctl, args: argparse.Namespace) -> int:
    req = control_pb2.UnballoonCommand(vm_id=args.vm, size_bytes=args.size)
    return _command(lambda: ctl.control.Unballoon(req, timeout=ctl.timeout), args)


def cmd_resize(ctl: Ctl, args: argparse.Namespace) -> int:
    req = control_pb2.ResizeRequest(vm_id=args.vm, requested_bytes=args.size)
    return _command(lambda: ctl.control.Resize(req, timeout=ctl.timeout), args)


def cmd_policy(ctl: Ctl, args: argparse.Namespace) -> int:
    if args.policy == "dynamic":
        policy = control_pb2.Policy(
            dynamic=control_pb2.DynamicPolicy(
                buffer_percent=args.buffer,
                minimum_bytes=args.minimum,
                maximum_bytes=args.maximum,
            )
        )
    else:
        policy = control_pb2.Policy(manual=control_pb2.ManualPolicy())
    req = control_pb2.SetPolicyRequest(vm_id=args.vm, policy=policy)
    return _command(lambda: ctl.control.SetPolicy(req, timeout=ctl.timeout), args)


def cmd_watch(ctl: Ctl, args: argparse.Namespace) -> int:
    req = control_pb2.WatchEventsRequest(vm_ids=args.vm or [], kinds=args.kind or [])
    stream: Any = ctl.control.WatchEvents(req)
    seen = 0
    try:
        for event in stream:
            if args.json:
                data = to_json(event)
                sys.stdout.write(json.dumps(data) + "\n")
            else:
                sys.stdout.write(event_text(event))
            sys.stdout.flush()
            seen += 1
            if args.count and seen >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        stream.cancel()
    return EXIT_OK


# -- blocks (lsmem) ----------------------------------------------------------------


@dataclass
class BlockRow:
    first: int
    last: int
    state: str
    removable: str
    zones: str


def _state(block: guest_pb2.MemoryBlock) -> str:
    return {"online": "online", "offline": "offline", "going-offline": "on->off"}.get(
        block.state, "?"
    )


def _zones(block: guest_pb2.MemoryBlock) -> str:
    zones = list(block.valid_zones) or ([block.zone] if block.zone else [])
    names = ["None" if z == "none" else z for z in zones]
    return "/".join(names)


def block_rows(blocks: Iterable[guest_pb2.MemoryBlock]) -> Iterator[BlockRow]:
    """lsmem's merge: contiguous blocks equal in every shown split column are one row."""
    row: BlockRow | None = None
    for b in sorted(blocks, key=lambda b: b.index):
        state = _state(b)
        removable = ("yes" if b.removable else "no") if state == "online" else ""
        zones = _zones(b)
        if (
            row is not None
            and row.last + 1 == b.index
            and (row.state, row.removable, row.zones) == (state, removable, zones)
        ):
            row.last = b.index
            continue
        if row is not None:
            yield row
        row = BlockRow(b.index, b.index, state, removable, zones)
    if row is not None:
        yield row


def blocks_report(memory: guest_pb2.GuestMemory) -> tuple[list[dict[str, Any]], dict[str, int]]:
    bs = memory.block_size_bytes
    rows = []
    online = offline = 0
    for r in block_rows(memory.blocks):
        size = (r.last - r.first + 1) * bs
        if r.state == "online":
            online += size
        else:
            offline += size
        rows.append(
            {
                "range": f"0x{r.first * bs:016x}-0x{(r.last + 1) * bs - 1:016x}",
                "size": size,
                "state": r.state,
                "removable": r.removable == "yes" if r.state == "online" else None,
                "block": f"{r.first}" if r.first == r.last else f"{r.first}-{r.last}",
                "zones": r.zones,
            }
        )
    return rows, {"block_size": bs, "online": online, "offline": offline}


def blocks_text(memory: guest_pb2.GuestMemory) -> str:
    rows, summary = blocks_report(memory)
    table = _table(
        ["RANGE", "SIZE", "STATE", "REMOVABLE", "BLOCK", "ZONES"],
        [
            [
                r["range"],
                format_size(r["size"]),
                r["state"],
                "" if r["removable"] is None else ("yes" if r["removable"] else "no"),
                r["block"],
                r["zones"],
            ]
            for r in rows
        ],
    )
    return (
        table
        + "\n"
        + f"{'Memory block size:':<23} {format_size(summary['block_size']):>5}\n"
        + f"{'Total online memory:':<23} {format_size(summary['online']):>5}\n"
        + f"{'Total offline memory:':<23} {format_size(summary['offline']):>5}\n"
    )


def cmd_blocks(ctl: Ctl, args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.guest) as channel:
        stub = guest_pb2_grpc.GuestIntrospectionStub(channel)
        memory = stub.GetMemory(guest_pb2.GetMemoryRequest(), timeout=ctl.timeout)
    if memory.vm_id and memory.vm_id != args.vm:
        sys.stderr.write(
            f"memhp ctl: the guest at {args.guest} is VM {memory.vm_id!r}, not {args.vm!r}\n"
        )
        return EXIT_FAILED
    if args.json:
        rows, summary = blocks_report(memory)
        _print_json({"vm_id": memory.vm_id, "memory": rows, "summary": summary})
    else:
        sys.stdout.write(blocks_text(memory))
    return EXIT_OK


# -- the parser --------------------------------------------------------------------


def add_subparser(subparsers: Any) -> None:
    ctl: argparse.ArgumentParser = subparsers.add_parser(
        "ctl",
        help="operate the hypervisor (Control) and inspect guests",
        description="Operate the hypervisor through Control and inspect guests through "
        "their introspection service. gRPC errors exit 1.",
    )
    ctl.add_argument(
        "--hypervisor",
        default=DEFAULT_HYPERVISOR,
        metavar="ADDR",
        help="the hypervisor's address (default %(default)s)",
    )
    ctl.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="deadline of each call (default %(default)s)",
    )
    ctl.set_defaults(func=main)
    sub = ctl.add_subparsers(dest="ctl_command", required=True)

    def cmd(
        name: str, fn: Callable[[Ctl, argparse.Namespace], int], help: str, vm: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        if vm:
            p.add_argument("vm", metavar="VM")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(ctl_func=fn)
        return p

    cmd("vms", cmd_vms, "list VMs", vm=False)
    cmd("show", cmd_show, "show one VM")
    p = cmd("target", cmd_target, "set the VM's target size")
    p.add_argument("size", type=_size, metavar="SIZE")
    p = cmd("hot-add", cmd_hot_add, "hot-add a region, partly backed")
    p.add_argument("region", type=_size, metavar="REGION")
    p.add_argument("--backed", type=_size, required=True, metavar="SIZE")
    p.add_argument("--offset", type=_size, default=0, metavar="SIZE")
    p.add_argument(
        "--range-only",
        action="store_true",
        help="send the 16-byte form (no region) instead of the 24-byte form",
    )
    p.add_argument(
        "--count",
        type=_count,
        default=1,
        metavar="N",
        help="N such regions, one after the other, as one command (default 1)",
    )
    p = cmd("back", cmd_back, "back more pages of a region")
    p.add_argument("size", type=_size, nargs="?", metavar="SIZE")
    p.add_argument("--start-page", type=_int, metavar="N")
    p.add_argument(
        "--remaining",
        action="store_true",
        help="back every page of every region not backed yet (one request per hole)",
    )
    p = cmd("balloon", cmd_balloon, "ask the guest to balloon SIZE")
    p.add_argument("size", type=_size, metavar="SIZE")
    p = cmd("unballoon", cmd_unballoon, "give SIZE of ballooned memory back")
    p.add_argument("size", type=_size, metavar="SIZE")
    p = cmd("resize", cmd_resize, "virtio-mem: set the device's requested size")
    p.add_argument("size", type=_size, metavar="SIZE")
    p = cmd("policy", cmd_policy, "set the VM's target policy")
    p.add_argument("policy", choices=("manual", "dynamic"))
    p.add_argument("--buffer", type=int, default=20, metavar="PERCENT")
    p.add_argument(
        "--minimum", type=_size, default=0, metavar="SIZE", help="default: one memory block"
    )
    p.add_argument(
        "--maximum", type=_size, default=0, metavar="SIZE", help="default: the VM's max memory"
    )
    p = cmd("watch", cmd_watch, "stream events", vm=False)
    p.add_argument("--vm", action="append", metavar="ID", help="only this VM (repeatable)")
    p.add_argument("--kind", action="append", metavar="K", help="only this kind (repeatable)")
    p.add_argument("--count", type=_int, default=0, metavar="N", help="stop after N events")
    p = cmd("blocks", cmd_blocks, "lsmem-like table of a guest's memory blocks")
    p.add_argument(
        "--guest", required=True, metavar="ADDR", help="the guest agent's introspection address"
    )


def main(args: argparse.Namespace) -> int:
    try:
        with grpc.insecure_channel(args.hypervisor) as channel:
            return int(args.ctl_func(Ctl(channel, args.timeout), args))
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else None
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        name = code.name if code is not None else "UNKNOWN"
        sys.stderr.write(f"memhp ctl: {name}: {details}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
