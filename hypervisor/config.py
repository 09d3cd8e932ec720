"""The hypervisor's VM file (``--config``): VM definitions as in the scenario format.

A YAML list (or a mapping with a ``vms`` list) of entries::

    - vm_id: g1          # or "id", as in scenario files
      boot_memory: 4G
      max_memory: 16G
      block_size: 128M   # optional; --default-block-size otherwise
    - vm_id: v1
      boot_memory: 1G    # max_memory is optional for virtio-mem (boot_memory)
      protocol: virtio-mem
      virtio_mem: {region_size: 4G, block_size: 2M, requested: 0, addr: 4G, node_id: 0}

Sizes take the binary suffixes of :func:`memhp.units.parse_size`. The virtio-mem
device's ``addr`` defaults to the first address above ``max_memory`` aligned to
max(1 GiB, the memory block, the device block); ``block_size`` to 2M.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

from hypervisor.errors import HostCommandError
from hypervisor.virtio_mem_host import VirtioMemDevice
from hypervisor.vm import (
    DEFAULT_VIRTIO_MEM_BLOCK,
    HYPERV_DM,
    VIRTIO_MEM,
    VirtioMemSettings,
    VmConfig,
    default_virtio_mem_addr,
)
from memhp.units import PAGE_SHIFT, SizeError, parse_pages, parse_size
from memhp.virtio_mem import VirtioMemProtocolError

_KEYS = {"vm_id", "id", "boot_memory", "max_memory", "block_size", "protocol", "virtio_mem"}
_VIRTIO_KEYS = {"region_size", "block_size", "requested", "addr", "node_id"}


class ConfigError(Exception):
    """The VM file cannot be read or an entry is wrong; the message names the entry and key."""


def parse_vms(text: str, *, default_block_pages: int, source: str = "<config>") -> list[VmConfig]:
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if isinstance(data, dict) and set(data) == {"vms"}:
        data = data["vms"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"{source}: expected a list of VM definitions (or a 'vms' list)")
    out: list[VmConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(data):
        what = f"{source}: vms[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{what}: must be a mapping")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ConfigError(f"{what}: unknown key(s) {', '.join(map(str, unknown))}")
        vm_id = raw.get("vm_id", raw.get("id"))
        if not isinstance(vm_id, str) or not vm_id:
            raise ConfigError(f"{what}.vm_id: required, a non-empty string")
        if vm_id in seen:
            raise ConfigError(f"{what}.vm_id: {vm_id!r} is defined twice")
        seen.add(vm_id)
        protocol = raw.get("protocol", HYPERV_DM)
        virtio = protocol == VIRTIO_MEM
        pages: dict[str, int] = {}
        for key in ("boot_memory", "max_memory", "block_size"):
            if key not in raw:
                if key == "block_size":
                    pages[key] = default_block_pages
                    continue
                if key == "max_memory" and virtio:
                    pages[key] = pages["boot_memory"]
                    continue
                raise ConfigError(f"{what}.{key}: required")
            try:
                pages[key] = parse_pages(raw[key], what=key)
            except SizeError as err:
                raise ConfigError(f"{what}.{key}: {err}") from None
        settings = None
        if virtio or "virtio_mem" in raw:
            settings = _virtio_settings(raw.get("virtio_mem"), pages, f"{what}.virtio_mem")
        try:
            out.append(
                VmConfig(
                    vm_id,
                    pages["boot_memory"],
                    pages["max_memory"],
                    pages["block_size"],
                    protocol,
                    settings,
                )
            )
        except ValueError as err:
            raise ConfigError(f"{what} ({vm_id}): {err}") from None
    return out


def _virtio_settings(raw: Any, pages: dict[str, int], what: str) -> VirtioMemSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: required with protocol {VIRTIO_MEM}, a mapping")
    unknown = sorted(set(raw) - _VIRTIO_KEYS)
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(map(str, unknown))}")
    sizes: dict[str, int] = {}
    for key in ("region_size", "block_size", "requested", "addr"):
        if key in raw:
            try:
                sizes[key] = parse_size(raw[key])
            except SizeError as err:
                raise ConfigError(f"{what}.{key}: {err}") from None
    if "region_size" not in sizes:
        raise ConfigError(f"{what}.region_size: required")
    node = raw.get("node_id", 0)
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= 0xFFFF:
        raise ConfigError(f"{what}.node_id: must be an integer 0..65535, got {node!r}")
    block = sizes.get("block_size", DEFAULT_VIRTIO_MEM_BLOCK)
    addr = sizes.get("addr")
    if addr is None:
        addr = default_virtio_mem_addr(
            pages["max_memory"] << PAGE_SHIFT, pages["block_size"] << PAGE_SHIFT, block
        )
    settings = VirtioMemSettings(
        region_size=sizes["region_size"],
        addr=addr,
        block_size=block,
        requested=sizes.get("requested", 0),
        node_id=node,
    )
    # The device's own rules (QEMU's), reported under the keys of this file.
    try:
        VirtioMemDevice(settings.device_config())
    except HostCommandError as err:
        key = _DEVICE_KEYS.get(err.field, err.field)
        raise ConfigError(f"{what}.{key}: {err.message}") from None
    except VirtioMemProtocolError as err:
        raise ConfigError(f"{what}: {err}") from None
    return settings


#: The device's field names, as this file spells them.
_DEVICE_KEYS: Final = {"requested_size": "requested"}


def load_vms(path: str | Path, *, default_block_pages: int) -> list[VmConfig]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    return parse_vms(text, default_block_pages=default_block_pages, source=str(path))
