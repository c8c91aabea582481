"""Fixtures of the clinic database tests: a PostgreSQL database of their own.

The server is the machine's PostgreSQL on 127.0.0.1:5432 (trust authentication).
Each test creates a database with a unique name and drops it at the end; no other
database is touched. An outage is simulated on that database alone (connections
refused, the open ones terminated), never by stopping the shared server.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pbmd.daemon.services.records.changes import KEYS

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class ClinicServer:
    """One test's database on the shared server, and the outage switch."""

    name: str

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{self.name}"

    def admin(self, sql: str) -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.encode())

    def outage(self) -> None:
        """The database refuses connections and the open ones are cut."""
        self.admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{self.name}' AND pid <> pg_backend_pid()"
        )

    def restore(self) -> None:
        self.admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.encode())

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return list(conn.execute(sql.encode(), params).fetchall())

    def rows(self, workstation_id: str) -> dict[str, dict[str, Any]]:
        """Per local table: local key -> the row the clinic holds."""
        out: dict[str, dict[str, Any]] = {t: {} for t in KEYS}
        for tbl, key, row in self.query(
            "SELECT tbl, local_key, row FROM record_rows WHERE workstation_id = %s",
            (workstation_id,),
        ):
            out[tbl][key] = row
        return out


def local_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Per table: key -> row, read from a workstation's SQLite records."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        out: dict[str, dict[str, Any]] = {}
        for table, columns in KEYS.items():
            out[table] = {
                "/".join(str(r[c]) for c in columns): json.loads(json.dumps(dict(r)))
                for r in conn.execute(f"SELECT * FROM {table}")
            }
        return out
    finally:
        conn.close()


def assert_same(server: ClinicServer, workstation_id: str, path: Path) -> None:
    """The clinic copy equals the workstation's records row for row."""
    local = local_rows(path)
    remote = server.rows(workstation_id)
    for table in KEYS:
        assert remote[table].keys() == local[table].keys(), table
        for key, row in local[table].items():
            assert remote[table][key] == row, (table, key)
    assert sum(len(v) for v in local.values()) > 0


@pytest.fixture
def clinic_server() -> Iterator[ClinicServer]:
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL server on 127.0.0.1:5432 ({exc})")
    server = ClinicServer(f"pbmd_test_{uuid.uuid4().hex[:12]}")
    server.admin(f'CREATE DATABASE "{server.name}"')
    try:
        yield server
    finally:
        server.admin(f'DROP DATABASE IF EXISTS "{server.name}" WITH (FORCE)')
