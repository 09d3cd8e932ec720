"""VmConfig validation: every rule, and the field it names."""

from __future__ import annotations

import pytest

from hypervisor.vm import VmConfig

BLOCK = 32_768


def test_valid_config_defaults_to_128m_blocks() -> None:
    config = VmConfig("vm0", 4 * BLOCK, 64 * BLOCK)
    assert config.block_pages == BLOCK


@pytest.mark.parametrize("block", [BLOCK, 2 * BLOCK, 524_288])
def test_block_sizes_128m_to_2g(block: int) -> None:
    assert VmConfig("vm0", block, 4 * block, block).block_pages == block


@pytest.mark.parametrize(
    ("kwargs", "field", "rule"),
    [
        ({"vm_id": ""}, "vm_id", "non-empty"),
        ({"block_pages": 16_384}, "block_pages", "power of two between"),
        ({"block_pages": 1_048_576}, "block_pages", "power of two between"),
        ({"block_pages": 3 * BLOCK}, "block_pages", "power of two between"),
        ({"boot_pages": 0}, "boot_pages", "positive multiple of block_pages"),
        ({"boot_pages": BLOCK + 1}, "boot_pages", "positive multiple of block_pages"),
        ({"max_pages": 8 * BLOCK + 4096}, "max_pages", "multiple of block_pages"),
        ({"max_pages": 2 * BLOCK}, "max_pages", ">= boot_pages"),
        ({"max_pages": 1 << 41}, "max_pages", "40-bit"),
        ({"boot_pages": True}, "boot_pages", "integer"),
        ({"max_pages": 1.5}, "max_pages", "integer"),
    ],
)
def test_invalid_config_names_field_and_rule(
    kwargs: dict[str, object], field: str, rule: str
) -> None:
    args: dict[str, object] = {
        "vm_id": "vm0",
        "boot_pages": 4 * BLOCK,
        "max_pages": 64 * BLOCK,
        "block_pages": BLOCK,
    }
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        VmConfig(**args)  # type: ignore[arg-type]
    assert str(err.value).startswith(field)
    assert rule in str(err.value)
