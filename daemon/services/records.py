"""Treatment records: SQLite in WAL mode, written by one thread, never on the event loop.

A treatment that cannot be recorded must not run, and a record must survive a
crash of the daemon. Both are easy to get wrong from asyncio: one `commit()` on
the loop thread can stall it for the length of an fsync (tens of milliseconds on
a healthy disk, seconds on a failing one), and that loop also runs the dose
integrator and the safety supervisor. So:

- every write method here is a plain synchronous call that only puts a record
  on a queue (O(1), no I/O on the loop thread);
- one writer thread owns the only write connection and commits what is pending
  in batches, at least every ``sync_interval_s`` while anything is pending and
  at once on :meth:`RecordStore.sync`, the barrier the engine awaits at each
  step boundary; ``PRAGMA synchronous=FULL`` makes a WAL commit durable;
- reads open their own connections in worker threads (`asyncio.to_thread`);
- when the disk fails or fills, nothing is dropped: the records that could not
  be committed stay in memory, in order, and are retried; the store turns
  unhealthy, tells the engine on the event loop (``on_failure``) so that it can
  trip a running session, and :meth:`RecordStore.check_ready` refuses new
  sessions with a message that says what is wrong and how to fix it.

Times are stored as fixed-width ISO 8601 UTC text (``2024-05-01T10:00:00.000000Z``)
so that they sort as text; API arguments named ``*_utc``/``utc`` take an aware
`datetime` or POSIX seconds, and default to now.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import csv
import io
import itertools
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future as ThreadFuture
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from pbmd.daemon.core.recording import (
    RecordsError,
    RecordsUnavailable,
    SessionOutcome,
    SessionPort,
    SessionStart,
    Severity,
    StepOutcome,
    StepStart,
    UtcTime,
)
from pbmd.drivers import codec

__all__ = [
    "RecordStore",
    "RecordsCorrupt",
    "RecordsError",
    "RecordsUnavailable",
    "SessionPort",
    "SessionStart",
    "StepStart",
]

log = structlog.get_logger()

SCHEMA_VERSION = 1
DEFAULT_SYNC_INTERVAL_S = 1.0
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024
DEFAULT_BUSY_TIMEOUT_S = 5.0




ExportFormat = Literal["json", "csv"]

SESSION_OUTCOMES: frozenset[str] = frozenset(("completed", "aborted", "faulted", "interrupted"))
STEP_OUTCOMES: frozenset[str] = SESSION_OUTCOMES | {"skipped"}
SEVERITIES: frozenset[str] = frozenset(("debug", "info", "warning", "error", "critical"))

FailureCallback = Callable[[BaseException], None]
T = TypeVar("T")


class RecordsCorrupt(RecordsError):
    """The database file exists but is not a usable pbmd records database."""


@dataclass(slots=True)
class StoreStats:
    """Counters of the writer, for status and tests (a snapshot; see RecordStore.stats)."""

    enqueued: int = 0
    written: int = 0
    commits: int = 0
    failed_commits: int = 0
    rejected: int = 0
    coalesced: int = 0
    held: int = 0


# --------------------------------------------------------------------------- schema

_SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        started_utc TEXT NOT NULL,
        ended_utc TEXT,
        state TEXT NOT NULL,
        outcome TEXT CHECK (outcome IN ('completed', 'aborted', 'faulted', 'interrupted')),
        stop_cause_code TEXT,
        stop_cause_message TEXT,
        protocol_id TEXT NOT NULL,
        protocol_version INTEGER NOT NULL,
        protocol_title TEXT,
        protocol_sha256 TEXT NOT NULL,
        signing_key_id TEXT,
        plan_hash TEXT NOT NULL,
        plan_json TEXT NOT NULL,
        patient_ref TEXT NOT NULL,
        operator TEXT,
        contraindications_json TEXT NOT NULL,
        ports_json TEXT NOT NULL,
        controller_serial TEXT,
        controller_firmware TEXT,
        session_token INTEGER,
        course_sessions INTEGER,
        course_interval_days REAL,
        time_scale REAL NOT NULL DEFAULT 1.0,
        notes TEXT
    )
    """,
    "CREATE INDEX sessions_started ON sessions (started_utc)",
    "CREATE INDEX sessions_unfinished ON sessions (started_utc) WHERE ended_utc IS NULL",
    """
    CREATE TABLE steps (
        session_id TEXT NOT NULL,
        port INTEGER NOT NULL,
        step_index INTEGER NOT NULL,
        site TEXT NOT NULL,
        site_label TEXT,
        region TEXT,
        area_covered_cm2 REAL,
        technique TEXT,
        wavelength_nm INTEGER NOT NULL,
        mode TEXT NOT NULL,
        pulse_hz REAL,
        duty_permille INTEGER,
        pulse_width_ns REAL,
        peak_power_mw REAL,
        power_setpoint_mw REAL NOT NULL,
        area_cm2 REAL NOT NULL,
        target_kind TEXT NOT NULL,
        target_value REAL NOT NULL,
        prescribed_energy_j REAL,
        prescribed_fluence_j_cm2 REAL,
        planned_time_s REAL,
        max_time_s REAL,
        delivered_host_j REAL,
        delivered_controller_j REAL,
        delivered_fluence_j_cm2 REAL,
        mean_irradiance_mw_cm2 REAL,
        emitting_time_s REAL,
        outcome TEXT CHECK (outcome IN
            ('completed', 'aborted', 'faulted', 'interrupted', 'skipped')),
        stop_cause_code TEXT,
        stop_cause_message TEXT,
        started_utc TEXT NOT NULL,
        ended_utc TEXT,
        PRIMARY KEY (session_id, port, step_index)
    )
    """,
    """
    CREATE TABLE emissions (
        seq INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        port INTEGER NOT NULL,
        device_port INTEGER,
        step_index INTEGER,
        origin TEXT NOT NULL DEFAULT 'host' CHECK (origin IN ('host', 'counters')),
        wavelength_nm INTEGER,
        mode TEXT,
        power_uw INTEGER,
        pulse_hz INTEGER,
        duty_permille INTEGER,
        energy_budget_uj INTEGER,
        max_duration_ms INTEGER,
        started_utc TEXT NOT NULL,
        started_device_time_us INTEGER,
        progress_utc TEXT,
        progress_device_time_us INTEGER,
        host_energy_uj INTEGER,
        controller_energy_uj INTEGER,
        controller_energy_source TEXT
            CHECK (controller_energy_source IN ('telemetry', 'stopped', 'counters')),
        controller_port_session_uj INTEGER,
        duration_ms INTEGER,
        stop_reason TEXT,
        stop_reason_code INTEGER,
        host_stop_cause TEXT,
        ended_utc TEXT,
        ended_device_time_us INTEGER
    )
    """,
    "CREATE INDEX emissions_session ON emissions (session_id, port, seq)",
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        session_id TEXT,
        utc TEXT NOT NULL,
        device_time_us INTEGER,
        kind TEXT NOT NULL,
        code TEXT,
        port INTEGER,
        severity TEXT NOT NULL
            CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical')),
        message TEXT NOT NULL,
        data_json TEXT
    )
    """,
    "CREATE INDEX events_session ON events (session_id, seq)",
    """
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        published_utc TEXT
    )
    """,
    "CREATE INDEX outbox_pending ON outbox (seq) WHERE published_utc IS NULL",
)

_SQL_SESSION_STARTED = """
INSERT INTO sessions (id, started_utc, state, protocol_id, protocol_version, protocol_title,
    protocol_sha256, signing_key_id, plan_hash, plan_json, patient_ref, operator,
    contraindications_json, ports_json, controller_serial, controller_firmware, session_token,
    course_sessions, course_interval_days, time_scale, notes)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SQL_SESSION_STATE = "UPDATE sessions SET state = ? WHERE id = ?"
_SQL_STEP_STARTED = """
INSERT INTO steps (session_id, port, step_index, site, site_label, region, area_covered_cm2,
    technique, wavelength_nm, mode, pulse_hz, duty_permille, pulse_width_ns, peak_power_mw,
    power_setpoint_mw, area_cm2, target_kind, target_value, prescribed_energy_j,
    prescribed_fluence_j_cm2, planned_time_s, max_time_s, started_utc)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SQL_EMISSION_STARTED = """
INSERT INTO emissions (seq, session_id, port, device_port, step_index, wavelength_nm, mode,
    power_uw, pulse_hz, duty_permille, energy_budget_uj, max_duration_ms, started_utc,
    started_device_time_us)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SQL_EMISSION_PROGRESS = """
UPDATE emissions SET host_energy_uj = ?,
    controller_energy_uj = COALESCE(?, controller_energy_uj),
    controller_energy_source = CASE WHEN ? IS NULL THEN controller_energy_source
                                    ELSE 'telemetry' END,
    progress_device_time_us = COALESCE(?, progress_device_time_us), progress_utc = ?
WHERE seq = ? AND ended_utc IS NULL
"""
_SQL_EMISSION_ENDED = """
UPDATE emissions SET ended_utc = ?, ended_device_time_us = ?,
    host_energy_uj = COALESCE(?, host_energy_uj),
    controller_energy_uj = COALESCE(?, controller_energy_uj),
    controller_energy_source = CASE WHEN ? IS NULL THEN controller_energy_source
                                    ELSE 'stopped' END,
    duration_ms = COALESCE(?, duration_ms),
    stop_reason = COALESCE(?, stop_reason), stop_reason_code = COALESCE(?, stop_reason_code),
    host_stop_cause = ?
WHERE seq = ?
"""
_SQL_RECONCILE_EMISSION = """
UPDATE emissions SET controller_energy_uj = ?, controller_energy_source = 'counters',
    duration_ms = COALESCE(?, duration_ms),
    stop_reason = COALESCE(?, stop_reason), stop_reason_code = COALESCE(?, stop_reason_code),
    host_stop_cause = COALESCE(host_stop_cause, ?),
    ended_utc = COALESCE(ended_utc, ?)
WHERE seq = ?
"""
# The controller counted more on this port than the recorded emissions hold: the
# difference was delivered by an emission whose record was lost in the crash.
_SQL_RECONCILE_PORT = """
INSERT INTO emissions (seq, session_id, port, step_index, origin, started_utc, ended_utc,
    controller_energy_uj, controller_energy_source, controller_port_session_uj,
    host_stop_cause)
SELECT ?, ?, ?, ?, 'counters', ?, ?, ? - COALESCE(SUM(controller_energy_uj), 0), 'counters', ?,
    'unrecorded (reconciled from the controller counters)'
FROM emissions WHERE session_id = ? AND port = ?
HAVING ? - COALESCE(SUM(controller_energy_uj), 0) > 0
"""
# Steps fill what the engine did not give from the emission rows they own.
_SQL_STEP_ENDED = """
UPDATE steps SET ended_utc = ?, outcome = ?, stop_cause_code = ?, stop_cause_message = ?,
    delivered_host_j = COALESCE(?, (SELECT SUM(e.host_energy_uj) / 1e6 FROM emissions e
        WHERE e.session_id = steps.session_id AND e.port = steps.port
          AND e.step_index = steps.step_index)),
    delivered_controller_j = COALESCE(?, (SELECT SUM(e.controller_energy_uj) / 1e6
        FROM emissions e WHERE e.session_id = steps.session_id AND e.port = steps.port
          AND e.step_index = steps.step_index)),
    emitting_time_s = COALESCE(?, (SELECT SUM(e.duration_ms) / 1e3 FROM emissions e
        WHERE e.session_id = steps.session_id AND e.port = steps.port
          AND e.step_index = steps.step_index)),
    delivered_fluence_j_cm2 = ?, mean_irradiance_mw_cm2 = ?
WHERE session_id = ? AND port = ? AND step_index = ?
"""
_SQL_STEP_DERIVED = """
UPDATE steps SET
    delivered_fluence_j_cm2 = COALESCE(delivered_fluence_j_cm2,
        COALESCE(delivered_controller_j, delivered_host_j) / area_cm2),
    mean_irradiance_mw_cm2 = COALESCE(mean_irradiance_mw_cm2,
        CASE WHEN emitting_time_s > 0 THEN
            COALESCE(delivered_controller_j, delivered_host_j) * 1e3 / emitting_time_s / area_cm2
        END)
WHERE session_id = ? AND (? IS NULL OR (port = ? AND step_index = ?))
"""
_SQL_CLOSE_OPEN_EMISSIONS = """
UPDATE emissions SET ended_utc = ?, host_stop_cause = COALESCE(host_stop_cause, ?),
    duration_ms = COALESCE(duration_ms,
        (progress_device_time_us - started_device_time_us) / 1000)
WHERE session_id = ? AND ended_utc IS NULL
"""
_SQL_CLOSE_OPEN_STEPS = """
UPDATE steps SET ended_utc = ?, outcome = ?, stop_cause_code = COALESCE(stop_cause_code, ?),
    stop_cause_message = COALESCE(stop_cause_message, ?),
    delivered_host_j = (SELECT SUM(e.host_energy_uj) / 1e6 FROM emissions e
        WHERE e.session_id = steps.session_id AND e.port = steps.port
          AND e.step_index = steps.step_index),
    delivered_controller_j = (SELECT SUM(e.controller_energy_uj) / 1e6 FROM emissions e
        WHERE e.session_id = steps.session_id AND e.port = steps.port
          AND e.step_index = steps.step_index),
    emitting_time_s = (SELECT SUM(e.duration_ms) / 1e3 FROM emissions e
        WHERE e.session_id = steps.session_id AND e.port = steps.port
          AND e.step_index = steps.step_index)
WHERE session_id = ? AND ended_utc IS NULL
"""
_SQL_SESSION_ENDED = """
UPDATE sessions SET ended_utc = ?, outcome = ?, state = ?, stop_cause_code = ?,
    stop_cause_message = ?
WHERE id = ?
"""
_SQL_EVENT = """
INSERT INTO events (id, session_id, utc, device_time_us, kind, code, port, severity, message,
    data_json)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SQL_OUTBOX = "INSERT INTO outbox (event_id) VALUES (?)"
_SQL_OUTBOX_PUBLISHED = (
    "UPDATE outbox SET published_utc = ? WHERE event_id = ? AND published_utc IS NULL"
)

_Statement = tuple[str, tuple[Any, ...]]


# --------------------------------------------------------------------------- helpers


def utc_text(t: UtcTime = None) -> str:
    """Fixed-width ISO 8601 UTC text, so that stored times sort as text."""
    if t is None:
        dt = datetime.now(UTC)
    elif isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError("naive datetime: pass an aware datetime (UTC) or POSIX seconds")
        dt = t.astimezone(UTC)
    else:
        dt = datetime.fromtimestamp(float(t), UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _uj(value: float | None) -> int | None:
    return None if value is None else round(value)


def _stop_reason(reason: codec.StopReason | int | None) -> tuple[str | None, int | None]:
    if reason is None:
        return None, None
    try:
        return codec.StopReason(int(reason)).name.lower(), int(reason)
    except ValueError:
        return f"unknown_{int(reason)}", int(reason)


def _mode_name(mode: int) -> str:
    try:
        return codec.EmitMode(mode).name.lower()
    except ValueError:
        return f"unknown_{mode}"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _check_choice(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {sorted(allowed)}")


# --------------------------------------------------------------------------- writer items


@dataclass(slots=True)
class _Write:
    """One record: statements applied together, in order, in one transaction."""

    label: str
    statements: tuple[_Statement, ...]
    coalesce_key: int | None = None
    """Emission progress: a later update of the same emission replaces this one."""


@dataclass(slots=True)
class _Barrier:
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Retry:
    recreate: bool


@dataclass(slots=True)
class _Close:
    future: asyncio.Future[None] | None


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


_Item = _Write | _Barrier | _Retry | _Close | _Call

# A record the database refuses on its own (a bug), as opposed to a disk that refuses all.
_BAD_RECORD_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
    OverflowError,
    TypeError,
    ValueError,
)


class _FileGone(OSError):
    """The database file was removed or replaced under the open connection."""


@dataclass(slots=True)
class _Health:
    healthy: bool = True
    what: str = ""
    fix: str = ""
    since_utc: str | None = None
    free_bytes: int | None = None
    error: BaseException | None = None


def _describe_failure(exc: BaseException, path: Path) -> tuple[str, str, bool]:
    """(what went wrong, how to fix it, whether to reopen the connection)."""
    directory = path.parent
    name = str(getattr(exc, "sqlite_errorname", ""))
    text = str(exc)
    if isinstance(exc, _FileGone):
        return (
            f"{text}",
            f"Restore the records directory {directory} (or the file) from backup, or "
            f"recreate it writable by the pbmd user and retry with recreate.",
            True,
        )
    if name == "SQLITE_FULL" or "disk is full" in text:
        return (
            f"the disk holding {path} is full ({text})",
            f"Free disk space on the filesystem of {directory}.",
            False,
        )
    if name.startswith("SQLITE_IOERR") or isinstance(exc, OSError):
        return (
            f"an I/O error occurred writing {path} ({text})",
            f"Check the disk holding {directory} (kernel log: dmesg), its mount and free "
            f"space.",
            True,
        )
    if name.startswith("SQLITE_READONLY"):
        return (
            f"{path} is read-only ({text})",
            f"Make {directory} and the files in it writable by the pbmd user and check "
            f"that the filesystem is not mounted read-only.",
            True,
        )
    if name == "SQLITE_CANTOPEN":
        return (
            f"{path} cannot be opened ({text})",
            f"Check that {directory} exists and is writable by the pbmd user.",
            True,
        )
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return (
            f"another process holds the write lock on {path} ({text})",
            "Only one pbmd may use a records directory; stop the other process.",
            False,
        )
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return (
            f"{path} is damaged ({text})",
            "Stop pbmd, move the file aside for investigation and restore it from backup.",
            True,
        )
    return (
        f"writing {path} failed ({type(exc).__name__}: {text})",
        f"Check the disk holding {directory} and the pbmd log.",
        True,
    )


# --------------------------------------------------------------------------- the store


class RecordStore:
    """The treatment records. Open with ``await RecordStore.open(path, ...)``.

    Write methods are synchronous and only enqueue; call them from the event
    loop thread. ``await sync()`` is the durability barrier. Reads are async.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        on_failure: FailureCallback | None = None,
        sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        integrity_check: bool = True,
    ) -> None:
        if sync_interval_s <= 0:
            raise ValueError("sync_interval_s must be > 0")
        self.path = Path(path).expanduser().absolute()
        self.on_failure = on_failure
        self.sync_interval_s = float(sync_interval_s)
        self.min_free_bytes = int(min_free_bytes)
        self._busy_timeout_s = busy_timeout_s
        self._integrity_check = integrity_check
        # Writes only append here (atomic, no thread wake-up); control items also
        # kick the writer awake. One deque keeps writes and barriers in call order.
        self._items: collections.deque[_Item] = collections.deque()
        self._kick = threading.Event()
        self._health = _Health()
        self._health_lock = threading.Lock()
        self._stats = StoreStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._writer: _Writer | None = None
        self._closed = False
        self._close_future: asyncio.Future[None] | None = None
        self._emission_seq_iter: Iterator[int] = itertools.count(1)
        self._commit_listeners: list[Callable[[int], None]] = []

    # ----------------------------------------------------------------- life cycle

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        on_failure: FailureCallback | None = None,
        sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        integrity_check: bool = True,
    ) -> RecordStore:
        """Open (creating the directory and schema if needed) and start the writer thread.

        Raises RecordsCorrupt for a file that is not a usable records database
        and RecordsUnavailable when it cannot be opened at all.
        """
        store = cls(
            path,
            on_failure=on_failure,
            sync_interval_s=sync_interval_s,
            min_free_bytes=min_free_bytes,
            busy_timeout_s=busy_timeout_s,
            integrity_check=integrity_check,
        )
        await store._start()
        return store

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        opened: ThreadFuture[int] = ThreadFuture()
        self._writer = _Writer(self, opened)
        self._thread = threading.Thread(
            target=self._writer.run, name=f"pbmd-records-writer:{self.path.name}", daemon=True
        )
        self._thread.start()
        try:
            next_seq = await asyncio.wrap_future(opened)
        except BaseException:
            # Failed, or cancelled while opening: make sure the thread ends either way.
            self._closed = True
            self._control(_Close(None))
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        self._emission_seq_iter = itertools.count(next_seq)
        atexit.register(self._close_at_exit)

    async def close(self) -> None:
        """Write everything pending, checkpoint, and join the writer thread.

        Raises RecordsUnavailable if records could still not be written; they
        are then dumped to the log (the last place left to keep them).
        """
        if self._thread is None:
            return
        if self._close_future is None:
            self._closed = True
            assert self._loop is not None
            self._close_future = self._loop.create_future()
            self._control(_Close(self._close_future))
        try:
            await asyncio.shield(self._close_future)
        finally:
            thread = self._thread
            if thread is not None:
                await asyncio.to_thread(thread.join)
                self._thread = None
                atexit.unregister(self._close_at_exit)

    async def __aenter__(self) -> RecordStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _close_at_exit(self) -> None:
        """Interpreter exit without close(): still write what is pending."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._closed = True
        self._control(_Close(None))
        thread.join(timeout=10.0)

    # ----------------------------------------------------------------- health

    @property
    def healthy(self) -> bool:
        with self._health_lock:
            return self._health.healthy

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the writer's counters."""
        s = self._stats
        return StoreStats(
            s.enqueued, s.written, s.commits, s.failed_commits, s.rejected, s.coalesced, s.held
        )

    @property
    def free_bytes(self) -> int | None:
        """Free space on the records filesystem as last measured by the writer."""
        with self._health_lock:
            return self._health.free_bytes

    def check_ready(self) -> None:
        """Refuse a new session (RecordsUnavailable) if its records could not be kept.

        Never touches the disk: the writer thread measures free space at least
        every ``sync_interval_s``.
        """
        if self._closed or self._thread is None:
            raise RecordsUnavailable(
                f"The records store {self.path} is closed; treatment records cannot be "
                "written. Restart pbmd."
            )
        with self._health_lock:
            health = replace(self._health)
        if not health.healthy:
            raise RecordsUnavailable(self._failure_message(health))
        free = health.free_bytes
        if free is not None and free < self.min_free_bytes:
            raise RecordsUnavailable(
                f"Only {free / 1e6:.1f} MB are free on the filesystem of {self.path.parent}, "
                f"below the configured minimum of {self.min_free_bytes / 1e6:.1f} MB for "
                f"treatment records. Free disk space there before starting a session."
            )

    def _failure_message(self, health: _Health) -> str:
        held = self._stats.held
        return (
            f"Treatment records cannot be written: {health.what}. {health.fix} "
            f"{held} record(s) are held in memory and will be written as soon as a write "
            f"succeeds (retried automatically every {self.sync_interval_s:g} s). "
            "New sessions are refused until then."
        )

    # ----------------------------------------------------------------- writes (enqueue only)

    def _put(self, item: _Write) -> None:
        if self._closed:
            raise RecordsUnavailable(
                f"The records store {self.path} is closed; record {item.label!r} was not kept."
            )
        self._stats.enqueued += 1
        self._items.append(item)

    def _control(self, item: _Item) -> None:
        self._items.append(item)
        self._kick.set()

    def session_started(self, record: SessionStart) -> None:
        """Record a new session with its protocol, frozen plan, patient and answers."""
        r = record
        ports = [asdict(p) for p in r.ports]
        self._put(
            _Write(
                "session_started",
                (
                    (
                        _SQL_SESSION_STARTED,
                        (
                            r.session_id, utc_text(r.started_utc), r.state, r.protocol_id,
                            r.protocol_version, r.protocol_title, r.protocol_sha256,
                            r.signing_key_id, r.plan_hash, r.plan_json, r.patient_ref,
                            r.operator, _json(dict(r.contraindications)), _json(ports),
                            r.controller_serial, r.controller_firmware, r.session_token,
                            r.course_sessions, r.course_interval_days, r.time_scale, r.notes,
                        ),
                    ),
                ),
            )
        )

    def session_state(self, session_id: str, state: str) -> None:
        """Record the session's latest state (idle, ready, armed, running, paused, ...)."""
        self._put(_Write("session_state", ((_SQL_SESSION_STATE, (state, session_id)),)))

    def step_started(self, record: StepStart) -> None:
        r = record
        self._put(
            _Write(
                "step_started",
                (
                    (
                        _SQL_STEP_STARTED,
                        (
                            r.session_id, r.port, r.step_index, r.site, r.site_label, r.region,
                            r.area_covered_cm2, r.technique, r.wavelength_nm, r.mode, r.pulse_hz,
                            r.duty_permille, r.pulse_width_ns, r.peak_power_mw,
                            r.power_setpoint_mw, r.area_cm2, r.target_kind, r.target_value,
                            r.prescribed_energy_j, r.prescribed_fluence_j_cm2, r.planned_time_s,
                            r.max_time_s, utc_text(r.started_utc),
                        ),
                    ),
                ),
            )
        )

    def emission_started(
        self,
        session_id: str,
        step_index: int | None,
        request: codec.EmitStart,
        *,
        port: int | None = None,
        device_time_us: int | None = None,
        utc: UtcTime = None,
    ) -> int:
        """Record an EMIT_START as sent; returns the emission's sequence number.

        ``port`` is the session's (logical) port, the one its steps use; it
        defaults to the request's device port. The number returned is unique
        in the database and increases in start order.
        """
        seq = next(self._emission_seq_iter)
        q = request
        self._put(
            _Write(
                "emission_started",
                (
                    (
                        _SQL_EMISSION_STARTED,
                        (
                            seq, session_id, q.port if port is None else port, q.port,
                            step_index, q.wavelength_nm,
                            _mode_name(q.mode), q.power_uw, q.pulse_hz, q.duty_permille,
                            q.energy_budget_uj, q.max_duration_ms, utc_text(utc), device_time_us,
                        ),
                    ),
                ),
            )
        )
        return seq

    def emission_progress(
        self,
        seq: int,
        *,
        host_energy_uj: float,
        controller_energy_uj: float | None = None,
        device_time_us: int | None = None,
        utc: UtcTime = None,
    ) -> None:
        """Latest energies of a running emission (host integrator, controller telemetry).

        Call as often as telemetry arrives: within one batch only the latest
        update of an emission is written, so a crash loses at most one batch.
        """
        ctrl = _uj(controller_energy_uj)
        self._put(
            _Write(
                "emission_progress",
                (
                    (
                        _SQL_EMISSION_PROGRESS,
                        (_uj(host_energy_uj), ctrl, ctrl, device_time_us, utc_text(utc), seq),
                    ),
                ),
                coalesce_key=seq,
            )
        )

    def emission_ended(
        self,
        seq: int,
        *,
        host_stop_cause: str,
        host_energy_uj: float | None,
        controller_energy_uj: float | None = None,
        duration_ms: int | None = None,
        stop_reason: codec.StopReason | int | None = None,
        device_time_us: int | None = None,
        utc: UtcTime = None,
    ) -> None:
        """Record the end of an emission: the STOPPED reply (controller channel) and why
        the host stopped it. Controller fields are None when no STOPPED arrived."""
        reason, reason_code = _stop_reason(stop_reason)
        ctrl = _uj(controller_energy_uj)
        self._put(
            _Write(
                "emission_ended",
                (
                    (
                        _SQL_EMISSION_ENDED,
                        (
                            utc_text(utc), device_time_us, _uj(host_energy_uj), ctrl, ctrl,
                            duration_ms, reason, reason_code, host_stop_cause, seq,
                        ),
                    ),
                ),
            )
        )

    def reconcile_emission(
        self,
        seq: int,
        *,
        controller_energy_uj: int,
        duration_ms: int | None,
        stop_reason: codec.StopReason | int | None,
        host_stop_cause: str = "interrupted (daemon restarted)",
        utc: UtcTime = None,
    ) -> None:
        """Replace an unfinished emission's controller energy with GET_COUNTERS' reading."""
        reason, reason_code = _stop_reason(stop_reason)
        self._put(
            _Write(
                "reconcile_emission",
                (
                    (
                        _SQL_RECONCILE_EMISSION,
                        (
                            int(controller_energy_uj), duration_ms, reason, reason_code,
                            host_stop_cause, utc_text(utc), seq,
                        ),
                    ),
                ),
            )
        )

    def reconcile_port(
        self,
        session_id: str,
        port: int,
        *,
        controller_session_delivered_uj: int,
        step_index: int | None = None,
        utc: UtcTime = None,
    ) -> int:
        """Account for dose the controller counted on a port but no emission row holds.

        ``port`` is the session's (logical) port, as in emission_started().

        Call after reconcile_emission() for the port's open emission. If the
        counters' session total exceeds the recorded controller energies, one
        emission row of origin 'counters' is added with the difference. Returns
        the sequence number that row gets if it is needed.
        """
        seq = next(self._emission_seq_iter)
        now = utc_text(utc)
        total = int(controller_session_delivered_uj)
        self._put(
            _Write(
                "reconcile_port",
                (
                    (
                        _SQL_RECONCILE_PORT,
                        (
                            seq, session_id, port, step_index, now, now, total, total,
                            session_id, port, total,
                        ),
                    ),
                ),
            )
        )
        return seq

    def step_ended(
        self,
        session_id: str,
        port: int,
        step_index: int,
        *,
        outcome: StepOutcome,
        stop_cause_code: str | None = None,
        stop_cause_message: str | None = None,
        delivered_host_j: float | None = None,
        delivered_controller_j: float | None = None,
        delivered_fluence_j_cm2: float | None = None,
        mean_irradiance_mw_cm2: float | None = None,
        emitting_time_s: float | None = None,
        utc: UtcTime = None,
    ) -> None:
        """Record how a step ended. Delivered values left None are summed from its
        emissions (energy, emitting time) and derived from those (fluence, irradiance)."""
        _check_choice(outcome, STEP_OUTCOMES, "step outcome")
        self._put(
            _Write(
                "step_ended",
                (
                    (
                        _SQL_STEP_ENDED,
                        (
                            utc_text(utc), outcome, stop_cause_code, stop_cause_message,
                            delivered_host_j, delivered_controller_j, emitting_time_s,
                            delivered_fluence_j_cm2, mean_irradiance_mw_cm2,
                            session_id, port, step_index,
                        ),
                    ),
                    (_SQL_STEP_DERIVED, (session_id, port, port, step_index)),
                ),
            )
        )

    def event(
        self,
        kind: str,
        message: str,
        *,
        code: str | None = None,
        session_id: str | None = None,
        port: int | None = None,
        severity: Severity = "info",
        device_time_us: int | None = None,
        data: Mapping[str, Any] | None = None,
        utc: UtcTime = None,
    ) -> str:
        """Record an event (and queue it in the outbox); returns its id (a UUID)."""
        _check_choice(severity, SEVERITIES, "severity")
        event_id = str(uuid.uuid4())
        data_json = None if data is None else _json(dict(data))
        self._put(
            _Write(
                "event",
                (
                    (
                        _SQL_EVENT,
                        (
                            event_id, session_id, utc_text(utc), device_time_us, kind, code,
                            port, severity, message, data_json,
                        ),
                    ),
                    (_SQL_OUTBOX, (event_id,)),
                ),
            )
        )
        return event_id

    def session_ended(
        self,
        session_id: str,
        *,
        outcome: SessionOutcome,
        stop_cause_code: str | None = None,
        stop_cause_message: str | None = None,
        state: str | None = None,
        utc: UtcTime = None,
    ) -> None:
        """Close a session. Steps and emissions still open are closed with it: their
        delivered totals are summed from the emission rows (both channels)."""
        _check_choice(outcome, SESSION_OUTCOMES, "session outcome")
        now = utc_text(utc)
        cause = stop_cause_message or outcome
        # A step still open when a session "completes" did not complete.
        open_outcome = "interrupted" if outcome == "completed" else outcome
        self._put(
            _Write(
                "session_ended",
                (
                    (_SQL_CLOSE_OPEN_EMISSIONS, (now, cause, session_id)),
                    (
                        _SQL_CLOSE_OPEN_STEPS,
                        (now, open_outcome, stop_cause_code, stop_cause_message, session_id),
                    ),
                    (_SQL_STEP_DERIVED, (session_id, None, None, None)),
                    (
                        _SQL_SESSION_ENDED,
                        (
                            now, outcome, state or outcome, stop_cause_code,
                            stop_cause_message, session_id,
                        ),
                    ),
                ),
            )
        )

    # ----------------------------------------------------------------- barrier, retry

    async def sync(self) -> None:
        """Resolve when everything enqueued before this call is committed to disk.

        Raises RecordsUnavailable if that commit failed (the records stay held).
        """
        if self._closed:
            raise RecordsUnavailable(f"The records store {self.path} is closed.")
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._control(_Barrier(future))
        await future

    def retry(self, *, recreate: bool = False) -> None:
        """Try to write the held records now (after the operator fixed the disk).

        With ``recreate`` a missing records directory or file is created anew
        (with the schema); otherwise only the existing file is reopened.
        """
        if not self._closed:
            self._control(_Retry(recreate))

    async def debug_limit_pages(self, extra_pages: int | None) -> int:
        """Test hook: cap the database at its current size + ``extra_pages`` pages
        (``PRAGMA max_page_count``), a deterministic full disk; None lifts the cap.
        Returns the cap in force."""

        def apply(conn: sqlite3.Connection) -> int:
            if extra_pages is None:
                row = conn.execute("PRAGMA max_page_count = 4294967294").fetchone()
            else:
                pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
                row = conn.execute(f"PRAGMA max_page_count = {pages + int(extra_pages)}").fetchone()
            return int(row[0])

        return int(await self._call(apply))

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RecordsUnavailable(f"The records store {self.path} is closed.")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._control(_Call(fn, future))
        result: T = await future
        return result

    # ----------------------------------------------------------------- loop-side callbacks

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the event loop; silently skipped once the loop is gone."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    @staticmethod
    def _resolve(future: asyncio.Future[Any], error: BaseException | None, result: Any) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(records_written)`` on the event loop after every commit
        (status displays, metrics, tests that wait for the periodic commit)."""
        self._commit_listeners.append(listener)

    def _notify_commit(self, written: int) -> None:
        for listener in list(self._commit_listeners):
            try:
                listener(written)
            except Exception:
                log.exception("records.commit_listener_failed")

    def _notify_failure(self, error: BaseException) -> None:
        callback = self.on_failure
        if callback is None:
            return
        try:
            callback(error)
        except Exception:
            log.exception("records.on_failure_callback_failed")

    # ----------------------------------------------------------------- reads

    def _connect_read(self) -> sqlite3.Connection:
        uri = self.path.as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, timeout=self._busy_timeout_s,
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
        self, limit: int = 50, offset: int = 0, since_utc: UtcTime = None
    ) -> list[dict[str, Any]]:
        """Sessions, newest first, with their step count and delivered totals."""
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
                WHERE (? IS NULL OR s.started_utc >= ?)
                ORDER BY s.started_utc DESC, s.id
                LIMIT ? OFFSET ?
                """,
                (since, since, int(limit), int(offset)),
            ).fetchall()
            return [dict(r) for r in rows]

        return await self._read(q)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session with its steps, emissions and events (JSON columns decoded)."""
        return await self._read(lambda conn: _load_session(conn, session_id, events=True))

    async def unfinished_sessions(self) -> list[dict[str, Any]]:
        """Sessions never closed (the daemon died), with steps and emissions, oldest first.

        The engine reconciles each from GET_COUNTERS (reconcile_emission,
        reconcile_port) and closes it: session_ended(outcome="interrupted").
        """

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM sessions WHERE ended_utc IS NULL ORDER BY started_utc, id"
                )
            ]
            out = []
            for sid in ids:
                s = _load_session(conn, sid, events=False)
                if s is not None:
                    out.append(s)
            return out

        return await self._read(q)

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

    async def outbox_mark_published(self, event_ids: Sequence[str], utc: UtcTime = None) -> None:
        """Mark events as published; returns once that is durable."""
        now = utc_text(utc)
        if event_ids:
            self._put(
                _Write(
                    "outbox_mark_published",
                    tuple((_SQL_OUTBOX_PUBLISHED, (now, eid)) for eid in event_ids),
                )
            )
        await self.sync()

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
            return _steps_csv(sessions)

        return await self._read(render)


# --------------------------------------------------------------------------- read helpers

_CSV_SESSION_COLUMNS = (
    "started_utc", "ended_utc", "outcome", "stop_cause_code", "protocol_id", "protocol_version",
    "protocol_sha256", "plan_hash", "patient_ref", "controller_serial",
)
_CSV_STEP_COLUMNS = (
    "port", "step_index", "site", "site_label", "technique", "wavelength_nm", "mode", "pulse_hz",
    "duty_permille", "pulse_width_ns", "peak_power_mw", "power_setpoint_mw", "area_cm2",
    "target_kind", "target_value", "prescribed_energy_j", "prescribed_fluence_j_cm2",
    "planned_time_s", "delivered_host_j", "delivered_controller_j", "delivered_fluence_j_cm2",
    "mean_irradiance_mw_cm2", "emitting_time_s", "outcome", "stop_cause_code",
    "stop_cause_message", "started_utc", "ended_utc",
)


def _steps_csv(sessions: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["session_id"]
        + [f"session_{c}" for c in _CSV_SESSION_COLUMNS]
        + [f"step_{c}" if c in ("outcome", "started_utc", "ended_utc", "stop_cause_code",
                                 "stop_cause_message") else c for c in _CSV_STEP_COLUMNS]
    )
    for s in sessions:
        head = [s["id"]] + [s.get(c) for c in _CSV_SESSION_COLUMNS]
        for step in s["steps"]:
            writer.writerow(
                ["" if v is None else v for v in head + [step.get(c) for c in _CSV_STEP_COLUMNS]]
            )
    return out.getvalue()


def _event_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    raw = d.pop("data_json", None)
    d["data"] = None if raw is None else json.loads(raw)
    return d


def _load_session(
    conn: sqlite3.Connection, session_id: str, *, events: bool
) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        return None
    s = dict(row)
    s["contraindications"] = json.loads(s.pop("contraindications_json"))
    s["ports"] = json.loads(s.pop("ports_json"))
    s["steps"] = [
        dict(r)
        for r in conn.execute(
            "SELECT * FROM steps WHERE session_id = ? ORDER BY port, step_index", (session_id,)
        )
    ]
    s["emissions"] = [
        dict(r)
        for r in conn.execute(
            "SELECT * FROM emissions WHERE session_id = ? ORDER BY seq", (session_id,)
        )
    ]
    if events:
        s["events"] = [
            _event_dict(r)
            for r in conn.execute(
                "SELECT * FROM events WHERE session_id = ? ORDER BY seq", (session_id,)
            )
        ]
    return s


# --------------------------------------------------------------------------- the writer thread


@dataclass(slots=True)
class _Pending:
    """Records not yet committed, in enqueue order (held across failures)."""

    writes: list[_Write] = field(default_factory=list)
    progress_index: dict[int, int] = field(default_factory=dict)

    def add(self, w: _Write, stats: StoreStats) -> None:
        if w.coalesce_key is not None:
            i = self.progress_index.get(w.coalesce_key)
            if i is not None:
                self.writes[i] = w
                stats.coalesced += 1
                return
            self.progress_index[w.coalesce_key] = len(self.writes)
        elif w.label == "emission_ended":
            # a later progress update must not jump ahead of the end it follows
            self.progress_index.pop(int(w.statements[0][1][-1]), None)
        self.writes.append(w)

    def clear(self) -> None:
        self.writes.clear()
        self.progress_index.clear()


class _Writer:
    """Owns the write connection; runs in its own thread; talks to the loop by posting."""

    def __init__(self, store: RecordStore, opened: ThreadFuture[int]) -> None:
        self.store = store
        self.path = store.path
        self.opened = opened
        self.conn: sqlite3.Connection | None = None
        self.file_id: tuple[int, int] | None = None
        self.default_max_pages: int | None = None
        self.pending = _Pending()
        self.next_retry_mono_s = 0.0
        self.next_tick_mono_s = time.monotonic() + store.sync_interval_s
        self.last_free_mono_s = 0.0
        self.failed_at_utc: str | None = None
        self.recreate = False

    # ------------------------------------------------------------- connection

    def connect(self, *, create: bool, first: bool) -> None:
        path = self.path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        uri = path.as_uri() + ("?mode=rwc" if create else "?mode=rw")
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, timeout=self.store._busy_timeout_s,
            check_same_thread=True,
        )
        try:
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise RecordsUnavailable(
                    f"{path} cannot be put in WAL mode (journal_mode is {mode}); keep the records "
                    "on a local filesystem."
                )
            conn.execute("PRAGMA synchronous=FULL")
            self._ensure_schema(conn)
            if first and self.store._integrity_check:
                result = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
                if result != ["ok"]:
                    raise RecordsCorrupt(
                        f"{path} failed the integrity check ({'; '.join(result[:3])}). Stop "
                        "pbmd, move the file aside for investigation and restore it from "
                        "backup (or start with an empty records directory)."
                    )
            self.default_max_pages = int(conn.execute("PRAGMA max_page_count").fetchone()[0])
            st = os.stat(path)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.file_id = (st.st_dev, st.st_ino)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        path = self.path
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise RecordsCorrupt(
                f"{path} has records schema version {version}, newer than this pbmd "
                f"understands ({SCHEMA_VERSION}). Upgrade pbmd or point it at another "
                "records directory."
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:
                others = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
                if others:
                    raise RecordsCorrupt(
                        f"{path} is an SQLite database but not a pbmd records database. "
                        "Point pbmd at another records directory or move the file aside."
                    )
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def drop_connection(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        self.conn = None
        self.file_id = None

    def check_file(self) -> None:
        """The open connection would keep writing into a deleted file; refuse that."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError as exc:
            where = self.path.parent if not self.path.parent.exists() else self.path
            raise _FileGone(
                f"the records {'directory' if where != self.path else 'file'} {where} was "
                "removed while pbmd was running"
            ) from exc
        if (st.st_dev, st.st_ino) != self.file_id:
            raise _FileGone(f"the records file {self.path} was replaced while pbmd was running")

    # ------------------------------------------------------------- thread body

    def run(self) -> None:
        try:
            self.connect(create=True, first=True)
            assert self.conn is not None
            next_seq = int(
                self.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM emissions").fetchone()[0]
            )
            self.refresh_free_space(time.monotonic())
        except BaseException as exc:
            self.drop_connection()
            self.opened.set_exception(self._open_error(exc))
            return
        self.opened.set_result(next_seq)
        while True:
            try:
                if self.step():
                    return
            except Exception as exc:  # never let the writer die: fail loudly, keep records
                log.exception("records.writer_error")
                self.failed(exc)

    def _open_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, RecordsError):
            return exc
        name = str(getattr(exc, "sqlite_errorname", ""))
        # Undecodable schema text and generic DatabaseErrors come from damaged pages too.
        if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or isinstance(
            exc, UnicodeDecodeError
        ) or type(exc) is sqlite3.DatabaseError:
            err: RecordsError = RecordsCorrupt(
                f"{self.path} is not a usable pbmd records database ({exc}). Move it aside "
                "(keep it for investigation) and start pbmd again to create a new one, or "
                "restore it from backup."
            )
        else:
            what, fix, _ = _describe_failure(exc, self.path)
            err = RecordsUnavailable(f"Treatment records cannot be opened: {what}. {fix}")
        err.__cause__ = exc
        return err

    def step(self) -> bool:
        """One turn: sleep until the next tick or a kick, take everything queued, commit
        if due. Ticks come every ``sync_interval_s``, so no record waits longer than
        that; writes never wake the thread, which keeps a burst from ping-ponging the
        GIL between the loop and the writer. Returns True when the store is closed."""
        store = self.store
        interval = store.sync_interval_s
        healthy = store._health.healthy
        deadline = self.next_tick_mono_s if healthy else self.next_retry_mono_s
        store._kick.wait(max(0.0, deadline - time.monotonic()))
        store._kick.clear()
        items: list[_Item] = []
        while True:
            try:
                items.append(store._items.popleft())
            except IndexError:
                break

        now = time.monotonic()
        barriers: list[_Barrier] = []
        close: _Close | None = None
        force = False
        for item in items:
            if isinstance(item, _Write):
                self.pending.add(item, store._stats)
            elif isinstance(item, _Barrier):
                barriers.append(item)
                force = True
            elif isinstance(item, _Retry):
                self.recreate = self.recreate or item.recreate
                force = True
            elif isinstance(item, _Close):
                close = item
                force = True
            else:
                self.run_call(item)
        store._stats.held = len(self.pending.writes)

        error: BaseException | None = None
        tick = now >= deadline
        if tick and healthy:
            self.next_tick_mono_s = now + interval
        due = force or tick
        if due and (self.pending.writes or not store._health.healthy):
            error = self.commit()
        for b in barriers:
            store._post(store._resolve, b.future, self.barrier_error(error), None)
        if now - self.last_free_mono_s >= interval:
            self.refresh_free_space(now)
        if close is not None:
            self.finish(close, error)
            return True
        return False

    def barrier_error(self, error: BaseException | None) -> BaseException | None:
        if error is None and self.store._health.healthy:
            return None
        with self.store._health_lock:
            health = replace(self.store._health)
        exc = RecordsUnavailable(self.store._failure_message(health))
        exc.__cause__ = error or health.error
        return exc

    def run_call(self, item: _Call) -> None:
        try:
            if self.conn is None:
                raise RecordsUnavailable(f"{self.path} is not open (records are failing)")
            result = item.fn(self.conn)
        except Exception as exc:
            self.store._post(self.store._resolve, item.future, exc, None)
        else:
            self.store._post(self.store._resolve, item.future, None, result)

    # ------------------------------------------------------------- committing

    def commit(self) -> BaseException | None:
        """Commit every pending record in one transaction; on failure keep them all."""
        store = self.store
        writes = list(self.pending.writes)
        recovering = not store._health.healthy
        if recovering:
            writes.append(self._records_event("records.recovered", "info", self._recovery_text()))
        try:
            if self.conn is None:
                create = self.recreate
                self.connect(create=create, first=False)
            self.check_file()
            assert self.conn is not None
            try:
                rejected = self.apply(self.conn, writes, isolate=False)
            except _BAD_RECORD_ERRORS:
                rejected = self.apply(self.conn, writes, isolate=True)
        except Exception as exc:
            store._stats.failed_commits += 1
            self.failed(exc)
            return exc
        self.recreate = False
        for w in rejected:
            store._stats.rejected += 1
            log.error("records.rejected", label=w.label, statements=repr(w.statements))
        store._stats.commits += 1
        store._stats.written += len(writes) - len(rejected)
        self.pending.clear()
        store._stats.held = 0
        if recovering:
            # Healthy before anyone hears of the commit: a listener that checks the
            # store on a commit must not find it still failed.
            with store._health_lock:
                store._health.healthy = True
                store._health.error = None
                store._health.since_utc = None
            log.warning("records.recovered", path=str(self.path), written=len(writes))
            self.failed_at_utc = None
        store._post(store._notify_commit, len(writes) - len(rejected))
        return None

    def apply(
        self, conn: sqlite3.Connection, writes: Sequence[_Write], *, isolate: bool
    ) -> list[_Write]:
        """Run the writes in one transaction. With ``isolate`` a record the database
        refuses (a bug, not the disk) is left out and returned instead of failing all."""
        rejected: list[_Write] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for w in writes:
                if isolate:
                    conn.execute("SAVEPOINT record")
                try:
                    for sql, params in w.statements:
                        conn.execute(sql, params)
                except _BAD_RECORD_ERRORS:
                    if not isolate:
                        raise
                    conn.execute("ROLLBACK TO record")
                    conn.execute("RELEASE record")
                    rejected.append(w)
                    continue
                if isolate:
                    conn.execute("RELEASE record")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return rejected

    def failed(self, exc: BaseException) -> None:
        """Keep the records, turn unhealthy, tell the engine once per failure."""
        store = self.store
        what, fix, reopen = _describe_failure(exc, self.path)
        if reopen:
            self.drop_connection()
        self.next_retry_mono_s = time.monotonic() + store.sync_interval_s
        with store._health_lock:
            was_healthy = store._health.healthy
            store._health.healthy = False
            store._health.what = what
            store._health.fix = fix
            store._health.error = exc
            if was_healthy:
                store._health.since_utc = utc_text()
        if not was_healthy:
            store._stats.held = len(self.pending.writes)
            return
        self.failed_at_utc = utc_text()
        log.error(
            "records.failed", path=str(self.path), error=str(exc), held=len(self.pending.writes)
        )
        self.pending.add(
            self._records_event("records.failed", "critical", f"{what}. {fix}"), store._stats
        )
        store._stats.held = len(self.pending.writes)
        with store._health_lock:
            health = replace(store._health)
        error = RecordsUnavailable(store._failure_message(health))
        error.__cause__ = exc
        store._post(store._notify_failure, error)

    def _recovery_text(self) -> str:
        return (
            f"Treatment records are written again; {len(self.pending.writes)} held record(s) "
            f"written (unavailable since {self.failed_at_utc})."
        )

    def _records_event(self, code: str, severity: Severity, message: str) -> _Write:
        event_id = str(uuid.uuid4())
        return _Write(
            "event",
            (
                (
                    _SQL_EVENT,
                    (
                        event_id, None, utc_text(), None, "records", code, None, severity,
                        message, _json({"path": str(self.path)}),
                    ),
                ),
                (_SQL_OUTBOX, (event_id,)),
            ),
        )

    def refresh_free_space(self, now_s: float) -> None:
        self.last_free_mono_s = now_s
        try:
            free: int | None = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = None
        with self.store._health_lock:
            self.store._health.free_bytes = free

    def finish(self, close: _Close, error: BaseException | None) -> None:
        store = self.store
        lost = len(self.pending.writes)
        if lost:
            for w in self.pending.writes:
                log.error("records.lost_on_close", label=w.label, statements=repr(w.statements))
        elif self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.drop_connection()
        if close.future is None:
            return
        err: BaseException | None = None
        if lost:
            err = RecordsUnavailable(
                f"Closing the records store {self.path}: {lost} record(s) could not be written "
                "and were dumped to the log (records.lost_on_close)."
            )
            err.__cause__ = error or store._health.error
        store._post(store._resolve, close.future, err, None)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
