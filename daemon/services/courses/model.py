"""Patients, courses and outcomes as values, and the checks of what a clinician enters.

Every check here runs before anything is written, so bad input changes nothing
and its error says what is wrong and how to put it right.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

SKIN_TYPES = ("I", "II", "III", "IV", "V", "VI")
Timing = Literal["before", "after", "reassessment"]
TIMINGS: tuple[Timing, ...] = ("before", "after", "reassessment")

PATIENT_ID = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")

NRS_MAX = 10
ODI_SECTIONS = 10
ODI_SECTION_MAX = 5
"""The Oswestry Disability Index: ten sections, each scored 0–5; the index is the sum
over the answered sections as a percentage of 5 × their number (a section a patient
leaves out is left out of both)."""


class CourseError(Exception):
    """A patient, course or outcome request that cannot be done; the message says why."""


class Invalid(CourseError):
    """The input is out of range or malformed (nothing was written)."""


class NotFound(CourseError):
    """No such patient, course or session."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """One reason a session may not start inside a course now."""

    code: str
    """too_soon, week_full, course_complete, protocol_changed, reassessment_due
    (a clinician may override these with a written reason); course_closed,
    screening_due, course_ceiling (never overridden)."""
    message: str
    overridable: bool

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "overridable": self.overridable}


class Refused(CourseError):
    """The course's plan refuses the session now; ``refusals`` say why."""

    def __init__(self, refusals: Sequence[Refusal]) -> None:
        self.refusals = tuple(refusals)
        overridable = all(r.overridable for r in self.refusals)
        hint = (
            " A clinician may override with a written reason (--override-reason)."
            if overridable
            else ""
        )
        super().__init__("; ".join(r.message for r in self.refusals) + "." + hint)


@dataclass(frozen=True, slots=True)
class CoursePlan:
    """What the clinician prescribed for the course."""

    sessions: int
    min_interval_days: float
    sessions_per_week: int | None = None
    reassess_after: int | None = None


def check_patient_id(value: str) -> str:
    if not isinstance(value, str) or not PATIENT_ID.match(value):
        raise Invalid(
            "the patient identifier must be 1–64 printable characters, the clinic's own "
            "reference (not a name), e.g. P-0042"
        )
    return value


def check_birth_year(value: int | None, now: datetime) -> int | None:
    if value is None:
        return None
    if not 1900 <= value <= now.year:
        raise Invalid(f"birth year {value} is not between 1900 and {now.year}; give four digits")
    return value


def check_skin_type(value: str | None) -> str | None:
    if value is None:
        return None
    upper = value.upper()
    if upper not in SKIN_TYPES:
        raise Invalid(f"skin type {value!r} is not a Fitzpatrick type: give one of I–VI")
    return upper


def check_plan(plan: CoursePlan) -> CoursePlan:
    if not 1 <= plan.sessions <= 100:
        raise Invalid(
            f"a course of {plan.sessions} sessions is not possible: give 1–100 sessions "
            "(e.g. 12 for 3 a week over 4 weeks)"
        )
    if not 0 <= plan.min_interval_days <= 365:
        raise Invalid(
            f"minimum interval {plan.min_interval_days} days is out of range: give 0–365 days"
        )
    if plan.sessions_per_week is not None and not 1 <= plan.sessions_per_week <= 7:
        raise Invalid(f"{plan.sessions_per_week} sessions a week is not possible: give 1–7")
    if plan.reassess_after is not None and not 1 <= plan.reassess_after <= plan.sessions:
        raise Invalid(
            f"reassessment after {plan.reassess_after} sessions: give 1–{plan.sessions} "
            "(at most the course's sessions) or leave it out"
        )
    return plan


def check_nrs(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= NRS_MAX:
        raise Invalid(
            f"pain NRS {value!r} is out of range: the numeric rating scale is a whole "
            f"number from 0 (no pain) to {NRS_MAX} (worst imaginable)"
        )
    return value


def odi_from_sections(sections: Sequence[int | None]) -> float:
    """The ODI (percent) from the ten sections' scores (None: not answered)."""
    if len(sections) != ODI_SECTIONS:
        raise Invalid(
            f"the ODI has {ODI_SECTIONS} sections; {len(sections)} scores were given "
            "(write a skipped section as '-')"
        )
    answered = [s for s in sections if s is not None]
    for i, score in enumerate(sections, 1):
        if score is not None and (
            isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5
        ):
            raise Invalid(f"ODI section {i} scored {score!r}: each section scores 0–5")
    if len(answered) < ODI_SECTIONS - 2:
        raise Invalid(
            f"only {len(answered)} of {ODI_SECTIONS} ODI sections answered: at least 8 are "
            "needed for a score"
        )
    return round(100.0 * sum(answered) / (ODI_SECTION_MAX * len(answered)), 1)


def check_odi(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise Invalid(f"ODI {value!r} % is out of range: the Oswestry Disability Index is 0–100 %")
    return float(value)


def check_timing(value: str) -> Timing:
    for t in TIMINGS:
        if value == t:
            return t
    raise Invalid(f"timing {value!r}: give before, after or reassessment")


def check_screening(answers: Mapping[str, bool]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for name, present in answers.items():
        if not re.match(r"^[a-z][a-z0-9-]{0,63}$", str(name)) or not isinstance(present, bool):
            raise Invalid(f"screening answer {name!r}={present!r}: give name=yes|no")
        out[str(name)] = present
    return out
