"""The hazard table: docs/safety/hazards.toml, its Markdown rendering, and its checks.

The TOML file is the source; docs/safety/hazards.md is written from it by
:func:`render` (``python tests/safety/hazards_table.py --write``). The checks are
what keeps the table true: every test it names exists (found by parsing the test
modules, so a renamed test is a missing one), every code reference resolves to a
module and an attribute, every stop cause of the registry appears under a hazard,
and every hazard has a test that injects its cause.

``python tests/safety/hazards_table.py --tests`` prints every test the table names,
for ``pytest $(...)`` to run them all.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "docs" / "safety" / "hazards.toml"
RENDERED = ROOT / "docs" / "safety" / "hazards.md"
LAYERS = ("controller", "host", "operator", "procedure")


@dataclass(frozen=True)
class Table:
    severity: dict[str, str]
    hazards: list[dict[str, Any]]


def load(path: Path = SOURCE) -> Table:
    """The table as data; ValueError naming the hazard and field that is malformed."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    table = Table(dict(data.get("severity", {})), list(data.get("hazard", [])))
    for h in table.hazards:
        where = f"{path.name}: hazard {h.get('id', '?')}"
        for key in ("id", "title", "harm", "severity", "causes", "residual", "mitigations"):
            if key not in h:
                raise ValueError(f"{where} has no {key!r}; add it")
        if h["severity"] not in table.severity:
            raise ValueError(f"{where}: severity {h['severity']!r} is not one of the scale's")
        for m in h["mitigations"]:
            if m.get("layer") not in LAYERS:
                raise ValueError(f"{where}: layer {m.get('layer')!r}; use one of {LAYERS}")
            if m["layer"] == "host" and not m.get("code"):
                raise ValueError(f"{where}: a host mitigation names its code (module:name)")
    return table


# ------------------------------------------------------------------ rendering


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _codes(items: Iterable[str]) -> str:
    return "<br>".join(f"`{_cell(i)}`" for i in items) or "—"


def render(table: Table, stop_messages: Mapping[str, str]) -> str:
    """The Markdown page: a summary table, then one section per hazard."""
    out = [
        "# Hazards, their mitigations and the tests that show them",
        "",
        "Generated from `docs/safety/hazards.toml` by `tests/safety/hazards_table.py "
        "--write`; do not edit by hand (tests/safety/test_hazards_table.py checks it). "
        "How the layers work together: `docs/safety/README.md`.",
        "",
        "Severity scale (ISO 14971 style, assessed for this device):",
        "",
    ]
    out += [f"- **{k}** {_cell(v)}" for k, v in sorted(table.severity.items(), reverse=True)]
    out += ["", "| id | hazard | severity | stop causes | layers |", "|---|---|---|---|---|"]
    for h in table.hazards:
        layers = ", ".join(dict.fromkeys(m["layer"] for m in h["mitigations"]))
        causes = ", ".join(h.get("stop_causes", [])) or "—"
        out.append(
            f"| [{h['id']}](#{h['id'].lower()}) | {_cell(h['title'])} | {h['severity']} "
            f"| {causes} | {layers} |"
        )
    for h in table.hazards:
        out += ["", f"## {h['id']}", "", f"**{_cell(h['title'])}** — severity {h['severity']}."]
        out += ["", f"Harm: {h['harm']}", "", "Causes:", ""]
        out += [f"- {c}" for c in h["causes"]]
        if h.get("stop_causes"):
            out += ["", "Stop causes standing against it:", ""]
            out += [f"- `{c}` {stop_messages.get(c, '')}".rstrip() for c in h["stop_causes"]]
        out += ["", "| layer | mitigation | code | tests that inject the cause |"]
        out += ["|---|---|---|---|"]
        for m in h["mitigations"]:
            out.append(
                f"| {m['layer']} | {_cell(m['what'])} | {_codes(m.get('code', []))} "
                f"| {_codes(m.get('tests', []))} |"
            )
        out += ["", f"Residual risk: {h['residual']}"]
    return "\n".join(out) + "\n"


def registry_messages() -> dict[str, str]:
    from pbmd.daemon.core.safety import EndCause, TripCause

    return {c.code: c.message for c in [*TripCause, *EndCause]}


# --------------------------------------------------------------------- checks


def named_tests(table: Table) -> list[str]:
    return sorted({t for h in table.hazards for m in h["mitigations"] for t in m.get("tests", [])})


def _defined_tests(module: Path) -> set[str]:
    """The test node names a module defines (``test_x``, ``TestY::test_x``), read from
    its syntax tree, so a test that was renamed or removed is not there."""
    tree = ast.parse(module.read_text(encoding="utf-8"), filename=str(module))
    found: set[str] = set()
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, functions) and node.name.startswith("test"):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            found |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, functions) and item.name.startswith("test")
            }
    return found


def missing_tests(table: Table, root: Path = ROOT) -> list[str]:
    """Node ids the table names that no test module under `root` defines, with why."""
    missing: list[str] = []
    cache: dict[Path, set[str]] = {}
    for node_id in named_tests(table):
        path_text, sep, name = node_id.partition("::")
        path = root / path_text
        if not sep or "[" in name:
            missing.append(f"{node_id}: write it as path::test_name (no parameter ids)")
            continue
        if not path.is_file():
            missing.append(f"{node_id}: no such file {path_text}")
            continue
        if path not in cache:
            cache[path] = _defined_tests(path)
        if name not in cache[path]:
            missing.append(f"{node_id}: {path_text} defines no {name}")
    return missing


def unresolved_code(table: Table) -> list[str]:
    """Code references (``module:Qualified.name``) that do not import or resolve."""
    bad: list[str] = []
    for ref in sorted(
        {c for h in table.hazards for m in h["mitigations"] for c in m.get("code", [])}
    ):
        module_name, sep, qualname = ref.partition(":")
        if not sep or not qualname:
            bad.append(f"{ref}: write it as module:name")
            continue
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            bad.append(f"{ref}: module does not import ({exc})")
            continue
        for part in qualname.split("."):
            if not hasattr(obj, part):
                bad.append(f"{ref}: {part!r} not found")
                break
            obj = getattr(obj, part)
        else:
            if not callable(obj):
                bad.append(f"{ref}: not a function, method or class")
    return bad


def uncovered_causes(table: Table, codes: Iterable[str]) -> list[str]:
    """Registry codes that no hazard lists, and listed codes the registry lacks."""
    listed = {c for h in table.hazards for c in h.get("stop_causes", [])}
    known = set(codes)
    return sorted(
        [f"{c}: in the registry, under no hazard" for c in known - listed]
        + [f"{c}: under a hazard, not in the registry" for c in listed - known]
    )


def untested_hazards(table: Table) -> list[str]:
    return [
        f"{h['id']}: no test injects its cause"
        for h in table.hazards
        if not any(m.get("tests") for m in h["mitigations"])
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write docs/safety/hazards.md")
    parser.add_argument("--tests", action="store_true", help="print every test the table names")
    args = parser.parse_args()
    table = load()
    if args.tests:
        print("\n".join(named_tests(table)))
        return
    text = render(table, registry_messages())
    if args.write:
        RENDERED.write_text(text, encoding="utf-8")
        print(f"wrote {RENDERED.relative_to(ROOT)}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
