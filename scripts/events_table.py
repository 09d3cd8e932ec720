"""The README's table of event kinds, written from ``memhp.events.CATALOGUE``.

    python scripts/events_table.py          # print the table
    python scripts/events_table.py --check  # fail if README.md's table differs (a test runs it)
    python scripts/events_table.py --write  # rewrite README.md's table

The table sits in README.md between ``<!-- event-kinds:start -->`` and
``<!-- event-kinds:end -->``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START = "<!-- event-kinds:start -->"
END = "<!-- event-kinds:end -->"


def with_table(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    if START not in text or END not in text:
        raise SystemExit(f"{README.name}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from memhp.events import markdown_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if README.md differs")
    mode.add_argument("--write", action="store_true", help="rewrite README.md's table")
    args = parser.parse_args()
    table = markdown_table()
    if not (args.check or args.write):
        sys.stdout.write(table)
        return 0
    text = README.read_text()
    wanted = with_table(text, table)
    if args.write:
        README.write_text(wanted)
        return 0
    if wanted != text:
        sys.stderr.write(
            "README.md's event table differs from memhp.events.CATALOGUE; "
            "run: python scripts/events_table.py --write\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
