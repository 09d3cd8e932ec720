"""The hypervisor's VM file (--config)."""

from __future__ import annotations

import pytest

from hypervisor.config import ConfigError, parse_vms
from hypervisor.vm import VmConfig

BLOCK = 32_768


def test_list_and_vms_mapping_with_scenario_keys() -> None:
    text = """
- vm_id: a
  boot_memory: 4G
  max_memory: 16G
- id: b
  boot_memory: 1G
  max_memory: 2G
  block_size: 256M
"""
    assert parse_vms(text, default_block_pages=BLOCK) == [
        VmConfig("a", 4 * 8 * BLOCK, 16 * 8 * BLOCK, BLOCK),
        VmConfig("b", 8 * BLOCK, 16 * BLOCK, 2 * BLOCK),
    ]
    wrapped = "vms:\n  - {vm_id: c, boot_memory: 1G, max_memory: 1G}\n"
    assert parse_vms(wrapped, default_block_pages=BLOCK)[0].vm_id == "c"
    assert parse_vms("", default_block_pages=BLOCK) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{a: 1}", "list of VM definitions"),
        ("- 3", "must be a mapping"),
        ("- {boot_memory: 1G, max_memory: 1G}", "vm_id: required"),
        ("- {vm_id: a, boot_memory: 1G}", "max_memory: required"),
        ("- {vm_id: a, boot_memory: 1X, max_memory: 1G}", "boot_memory: cannot parse"),
        ("- {vm_id: a, boot_memory: 2G, max_memory: 1G}", "max_pages must be >= boot_pages"),
        ("- {vm_id: a, boot_memory: 1G, max_memory: 1G, colour: red}", "unknown key"),
        (
            "- {vm_id: a, boot_memory: 1G, max_memory: 1G}\n- {vm_id: a, boot_memory: 1G, "
            "max_memory: 1G}",
            "defined twice",
        ),
        ("- [unclosed", "not valid YAML"),
    ],
)
def test_errors_name_the_entry_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_vms(text, default_block_pages=BLOCK)
