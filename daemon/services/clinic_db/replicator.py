"""The replicator: copies the committed records rows to the clinic database, in commit order.

It runs as one task of its own, with its own PostgreSQL connection. It reads the
records' change log (`records.changes`) through the store's read path (a
read-only SQLite connection in a worker thread), so it never waits on the records
writer and never touches the event loop's safety work beyond a few awaits. Each
batch is upserted in one server transaction together with this workstation's
high-water mark, so after an outage or a restart it resumes exactly after the
last change the server holds; a replayed batch overwrites rows with the same
values (keyed by workstation, table and local key), so nothing is duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog

from pbmd.daemon.services.clinic_db import schema
from pbmd.daemon.services.clinic_db.connection import connect, describe, server_text
from pbmd.daemon.services.config import ClinicDbConfig
from pbmd.daemon.services.records import RecordsError, RecordStore
from pbmd.daemon.services.records.changes import Change

log = structlog.get_logger()

_UPSERT = """
INSERT INTO record_rows AS r
    (workstation_id, tbl, local_key, change_seq, session_id, patient_ref, started_utc, row,
     course_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)
ON CONFLICT (workstation_id, tbl, local_key) DO UPDATE SET
    change_seq = EXCLUDED.change_seq, session_id = EXCLUDED.session_id,
    patient_ref = EXCLUDED.patient_ref, started_utc = EXCLUDED.started_utc,
    row = EXCLUDED.row, course_id = EXCLUDED.course_id, replicated_at = now()
"""


STOPPED_LOG_INTERVAL_S = 300.0
"""While replication stays stopped, the log says so (with the lag) this often."""

DRAIN_S = 2.0
"""The longest `Replicator.close` spends sending what is committed (the daemon's stop)."""


class ReplicationStopped(Exception):
    """Replication cannot go on until someone acts (the message says what to do)."""


_TIME_COLUMNS = (
    "started_utc",
    "utc",
    "visit_utc",
    "recorded_utc",
    "opened_utc",
    "created_utc",
    "answered_utc",
)
"""The column each table's rows are dated by (the first a row has)."""


def _patient_of(table: str, row: dict[str, Any]) -> Any:
    """The patient a row names: sessions by patient_ref, the course tables by patient id."""
    if table == "sessions":
        return row.get("patient_ref")
    if table == "patients":
        return row.get("id")
    return row.get("patient_id")


def _params(workstation_id: str, changes: Sequence[Change]) -> list[tuple[Any, ...]]:
    """The upsert parameters of a batch (JSON encoded; run off the loop)."""
    out = []
    for c in changes:
        row = c.row
        if row is None:
            continue
        session_id = row.get("id") if c.table == "sessions" else row.get("session_id")
        started = next((row[k] for k in _TIME_COLUMNS if row.get(k) is not None), None)
        out.append(
            (
                workstation_id,
                c.table,
                c.key,
                c.seq,
                session_id,
                _patient_of(c.table, row),
                started,
                json.dumps(row, ensure_ascii=False, allow_nan=False),
                row.get("id") if c.table == "courses" else row.get("course_id"),
            )
        )
    return out


def _age_s(utc: str | None) -> float:
    if utc is None:
        return 0.0
    when = datetime.strptime(utc, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return max(0.0, round(time.time() - when.timestamp(), 3))


class Replicator:
    """Copies this workstation's records to the clinic database. ``await start()``
    returns at once (it never waits for the server); ``await close()`` ends it."""

    def __init__(self, config: ClinicDbConfig, store: RecordStore, device_id: str) -> None:
        self.config = config
        self.store = store
        self.workstation_id = config.resolved_workstation_id(device_id)
        self.server = server_text(config)
        self.state = "starting"
        self.reason: str | None = None
        self.high_water: int | None = None
        self.behind_rows: int | None = None
        self.behind_s: float | None = None
        self.sent_rows = 0
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()
        self._draining = False
        self._stopped_logged = -math.inf
        self._task: asyncio.Task[None] | None = None
        self._remove_listener: Any = None

    def status(self) -> dict[str, Any]:
        """The ``replication`` object of status and MQTT."""
        return {
            "state": self.state,
            "reason": self.reason,
            **self._lag_fields(),
            "sent_rows": self.sent_rows,
            "server": self.server,
        }

    async def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        """The status once ``predicate(status)`` holds (for tests and tools);
        TimeoutError with the last status otherwise."""
        async with asyncio.timeout(timeout_s):
            while not predicate(status := self.status()):
                await self._changed.wait()
        return status

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def start(self) -> None:
        self._remove_listener = self.store.add_commit_listener(lambda _n: self._kick.set())
        self._task = asyncio.create_task(self._run(), name="clinic-db-replicator")
        log.info("clinic_db.started", server=self.server, workstation_id=self.workstation_id)

    async def close(self, drain_s: float = DRAIN_S) -> None:
        """End replication. While the server is reachable, what is committed by now is
        sent first (for at most ``drain_s``): a workstation switched off at the end of
        the day leaves the clinic copy complete. The rest is sent at the next start."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        task, self._task = self._task, None
        if task is None:
            return
        if self.state == "replicating" and drain_s > 0:
            self._draining = True
            self._kick.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), drain_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("clinic_db.closed", **self._lag_fields())

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        while not self._draining:
            try:
                async with await connect(self.config) as conn:
                    await self._prepare(conn)
                    await self._replicate(conn)
                    return  # drained at close
            except (psycopg.Error, OSError, ValueError, schema.ClinicSchemaError) as exc:
                self._stopped(describe(exc, self.config))
            except ReplicationStopped as exc:
                self._stopped(str(exc))
            except RecordsError as exc:
                self._stopped(f"the workstation's records cannot be read: {exc}")
            await self._refresh_backlog()
            await asyncio.sleep(self.config.retry_s)

    async def _prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.config.migrate:
            applied = await schema.migrate(conn)
            if applied:
                log.info("clinic_db.migrated", server=self.server, versions=applied)
        await schema.check(conn)
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO workstations (workstation_id) VALUES (%s) ON CONFLICT DO NOTHING",
                (self.workstation_id,),
            )
            cur = await conn.execute(
                "SELECT high_water FROM workstations WHERE workstation_id = %s",
                (self.workstation_id,),
            )
            row = await cur.fetchone()
        high_water = int(row[0]) if row is not None else 0
        _, latest, _ = await self.store.change_backlog(0)
        if high_water > latest:
            raise ReplicationStopped(
                f"the clinic database holds changes up to {high_water} from workstation "
                f"{self.workstation_id!r} but its records only go to {latest}: the records file "
                "was replaced. Give this workstation a new clinic_db.workstation_id"
            )
        self.high_water = high_water

    async def _replicate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self.high_water is not None
        resumed = self.state != "replicating"
        while True:
            self._kick.clear()
            changes = await self.store.changes_since(self.high_water, self.config.batch_rows)
            if changes:
                await self._send(conn, changes)
            await self._refresh_backlog()
            if resumed:
                resumed = False
                self._set_state("replicating", None)
                log.info("clinic_db.replicating", server=self.server, **self._lag_fields())
            if len(changes) < self.config.batch_rows:
                if self._draining:
                    return
                # Caught up: wait for the next commit (or check the link now and then).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.config.retry_s)
                if not self._kick.is_set():
                    await conn.execute("SELECT 1")

    async def _send(self, conn: psycopg.AsyncConnection[Any], changes: list[Change]) -> None:
        params = await asyncio.to_thread(_params, self.workstation_id, changes)
        last = changes[-1]
        async with conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(_UPSERT, params)
            await conn.execute(
                "UPDATE workstations SET high_water = %s, last_change_utc = %s, "
                "updated_at = now() WHERE workstation_id = %s",
                (last.seq, last.utc, self.workstation_id),
            )
        self.high_water = last.seq
        self.sent_rows += len(params)

    async def _refresh_backlog(self) -> None:
        if self.high_water is None:
            return
        try:
            count, _, oldest = await self.store.change_backlog(self.high_water)
        except RecordsError:
            return
        self.behind_rows = count
        self.behind_s = _age_s(oldest)
        self._notify()

    def _stopped(self, reason: str) -> None:
        now = time.monotonic()
        if (
            self.state != "stopped"
            or self.reason != reason
            or now - self._stopped_logged >= STOPPED_LOG_INTERVAL_S
        ):
            # Said when it stops, and again now and then while the backlog grows.
            self._stopped_logged = now
            log.warning("clinic_db.stopped", reason=reason, **self._lag_fields())
        self._set_state("stopped", reason)

    def _set_state(self, state: str, reason: str | None) -> None:
        self.state, self.reason = state, reason
        self._notify()

    def _lag_fields(self) -> dict[str, Any]:
        return {
            "workstation_id": self.workstation_id,
            "behind_rows": self.behind_rows,
            "behind_s": self.behind_s,
            "high_water": self.high_water,
        }
