"""The hypervisor's VM file (``--config``): VM definitions as in the scenario format.

A YAML list (or a mapping with a ``vms`` list) of entries::

    - vm_id: g1          # or "id", as in scenario files
      boot_memory: 4G
      max_memory: 16G
      block_size: 128M   # optional; --default-block-size otherwise

Sizes take the binary suffixes of :func:`memhp.units.parse_size`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hypervisor.vm import VmConfig
from memhp.units import SizeError, parse_pages

_KEYS = {"vm_id", "id", "boot_memory", "max_memory", "block_size"}


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
        pages: dict[str, int] = {}
        for key in ("boot_memory", "max_memory", "block_size"):
            if key not in raw:
                if key == "block_size":
                    pages[key] = default_block_pages
                    continue
                raise ConfigError(f"{what}.{key}: required")
            try:
                pages[key] = parse_pages(raw[key], what=key)
            except SizeError as err:
                raise ConfigError(f"{what}.{key}: {err}") from None
        try:
            out.append(
                VmConfig(vm_id, pages["boot_memory"], pages["max_memory"], pages["block_size"])
            )
        except ValueError as err:
            raise ConfigError(f"{what} ({vm_id}): {err}") from None
    return out


def load_vms(path: str | Path, *, default_block_pages: int) -> list[VmConfig]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    return parse_vms(text, default_block_pages=default_block_pages, source=str(path))
