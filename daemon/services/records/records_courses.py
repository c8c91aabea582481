"""The records' tables of patients, treatment courses and outcomes (schema version 5).

Kept apart from `schema` so that the step that adds them stays one block: the
fresh schema and the migration both use `COURSE_TABLES`. Foreign keys assume
enforcement (``PRAGMA foreign_keys = ON``, set by the store on the connection
that writes these rows): a patient with courses cannot be deleted, a course
takes its visits, screening answers and outcomes with it, and a session that
belongs to a course cannot be deleted from under it.
"""

from __future__ import annotations

SKIN_TYPES_SQL = "('I', 'II', 'III', 'IV', 'V', 'VI')"

COURSE_TABLES: tuple[str, ...] = (
    f"""
    CREATE TABLE patients (
        id TEXT PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 64),
        birth_year INTEGER CHECK (birth_year BETWEEN 1900 AND 2100),
        skin_type TEXT CHECK (skin_type IN {SKIN_TYPES_SQL}),
        notes TEXT,
        created_utc TEXT NOT NULL,
        created_by TEXT,
        updated_utc TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE patient_screening (
        patient_id TEXT NOT NULL REFERENCES patients (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        present INTEGER NOT NULL CHECK (present IN (0, 1)),
        answered_utc TEXT NOT NULL,
        answered_by TEXT,
        PRIMARY KEY (patient_id, name)
    )
    """,
    """
    CREATE TABLE courses (
        id TEXT PRIMARY KEY,
        patient_id TEXT NOT NULL REFERENCES patients (id) ON DELETE RESTRICT,
        diagnosis TEXT NOT NULL CHECK (length(diagnosis) >= 1),
        diagnosis_code TEXT,
        diagnosis_system TEXT,
        protocol_id TEXT NOT NULL,
        protocol_version INTEGER NOT NULL,
        sessions_planned INTEGER NOT NULL CHECK (sessions_planned BETWEEN 1 AND 100),
        min_interval_days REAL NOT NULL CHECK (min_interval_days >= 0),
        sessions_per_week INTEGER CHECK (sessions_per_week BETWEEN 1 AND 7),
        reassess_after INTEGER CHECK (reassess_after >= 1),
        state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed')),
        opened_utc TEXT NOT NULL,
        opened_by TEXT,
        closed_utc TEXT,
        closed_by TEXT,
        close_reason TEXT
    )
    """,
    "CREATE INDEX courses_patient ON courses (patient_id, opened_utc)",
    """
    CREATE TABLE course_visits (
        course_id TEXT NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
        number INTEGER NOT NULL CHECK (number >= 1),
        session_id TEXT NOT NULL UNIQUE REFERENCES sessions (id) ON DELETE RESTRICT,
        visit_utc TEXT NOT NULL,
        overridden_json TEXT,
        override_reason TEXT,
        override_by TEXT,
        CHECK ((overridden_json IS NULL) = (override_reason IS NULL)),
        PRIMARY KEY (course_id, number)
    )
    """,
    """
    CREATE TABLE outcomes (
        id TEXT PRIMARY KEY,
        course_id TEXT NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
        visit_number INTEGER NOT NULL CHECK (visit_number >= 0),
        session_id TEXT REFERENCES sessions (id) ON DELETE SET NULL,
        timing TEXT NOT NULL CHECK (timing IN ('before', 'after', 'reassessment')),
        nrs_pain INTEGER CHECK (nrs_pain BETWEEN 0 AND 10),
        odi_percent REAL CHECK (odi_percent BETWEEN 0 AND 100),
        odi_sections_json TEXT,
        recorded_utc TEXT NOT NULL,
        recorded_by TEXT,
        note TEXT,
        CHECK (nrs_pain IS NOT NULL OR odi_percent IS NOT NULL)
    )
    """,
    "CREATE INDEX outcomes_course ON outcomes (course_id, visit_number, recorded_utc)",
)
"""Patients, screening answers, courses, course visits and outcomes."""

COURSE_KEYS: dict[str, tuple[str, ...]] = {
    "patients": ("id",),
    "patient_screening": ("patient_id", "name"),
    "courses": ("id",),
    "course_visits": ("course_id", "number"),
    "outcomes": ("id",),
}
"""The change log's keys of these tables (the clinic database replicates them)."""
