"""Reading the records: sessions, the MQTT outbox, and exports (JSON, CSV).

Every read opens its own read-only connection in a worker thread
(`asyncio.to_thread`) and reads one snapshot, so reads never wait on the writer
and never run on the event loop.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pbmd.daemon.core.reconciliation import GAVE_UP
from pbmd.daemon.core.recording import RecordsUnavailable, UtcTime
from pbmd.daemon.services.records.changes import Change, backlog, read_changes
from pbmd.daemon.services.records.schema import SCHEMA_VERSION, utc_text

ExportFormat = Literal["json", "csv"]
T = TypeVar("T")


class RecordReads:
    """The read side of `RecordStore` (a part of it, not used alone)."""

    path: Path
    _busy_timeout_s: float

    def _connect_read(self) -> sqlite3.Connection:
        uri = self.path.as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                isolation_level=None,
                timeout=self._busy_timeout_s,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise RecordsUnavailable(
                f"Treatment records at {self.path} cannot be read ({exc}). Check that the file "
                f"exists and is readable by the pbmd user."
            ) from exc
        conn.row_factory = sqlite3.Row
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._connect_read()
            try:
                conn.execute("BEGIN")  # one snapshot for every query of the read
                try:
                    return fn(conn)
                finally:
                    conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise RecordsUnavailable(
                    f"Reading treatment records from {self.path} failed ({exc})."
                ) from exc
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    async def list_sessions(
        self,
        limit: int = 50,
        offset: int = 0,
        since_utc: UtcTime = None,
        patient_ref: str | None = None,
    ) -> list[dict[str, Any]]:
        """Sessions, newest first, with their step count and delivered totals (only one
        patient's with ``patient_ref``)."""
        since = utc_text(since_utc) if since_utc is not None else None

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                """
                SELECT s.id, s.started_utc, s.ended_utc, s.state, s.outcome, s.stop_cause_code,
                    s.stop_cause_message, s.protocol_id, s.protocol_version, s.protocol_title,
                    s.patient_ref, s.operator, s.controller_serial,
                    (SELECT COUNT(*) FROM steps t WHERE t.session_id = s.id) AS steps,
                    (SELECT SUM(t.prescribed_energy_j) FROM steps t WHERE t.session_id = s.id)
                        AS prescribed_energy_j,
                    (SELECT SUM(t.delivered_host_j) FROM steps t WHERE t.session_id = s.id)
                        AS delivered_host_j,
                    (SELECT SUM(t.delivered_controller_j) FROM steps t
                        WHERE t.session_id = s.id) AS delivered_controller_j
                FROM sessions s
                WHERE (? IS NULL OR s.started_utc >= ?) AND (? IS NULL OR s.patient_ref = ?)
                ORDER BY s.started_utc DESC, s.id
                LIMIT ? OFFSET ?
                """,
                (since, since, patient_ref, patient_ref, int(limit), int(offset)),
            ).fetchall()
            return [dict(r) for r in rows]

        return await self._read(q)

    async def match_session_ids(self, prefix: str, limit: int = 11) -> list[str]:
        """Ids of the sessions whose id starts with ``prefix`` (the id itself included),
        in id order: a range of the primary key, never a scan."""
        if not prefix:
            return []
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)

        def q(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM sessions WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                (prefix, upper, int(limit)),
            )
            return [str(r[0]) for r in rows]

        return await self._read(q)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session with its steps, emissions and events (JSON columns decoded)."""
        return await self._read(lambda conn: _load_session(conn, session_id, events=True))

    async def unfinished_sessions(self) -> list[dict[str, Any]]:
        """Sessions never closed (the daemon died), with steps and emissions, oldest first.

        The engine reconciles each from GET_COUNTERS (reconcile_emission,
        reconcile_port) and closes it: session_ended(outcome="interrupted").
        """

        return await self._read(lambda conn: _sessions_where(conn, "ended_utc IS NULL"))

    async def sessions_to_reconcile(self) -> list[dict[str, Any]]:
        """Sessions whose dose waits for GET_COUNTERS, oldest first: those never closed
        and those holding a provisional emission (its link was lost while it ran)."""
        where = (
            "ended_utc IS NULL OR (id IN (SELECT session_id FROM emissions "
            "WHERE controller_energy_source = 'provisional') AND id NOT IN (SELECT "
            f"session_id FROM events WHERE kind = '{GAVE_UP}' AND session_id IS NOT NULL))"
        )
        return await self._read(lambda conn: _sessions_where(conn, where))

    async def changes_since(self, after: int, limit: int = 500) -> list[Change]:
        """Rows changed after change ``after``, as they are now, oldest change first
        (the change log, `changes`: for replicas such as the clinic database)."""
        return await self._read(lambda conn: read_changes(conn, after, limit))

    async def change_backlog(self, after: int) -> tuple[int, int, str | None]:
        """(rows changed after ``after``, the latest change, the oldest one's time)."""
        return await self._read(lambda conn: backlog(conn, after))

    async def outbox_pending(self, limit: int = 100) -> list[dict[str, Any]]:
        """Unpublished events in the order they were recorded (oldest first)."""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                """
                SELECT o.seq AS outbox_seq, e.* FROM outbox o JOIN events e ON e.id = o.event_id
                WHERE o.published_utc IS NULL ORDER BY o.seq LIMIT ?
                """,
                (int(limit),),
            ).fetchall()
            return [_event_dict(r) for r in rows]

        return await self._read(q)

    async def export(
        self,
        format: ExportFormat = "json",
        *,
        since_utc: UtcTime = None,
        session_ids: Sequence[str] | None = None,
    ) -> str:
        """Every session (or the ones named) as JSON, or one CSV row per step."""
        if format not in ("json", "csv"):
            raise ValueError(f"export format {format!r}: use 'json' or 'csv'")
        since = utc_text(since_utc) if since_utc is not None else None

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            if session_ids is not None:
                ids = list(session_ids)
            else:
                ids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT id FROM sessions WHERE (? IS NULL OR started_utc >= ?) "
                        "ORDER BY started_utc, id",
                        (since, since),
                    )
                ]
            sessions = []
            for sid in ids:
                s = _load_session(conn, sid, events=format == "json")
                if s is not None:
                    sessions.append(s)
            return sessions

        def render(conn: sqlite3.Connection) -> str:
            # Rendering a large export takes as long as reading it: both stay off the loop.
            sessions = q(conn)
            if format == "json":
                doc = {
                    "format": "pbmd-records",
                    "schema_version": SCHEMA_VERSION,
                    "exported_utc": utc_text(),
                    "sessions": sessions,
                }
                return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
            return steps_csv(sessions)

        return await self._read(render)


_CSV_SESSION_COLUMNS = (
    "started_utc",
    "ended_utc",
    "outcome",
    "stop_cause_code",
    "protocol_id",
    "protocol_version",
    "protocol_sha256",
    "plan_hash",
    "patient_ref",
    "controller_serial",
)
_CSV_STEP_COLUMNS = (
    "port",
    "step_index",
    "site",
    "site_label",
    "technique",
    "wavelength_nm",
    "mode",
    "pulse_hz",
    "duty_permille",
    "pulse_width_ns",
    "peak_power_mw",
    "power_setpoint_mw",
    "area_cm2",
    "target_kind",
    "target_value",
    "prescribed_energy_j",
    "prescribed_fluence_j_cm2",
    "planned_time_s",
    "delivered_host_j",
    "delivered_controller_j",
    "delivered_fluence_j_cm2",
    "mean_irradiance_mw_cm2",
    "emitting_time_s",
    "outcome",
    "stop_cause_code",
    "stop_cause_message",
    "started_utc",
    "ended_utc",
)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet may take a text cell starting with for a formula (OWASP, CSV
injection): such a cell is written with a leading apostrophe."""


def csv_cell(value: Any) -> Any:
    """A cell as written: None empty, text that a spreadsheet would run as a formula
    (``=cmd|…``) neutralised with a leading ', numbers as they are."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def steps_csv(sessions: Sequence[Mapping[str, Any]]) -> str:
    """One row per step, RFC 4180 (CRLF line ends, quoted where needed)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        ["session_id"]
        + [f"session_{c}" for c in _CSV_SESSION_COLUMNS]
        + [
            f"step_{c}"
            if c in ("outcome", "started_utc", "ended_utc", "stop_cause_code", "stop_cause_message")
            else c
            for c in _CSV_STEP_COLUMNS
        ]
    )
    for s in sessions:
        head = [s["id"]] + [s.get(c) for c in _CSV_SESSION_COLUMNS]
        for step in s["steps"]:
            writer.writerow([csv_cell(v) for v in head + [step.get(c) for c in _CSV_STEP_COLUMNS]])
    return out.getvalue()


def _event_dict(row: sqlite3.Row | Mapping[str, Any]) -> dict[str, Any]:
    d = dict(row)
    raw = d.pop("data_json", None)
    d["data"] = None if raw is None else json.loads(raw)
    return d


def _sessions_where(conn: sqlite3.Connection, where: str) -> list[dict[str, Any]]:
    """The sessions a condition selects, with steps and emissions, oldest first."""
    sql = f"SELECT id FROM sessions WHERE {where} ORDER BY started_utc, id"
    out = []
    for (sid,) in conn.execute(sql).fetchall():
        s = _load_session(conn, sid, events=False)
        if s is not None:
            out.append(s)
    return out


def _load_session(
    conn: sqlite3.Connection, session_id: str, *, events: bool
) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        return None
    steps = conn.execute(
        "SELECT * FROM steps WHERE session_id = ? ORDER BY port, step_index", (session_id,)
    )
    emissions = conn.execute(
        "SELECT * FROM emissions WHERE session_id = ? ORDER BY seq", (session_id,)
    )
    event_rows = (
        conn.execute("SELECT * FROM events WHERE session_id = ? ORDER BY seq", (session_id,))
        if events
        else None
    )
    return session_from_rows(
        dict(row),
        [dict(r) for r in steps],
        [dict(r) for r in emissions],
        None if event_rows is None else [dict(r) for r in event_rows],
    )


def session_from_rows(
    session: dict[str, Any],
    steps: list[dict[str, Any]],
    emissions: list[dict[str, Any]],
    events: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """A session's record as the reads answer it, from its raw table rows (steps in
    (port, step_index) order, emissions and events in seq order): the JSON columns
    decoded. The clinic database's reads answer the same from its copies of the rows."""
    s = dict(session)
    s["contraindications"] = json.loads(s.pop("contraindications_json"))
    s["ports"] = json.loads(s.pop("ports_json"))
    s["steps"] = steps
    s["emissions"] = emissions
    if events is not None:
        s["events"] = [_event_dict(e) for e in events]
    return s
