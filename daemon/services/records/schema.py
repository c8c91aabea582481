"""The records database's schema, and the time format its rows use.

Times are stored as fixed-width ISO 8601 UTC text (``2024-05-01T10:00:00.000000Z``)
so that they sort as text.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from pbmd.daemon.core.recording import RecordsError, UtcTime
from pbmd.daemon.services.records.records_courses import COURSE_TABLES

SCHEMA_VERSION = 5
"""Kept in ``PRAGMA user_version``; a newer file is refused, version 0 gets the schema,
an older one is migrated (`MIGRATIONS`) when it is opened."""

APPLICATION_ID = 0x50424D44
"""``PRAGMA application_id`` of a pbmd records database ("PBMD" in ASCII), so that
`file(1)` and pbmd tell it from any other SQLite file. 0 (unset) is accepted from a
database made before version 3, and set when it is migrated."""

_TO_SESSION = " REFERENCES sessions (id)"
"""The foreign key of a row that belongs to a session (enforced from version 3:
``PRAGMA foreign_keys = ON`` on the writer's connection)."""

SKIN_TYPE_COLUMN = "skin_type TEXT CHECK (skin_type IN ('I', 'II', 'III', 'IV', 'V', 'VI'))"
"""The patient's Fitzpatrick skin type (schema version 4)."""


class RecordsCorrupt(RecordsError):
    """The database file exists but is not a usable pbmd records database."""


def _emissions_table(name: str, references: str = _TO_SESSION) -> str:
    """The emissions table (``references``: the session's foreign key, none before
    version 3). ``controller_energy_source``: 'telemetry' while running,
    'stopped' from STOPPED, 'provisional' (last sample, a lower bound: the link was
    lost) until 'counters' from GET_COUNTERS replaces it."""
    return f"""
    CREATE TABLE {name} (
        seq INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL{references},
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
        controller_energy_source TEXT CHECK (controller_energy_source IN
            ('telemetry', 'stopped', 'provisional', 'counters')),
        controller_port_session_uj INTEGER,
        duration_ms INTEGER,
        stop_reason TEXT,
        stop_reason_code INTEGER,
        host_stop_cause TEXT,
        ended_utc TEXT,
        ended_device_time_us INTEGER
    )
    """


def _steps_table(name: str) -> str:
    return f"""
    CREATE TABLE {name} (
        session_id TEXT NOT NULL{_TO_SESSION},
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
    """


def _events_table(name: str) -> str:
    """Events; those of no session (the daemon's, the store's own) have no session_id."""
    return f"""
    CREATE TABLE {name} (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        session_id TEXT{_TO_SESSION},
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
    """


def _outbox_table(name: str) -> str:
    """Events still to publish over MQTT (each an event's id)."""
    return f"""
    CREATE TABLE {name} (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE REFERENCES events (id),
        published_utc TEXT
    )
    """


_EMISSIONS_INDEX = "CREATE INDEX emissions_session ON emissions (session_id, port, seq)"
_EVENTS_INDEX = "CREATE INDEX events_session ON events (session_id, seq)"
_OUTBOX_INDEX = "CREATE INDEX outbox_pending ON outbox (seq) WHERE published_utc IS NULL"

SCHEMA: tuple[str, ...] = (
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
        notes TEXT,
        """
    + SKIN_TYPE_COLUMN
    + """
    )
    """,
    "CREATE INDEX sessions_started ON sessions (started_utc)",
    "CREATE INDEX sessions_unfinished ON sessions (started_utc) WHERE ended_utc IS NULL",
    _steps_table("steps"),
    _emissions_table("emissions"),
    _EMISSIONS_INDEX,
    _events_table("events"),
    _EVENTS_INDEX,
    _outbox_table("outbox"),
    _OUTBOX_INDEX,
    f"PRAGMA application_id = {APPLICATION_ID}",
    *COURSE_TABLES,
)
"""A new database: every table at SCHEMA_VERSION."""


def _rebuilt(table: str, ddl: Callable[[str], str], indexes: tuple[str, ...]) -> tuple[str, ...]:
    """The statements that rebuild ``table`` from ``ddl`` keeping every row."""
    return (
        ddl(f"{table}_new"),
        f"INSERT INTO {table}_new SELECT * FROM {table}",
        f"DROP TABLE {table}",
        f"ALTER TABLE {table}_new RENAME TO {table}",
        *indexes,
    )


MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 1 -> 2: 'provisional' joins the controller energy sources. SQLite cannot alter
    # a CHECK constraint, so the table is copied into one that has it (same columns).
    1: (
        _emissions_table("emissions_v2", references=""),
        "INSERT INTO emissions_v2 SELECT * FROM emissions",
        "DROP TABLE emissions",
        "ALTER TABLE emissions_v2 RENAME TO emissions",
        _EMISSIONS_INDEX,
    ),
    # 2 -> 3: foreign keys. SQLite cannot add a constraint to a table, so each table that
    # refers to another is rebuilt as SQLite's documented procedure does (foreign keys
    # off for the connection meanwhile, the same rows under the same keys, indexes made
    # again; the writer then checks the keys and turns enforcement on). Its triggers
    # (the change log's) go with the old table; `ensure_change_log` makes them again.
    2: (
        *_rebuilt("steps", _steps_table, ()),
        *_rebuilt("emissions", _emissions_table, (_EMISSIONS_INDEX,)),
        *_rebuilt("events", _events_table, (_EVENTS_INDEX,)),
        *_rebuilt("outbox", _outbox_table, (_OUTBOX_INDEX,)),
        f"PRAGMA application_id = {APPLICATION_ID}",
    ),
    # 3 -> 4: the patient's Fitzpatrick skin type, asked at session start (NULL: a
    # session recorded before it was asked).
    3: ("ALTER TABLE sessions ADD COLUMN " + SKIN_TYPE_COLUMN,),
    # 4 -> 5: patients, their screening answers, treatment courses, the sessions of a
    # course and the outcomes measured (records_courses.py).
    4: COURSE_TABLES,
}
"""From a version to the next: the statements, run in one transaction at open."""


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
