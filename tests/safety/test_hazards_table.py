"""The hazard table stays true: its Markdown is its rendering, every test and code
reference it names exists, every stop cause is under a hazard, every hazard has a
test that injects its cause — and the check does fail when a test is renamed."""

from __future__ import annotations

import shutil
from pathlib import Path

import hazards_table as ht

from pbmd.daemon.core.safety import EndCause, TripCause


def test_the_markdown_is_the_rendering_of_the_source() -> None:
    table = ht.load()
    expected = ht.render(table, ht.registry_messages())
    assert ht.RENDERED.read_text(encoding="utf-8") == expected, (
        "docs/safety/hazards.md is not the rendering of hazards.toml: run "
        ".venv/bin/python tests/safety/hazards_table.py --write"
    )


def test_every_named_test_exists() -> None:
    assert ht.missing_tests(ht.load()) == []


def test_every_code_reference_resolves() -> None:
    assert ht.unresolved_code(ht.load()) == []


def test_every_stop_cause_of_the_registry_is_under_a_hazard() -> None:
    codes = [c.code for c in [*TripCause, *EndCause]]
    assert ht.uncovered_causes(ht.load(), codes) == []


def test_every_hazard_has_an_injecting_test_and_the_issue_s_hazards_are_there() -> None:
    table = ht.load()
    assert ht.untested_hazards(table) == []
    titles = " ".join(h["title"].lower() for h in table.hazards)
    for words in (
        "too long", "too much power", "wrong fluence", "twice", "underdose",
        "record", "wrong port", "wavelength", "applicator", "indicator", "emission delay",
        "resumed by itself", "eyes", "burn", "stale", "tampered", "unauthorised",
        "contraindicated", "host is slow or dead", "stuck emitter", "photodiode",
    ):  # fmt: skip
        assert words in titles, f"no hazard about {words!r}"


def test_a_renamed_test_is_reported_missing(tmp_path: Path) -> None:
    """A copy of the tests tree in which one referenced test is renamed: the check
    names it. And a table that names a test id that was changed: the same."""
    table = ht.load()
    node_id = "tests/engine/test_trips.py::test_fluence_ceiling"
    assert node_id in ht.named_tests(table)
    module = tmp_path / "tests" / "engine" / "test_trips.py"
    module.parent.mkdir(parents=True)
    for path_text in {n.partition("::")[0] for n in ht.named_tests(table)}:
        target = tmp_path / path_text
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ht.ROOT / path_text, target)
    assert ht.missing_tests(table, tmp_path) == []
    text = module.read_text(encoding="utf-8")
    module.write_text(
        text.replace("def test_fluence_ceiling(", "def test_fluence_ceiling_renamed("),
        encoding="utf-8",
    )
    missing = ht.missing_tests(table, tmp_path)
    assert missing == [f"{node_id}: tests/engine/test_trips.py defines no test_fluence_ceiling"]

    source = ht.SOURCE.read_text(encoding="utf-8").replace(
        "test_trips.py::test_power_ceiling", "test_trips.py::test_power_ceiling_old_name"
    )
    copy = tmp_path / "hazards.toml"
    copy.write_text(source, encoding="utf-8")
    assert any("test_power_ceiling_old_name" in m for m in ht.missing_tests(ht.load(copy)))


def test_a_broken_code_reference_or_an_uncovered_cause_is_reported(tmp_path: Path) -> None:
    source = ht.SOURCE.read_text(encoding="utf-8")
    copy = tmp_path / "hazards.toml"
    copy.write_text(
        source.replace("rules:_backup_timer", "rules:_backup_timer_gone").replace(
            'stop_causes = ["E701", "I001", "E902"]', 'stop_causes = ["I001", "E902"]'
        ),
        encoding="utf-8",
    )
    table = ht.load(copy)
    assert ht.unresolved_code(table) == [
        "pbmd.daemon.core.rules:_backup_timer_gone: '_backup_timer_gone' not found"
    ]
    codes = [c.code for c in [*TripCause, *EndCause]]
    assert ht.uncovered_causes(table, codes) == ["E701: in the registry, under no hazard"]
