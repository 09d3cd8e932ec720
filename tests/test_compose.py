"""docker-compose.yml, the Dockerfile and the broker config, checked without a Docker engine.

The compose file is validated against the Compose Specification (check-jsonschema's
vendored schema; a broken copy must fail), its services are checked for what
``--scale guest=N`` and the health checks need, and every memhp command in it (each
service's and each health check's) goes through memhp's real argument parser, so a
misspelt flag fails here and not in a container.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from memhp.cli import build_parser
from tests.compose_file import (
    COMPOSE_FILE,
    DOCKERFILE,
    ROOT,
    command,
    healthcheck,
    is_memhp,
    load,
    option_value,
    services,
)

SCHEMA = "vendor.compose-spec"
MEMHP_SERVICES = sorted(name for name, s in services().items() if is_memhp(s))


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", SCHEMA, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def parse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """``memhp ARGV`` through the real parser; a parse error fails with argparse's message."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit:
        pytest.fail(f"memhp {' '.join(argv)}: exit {exit.code}: {capsys.readouterr().err}")


# -- the Compose Specification ----------------------------------------------------


def test_the_compose_file_is_valid() -> None:
    result = validate(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def _typo(compose: dict[str, Any]) -> None:
    compose["services"]["guest"]["healthchek"] = compose["services"]["guest"].pop("healthcheck")


def _bad_condition(compose: dict[str, Any]) -> None:
    compose["services"]["guest"]["depends_on"]["hypervisor"]["condition"] = "service_ready"


def _ports_as_mapping(compose: dict[str, Any]) -> None:
    compose["services"]["hypervisor"]["ports"] = {"50051": "50051"}


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_typo, "'healthchek' was unexpected"),
        (_bad_condition, "'service_ready' is not one of"),
        (_ports_as_mapping, "is not of type 'array'"),
    ],
)
def test_a_broken_copy_fails(breakage: Any, message: str, tmp_path: Path) -> None:
    broken = copy.deepcopy(load())
    breakage(broken)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = validate(path)
    assert result.returncode == 1, result.stdout
    assert message in result.stdout


def test_compose_spec_form() -> None:
    compose = load()
    assert "version" not in compose  # obsolete in the Compose Specification
    assert compose["name"] == "memhp"
    # The merge key was resolved: every memhp service builds the one image.
    for name in MEMHP_SERVICES:
        assert services()[name]["build"] == "."


# -- what the services need ----------------------------------------------------------


def test_the_guest_scales() -> None:
    guest = services()["guest"]
    # Each of these would make replicas collide (a name, a host port, one VM id).
    for key in ("container_name", "hostname", "ports"):
        assert key not in guest, key
    assert option_value(command(guest), "--vm-id") is None
    environment = guest.get("environment") or {}
    assert "MEMHP_VM_ID" not in str(environment)
    # It announces its hostname: it listens on every address of its container.
    assert option_value(command(guest), "--listen") == "0.0.0.0:50061"
    assert option_value(command(guest), "--hypervisor") == "hypervisor:50051"
    assert guest["depends_on"]["hypervisor"]["condition"] == "service_healthy"


def test_the_hypervisor_keeps_its_state_on_a_volume() -> None:
    compose = load()
    hv = compose["services"]["hypervisor"]
    state = option_value(command(hv), "--state")
    assert state is not None
    volume, _, target = hv["volumes"][0].partition(":")
    assert Path(state).parent == Path(target)
    assert volume in compose["volumes"]
    assert option_value(command(hv), "--listen") == "0.0.0.0:50051"


def test_every_server_has_a_health_check() -> None:
    for name in ("mosquitto", "hypervisor", "guest"):
        service = services()[name]
        assert "healthcheck" in service, name
        for key in ("interval", "timeout", "retries"):
            assert key in service["healthcheck"], (name, key)


@pytest.mark.parametrize("name", ["hypervisor", "guest"])
def test_health_checks_ask_grpc_health_on_the_listen_port(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    service = services()[name]
    probe = healthcheck(service)
    assert probe[:2] == ["memhp", "health"]
    args = parse(probe[1:], capsys)
    listen = option_value(command(service), "--listen")
    assert listen is not None
    assert args.address == "127.0.0.1:" + listen.rpartition(":")[2]


def test_mosquitto_allows_the_demos_anonymous_listener() -> None:
    mosquitto = services()["mosquitto"]
    assert mosquitto["image"] == "eclipse-mosquitto:2"
    source, _, target = mosquitto["volumes"][0].partition(":")
    assert target.removesuffix(":ro") == "/mosquitto/config/mosquitto.conf"
    lines = (ROOT / source).read_text().splitlines()
    assert "listener 1883" in lines
    assert "allow_anonymous true" in lines
    probe = healthcheck(mosquitto)
    assert probe[0] == "mosquitto_pub"
    assert option_value(probe, "-p") == "1883"
    for name in ("hypervisor", "guest"):
        mqtt = option_value(command(services()[name]), "--mqtt")
        assert mqtt == "mqtt://mosquitto:1883", name


def test_profiles() -> None:
    svc = services()
    for name in ("mosquitto", "hypervisor", "guest"):
        assert "profiles" not in svc[name], name
    assert svc["watch"]["profiles"] == ["view"]
    assert svc["watch"]["tty"] is True
    assert command(svc["watch"]) == ["watch", "--hypervisor", "hypervisor:50051"]
    assert svc["scenario"]["profiles"] == ["scenario"]
    scenario = command(svc["scenario"])
    assert scenario[:2] == ["scenario", "run"] and "--processes" in scenario
    assert (ROOT / scenario[2]).is_file()


# -- every memhp command through memhp's own parser -------------------------------------


@pytest.mark.parametrize("name", MEMHP_SERVICES)
def test_service_command_parses(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(command(services()[name]), capsys)
    assert callable(args.func)


def test_a_misspelt_flag_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    argv = command(services()["hypervisor"])
    argv[argv.index("--listen")] = "--listn"
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --listn"):
        parse(argv, capsys)


# -- the image ------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_the_dockerfile() -> None:
    steps = _dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    user = [rest for instruction, rest in steps if instruction == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["memhp"]') in steps
    assert any(i == "RUN" and "pip install /src" in rest for i, rest in steps)


def test_the_image_gets_every_package_and_the_scenarios() -> None:
    """COPY sources exist, are not in .dockerignore, and cover pyproject's packages."""
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for instruction, rest in _dockerfile():
        if instruction == "COPY":
            for source in rest.split()[:-1]:
                name = source.rstrip("/")
                assert (ROOT / name).exists(), name
                assert not any(fnmatch.fnmatch(name, p) for p in ignored), name
                copied.add(name)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.removesuffix("*") in copied, pattern
    assert {"pyproject.toml", "README.md", "scenarios"} <= copied
