"""The course tables in the records database: plain SQL on one connection.

Writes run in `RecordStore.transact` (the writer's connection, one transaction,
foreign keys enforced); reads in `RecordStore.read` (a read-only snapshot). A
function that finds its input refused raises before its first write, and
transact rolls back anything else, so a refusal changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pbmd.daemon.services.courses.model import CoursePlan, Invalid, NotFound, Timing


def _row(r: sqlite3.Row | None) -> dict[str, Any] | None:
    return None if r is None else dict(r)


# ------------------------------------------------------------------ patients


def insert_patient(
    conn: sqlite3.Connection,
    patient_id: str,
    *,
    birth_year: int | None,
    skin_type: str | None,
    notes: str | None,
    screening: Mapping[str, bool],
    utc: str,
    user: str | None,
) -> None:
    if conn.execute("SELECT 1 FROM patients WHERE id = ?", (patient_id,)).fetchone():
        raise Invalid(
            f"patient {patient_id!r} is already registered; `pbmctl patient show "
            f"{patient_id}` shows the record"
        )
    conn.execute(
        "INSERT INTO patients (id, birth_year, skin_type, notes, created_utc, created_by, "
        "updated_utc) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (patient_id, birth_year, skin_type, notes, utc, user, utc),
    )
    record_screening(conn, patient_id, screening, utc, user)


def update_patient(
    conn: sqlite3.Connection,
    patient_id: str,
    *,
    skin_type: str | None,
    screening: Mapping[str, bool],
    utc: str,
    user: str | None,
) -> None:
    require_patient(conn, patient_id)
    if skin_type is not None:
        conn.execute(
            "UPDATE patients SET skin_type = ?, updated_utc = ? WHERE id = ?",
            (skin_type, utc, patient_id),
        )
    record_screening(conn, patient_id, screening, utc, user)


def record_screening(
    conn: sqlite3.Connection,
    patient_id: str,
    screening: Mapping[str, bool],
    utc: str,
    user: str | None,
) -> None:
    """Each answer replaces the patient's earlier answer to the same question, with
    the date it was given."""
    for name, present in screening.items():
        conn.execute(
            "INSERT OR REPLACE INTO patient_screening (patient_id, name, present, answered_utc,"
            " answered_by) VALUES (?, ?, ?, ?, ?)",
            (patient_id, name, int(present), utc, user),
        )


def require_patient(conn: sqlite3.Connection, patient_id: str) -> dict[str, Any]:
    found = get_patient(conn, patient_id)
    if found is None:
        raise NotFound(
            f"no patient {patient_id!r} in the records; register them first with "
            "`pbmctl patient add` (`pbmctl patient list` shows those registered)"
        )
    return found


def get_patient(conn: sqlite3.Connection, patient_id: str) -> dict[str, Any] | None:
    row = _row(conn.execute("SELECT * FROM patients WHERE id = ?", (patient_id,)).fetchone())
    if row is None:
        return None
    row["screening"] = [
        {
            "name": r["name"],
            "present": bool(r["present"]),
            "answered_utc": r["answered_utc"],
            "answered_by": r["answered_by"],
        }
        for r in conn.execute(
            "SELECT * FROM patient_screening WHERE patient_id = ? ORDER BY name", (patient_id,)
        )
    ]
    row["courses"] = [
        dict(r)
        for r in conn.execute(
            "SELECT id, diagnosis, protocol_id, state, sessions_planned, opened_utc, "
            "(SELECT COUNT(*) FROM course_visits v WHERE v.course_id = c.id) AS sessions_done "
            "FROM courses c WHERE patient_id = ? ORDER BY opened_utc",
            (patient_id,),
        )
    ]
    return row


def list_patients(conn: sqlite3.Connection, limit: int, offset: int) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in conn.execute(
            "SELECT p.id, p.birth_year, p.skin_type, p.created_utc, p.updated_utc, "
            "(SELECT COUNT(*) FROM courses c WHERE c.patient_id = p.id AND c.state = 'open') "
            "AS open_courses FROM patients p ORDER BY p.id LIMIT ? OFFSET ?",
            (limit, offset),
        )
    ]


# ------------------------------------------------------------------ courses


def insert_course(
    conn: sqlite3.Connection,
    *,
    patient_id: str,
    diagnosis: str,
    diagnosis_code: str | None,
    diagnosis_system: str | None,
    protocol_id: str,
    protocol_version: int,
    plan: CoursePlan,
    utc: str,
    user: str | None,
) -> str:
    require_patient(conn, patient_id)
    course_id = f"c-{uuid.uuid4().hex[:12]}"
    conn.execute(
        "INSERT INTO courses (id, patient_id, diagnosis, diagnosis_code, diagnosis_system, "
        "protocol_id, protocol_version, sessions_planned, min_interval_days, sessions_per_week,"
        " reassess_after, opened_utc, opened_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            course_id,
            patient_id,
            diagnosis,
            diagnosis_code,
            diagnosis_system,
            protocol_id,
            protocol_version,
            plan.sessions,
            plan.min_interval_days,
            plan.sessions_per_week,
            plan.reassess_after,
            utc,
            user,
        ),
    )
    return course_id


def require_course(conn: sqlite3.Connection, course_id: str) -> dict[str, Any]:
    found = get_course(conn, course_id)
    if found is None:
        raise NotFound(
            f"no course {course_id!r} in the records; `pbmctl patient show PATIENT` lists a "
            "patient's courses"
        )
    return found


def get_course(conn: sqlite3.Connection, course_id: str) -> dict[str, Any] | None:
    """The course with its visits (and each visit's session outcome) and outcomes."""
    row = _row(conn.execute("SELECT * FROM courses WHERE id = ?", (course_id,)).fetchone())
    if row is None:
        return None
    visits = []
    for r in conn.execute(
        "SELECT v.*, s.outcome AS session_outcome, s.started_utc AS session_started_utc, "
        "s.protocol_version AS session_protocol_version FROM course_visits v "
        "JOIN sessions s ON s.id = v.session_id WHERE v.course_id = ? ORDER BY v.number",
        (course_id,),
    ):
        v = dict(r)
        overridden = v.pop("overridden_json")
        v["overridden"] = json.loads(overridden) if overridden else []
        visits.append(v)
    row["visits"] = visits
    outcomes = []
    for r in conn.execute(
        "SELECT * FROM outcomes WHERE course_id = ? ORDER BY visit_number, recorded_utc",
        (course_id,),
    ):
        o = dict(r)
        sections = o.pop("odi_sections_json")
        o["odi_sections"] = json.loads(sections) if sections else None
        outcomes.append(o)
    row["outcomes"] = outcomes
    return row


def close_course(
    conn: sqlite3.Connection, course_id: str, reason: str, utc: str, user: str | None
) -> None:
    course = require_course(conn, course_id)
    if course["state"] == "closed":
        raise Invalid(f"course {course_id} was closed on {course['closed_utc']}")
    conn.execute(
        "UPDATE courses SET state = 'closed', closed_utc = ?, closed_by = ?, close_reason = ? "
        "WHERE id = ?",
        (utc, user, reason, course_id),
    )


def insert_visit(
    conn: sqlite3.Connection,
    course_id: str,
    number: int,
    session_id: str,
    visit_utc: str,
    overridden: Sequence[str],
    reason: str | None,
    user: str | None,
) -> None:
    conn.execute(
        "INSERT INTO course_visits (course_id, number, session_id, visit_utc, overridden_json,"
        " override_reason, override_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            course_id,
            number,
            session_id,
            visit_utc,
            json.dumps(list(overridden)) if overridden else None,
            reason if overridden else None,
            user if overridden else None,
        ),
    )


def set_protocol_version(conn: sqlite3.Connection, course_id: str, version: int) -> None:
    conn.execute("UPDATE courses SET protocol_version = ? WHERE id = ?", (version, course_id))


def course_of_session(conn: sqlite3.Connection, session_id: str) -> tuple[str, int] | None:
    r = conn.execute(
        "SELECT course_id, number FROM course_visits WHERE session_id = ?", (session_id,)
    ).fetchone()
    return None if r is None else (str(r[0]), int(r[1]))


# ------------------------------------------------------------------ outcomes


def insert_outcome(
    conn: sqlite3.Connection,
    *,
    course_id: str,
    timing: Timing,
    nrs_pain: int | None,
    odi_percent: float | None,
    odi_sections: Sequence[int | None] | None,
    note: str | None,
    utc: str,
    user: str | None,
) -> dict[str, Any]:
    """An outcome measured at a visit: 'before' belongs to the next session (1: the
    baseline before the first), 'after' and 'reassessment' to the latest one given."""
    course = require_course(conn, course_id)
    visits = course["visits"]
    number = len(visits) + 1 if timing == "before" else len(visits)
    if timing == "after" and number == 0:
        raise Invalid(
            "no session of this course has been given yet: record a baseline with "
            "--timing before, or an 'after' once a session has run"
        )
    if course["state"] == "closed" and timing != "reassessment":
        raise Invalid(f"course {course_id} is closed; only a reassessment may be recorded")
    session_id = visits[-1]["session_id"] if visits and timing != "before" else None
    outcome_id = f"o-{uuid.uuid4().hex[:12]}"
    conn.execute(
        "INSERT INTO outcomes (id, course_id, visit_number, session_id, timing, nrs_pain, "
        "odi_percent, odi_sections_json, recorded_utc, recorded_by, note) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            outcome_id,
            course_id,
            number,
            session_id,
            timing,
            nrs_pain,
            odi_percent,
            json.dumps(list(odi_sections)) if odi_sections is not None else None,
            utc,
            user,
            note,
        ),
    )
    return {
        "id": outcome_id,
        "course_id": course_id,
        "visit_number": number,
        "session_id": session_id,
        "timing": timing,
        "nrs_pain": nrs_pain,
        "odi_percent": odi_percent,
        "recorded_utc": utc,
    }
