"""The compose topology as processes in network namespaces: one host per service instance.

:class:`Topology` makes a small network the root namespace has no part in: a bridge
in a switch namespace of its own, and one namespace per host joined to it by a veth
pair whose host end is ``eth0`` with an address in ``10.231.0.0/24``. Each host gets
``/etc/netns/NS/hosts`` naming every host (so ``hypervisor:50051`` and
``guest-1:50061`` resolve as in a compose network)
and an empty ``resolv.conf`` (no name lookup leaves the network). Every process runs
under ``ip netns exec``; a host with a hostname of its own (a guest replica) also
gets a UTS namespace (``unshare --uts``) and sets it, as a container does.

Nothing here opens a socket: every client runs inside a namespace. On exit, also
after a failure, every process started is stopped by its PID (SIGTERM, SIGKILL after
a grace period) and reaped, and the namespaces (with their veths), the
``/etc/netns`` entries and, when this run made them, ``/etc/netns`` and the
``/run/netns`` mount are removed. Namespace names carry the creating PID, so a run
that was killed outright is swept up by the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.231.0"
PREFIX_LEN = 24
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
#: Namespace names: ``memhp-t<pid>-<host>``; the PID tells a stale one.
NS_PREFIX = "memhp-t"
#: Environment variables a child does not inherit: no proxy (clients dial the
#: address they are given) and no VM id (a guest takes its hostname).
DROPPED_ENV = ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy", "MEMHP_VM_ID")


class TopologyError(Exception):
    """A step of the set-up failed, or a host did not become healthy."""


@dataclass
class Host:
    """One service instance: its namespace, its address, its names."""

    name: str
    service: str
    address: str
    netns: str
    #: Its own hostname (a UTS namespace), or None to keep the machine's.
    hostname: str | None = None


@dataclass
class Started:
    host: Host
    argv: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path
    exit_code: int | None = None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise TopologyError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def child_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in DROPPED_ENV and k.lower() not in DROPPED_ENV
    }
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces (and /etc/netns entries) of runs whose process is gone."""
    swept = []
    names = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    for name in names:
        if not name.startswith(NS_PREFIX):
            continue
        pid_text = name.removeprefix(NS_PREFIX).partition("-")[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            ip("netns", "del", name, check=False)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
            swept.append(name)
    return swept


@dataclass
class Topology:
    """See the module doc. Use as a context manager; ``hosts`` are (name, service) pairs."""

    hosts_wanted: list[tuple[str, str]]
    workdir: Path
    #: Hosts whose processes get a hostname of their own (the guest replicas).
    own_hostname: frozenset[str] = frozenset()
    hosts: dict[str, Host] = field(default_factory=dict)
    started: list[Started] = field(default_factory=list)
    switch: str = ""
    _made_netns_dir: bool = False
    _made_etc_netns: bool = False
    _namespaces: list[str] = field(default_factory=list)

    # -- set-up and teardown ---------------------------------------------------------

    def __enter__(self) -> Topology:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _setup(self) -> None:
        sweep_stale()
        self._made_netns_dir = not NETNS_DIR.exists()
        self._made_etc_netns = not ETC_NETNS.exists()
        tag = f"{NS_PREFIX}{os.getpid()}"
        self.switch = f"{tag}-switch"
        self._add_netns(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, service) in enumerate(self.hosts_wanted):
            host = Host(
                name,
                service,
                f"{SUBNET}.{10 + i}",
                f"{tag}-{name}",
                hostname=name if name in self.own_hostname else None,
            )
            self.hosts[name] = host
            self._add_netns(host.netns)
            # Made in the switch namespace with its peer put straight into the host's:
            # no link of this network ever exists in the root namespace.
            port = f"p{i}"
            ip(
                "-n", self.switch, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", host.netns,
            )  # fmt: skip
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            ip("-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "up")
        for host in self.hosts.values():
            self._write_etc(host)

    def _write_etc(self, host: Host) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        # Every instance by its name, and a service of one instance by the service's
        # name too. A scaled service's name (compose's DNS answers it with every
        # replica) is left out: nothing dials it, and gRPC's resolver (c-ares) merges
        # hosts lines that share a name, so "guest-2" would resolve to guest-1 too.
        replicas: dict[str, int] = {}
        for other in self.hosts.values():
            replicas[other.service] = replicas.get(other.service, 0) + 1
        for other in self.hosts.values():
            names = [other.name]
            if other.service != other.name and replicas[other.service] == 1:
                names.append(other.service)
            lines.append(f"{other.address}\t{' '.join(names)}")
        etc = ETC_NETNS / host.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("# memhp netns test: names come from hosts only\n")

    def close(self) -> None:
        """Stop every process, then remove what the set-up made (idempotent)."""
        self.stop_all()
        for name in reversed(self._namespaces):
            ip("netns", "del", name, check=False)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        self._namespaces.clear()
        if self._made_etc_netns and ETC_NETNS.is_dir() and not any(ETC_NETNS.iterdir()):
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()
        if self._made_netns_dir and NETNS_DIR.is_dir() and not any(NETNS_DIR.iterdir()):
            # The first `ip netns add` made /run/netns a mount point of itself.
            subprocess.run(["umount", str(NETNS_DIR)], capture_output=True, check=False)
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
        self._made_netns_dir = self._made_etc_netns = False

    # -- processes -----------------------------------------------------------------------

    def argv_in(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host`` (and under its own hostname, if it has one)."""
        if host.hostname is None:
            return ["ip", "netns", "exec", host.netns, *argv]
        # ip netns exec, unshare and sh all exec: the PID stays the program's.
        set_hostname = 'hostname "$1" && shift && exec "$@"'
        return [
            "ip", "netns", "exec", host.netns,
            "unshare", "--uts", "sh", "-c", set_hostname, "sh", host.hostname, *argv,
        ]  # fmt: skip

    def start(self, name: str, argv: list[str]) -> Started:
        """Start a long-running ``argv`` on host ``name``; output goes to a log file."""
        host = self.hosts[name]
        log_path = self.workdir / f"{name}.log"
        full = self.argv_in(host, argv)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                full,
                cwd=ROOT,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started = Started(host, full, process, log_path)
        self.started.append(started)
        return started

    def run(
        self, name: str, argv: list[str], timeout: float, stderr: IO[bytes] | int | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` on host ``name`` to completion (stdout captured)."""
        process = subprocess.Popen(
            self.argv_in(self.hosts[name], argv),
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr is None else stderr,
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            raise TopologyError(
                f"{name}: {' '.join(argv)} took more than {timeout} s:\n{out!r}\n{err!r}"
            ) from None
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def wait_healthy(self, name: str, check: list[str], timeout: float) -> int:
        """Run the health check ``check`` on host ``name`` until it passes; the tries."""
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            tries += 1
            result = self.run(name, check, timeout=max(5.0, timeout))
            if result.returncode == 0:
                return tries
            for s in self.started:
                if s.host.name == name and s.process.poll() is not None:
                    raise TopologyError(
                        f"{name} exited with {s.process.returncode}:\n{s.log_tail()}"
                    )
            if time.monotonic() > deadline:
                raise TopologyError(
                    f"{name} not healthy after {timeout} s ({' '.join(check)}): "
                    f"{result.stdout!r} {result.stderr!r}\n{self.logs(name)}"
                )
            time.sleep(0.3)

    def stop(self, started: Started, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status (kept)."""
        process = started.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        started.exit_code = process.returncode
        return process.returncode

    def stop_all(self) -> None:
        for started in reversed(self.started):
            self.stop(started)

    def logs(self, name: str | None = None) -> str:
        return "\n".join(
            f"--- {s.host.name} ({' '.join(s.argv[4:])}):\n{s.log_tail()}"
            for s in self.started
            if name is None or s.host.name == name
        )


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if found is None:
        raise TopologyError("mosquitto is not installed (.ci/run installs it)")
    return found


def memhp(*args: str) -> list[str]:
    """``memhp ARGS`` with this interpreter (the console script need not be on PATH)."""
    return [sys.executable, "-m", "memhp.cli", *args]
