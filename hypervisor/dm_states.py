"""The DM host's states and its transition table: which guest message each state accepts.

h11 style: the table is data, so "is this message allowed now?" is one lookup and a
message outside the table is a protocol violation with a name, never an exception.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from hypervisor.events import ViolationKind
from memhp.dm import (
    BalloonResponse,
    CapabilitiesReport,
    DmMessage,
    HotAddResponse,
    StatusReport,
    UnballoonResponse,
    VersionRequest,
)


class State(StrEnum):
    """QEMU's ``enum State`` (hyperv-dm.md §3.1), without the ring-buffer states.

    ``*_RB_WAIT`` and ``*_POSTING`` exist in QEMU because its send can block on a full
    VMBus ring; a sans-I/O machine hands its messages to the adapter, which never
    refuses them, so posting and waiting for the reply collapse into ``*_REPLY_WAIT``.
    The session starts in ``VERSION``: creating it is the guest opening the channel.
    """

    VERSION = "VERSION"
    CAPS = "CAPS"
    POST_INIT_WAIT = "POST_INIT_WAIT"
    IDLE = "IDLE"
    BALLOON_REPLY_WAIT = "BALLOON_REPLY_WAIT"
    UNBALLOON_REPLY_WAIT = "UNBALLOON_REPLY_WAIT"
    HOT_ADD_REPLY_WAIT = "HOT_ADD_REPLY_WAIT"


_AFTER_CAPS: Final = frozenset({StatusReport})

#: Which guest messages each state accepts (``AccessReport`` is accepted in every state).
ACCEPTS: Final[dict[State, frozenset[type[DmMessage]]]] = {
    State.VERSION: frozenset({VersionRequest}),
    State.CAPS: frozenset({CapabilitiesReport}),
    State.POST_INIT_WAIT: _AFTER_CAPS,
    State.IDLE: _AFTER_CAPS,
    State.BALLOON_REPLY_WAIT: _AFTER_CAPS | {BalloonResponse},
    State.UNBALLOON_REPLY_WAIT: _AFTER_CAPS | {UnballoonResponse},
    State.HOT_ADD_REPLY_WAIT: _AFTER_CAPS | {HotAddResponse},
}

#: What a guest message arriving in a state that does not accept it is called.
OUT_OF_STATE: Final[dict[type[DmMessage], ViolationKind]] = {
    VersionRequest: ViolationKind.VERSION_OUT_OF_STATE,
    CapabilitiesReport: ViolationKind.CAPS_OUT_OF_STATE,
    StatusReport: ViolationKind.STATUS_BEFORE_CAPS,
    BalloonResponse: ViolationKind.RESPONSE_WITHOUT_REQUEST,
    UnballoonResponse: ViolationKind.RESPONSE_WITHOUT_REQUEST,
    HotAddResponse: ViolationKind.RESPONSE_WITHOUT_REQUEST,
}

#: The state a host-initiated transaction of each kind waits in.
REPLY_WAIT: Final[dict[str, State]] = {
    "balloon": State.BALLOON_REPLY_WAIT,
    "unballoon": State.UNBALLOON_REPLY_WAIT,
    "hot_add": State.HOT_ADD_REPLY_WAIT,
}
