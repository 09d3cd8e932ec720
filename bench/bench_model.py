"""Benchmark of the in-process model: a 16 TiB guest, grown by 4 TiB, then churned.

A guest boots with 12 TiB and 2 GiB memory blocks and grows by 4 TiB in hot-add
requests (32 GiB regions) whose backing is not block-aligned, so every request
leaves a partially backed block; the kernel onlines every block (auto_online).
Then the rest of every region is backed and onlined with generic_online_page.
Then allocation churn: random sizes, orders and zones, allocated and freed.

It runs through the scenario runner (host session, DM messages, hv_balloon
driver, memory model) under the virtual clock, and prints a table: modeled GiB
onlined per CPU-second, churn operations per second, the cost of one full
invariant check, and the peak RSS of the process. ``--json`` prints the same
figures as JSON.

Beside it, virtio-mem: a guest with a 1 TiB virtio-mem device of 2 MiB device blocks
is resized from 0 to 1 TiB in one step (QEMU's ``requested-size``), through the
same runner (the QEMU device model, virtio-mem requests, the Linux virtio_mem driver
in Sub Block Mode, the memory model), every block auto-onlined to ZONE_MOVABLE;
once with 128 MiB Linux memory blocks (a VM under 64 GiB of boot memory), once with
2 GiB ones (as the Hyper-V figures above).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from typing import Any

from machine import describe

from memhp.scenario.runner import ScenarioRunner
from memhp.scenario.spec import parse_scenario

GiB = 1 << 30
BOOT = 12 << 40
GROWTH = 4 << 40
REGION = 32 * GiB
BLOCK = 2 * GiB
#: Backing of each request: 28.5 GiB of a 32 GiB region, so the 15th 2 GiB block is a
#: quarter backed and the 16th is not added until the rest is backed.
BACKED = REGION - (1536 << 20) - BLOCK
CHURN_OPS = 2000


def scenario_text(steps: list[str]) -> str:
    return "\n".join(
        [
            "name: bench-16t",
            "vms:",
            "  - id: big",
            f"    boot_memory: {BOOT}",
            f"    max_memory: {BOOT + GROWTH}",
            "    block_size: 2G",
            "    strategy: callback",
            "    driver_mode: upstream",
            "    auto_online: online_movable",
            "steps:",
            *steps,
        ]
    )


def machine() -> str:
    return describe()


def run(churn_ops: int, seed: int) -> dict[str, Any]:
    regions = GROWTH // REGION
    backed = BACKED
    grow = [f"  - hot_add: {{vm: big, region: {REGION}, backed: {backed}}}" for _ in range(regions)]
    back = [
        f"  - back: {{vm: big, region: {i}, offset: {backed}, size: {REGION - backed}}}"
        for i in range(regions)
    ]
    rng = random.Random(seed)
    churn: list[str] = []
    for i in range(churn_ops // 2):
        order = rng.randrange(0, 11)
        size = rng.choice([1 << 20, 16 << 20, 256 << 20, GiB, 8 * GiB])
        zone = rng.choice(["Normal", "Movable"])
        churn.append(
            f"  - allocate: {{vm: big, size: {size}, order: {order}, zone: {zone}, tag: t{i % 64}}}"
        )
        churn.append(f"  - free: {{vm: big, tag: t{rng.randrange(64)}, size: {size // 2}}}")

    def timed(
        steps: list[str], runner: ScenarioRunner | None
    ) -> tuple[ScenarioRunner, float, float]:
        if runner is None:
            scenario = parse_scenario(scenario_text(steps))
            runner = ScenarioRunner(scenario, check_every_step=False)
            for node in runner.nodes.values():
                node.guest.start()
            runner.settle()
            scenario_steps = scenario.steps
        else:
            scenario_steps = parse_scenario(scenario_text(steps)).steps
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for step in scenario_steps:
            runner._run_step(step)
            runner.settle()
        return runner, time.process_time() - cpu0, time.perf_counter() - wall0

    runner, grow_cpu, grow_wall = timed(grow, None)
    node = runner.nodes["big"]
    c = node.guest.driver.counters

    def hot_added_online_bytes() -> int:
        blocks = node.guest.mm.blocks.values()
        return sum(BLOCK for b in blocks if not b.boot and b.state == "online")

    grown_bytes = hot_added_online_bytes()
    first_onlined = c.num_pages_onlined
    runner, back_cpu, back_wall = timed(back, runner)
    later_onlined = c.num_pages_onlined - first_onlined
    total_bytes = hot_added_online_bytes()
    runner, churn_cpu, churn_wall = timed(churn, runner)
    cpu0 = time.process_time()
    runner.check()
    check_cpu = time.process_time() - cpu0
    violations = [v.invariant for v in node.violations]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total_cpu = grow_cpu + back_cpu
    return {
        "machine": machine(),
        "guest": "12 TiB boot + 4 TiB hot-added, 2 GiB blocks",
        "hot_add_requests": regions,
        "grow_gib_onlined": grown_bytes // GiB,
        "grow_cpu_s": round(grow_cpu, 3),
        "grow_gib_per_cpu_s": round(grown_bytes / GiB / grow_cpu, 1),
        "back_requests": regions,
        "back_gib_onlined": round(later_onlined * 4096 / GiB, 3),
        "back_cpu_s": round(back_cpu, 3),
        "total_gib_onlined": total_bytes // GiB,
        "total_gib_onlined_per_cpu_s": round(total_bytes / GiB / total_cpu, 1),
        "churn_ops": churn_ops,
        "churn_ops_per_s": round(churn_ops / churn_cpu, 1),
        "full_check_cpu_s": round(check_cpu, 4),
        "page_map_runs": len(node.guest.mm.pages),
        "peak_rss_mb": round(rss_mb, 1),
        "violations": violations,
        "wall_s": round(grow_wall + back_wall + churn_wall, 3),
    }


VIRTIO_PLUG = 1 << 40


def virtio_scenario(boot: int, block: str) -> str:
    return "\n".join(
        [
            "name: bench-virtio-mem",
            "vms:",
            "  - id: v",
            f"    boot_memory: {boot}",
            f"    block_size: {block}",
            "    protocol: virtio-mem",
            "    auto_online: online_movable",
            f"    virtio_mem: {{region_size: {VIRTIO_PLUG}, block_size: 2M}}",
            "steps:",
            f"  - resize: {{vm: v, size: {VIRTIO_PLUG}}}",
        ]
    )


def run_virtio_mem(boot: int, block: str) -> dict[str, Any]:
    """Plug 1 TiB in 2 MiB device blocks (4 MiB subblocks) and time it."""
    scenario = parse_scenario(virtio_scenario(boot, block))
    runner = ScenarioRunner(scenario, check_every_step=False)
    for node in runner.nodes.values():
        node.guest.start()
    runner.settle()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    runner._run_step(scenario.steps[0])
    runner.settle()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    node = runner.nodes["v"]
    device = node.virtio
    driver = node.guest.virtio_mem[0]
    cpu0 = time.process_time()
    runner.check()
    check_cpu = time.process_time() - cpu0
    online = sum(1 for b in node.guest.mm.blocks.values() if not b.boot and b.state == "online")
    return {
        "guest": f"{boot >> 30} GiB boot, {block} memory blocks, 1 TiB virtio-mem device",
        "device_block_bytes": device.block_size,
        "driver_mode": driver.mode,
        "plug_requests": device.answered.get("plug:ack", 0),
        "memory_blocks_onlined": online,
        "gib_plugged": device.plugged_size >> 30,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "gib_per_cpu_s": round(device.plugged_size / (1 << 30) / cpu, 1),
        "full_check_cpu_s": round(check_cpu, 4),
        "violations": [v.invariant for v in node.violations],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--churn", type=int, default=CHURN_OPS)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    r = run(args.churn, args.seed)
    r["virtio_mem"] = run_virtio_mem(32 << 30, "128M")
    r["virtio_mem_2g_blocks"] = run_virtio_mem(64 << 30, "2G")
    r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    violations = r["violations"] + r["virtio_mem"]["violations"]
    violations += r["virtio_mem_2g_blocks"]["violations"]
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if not violations else 1
    v, v2 = r["virtio_mem"], r["virtio_mem_2g_blocks"]
    rows = [
        ("machine", r["machine"], ""),
        ("guest", r["guest"], ""),
        ("grow: hot-add requests", r["hot_add_requests"], ""),
        ("grow: GiB of memory blocks onlined", r["grow_gib_onlined"], ""),
        ("grow: CPU seconds", r["grow_cpu_s"], ""),
        ("grow: modeled GiB onlined per CPU-second", r["grow_gib_per_cpu_s"], ">= 1024"),
        ("back the rest: GiB onlined by generic_online_page", r["back_gib_onlined"], ""),
        ("back the rest: CPU seconds", r["back_cpu_s"], ""),
        ("grow + back: GiB of memory blocks onlined", r["total_gib_onlined"], "4096"),
        ("grow + back: GiB onlined per CPU-second", r["total_gib_onlined_per_cpu_s"], ">= 1024"),
        ("churn: alloc/free operations per second", r["churn_ops_per_s"], ""),
        ("one full invariant check: CPU seconds", r["full_check_cpu_s"], ""),
        ("page map runs at the end", r["page_map_runs"], ""),
        (
            "virtio-mem: plug 1 TiB in 2 MiB device blocks, in process (GiB/s)",
            v["gib_per_cpu_s"],
            "",
        ),
        ("virtio-mem: PLUG requests / CPU seconds", f"{v['plug_requests']} / {v['cpu_s']}", ""),
        (
            "virtio-mem, 2 GiB memory blocks: plug 1 TiB, in process (GiB/s)",
            v2["gib_per_cpu_s"],
            "",
        ),
        ("virtio-mem: one full invariant check (CPU s)", v["full_check_cpu_s"], ""),
        ("peak RSS (MB)", r["peak_rss_mb"], "< 200"),
        ("violations", ", ".join(violations) or "none", "none"),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'figure':<{width}}  {'value':>24}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value!s:>24}  {target}")
    return 0 if not violations else 1


if __name__ == "__main__":
    sys.exit(main())
