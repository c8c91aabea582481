"""The report's phases and skin: when each phase ran, and the cumulative fluence on
every patch of skin the session reached.

Read from the record alone: the plan stored with the session (its phases, and per
emission the body-map region and the patches of skin its light reaches) and the
step rows (the fluence each step delivered). A patch's fluence is the sum over
every step that reaches it, whatever the sites are called and whichever
applicator or wavelength delivered it: the rule the protocol checks applied
(pbmd.protocols.anatomy). Plans recorded before phases existed read as one phase,
and their patches as the sites' names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pbmd.protocols.body_map import body_map


@dataclass(frozen=True, slots=True)
class ReportPhase:
    index: int
    id: str
    title: str
    ports: tuple[int, ...]
    planned_start_s: float | None
    planned_duration_s: float | None
    started_utc: str | None
    """When its first step started (None: it never started)."""
    ended_utc: str | None
    """When its last step ended (None: a step did not end)."""
    steps: int
    steps_completed: int


@dataclass(frozen=True, slots=True)
class SkinDose:
    wavelength_nm: int
    fluence_prescribed_j_cm2: float
    fluence_delivered_j_cm2: float | None


@dataclass(frozen=True, slots=True)
class ReportSkinPatch:
    """One patch of skin: what every step that reaches it delivered there, summed."""

    patch: str
    label: str
    body_region: bool
    """True: a region of the body map; False: a site's name (a version 1 protocol)."""
    steps: tuple[str, ...]
    """The steps whose light reaches the patch, as "port N step M"."""
    by_wavelength: tuple[SkinDose, ...]
    fluence_prescribed_j_cm2: float
    fluence_delivered_j_cm2: float | None
    ceiling_per_wavelength_j_cm2: float | None
    ceiling_total_j_cm2: float | None
    ceiling_source: str | None


def _plan(session: Mapping[str, Any]) -> dict[str, Any]:
    text = session.get("plan_json")
    try:
        plan = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}
    return plan if isinstance(plan, dict) else {}


def _emissions(plan: Mapping[str, Any]) -> dict[tuple[int, int], Mapping[str, Any]]:
    """Each planned emission by (port, step); nothing from a plan of another shape."""
    out: dict[tuple[int, int], Mapping[str, Any]] = {}
    ports = plan.get("ports")
    for port in ports if isinstance(ports, list) else []:
        emissions = port.get("emissions") if isinstance(port, dict) else None
        for e in emissions if isinstance(emissions, list) else []:
            if isinstance(e, dict) and "port" in e and "step_index" in e:
                out[(int(e["port"]), int(e["step_index"]))] = e
    return out


def phases(session: Mapping[str, Any]) -> tuple[ReportPhase, ...]:
    """The plan's phases with when their steps ran (one phase for an older plan)."""
    plan = _plan(session)
    emissions = _emissions(plan)
    steps: Sequence[Mapping[str, Any]] = session.get("steps") or []
    phases_in_plan = plan.get("phases")
    declared = (phases_in_plan if isinstance(phases_in_plan, list) else None) or [
        {
            "index": 0,
            "id": "all",
            "title": "every port at once",
            "ports": sorted({int(s["port"]) for s in steps}),
            "expected_start_ms": None,
            "expected_duration_ms": None,
        }
    ]
    out = []
    for phase in declared:
        index = int(phase["index"])
        mine = [
            s
            for s in steps
            if int(emissions.get((int(s["port"]), int(s["step_index"])), {}).get("phase", 0))
            == index
        ]
        starts = sorted(str(s["started_utc"]) for s in mine if s.get("started_utc"))
        ends = [s.get("ended_utc") for s in mine]
        start_ms, duration_ms = phase.get("expected_start_ms"), phase.get("expected_duration_ms")
        out.append(
            ReportPhase(
                index=index,
                id=str(phase["id"]),
                title=str(phase["title"]),
                ports=tuple(int(p) for p in phase["ports"]),
                planned_start_s=None if start_ms is None else start_ms / 1000.0,
                planned_duration_s=None if duration_ms is None else duration_ms / 1000.0,
                started_utc=starts[0] if starts else None,
                ended_utc=max(str(e) for e in ends) if ends and all(ends) else None,
                steps=len(mine),
                steps_completed=sum(1 for s in mine if s.get("outcome") == "completed"),
            )
        )
    return tuple(out)


def skin(session: Mapping[str, Any]) -> tuple[ReportSkinPatch, ...]:
    """Cumulative fluence per patch of skin, largest patch first; a patch that the same
    steps reach as a larger one already listed is left out (it carries the same sum)."""
    plan = _plan(session)
    emissions = _emissions(plan)
    limits = plan.get("limits") or {}
    the_map = body_map()
    reached: dict[str, list[Mapping[str, Any]]] = {}
    for s in session.get("steps") or []:
        e = emissions.get((int(s["port"]), int(s["step_index"])), {})
        for patch in e.get("patches") or [str(s["site"])]:
            reached.setdefault(str(patch), []).append(s)
    labels = {
        str(s["site"]): str(s.get("site_label") or s["site"]) for s in session.get("steps") or []
    }

    def area(patch: str) -> float:
        return the_map.area_cm2(patch) if patch in the_map.patches else 0.0

    out: list[ReportSkinPatch] = []
    seen: set[frozenset[tuple[int, int]]] = set()
    for patch in sorted(reached, key=lambda p: (-area(p), p)):
        rows = reached[patch]
        key = frozenset((int(s["port"]), int(s["step_index"])) for s in rows)
        if key in seen:
            continue
        seen.add(key)
        by_nm: dict[int, list[Mapping[str, Any]]] = {}
        for s in rows:
            by_nm.setdefault(int(s["wavelength_nm"]), []).append(s)
        doses = tuple(
            SkinDose(nm, _total(r, "prescribed_fluence_j_cm2") or 0.0, _delivered(r))
            for nm, r in sorted(by_nm.items())
        )
        delivered = [d.fluence_delivered_j_cm2 for d in doses]
        on_map = patch in the_map.patches
        out.append(
            ReportSkinPatch(
                patch=patch,
                label=the_map.label(patch) if on_map else labels.get(patch, patch),
                body_region=on_map,
                steps=tuple(f"port {s['port']} step {int(s['step_index']) + 1}" for s in rows),
                by_wavelength=doses,
                fluence_prescribed_j_cm2=sum(d.fluence_prescribed_j_cm2 for d in doses),
                fluence_delivered_j_cm2=(
                    None if any(v is None for v in delivered) else sum(v or 0.0 for v in delivered)
                ),
                ceiling_per_wavelength_j_cm2=limits.get("fluence_ceiling_j_cm2"),
                ceiling_total_j_cm2=limits.get("total_fluence_ceiling_j_cm2") if on_map else None,
                ceiling_source=limits.get("fluence_ceiling_source"),
            )
        )
    return tuple(out)


def _total(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r.get(key) for r in rows]
    if any(v is None for v in values):
        return None
    return float(sum(float(v) for v in values if v is not None))


def _delivered(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Delivered fluence of the steps; a step that never started delivered nothing."""
    total = 0.0
    for r in rows:
        value = r.get("delivered_fluence_j_cm2")
        if value is None:
            if r.get("outcome") in (None, "skipped"):
                continue
            return None
        total += float(value)
    return total
