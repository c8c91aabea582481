"""Schema version 3: the application id and enforced foreign keys, and a database an
older pbmd wrote (version 2, tests/records/records_v2.sql) migrated without losing a
row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pbmd.daemon.services.records import SCHEMA_VERSION, RecordsCorrupt, RecordStore
from pbmd.daemon.services.records.schema import APPLICATION_ID

from . import synthetic as syn

V2_DUMP = Path(__file__).with_name("records_v2.sql")
TABLES = ("sessions", "steps", "emissions", "events", "outbox")


def _rows(
    path: Path, columns: dict[str, list[str]] | None = None
) -> dict[str, list[tuple[object, ...]]]:
    """Every row of TABLES; with ``columns``, only those columns (a later version
    adds some: sessions.skin_type in version 4)."""
    conn = sqlite3.connect(path)
    try:
        rows = {}
        for t in TABLES:
            names = columns[t] if columns is not None else _columns(path, t)
            rows[t] = conn.execute(f"SELECT {', '.join(names)} FROM {t} ORDER BY rowid").fetchall()
        return rows
    finally:
        conn.close()


def _columns(path: Path, table: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


def _pragma(path: Path, name: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchall()
    finally:
        conn.close()


def _version_2(path: Path) -> None:
    """The version 2 database, and a row whose session is not in it (an event kept
    from a session whose own record never made it): migration keeps that too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(V2_DUMP.read_text(encoding="utf-8"))
    conn.execute(
        "INSERT INTO events (id, session_id, utc, kind, severity, message) "
        "VALUES ('orphan', 'gone', '2024-01-01T00:00:00.000000Z', 'trip', 'error', 'kept')"
    )
    conn.execute("INSERT INTO outbox (event_id) VALUES ('orphan')")
    conn.commit()
    conn.close()


async def test_version_2_database_is_migrated_keeping_every_row(db_path: Path) -> None:
    _version_2(db_path)
    before = _rows(db_path)
    columns = {t: _columns(db_path, t) for t in TABLES}
    assert _pragma(db_path, "user_version") == [(2,)]
    assert _pragma(db_path, "application_id") == [(0,)]
    assert {t: len(r) for t, r in before.items()} == {
        "sessions": 3, "steps": 6, "emissions": 7, "events": 4, "outbox": 4,
    }  # fmt: skip

    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    try:
        assert _rows(db_path, columns) == before  # every row, its values, its keys
        assert _pragma(db_path, "user_version") == [(SCHEMA_VERSION,)] == [(5,)]
        assert _pragma(db_path, "application_id") == [(APPLICATION_ID,)]
        assert _pragma(db_path, "integrity_check") == [("ok",)]
        for table, parent in (("steps", "sessions"), ("emissions", "sessions"),
                              ("events", "sessions"), ("outbox", "events")):  # fmt: skip
            assert {r[2] for r in _pragma(db_path, f"foreign_key_list({table})")} == {parent}
        # the kept orphan is the only row without its session
        assert _pragma(db_path, "foreign_key_check") == [("events", 4, "sessions", 0)]
        # the change log's triggers are back on the rebuilt tables
        conn = sqlite3.connect(db_path)
        triggers = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
        }
        conn.close()
        assert {"changes_steps_insert", "changes_events_update"} <= triggers

        # enforced from now on: a step of no session is refused, one of a session kept
        store.step_started(syn.step_start("no-such-session", syn.PAD_660, syn.T0_S))
        store.step_started(syn.step_start("v2-reconciled", syn.PAD_660, syn.T0_S))
        await store.sync()
        assert store.stats.rejected == 1
        s = await store.get_session("v2-reconciled")
        assert s is not None and [st["port"] for st in s["steps"]] == [1]
        report_session = await store.get_session("v2-completed")
        assert report_session is not None and len(report_session["steps"]) == 3
    finally:
        await store.close()
    # opened again: at the current version, nothing migrates twice
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    await store.close()


async def test_a_new_database_has_the_application_id_and_enforces_keys(db_path: Path) -> None:
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    try:
        assert _pragma(db_path, "application_id") == [(APPLICATION_ID,)]
        store.step_started(syn.step_start("nobody", syn.PAD_660, syn.T0_S))
        store.event("controller", "not a session's", session_id=None)
        await store.sync()
        assert store.stats.rejected == 1
        assert await store._call(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
    finally:
        await store.close()


async def test_another_applications_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA application_id = 1234")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(RecordsCorrupt, match="another application"):
        await RecordStore.open(db_path, min_free_bytes=0)


async def test_an_event_of_a_session_never_recorded_is_kept(db_path: Path) -> None:
    """A start stopped before its record was written still leaves its events: kept,
    with the session's id in their data, not refused for the missing session."""
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    try:
        event_id = store.event("abort", "aborted before it began", session_id="never")
        await store.sync()
        assert store.stats.rejected == 0
        (event,) = await store.outbox_pending()
        assert event["id"] == event_id and event["session_id"] is None
        assert event["data"] == {"unrecorded_session_id": "never"}
    finally:
        await store.close()
