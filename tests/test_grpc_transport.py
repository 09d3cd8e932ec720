"""The gRPC transport memhp picks (memhp/__init__.py): GRPC_EXPERIMENTS, set before gRPC loads.

Each case runs a fresh interpreter: gRPC reads the variable once, when it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import memhp

PROBE = "import os, memhp.cli; print(os.environ.get('GRPC_EXPERIMENTS', '<unset>'))"


def run_probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}


def test_memhp_turns_off_the_event_engine_transport_when_nothing_is_set() -> None:
    out = run_probe(clean_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == memhp.GRPC_EXPERIMENTS
    assert set(memhp.GRPC_EXPERIMENTS.split(",")) == {
        "-event_engine_client",
        "-event_engine_listener",
    }


def test_an_operator_setting_wins_even_an_empty_one() -> None:
    for value in ("", "-event_engine_client"):
        out = run_probe({**clean_env(), "GRPC_EXPERIMENTS": value})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == value


def test_the_package_sets_it_before_anything_loads_grpc() -> None:
    """Every memhp process imports the package first (``python -m memhp.cli``), so the
    package must set the variable without loading gRPC itself."""
    probe = "import os, sys, memhp; print('grpc' in sys.modules, os.environ['GRPC_EXPERIMENTS'])"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", memhp.GRPC_EXPERIMENTS]
