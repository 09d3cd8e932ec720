"""The Hyper-V Dynamic Memory host (VSP) for one VM, as a sans-I/O state machine.

Modelled on QEMU ``hw/hyperv/hv-balloon.c`` (hyperv-dm.md §3): version and
capabilities negotiation, a post-init wait, then one host-initiated transaction at a
time (balloon, unballoon, hot-add) driven by operator commands. It adds what QEMU
never sends: hot-add regions with partial backing (24-byte form: range = backed
pages, region = whole region) and later backing in the 16-byte form.

Nothing here does I/O or reads a clock: guest messages and ticks come in with
``now`` (seconds), host messages go out as return values, and every state change is
appended to :attr:`DmHostSession.events`. A guest that breaks the protocol never
makes :meth:`~DmHostSession.receive` raise: the violation is recorded in
:attr:`~DmHostSession.protocol_errors` and the session carries on; the process
adapter decides whether to :meth:`~DmHostSession.reset`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

from extents import RangeSet
from hypervisor.dm_commands import (
    check_above_floor,
    check_back,
    check_back_remaining,
    check_balloon,
    check_new_region,
    check_pages,
    check_unballoon,
)
from hypervisor.dm_states import ACCEPTS, OUT_OF_STATE, REPLY_WAIT, State
from hypervisor.dm_work import Command, Offer, Transaction
from hypervisor.events import HostEvent, ProtocolViolation, ViolationKind
from hypervisor.ground_truth import BalloonPiece, GroundTruth, HotAddRegion
from hypervisor.vm import MAX_GUEST_PAGES, VmConfig
from memhp.dm import (
    DYNMEM_PROTOCOL_VERSION_1,
    DYNMEM_PROTOCOL_VERSION_3,
    HOT_ADD_CHUNK_MAX_PAGES,
    HV_BALLOON_HR_CHUNK_PAGES,
    MAX_PAGE_CNT,
    MAX_RANGES_PER_MESSAGE,
    UNBALLOON_RANGE_MAX_PAGES,
    AccessReport,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesReport,
    CapabilitiesResponse,
    DmMessage,
    HotAddRequest,
    HotAddResponse,
    PageRange,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionRequest,
    VersionResponse,
)
from memhp.units import align_down

#: Pages in 1 MiB: ``hot_add_alignment`` n means 2^n MiB.
PAGES_PER_MIB = 256
#: The largest alignment a guest can ask for: 2^15 MiB = 32 GiB.
MAX_HOT_ADD_ALIGNMENT = 15
#: QEMU's post-init wait (Windows Server 2019 crashes on early DM requests).
QEMU_POST_INIT_DELAY = 50.0


_BALLOON_PIECE_KIND: Final = {
    BalloonPiece.DUPLICATE: (ViolationKind.BALLOON_DUPLICATE, "already ballooned"),
    BalloonPiece.UNBACKED: (ViolationKind.BALLOON_UNBACKED, "in an unbacked hot-add area"),
    BalloonPiece.OUTSIDE_RAM: (ViolationKind.BALLOON_OUTSIDE_RAM, "outside guest RAM"),
}


def _range_data(start: int, count: int) -> list[int]:
    return [start, count]


class DmHostSession:
    """The DM host side of one VM's channel: negotiation, transactions, ground truth."""

    def __init__(self, config: VmConfig, *, post_init_delay: float = 0.0) -> None:
        if post_init_delay < 0:
            raise ValueError(f"post_init_delay must be >= 0 seconds, got {post_init_delay}")
        self.config = config
        self.post_init_delay = post_init_delay
        self.events: list[HostEvent] = []
        self.protocol_errors: list[ProtocolViolation] = []
        #: Ground-truth violations (the guest touched memory the host does not back).
        self.violations: list[ProtocolViolation] = []
        self._truth = GroundTruth(config)
        self._queue: deque[Command] = deque()
        self._command: Command | None = None
        self._target: int | None = None
        self._init_channel()
        self._emit(
            "attach",
            boot_pages=config.boot_pages,
            max_pages=config.max_pages,
            block_pages=config.block_pages,
        )

    def _init_channel(self) -> None:
        """What a fresh channel (or a VMBus reset) starts from."""
        self._state = State.VERSION
        self._trans_id = 0
        self._txn: Transaction | None = None
        self._version: int | None = None
        self._lowest_rejected: int | None = None
        self._last_attempt_rejected = False
        self._caps: CapabilitiesReport | None = None
        self._hot_add_alignment = 0
        self._post_init_until: float | None = None
        self._hot_add_disabled = False
        self._committed: int | None = None
        self._available: int | None = None
        self._status_time: float | None = None

    # -- operator view ---------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def trans_id(self) -> int:
        return self._trans_id

    @property
    def version(self) -> int | None:
        """The accepted protocol version, or None before negotiation."""
        return self._version

    @property
    def caps(self) -> CapabilitiesReport | None:
        return self._caps

    @property
    def target_pages(self) -> int | None:
        """The last ``set_target``, or None if the operator never set one."""
        return self._target

    @property
    def current_pages(self) -> int:
        return self._truth.current_pages

    @property
    def committed_pages(self) -> int | None:
        return self._committed

    @property
    def available_pages(self) -> int | None:
        return self._available

    @property
    def last_status_time(self) -> float | None:
        return self._status_time

    @property
    def in_flight(self) -> Transaction | None:
        return self._txn

    @property
    def busy(self) -> bool:
        """A transaction is in flight or a command waits (what a scenario step waits for)."""
        return self._txn is not None or self._command is not None or bool(self._queue)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has timed work to do (the post-init wait), or None."""
        return self._post_init_until

    @property
    def queued(self) -> tuple[str, ...]:
        """The commands waiting behind the running one, oldest first."""
        return tuple(c.describe() for c in self._queue)

    @property
    def hot_add_disabled(self) -> bool:
        return self._hot_add_disabled

    @property
    def regions(self) -> tuple[HotAddRegion, ...]:
        return tuple(self._truth.regions)

    @property
    def hot_add_backed_pages(self) -> int:
        return self._truth.hot_add_backed_pages

    @property
    def region_count(self) -> int:
        return len(self._truth.regions)

    def regions_from(self, index: int) -> list[HotAddRegion]:
        """The regions from ``index`` on, in placement order (no copy of the older ones)."""
        return self._truth.regions[index:]

    @property
    def backed(self) -> RangeSet:
        """The PFNs the host backs (read it, do not change it)."""
        return self._truth.backed

    @property
    def ballooned(self) -> RangeSet:
        """The PFNs the guest ballooned and the host discarded."""
        return self._truth.ballooned

    @property
    def guest_ram(self) -> RangeSet:
        """Boot memory plus the pages the guest reported hot-added."""
        return self._truth.ram

    @property
    def hot_add_alignment_pages(self) -> int:
        """Where and in what steps regions go: max(block size, 2^hot_add_alignment MiB)."""
        if self._caps is None:
            return self.config.block_pages
        return max(self.config.block_pages, PAGES_PER_MIB << self._hot_add_alignment)

    def drain_events(self) -> list[HostEvent]:
        events, self.events = self.events, []
        return events

    # -- guest messages --------------------------------------------------------

    def receive(self, msg: DmMessage, now: float) -> list[DmMessage]:
        """Handle one guest message; return the host messages to send, in order."""
        out = self._advance(now)
        if isinstance(msg, AccessReport):
            self._on_access(msg)
        elif type(msg) in ACCEPTS[self._state]:
            out += _HANDLERS[type(msg)](self, msg, now)
        else:
            kind = OUT_OF_STATE.get(type(msg), ViolationKind.UNEXPECTED_MESSAGE_TYPE)
            self._protocol_error(
                kind, f"{type(msg).__name__} in state {self._state.value}", msg.trans_id
            )
        out += self._advance(now)
        return out

    def tick(self, now: float) -> list[DmMessage]:
        """Fire timers (the post-init wait) and start the next transaction when idle."""
        return self._advance(now)

    def reset(self) -> None:
        """VMBus reset (QEMU): forget balloon tracking, ``trans_id = 0``, renegotiate.

        Hot-added memory and its backing stay ("Windows keeps on using [it] until the
        system is restarted"); ballooned pages become backed again because the
        restarted guest owns them. The transaction in flight is abandoned (no answer
        will come); queued commands survive and run after the next negotiation.
        """
        txn = self._txn
        if txn is not None and txn.target_region is not None:
            # Whether the guest added anything before the reset is unknown: never
            # offer this region again.
            txn.target_region.unusable = True
        if self._command is not None:
            cmd = self._command
            self._emit("command_dropped", command=cmd.describe(), reason="reset")
            self._command = None
            if cmd.later:
                # The rest of a batch was never sent: it waits for the renegotiation.
                rest = Command(cmd.name, later=cmd.later)
                self._queue.appendleft(rest)
                self._emit("command_queued", command=rest.describe())
        self._truth.forget_ballooned()
        for region in self._truth.regions:
            # The restarted driver has an empty ha_region_list.
            region.guest_known = False
        self._init_channel()
        self._emit("reset")

    # -- snapshot --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-friendly state that outlives the channel and the process.

        The ground truth (regions with their backed and added ranges, ballooned ranges),
        the target and whether the guest disabled hot-add. The channel (negotiation,
        trans_id, the transaction in flight) and queued commands are not part of it.
        """
        return {
            "target_pages": self._target,
            "hot_add_disabled": self._hot_add_disabled,
            **self._truth.snapshot(),
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Start a fresh channel (VERSION, trans_id 0) over the state of a :meth:`snapshot`.

        Work in flight and queued is dropped (its regions belong to the old truth). A
        snapshot that does not fit this VM raises ValueError and changes nothing.
        """
        truth = GroundTruth.from_snapshot(self.config, data)
        target = data.get("target_pages")
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, int):
                raise ValueError(f"target_pages: must be an integer or null, got {target!r}")
            if not 0 <= target <= self.config.max_pages:
                raise ValueError(f"target_pages: {target} outside 0..{self.config.max_pages}")
        for cmd in ([self._command] if self._command is not None else []) + list(self._queue):
            self._emit("command_dropped", command=cmd.describe(), reason="restore")
        self._command = None
        self._queue.clear()
        self._truth = truth
        self._target = target
        self._init_channel()
        self._hot_add_disabled = bool(data.get("hot_add_disabled", False))
        self._emit(
            "restored",
            regions=len(truth.regions),
            current_pages=truth.current_pages,
            ballooned_pages=len(truth.ballooned),
        )

    @classmethod
    def from_snapshot(
        cls, config: VmConfig, data: Mapping[str, Any], *, post_init_delay: float = 0.0
    ) -> DmHostSession:
        session = cls(config, post_init_delay=post_init_delay)
        session.restore(data)
        return session

    # -- operator commands -----------------------------------------------------

    def set_target(self, pages: int, now: float) -> list[DmMessage]:
        """Aim the guest at ``pages``: unballoon then hot-add, or balloon (QEMU §3.2)."""
        check_pages("pages", pages, 0, self.config.max_pages)
        if pages < self.current_pages:
            check_above_floor("pages", self.current_pages, pages)
        # QEMU keeps one target: a newer one replaces any older one not yet done.
        for old in [c for c in self._queue if c.name == "set_target"]:
            self._queue.remove(old)
            self._emit("command_dropped", command=old.describe(), reason="superseded")
        if self._command is not None and self._command.name == "set_target":
            self._command.superseded = True
        self._target = pages
        self._emit("target", target_pages=pages, current_pages=self.current_pages)
        return self._enqueue(Command("set_target", target=pages, planned=False), now)

    def hot_add(
        self,
        region_pages: int,
        backed_pages: int,
        now: float,
        *,
        offset_pages: int = 0,
        with_region: bool = True,
        count: int = 1,
    ) -> list[DmMessage]:
        """Hand the guest a new region of which only ``backed_pages`` are backed yet.

        The backed pages start ``offset_pages`` into the region. ``with_region=False``
        sends the 16-byte form (range only), so the guest has to derive the region
        itself: the request shape behind suspected bug E1 when the start is unaligned.
        ``count`` regions go one after the other as one command (a batch), each its own
        transaction; all must fit or none is placed.
        """
        align = self.hot_add_alignment_pages
        start = check_new_region(
            self._truth,
            align,
            self._caps,
            self._hot_add_disabled,
            region_pages,
            backed_pages,
            count,
        )
        check_pages("offset_pages", offset_pages, 0, region_pages - backed_pages)
        offers: deque[Offer] = deque()
        for _ in range(count):
            region = self._truth.place_region(start, region_pages)
            first = start + offset_pages
            region.pending.add(first, first + backed_pages)
            offers.append(Offer(region, first, backed_pages, with_region=with_region))
            start = self._truth.next_region_start(align)
        offer = offers.popleft()
        return self._enqueue(Command("hot_add", offer=offer, later=offers), now)

    def back(self, pages: int, now: float, start_page: int | None = None) -> list[DmMessage]:
        """Back more pages of the newest region (or of the region holding ``start_page``).

        Without ``start_page`` the pages follow the highest backed page of the region;
        with it they may leave a gap or fill an earlier one. Both go out in the 16-byte
        form so a Linux guest finds its existing ``hv_hotadd_state``.
        """
        region, start = check_back(
            self._truth, self._caps, self._hot_add_disabled, pages, start_page
        )
        region.pending.add(start, start + pages)
        offer = Offer(region, start, pages, with_region=False)
        return self._enqueue(Command("back", offer=offer), now)

    def back_remaining(self, now: float) -> list[DmMessage]:
        """Back every page of every region not backed yet, one 16-byte request per hole.

        Holes below what a region already has backed are gaps (the guest must handle
        backing into them: upstream Linux does not, suspected bug E2).
        """
        offers = deque(
            Offer(region, s, e - s, with_region=False)
            for region, s, e in check_back_remaining(
                self._truth, self._caps, self._hot_add_disabled, MAX_PAGE_CNT
            )
        )
        for offer in offers:
            offer.region.pending.add(offer.start, offer.start + offer.pages)
        first = offers.popleft()
        return self._enqueue(Command("back", offer=first, later=offers), now)

    def balloon(self, pages: int, now: float) -> list[DmMessage]:
        """Ask the guest for ``pages`` pages, in requests of at most 585,728 (QEMU)."""
        check_balloon(self._caps, self.current_pages, pages)
        return self._enqueue(Command("balloon", balloon_diff=pages), now)

    def unballoon(self, pages: int, now: float) -> list[DmMessage]:
        """Give ``pages`` ballooned pages back, highest range first (QEMU)."""
        queued = sum(c.unballoon_diff for c in self._queue if c.name == "unballoon")
        check_unballoon(len(self._truth.ballooned) - queued, pages)
        return self._enqueue(Command("unballoon", unballoon_diff=pages), now)

    def _enqueue(self, command: Command, now: float) -> list[DmMessage]:
        self._queue.append(command)
        self._emit("command_queued", command=command.describe())
        return self._advance(now)

    # -- running work ----------------------------------------------------------

    def _advance(self, now: float) -> list[DmMessage]:
        out: list[DmMessage] = []
        if (
            self._state is State.POST_INIT_WAIT
            and self._post_init_until is not None
            and now >= self._post_init_until
        ):
            self._state = State.IDLE
            self._post_init_until = None
            self._emit("ready")
        while self._state is State.IDLE:
            if self._command is None:
                if not self._queue:
                    break
                self._command = self._queue.popleft()
                self._emit("command_started", command=self._command.describe())
            msgs = self._step(self._command, now)
            if msgs:
                out += msgs
                break
            self._emit("command_done", command=self._command.describe())
            self._command = None
        return out

    def _step(self, cmd: Command, now: float) -> list[DmMessage]:
        """Start the command's next transaction; [] when it has nothing left to do."""
        if cmd.superseded:
            return []
        if not cmd.planned:
            self._plan_target(cmd)
        while cmd.offer is not None or cmd.later:
            offer = cmd.offer if cmd.offer is not None else cmd.later.popleft()
            cmd.offer = None
            msgs = self._send_offer(cmd, offer, now)
            if msgs:
                return msgs
        if cmd.unballoon_diff > 0:
            pages = min(cmd.unballoon_diff, len(self._truth.ballooned))
            cmd.unballoon_diff = 0
            if pages:
                return self._send_unballoon(cmd, pages, now)
            self._emit("command_dropped", command=cmd.describe(), reason="nothing ballooned")
        if cmd.hot_add_diff > 0:
            msgs = self._send_target_hot_add(cmd, now)
            if msgs:
                return msgs
        if cmd.balloon_diff > 0:
            assert self._caps is not None  # IDLE comes after caps
            if self._caps.balloon:
                pages = min(cmd.balloon_diff, HV_BALLOON_HR_CHUNK_PAGES)
                return self._send_balloon(cmd, pages, now)
            cmd.balloon_diff = 0
            self._emit("command_dropped", command=cmd.describe(), reason="no balloon capability")
        return []

    def _plan_target(self, cmd: Command) -> None:
        """QEMU's split (hyperv-dm.md §3.2), computed when the command starts."""
        assert cmd.target is not None and self._caps is not None
        ram = len(self._truth.ram)
        removed = min(len(self._truth.ballooned), ram)
        current = ram - removed
        if cmd.target > current:
            diff = cmd.target - current
            cmd.unballoon_diff = min(diff, removed)
            if self._caps.hot_add and not self._hot_add_disabled:
                cmd.hot_add_diff = diff - cmd.unballoon_diff
        elif cmd.target < current and self._caps.balloon:
            cmd.balloon_diff = current - cmd.target
        cmd.planned = True
        self._emit(
            "target_plan",
            target_pages=cmd.target,
            current_pages=current,
            unballoon_pages=cmd.unballoon_diff,
            hot_add_pages=cmd.hot_add_diff,
            balloon_pages=cmd.balloon_diff,
        )

    def _start(self, txn: Transaction) -> None:
        self._txn = txn
        self._state = REPLY_WAIT[txn.kind]

    def _complete(self) -> None:
        """The transaction in flight is over (QEMU: ``trans_id++``, back to idle)."""
        self._txn = None
        self._trans_id += 1
        self._state = State.IDLE

    def _send_balloon(self, cmd: Command, pages: int, now: float) -> list[DmMessage]:
        self._start(Transaction("balloon", self._trans_id, pages, now, cmd))
        self._emit("balloon_request", trans_id=self._trans_id, num_pages=pages)
        return [BalloonRequest(trans_id=self._trans_id, num_pages=pages)]

    def _send_unballoon(self, cmd: Command, pages: int, now: float) -> list[DmMessage]:
        pieces = self._truth.top_ballooned(pages, UNBALLOON_RANGE_MAX_PAGES)
        msgs: list[DmMessage] = []
        for i, (start, end) in enumerate(pieces):
            # The host backs the pages again before it tells the guest they are usable.
            self._truth.unballoon(start, end)
            msgs.append(
                UnballoonRequest(
                    trans_id=self._trans_id,
                    more_pages=i < len(pieces) - 1,
                    ranges=(PageRange(start, end - start),),
                )
            )
        self._start(Transaction("unballoon", self._trans_id, pages, now, cmd))
        self._emit(
            "unballoon_request",
            trans_id=self._trans_id,
            pages=pages,
            ranges=[_range_data(s, e - s) for s, e in pieces],
        )
        return msgs

    def _send_target_hot_add(self, cmd: Command, now: float) -> list[DmMessage]:
        """QEMU-style growth: a new fully backed, aligned region per request, region == range."""
        assert self._caps is not None
        if not self._caps.hot_add or self._hot_add_disabled:
            cmd.hot_add_diff = 0
            return []
        align = self.hot_add_alignment_pages
        room = self.config.max_pages - self._truth.reserved_pages
        count = align_down(min(room, cmd.hot_add_diff), align)
        chunk_max = (
            align
            if align >= HOT_ADD_CHUNK_MAX_PAGES
            else align_down(HOT_ADD_CHUNK_MAX_PAGES, align)
        )
        pages = min(count, chunk_max)
        start = self._truth.next_region_start(align)
        # QEMU never sends sub-alignment amounts: what is left below one alignment unit
        # stays unsatisfied.
        if pages == 0 or start + pages > MAX_GUEST_PAGES:
            cmd.hot_add_diff = 0
            return []
        region = self._truth.place_region(start, pages)
        region.pending.add(start, start + pages)
        return self._send_offer(cmd, Offer(region, start, pages, with_region=True), now)

    def _caps_allow_hot_add(self) -> bool:
        return self._caps is not None and self._caps.hot_add and not self._hot_add_disabled

    def _offer_blocker(self, offer: Offer) -> str | None:
        """Why a queued hot-add can no longer go out (things changed since it was accepted)."""
        assert self._caps is not None
        region = offer.region
        if not self._caps.hot_add:
            return "the guest did not report the hot_add capability"
        if self._hot_add_disabled:
            return "the guest disabled hot-add"
        if region.unusable:
            return "the region takes no further hot-add"
        align = self.hot_add_alignment_pages
        if offer.with_region and (region.start % align or region.size % align):
            return f"the region is not aligned to the guest's hot-add alignment ({align} pages)"
        return None

    def _send_offer(self, cmd: Command, offer: Offer, now: float) -> list[DmMessage]:
        region, start, end = offer.region, offer.start, offer.start + offer.pages
        reason = self._offer_blocker(offer)
        if reason is not None:
            dropped = [offer]
            if not self._caps_allow_hot_add():
                # No offer of the batch can go out: drop them all, with one event.
                dropped += cmd.later
                cmd.later.clear()
            for o in dropped:
                o.region.pending.remove(o.start, o.start + o.pages)
                if o.with_region:
                    # Never offered, never to be: keep its addresses out of later placement.
                    o.region.unusable = True
            self._emit(
                "command_dropped", command=cmd.describe(), reason=reason, offers=len(dropped)
            )
            return []
        # Ground truth first: the host backs before it tells the guest.
        self._truth.back(region, start, end)
        rng = PageRange(start, offer.pages)
        rgn = PageRange(region.start, region.size) if offer.with_region else None
        txn = Transaction(
            "hot_add",
            self._trans_id,
            offer.pages,
            now,
            cmd,
            range=rng,
            region=rgn,
            target_region=region,
        )
        self._start(txn)
        self._emit(
            "hot_add_request",
            trans_id=self._trans_id,
            range=_range_data(start, offer.pages),
            region=None if rgn is None else _range_data(rgn.start_page, rgn.page_cnt),
            form=24 if rgn is not None else 16,
        )
        return [HotAddRequest(trans_id=self._trans_id, range=rng, region=rgn)]

    # -- handlers (dispatched through _HANDLERS) -------------------------------

    def _on_version(self, msg: VersionRequest, now: float) -> list[DmMessage]:
        # Linux walks down 2.0, 1.0, 0.3 and says which attempt is its last.
        if self._last_attempt_rejected:
            self._protocol_error(
                ViolationKind.VERSION_ORDER,
                f"version {msg.version:#x} proposed after the last attempt was rejected",
                msg.trans_id,
            )
        elif self._lowest_rejected is not None and msg.version >= self._lowest_rejected:
            self._protocol_error(
                ViolationKind.VERSION_ORDER,
                f"version {msg.version:#x} is not below the rejected {self._lowest_rejected:#x}",
                msg.trans_id,
            )
        accepted = DYNMEM_PROTOCOL_VERSION_1 <= msg.version <= DYNMEM_PROTOCOL_VERSION_3
        if accepted:
            self._version = msg.version
            self._state = State.CAPS
        else:
            low = self._lowest_rejected
            self._lowest_rejected = msg.version if low is None else min(low, msg.version)
            self._last_attempt_rejected = msg.is_last_attempt
        self._emit(
            "version",
            version=msg.version,
            accepted=accepted,
            is_last_attempt=msg.is_last_attempt,
        )
        return [VersionResponse(trans_id=msg.trans_id, is_accepted=accepted)]

    def _on_caps(self, msg: CapabilitiesReport, now: float) -> list[DmMessage]:
        alignment = msg.hot_add_alignment
        if not 0 <= alignment <= MAX_HOT_ADD_ALIGNMENT:
            self._protocol_error(
                ViolationKind.CAPS_BAD_ALIGNMENT,
                f"hot_add_alignment {alignment} outside 0..{MAX_HOT_ADD_ALIGNMENT} (4 bits)",
                msg.trans_id,
            )
            alignment = min(max(alignment, 0), MAX_HOT_ADD_ALIGNMENT)
        # QEMU accepts every capabilities report.
        self._caps = msg
        self._hot_add_alignment = alignment
        self._state = State.POST_INIT_WAIT
        self._post_init_until = now + self.post_init_delay
        self._emit(
            "negotiated",
            version=self._version,
            balloon=msg.balloon,
            hot_add=msg.hot_add,
            hot_add_alignment=alignment,
            post_init_until=self._post_init_until,
        )
        return [CapabilitiesResponse(trans_id=msg.trans_id, is_accepted=True)]

    def _on_status(self, msg: StatusReport, now: float) -> list[DmMessage]:
        self._committed = msg.num_committed
        self._available = msg.num_avail
        self._status_time = now
        self._emit(
            "status_report",
            committed_pages=msg.num_committed,
            available_pages=msg.num_avail,
            time=now,
        )
        return []

    def _on_balloon_response(self, msg: BalloonResponse, now: float) -> list[DmMessage]:
        txn = self._txn
        assert txn is not None and txn.kind == "balloon"
        if len(msg.ranges) > MAX_RANGES_PER_MESSAGE:
            self._protocol_error(
                ViolationKind.MESSAGE_TOO_LARGE,
                f"{len(msg.ranges)} ranges exceed the {MAX_RANGES_PER_MESSAGE} of a 4 KiB message",
                msg.trans_id,
            )
        accepted = 0
        for rng in msg.ranges:
            for piece, start, end in self._truth.classify_balloon(rng.start_page, rng.end_page):
                if piece is not BalloonPiece.OK:
                    kind, why = _BALLOON_PIECE_KIND[piece]
                    self._protocol_error(
                        kind, f"ballooned [{start:#x}, {end:#x}) {why}", msg.trans_id, start, end
                    )
                    continue
                take = min(end - start, txn.pages - txn.received)
                if take:
                    self._truth.balloon(start, start + take)
                    txn.received += take
                    accepted += take
                if take < end - start:
                    self._protocol_error(
                        ViolationKind.BALLOON_TOO_MANY,
                        f"[{start + take:#x}, {end:#x}) beyond the {txn.pages} pages requested",
                        msg.trans_id,
                        start + take,
                        end,
                    )
        at_floor = not msg.ranges
        done = at_floor or not msg.more_pages
        self._emit(
            "balloon_response",
            trans_id=txn.trans_id,
            ranges=len(msg.ranges),
            pages=accepted,
            received=txn.received,
            requested=txn.pages,
            more_pages=msg.more_pages,
            at_floor=at_floor,
        )
        if done:
            cmd = txn.command
            # No ranges: the guest is at its floor, so asking again is pointless (QEMU
            # sets balloon_diff = 0 whatever more_pages says).
            cmd.balloon_diff = 0 if at_floor else max(0, cmd.balloon_diff - txn.received)
            self._complete()
        return []

    def _on_unballoon_response(self, msg: UnballoonResponse, now: float) -> list[DmMessage]:
        txn = self._txn
        assert txn is not None and txn.kind == "unballoon"
        self._emit("unballoon_response", trans_id=txn.trans_id, pages=txn.pages)
        self._complete()
        return []

    def _on_hot_add_response(self, msg: HotAddResponse, now: float) -> list[DmMessage]:
        txn = self._txn
        assert txn is not None and txn.kind == "hot_add"
        assert txn.range is not None and txn.target_region is not None
        region, rng = txn.target_region, txn.range
        requested, page_count = txn.pages, msg.page_count
        if msg.result not in (0, 1):
            self._protocol_error(
                ViolationKind.HOT_ADD_BAD_RESULT,
                f"result {msg.result} is neither 1 (success) nor 0 (failure)",
                msg.trans_id,
            )
        success = msg.result != 0
        if not success and page_count:
            self._protocol_error(
                ViolationKind.HOT_ADD_RESULT_INCONSISTENT,
                f"result=0 with page_count={page_count} (a failure adds no pages)",
                msg.trans_id,
            )
            page_count = 0
        if page_count > requested:
            self._protocol_error(
                ViolationKind.HOT_ADD_ABOVE_REQUEST,
                f"page_count {page_count} above the {requested} pages requested",
                msg.trans_id,
                rng.start_page,
                rng.start_page + page_count,
            )
            page_count = requested  # QEMU clamps
        if page_count:
            self._truth.record_added(region, rng.start_page, rng.start_page + page_count)
        disabled = success and msg.page_count == 0
        if txn.region is not None and not disabled:
            # Linux made an hv_hotadd_state for the region before trying to add it.
            region.guest_known = True
        if disabled:
            self._hot_add_disabled = True
            region.unusable = True
            self._emit("hot_add_disabled", trans_id=txn.trans_id)
        elif page_count < requested:
            # "host should assume all further hot add requests will fail"
            region.unusable = True
            self._emit(
                "region_unusable",
                region=_range_data(region.start, region.size),
                added=page_count,
                requested=requested,
            )
        cmd = txn.command
        if cmd.hot_add_diff:
            cmd.hot_add_diff = cmd.hot_add_diff - requested if page_count == requested else 0
        self._emit(
            "hot_add_response",
            trans_id=txn.trans_id,
            page_count=msg.page_count,
            result=msg.result,
            accepted=page_count,
            requested=requested,
        )
        self._complete()
        return []

    def _on_access(self, msg: AccessReport) -> None:
        for rng in msg.ranges:
            for start, end in self._truth.backed.holes(rng.start_page, rng.end_page):
                violation = ProtocolViolation(
                    str(ViolationKind.UNBACKED_ACCESS),
                    f"guest {msg.what} of unbacked [{start:#x}, {end:#x})",
                    msg.trans_id,
                    start,
                    end,
                )
                self.violations.append(violation)
                self._emit("violation", **violation.as_data(), what=msg.what)

    # -- recording -------------------------------------------------------------

    def _protocol_error(
        self,
        kind: ViolationKind,
        message: str,
        trans_id: int | None,
        pfn_start: int | None = None,
        pfn_end: int | None = None,
    ) -> None:
        violation = ProtocolViolation(str(kind), message, trans_id, pfn_start, pfn_end)
        self.protocol_errors.append(violation)
        self._emit("protocol_error", **violation.as_data())

    def _emit(self, kind: str, /, **data: object) -> None:
        self.events.append(
            HostEvent(kind, {"vm_id": self.config.vm_id, "state": self._state.value, **data})
        )


_HANDLERS: Final[dict[type[DmMessage], Callable[[DmHostSession, Any, float], list[DmMessage]]]] = {
    VersionRequest: DmHostSession._on_version,
    CapabilitiesReport: DmHostSession._on_caps,
    StatusReport: DmHostSession._on_status,
    BalloonResponse: DmHostSession._on_balloon_response,
    UnballoonResponse: DmHostSession._on_unballoon_response,
    HotAddResponse: DmHostSession._on_hot_add_response,
}
