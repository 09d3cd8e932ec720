"""Target policies: manual and Hyper-V's dynamic (buffer over committed, clamped, whole blocks)."""

from __future__ import annotations

import pytest

from hypervisor.errors import HostCommandError
from hypervisor.policy import DynamicPolicy, ManualPolicy, make_dynamic, policy_from_data
from hypervisor.vm import VmConfig
from tests.hypervisor.helpers import BLOCK, BOOT, MAX

CFG = VmConfig("vm0", BOOT, MAX, BLOCK)
GIB = 262_144  # pages


def test_target_is_committed_plus_buffer_rounded_up_to_a_block() -> None:
    p = DynamicPolicy(20, BLOCK, MAX)
    assert p.target_for(5 * GIB, BLOCK) == 6 * GIB
    # 1 page over a block boundary rounds up to the next block.
    assert p.target_for(5 * GIB + 1, BLOCK) == 6 * GIB + BLOCK
    assert DynamicPolicy(0, BLOCK, MAX).target_for(3 * BLOCK, BLOCK) == 3 * BLOCK


def test_target_is_clamped() -> None:
    p = DynamicPolicy(50, 2 * GIB, 4 * GIB)
    assert p.target_for(0, BLOCK) == 2 * GIB
    assert p.target_for(100 * GIB, BLOCK) == 4 * GIB
    # A maximum below a block boundary is rounded down, never exceeded.
    assert DynamicPolicy(50, BLOCK, 4 * GIB + 7).target_for(100 * GIB, BLOCK) == 4 * GIB


def test_decide_waits_for_a_whole_block_of_difference() -> None:
    p = DynamicPolicy(20, BLOCK, MAX)
    assert p.decide(5 * GIB, 6 * GIB, BLOCK) is None
    assert p.decide(5 * GIB + 1, 6 * GIB, BLOCK) == 6 * GIB + BLOCK
    # 4 GiB * 1.2 = 4.8 GiB = 38.4 blocks -> 39 blocks: shrink.
    assert p.decide(4 * GIB, 6 * GIB, BLOCK) == 39 * BLOCK


def test_make_dynamic_defaults_and_errors() -> None:
    p = make_dynamic(CFG, 20, 0, 0)
    assert (p.minimum_pages, p.maximum_pages) == (BLOCK, MAX)
    for args, field in [
        ((5000, 0, 0), "buffer_percent"),
        ((20, 0, MAX + BLOCK), "maximum_pages"),
        ((20, 0, 10), "maximum_pages"),
        ((20, 4 * BLOCK, 2 * BLOCK), "minimum_pages"),
    ]:
        with pytest.raises(HostCommandError) as err:
            make_dynamic(CFG, *args)
        assert err.value.field == field and err.value.code == "invalid_argument"


def test_policy_data_round_trip() -> None:
    p = make_dynamic(CFG, 10, 2 * BLOCK, 8 * BLOCK)
    assert policy_from_data(CFG, p.as_data()) == p
    assert policy_from_data(CFG, ManualPolicy().as_data()) == ManualPolicy()
    with pytest.raises(ValueError):
        policy_from_data(CFG, {"kind": "greedy"})
    with pytest.raises(ValueError):
        policy_from_data(CFG, {"kind": "dynamic"})
