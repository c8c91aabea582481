"""The replicator against a real PostgreSQL server, with a records store in-process:
commit order, idempotence, outages, restarts, a newer server schema, bad settings."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from records import synthetic as syn

from pbmd.daemon.services.clinic_db import ClinicReads, Replicator, schema
from pbmd.daemon.services.config import ClinicDbConfig
from pbmd.daemon.services.records import RecordStore

from .conftest import ClinicServer, assert_same, local_rows

TIMEOUT_S = 20.0


def _config(url: str, **extra: Any) -> ClinicDbConfig:
    return ClinicDbConfig(url=url, retry_s=0.2, connect_timeout_s=2.0, **extra)


def _caught_up(st: dict[str, Any]) -> bool:
    return st["state"] == "replicating" and st["behind_rows"] == 0


def _stopped(st: dict[str, Any]) -> bool:
    return st["state"] == "stopped"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordStore]:
    s = await RecordStore.open(tmp_path / "records.sqlite", sync_interval_s=0.05, min_free_bytes=0)
    try:
        yield s
    finally:
        await s.close()


async def test_rows_are_copied_and_a_replay_changes_nothing(
    store: RecordStore, clinic_server: ClinicServer
) -> None:
    syn.write_completed(store, "s-1")
    syn.write_faulted(store, "s-2")
    await store.sync()
    rep = Replicator(_config(clinic_server.url), store, "ws-a")
    await rep.start()
    try:
        st = await rep.wait_until(_caught_up, TIMEOUT_S)
        assert st["workstation_id"] == "ws-a" and st["reason"] is None
        assert_same(clinic_server, "ws-a", store.path)
        # What is committed when the daemon stops is sent before the replicator ends.
        syn.write_faulted(store, "s-3")
        await store.sync()
    finally:
        await rep.close()
    assert_same(clinic_server, "ws-a", store.path)
    ((hw,),) = clinic_server.query("SELECT high_water FROM workstations")
    # A replay from the start (the high-water mark lost) overwrites, never duplicates.
    clinic_server.execute("UPDATE workstations SET high_water = 0")
    rep = Replicator(_config(clinic_server.url), store, "ws-a")
    await rep.start()
    try:
        await rep.wait_until(_caught_up, TIMEOUT_S)
    finally:
        await rep.close()
    assert_same(clinic_server, "ws-a", store.path)
    assert clinic_server.query("SELECT high_water FROM workstations") == [(hw,)]
    # Clinic reads answer like the workstation's own.
    reads = ClinicReads(_config(clinic_server.url))
    local = await store.get_session("s-1")
    clinic = await reads.get_session("s-1")
    assert clinic is not None and clinic.pop("workstation_id") == "ws-a"
    assert clinic == local
    listed = await reads.list_sessions(patient_ref=local["patient_ref"] if local else None)
    assert {s["id"] for s in listed} <= {"s-1", "s-2", "s-3"} and listed
    assert await reads.export("csv") == await store.export("csv")
    # Short ids: the prefixes the clinic holds, as the workstation's records answer them.
    assert await reads.match_session_ids("s-") == await store.match_session_ids("s-")
    assert await reads.match_session_ids("s-2") == ["s-2"]


async def test_an_outage_and_a_restart_lose_and_duplicate_nothing(
    store: RecordStore, clinic_server: ClinicServer
) -> None:
    syn.write_completed(store, "s-1")
    await store.sync()
    config = _config(clinic_server.url, batch_rows=7)
    rep = Replicator(config, store, "ws-a")
    await rep.start()
    try:
        await rep.wait_until(_caught_up, TIMEOUT_S)
        clinic_server.outage()
        syn.write_faulted(store, "s-2")
        await store.sync()
        st = await rep.wait_until(
            lambda s: _stopped(s) and "not currently accepting connections" in s["reason"],
            TIMEOUT_S,
        )
        assert st["behind_rows"] > 0, st
        assert st["behind_s"] is not None
    finally:
        await rep.close()
    clinic_server.restore()
    # A new replicator (a restarted daemon) resumes at the server's high-water mark,
    # in batches of 7 rows.
    rep = Replicator(config, store, "ws-a")
    await rep.start()
    try:
        st = await rep.wait_until(_caught_up, TIMEOUT_S)
    finally:
        await rep.close()
    assert 0 < st["sent_rows"] < sum(len(v) for v in local_rows(store.path).values())
    assert_same(clinic_server, "ws-a", store.path)


async def test_a_newer_server_schema_is_refused_and_nothing_is_written(
    store: RecordStore, clinic_server: ClinicServer
) -> None:
    syn.write_completed(store, "s-1")
    await store.sync()
    clinic_server.execute(
        "CREATE TABLE pbmd_schema (version integer PRIMARY KEY, applied_at timestamptz, "
        "pbmd_version text); INSERT INTO pbmd_schema VALUES (99, now(), 'future')"
    )
    rep = Replicator(_config(clinic_server.url), store, "ws-a")
    await rep.start()
    try:
        st = await rep.wait_until(_stopped, TIMEOUT_S)
    finally:
        await rep.close()
    assert "schema version 99, newer than this pbmd knows (2)" in st["reason"]
    assert "upgrade pbmd" in st["reason"]
    tables = clinic_server.query("SELECT to_regclass('record_rows') IS NULL")
    assert tables == [(True,)]


async def test_without_migrate_an_empty_server_waits_for_pbmd_clinic_db_migrate(
    store: RecordStore, clinic_server: ClinicServer
) -> None:
    rep = Replicator(_config(clinic_server.url, migrate=False), store, "ws-a")
    await rep.start()
    try:
        st = await rep.wait_until(_stopped, TIMEOUT_S)
        assert "run `pbmd clinic-db migrate`" in st["reason"]
        import psycopg

        async with await psycopg.AsyncConnection.connect(
            clinic_server.url, autocommit=True
        ) as conn:
            assert await schema.migrate(conn) == [1, 2]
            assert await schema.migrate(conn) == []
        await rep.wait_until(_caught_up, TIMEOUT_S)
    finally:
        await rep.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres@127.0.0.1:5432/pbmd_no_such_db", 'database "pbmd_no_such_db"'),
        ("postgresql://pbmd_no_such_role@127.0.0.1:5432/postgres", 'role "pbmd_no_such_role"'),
        ("postgresql://postgres@127.0.0.1:1/postgres", "check that the server runs"),
    ],
)
async def test_bad_settings_say_what_is_wrong(store: RecordStore, url: str, expected: str) -> None:
    rep = Replicator(_config(url), store, "ws-a")
    await rep.start()
    try:
        st = await rep.wait_until(_stopped, TIMEOUT_S)
    finally:
        await rep.close()
    assert expected in st["reason"], st["reason"]
    assert st["server"] in st["reason"]


async def test_the_change_log_is_added_to_an_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite"
    store = await RecordStore.open(path, min_free_bytes=0)
    syn.write_completed(store, "s-1")
    await store.close()
    # A database from before the change log.
    conn = sqlite3.connect(path)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DROP TABLE changes")
    conn.commit()
    conn.close()
    store = await RecordStore.open(path, min_free_bytes=0)
    try:
        changes = await store.changes_since(0, 10_000)
        rows = local_rows(path)
        assert len(changes) == sum(len(v) for v in rows.values())
        assert changes[0].table == "sessions"
        assert {(c.table, c.key) for c in changes} == {(t, k) for t in rows for k in rows[t]}
        assert all(c.row is not None for c in changes)
        before = changes[-1].seq
        syn.write_faulted(store, "s-2")
        await store.sync()
        later = await store.changes_since(before, 10_000)
        assert later and all(c.seq > before for c in later)
    finally:
        await store.close()


async def test_a_table_a_migration_rebuilt_is_logged_again(tmp_path: Path) -> None:
    """A records migration that copies a table into a new one (SQLite cannot alter a
    constraint) drops the table's triggers: the next open restores them and logs
    every row of that table again, so the clinic copy gets the rebuilt rows."""
    path = tmp_path / "records.sqlite"
    store = await RecordStore.open(path, min_free_bytes=0)
    syn.write_completed(store, "s-1")
    await store.close()
    conn = sqlite3.connect(path)
    (before,) = conn.execute("SELECT MAX(seq) FROM changes").fetchone()
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'emissions'").fetchone()
    conn.executescript(
        "BEGIN;"
        + sql.replace("CREATE TABLE emissions", "CREATE TABLE emissions_v2")
        + ";INSERT INTO emissions_v2 SELECT * FROM emissions; DROP TABLE emissions;"
        "ALTER TABLE emissions_v2 RENAME TO emissions; COMMIT;"
    )
    conn.close()
    store = await RecordStore.open(path, min_free_bytes=0)
    try:
        again = await store.changes_since(before, 10_000)
        emissions = local_rows(path)["emissions"]
        assert {c.key for c in again} == set(emissions) and emissions
        assert {c.table for c in again} == {"emissions"}
        syn.write_faulted(store, "s-2")
        await store.sync()
        later = await store.changes_since(again[-1].seq, 10_000)
        assert "emissions" in {c.table for c in later}
    finally:
        await store.close()
