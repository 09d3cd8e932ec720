"""The dependency rules of DESIGN.md, checked on the source (every import, at any depth).

- ``guest/mm`` imports nothing of the project outside itself (but the ``extents`` leaf)
  and no I/O or concurrency library;
- ``guest/drivers`` imports no I/O library either (sans-I/O protocol state machines);
- ``hypervisor`` and ``guest`` never import each other;
- ``memhp``'s base (everything but the CLI and the scenario runners) imports neither side;
- ``extents`` imports nothing of the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IO_LIBRARIES = {"asyncio", "grpc", "aiomqtt", "socket", "subprocess", "threading", "sqlite3"}
#: memhp modules that may wire both sides together (the top of memhp/).
MEMHP_TOP = ("memhp.cli", "memhp.ctl", "memhp.scenario", "memhp.demo", "memhp.watch")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(package: str) -> list[tuple[str, Path]]:
    out = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        out.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(("module", "path"), modules("guest.mm"))
def test_mm_is_pure(module: str, path: Path) -> None:
    for name in imports_of(path):
        assert top(name) not in IO_LIBRARIES, f"{module} imports {name}"
        if top(name) in ("guest", "hypervisor", "memhp"):
            assert name.startswith("guest.mm"), f"{module} imports {name}"


@pytest.mark.parametrize(("module", "path"), modules("guest.drivers"))
def test_drivers_are_sans_io(module: str, path: Path) -> None:
    for name in imports_of(path):
        assert top(name) not in IO_LIBRARIES, f"{module} imports {name}"
        assert top(name) != "hypervisor", f"{module} imports {name}"


@pytest.mark.parametrize(("module", "path"), modules("hypervisor"))
def test_hypervisor_never_imports_guest(module: str, path: Path) -> None:
    assert not any(top(n) == "guest" for n in imports_of(path)), module


@pytest.mark.parametrize(("module", "path"), modules("guest"))
def test_guest_never_imports_hypervisor(module: str, path: Path) -> None:
    assert not any(top(n) == "hypervisor" for n in imports_of(path)), module


@pytest.mark.parametrize(
    ("module", "path"),
    [(m, p) for m, p in modules("memhp") if not m.startswith(MEMHP_TOP)],
)
def test_memhp_base_imports_neither_side(module: str, path: Path) -> None:
    sides = {top(n) for n in imports_of(path)} & {"guest", "hypervisor"}
    assert not sides, f"{module} imports {sides}"


@pytest.mark.parametrize(("module", "path"), modules("extents"))
def test_extents_is_a_leaf(module: str, path: Path) -> None:
    project = {top(n) for n in imports_of(path)} & {"guest", "hypervisor", "memhp"}
    assert not project, f"{module} imports {project}"
