"""A course as text: the plan, the sessions so far, the outcomes as measured and the
cumulative dose per patch of skin (for the treatment report and `course report`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _num(value: Any, digits: int = 1) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def course_text(summary: Mapping[str, Any], session_number: int | None = None) -> str:
    c, plan = summary["course"], summary["plan"]
    lines = []
    if session_number is not None:
        lines.append(f"Session {session_number} of {plan['sessions']} of course {c['id']}")
    code = f" [{c['diagnosis_code']}]" if c.get("diagnosis_code") else ""
    lines += [
        f"Course {c['id']} ({c['state']}): patient {c['patient_id']}, {c['diagnosis']}{code}",
        f"  protocol {c['protocol_id']} v{c['protocol_version']}; plan: {plan['sessions']} "
        f"sessions, at least {plan['min_interval_days']:g} day(s) apart"
        + (f", at most {plan['sessions_per_week']} a week" if plan["sessions_per_week"] else "")
        + (f", reassess after {plan['reassess_after']}" if plan["reassess_after"] else ""),
        f"  sessions given: {summary['sessions_given']} of {plan['sessions']}",
    ]
    for v in summary["visits"]:
        note = (
            f"  override ({', '.join(v['overridden'])}): {v['override_reason']}"
            if v["overridden"]
            else ""
        )
        lines.append(
            f"  {v['number']:>3}  {v['visit_utc'][:16]}  {v['session_outcome'] or 'running':<11}"
            f" {_num(v['delivered_energy_j'])} J of {_num(v['prescribed_energy_j'])} J{note}"
        )
    if summary.get("outcomes_hidden"):
        lines.append("  outcomes: not shown to this role")
    elif summary["outcomes"]:
        lines.append("  outcomes as measured (visit, timing, pain NRS 0–10, ODI %):")
        for o in summary["outcomes"]:
            lines.append(
                f"  {o['visit_number']:>3}  {o['timing']:<12} NRS {o['nrs_pain'] if o['nrs_pain'] is not None else '—':>2}"  # noqa: E501
                f"  ODI {_num(o['odi_percent'])}"
            )
    lines.append(
        f"  cumulative fluence over the course (ceiling {summary['course_ceiling_j_cm2']:g} "
        "J/cm² per patch and wavelength):"
    )
    for d in summary["cumulative_dose"]:
        lines.append(
            f"    {d['patch']:<28} {d['wavelength_nm']:>4} nm  {d['delivered_j_cm2']:8.3f} J/cm²"
            f"  ({d['sessions']} session(s))"
        )
    lines.append("  " + summary["measured_only"])
    return "\n".join(lines) + "\n"
