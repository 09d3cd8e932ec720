"""docker-compose.yml as the tests read it (the file checks and the netns topology).

The parsed file, each service's command and health check as an argv, and what this
branch of memhp can run of them. The compose file is written for the whole project:
it already uses ``--mqtt``, which lands from another branch. Until it does,
:func:`for_this_branch` drops a pending option that the subcommand does not have (and
says so), and refuses a pending subcommand with :class:`PendingCommand`.
Once the flag exists the command is parsed as written; a flag merged under another
spelling fails the parse instead of being dropped.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import yaml

from memhp.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
#: The image every memhp service runs (entrypoint ``memhp``).
MEMHP_IMAGE = "memhp-emu:latest"

#: Options a service's command may carry before the branch that brings them is merged.
PENDING_OPTIONS: dict[str, str] = {}
#: Subcommands the compose file runs that another branch brings (none now).
PENDING_COMMANDS: dict[str, str] = {}


class PendingCommand(Exception):
    """The service runs a memhp subcommand that another branch brings."""


def load(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def services(compose: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    data = load() if compose is None else compose
    result: dict[str, dict[str, Any]] = data["services"]
    return result


def is_memhp(service: dict[str, Any]) -> bool:
    return service.get("image") == MEMHP_IMAGE


def _argv(value: str | list[Any]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def command(service: dict[str, Any]) -> list[str]:
    """The service's ``command`` as an argv (what follows the image's entrypoint)."""
    return _argv(service["command"])


def healthcheck(service: dict[str, Any]) -> list[str]:
    """The health check's ``test`` as an argv (``CMD`` form, or a shell line split)."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = _argv(test)
    if kind == "CMD-SHELL":
        return shlex.split(" ".join(rest))
    assert kind == "CMD", f"health check test must start with CMD or CMD-SHELL: {test}"
    return rest


def option_value(argv: list[str], option: str) -> str | None:
    """The value of ``--option VALUE`` or ``--option=VALUE`` in ``argv`` (the last one)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.partition("=")[2]
    return value


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            choices: dict[str, argparse.ArgumentParser] = action.choices
            return choices
    raise AssertionError("memhp has no subcommands")


def for_this_branch(
    argv: list[str], parser: argparse.ArgumentParser | None = None
) -> tuple[list[str], list[str]]:
    """``memhp`` ``argv`` as this branch can run it, and the notes on what was dropped."""
    choices = subcommands(parser or build_parser())
    name = next((a for a in argv if a in choices or a in PENDING_COMMANDS), None)
    if name is None or name not in choices:
        if name is not None:
            branch = PENDING_COMMANDS[name]
            raise PendingCommand(f"memhp {name} comes with the {branch} branch (TODO)")
        return argv, []
    options = set(choices[name]._option_string_actions)
    out: list[str] = []
    dropped: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag = arg.partition("=")[0]
        stem = flag.lstrip("-")
        if i > argv.index(name) and flag in PENDING_OPTIONS and not any(stem in o for o in options):
            width = 1 if "=" in arg else 2
            dropped.append(
                f"{' '.join(argv[i : i + width])} (TODO: {PENDING_OPTIONS[flag]} branch)"
            )
            i += width
            continue
        out.append(arg)
        i += 1
    return out, dropped
