"""The course plan's checks and the outcome measures' arithmetic, as pure functions of
the recorded course and the calendar time given to them."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pbmd.daemon.services.courses import rules
from pbmd.daemon.services.courses.model import (
    CoursePlan,
    Invalid,
    check_nrs,
    check_odi,
    check_plan,
    check_skin_type,
    odi_from_sections,
)
from pbmd.daemon.services.records.schema import utc_text

MONDAY = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def course(visits_days: list[float], **plan: Any) -> dict[str, Any]:
    return {
        "id": "c-000000000001",
        "state": "open",
        "protocol_id": "p",
        "protocol_version": 1,
        "sessions_planned": plan.get("sessions", 12),
        "min_interval_days": plan.get("min_interval_days", 1.0),
        "sessions_per_week": plan.get("sessions_per_week"),
        "reassess_after": plan.get("reassess_after"),
        "visits": [
            {"number": i + 1, "visit_utc": utc_text(MONDAY + timedelta(days=d))}
            for i, d in enumerate(visits_days)
        ],
        "outcomes": plan.get("outcomes", []),
    }


def codes(c: dict[str, Any], now: datetime, version: int = 1) -> list[str]:
    return [r.code for r in rules.plan_refusals(c, now, version)]


def test_three_a_week_monday_wednesday_friday() -> None:
    c = course([0, 2, 4], sessions_per_week=3, min_interval_days=1)
    # Saturday: the week since last Monday holds three sessions already.
    assert codes(c, MONDAY + timedelta(days=5)) == ["week_full"]
    # The next Monday: Monday's session is 7 days old, out of the window.
    assert codes(c, MONDAY + timedelta(days=7)) == []


def test_too_soon_says_when_the_next_may_start() -> None:
    c = course([0], min_interval_days=2)
    (refusal,) = rules.plan_refusals(c, MONDAY + timedelta(seconds=70), 1)
    assert refusal.code == "too_soon" and refusal.overridable
    assert "0.0 h ago" in refusal.message and "2026-03-04T08:00" in refusal.message
    assert codes(c, MONDAY + timedelta(days=2)) == []


def test_reassessment_due_until_recorded_then_complete() -> None:
    c = course([0, 2, 4], sessions=4, reassess_after=3)
    later = MONDAY + timedelta(days=6)
    assert codes(c, later) == ["reassessment_due"]
    c["outcomes"] = [{"timing": "reassessment", "visit_number": 3}]
    assert codes(c, later) == []
    c["visits"].append({"number": 4, "visit_utc": utc_text(later)})
    assert codes(c, later + timedelta(days=2)) == ["course_complete"]
    assert codes(c, later + timedelta(days=2), version=2) == ["course_complete", "protocol_changed"]


def test_a_closed_course_refuses_without_override() -> None:
    c = course([0])
    c.update(state="closed", closed_utc=utc_text(MONDAY), close_reason="moved away")
    (refusal,) = rules.plan_refusals(c, MONDAY + timedelta(days=9), 1)
    assert refusal.code == "course_closed" and not refusal.overridable


def test_screening_missing_stale_and_fresh() -> None:
    recorded = [
        {"name": "cancer", "present": 0, "answered_utc": utc_text(MONDAY)},
        {"name": "pregnancy", "present": 0, "answered_utc": utc_text(MONDAY - timedelta(days=40))},
    ]
    listed = {"cancer", "pregnancy", "photosensitivity"}
    answers, refusal = rules.screening_refusal(listed, recorded, {}, MONDAY, 30)
    assert refusal is not None and not refusal.overridable
    assert "never asked: photosensitivity" in refusal.message
    assert "pregnancy (answered 2026-01-21)" in refusal.message
    given = {"pregnancy": False, "photosensitivity": True}
    answers, refusal = rules.screening_refusal(listed, recorded, given, MONDAY, 30)
    assert refusal is None
    assert answers == {"cancer": False, "pregnancy": False, "photosensitivity": True}


def test_odi_from_its_sections() -> None:
    assert odi_from_sections([3, 3, 2, 2, 3, 2, 2, 1, 2, 2]) == 44.0  # 22 of 50
    assert odi_from_sections([3, 3, 2, 2, 3, 2, 2, 1, 2, None]) == 44.4  # 20 of 45
    with pytest.raises(Invalid, match="at least 8"):
        odi_from_sections([1, 1, 1, 1, 1, 1, 1, None, None, None])
    with pytest.raises(Invalid, match="section 2 scored 6"):
        odi_from_sections([1, 6, 1, 1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(Invalid, match="10 sections; 9"):
        odi_from_sections([1] * 9)


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (check_nrs, 11, "0 (no pain) to 10"),
        (check_nrs, -1, "0 (no pain) to 10"),
        (check_nrs, True, "0 (no pain) to 10"),
        (check_odi, 120.0, "0–100 %"),
        (check_skin_type, "VII", "I–VI"),
    ],
)
def test_bad_measures_say_the_range(check: Any, value: Any, message: str) -> None:
    with pytest.raises(Invalid, match=re.escape(message)):
        check(value)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (CoursePlan(0, 2), "course of 0 sessions"),
        (CoursePlan(12, -1), "minimum interval"),
        (CoursePlan(12, 2, sessions_per_week=8), "8 sessions a week"),
        (CoursePlan(12, 2, reassess_after=13), "reassessment after 13"),
    ],
)
def test_bad_plans_say_what_to_give(plan: CoursePlan, message: str) -> None:
    with pytest.raises(Invalid, match=message):
        check_plan(plan)
