"""Clinic-wide reads: every workstation's sessions, from the clinic database.

They answer in the shapes of the workstation's own reads (`RecordStore.list_sessions`,
`get_session`, `export`), each session with the ``workstation_id`` it was treated
at, so that the API, pbmctl and the report take either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg

from pbmd.daemon.services.clinic_db import schema
from pbmd.daemon.services.clinic_db.connection import connect, describe
from pbmd.daemon.services.config import ClinicDbConfig
from pbmd.daemon.services.records import ExportFormat, utc_text
from pbmd.daemon.services.records.reads import session_from_rows, steps_csv


class ClinicUnavailable(Exception):
    """The clinic database cannot answer (the message says why and what to do)."""


_LIST = """
SELECT s.workstation_id, s.row,
    (SELECT COUNT(*) FROM record_rows t WHERE t.session_id = s.session_id
        AND t.workstation_id = s.workstation_id AND t.tbl = 'steps') AS steps,
    (SELECT SUM((t.row->>'prescribed_energy_j')::float8) FROM record_rows t
        WHERE t.session_id = s.session_id AND t.workstation_id = s.workstation_id
        AND t.tbl = 'steps') AS prescribed_energy_j,
    (SELECT SUM((t.row->>'delivered_host_j')::float8) FROM record_rows t
        WHERE t.session_id = s.session_id AND t.workstation_id = s.workstation_id
        AND t.tbl = 'steps') AS delivered_host_j,
    (SELECT SUM((t.row->>'delivered_controller_j')::float8) FROM record_rows t
        WHERE t.session_id = s.session_id AND t.workstation_id = s.workstation_id
        AND t.tbl = 'steps') AS delivered_controller_j
FROM record_rows s
WHERE s.tbl = 'sessions'
    AND (%(patient)s::text IS NULL OR s.patient_ref = %(patient)s)
    AND (%(since)s::text IS NULL OR s.started_utc >= %(since)s)
    AND (%(ids)s::text[] IS NULL OR s.session_id = ANY(%(ids)s))
ORDER BY s.started_utc {order}, s.session_id
LIMIT %(limit)s OFFSET %(offset)s
"""

_LIST_COLUMNS = (
    "id",
    "started_utc",
    "ended_utc",
    "state",
    "outcome",
    "stop_cause_code",
    "stop_cause_message",
    "protocol_id",
    "protocol_version",
    "protocol_title",
    "patient_ref",
    "operator",
    "controller_serial",
)


class ClinicReads:
    """Reads of the clinic database; each opens its own short-lived connection."""

    def __init__(self, config: ClinicDbConfig) -> None:
        self.config = config

    async def _query(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        try:
            async with await connect(self.config) as conn:
                await schema.check(conn)
                cur = await conn.execute(sql.encode(), params)
                return list(await cur.fetchall())
        except (psycopg.Error, OSError, ValueError, schema.ClinicSchemaError) as exc:
            raise ClinicUnavailable(describe(exc, self.config)) from None

    async def list_sessions(
        self,
        limit: int = 50,
        offset: int = 0,
        since_utc: Any = None,
        patient_ref: str | None = None,
    ) -> list[dict[str, Any]]:
        """Sessions of every workstation, newest first, with their totals."""
        rows = await self._list(
            limit, offset, since_utc=since_utc, patient_ref=patient_ref, newest_first=True
        )
        out = []
        for ws, row, steps, prescribed, host, controller in rows:
            entry = {c: row.get(c) for c in _LIST_COLUMNS}
            entry.update(
                workstation_id=ws,
                steps=int(steps),
                prescribed_energy_j=prescribed,
                delivered_host_j=host,
                delivered_controller_j=controller,
            )
            out.append(entry)
        return out

    async def _list(
        self,
        limit: int | None,
        offset: int,
        *,
        since_utc: Any = None,
        patient_ref: str | None = None,
        session_ids: Sequence[str] | None = None,
        newest_first: bool,
    ) -> list[tuple[Any, ...]]:
        params = {
            "patient": patient_ref,
            "since": utc_text(since_utc) if since_utc is not None else None,
            "ids": list(session_ids) if session_ids is not None else None,
            "limit": limit,
            "offset": int(offset),
        }
        sql = _LIST.format(order="DESC" if newest_first else "ASC")
        return await self._query(sql, params)

    async def match_session_ids(self, prefix: str, limit: int = 11) -> list[str]:
        """Ids of the sessions (of every workstation) whose id starts with ``prefix``."""
        rows = await self._query(
            "SELECT DISTINCT session_id FROM record_rows WHERE tbl = 'sessions' AND "
            "left(session_id, %(n)s) = %(prefix)s ORDER BY 1 LIMIT %(limit)s",
            {"n": len(prefix), "prefix": prefix, "limit": int(limit)},
        )
        return [str(r[0]) for r in rows]

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session with its steps, emissions and events, and its workstation."""
        rows = await self._query(
            "SELECT workstation_id, tbl, row FROM record_rows WHERE session_id = %(id)s",
            {"id": session_id},
        )
        return _assemble(session_id, rows, events=True)

    async def export(
        self,
        format: ExportFormat = "json",
        *,
        since_utc: Any = None,
        session_ids: Sequence[str] | None = None,
        patient_ref: str | None = None,
    ) -> str:
        """Every workstation's sessions (or the ones named, or one patient's), oldest first."""
        if format not in ("json", "csv"):
            raise ValueError(f"export format {format!r}: use 'json' or 'csv'")
        listed = await self._list(
            None,
            0,
            since_utc=since_utc,
            patient_ref=patient_ref,
            session_ids=session_ids,
            newest_first=False,
        )
        ids = [str(r[1]["id"]) for r in listed]
        rows = await self._query(
            "SELECT workstation_id, tbl, row FROM record_rows WHERE session_id = ANY(%(ids)s)",
            {"ids": ids},
        )
        by_session: dict[str, list[tuple[Any, ...]]] = {}
        for r in rows:
            sid = r[2].get("id") if r[1] == "sessions" else r[2].get("session_id")
            by_session.setdefault(str(sid), []).append(r)
        sessions = [
            s
            for sid in ids
            if (s := _assemble(sid, by_session.get(sid, []), events=format == "json"))
        ]
        if format == "csv":
            return steps_csv(sessions)
        doc = {
            "format": "pbmd-records",
            "clinic": True,
            "schema_version": schema.SERVER_SCHEMA_VERSION,
            "exported_utc": utc_text(),
            "sessions": sessions,
        }
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _assemble(
    session_id: str, rows: Sequence[tuple[Any, ...]], *, events: bool
) -> dict[str, Any] | None:
    """One session from its rows (session ids are UUIDs: one workstation holds it)."""
    session = next((r for r in rows if r[1] == "sessions" and r[2]["id"] == session_id), None)
    if session is None:
        return None
    ws = session[0]
    tables: dict[str, list[dict[str, Any]]] = {"steps": [], "emissions": [], "events": []}
    for r in rows:
        if r[0] == ws and r[1] in tables:
            tables[r[1]].append(r[2])
    tables["steps"].sort(key=lambda s: (s["port"], s["step_index"]))
    tables["emissions"].sort(key=lambda e: e["seq"])
    tables["events"].sort(key=lambda e: e["seq"])
    out = session_from_rows(
        session[2], tables["steps"], tables["emissions"], tables["events"] if events else None
    )
    out["workstation_id"] = ws
    return out
