"""The course's plan, checked when a session is to start inside it.

Pure functions of the course as recorded, the patient's screening answers and
the time the injected clock says: nothing here reads the system clock, so a
test (or a simulation of a course) can run days between visits in seconds.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pbmd.daemon.services.courses.model import Refusal
from pbmd.daemon.services.records.schema import utc_text

WEEK = timedelta(days=7)


def parse_utc(text: str) -> datetime:
    """A stored fixed-width UTC time as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def plan_refusals(
    course: Mapping[str, Any], now: datetime, installed_version: int
) -> list[Refusal]:
    """What the plan says against a session now (an empty list: it may start)."""
    out: list[Refusal] = []
    if course["state"] != "open":
        out.append(
            Refusal(
                "course_closed",
                f"course {course['id']} was closed on {course['closed_utc'][:10]} "
                f"({course['close_reason']}); start a new course",
                overridable=False,
            )
        )
        return out
    visits: Sequence[Mapping[str, Any]] = course["visits"]
    planned = int(course["sessions_planned"])
    if len(visits) >= planned:
        out.append(
            Refusal(
                "course_complete",
                f"the course is complete: {len(visits)} of {planned} sessions given; "
                "reassess the patient and close the course or start a new one",
                overridable=True,
            )
        )
    if visits:
        last = parse_utc(str(visits[-1]["visit_utc"]))
        gap = timedelta(days=float(course["min_interval_days"]))
        if now < last + gap:
            hours = (now - last).total_seconds() / 3600
            out.append(
                Refusal(
                    "too_soon",
                    f"too soon: the last session of this course was {hours:.1f} h ago and the "
                    f"plan asks at least {float(course['min_interval_days']):g} day(s) between "
                    f"sessions; the next may start from {utc_text(last + gap)[:16]} UTC",
                    overridable=True,
                )
            )
    per_week = course.get("sessions_per_week")
    if per_week is not None:
        this_week = [v for v in visits if now - parse_utc(str(v["visit_utc"])) < WEEK]
        if len(this_week) >= int(per_week):
            out.append(
                Refusal(
                    "week_full",
                    f"{len(this_week)} sessions in the last 7 days already, the plan asks at "
                    f"most {per_week} a week",
                    overridable=True,
                )
            )
    if installed_version != int(course["protocol_version"]):
        out.append(
            Refusal(
                "protocol_changed",
                f"protocol {course['protocol_id']} is installed at version {installed_version}"
                f", the course was planned with version {course['protocol_version']}; review "
                "the change",
                overridable=True,
            )
        )
    every = course.get("reassess_after")
    n = len(visits)
    if every is not None and 0 < n < planned and n % int(every) == 0:
        done = any(
            o["timing"] == "reassessment" and int(o["visit_number"]) == n
            for o in course["outcomes"]
        )
        if not done:
            out.append(
                Refusal(
                    "reassessment_due",
                    f"reassessment due after session {n}: record it with `pbmctl outcome "
                    f"record {course['id']} --timing reassessment ...` before session {n + 1}",
                    overridable=True,
                )
            )
    return out


def screening_refusal(
    listed: Collection[str],
    recorded: Sequence[Mapping[str, Any]],
    given: Mapping[str, bool],
    now: datetime,
    max_age_days: float,
) -> tuple[dict[str, bool], Refusal | None]:
    """The answers the session runs with (fresh recorded ones and those given now), or
    a refusal naming the questions to ask again: missing, or older than the age the
    clinic allows (never overridden: the patient must be asked)."""
    answers: dict[str, bool] = {}
    stale: list[str] = []
    missing: list[str] = []
    by_name = {str(r["name"]): r for r in recorded}
    for name in sorted(listed):
        if name in given:
            answers[name] = bool(given[name])
            continue
        r = by_name.get(name)
        if r is None:
            missing.append(name)
        elif now - parse_utc(str(r["answered_utc"])) > timedelta(days=max_age_days):
            stale.append(f"{name} (answered {str(r['answered_utc'])[:10]})")
        else:
            answers[name] = bool(r["present"])
    if not missing and not stale:
        return answers, None
    parts = []
    if missing:
        parts.append("never asked: " + ", ".join(missing))
    if stale:
        parts.append(f"older than {max_age_days:g} days: " + ", ".join(stale))
    return answers, Refusal(
        "screening_due",
        "ask the contraindication questions again (" + "; ".join(parts) + ") and give the "
        "answers with --contraindication NAME=yes|no",
        overridable=False,
    )
