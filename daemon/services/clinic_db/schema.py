"""The clinic database's schema, its version table and its migrations.

One table holds every replicated row: ``record_rows``, keyed by (workstation,
local table, the row's local key), with the whole SQLite row as JSONB and the
columns clinic-wide reads filter on (session, patient, start time) beside it. A
column the workstation's records gain later arrives in the JSONB without a server
migration, and a new kind of record (patients, courses, outcomes) is a new
``tbl`` value. ``workstations`` keeps each workstation's high-water mark: the
last local change whose rows are in, written in the same transaction as them.

``pbmd_schema`` lists the versions applied. A server whose schema is newer than
this pbmd knows is refused (`SchemaTooNew`): replication waits, nothing is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

SERVER_SCHEMA_VERSION = 2
"""The clinic schema this pbmd writes and reads."""

_LOCK_ID = 0x70626D64  # "pbmd": one migration at a time across workstations

MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 0 -> 1: the replicated rows and the workstations' high-water marks.
    0: (
        """
        CREATE TABLE workstations (
            workstation_id text PRIMARY KEY,
            high_water bigint NOT NULL DEFAULT 0,
            last_change_utc text,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """,
        """
        CREATE TABLE record_rows (
            workstation_id text NOT NULL REFERENCES workstations,
            tbl text NOT NULL,
            local_key text NOT NULL,
            change_seq bigint NOT NULL,
            session_id text,
            patient_ref text,
            started_utc text,
            row jsonb NOT NULL,
            replicated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (workstation_id, tbl, local_key)
        )
        """,
        "CREATE INDEX record_rows_session ON record_rows (session_id, tbl)",
        """
        CREATE INDEX record_rows_patient ON record_rows (patient_ref, started_utc)
            WHERE tbl = 'sessions'
        """,
    ),
    # 1 -> 2: patients, courses, course visits and outcomes (records schema 4) arrive as
    # new tbl values; a course's rows are found by its id, a patient's by patient_ref.
    1: (
        "ALTER TABLE record_rows ADD COLUMN course_id text",
        "CREATE INDEX record_rows_course ON record_rows (course_id, tbl) "
        "WHERE course_id IS NOT NULL",
        """
        CREATE INDEX record_rows_patient_records ON record_rows (patient_ref, tbl)
            WHERE tbl IN ('patients', 'patient_screening', 'courses')
        """,
    ),
}
"""From a version to the next: the statements, run in one transaction."""


class ClinicSchemaError(Exception):
    """The clinic database's schema is not the one this pbmd writes."""


class SchemaTooNew(ClinicSchemaError):
    """The server's schema is newer than this pbmd knows: refused, replication waits."""


class SchemaTooOld(ClinicSchemaError):
    """The server's schema is older (or missing) and migrating is not configured."""


def too_new_message(found: int) -> str:
    return (
        f"the clinic database has schema version {found}, newer than this pbmd knows "
        f"({SERVER_SCHEMA_VERSION}); upgrade pbmd on this workstation. Replication waits: "
        "the records stay on this workstation and are sent once pbmd is upgraded"
    )


async def server_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The schema version applied on the server (0: none)."""
    cur = await conn.execute(
        "SELECT to_regclass('pbmd_schema') IS NOT NULL",
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM pbmd_schema")
    row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


async def check(conn: psycopg.AsyncConnection[Any]) -> int:
    """Raise unless the server's schema is exactly this pbmd's; returns the version."""
    found = await server_version(conn)
    if found > SERVER_SCHEMA_VERSION:
        raise SchemaTooNew(too_new_message(found))
    if found < SERVER_SCHEMA_VERSION:
        raise SchemaTooOld(
            f"the clinic database has schema version {found}, this pbmd needs "
            f"{SERVER_SCHEMA_VERSION}; run `pbmd clinic-db migrate` (or set "
            "clinic_db.migrate = true). Replication waits"
        )
    return found


async def migrate(conn: psycopg.AsyncConnection[Any], pbmd_version: str = "") -> list[int]:
    """Bring the server's schema up to this pbmd's, in one transaction per run; returns
    the versions applied (none if up to date). Raises SchemaTooNew for a newer one."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS pbmd_schema (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now(),
                pbmd_version text
            )
            """
        )
        found = await server_version(conn)
        if found > SERVER_SCHEMA_VERSION:
            raise SchemaTooNew(too_new_message(found))
        for version in range(found, SERVER_SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO pbmd_schema (version, pbmd_version) VALUES (%s, %s)",
                (version + 1, pbmd_version),
            )
            applied.append(version + 1)
    return applied
