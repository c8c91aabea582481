"""The change log: every committed row change of the records, in commit order.

A replica (the clinic database, `pbmd.daemon.services.clinic_db`) needs to know
which rows changed since it last looked, in the order they were committed, without
asking the writer thread anything. Triggers on the record tables put the changed
row's key into ``changes`` inside the writer's own transaction; the key is
``INSERT OR REPLACE``d, so each row has one entry whose ``seq`` (AUTOINCREMENT:
never reused) is the sequence number of its latest change. The table holds at most
one entry per record row, and costs the writer one small insert per row written.

The log is added by `ensure_change_log` at every open, after the schema and its
migrations, whatever the schema version: it is additive (a table and triggers,
nothing else changes) and idempotent. A trigger that was missing (a database made
before the log, or a table a migration rebuilt) is created and every row of its
table is logged once, so a replica sees rows that changed while it was missing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pbmd.daemon.services.records.records_courses import COURSE_KEYS

KEYS: Mapping[str, tuple[str, ...]] = {
    "sessions": ("id",),
    "steps": ("session_id", "port", "step_index"),
    "emissions": ("seq",),
    "events": ("id",),
    **COURSE_KEYS,
}
"""The logged tables, in the order a first log lists their rows, and each one's key
columns (joined with '/' into the logged key)."""

_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

_CHANGES_TABLE = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    utc TEXT NOT NULL,
    UNIQUE (tbl, key)
)
"""


def _key_sql(table: str, prefix: str) -> str:
    return " || '/' || ".join(f"{prefix}{c}" for c in KEYS[table])


def _trigger_sql(table: str, event: str) -> str:
    return (
        f"CREATE TRIGGER IF NOT EXISTS changes_{table}_{event.lower()} AFTER {event} ON {table} "
        f"BEGIN INSERT OR REPLACE INTO changes (tbl, key, utc) "
        f"VALUES ('{table}', {_key_sql(table, 'NEW.')}, {_NOW}); END"
    )


def ensure_change_log(conn: sqlite3.Connection) -> None:
    """Create the change log and its triggers where missing (on the writer's connection)."""
    wanted = {f"changes_{t}_{e}" for t in KEYS for e in ("insert", "update")}
    present = {
        str(r[0])
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger')")
    }
    if "changes" in present and wanted <= present:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CHANGES_TABLE)
        for table in KEYS:
            if f"changes_{table}_insert" in present and f"changes_{table}_update" in present:
                continue
            conn.execute(
                f"INSERT OR REPLACE INTO changes (tbl, key, utc) "
                f"SELECT '{table}', {_key_sql(table, '')}, {_NOW} FROM {table} ORDER BY rowid"
            )
            for event in ("INSERT", "UPDATE"):
                conn.execute(_trigger_sql(table, event))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@dataclass(frozen=True, slots=True)
class Change:
    """One changed row as it is now: its table, its key, its full row."""

    seq: int
    table: str
    key: str
    utc: str
    row: dict[str, Any] | None
    """None if the row is gone (never, today: records are not deleted)."""


def read_changes(conn: sqlite3.Connection, after: int, limit: int) -> list[Change]:
    """The rows changed after ``after``, oldest change first (call inside one read
    transaction, on a connection with ``row_factory = sqlite3.Row``)."""
    out: list[Change] = []
    for seq, table, key, utc in conn.execute(
        "SELECT seq, tbl, key, utc FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
        (int(after), int(limit)),
    ).fetchall():
        columns = KEYS.get(str(table))
        if columns is None:
            continue
        parts = str(key).rsplit("/", len(columns) - 1)  # only the first column is text
        where = " AND ".join(f"{c} = ?" for c in columns)
        row = conn.execute(f"SELECT * FROM {table} WHERE {where}", parts).fetchone()
        out.append(Change(int(seq), str(table), str(key), str(utc), _plain(row)))
    return out


def backlog(conn: sqlite3.Connection, after: int) -> tuple[int, int, str | None]:
    """(rows changed after ``after``, the latest seq, the oldest unsent change's time)."""
    count, last = conn.execute(
        "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM changes WHERE seq > ?", (int(after),)
    ).fetchone()
    first = conn.execute(
        "SELECT utc FROM changes WHERE seq > ? ORDER BY seq LIMIT 1", (int(after),)
    ).fetchone()
    return int(count), int(last), None if first is None else str(first[0])


def _plain(row: Any) -> dict[str, Any] | None:
    return None if row is None else dict(row)
