"""docker-compose.yml's topology, run as processes in network namespaces: a multi-host test.

No Docker engine runs here, so the compose project is played by processes, one
network namespace per service instance (``mosquitto``, ``hypervisor``, ``guest-1``,
``guest-2`` and a ``runner``), each with its own address on a bridge that lives in a
namespace of its own, and the service names resolvable through per-namespace hosts
files (:mod:`tests.netns.topology`). The commands are the compose file's: mosquitto
with the mounted config (listening on its namespace's address), the hypervisor's and
the guests' commands as written (the state file moved to a temporary directory), the
guests each in a UTS namespace with their hostname, so they take their VM id from it
and announce ``HOSTNAME:50061``. Services start in ``depends_on`` order, each
``service_healthy`` dependency checked with the service's own health check run in
its namespace. The runner (:mod:`tests.netns.driver`) then works the system by name
from its own namespace and prints JSON, asserted on here. Every process is started
with ``ip netns exec``; nothing is dialled from the root namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.compose_file import command, healthcheck, load, option_value
from tests.netns.topology import SUBNET, Topology, memhp, mosquitto_binary

MIB = 1 << 20
GIB = 1 << 30
PAGES_PER_MIB = 256
GUESTS = ("guest-1", "guest-2")
#: (host, compose service) for every instance, and the runner (no compose service).
HOSTS = [
    ("mosquitto", "mosquitto"),
    ("hypervisor", "hypervisor"),
    *((g, "guest") for g in GUESTS),
    ("runner", "runner"),
]


def start_order(services: dict[str, Any], names: list[str]) -> list[str]:
    """``names`` ordered so that every service comes after what it depends on."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {(*path, name)}"
        if name in order:
            return
        for dep in services[name].get("depends_on") or {}:
            visit(dep, (*path, name))
        order.append(name)

    for name in names:
        visit(name, ())
    return order


def probe_argv(argv: list[str]) -> list[str]:
    """A health check's argv as run here: ``memhp`` is this interpreter's."""
    return memhp(*argv[1:]) if argv[0] == "memhp" else argv


def mosquitto_config(services: dict[str, Any], address: str, path: Path) -> Path:
    """The mounted config with its listener on the namespace's own addresses.

    ``listener 1883`` binds every address of a container, which here is spelt out:
    ``address`` (what the other hosts dial) and the loopback (what the health check
    inside the namespace dials).
    """
    source = services["mosquitto"]["volumes"][0].partition(":")[0]
    lines = (Path(__file__).resolve().parents[2] / source).read_text().splitlines()
    assert "listener 1883" in lines
    out = []
    for line in lines:
        if line == "listener 1883":
            out += [f"listener 1883 {address}", "listener 1883 127.0.0.1"]
        else:
            out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path


def test_compose_topology_in_namespaces(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the netns topology test needs root (ip netns)"
    assert shutil.which("ip"), "the netns topology test needs iproute2's ip"
    services = load()["services"]

    hv_argv = command(services["hypervisor"])
    state = option_value(hv_argv, "--state")
    assert state is not None
    hv_argv[hv_argv.index(state)] = str(tmp_path / "state.db")
    guest_argv = command(services["guest"])

    with Topology(HOSTS, tmp_path, own_hostname=frozenset(GUESTS)) as topo:
        # The test network is not the root namespace's: no address, no route to it.
        root_addresses = subprocess.run(
            ["ip", "-o", "addr"], capture_output=True, text=True, check=True
        ).stdout
        assert f" {SUBNET}." not in root_addresses
        instances = {
            "mosquitto": {
                "mosquitto": [
                    mosquitto_binary(),
                    "-c",
                    str(
                        mosquitto_config(
                            services,
                            topo.hosts["mosquitto"].address,
                            tmp_path / "mosquitto.conf",
                        )
                    ),
                ]
            },
            "hypervisor": {"hypervisor": memhp(*hv_argv)},
            "guest": {g: memhp(*guest_argv) for g in GUESTS},
        }
        healthy: set[str] = set()

        def ensure_healthy(service: str) -> None:
            if service not in healthy:
                probe = probe_argv(healthcheck(services[service]))
                for host in instances[service]:
                    topo.wait_healthy(host, probe, timeout=30)
                healthy.add(service)

        order = start_order(services, ["guest"])
        assert order == ["mosquitto", "hypervisor", "guest"]
        for service in order:
            for dep, spec in (services[service].get("depends_on") or {}).items():
                if spec.get("condition") == "service_healthy":
                    ensure_healthy(dep)
            for host, argv in instances[service].items():
                topo.start(host, argv)
        for service in order:
            ensure_healthy(service)

        driver = [sys.executable, "-m", "tests.netns.driver"]
        driver += ["--hypervisor", option_value(guest_argv, "--hypervisor") or "?"]
        for g in GUESTS:
            driver += ["--guest", g]
        driver += ["--mqtt", "mosquitto:1883"]
        run = topo.run("runner", driver, timeout=120)
        report = run.stderr.decode(errors="replace")
        assert run.returncode == 0, f"{report}\n{topo.logs()}"
        data = json.loads(run.stdout)

        # Stop as compose does (dependants first); every service exits cleanly.
        by_host = {s.host.name: s for s in topo.started}
        for host in (*GUESTS, "hypervisor", "mosquitto"):
            code = topo.stop(by_host[host])
            assert code == 0, f"{host} exited with {code}:\n{by_host[host].log_tail()}"

    check_report(data)


def check_report(data: dict[str, Any]) -> None:
    assert set(data["health"].values()) == {"SERVING"}
    assert set(data["health"]) == {"hypervisor:50051", "guest-1:50061", "guest-2:50061"}

    # Each guest is the VM its hostname names, announced at HOSTNAME:50061.
    assert [(v["vm_id"], v["attached"], v["guest_address"]) for v in data["vms"]] == [
        (g, True, f"{g}:50061") for g in GUESTS
    ]
    boot = data["vms"][0]["boot_bytes"]
    block = data["vms"][0]["block_size_bytes"]
    assert (boot, block) == (4 * GIB, 128 * MIB)  # the hypervisor's defaults
    first_new = boot // block

    # 1 GiB region, 300 MiB backed: three blocks added and onlined by udev (Movable),
    # 84 MiB of the third left PageOffline.
    hot_add = data["after_hot_add"]
    assert hot_add["vm_id"] == "guest-1"
    assert hot_add["counters"] == {
        "num_pages_added": 300 * PAGES_PER_MIB,
        "num_pages_onlined": 300 * PAGES_PER_MIB,
        "num_pages_ballooned": 0,
    }
    assert hot_add["pages"]["page_offline"] == 84 * PAGES_PER_MIB
    assert hot_add["movable_blocks"] == [first_new, first_new + 1, first_new + 2]
    assert (hot_add["blocks"], hot_add["online_blocks"]) == (first_new + 3, first_new + 3)
    assert hot_add["lsmem_summary"] == {
        "block_size": 128 * MIB,
        "online": 4 * GIB + 384 * MIB,
        "offline": 0,
    }
    assert hot_add["host_added_pages"] == 300 * PAGES_PER_MIB
    assert hot_add["violations"] == []

    # 100 MiB more: 84 MiB of the third block online at once, 16 MiB in a fourth.
    back = data["after_back"]
    assert back["counters"]["num_pages_added"] == 400 * PAGES_PER_MIB
    assert back["counters"]["num_pages_onlined"] == 400 * PAGES_PER_MIB
    assert back["pages"]["page_offline"] == 112 * PAGES_PER_MIB
    assert back["movable_blocks"] == [first_new + i for i in range(4)]
    assert back["lsmem_summary"]["online"] == 4 * GIB + 512 * MIB
    assert back["host_actual_bytes"] == 4 * GIB + 400 * MIB
    assert back["violations"] == []
    assert [(r["block"], r["state"], r["zones"]) for r in back["lsmem"]] == [
        (f"0-{first_new - 1}", "online", "Normal"),
        (f"{first_new}-{first_new + 3}", "online", "Movable"),
    ]
    # memhp ctl blocks, the command line, on the runner: the same table.
    assert data["ctl_blocks"]["vm_id"] == "guest-1"
    assert data["ctl_blocks"]["memory"] == back["lsmem"]
    assert data["ctl_blocks"]["summary"] == back["lsmem_summary"]

    # guest-2 was left alone.
    other = data["others"]["guest-2"]
    assert other["vm_id"] == "guest-2"
    assert other["counters"]["num_pages_added"] == 0
    assert (other["blocks"], other["online_blocks"]) == (first_new, first_new)
    assert other["lsmem_summary"]["online"] == 4 * GIB

    # The broker is reachable from the runner by name and anonymous pub/sub works.
    assert data["mqtt"]["broker"] == "mosquitto:1883"
    assert data["mqtt"]["probe_returned"] is True
    # Both sides published through the broker in its own namespace: each VM's retained
    # state (hypervisor) and memory map (guest), and the events of the runner's story
    # (it subscribed after the attaches, so those are not among them).
    topics = data["mqtt"]["topics"]
    for g in GUESTS:
        assert f"memhp/v1/vm/{g}/state" in topics, sorted(topics)
        assert f"memhp/v1/vm/{g}/guest" in topics, sorted(topics)
    for kind in ("hot_add_request", "hot_add_response", "block_added", "pages_onlined"):
        assert f"memhp/v1/vm/guest-1/events/{kind}" in topics, sorted(topics)
