"""guest.sysfs: the emulated /sys/devices/system/memory tree and its write semantics.

The lsmem tests run the real util-linux ``lsmem --sysroot`` against trees written
from models. Expected tables are written out by hand from each scenario's layout;
expected JSON rows and summary totals are computed here from the model's blocks
(never from the written tree).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from guest.mm.errors import MemoryHotplugError
from guest.mm.geometry import Geometry
from guest.mm.memory import PHASE_CALLBACKS_DONE, HotplugLockBusy, MemoryBlock, MemoryManager
from guest.mm.notifier import (
    MEM_GOING_OFFLINE,
    MEM_GOING_ONLINE,
    NOTIFY_OK,
    MemoryAction,
    MemoryNotify,
    NotifierErrorInject,
)
from guest.sysfs import (
    auto_online_blocks_write,
    kstrtobool,
    sysfs_online_write,
    sysfs_state_write,
    sysfs_streq,
    write_sysfs_tree,
)

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
ALL_COLUMNS = "RANGE,SIZE,STATE,REMOVABLE,BLOCK,NODE,ZONES"
LSMEM = shutil.which("lsmem") or "/usr/bin/lsmem"
LSMEM_ENV = {"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

needs_lsmem = pytest.mark.skipif(
    not os.access(LSMEM, os.X_OK), reason="util-linux lsmem is not installed"
)


def pages(nbytes: int) -> int:
    return nbytes // PAGE


def mem_dir(root: Path) -> Path:
    return root / "sys/devices/system/memory"


def read(root: Path, rel: str) -> str:
    return (mem_dir(root) / rel).read_text()


def lsmem(root: Path, *args: str) -> str:
    proc = subprocess.run(
        [LSMEM, "--sysroot", str(root), *args],
        capture_output=True,
        text=True,
        env=LSMEM_ENV,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def expect_errno(err: int, fn: Callable[[], object]) -> MemoryHotplugError:
    with pytest.raises(MemoryHotplugError) as info:
        fn()
    assert info.value.errno == err, info.value
    return info.value


def snapshot(block: MemoryBlock) -> tuple[str, str | None]:
    return block.state, block.zone


# -- scenarios ------------------------------------------------------------------------


def boot_only() -> MemoryManager:
    """4 GiB of boot memory, 128 MiB blocks: memory0..memory31, all online Normal."""
    return MemoryManager(pages(4 * GiB), Geometry(128 * MiB))


def added_offline() -> MemoryManager:
    """boot_only + 512 MiB hot-added at 4 GiB: memory32..memory35, offline."""
    mm = boot_only()
    mm.add_memory(pages(4 * GiB), pages(512 * MiB))
    return mm


def with_movable() -> MemoryManager:
    """added_offline with memory33 online_movable and memory34 online (default zone)."""
    mm = added_offline()
    mm.online_block(33, "online_movable")
    mm.online_block(34, "online")
    return mm


def two_gib_blocks() -> MemoryManager:
    """2 GiB blocks: boot memory0-1, hot-added memory2 (offline) and memory3 (Movable)."""
    mm = MemoryManager(pages(4 * GiB), Geometry(2 * GiB))
    mm.add_memory(pages(4 * GiB), pages(4 * GiB))
    mm.online_block(3, "online_movable")
    return mm


def removed_gap() -> MemoryManager:
    """added_offline with memory33 removed again: a hole between memory32 and memory34."""
    mm = added_offline()
    mm.remove_memory(pages(4 * GiB + 128 * MiB), pages(128 * MiB))
    return mm


def movable_node() -> MemoryManager:
    """movable_node: offline hot-added blocks default to Movable (valid_zones Movable Normal)."""
    mm = MemoryManager(pages(4 * GiB), Geometry(128 * MiB), movable_node=True)
    mm.add_memory(pages(4 * GiB), pages(256 * MiB))
    return mm


SCENARIOS: dict[str, Callable[[], MemoryManager]] = {
    "boot_only": boot_only,
    "added_offline": added_offline,
    "with_movable": with_movable,
    "two_gib_blocks": two_gib_blocks,
    "removed_gap": removed_gap,
    "movable_node": movable_node,
}

# `lsmem --sysroot DIR -o RANGE,SIZE,STATE,REMOVABLE,BLOCK,NODE,ZONES`, worked out by hand
# from each layout. Column widths follow libsmartcols: the widest cell or the header;
# SIZE has a width hint of 5 that applies only when its widest cell is as wide as the
# header ("128M" → 5 columns, "4G" → 4).
EXPECTED_TABLES = {
    "boot_only": """\
RANGE                                 SIZE  STATE REMOVABLE BLOCK NODE  ZONES
0x0000000000000000-0x00000000ffffffff   4G online       yes  0-31    0 Normal

Memory block size:       128M
Total online memory:       4G
Total offline memory:      0B
""",
    "added_offline": """\
RANGE                                  SIZE   STATE REMOVABLE BLOCK NODE          ZONES
0x0000000000000000-0x00000000ffffffff    4G  online       yes  0-31    0         Normal
0x0000000100000000-0x000000011fffffff  512M offline           32-35    0 Normal/Movable

Memory block size:       128M
Total online memory:       4G
Total offline memory:    512M
""",
    "with_movable": """\
RANGE                                  SIZE   STATE REMOVABLE BLOCK NODE          ZONES
0x0000000000000000-0x00000000ffffffff    4G  online       yes  0-31    0         Normal
0x0000000100000000-0x0000000107ffffff  128M offline              32    0 Normal/Movable
0x0000000108000000-0x000000010fffffff  128M  online       yes    33    0        Movable
0x0000000110000000-0x0000000117ffffff  128M  online       yes    34    0         Normal
0x0000000118000000-0x000000011fffffff  128M offline              35    0 Normal/Movable

Memory block size:       128M
Total online memory:     4.3G
Total offline memory:    256M
""",
    "two_gib_blocks": """\
RANGE                                 SIZE   STATE REMOVABLE BLOCK NODE          ZONES
0x0000000000000000-0x00000000ffffffff   4G  online       yes   0-1    0         Normal
0x0000000100000000-0x000000017fffffff   2G offline               2    0 Normal/Movable
0x0000000180000000-0x00000001ffffffff   2G  online       yes     3    0        Movable

Memory block size:         2G
Total online memory:       6G
Total offline memory:      2G
""",
    "removed_gap": """\
RANGE                                  SIZE   STATE REMOVABLE BLOCK NODE          ZONES
0x0000000000000000-0x00000000ffffffff    4G  online       yes  0-31    0         Normal
0x0000000100000000-0x0000000107ffffff  128M offline              32    0 Normal/Movable
0x0000000110000000-0x000000011fffffff  256M offline           34-35    0 Normal/Movable

Memory block size:       128M
Total online memory:       4G
Total offline memory:    384M
""",
    "movable_node": """\
RANGE                                  SIZE   STATE REMOVABLE BLOCK NODE          ZONES
0x0000000000000000-0x00000000ffffffff    4G  online       yes  0-31    0         Normal
0x0000000100000000-0x000000010fffffff  256M offline           32-33    0 Movable/Normal

Memory block size:       128M
Total online memory:       4G
Total offline memory:    256M
""",
}


# -- expected lsmem rows, computed from the model's blocks ---------------------------------


def human_size(nbytes: int) -> str:
    """util-linux ``size_to_human_string`` (one decimal, rounded half up)."""
    if nbytes < 1024:
        return f"{nbytes}B"
    exp = 10
    while exp < 60 and nbytes >= 1 << (exp + 10):
        exp += 10
    suffix = "KMGTPE"[exp // 10 - 1]
    dec, frac = nbytes >> exp, nbytes & ((1 << exp) - 1)
    tenths = 0
    if frac:
        tenths = ((frac * 1000 >> exp) + 50) // 100
        if tenths == 10:
            dec, tenths = dec + 1, 0
    return f"{dec}.{tenths}{suffix}" if tenths else f"{dec}{suffix}"


@dataclass
class Row:
    first: int
    last: int
    state: str
    removable: bool
    node: int
    zones: str


def block_view(mm: MemoryManager, block: MemoryBlock) -> tuple[str, bool, int, str]:
    state = {"online": "online", "offline": "offline", "going-offline": "on->off"}[block.state]
    if block.state == "offline":
        zones = mm.valid_zones(block)
    else:
        zones = [block.zone] if block.zone else ["none"]
    zone_names = "/".join("None" if z == "none" else z for z in zones)
    return state, block.state == "online", block.nid, zone_names


def expected_rows(mm: MemoryManager, *, split_node_zones: bool) -> list[Row]:
    rows: list[Row] = []
    for block_id in sorted(mm.blocks):
        state, removable, node, zones = block_view(mm, mm.blocks[block_id])
        if rows:
            prev = rows[-1]
            same = (prev.state, prev.removable) == (state, removable)
            if split_node_zones:
                same = same and (prev.node, prev.zones) == (node, zones)
            if same and prev.last + 1 == block_id:
                prev.last = block_id
                continue
        rows.append(Row(block_id, block_id, state, removable, node, zones))
    return rows


def expected_json(mm: MemoryManager, *, all_columns: bool) -> dict[str, list[dict[str, object]]]:
    bs = mm.geometry.block_size_bytes
    out: list[dict[str, object]] = []
    for row in expected_rows(mm, split_node_zones=all_columns):
        start, end = row.first * bs, (row.last + 1) * bs
        entry: dict[str, object] = {
            "range": f"0x{start:016x}-0x{end - 1:016x}",
            "size": human_size(end - start),
            "state": row.state,
            "removable": row.removable,
            "block": str(row.first) if row.first == row.last else f"{row.first}-{row.last}",
        }
        if all_columns:
            entry["node"] = row.node
            entry["zones"] = row.zones
        out.append(entry)
    return {"memory": out}


def expected_summary_bytes(mm: MemoryManager) -> str:
    online = sum(b.nr_pages * PAGE for b in mm.blocks.values() if b.state == "online")
    offline = sum(b.nr_pages * PAGE for b in mm.blocks.values() if b.state != "online")
    return (
        f"{'Memory block size:':<23} {mm.geometry.block_size_bytes:>15}\n"
        f"{'Total online memory:':<23} {online:>15}\n"
        f"{'Total offline memory:':<23} {offline:>15}\n"
    )


def test_human_size_matches_util_linux_examples() -> None:
    # Values printed by real lsmem (mm-model.md 4.5 and the tables above).
    assert human_size(128 * MiB) == "128M"
    assert human_size(23 * 128 * MiB) == "2.9G"
    assert human_size(4 * GiB + 256 * MiB) == "4.3G"
    assert human_size(21 * GiB) == "21G"
    assert human_size(0) == "0B"


# -- file formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "text"),
    [
        (128 * MiB, "8000000\n"),
        (256 * MiB, "10000000\n"),
        (1 * GiB, "40000000\n"),
        (2 * GiB, "80000000\n"),
    ],
)
def test_block_size_bytes_is_bare_hex(tmp_path: Path, block_size: int, text: str) -> None:
    write_sysfs_tree(MemoryManager(pages(4 * GiB), Geometry(block_size)), tmp_path)
    assert read(tmp_path, "block_size_bytes") == text


@pytest.mark.parametrize("policy", ["offline", "online", "online_kernel", "online_movable"])
def test_auto_online_blocks_file(tmp_path: Path, policy: str) -> None:
    mm = MemoryManager(pages(4 * GiB), Geometry(128 * MiB), auto_online_blocks=policy)
    write_sysfs_tree(mm, tmp_path)
    assert read(tmp_path, "auto_online_blocks") == policy + "\n"


def test_one_directory_per_block_named_without_padding(tmp_path: Path) -> None:
    write_sysfs_tree(added_offline(), tmp_path)
    names = {p.name for p in mem_dir(tmp_path).iterdir() if p.is_dir()}
    assert names == {f"memory{i}" for i in range(36)}
    assert sorted(os.listdir(mem_dir(tmp_path) / "memory5")) == [
        "node0",
        "online",
        "phys_device",
        "phys_index",
        "removable",
        "state",
        "valid_zones",
    ]


def test_state_and_online_files(tmp_path: Path) -> None:
    write_sysfs_tree(with_movable(), tmp_path)
    for block_id in (0, 31, 33, 34):
        assert read(tmp_path, f"memory{block_id}/state") == "online\n"
        assert read(tmp_path, f"memory{block_id}/online") == "1\n"
    for block_id in (32, 35):
        assert read(tmp_path, f"memory{block_id}/state") == "offline\n"
        assert read(tmp_path, f"memory{block_id}/online") == "0\n"


def test_phys_index_is_zero_padded_hex_block_id(tmp_path: Path) -> None:
    mm = boot_only()
    mm.add_memory(pages(4 * GiB), pages(128 * MiB))  # memory32
    mm.add_memory(255 * pages(128 * MiB), pages(128 * MiB))  # memory255
    mm.add_memory(4096 * pages(128 * MiB), pages(128 * MiB))  # memory4096 (512 GiB)
    write_sysfs_tree(mm, tmp_path)
    assert read(tmp_path, "memory0/phys_index") == "00000000\n"
    assert read(tmp_path, "memory10/phys_index") == "0000000a\n"
    assert read(tmp_path, "memory32/phys_index") == "00000020\n"
    assert read(tmp_path, "memory255/phys_index") == "000000ff\n"
    assert read(tmp_path, "memory4096/phys_index") == "00001000\n"


def test_phys_index_with_2gib_blocks(tmp_path: Path) -> None:
    write_sysfs_tree(two_gib_blocks(), tmp_path)
    assert [read(tmp_path, f"memory{i}/phys_index") for i in range(4)] == [
        "00000000\n",
        "00000001\n",
        "00000002\n",
        "00000003\n",
    ]


def test_phys_device_and_removable_for_every_block(tmp_path: Path) -> None:
    mm = with_movable()
    write_sysfs_tree(mm, tmp_path)
    for block_id in mm.blocks:
        assert read(tmp_path, f"memory{block_id}/phys_device") == "0\n"
        assert read(tmp_path, f"memory{block_id}/removable") == "1\n"


def test_valid_zones(tmp_path: Path) -> None:
    write_sysfs_tree(with_movable(), tmp_path)
    assert read(tmp_path, "memory0/valid_zones") == "Normal\n"
    assert read(tmp_path, "memory32/valid_zones") == "Normal Movable\n"
    assert read(tmp_path, "memory33/valid_zones") == "Movable\n"
    assert read(tmp_path, "memory34/valid_zones") == "Normal\n"


def test_valid_zones_movable_node_lists_movable_first(tmp_path: Path) -> None:
    write_sysfs_tree(movable_node(), tmp_path)
    assert read(tmp_path, "memory32/valid_zones") == "Movable Normal\n"


def test_valid_zones_none_for_block_spanning_zones(tmp_path: Path) -> None:
    mm = boot_only()
    mm.blocks[0].zone = None  # like memory0 spanning DMA/DMA32 on real x86
    write_sysfs_tree(mm, tmp_path)
    assert read(tmp_path, "memory0/valid_zones") == "none\n"


def test_node_symlinks(tmp_path: Path) -> None:
    mm = added_offline()
    write_sysfs_tree(mm, tmp_path)
    node0 = tmp_path / "sys/devices/system/node/node0"
    for block_id in mm.blocks:
        link = mem_dir(tmp_path) / f"memory{block_id}" / "node0"
        assert link.is_symlink()
        assert os.readlink(link) == "../../node/node0"
        assert link.resolve() == node0.resolve()
        back = node0 / f"memory{block_id}"
        assert os.readlink(back) == f"../../memory/memory{block_id}"
        assert back.resolve() == (mem_dir(tmp_path) / f"memory{block_id}").resolve()
    assert sorted(os.listdir(node0)) == sorted(f"memory{i}" for i in mm.blocks)


def test_block_moving_to_another_node_moves_its_links(tmp_path: Path) -> None:
    mm = added_offline()
    mm.blocks[33].nid = 1
    write_sysfs_tree(mm, tmp_path)
    nodes = tmp_path / "sys/devices/system/node"
    assert os.readlink(mem_dir(tmp_path) / "memory33/node1") == "../../node/node1"
    assert not (mem_dir(tmp_path) / "memory33/node0").is_symlink()
    assert os.listdir(nodes / "node1") == ["memory33"]
    assert "memory33" not in os.listdir(nodes / "node0")
    mm.blocks[33].nid = 0
    write_sysfs_tree(mm, tmp_path)
    assert sorted(
        n for n in os.listdir(mem_dir(tmp_path) / "memory33") if n.startswith("node")
    ) == ["node0"]
    assert os.listdir(nodes / "node1") == []
    assert "memory33" in os.listdir(nodes / "node0")


def test_file_modes_match_kernel_attributes(tmp_path: Path) -> None:
    write_sysfs_tree(boot_only(), tmp_path)

    def mode(rel: str) -> int:
        return stat.S_IMODE(os.lstat(mem_dir(tmp_path) / rel).st_mode)

    assert mode("block_size_bytes") == 0o444
    assert mode("auto_online_blocks") == 0o644
    assert mode("memory3/state") == 0o644
    assert mode("memory3/online") == 0o644
    for name in ("phys_index", "phys_device", "removable", "valid_zones"):
        assert mode(f"memory3/{name}") == 0o444
    assert mode("memory3") == 0o755


# -- sync behaviour -----------------------------------------------------------------------


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """path → (inode, mtime_ns, content or link target) for everything under root/sys."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root / "sys"):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if path.is_symlink():
                content = "-> " + os.readlink(path)
            elif path.is_dir():
                content = "<dir>"
            else:
                content = path.read_text()
            out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, content)
    return out


def test_rewrite_without_changes_touches_nothing(tmp_path: Path) -> None:
    mm = with_movable()
    write_sysfs_tree(mm, tmp_path)
    before = tree_snapshot(tmp_path)
    write_sysfs_tree(mm, tmp_path)
    assert tree_snapshot(tmp_path) == before
    assert not [p for p in before if Path(p).name.startswith(".")]


def test_changed_file_is_replaced_not_rewritten_in_place(tmp_path: Path) -> None:
    mm = added_offline()
    write_sysfs_tree(mm, tmp_path)
    state = mem_dir(tmp_path) / "memory32/state"
    phys_index = mem_dir(tmp_path) / "memory32/phys_index"
    state_ino, index_ino = state.stat().st_ino, phys_index.stat().st_ino
    mm.online_block(32, "online_movable")
    write_sysfs_tree(mm, tmp_path)
    assert state.read_text() == "online\n"
    assert read(tmp_path, "memory32/valid_zones") == "Movable\n"
    assert state.stat().st_ino != state_ino  # a new file renamed over the old one
    assert phys_index.stat().st_ino == index_ino  # unchanged: left alone
    assert not [n for n in os.listdir(state.parent) if n.startswith(".")]


def test_removed_block_disappears_on_rewrite(tmp_path: Path) -> None:
    mm = added_offline()
    write_sysfs_tree(mm, tmp_path)
    assert (mem_dir(tmp_path) / "memory33").is_dir()
    mm.remove_memory(pages(4 * GiB + 128 * MiB), pages(128 * MiB))
    write_sysfs_tree(mm, tmp_path)
    assert not (mem_dir(tmp_path) / "memory33").exists()
    node0 = tmp_path / "sys/devices/system/node/node0"
    assert not (node0 / "memory33").is_symlink()
    assert sorted(os.listdir(node0)) == sorted(f"memory{i}" for i in mm.blocks)
    assert not [n for n in os.listdir(mem_dir(tmp_path)) if n.startswith(".")]
    # Hot-adding it again brings it back, offline.
    mm.add_memory(pages(4 * GiB + 128 * MiB), pages(128 * MiB))
    write_sysfs_tree(mm, tmp_path)
    assert read(tmp_path, "memory33/state") == "offline\n"
    assert os.readlink(node0 / "memory33") == "../../memory/memory33"


def test_stale_block_directories_are_removed_other_entries_kept(tmp_path: Path) -> None:
    stale = mem_dir(tmp_path) / "memory99"
    stale.mkdir(parents=True)
    (stale / "state").write_text("online\n")
    node0 = tmp_path / "sys/devices/system/node/node0"
    node0.mkdir(parents=True)
    os.symlink("../../memory/memory99", node0 / "memory99")
    (mem_dir(tmp_path) / "uevent").write_text("")
    (node0 / "meminfo").write_text("x\n")
    write_sysfs_tree(boot_only(), tmp_path)
    assert not stale.exists()
    assert not (node0 / "memory99").is_symlink()
    assert (mem_dir(tmp_path) / "uevent").exists()
    assert (node0 / "meminfo").exists()


def test_state_write_then_rewrite_shows_new_state(tmp_path: Path) -> None:
    mm = added_offline()
    write_sysfs_tree(mm, tmp_path)
    sysfs_state_write(mm, 34, "online_movable\n")
    auto_online_blocks_write(mm, "online")
    write_sysfs_tree(mm, tmp_path)
    assert read(tmp_path, "memory34/state") == "online\n"
    assert read(tmp_path, "memory34/online") == "1\n"
    assert read(tmp_path, "memory34/valid_zones") == "Movable\n"
    assert read(tmp_path, "auto_online_blocks") == "online\n"


# -- real lsmem ---------------------------------------------------------------------------------


@needs_lsmem
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_lsmem_table(tmp_path: Path, scenario: str) -> None:
    write_sysfs_tree(SCENARIOS[scenario](), tmp_path)
    assert lsmem(tmp_path, "-o", ALL_COLUMNS) == EXPECTED_TABLES[scenario]


@needs_lsmem
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_lsmem_json_default_columns(tmp_path: Path, scenario: str) -> None:
    mm = SCENARIOS[scenario]()
    write_sysfs_tree(mm, tmp_path)
    assert json.loads(lsmem(tmp_path, "-J")) == expected_json(mm, all_columns=False)


@needs_lsmem
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_lsmem_json_all_columns(tmp_path: Path, scenario: str) -> None:
    mm = SCENARIOS[scenario]()
    write_sysfs_tree(mm, tmp_path)
    assert json.loads(lsmem(tmp_path, "-J", "-o", ALL_COLUMNS)) == expected_json(
        mm, all_columns=True
    )


@needs_lsmem
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_lsmem_summary_bytes(tmp_path: Path, scenario: str) -> None:
    mm = SCENARIOS[scenario]()
    write_sysfs_tree(mm, tmp_path)
    assert lsmem(tmp_path, "--summary=only", "-b") == expected_summary_bytes(mm)


@needs_lsmem
def test_lsmem_json_text_boot_only(tmp_path: Path) -> None:
    write_sysfs_tree(boot_only(), tmp_path)
    assert (
        lsmem(tmp_path, "-J")
        == """\
{
   "memory": [
      {
         "range": "0x0000000000000000-0x00000000ffffffff",
         "size": "4G",
         "state": "online",
         "removable": true,
         "block": "0-31"
      }
   ]
}
"""
    )


@needs_lsmem
def test_lsmem_default_columns_merge_across_zones(tmp_path: Path) -> None:
    # Without NODE/ZONES, memory33 (Movable) and memory34 (Normal) share one row.
    write_sysfs_tree(with_movable(), tmp_path)
    got = json.loads(lsmem(tmp_path, "-J"))["memory"]
    assert [(r["block"], r["state"], r["size"]) for r in got] == [
        ("0-31", "online", "4G"),
        ("32", "offline", "128M"),
        ("33-34", "online", "256M"),
        ("35", "offline", "128M"),
    ]


@needs_lsmem
def test_lsmem_follows_rewrites_of_the_same_root(tmp_path: Path) -> None:
    mm = added_offline()
    write_sysfs_tree(mm, tmp_path)
    assert lsmem(tmp_path, "-o", ALL_COLUMNS) == EXPECTED_TABLES["added_offline"]
    mm.remove_memory(pages(4 * GiB + 128 * MiB), pages(128 * MiB))
    write_sysfs_tree(mm, tmp_path)
    assert lsmem(tmp_path, "-o", ALL_COLUMNS) == EXPECTED_TABLES["removed_gap"]
    assert lsmem(tmp_path, "--summary=only", "-b") == expected_summary_bytes(mm)


@needs_lsmem
def test_lsmem_sees_going_offline_block(tmp_path: Path) -> None:
    mm = added_offline()
    mm.online_block(33)
    seen: dict[str, str] = {}

    def during_offline(action: MemoryAction, arg: MemoryNotify) -> int:
        if action == MEM_GOING_OFFLINE:
            write_sysfs_tree(mm, tmp_path)
            seen["state"] = read(tmp_path, "memory33/state")
            seen["online"] = read(tmp_path, "memory33/online")
            seen["json"] = lsmem(tmp_path, "-J")
            seen["summary"] = lsmem(tmp_path, "--summary=only", "-b")
            seen["expected_summary"] = expected_summary_bytes(mm)
        return NOTIFY_OK

    mm.notifier.register(during_offline, name="test")
    sysfs_state_write(mm, 33, "offline")
    assert seen["state"] == "going-offline\n"
    assert seen["online"] == "1\n"
    rows = json.loads(seen["json"])["memory"]
    assert {
        "range": "0x0000000108000000-0x000000010fffffff",
        "size": "128M",
        "state": "on->off",
        "removable": False,
        "block": "33",
    } in rows
    assert seen["summary"] == seen["expected_summary"]
    assert "Total offline memory:         536870912\n" in seen["summary"]
    write_sysfs_tree(mm, tmp_path)
    assert read(tmp_path, "memory33/state") == "offline\n"


@needs_lsmem
def test_concurrent_readers_never_see_partial_tree(tmp_path: Path) -> None:
    mm = added_offline()
    write_sysfs_tree(mm, tmp_path)
    stop = threading.Event()
    failures: list[str] = []
    lsmem_runs = [0]
    good_states = {"online\n", "offline\n"}
    removed_while_scanning = "lsmem: Failed to open memory35: No such file or directory\n"

    def lsmem_reader() -> None:
        while not stop.is_set():
            proc = subprocess.run(
                [LSMEM, "--sysroot", str(tmp_path), "-J", "-o", ALL_COLUMNS],
                capture_output=True,
                text=True,
                env=LSMEM_ENV,
                check=False,
            )
            if proc.stderr == removed_while_scanning:
                # memory35 went away between lsmem's scandir() and its opendir(): the
                # same race exists against a real kernel, no tree can hide it.
                continue
            if proc.returncode or proc.stderr:
                failures.append(f"lsmem rc={proc.returncode}: {proc.stderr}")
                continue
            for row in json.loads(proc.stdout)["memory"]:
                if row["state"] not in ("online", "offline") or row["node"] != 0:
                    failures.append(f"bad row {row}")
            lsmem_runs[0] += 1

    def file_reader() -> None:
        while not stop.is_set():
            for name in os.listdir(mem_dir(tmp_path)):
                if not name.startswith("memory"):
                    continue
                try:
                    text = (mem_dir(tmp_path) / name / "state").read_text()
                except FileNotFoundError:
                    continue  # the block was removed between listdir and open
                if text not in good_states:
                    failures.append(f"{name}/state read {text!r}")

    threads = [threading.Thread(target=lsmem_reader), threading.Thread(target=file_reader)]
    for t in threads:
        t.start()
    try:
        i = 0
        while i < 60 or lsmem_runs[0] < 10:
            block35 = pages(4 * GiB + 384 * MiB)
            if i % 2 == 0:
                mm.online_block(32)
            else:
                mm.offline_block(32)
            if i % 3 == 0:
                mm.remove_memory(block35, pages(128 * MiB))
            elif i % 3 == 1:
                mm.add_memory(block35, pages(128 * MiB))
            write_sysfs_tree(mm, tmp_path)
            i += 1
            assert i < 5000
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []


# -- write semantics: memoryN/state -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "zone"),
    [
        ("online", "Normal"),
        ("online\n", "Normal"),
        ("online_kernel", "Normal"),
        ("online_kernel\n", "Normal"),
        ("online_movable", "Movable"),
        ("online_movable\n", "Movable"),
        ("online_movable\0garbage", "Movable"),  # the C string ends at the NUL
    ],
)
def test_state_write_onlines(value: str, zone: str) -> None:
    mm = added_offline()
    sysfs_state_write(mm, 32, value)
    assert snapshot(mm.blocks[32]) == ("online", zone)


def test_state_write_online_uses_default_zone_of_movable_node() -> None:
    mm = movable_node()
    sysfs_state_write(mm, 32, "online")
    sysfs_state_write(mm, 33, "online_kernel")
    assert snapshot(mm.blocks[32]) == ("online", "Movable")
    assert snapshot(mm.blocks[33]) == ("online", "Normal")


@pytest.mark.parametrize("value", ["offline", "offline\n"])
def test_state_write_offlines(value: str) -> None:
    mm = added_offline()
    mm.online_block(32, "online_movable")
    sysfs_state_write(mm, 32, value)
    assert snapshot(mm.blocks[32]) == ("offline", None)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "\n",
        "Online",
        "ONLINE",
        " online",
        "online ",
        "online\n\n",
        "online\r\n",
        "\nonline",
        "onlin",
        "online_",
        "online-movable",
        "going-offline",
        "1",
        "0",
        "on",
    ],
)
def test_state_write_rejects_unknown_strings(value: str) -> None:
    mm = added_offline()
    mm.online_block(33)
    before = (snapshot(mm.blocks[32]), snapshot(mm.blocks[33]), mm.valid_zones(mm.blocks[32]))
    expect_errno(errno.EINVAL, lambda: sysfs_state_write(mm, 32, value))
    expect_errno(errno.EINVAL, lambda: sysfs_state_write(mm, 33, value))
    after = (snapshot(mm.blocks[32]), snapshot(mm.blocks[33]), mm.valid_zones(mm.blocks[32]))
    assert after == before


@pytest.mark.parametrize("value", ["online", "online_kernel", "online_movable"])
def test_state_write_online_when_online_is_einval(value: str) -> None:
    mm = with_movable()
    for block_id in (0, 33, 34):
        before = snapshot(mm.blocks[block_id])
        expect_errno(errno.EINVAL, partial(sysfs_state_write, mm, block_id, value))
        assert snapshot(mm.blocks[block_id]) == before


def test_state_write_offline_when_offline_is_einval() -> None:
    mm = added_offline()
    expect_errno(errno.EINVAL, lambda: sysfs_state_write(mm, 32, "offline\n"))
    assert snapshot(mm.blocks[32]) == ("offline", None)
    assert mm.stats.blocks_offlined == 0


def test_state_write_offline_failure_propagates_errno() -> None:
    mm = boot_only()  # memory0 holds reserved boot pages: cannot be offlined
    expect_errno(errno.EBUSY, lambda: sysfs_state_write(mm, 0, "offline"))
    assert snapshot(mm.blocks[0]) == ("online", "Normal")


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.EBUSY, errno.EPERM])
def test_state_write_online_veto_propagates_and_leaves_block_offline(err: int) -> None:
    mm = added_offline()
    inject = NotifierErrorInject(mm.notifier)
    inject.set(MEM_GOING_ONLINE, -err)
    zones_before = mm.valid_zones(mm.blocks[32])
    expect_errno(err, lambda: sysfs_state_write(mm, 32, "online_movable"))
    assert snapshot(mm.blocks[32]) == ("offline", None)
    assert mm.valid_zones(mm.blocks[32]) == zones_before
    inject.set(MEM_GOING_ONLINE, 0)
    sysfs_state_write(mm, 32, "online_movable")
    assert snapshot(mm.blocks[32]) == ("online", "Movable")


def test_state_write_offline_veto_propagates_and_leaves_block_online() -> None:
    mm = added_offline()
    mm.online_block(32, "online_movable")
    NotifierErrorInject(mm.notifier).set(MEM_GOING_OFFLINE, -errno.EAGAIN)
    expect_errno(errno.EAGAIN, lambda: sysfs_state_write(mm, 32, "offline"))
    assert snapshot(mm.blocks[32]) == ("online", "Movable")


def test_writes_to_missing_block_are_enoent() -> None:
    mm = removed_gap()
    expect_errno(errno.ENOENT, lambda: sysfs_state_write(mm, 33, "online"))
    expect_errno(errno.ENOENT, lambda: sysfs_online_write(mm, 33, "1"))
    expect_errno(errno.ENOENT, lambda: sysfs_state_write(mm, 1000, "offline"))
    assert 33 not in mm.blocks


def test_going_offline_block_write_semantics() -> None:
    # device_online/device_offline see dev->offline == false; memory_subsys_offline
    # then finds state != MEM_ONLINE.
    mm = added_offline()
    mm.online_block(32)
    mm.blocks[32].state = "going-offline"
    expect_errno(errno.EINVAL, lambda: sysfs_state_write(mm, 32, "offline"))
    expect_errno(errno.EINVAL, lambda: sysfs_state_write(mm, 32, "online"))
    expect_errno(errno.EINVAL, lambda: sysfs_online_write(mm, 32, "0"))
    sysfs_online_write(mm, 32, "1")
    assert snapshot(mm.blocks[32]) == ("going-offline", "Normal")


# -- write semantics: memoryN/online ------------------------------------------------------------


TRUE_VALUES = [
    "1",
    "1\n",
    "y",
    "Y",
    "yes",
    "t",
    "T",
    "true",
    "on",
    "On",
    "ON",
    "on\n",
    "10",
    "yolo",
]
FALSE_VALUES = ["0", "0\n", "n", "N", "no", "f", "F", "false", "off", "OFF", "of", "0x1", "nope"]


@pytest.mark.parametrize("value", TRUE_VALUES)
def test_online_write_true_onlines_in_default_zone(value: str) -> None:
    mm = added_offline()
    sysfs_online_write(mm, 32, value)
    assert snapshot(mm.blocks[32]) == ("online", "Normal")


@pytest.mark.parametrize("value", FALSE_VALUES)
def test_online_write_false_offlines(value: str) -> None:
    mm = added_offline()
    mm.online_block(32, "online_movable")
    sysfs_online_write(mm, 32, value)
    assert snapshot(mm.blocks[32]) == ("offline", None)


def test_online_write_default_zone_follows_policy() -> None:
    mm = movable_node()
    sysfs_online_write(mm, 32, "1")
    assert snapshot(mm.blocks[32]) == ("online", "Movable")


@pytest.mark.parametrize("value", ["", "\n", "2", "-1", " 1", "o", "o\n", "ox", "x", "\x00", "\t1"])
def test_online_write_rejects_non_booleans(value: str) -> None:
    mm = added_offline()
    mm.online_block(33)
    expect_errno(errno.EINVAL, lambda: sysfs_online_write(mm, 32, value))
    expect_errno(errno.EINVAL, lambda: sysfs_online_write(mm, 33, value))
    assert snapshot(mm.blocks[32]) == ("offline", None)
    assert snapshot(mm.blocks[33]) == ("online", "Normal")


def test_online_write_already_in_state_succeeds_without_change() -> None:
    mm = with_movable()
    onlined, offlined = mm.stats.blocks_onlined, mm.stats.blocks_offlined
    sysfs_online_write(mm, 33, "1")
    sysfs_online_write(mm, 0, "y")
    sysfs_online_write(mm, 32, "0")
    sysfs_online_write(mm, 35, "off")
    assert snapshot(mm.blocks[33]) == ("online", "Movable")
    assert snapshot(mm.blocks[0]) == ("online", "Normal")
    assert snapshot(mm.blocks[32]) == ("offline", None)
    assert snapshot(mm.blocks[35]) == ("offline", None)
    assert (mm.stats.blocks_onlined, mm.stats.blocks_offlined) == (onlined, offlined)


def test_online_write_failures_propagate_errno() -> None:
    mm = added_offline()
    expect_errno(errno.EBUSY, lambda: sysfs_online_write(mm, 0, "0"))
    assert snapshot(mm.blocks[0]) == ("online", "Normal")
    NotifierErrorInject(mm.notifier).set(MEM_GOING_ONLINE, -errno.ENOMEM)
    expect_errno(errno.ENOMEM, lambda: sysfs_online_write(mm, 32, "1"))
    assert snapshot(mm.blocks[32]) == ("offline", None)


# -- device_hotplug_lock ------------------------------------------------------------------------


def test_writes_while_an_online_is_suspended_must_be_retried() -> None:
    mm = added_offline()
    steps = mm.online_pages_steps(32, "online_movable")
    assert next(steps) == PHASE_CALLBACKS_DONE
    # Parsing comes first: bad strings fail with -EINVAL even now.
    expect_errno(errno.EINVAL, lambda: sysfs_state_write(mm, 33, "bogus"))
    expect_errno(errno.EINVAL, lambda: sysfs_online_write(mm, 0, "bogus"))
    with pytest.raises(HotplugLockBusy):
        sysfs_state_write(mm, 33, "online")
    with pytest.raises(HotplugLockBusy):
        sysfs_online_write(mm, 0, "1")  # even a no-op needs the lock
    with pytest.raises(HotplugLockBusy):
        sysfs_state_write(mm, 34, "offline")
    assert snapshot(mm.blocks[33]) == ("offline", None)
    for _ in steps:
        pass
    assert snapshot(mm.blocks[32]) == ("online", "Movable")
    sysfs_state_write(mm, 33, "online")
    assert mm.blocks[33].state == "online"


# -- auto_online_blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["offline", "online", "online_kernel", "online_movable"])
@pytest.mark.parametrize("suffix", ["", "\n"])
def test_auto_online_blocks_write_accepts_online_types(policy: str, suffix: str) -> None:
    mm = MemoryManager(pages(4 * GiB), Geometry(128 * MiB), auto_online_blocks="online_kernel")
    auto_online_blocks_write(mm, policy + suffix)
    assert mm.auto_online_blocks == policy


@pytest.mark.parametrize(
    "value", ["", "\n", "Online", "online\n\n", "on", "1", "online_kernel ", "movable", "auto"]
)
def test_auto_online_blocks_write_rejects_others(value: str) -> None:
    mm = boot_only()
    expect_errno(errno.EINVAL, lambda: auto_online_blocks_write(mm, value))
    assert mm.auto_online_blocks == "offline"


@needs_lsmem
def test_auto_online_blocks_applies_to_later_hot_adds(tmp_path: Path) -> None:
    mm = boot_only()
    auto_online_blocks_write(mm, "online_movable\n")
    mm.add_memory(pages(4 * GiB), pages(256 * MiB))
    write_sysfs_tree(mm, tmp_path)
    assert read(tmp_path, "auto_online_blocks") == "online_movable\n"
    assert (
        lsmem(tmp_path, "-o", ALL_COLUMNS)
        == """\
RANGE                                  SIZE  STATE REMOVABLE BLOCK NODE   ZONES
0x0000000000000000-0x00000000ffffffff    4G online       yes  0-31    0  Normal
0x0000000100000000-0x000000010fffffff  256M online       yes 32-33    0 Movable

Memory block size:       128M
Total online memory:     4.3G
Total offline memory:      0B
"""
    )


# -- helpers ----------------------------------------------------------------------------------


def test_sysfs_streq() -> None:
    assert sysfs_streq("online", "online")
    assert sysfs_streq("online\n", "online")
    assert sysfs_streq("online", "online\n")
    assert not sysfs_streq("online\n\n", "online")
    assert not sysfs_streq("online ", "online")
    assert sysfs_streq("online\0x", "online")


def test_kstrtobool() -> None:
    assert [kstrtobool(v) for v in TRUE_VALUES] == [True] * len(TRUE_VALUES)
    assert [kstrtobool(v) for v in FALSE_VALUES] == [False] * len(FALSE_VALUES)
    for bad in ("", "o", "2", " y"):
        expect_errno(errno.EINVAL, partial(kstrtobool, bad))
