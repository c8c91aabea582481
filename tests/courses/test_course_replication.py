"""The course tables reach the clinic database (the real PostgreSQL on 127.0.0.1:5432):
patients, screening answers, courses, visits and outcomes, row for row, found by
course and by patient; and a refused write leaves no row on either side."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clinic_db.conftest import ClinicServer, assert_same
from clinic_db.conftest import clinic_server as clinic_server  # the fixture
from records import synthetic as syn

from pbmd.daemon.services.clinic_db import Replicator, schema
from pbmd.daemon.services.config import ClinicDbConfig
from pbmd.daemon.services.courses import book
from pbmd.daemon.services.courses.model import CoursePlan, Invalid
from pbmd.daemon.services.records import RecordStore

UTC_TEXT = "2026-03-02T08:00:00.000000Z"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordStore]:
    s = await RecordStore.open(tmp_path / "records.sqlite", sync_interval_s=0.05, min_free_bytes=0)
    try:
        yield s
    finally:
        await s.close()


async def test_course_rows_replicate_and_are_found_by_course_and_patient(
    store: RecordStore, clinic_server: ClinicServer
) -> None:
    syn.write_completed(store, "s-1")
    await store.sync()

    def write(conn: sqlite3.Connection) -> str:
        book.insert_patient(
            conn,
            "P-7",
            birth_year=1970,
            skin_type="II",
            notes=None,
            screening={"cancer": False},
            utc=UTC_TEXT,
            user="dr",
        )
        course_id = book.insert_course(
            conn,
            patient_id="P-7",
            diagnosis="LBP",
            diagnosis_code=None,
            diagnosis_system=None,
            protocol_id="p",
            protocol_version=1,
            plan=CoursePlan(12, 2.0),
            utc=UTC_TEXT,
            user="dr",
        )
        book.insert_visit(conn, course_id, 1, "s-1", UTC_TEXT, [], None, "dr")
        book.insert_outcome(
            conn,
            course_id=course_id,
            timing="after",
            nrs_pain=4,
            odi_percent=30.0,
            odi_sections=None,
            note=None,
            utc=UTC_TEXT,
            user="dr",
        )
        return course_id

    course_id = await store.transact(write)

    # A visit naming a session that is not in the records is refused (foreign key), whole.
    def orphan(conn: sqlite3.Connection) -> None:
        book.insert_visit(conn, course_id, 2, "no-such-session", UTC_TEXT, [], None, "dr")

    with pytest.raises(sqlite3.IntegrityError):
        await store.transact(orphan)
    with pytest.raises(Invalid):
        await store.transact(
            lambda conn: book.insert_patient(
                conn,
                "P-7",
                birth_year=None,
                skin_type=None,
                notes=None,
                screening={},
                utc=UTC_TEXT,
                user=None,
            )
        )

    rep = Replicator(
        ClinicDbConfig(url=clinic_server.url, retry_s=0.2, connect_timeout_s=2.0), store, "ws-c"
    )
    await rep.start()
    try:
        await rep.wait_until(
            lambda st: st["state"] == "replicating" and st["behind_rows"] == 0, 20.0
        )
    finally:
        await rep.close()
    assert_same(clinic_server, "ws-c", store.path)
    assert clinic_server.query("SELECT MAX(version) FROM pbmd_schema") == [
        (schema.SERVER_SCHEMA_VERSION,)
    ]
    by_course = clinic_server.query(
        "SELECT tbl FROM record_rows WHERE course_id = %s ORDER BY tbl", (course_id,)
    )
    assert [r[0] for r in by_course] == ["course_visits", "courses", "outcomes"]
    by_patient = clinic_server.query(
        "SELECT tbl FROM record_rows WHERE patient_ref = 'P-7' ORDER BY tbl"
    )
    assert [r[0] for r in by_patient] == ["courses", "patient_screening", "patients"]
    visits = clinic_server.query(
        "SELECT row->>'session_id' FROM record_rows WHERE tbl = 'course_visits'"
    )
    assert visits == [("s-1",)]
