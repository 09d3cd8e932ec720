"""Property tests of the whole in-process system: host session, DM messages, driver, model.

Random operation sequences (hot-add with partial backing, backing at the end or at
any offset, user-space onlining and offlining, slow onlinings, allocations, balloon
and unballoon, time passing) run through the scenario runner, and every invariant is
checked after every step:

* with a sound design (``callback`` or ``going-online``) and the ``fixed`` driver, no
  invariant may ever break and the host may never see a protocol error;
* with ``online-then-reclaim``, every allocation that lands in an onlining window and
  takes a page the host does not back must be reported as ``unbacked-allocated`` (and
  seen by the host as ``unbacked-access``): reported, never missed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extents import RangeSet
from memhp.scenario.runner import ScenarioRunner, StepFailed
from memhp.scenario.spec import Scenario, Step, VmSpec

MiB = 1 << 20
BLOCK = 128 * MiB
PAGE = 4096


def _ops(window: bool) -> st.SearchStrategy[list[tuple[str, dict[str, Any]]]]:
    page_sizes = st.integers(1, 3 * BLOCK // PAGE).map(lambda p: p * PAGE)
    op = st.one_of(
        st.tuples(
            st.just("hot_add"),
            st.integers(1, 4).flatmap(
                lambda blocks: st.fixed_dictionaries(
                    {
                        "region": st.just(blocks * BLOCK),
                        "backed": st.integers(1, blocks * BLOCK // PAGE).map(lambda p: p * PAGE),
                    }
                )
            ),
        ),
        st.tuples(st.just("back"), st.fixed_dictionaries({"size": page_sizes})),
        st.tuples(
            st.just("back"),
            st.fixed_dictionaries(
                {
                    "size": page_sizes,
                    "offset": st.integers(0, 4 * BLOCK // PAGE).map(lambda p: p * PAGE),
                }
            ),
        ),
        st.tuples(
            st.just("online"),
            st.fixed_dictionaries(
                {
                    "block": st.integers(8, 24),
                    "type": st.sampled_from(["online", "online_kernel", "online_movable"]),
                }
            ),
        ),
        st.tuples(st.just("offline"), st.fixed_dictionaries({"block": st.integers(8, 24)})),
        st.tuples(
            st.just("allocate"),
            st.fixed_dictionaries(
                {
                    "size": st.sampled_from([MiB, 16 * MiB, 64 * MiB, 256 * MiB]),
                    "order": st.integers(0, 10),
                    "zone": st.sampled_from(["Normal", "Movable"]),
                    "tag": st.sampled_from(["a", "b"]),
                    "in_window": st.just(True) if window else st.booleans(),
                }
            ),
        ),
        st.tuples(st.just("free"), st.fixed_dictionaries({"tag": st.sampled_from(["a", "b"])})),
        st.tuples(
            st.just("balloon"),
            st.fixed_dictionaries({"size": st.sampled_from([2 * MiB, 64 * MiB, 300 * MiB])}),
        ),
        st.tuples(st.just("unballoon"), st.fixed_dictionaries({"size": st.just(2 * MiB)})),
        st.tuples(
            st.just("inject"),
            st.fixed_dictionaries(
                {"slow_onlining": st.sampled_from([0.5, 3.0, 6.0]), "count": st.just(1)}
            ),
        ),
        st.tuples(
            st.just("advance"), st.fixed_dictionaries({"seconds": st.sampled_from([0.3, 6.0])})
        ),
    )
    first = st.tuples(
        st.just("hot_add"),
        st.fixed_dictionaries(
            {
                "region": st.just(4 * BLOCK),
                "backed": st.integers(1, 4 * BLOCK // PAGE).map(lambda p: p * PAGE),
            }
        ),
    )
    return st.tuples(first, st.lists(op, min_size=3, max_size=25)).map(lambda t: [t[0], *t[1]])


vm_configs = st.fixed_dictionaries(
    {
        "auto_online": st.sampled_from(["offline", "online", "online_movable"]),
        "udev_online": st.sampled_from([None, "online", "online_movable"]),
        "onlining_delay": st.sampled_from([0.0, 0.5, 4.5]),
    }
)


def _run(
    strategy: str, mode: str, config: dict[str, Any], ops: list[tuple[str, dict[str, Any]]]
) -> ScenarioRunner:
    vm = VmSpec(
        id="g",
        boot_memory=1 << 30,
        max_memory=4 << 30,
        strategy=strategy,
        driver_mode=mode,
        **config,
    )
    steps = []
    for i, (kind, args) in enumerate(ops):
        a = dict(args)
        if kind != "advance":
            a["vm"] = "g"
        steps.append(Step(kind, a, i + 1, i))
    scenario = Scenario("<hypothesis>", "random", "", 0, "default", [vm], steps)
    return ScenarioRunner(scenario)


def _play(runner: ScenarioRunner, after_step: Any = None) -> None:
    """Run each step; the host or the guest may refuse one (bad for this state): skip it."""
    for node in runner.nodes.values():
        node.guest.start()
    runner.settle()
    runner.check()
    for step in runner.scenario.steps:
        runner.current_step = step.label
        with contextlib.suppress(StepFailed):
            runner._run_step(step)
        runner.settle()
        runner.check()
        if after_step is not None:
            after_step(runner, step)


PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("MEMHP_PROPERTY_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _racy_start() -> st.SearchStrategy[list[tuple[str, dict[str, Any]]]]:
    """An allocator armed for the next Movable onlining window, then a partly backed region."""
    return st.integers(1, 4 * BLOCK // PAGE - 1).map(
        lambda backed: [
            ("allocate", {"size": 1 << 30, "zone": "Movable", "tag": "a", "in_window": True}),
            ("hot_add", {"region": 4 * BLOCK, "backed": backed * PAGE}),
        ]
    )


def _gap_start() -> st.SearchStrategy[list[tuple[str, dict[str, Any]]]]:
    """A region, backing at an offset that leaves a gap, then backing inside that gap."""

    def build(t: tuple[int, int, int, int]) -> list[tuple[str, dict[str, Any]]]:
        backed, gap, into, size = t
        return [
            ("hot_add", {"region": 4 * BLOCK, "backed": backed * PAGE}),
            ("back", {"offset": (backed + gap) * PAGE, "size": size * PAGE}),
            ("back", {"offset": (backed + into % gap) * PAGE, "size": 1 * PAGE}),
        ]

    quarter = BLOCK // PAGE
    return st.tuples(
        st.integers(1, quarter),
        st.integers(1, quarter),
        st.integers(0, quarter),
        st.integers(1, quarter),
    ).map(build)


movable_configs = st.fixed_dictionaries(
    {
        "auto_online": st.sampled_from(["offline", "online_movable"]),
        "udev_online": st.just("online_movable"),
        "onlining_delay": st.sampled_from([0.0, 0.5, 4.5]),
    }
)


@PROPERTY_SETTINGS
@given(
    strategy=st.sampled_from(["callback", "going-online"]),
    config=st.one_of(vm_configs, movable_configs),
    ops=st.one_of(
        _ops(window=False),
        st.tuples(_gap_start(), _ops(window=False)).map(lambda t: t[0] + t[1][1:]),
        st.tuples(_racy_start(), _ops(window=True)).map(lambda t: t[0] + t[1][1:]),
    ),
)
def test_sound_designs_keep_every_invariant(
    strategy: str, config: dict[str, Any], ops: list[tuple[str, dict[str, Any]]]
) -> None:
    runner = _run(strategy, "fixed", config, ops)
    _play(runner)
    node = runner.nodes["g"]
    assert [(v.invariant, v.step, v.message) for v in node.violations] == [], "\n".join(node.events)
    assert node.guest.mm.check() == []


@PROPERTY_SETTINGS
@given(
    config=movable_configs,
    ops=st.tuples(_racy_start(), _ops(window=True)).map(lambda t: t[0] + t[1][1:]),
)
def test_online_then_reclaim_race_is_always_reported(
    config: dict[str, Any], ops: list[tuple[str, dict[str, Any]]]
) -> None:
    runner = _run("online-then-reclaim", "fixed", config, ops)
    raced: list[str] = []

    def after(runner: ScenarioRunner, step: Step) -> None:
        node = runner.nodes["g"]
        guest = node.guest
        # Independently of the checker: did a window allocation take unbacked pages?
        for armed in list(getattr(guest, "_window_done", [])):
            unbacked = RangeSet()
            for s, e in armed.result:
                for hs, he in node.host.backed.holes(s, e):
                    unbacked.add(hs, he)
            if unbacked:
                raced.append(step.label)
                reported = {v.invariant for v in node.violations}
                assert "unbacked-allocated" in reported, step.label
                assert "unbacked-access" in reported, step.label
        guest._window_done = []  # type: ignore[attr-defined]

    node = runner.nodes["g"]
    original = node.guest._on_phase

    def spy(block: Any, phase: str) -> None:
        pending = [a for a in node.guest.window_allocations]
        original(block, phase)
        done = [a for a in pending if a.done]
        node.guest.__dict__.setdefault("_window_done", []).extend(done)

    node.guest.mm.phase_hooks[node.guest.mm.phase_hooks.index(original)] = spy
    _play(runner, after)
    event("window allocation took unbacked pages" if raced else "no unbacked page taken")


@PROPERTY_SETTINGS
@given(
    config=vm_configs,
    ops=st.tuples(_gap_start(), _ops(window=False)).map(lambda t: t[0] + t[1][1:]),
)
def test_upstream_backing_into_a_gap_is_always_reported(
    config: dict[str, Any], ops: list[tuple[str, dict[str, Any]]]
) -> None:
    """Upstream hv_balloon mishandles backing that starts inside a gap (E2): every time a
    request does that, the checker must say so."""
    runner = _run("callback", "upstream", config, ops)
    node = runner.nodes["g"]
    triggers: list[str] = []
    original_deliver = node.guest.deliver

    def deliver(msg: Any) -> None:
        # Look at each hot-add request as the guest gets it: does it start in a gap?
        rng = getattr(msg, "range", None)
        if rng is not None and getattr(msg, "region", None) is None:
            for has in node.guest.driver.ha_regions:
                if has.start_pfn <= rng.start_page < has.end_pfn:
                    if rng.start_page < has.covered_end_pfn:
                        triggers.append(runner.current_step)
                    break
        original_deliver(msg)

    node.guest.deliver = deliver  # type: ignore[method-assign]

    def after(runner: ScenarioRunner, step: Step) -> None:
        if triggers and triggers[-1] == step.label:
            reported = {(v.invariant, v.step) for v in node.violations}
            assert ("region-bookkeeping", step.label) in reported, step.label

    _play(runner, after)
    event("backing into a gap" if triggers else "no backing into a gap")
