"""docker-compose.yml as the tests read it (the file checks and the netns topology).

The parsed file, and each service's command and health check as an argv.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
#: The image every memhp service runs (entrypoint ``memhp``).
MEMHP_IMAGE = "memhp-emu:latest"


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
