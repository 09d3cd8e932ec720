"""The hypervisor's VM file (--config)."""

from __future__ import annotations

import re

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


def test_a_virtio_mem_vm_with_its_device() -> None:
    from hypervisor.vm import VirtioMemSettings

    text = """
- id: v
  boot_memory: 1G
  protocol: virtio-mem
  virtio_mem: {region_size: 4G}
- id: w
  boot_memory: 1G
  max_memory: 2G
  block_size: 256M
  protocol: virtio-mem
  virtio_mem: {region_size: 1G, block_size: 4M, requested: 64M, addr: 8G, node_id: 1}
"""
    v, w = parse_vms(text, default_block_pages=BLOCK)
    # max_memory defaults to boot_memory; the device sits at the next 1 GiB boundary.
    assert v == VmConfig(
        "v", 8 * BLOCK, 8 * BLOCK, BLOCK, "virtio-mem", VirtioMemSettings(4 << 30, 1 << 30)
    )
    assert w.virtio_mem == VirtioMemSettings(1 << 30, 8 << 30, 4 << 20, 64 << 20, 1)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("protocol: virtio-mem", "vms[0].virtio_mem: required with protocol virtio-mem"),
        ("protocol: virtio-mem\n  virtio_mem: {}", "vms[0].virtio_mem.region_size: required"),
        (
            "protocol: virtio-mem\n  virtio_mem: {region_size: 1G, size: 1G}",
            "vms[0].virtio_mem: unknown key(s) size",
        ),
        (
            "protocol: virtio-mem\n  virtio_mem: {region_size: 1G, addr: 512M}",
            "virtio_mem.addr must not overlap the VM's memory",
        ),
        ("protocol: xen", "protocol must be one of hyperv-dm, virtio-mem, got 'xen'"),
        (
            "protocol: virtio-mem\n  virtio_mem: {region_size: 1G, requested: 3M}",
            "vms[0].virtio_mem.requested: ",
        ),
        (
            "protocol: virtio-mem\n  virtio_mem: {region_size: 1G, block_size: 3M}",
            "vms[0].virtio_mem.block_size: ",
        ),
        (
            "protocol: virtio-mem\n  virtio_mem: {region_size: 99999999T}",
            "vms[0].virtio_mem",
        ),
    ],
)
def test_virtio_mem_entry_errors_name_the_key(entry: str, message: str) -> None:
    text = f"- id: v\n  boot_memory: 1G\n  max_memory: 1G\n  {entry}\n"
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_vms(text, default_block_pages=BLOCK)
