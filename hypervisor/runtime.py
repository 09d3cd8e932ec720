"""The hypervisor's VMs at run time: one host session per VM, attach and detach, events.

This is the process adapter's core, shared by the DM channel and the Control service:
it owns a :class:`DmHostSession` per VM and runs every input through it (a guest
frame, an operator command, a clock tick), then does what the session cannot: sends
its messages to the attached guest, answers a protocol error with a notice and a
reset, applies the VM's target policy to status reports, publishes events and writes
what changed to the state file. Everything runs on one asyncio loop, so a step is
never interleaved with another; nothing here knows gRPC beyond the message types.

A virtio-mem VM (``protocol: virtio-mem``) has a :class:`VirtioMemDevice` instead: its
guest attaches on the VirtioMem channel (:meth:`Hypervisor.attach_virtio`), each request
is answered at once with the device's config after it, :meth:`Hypervisor.resize` sends
the config interrupt, the device's events go to the same hub, and its snapshot goes to
the state file whenever the plugged or requested size changes. Its DM session exists
but stays idle: DM commands and DM attaches are refused. The first request on a new
stream that equals the last one the device acknowledged (kept with the snapshot), its
effect still in place, is the guest re-sending a request whose answer the old stream
lost: the ACK is replayed with the config now, nothing is applied twice and nothing new
is published.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import structlog

from hypervisor.dm_host import DmHostSession
from hypervisor.dm_work import Transaction
from hypervisor.errors import HostCommandError
from hypervisor.events import HostEvent, ProtocolViolation
from hypervisor.ground_truth import HotAddRegion
from hypervisor.policy import DynamicPolicy, ManualPolicy, TargetPolicy, policy_from_data
from hypervisor.reconcile import GuestState, ReconcileReport, reattach
from hypervisor.store import StateFileError, StateStore, TruthWriter
from hypervisor.virtio_mem_host import VirtioMemDevice
from hypervisor.vm import VmConfig
from memhp import dm, wire
from memhp import virtio_mem as vmem
from memhp.logs import get_logger, logs_at
from memhp.units import PAGE_SHIFT
from memhp.v1 import dm_pb2, virtio_mem_pb2
from memhp.virtio_mem import VirtioMemProtocolError

#: How many commands may wait behind the running one before the host says no.
MAX_QUEUED_COMMANDS: Final = 16
#: Round trips kept for the percentiles of ``Vm.transactions``.
ROUND_TRIP_WINDOW: Final = 4096
#: Events a slow watcher may fall behind before its stream is closed.
WATCH_QUEUE_SIZE: Final = 10_000
#: How long the state-file write of a step may wait while a transaction is in flight
#: (seconds): the steps of a batch in that time share one write. Once nothing is in
#: flight, or on anything unusual (a reset, a dropped command), the write happens at once.
STATE_WRITE_DELAY: Final = 0.005
#: Session events after which every region is checked for changes, not just the active ones.
_FULL_CHECK: Final = frozenset({"reset", "restored", "command_dropped", "hot_add_disabled"})
#: Events logged at debug level (they come every second from every guest, or with every
#: virtio-mem request).
_QUIET: Final = frozenset(
    {
        "status_report",
        "command_queued",
        "command_started",
        "command_done",
        "virtio_mem_request",
        "virtio_mem_response",
        "size_change",
    }
)
#: virtio-mem device events after which its snapshot is written to the state file.
_DEVICE_CHANGES: Final = frozenset({"size_change", "resize", "restored", "system_reset"})
#: The device's settings (and QEMU's property names) -> VmSpec fields.
_DEVICE_FIELDS: Final = {
    "block_size": "virtio_mem.block_size_bytes",
    "region_size": "virtio_mem.region_size_bytes",
    "requested_size": "virtio_mem.requested_bytes",
    "addr": "virtio_mem.addr",
    "node_id": "virtio_mem.node_id",
}
#: Events counted in :attr:`VmHandle.violation_events`.
_VIOLATION_EVENTS: Final = frozenset({"violation", "protocol_error"})

_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

log = get_logger("hypervisor")


class ServiceError(Exception):
    """A request the hypervisor refuses: a gRPC-style ``code``, the proto field, the rule."""

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.code = code
        self.field = field
        self.message = message


def check_vm_id(vm_id: str) -> None:
    if not _VM_ID.match(vm_id):
        raise ServiceError(
            "invalid_argument",
            "vm_id",
            f"must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, "
            f"got {vm_id!r}",
        )


#: HOST:PORT, the host a name or an address (IPv6 in brackets), as watchers dial it.
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")


def layout_pb(cfg: VmConfig) -> dm_pb2.VmLayout:
    """What the hypervisor tells a guest of its VM at attach, on either channel."""
    return dm_pb2.VmLayout(
        vm_id=cfg.vm_id,
        boot_pages=cfg.boot_pages,
        max_pages=cfg.max_pages,
        block_pages=cfg.block_pages,
    )


def check_guest_address(address: str) -> None:
    """The introspection address a guest announces: empty, or HOST:PORT."""
    if not address:
        return
    m = _ADDRESS.match(address)
    if len(address) > 255 or m is None or not 0 < int(m.group(2)) < 65536:
        raise ServiceError(
            "invalid_argument",
            "introspection_address",
            f"must be empty or HOST:PORT (at most 255 characters, port 1-65535), "
            f"got {address[:80]!r}",
        )


@dataclass(frozen=True)
class PublishedEvent:
    timestamp: float
    vm_id: str
    kind: str
    payload: dict[str, object]
    source: str = "host"


class Subscription:
    """One watcher: a bounded queue of the events it asked for."""

    def __init__(self, vm_ids: Iterable[str], kinds: Iterable[str]) -> None:
        self.vm_ids = frozenset(vm_ids)
        self.kinds = frozenset(kinds)
        self.queue: asyncio.Queue[PublishedEvent | None] = asyncio.Queue(WATCH_QUEUE_SIZE)
        self.overflowed = False
        self.closed = False

    def wants(self, event: PublishedEvent) -> bool:
        return (not self.vm_ids or event.vm_id in self.vm_ids) and (
            not self.kinds or event.kind in self.kinds
        )


#: A direct consumer of every event (the MQTT publisher): called in line, must not block.
EventSink = Callable[[PublishedEvent], None]


class EventHub:
    """Fans events out to watchers and sinks; nobody is ever waited for.

    A watcher that falls behind is cut off. A sink is called in line with every event
    and must only hand it on without blocking (the MQTT publisher queues it, bounded by
    its own queue); a sink that raises is logged and the event goes on to the others.
    """

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._sinks: list[EventSink] = []

    def add_sink(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def remove_sink(self, sink: EventSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def subscribe(self, vm_ids: Iterable[str] = (), kinds: Iterable[str] = ()) -> Subscription:
        sub = Subscription(vm_ids, kinds)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, event: PublishedEvent) -> None:
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                log.exception("event_sink_failed", vm=event.vm_id, kind=event.kind)
        if not self._subs:
            return
        for sub in list(self._subs):
            if sub.wants(event):
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.overflowed = True
                    self._subs.discard(sub)

    def close(self) -> None:
        for sub in list(self._subs):
            sub.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
        self._subs.clear()


@dataclass
class Defaults:
    """The VM made on first attach of an unknown vm_id (pages)."""

    boot_pages: int
    max_pages: int
    block_pages: int


class RoundTrips:
    """Round trips of completed host-initiated transactions: a count and the recent ones."""

    def __init__(self, window: int = ROUND_TRIP_WINDOW) -> None:
        self.completed = 0
        self.window = window
        self.recent: deque[float] = deque()
        #: ``recent`` in ascending order, kept as it changes (no sort per query).
        self._ordered: list[float] = []

    def record(self, seconds: float) -> None:
        self.completed += 1
        self.recent.append(seconds)
        bisect.insort(self._ordered, seconds)
        if len(self.recent) > self.window:
            old = self.recent.popleft()
            del self._ordered[bisect.bisect_left(self._ordered, old)]

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (nearest rank) of the recent round trips, seconds."""
        if not self._ordered:
            return 0.0
        rank = max(1, math.ceil(q / 100 * len(self._ordered)))
        return self._ordered[rank - 1]


@dataclass(eq=False)
class VmHandle:
    """One VM: its definition, host session, policy and the attached guest's outbox."""

    config: VmConfig
    session: DmHostSession
    policy: TargetPolicy
    writer: TruthWriter
    origin: float = field(default_factory=time.monotonic)
    #: Messages for the attached guest's stream (None ends it); None while detached.
    outbox: asyncio.Queue[dm_pb2.HostToGuest | None] | None = None
    #: Increases on every attach, so a stale stream cannot detach a newer one.
    epoch: int = 0
    #: The session has history (attached before, or restored from the state file).
    touched: bool = False
    seen_errors: int = 0
    #: DM frames received from and sent to the guest, over every stream.
    frames_received: int = 0
    frames_sent: int = 0
    #: "violation" and "protocol_error" events published for this VM.
    violation_events: int = 0
    #: The attached guest's introspection address, as it announced it ("" for none).
    guest_address: str = ""
    round_trips: RoundTrips = field(default_factory=lambda: RoundTrips())
    #: When the request of ``sent_txn`` (the transaction in flight) went to the stream: a
    #: batch's first request leaves after the batch is placed, later than ``started``.
    sent_txn: Transaction | None = None
    sent_at: float = 0.0
    log: structlog.stdlib.BoundLogger = field(default_factory=lambda: log)
    #: The virtio-mem device of a virtio-mem VM (None: a Hyper-V DM VM).
    device: VirtioMemDevice | None = None
    #: Messages for the attached virtio-mem stream (None ends it); None while detached.
    device_outbox: asyncio.Queue[virtio_mem_pb2.DeviceToGuest | None] | None = None
    #: The last request the device acknowledged (it changed the plugged state), kept in
    #: the device's state-file row: re-sent first on a new stream, it is replayed.
    device_last_ack: vmem.VirtioMemRequest | None = None
    #: No request has been read from the attached virtio-mem stream yet.
    device_stream_fresh: bool = False
    #: The deferred state-file write (see :data:`STATE_WRITE_DELAY`), None when none waits.
    write_timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        # Asked once: an event below the level then costs no keyword arguments.
        self.logs_debug = logs_at(self.log, logging.DEBUG)
        self.logs_info = logs_at(self.log, logging.INFO)

    @property
    def vm_id(self) -> str:
        return self.config.vm_id

    @property
    def attached(self) -> bool:
        """A guest is attached: on the DM channel, or on the virtio-mem channel."""
        return self.outbox is not None or self.device_outbox is not None

    @property
    def dm_attached(self) -> bool:
        return self.outbox is not None

    def now(self) -> float:
        """Session time: seconds since this VM's session started."""
        return time.monotonic() - self.origin

    def send(self, msg: dm_pb2.HostToGuest) -> None:
        if self.outbox is not None:
            self.outbox.put_nowait(msg)

    def send_device(self, msg: virtio_mem_pb2.DeviceToGuest) -> None:
        if self.device_outbox is not None:
            self.device_outbox.put_nowait(msg)


def config_to_pb(config: vmem.VirtioMemConfig) -> virtio_mem_pb2.VirtioMemConfig:
    return virtio_mem_pb2.VirtioMemConfig(
        block_size=config.block_size,
        node_id=config.node_id,
        addr=config.addr,
        region_size=config.region_size,
        usable_region_size=config.usable_region_size,
        plugged_size=config.plugged_size,
        requested_size=config.requested_size,
    )


#: The key of the device's state-file row holding :attr:`VmHandle.device_last_ack`.
LAST_ACK_KEY: Final = "last_ack"
#: Requests that change the plugged state (a replay is only needed for those).
_STATE_CHANGING: Final = frozenset({vmem.PLUG, vmem.UNPLUG, vmem.UNPLUG_ALL})


def device_row(handle: VmHandle) -> dict[str, object]:
    """The device's state-file row: its snapshot plus the last acknowledged request."""
    assert handle.device is not None
    row: dict[str, object] = dict(handle.device.snapshot())
    last = handle.device_last_ack
    if last is not None:
        row[LAST_ACK_KEY] = {"type": int(last.type), "addr": last.addr, "nb_blocks": last.nb_blocks}
    return row


def last_ack_from_data(data: dict[str, object]) -> vmem.VirtioMemRequest | None:
    """The last acknowledged request of a state-file row (None: none); ValueError if bad."""
    raw = data.get(LAST_ACK_KEY)
    if raw is None:
        return None
    fields = ("type", "addr", "nb_blocks")
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool) for k in fields
    ):
        raise ValueError(f"{LAST_ACK_KEY}: must be {{type, addr, nb_blocks}} integers, got {raw!r}")
    try:
        req = vmem.VirtioMemRequest(
            vmem.VirtioMemReqType(raw["type"]), raw["addr"], raw["nb_blocks"]
        )
    except (ValueError, VirtioMemProtocolError) as err:
        raise ValueError(f"{LAST_ACK_KEY}: {err}") from None
    if req.type not in _STATE_CHANGING:
        raise ValueError(f"{LAST_ACK_KEY}: {req.name} does not change the plugged state")
    return req


def _still_applied(device: VirtioMemDevice, req: vmem.VirtioMemRequest) -> bool:
    """The device's memory is as ``req`` left it (nothing, a reset say, undid it since)."""
    if req.type == vmem.UNPLUG_ALL:
        return device.plugged_size == 0
    start = req.addr >> PAGE_SHIFT
    end = (req.addr + req.nb_blocks * device.block_size) >> PAGE_SHIFT
    if req.type == vmem.PLUG:
        return device.plugged.covers(start, end)
    return device.plugged.disjoint(start, end)


def _txn_region(session: DmHostSession) -> HotAddRegion | None:
    txn = session.in_flight
    return None if txn is None else txn.target_region


class Hypervisor:
    """Every VM, keyed by vm_id; the one place their sessions are driven."""

    def __init__(
        self,
        store: StateStore,
        *,
        defaults: Defaults | None,
        post_init_delay: float = 0.0,
        max_queued: int = MAX_QUEUED_COMMANDS,
    ) -> None:
        self.store = store
        self.defaults = defaults
        self.post_init_delay = post_init_delay
        self.max_queued = max_queued
        self.vms: dict[str, VmHandle] = {}
        self.events = EventHub()
        #: Set by :meth:`shutdown`: streams end because the hypervisor stops.
        self.stopping = False

    # -- VM definitions --------------------------------------------------------

    def load(self) -> None:
        """Bring back every VM of the state file with its policy and truth."""
        for stored in self.store.load():
            policy = policy_from_data(stored.config, stored.policy)
            handle = self._handle(stored.config, policy)
            if stored.snapshot is not None:
                handle.session.restore(stored.snapshot)
                handle.session.drain_events()
                handle.touched = True
            if handle.device is not None and stored.device is not None:
                try:
                    handle.device.restore(stored.device)
                    handle.device_last_ack = last_ack_from_data(stored.device)
                except ValueError as err:
                    # As for a DM snapshot: a state file that does not fit is not guessed at.
                    raise StateFileError(
                        f"{self.store.path}: VM {stored.config.vm_id!r}: virtio-mem device: {err}"
                    ) from None
                handle.device.drain_events()
                handle.touched = True
            handle.writer.save(handle.session, check_all=True)
            self.vms[stored.config.vm_id] = handle
            handle.log.info(
                "vm_loaded",
                regions=len(handle.session.regions),
                current_pages=handle.session.current_pages,
                policy=policy.kind,
            )

    def _handle(self, config: VmConfig, policy: TargetPolicy) -> VmHandle:
        session = DmHostSession(config, post_init_delay=self.post_init_delay)
        session.drain_events()  # "attach" at creation is not news; attaching is
        device = None
        if config.virtio_mem is not None:
            try:
                device = VirtioMemDevice(config.virtio_mem.device_config(), vm_id=config.vm_id)
            except HostCommandError as err:
                raise ServiceError(
                    "invalid_argument", _DEVICE_FIELDS.get(err.field, err.field), err.message
                ) from None
            except VirtioMemProtocolError as err:
                raise ServiceError("invalid_argument", "virtio_mem", str(err)) from None
            device.drain_events()
        return VmHandle(
            config,
            session,
            policy,
            TruthWriter(self.store, config.vm_id),
            log=log.bind(vm=config.vm_id),
            device=device,
        )

    def create_vm(self, config: VmConfig, policy: TargetPolicy | None = None) -> VmHandle:
        check_vm_id(config.vm_id)
        if config.vm_id in self.vms:
            raise ServiceError("already_exists", "vm_id", f"VM {config.vm_id!r} already exists")
        policy = policy or ManualPolicy()
        handle = self._handle(config, policy)
        self.store.add_vm(config, policy.as_data())
        handle.writer.save(handle.session, check_all=True)
        if handle.device is not None:
            self.store.write_device(config.vm_id, device_row(handle))
        self.vms[config.vm_id] = handle
        self._publish(
            handle,
            "vm_created",
            {
                "boot_pages": config.boot_pages,
                "max_pages": config.max_pages,
                "block_pages": config.block_pages,
            },
        )
        return handle

    def get(self, vm_id: str) -> VmHandle:
        handle = self.vms.get(vm_id)
        if handle is None:
            raise ServiceError("not_found", "vm_id", f"no VM {vm_id!r}")
        return handle

    def attached(self, vm_id: str) -> VmHandle:
        handle = self.get(vm_id)
        if not handle.attached:
            raise ServiceError(
                "failed_precondition", "vm_id", f"VM {vm_id!r} has no attached guest"
            )
        return handle

    # -- the DM channel --------------------------------------------------------

    def attach(self, vm_id: str, state: GuestState | None, guest_address: str = "") -> VmHandle:
        """A guest opened a channel; its outbox starts with ``attached``."""
        check_vm_id(vm_id)
        check_guest_address(guest_address)
        handle = self.vms.get(vm_id)
        created = False
        if handle is None:
            if self.defaults is None:
                raise ServiceError(
                    "not_found",
                    "vm_id",
                    f"no VM {vm_id!r} is defined (and --no-default-vm is set)",
                )
            d = self.defaults
            handle = self.create_vm(VmConfig(vm_id, d.boot_pages, d.max_pages, d.block_pages))
            created = True
        if handle.config.is_virtio_mem:
            raise ServiceError(
                "failed_precondition",
                "vm_id",
                f"VM {vm_id!r} has protocol virtio-mem: it has no Hyper-V DM device "
                "(its guest opens VirtioMem.Connect)",
            )
        if handle.attached:
            raise ServiceError(
                "already_exists", "vm_id", f"VM {vm_id!r} already has an attached guest"
            )
        report = ReconcileReport()
        if handle.touched or state is not None:
            report = reattach(handle.session, state)
            handle.seen_errors = len(handle.session.protocol_errors)
        reattached = handle.touched
        handle.touched = True
        handle.epoch += 1
        handle.outbox = asyncio.Queue()
        handle.guest_address = guest_address
        cfg = handle.config
        handle.send(dm_pb2.HostToGuest(attached=dm_pb2.Attached(layout=layout_pb(cfg))))
        self._publish(
            handle,
            "attach",
            {
                "boot_pages": cfg.boot_pages,
                "max_pages": cfg.max_pages,
                "block_pages": cfg.block_pages,
                "created": created,
                "reattach": reattached,
                "guest_state": state is not None,
                "guest_address": guest_address,
                "reconcile": report.as_data(),
            },
        )
        self._finish(handle, [], None, full=True)
        return handle

    def detach(self, handle: VmHandle, epoch: int, reason: str) -> None:
        """The guest's stream ended; the session (and its truth) stays for a reattach."""
        if handle.epoch != epoch or handle.outbox is None:
            return
        handle.outbox = None
        handle.guest_address = ""
        self._publish(handle, "detach", {"reason": reason, "dm_state": handle.session.state})

    def guest_frame(self, handle: VmHandle, frame: dm_pb2.DmFrame) -> None:
        """One DM frame from the attached guest."""
        handle.frames_received += 1
        try:
            msg = wire.from_frame(frame)
        except dm.ProtocolError as err:
            violation = ProtocolViolation("malformed-frame", str(err), frame.trans_id)
            self._finish(handle, [], _txn_region(handle.session), malformed=violation)
            return
        session = handle.session
        txn = session.in_flight
        before = None if txn is None else txn.target_region
        errors = len(session.protocol_errors)
        now = handle.now()
        out = session.receive(msg, now)
        if txn is not None and session.in_flight is not txn:
            sent = handle.sent_at if handle.sent_txn is txn else txn.started
            handle.round_trips.record(now - sent)
        if out and len(session.protocol_errors) == errors:
            # The critical path: the next request goes out first; publishing, logging and
            # the state file follow on the next turn of the loop, after the stream writer
            # (woken by the send) has handed the request to gRPC.
            self._send(handle, out)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._finish(handle, [], before)
            else:
                loop.call_soon(self._finish, handle, [], before)
            return
        self._finish(handle, out, before)

    def guest_broke_rule(self, handle: VmHandle, kind: str, message: str) -> None:
        """A guest message outside the DM protocol (not a frame): notice and reset."""
        violation = ProtocolViolation(kind, message)
        self._finish(handle, [], _txn_region(handle.session), malformed=violation)

    # -- operator commands -----------------------------------------------------

    def command(
        self, vm_id: str, run: Callable[[DmHostSession, float], list[dm.DmMessage]]
    ) -> VmHandle:
        """Run an operator command on an attached VM's session.

        Raises :class:`ServiceError` (unknown VM, no guest, too much queued) or the
        session's :class:`HostCommandError`; either way nothing changed.
        """
        self._check_dm(self.get(vm_id))
        handle = self.attached(vm_id)
        queued = len(handle.session.queued)
        if queued >= self.max_queued:
            raise ServiceError(
                "resource_exhausted",
                "vm_id",
                f"{queued} commands already wait for VM {vm_id!r} (at most {self.max_queued})",
            )
        before = _txn_region(handle.session)
        out = run(handle.session, handle.now())
        self._finish(handle, out, before)
        return handle

    def _check_dm(self, handle: VmHandle) -> None:
        if handle.config.is_virtio_mem:
            raise ServiceError(
                "failed_precondition",
                "vm_id",
                f"VM {handle.vm_id!r} has protocol virtio-mem: Hyper-V DM commands do not "
                "apply (resize its virtio-mem device)",
            )

    def set_policy(self, vm_id: str, policy: TargetPolicy) -> VmHandle:
        handle = self.get(vm_id)
        if isinstance(policy, DynamicPolicy):
            self._check_dm(handle)
        handle.policy = policy
        self.store.set_policy(vm_id, policy.as_data())
        self._publish(handle, "policy", policy.as_data())
        committed = handle.session.committed_pages
        if handle.attached and committed is not None:
            before = _txn_region(handle.session)
            out = self._apply_policy(handle, committed)
            self._finish(handle, out, before)
        return handle

    # -- time ------------------------------------------------------------------

    def tick_all(self) -> None:
        for handle in list(self.vms.values()):
            if not handle.dm_attached:
                continue
            session = handle.session
            before = _txn_region(session)
            out = session.tick(handle.now())
            if out or session.events:
                self._finish(handle, out, before)

    def next_wakeup(self) -> float | None:
        """Seconds until the earliest session deadline of an attached VM, or None."""
        waits = [
            deadline - h.now()
            for h in self.vms.values()
            if h.dm_attached and (deadline := h.session.next_deadline()) is not None
        ]
        return max(min(waits), 0.0) if waits else None

    def shutdown(self) -> None:
        """End every guest stream and watcher (the server stops after this)."""
        self.stopping = True
        self.write_state()
        for handle in self.vms.values():
            if handle.outbox is not None:
                handle.outbox.put_nowait(None)
            if handle.device_outbox is not None:
                handle.device_outbox.put_nowait(None)
        self.events.close()

    # -- the virtio-mem channel ------------------------------------------------

    def attach_virtio(self, vm_id: str, guest_address: str = "") -> VmHandle:
        """A guest opened its virtio-mem device's stream; its outbox starts with ``attached``."""
        check_vm_id(vm_id)
        check_guest_address(guest_address)
        handle = self.get(vm_id)
        device = handle.device
        if device is None:
            raise ServiceError(
                "failed_precondition",
                "vm_id",
                f"VM {vm_id!r} has no virtio-mem device (protocol {handle.config.protocol})",
            )
        if handle.attached:
            raise ServiceError(
                "already_exists", "vm_id", f"VM {vm_id!r} already has an attached guest"
            )
        reattached = handle.touched
        handle.touched = True
        handle.epoch += 1
        handle.device_outbox = asyncio.Queue()
        handle.device_stream_fresh = True
        handle.guest_address = guest_address
        cfg = handle.config
        handle.send_device(
            virtio_mem_pb2.DeviceToGuest(
                attached=virtio_mem_pb2.VirtioMemAttached(
                    layout=layout_pb(cfg), config=config_to_pb(device.config)
                )
            )
        )
        self._publish(
            handle,
            "attach",
            {
                "boot_pages": cfg.boot_pages,
                "max_pages": cfg.max_pages,
                "block_pages": cfg.block_pages,
                "created": False,
                "reattach": reattached,
                "guest_state": False,
                "guest_address": guest_address,
                "reconcile": {},
            },
        )
        return handle

    def detach_virtio(self, handle: VmHandle, epoch: int, reason: str) -> None:
        """The virtio-mem stream ended; the device (and what is plugged) stays."""
        if handle.epoch != epoch or handle.device_outbox is None:
            return
        handle.device_outbox = None
        handle.guest_address = ""
        self._publish(handle, "detach", {"reason": reason, "dm_state": ""})

    def virtio_request(self, handle: VmHandle, req: virtio_mem_pb2.VirtioMemRequest) -> None:
        """One request on the device's queue: answered at once, with the config after it."""
        device = handle.device
        assert device is not None
        handle.frames_received += 1
        first_on_stream, handle.device_stream_fresh = handle.device_stream_fresh, False
        request: vmem.VirtioMemRequest | None = None
        if req.type not in tuple(vmem.VirtioMemReqType):
            kind, message = (
                "virtio-mem-unknown-request",
                f"virtio_mem_req.type: unknown request type {req.type}",
            )
        else:
            try:
                request = vmem.VirtioMemRequest(
                    vmem.VirtioMemReqType(req.type), req.addr, req.nb_blocks
                )
            except vmem.VirtioMemProtocolError as err:
                kind, message = "virtio-mem-malformed", str(err)
        if request is None:
            # No struct virtio_mem_req can hold it: QEMU would mark the device broken;
            # the emulator answers ERROR, records why, and carries on.
            violation = ProtocolViolation(kind, message)
            device.protocol_errors.append(violation)
            handle.device_last_ack = None
            response = vmem.VirtioMemResponse(vmem.ERROR)
            self._answer(handle, response)
            self.publish_device_events(
                handle,
                [HostEvent("protocol_error", {**violation.as_data(), "action": "answered"})],
            )
            return
        if (
            first_on_stream
            and request == handle.device_last_ack
            and _still_applied(device, request)
        ):
            # The guest re-sends the request in flight when the stream broke: this one
            # was applied and acknowledged, only the answer was lost. As a virtqueue
            # would, the device answers it once: the ACK again, with the config now.
            handle.log.info(
                "virtio_mem_replayed",
                request=request.name,
                addr=request.addr,
                nb_blocks=request.nb_blocks,
            )
            self._answer(handle, vmem.VirtioMemResponse(vmem.ACK))
            return
        response = device.request(request, handle.now())
        changed = request.type in _STATE_CHANGING and response.type == vmem.ACK
        handle.device_last_ack = request if changed else None
        self._answer(handle, response)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._publish_device_changes(handle)
        else:
            # The answer goes out first; publishing and the state file follow. The events
            # are drained then, not now, so a command run in between (a Resize) cannot
            # publish its own before these.
            loop.call_soon(self._publish_device_changes, handle)

    def _publish_device_changes(self, handle: VmHandle) -> None:
        if handle.device is not None:
            self.publish_device_events(handle, handle.device.drain_events())

    def _answer(self, handle: VmHandle, response: vmem.VirtioMemResponse) -> None:
        assert handle.device is not None
        handle.frames_sent += 1
        handle.send_device(
            virtio_mem_pb2.DeviceToGuest(
                response=virtio_mem_pb2.VirtioMemResponse(
                    type=int(response.type),
                    state=int(response.state),
                    config=config_to_pb(handle.device.config),
                )
            )
        )

    def virtio_access(self, handle: VmHandle, report: dm_pb2.AccessReport) -> None:
        """The guest's access report: a touch of unplugged device memory is a violation."""
        device = handle.device
        assert device is not None
        handle.frames_received += 1
        ranges = [(r.start_page, r.start_page + r.page_cnt) for r in report.ranges]
        device.check_access(ranges, report.what or "allocate")
        self.publish_device_events(handle, device.drain_events())

    def resize(self, vm_id: str, requested_bytes: int) -> VmHandle:
        """QEMU's ``requested-size``: the config interrupt goes to the attached guest.

        Raises ServiceError (unknown VM, a Hyper-V DM VM) or the device's
        HostCommandError (field ``requested_size``); either way nothing changed.
        """
        handle = self.get(vm_id)
        device = handle.device
        if device is None:
            raise ServiceError(
                "failed_precondition",
                "vm_id",
                f"VM {vm_id!r} has no virtio-mem device (protocol {handle.config.protocol})",
            )
        change = device.resize(requested_bytes, handle.now())
        if handle.device_outbox is not None:
            handle.frames_sent += 1
        handle.send_device(
            virtio_mem_pb2.DeviceToGuest(
                config_changed=virtio_mem_pb2.VirtioMemConfigChanged(
                    config=config_to_pb(change.config)
                )
            )
        )
        self.publish_device_events(handle, device.drain_events())
        return handle

    def publish_device_events(self, handle: VmHandle, events: list[HostEvent]) -> None:
        for event in events:
            if event.kind == "protocol_error":
                event.data.setdefault("action", "answered")
        self._publish_all(handle, events)
        if handle.device is not None and any(e.kind in _DEVICE_CHANGES for e in events):
            self.store.write_device(handle.vm_id, device_row(handle))

    # -- after every step --------------------------------------------------------

    def _finish(
        self,
        handle: VmHandle,
        out: list[dm.DmMessage],
        before: HotAddRegion | None,
        *,
        malformed: ProtocolViolation | None = None,
        full: bool = False,
    ) -> None:
        """Send, enforce the protocol, publish, apply the policy, persist."""
        session = handle.session
        events: list[HostEvent] = []
        violation = malformed
        if malformed is not None:
            events.append(
                HostEvent(
                    "protocol_error",
                    {"vm_id": handle.vm_id, "state": session.state, **malformed.as_data()},
                )
            )
        errors = session.protocol_errors[handle.seen_errors :]
        if violation is None and errors:
            violation = errors[0]
        events += session.drain_events()
        if violation is not None:
            # The guest broke the protocol: whatever the session answered is void; the
            # guest renegotiates on the same stream after the notice.
            handle.send(
                dm_pb2.HostToGuest(
                    error=dm_pb2.ProtocolErrorNotice(
                        kind=violation.kind, message=violation.message, action="reset"
                    )
                )
            )
            handle.log.warning(
                "protocol_error",
                kind=violation.kind,
                message=violation.message,
                trans_id=violation.trans_id,
                action="reset",
            )
            session.reset()
            handle.seen_errors = len(session.protocol_errors)
            events += session.drain_events()
            out = []
            for e in events:
                if e.kind == "protocol_error":
                    e.data["action"] = "reset"
        self._publish_all(handle, events)
        self._send(handle, out)
        status = [e for e in events if e.kind == "status_report"]
        full = full or violation is not None or any(e.kind in _FULL_CHECK for e in events)
        if status and violation is None and handle.attached:
            committed = status[-1].data.get("committed_pages")
            if isinstance(committed, int):
                more = self._apply_policy(handle, committed)
                policy_events = session.drain_events()
                self._publish_all(handle, policy_events)
                self._send(handle, more)
                full = full or any(e.kind in _FULL_CHECK for e in policy_events)
        self._persist(handle, full, before)

    def _persist(self, handle: VmHandle, full: bool, before: HotAddRegion | None) -> None:
        """Write the step's changes to the state file, now or within STATE_WRITE_DELAY.

        A step with a transaction in flight (a batch runs) may wait, so that the steps of
        a few milliseconds share one write; a step that leaves the session idle writes
        at once, with whatever waited, so the file holds everything once a command is done.
        """
        if full or self.stopping or handle.session.in_flight is None:
            self._write(handle, full, before)
            return
        if handle.write_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write(handle, full, before)
                return
            handle.write_timer = loop.call_later(STATE_WRITE_DELAY, self._write_deferred, handle)
        handle.writer.note(also=(before,))

    def _write_deferred(self, handle: VmHandle) -> None:
        """The timer's write: a failure is logged (the next write retries what it had)."""
        try:
            self._write(handle)
        except Exception:
            handle.log.exception("state_write_failed")

    def _write(
        self, handle: VmHandle, full: bool = False, before: HotAddRegion | None = None
    ) -> None:
        if handle.write_timer is not None:
            handle.write_timer.cancel()
            handle.write_timer = None
        handle.writer.save(handle.session, check_all=full, also=(before,))

    def write_state(self) -> None:
        """Write every deferred state-file write now (the hypervisor is stopping)."""
        for handle in self.vms.values():
            if handle.write_timer is not None or handle.writer.pending:
                self._write(handle)

    def _apply_policy(self, handle: VmHandle, committed: int) -> list[dm.DmMessage]:
        policy = handle.policy
        if not isinstance(policy, DynamicPolicy):
            return []
        session = handle.session
        current = session.target_pages
        if current is None:
            current = session.current_pages
        target = policy.decide(committed, current, handle.config.block_pages)
        if target is None:
            return []
        self._publish(
            handle,
            "policy_decision",
            {
                "policy": policy.kind,
                "committed_pages": committed,
                "buffer_percent": policy.buffer_percent,
                "minimum_pages": policy.minimum_pages,
                "maximum_pages": policy.maximum_pages,
                "previous_target_pages": current,
                "target_pages": target,
            },
        )
        try:
            return session.set_target(target, handle.now())
        except HostCommandError as err:
            handle.log.warning("policy_target_refused", target_pages=target, error=str(err))
            return []

    def _send(self, handle: VmHandle, out: list[dm.DmMessage]) -> None:
        txn = handle.session.in_flight
        if out and txn is not None and handle.sent_txn is not txn:
            handle.sent_txn = txn
            handle.sent_at = handle.now()
        attached = handle.attached
        for msg in out:
            if handle.logs_debug:
                handle.log.debug("frame_out", kind=type(msg).__name__, trans_id=msg.trans_id)
            if attached:
                handle.frames_sent += 1
            pb = dm_pb2.HostToGuest()
            wire.write_frame(msg, pb.frame)
            handle.send(pb)

    def _publish_all(self, handle: VmHandle, events: list[HostEvent]) -> None:
        for event in events:
            payload = dict(event.data)
            payload.pop("vm_id", None)
            self._publish(handle, event.kind, payload)

    def _publish(self, handle: VmHandle, kind: str, payload: dict[str, object]) -> None:
        if kind in _QUIET:
            if handle.logs_debug:
                handle.log.debug(kind, **{k: v for k, v in payload.items() if v is not None})
        elif handle.logs_info:
            handle.log.info(kind, **{k: v for k, v in payload.items() if v is not None})
        if kind in _VIOLATION_EVENTS:
            handle.violation_events += 1
        self.events.publish(PublishedEvent(time.time(), handle.vm_id, kind, payload))
