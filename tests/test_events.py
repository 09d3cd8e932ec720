"""memhp/events.py: topics, the envelope, the shipped schemas and the catalogue of kinds.

The catalogue is held to what the code really emits, three ways: every kind written as
a literal in ``hypervisor/`` and ``guest/`` is in it (with the right source); every
event the bundled scenarios produce in process is in it with only documented payload
fields; and the README's table is the catalogue's (``python scripts/events_table.py
--write`` rewrites it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from memhp import events
from memhp.scenario.runner import ScenarioRunner
from memhp.scenario.spec import load_scenario

ROOT = Path(__file__).resolve().parent.parent
README_START = "<!-- event-kinds:start -->"
README_END = "<!-- event-kinds:end -->"


# -- topics ---------------------------------------------------------------------------


def test_topics() -> None:
    assert events.event_topic("g1", "hot_add_request") == "memhp/v1/vm/g1/events/hot_add_request"
    assert events.state_topic("g-1.x") == "memhp/v1/vm/g-1.x/state"
    assert events.guest_topic("g1") == "memhp/v1/vm/g1/guest"
    assert events.ALL_VMS == "memhp/v1/vm/+/#"


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("memhp/v1/vm/g1/events/attach", events.Topic("g1", "events", "attach")),
        ("memhp/v1/vm/g1/state", events.Topic("g1", "state")),
        ("memhp/v1/vm/g1/guest", events.Topic("g1", "guest")),
        ("memhp/v1/vm/g1/other", None),
        ("memhp/v2/vm/g1/state", None),
        ("memhp/v1/vm/g1/events/a/b", None),
    ],
)
def test_parse_topic(topic: str, parsed: events.Topic | None) -> None:
    assert events.parse_topic(topic) == parsed


@pytest.mark.parametrize("vm", ["", "a/b", "a+", "#", "x\x00"])
def test_a_vm_id_that_is_not_one_topic_level_is_refused(vm: str) -> None:
    for topic in (events.state_topic, events.guest_topic):
        with pytest.raises(events.TopicError):
            topic(vm)
    with pytest.raises(events.TopicError):
        events.event_topic(vm, "attach")


# -- the envelope and the schemas -------------------------------------------------------


def test_envelope_is_valid_and_encodes_compactly() -> None:
    doc = events.envelope(
        vm="g1",
        kind="hot_add_request",
        source="host",
        seq=7,
        payload={"range": (1, 2), "region": None, "note": "é"},
        timestamp=1.5,
    )
    jsonschema.Draft202012Validator(events.schema("event")).validate(doc)
    assert (
        events.encode(doc)
        == (
            '{"version":1,"timestamp":1.5,"vm":"g1","kind":"hot_add_request","source":"host",'
            '"seq":7,"payload":{"range":[1,2],"region":null,"note":"é"}}'
        ).encode()
    )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"version": 2}, "version"),
        ({"source": "hypervisor"}, "source"),
        ({"seq": 0}, "seq"),
        ({"kind": "Bad-Kind"}, "kind"),
        ({"payload": []}, "payload"),
    ],
)
def test_event_schema_rejects(change: dict[str, Any], why: str) -> None:
    doc = events.envelope(vm="g", kind="k", source="guest", seq=1, payload={}, timestamp=0.0)
    doc.update(change)
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.Draft202012Validator(events.schema("event")).validate(doc)
    assert why in str(err.value.path) or why in err.value.message


@pytest.mark.parametrize("name", events.SCHEMA_NAMES)
def test_schemas_are_valid_draft_2020_12(name: str) -> None:
    s = events.schema(name)
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["properties"]["version"]["const"] == 1
    # Fields are only ever added: no schema closes its object.
    assert s.get("additionalProperties", True) is True


def test_schemas_ship_as_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "schema/*.json" in config["tool"]["setuptools"]["package-data"]["memhp"]
    shipped = sorted(p.stem for p in (ROOT / "memhp" / "schema").glob("*.json"))
    assert shipped == sorted(events.SCHEMA_NAMES)
    with pytest.raises(KeyError):
        events.schema("nope")


# -- the catalogue ------------------------------------------------------------------------


def test_catalogue_is_well_formed() -> None:
    keys = [(e.source, e.kind) for e in events.CATALOGUE]
    assert len(keys) == len(set(keys))
    for e in events.CATALOGUE:
        assert e.source in events.SOURCES
        events.event_topic("vm", e.kind)  # a valid topic level
        assert e.meaning and len(set(e.fields)) == len(e.fields)
    assert events.catalogue_entry("guest", "events_dropped") is not None
    assert events.catalogue_entry("host", "events_dropped") is not None
    assert events.catalogue_entry("host", "block_added") is None


def _literal_kinds(package: str) -> set[str]:
    """Kinds passed as string literals to the emitters of ``package``."""
    emitters = {"_emit", "_event", "_publish", "HostEvent", "offer_event"}
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name not in emitters:
                continue
            for arg in node.args[:2]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
                    break
    return found


@pytest.mark.parametrize(("package", "source"), [("hypervisor", "host"), ("guest", "guest")])
def test_every_kind_in_the_source_is_in_the_catalogue(package: str, source: str) -> None:
    kinds = _literal_kinds(package)
    assert len(kinds) > 15  # the scan finds the emitters
    missing = sorted(k for k in kinds if events.catalogue_entry(source, k) is None)
    assert not missing, f"{package} emits kinds the catalogue lacks: {missing}"


def test_every_event_of_the_bundled_scenarios_is_catalogued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[tuple[str, str], set[str]] = {}
    original = ScenarioRunner._trace

    def record(self: ScenarioRunner, node: Any, source: str, kind: str, data: Any) -> None:
        # The session's own "attach" at creation is never published: the hypervisor
        # drains it and publishes its richer "attach" when a guest really attaches.
        if (source, kind) != ("host", "attach"):
            fields = set(data) - {"vm_id"}  # the host process moves vm_id to the envelope
            seen.setdefault((source, kind), set()).update(fields)
        original(self, node, source, kind, data)

    monkeypatch.setattr(ScenarioRunner, "_trace", record)
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        ScenarioRunner(load_scenario(path)).run()
    # The scenarios cover both sides and the kinds this feature is about.
    for key in [
        ("host", "hot_add_request"),
        ("host", "hot_add_response"),
        ("guest", "block_added"),
        ("guest", "block_onlined"),
        ("guest", "pages_onlined"),
        ("guest", "unballooned"),
    ]:
        assert key in seen, key
    for (source, kind), fields in sorted(seen.items()):
        entry = events.catalogue_entry(source, kind)
        assert entry is not None, f"{source} event {kind!r} is not in the catalogue"
        undocumented = fields - set(entry.fields)
        assert not undocumented, f"{source} {kind}: payload fields {undocumented} undocumented"


def _readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    assert README_START in text and README_END in text, "README lacks the event-kinds markers"
    return text.split(README_START, 1)[1].split(README_END, 1)[0].strip("\n") + "\n"


def test_readme_table_is_the_catalogue() -> None:
    assert _readme_table() == events.markdown_table(), (
        "README's event table differs from memhp.events.CATALOGUE: "
        "run `python scripts/events_table.py --write`"
    )


def test_events_table_script_checks_the_readme() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "events_table.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
