"""Generate the committed gRPC/protobuf code from proto/ (the one way to produce it).

    python scripts/gen_protos.py          # write memhp/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --check  # fail if the committed code differs (CI)

The protos live under proto/memhp/v1/ so that protoc's absolute imports
(``from memhp.v1 import dm_pb2``) are the package's own. It needs the pinned
generator versions below (the ``dev`` extra): the generated code then requires a
runtime at least that new (grpcio >= GRPCIO_TOOLS, protobuf >= its gencode).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = Path("memhp") / "v1"
GRPCIO_TOOLS = "1.85.1"
MYPY_PROTOBUF = "5.1.0"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    sources = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(s.relative_to(PROTO_ROOT)) for s in sources),
    ]
    # mypy-protobuf announces every file it writes; keep that noise out of CI's log.
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit("protoc failed")
    (out / PACKAGE / "__init__.py").write_text(
        '"""Generated from proto/memhp/v1 by scripts/gen_protos.py: do not edit."""\n'
    )
    return sorted(p.relative_to(out) for p in (out / PACKAGE).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    for name, pinned in (("grpcio-tools", GRPCIO_TOOLS), ("mypy-protobuf", MYPY_PROTOBUF)):
        if version(name) != pinned:
            sys.stderr.write(f"gen_protos: needs {name}=={pinned}, found {version(name)}\n")
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            target = ROOT / PACKAGE
            committed = sorted(p.relative_to(ROOT) for p in target.iterdir() if p.is_file())
            stale = [
                f
                for f in files
                if not (ROOT / f).exists()
                or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)
            ]
            stale += [f for f in committed if f not in files]
            if stale:
                sys.stderr.write(
                    "gen_protos: generated code differs from proto/ (run "
                    "scripts/gen_protos.py): " + ", ".join(map(str, stale)) + "\n"
                )
                return 1
            return 0
        target = ROOT / PACKAGE
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(tmp) / PACKAGE, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
