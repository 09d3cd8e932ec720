"""``memhp guest``'s command line: where the VM id comes from, the advertised address."""

from __future__ import annotations

import socket

import pytest

from guest.cli import VM_ID_ENV, advertised_address, resolve_vm_id
from memhp.cli import build_parser, main


def test_the_flag_wins_over_the_environment_and_the_hostname() -> None:
    assert resolve_vm_id("g1", {VM_ID_ENV: "from-env"}) == "g1"


def test_the_environment_comes_next() -> None:
    assert resolve_vm_id(None, {VM_ID_ENV: "from-env"}) == "from-env"


def test_the_hostname_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "guest-7")
    assert resolve_vm_id(None, {}) == "guest-7"
    # An empty variable is no variable: compose's ``MEMHP_VM_ID: ${VM:-}`` falls back.
    assert resolve_vm_id(None, {VM_ID_ENV: " "}) == "guest-7"


def test_an_empty_id_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--vm-id is empty"):
        resolve_vm_id("", {})
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    with pytest.raises(ValueError, match="no hostname"):
        resolve_vm_id(None, {})


def test_empty_vm_id_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guest", "--hypervisor", "127.0.0.1:1", "--vm-id", ""]) == 2
    assert "memhp guest: --vm-id is empty" in capsys.readouterr().err


def test_vm_id_is_optional() -> None:
    args = build_parser().parse_args(["guest", "--hypervisor", "hypervisor:50051"])
    assert args.vm_id is None


def test_a_wildcard_listen_address_is_announced_by_hostname(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "guest-1")
    assert advertised_address("0.0.0.0", 50061) == "guest-1:50061"
    assert advertised_address("[::]", 50061) == "guest-1:50061"
    assert advertised_address("10.0.0.5", 50061) == "10.0.0.5:50061"
