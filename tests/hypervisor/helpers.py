"""Shared builders for the hypervisor tests: sessions, negotiation, snapshots."""

from __future__ import annotations

from itertools import count

from hypervisor.dm_host import DmHostSession
from hypervisor.vm import VmConfig
from memhp.dm import (
    DYNMEM_PROTOCOL_VERSION_3,
    CapabilitiesReport,
    DmMessage,
    VersionRequest,
)

BLOCK = 32_768  # 128 MiB
BOOT = 4 * BLOCK
MAX = 64 * BLOCK

_guest_ids = count(1000)


def tid() -> int:
    """A fresh guest trans_id (Linux numbers every message it sends)."""
    return next(_guest_ids)


def new_session(
    boot: int = BOOT, max_pages: int = MAX, block: int = BLOCK, post_init_delay: float = 0.0
) -> DmHostSession:
    return DmHostSession(VmConfig("vm0", boot, max_pages, block), post_init_delay=post_init_delay)


def negotiate(
    s: DmHostSession,
    *,
    balloon: bool = True,
    hot_add: bool = True,
    alignment: int = 7,
    now: float = 0.0,
) -> list[DmMessage]:
    out = s.receive(VersionRequest(tid(), DYNMEM_PROTOCOL_VERSION_3), now)
    out += s.receive(
        CapabilitiesReport(tid(), balloon=balloon, hot_add=hot_add, hot_add_alignment=alignment),
        now,
    )
    return out


def ready(
    boot: int = BOOT,
    max_pages: int = MAX,
    block: int = BLOCK,
    *,
    balloon: bool = True,
    hot_add: bool = True,
    alignment: int = 7,
) -> DmHostSession:
    s = new_session(boot, max_pages, block)
    negotiate(s, balloon=balloon, hot_add=hot_add, alignment=alignment)
    assert s.state == "IDLE"
    s.drain_events()
    return s


def snapshot(s: DmHostSession) -> object:
    """Everything an operator command may change."""
    return (
        s.state,
        s.trans_id,
        s.target_pages,
        s.queued,
        s.in_flight,
        list(s.backed.ranges()),
        list(s.ballooned.ranges()),
        list(s.guest_ram.ranges()),
        [
            (
                r.start,
                r.size,
                list(r.backed.ranges()),
                list(r.pending.ranges()),
                list(r.added.ranges()),
                r.unusable,
            )
            for r in s.regions
        ],
        len(s.events),
        len(s.protocol_errors),
    )


def error_kinds(s: DmHostSession) -> list[str]:
    return [v.kind for v in s.protocol_errors]
