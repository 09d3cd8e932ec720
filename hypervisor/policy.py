"""Target policies per VM: ``manual`` (the operator sets targets) and ``dynamic`` (Hyper-V).

Hyper-V's dynamic memory steers a VM toward its committed memory plus a buffer
percentage, between a minimum and a maximum, from the guest's 1 Hz status reports.
A policy here is plain data plus a pure decision function: the process adapter feeds
it each status report and calls ``set_target`` when it answers with a new target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from hypervisor.errors import HostCommandError
from hypervisor.vm import VmConfig
from memhp.units import align_down, align_up

#: Hyper-V's memory buffer setting accepts 5..2000 %; 0 is allowed here for tests.
MAX_BUFFER_PERCENT = 2000


@dataclass(frozen=True)
class ManualPolicy:
    """The operator sets targets; status reports change nothing."""

    kind: ClassVar[str] = "manual"

    def as_data(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class DynamicPolicy:
    """target = clamp(committed * (1 + buffer_percent/100), minimum, maximum), in whole blocks."""

    buffer_percent: int
    minimum_pages: int
    maximum_pages: int

    kind: ClassVar[str] = "dynamic"

    def as_data(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "buffer_percent": self.buffer_percent,
            "minimum_pages": self.minimum_pages,
            "maximum_pages": self.maximum_pages,
        }

    def target_for(self, committed_pages: int, block_pages: int) -> int:
        """The target for ``committed_pages``: buffered, rounded up to a block, clamped."""
        wanted = -(-committed_pages * (100 + self.buffer_percent) // 100)
        wanted = align_up(wanted, block_pages)
        low = align_up(self.minimum_pages, block_pages)
        high = max(align_down(self.maximum_pages, block_pages), low)
        return min(max(wanted, low), high)

    def decide(self, committed_pages: int, current_target: int, block_pages: int) -> int | None:
        """The new target, or None while it is within one block of ``current_target``."""
        target = self.target_for(committed_pages, block_pages)
        if abs(target - current_target) < block_pages:
            return None
        return target


TargetPolicy = ManualPolicy | DynamicPolicy


def make_dynamic(
    config: VmConfig, buffer_percent: int, minimum_pages: int, maximum_pages: int
) -> DynamicPolicy:
    """A validated dynamic policy; 0 for minimum or maximum means one block / ``max_pages``.

    Raises :class:`HostCommandError` naming the field (``buffer_percent``,
    ``minimum_pages``, ``maximum_pages``).
    """
    if not 0 <= buffer_percent <= MAX_BUFFER_PERCENT:
        raise HostCommandError(
            "buffer_percent", f"must be 0..{MAX_BUFFER_PERCENT}, got {buffer_percent}"
        )
    minimum = minimum_pages or config.block_pages
    maximum = maximum_pages or config.max_pages
    if maximum > config.max_pages:
        raise HostCommandError(
            "maximum_pages", f"{maximum} exceeds the VM's max_pages {config.max_pages}"
        )
    if maximum < config.block_pages:
        raise HostCommandError(
            "maximum_pages", f"must be at least one block ({config.block_pages} pages)"
        )
    if minimum > maximum:
        raise HostCommandError("minimum_pages", f"{minimum} exceeds maximum_pages {maximum}")
    return DynamicPolicy(buffer_percent, minimum, maximum)


def policy_from_data(config: VmConfig, data: dict[str, Any]) -> TargetPolicy:
    """The inverse of ``as_data`` (the state file); ValueError when it does not fit the VM."""
    kind = data.get("kind")
    if kind == "manual":
        return ManualPolicy()
    if kind == "dynamic":
        try:
            return make_dynamic(
                config,
                int(data["buffer_percent"]),
                int(data["minimum_pages"]),
                int(data["maximum_pages"]),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"dynamic policy: missing or bad field {err}") from None
        except HostCommandError as err:
            raise ValueError(str(err)) from None
    raise ValueError(f"policy kind must be manual or dynamic, got {kind!r}")
