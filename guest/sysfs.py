"""``/sys/devices/system/memory``: the model as a sysfs tree, and the sysfs write semantics.

:func:`write_sysfs_tree` mirrors a :class:`~guest.mm.memory.MemoryManager` into
``<root>/sys/devices/system/memory`` in the exact formats of ``drivers/base/memory.c``
(mm-model.md 4.1, 4.2), so real util-linux ``lsmem --sysroot <root>`` can read it.
It is an idempotent sync: unchanged files are left alone, changed files are replaced
atomically (temporary file + ``rename``), new block directories are built under a
hidden name and renamed into place, and directories of removed blocks are renamed
away before they are deleted. A concurrent reader therefore never sees a half-written
file or a half-populated ``memoryN`` directory.

:func:`sysfs_state_write`, :func:`sysfs_online_write` and :func:`auto_online_blocks_write`
are what a ``write(2)`` to ``memoryN/state``, ``memoryN/online`` and
``auto_online_blocks`` does (``state_store``, ``online_store`` and
``auto_online_blocks_store``, with ``device_online``/``device_offline`` and
``memory_subsys_online``/``memory_subsys_offline`` in between). Errors are raised as
:class:`~guest.mm.errors.MemoryHotplugError` carrying the errno the write would fail with.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from guest.mm.errors import EINVAL, MemoryHotplugError
from guest.mm.memory import (
    MMOP_OFFLINE,
    MMOP_ONLINE,
    ONLINE_TYPES,
    STATE_OFFLINE,
    STATE_ONLINE,
    HotplugLockBusy,
    MemoryBlock,
    MemoryManager,
)

__all__ = [
    "MEMORY_DIR",
    "NODE_DIR",
    "auto_online_blocks_write",
    "block_files",
    "kstrtobool",
    "memory_dir",
    "node_dir",
    "sysfs_online_write",
    "sysfs_state_write",
    "sysfs_streq",
    "write_sysfs_tree",
]

#: Paths below the sysroot.
MEMORY_DIR = Path("sys/devices/system/memory")
NODE_DIR = Path("sys/devices/system/node")

_BLOCK_DIR_RE = re.compile(r"memory(\d+)")
_NODE_LINK_RE = re.compile(r"node(\d+)")
_NODE_DIR_RE = re.compile(r"node(\d+)")


def memory_dir(root: Path) -> Path:
    """``<root>/sys/devices/system/memory``."""
    return root / MEMORY_DIR


def node_dir(root: Path, nid: int) -> Path:
    """``<root>/sys/devices/system/node/node<nid>``."""
    return root / NODE_DIR / f"node{nid}"


# -- read side (the *_show functions) --------------------------------------------


def block_files(mm: MemoryManager, block: MemoryBlock) -> dict[str, str]:
    """The regular files of ``memoryN/`` and their contents, as the kernel shows them."""
    return {
        # state_show: MEM_ONLINE/MEM_OFFLINE/MEM_GOING_OFFLINE.
        "state": f"{block.state}\n",
        # online_show: !dev->offline, and dev->offline is only set once offlining succeeded.
        "online": "0\n" if block.state == STATE_OFFLINE else "1\n",
        # phys_index_show: "%08lx\n" of the block id.
        "phys_index": f"{block.id:08x}\n",
        # phys_device_show: always 0 outside s390.
        "phys_device": "0\n",
        # removable_show (>= 5.6): 1 iff CONFIG_MEMORY_HOTREMOVE.
        "removable": "1\n",
        "valid_zones": " ".join(mm.valid_zones(block)) + "\n",
    }


def _root_files(mm: MemoryManager) -> dict[str, str]:
    return {
        "block_size_bytes": f"{mm.geometry.block_size_bytes:x}\n",
        "auto_online_blocks": f"{mm.auto_online_blocks}\n",
    }


# -- filesystem helpers ----------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


#: File modes of the kernel attributes (DEVICE_ATTR_RO → 0444, DEVICE_ATTR_RW → 0644).
_MODES = {"state": 0o644, "online": 0o644, "auto_online_blocks": 0o644}
_RO_MODE = 0o444


def _write_atomic(path: Path, content: str) -> bool:
    """Replace ``path`` with ``content`` by rename; False when it already had it."""
    mode = _MODES.get(path.name, _RO_MODE)
    if not path.is_symlink() and _read_text(path) == content:
        if path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def _symlink_atomic(path: Path, target: str) -> bool:
    """Make ``path`` a symlink to ``target`` (replacing it by rename); False if it was one."""
    if path.is_symlink() and os.readlink(path) == target:
        return False
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.lnk"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    return True


def _remove_dir_atomic(path: Path) -> None:
    """Make ``path`` disappear at once (rename to a hidden name), then delete it."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, doomed / path.name)
    shutil.rmtree(doomed)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _node_link_target(nid: int) -> str:
    return f"../../node/node{nid}"


def _fill_block_dir(directory: Path, files: dict[str, str], nid: int) -> None:
    for name, content in files.items():
        _write_atomic(directory / name, content)
    # Exactly one nodeX entry: link the current node first, then drop links to
    # other nodes (the block moved), so a reader never finds none.
    _symlink_atomic(directory / f"node{nid}", _node_link_target(nid))
    for entry in os.listdir(directory):
        if _NODE_LINK_RE.fullmatch(entry) and entry != f"node{nid}":
            _unlink(directory / entry)


# -- write_sysfs_tree --------------------------------------------------------------


def write_sysfs_tree(mm: MemoryManager, root: Path) -> None:
    """Sync ``root/sys/devices/system/{memory,node}`` with the model.

    Writes ``block_size_bytes``, ``auto_online_blocks`` and one ``memoryN/`` per
    block (``state``, ``online``, ``phys_index``, ``phys_device``, ``removable``,
    ``valid_zones``, ``nodeX -> ../../node/nodeX``), plus
    ``node/nodeX/memoryN -> ../../memory/memoryN``. Directories and node links of
    blocks the model no longer has are removed. Safe to call repeatedly.
    """
    mem = memory_dir(root)
    mem.mkdir(parents=True, exist_ok=True)
    for name, content in _root_files(mm).items():
        _write_atomic(mem / name, content)

    blocks = mm.blocks
    wanted_names = {f"memory{block_id}" for block_id in blocks}

    # Removed blocks first: node links, then the directories.
    node_root = root / NODE_DIR
    if node_root.is_dir():
        for node_entry in os.listdir(node_root):
            match = _NODE_DIR_RE.fullmatch(node_entry)
            if not match or not (node_root / node_entry).is_dir():
                continue
            nid = int(match.group(1))
            for entry in os.listdir(node_root / node_entry):
                block_match = _BLOCK_DIR_RE.fullmatch(entry)
                if not block_match:
                    continue
                block = blocks.get(int(block_match.group(1)))
                if block is None or block.nid != nid:
                    _unlink(node_root / node_entry / entry)
    for entry in os.listdir(mem):
        if _BLOCK_DIR_RE.fullmatch(entry) and entry not in wanted_names:
            path = mem / entry
            if path.is_dir() and not path.is_symlink():
                _remove_dir_atomic(path)
            else:
                _unlink(path)

    for block_id in sorted(blocks):
        block = blocks[block_id]
        name = f"memory{block_id}"
        path = mem / name
        files = block_files(mm, block)
        if path.is_dir() and not path.is_symlink():
            _fill_block_dir(path, files, block.nid)
        else:
            _unlink(path)
            # Build the whole directory under a hidden name, then rename it into place
            # (lsmem only looks at entries named memory<digits>).
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".new", dir=mem))
            try:
                os.chmod(staging, 0o755)
                _fill_block_dir(staging, files, block.nid)
                os.replace(staging, path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        node = node_dir(root, block.nid)
        node.mkdir(parents=True, exist_ok=True)
        _symlink_atomic(node / name, f"../../memory/{name}")


# -- write side (the *_store functions) ------------------------------------------


def _c_string(value: str) -> str:
    """The buffer as the C string functions see it: it ends at the first NUL."""
    return value.split("\0", 1)[0]


def sysfs_streq(s1: str, s2: str) -> bool:
    """``sysfs_streq``: equal, ignoring one trailing newline on either side."""
    a, b = _c_string(s1), _c_string(s2)
    return a == b or a == b + "\n" or a + "\n" == b


def kstrtobool(value: str) -> bool:
    """``kstrtobool``: decided by the first one or two characters; -EINVAL otherwise.

    ``y/Y/t/T/1`` → True, ``n/N/f/F/0`` → False, ``on`` → True, ``off`` → False (any case).
    """
    s = _c_string(value)
    first = s[:1]
    if first in ("y", "Y", "t", "T", "1"):
        return True
    if first in ("n", "N", "f", "F", "0"):
        return False
    if first in ("o", "O"):
        second = s[1:2]
        if second in ("n", "N"):
            return True
        if second in ("f", "F"):
            return False
    raise MemoryHotplugError(EINVAL, f"kstrtobool: invalid boolean {value!r}")


def _online_type_from_str(value: str) -> str:
    """``mhp_online_type_from_str``: one of :data:`ONLINE_TYPES`, else -EINVAL."""
    for online_type in ONLINE_TYPES:
        if sysfs_streq(value, online_type):
            return online_type
    raise MemoryHotplugError(EINVAL, f"invalid online type {value!r}")


def _lookup_block(mm: MemoryManager, block_id: int) -> MemoryBlock:
    block = mm.blocks.get(block_id)
    if block is None:
        # No such memoryN directory: open(2) fails before any write happens.
        raise MemoryHotplugError(_errno.ENOENT, f"no memory block {block_id}")
    return block


def _lock_device_hotplug_sysfs(mm: MemoryManager) -> None:
    """``lock_device_hotplug_sysfs``: busy → the syscall is restarted (retry later).

    The model only tracks a suspended online operation; whoever runs it (a sysfs
    write or ``add_memory``) holds ``device_hotplug_lock`` as well.
    """
    if mm.hotplug_lock_holder is not None:
        raise HotplugLockBusy(f"device_hotplug_lock held by {mm.hotplug_lock_holder}")


def _device_online(mm: MemoryManager, block: MemoryBlock, online_type: str) -> bool:
    """``device_online``: False (ret 1) when the device is not offline, else online it."""
    if block.state != STATE_OFFLINE:  # dev->offline is false
        return False
    # memory_subsys_online → memory_block_change_state(MEM_ONLINE, MEM_OFFLINE).
    mm.online_block(block.id, online_type)
    return True


def _device_offline(mm: MemoryManager, block: MemoryBlock) -> bool:
    """``device_offline``: False (ret 1) when already offline, else offline it."""
    if block.state == STATE_OFFLINE:  # dev->offline is true
        return False
    # memory_subsys_offline → memory_block_change_state(MEM_OFFLINE, MEM_ONLINE):
    # a going-offline block is not in MEM_ONLINE → -EINVAL.
    if block.state != STATE_ONLINE:
        raise MemoryHotplugError(EINVAL, f"memory{block.id} is {block.state}")
    mm.offline_block(block.id)
    return True


def sysfs_state_write(mm: MemoryManager, block_id: int, value: str) -> None:
    """``echo value > memoryN/state`` (``state_store``).

    ``online``/``online_kernel``/``online_movable``/``offline`` (sysfs_streq), else
    -EINVAL; already in the requested state → -EINVAL; online/offline failures raise
    with their errno and leave the block as it was. Raises
    :class:`~guest.mm.memory.HotplugLockBusy` while an online operation is suspended
    (the kernel restarts the syscall).
    """
    block = _lookup_block(mm, block_id)
    online_type = _online_type_from_str(value)
    _lock_device_hotplug_sysfs(mm)
    if online_type == MMOP_OFFLINE:
        done = _device_offline(mm, block)
    else:
        done = _device_online(mm, block, online_type)
    if not done:
        raise MemoryHotplugError(EINVAL, f"memory{block_id} is already {block.state}")


def sysfs_online_write(mm: MemoryManager, block_id: int, value: str) -> None:
    """``echo value > memoryN/online`` (``online_store``).

    ``kstrtobool`` value, else -EINVAL; onlining uses the default zone (``online``);
    already in the requested state → success; failures raise with their errno.
    """
    block = _lookup_block(mm, block_id)
    val = kstrtobool(value)
    _lock_device_hotplug_sysfs(mm)
    if val:
        _device_online(mm, block, MMOP_ONLINE)
    else:
        _device_offline(mm, block)


def auto_online_blocks_write(mm: MemoryManager, value: str) -> None:
    """``echo value > auto_online_blocks``: any online type string, else -EINVAL."""
    mm.auto_online_blocks = _online_type_from_str(value)
