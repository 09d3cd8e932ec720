"""What the DM host reports: domain events, and the protocol violations it caught.

Both are plain data, so the process adapter can publish them (MQTT JSON, the
Control service's event stream) without knowing the state machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class HostEvent:
    """One state change of a host session; ``data`` holds JSON-friendly values only."""

    kind: str
    data: dict[str, object]


class ViolationKind(StrEnum):
    """Why a guest message (or a guest access) broke the protocol (hyperv-dm.md §5)."""

    # order (§5.2, §5.3)
    VERSION_OUT_OF_STATE = "version-out-of-state"
    VERSION_ORDER = "version-order"
    CAPS_OUT_OF_STATE = "caps-out-of-state"
    STATUS_BEFORE_CAPS = "status-before-caps"
    RESPONSE_WITHOUT_REQUEST = "response-without-request"
    UNEXPECTED_MESSAGE_TYPE = "unexpected-message-type"
    # content
    CAPS_BAD_ALIGNMENT = "caps-bad-alignment"
    MESSAGE_TOO_LARGE = "message-too-large"
    BALLOON_TOO_MANY = "balloon-too-many"
    BALLOON_OUTSIDE_RAM = "balloon-outside-ram"
    BALLOON_UNBACKED = "balloon-unbacked"
    BALLOON_DUPLICATE = "balloon-duplicate"
    HOT_ADD_BAD_RESULT = "hot-add-bad-result"
    HOT_ADD_RESULT_INCONSISTENT = "hot-add-result-inconsistent"
    HOT_ADD_ABOVE_REQUEST = "hot-add-page-count-above-request"
    HOT_ADD_PAGE_COUNT_MISMATCH = "hot-add-page-count-mismatch"
    # ground truth (the emulator-only access side channel)
    UNBACKED_ACCESS = "unbacked-access"


@dataclass(frozen=True)
class ProtocolViolation:
    """A broken rule: which, why, the guest message's trans_id and the PFNs involved."""

    kind: str
    message: str
    trans_id: int | None = None
    pfn_start: int | None = None
    pfn_end: int | None = None

    def as_data(self) -> dict[str, object]:
        return {
            "kind": str(self.kind),
            "message": self.message,
            "trans_id": self.trans_id,
            "pfn_start": self.pfn_start,
            "pfn_end": self.pfn_end,
        }
