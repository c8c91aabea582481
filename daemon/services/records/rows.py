"""How each record becomes rows: the SQL statements of the writes and their parameters.

A `Write` is what the writer thread commits for one record: its statements, in
order, in one transaction. Converting happens on the caller's thread when the
record is written (cheap, no I/O), so a bad value fails at the call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from pbmd.daemon.core.recording import (
    EmissionEnded,
    EmissionProgress,
    EmissionReconciled,
    EmissionStarted,
    Event,
    PortReconciled,
    Record,
    SessionEnded,
    SessionStarted,
    SessionStateChanged,
    StepEnded,
    StepStarted,
)
from pbmd.daemon.services.records.schema import utc_text
from pbmd.drivers import codec

Statement = tuple[str, tuple[Any, ...] | dict[str, Any]]


@dataclass(slots=True)
class Write:
    """One record: statements applied together, in order, in one transaction."""

    label: str
    statements: tuple[Statement, ...]
    coalesce_key: int | None = None
    """Emission progress: a later update of the same emission replaces this one."""


_SQL_SESSION_STARTED = """
INSERT INTO sessions (id, started_utc, state, protocol_id, protocol_version, protocol_title,
    protocol_sha256, signing_key_id, plan_hash, plan_json, patient_ref, operator,
    contraindications_json, ports_json, controller_serial, controller_firmware, session_token,
    course_sessions, course_interval_days, time_scale, notes, skin_type)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    controller_energy_source = CASE WHEN ? THEN 'provisional'
                                    WHEN ? IS NULL THEN controller_energy_source
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
# A step already closed (its session ended with a provisional emission) takes its
# controller channel and emitting time from its emission rows again.
_SQL_RESUM_CLOSED_STEP = """
UPDATE steps SET
    delivered_controller_j = (SELECT SUM(e.controller_energy_uj) / 1e6 FROM emissions e
        WHERE e.session_id = steps.session_id AND e.port = steps.port
          AND e.step_index = steps.step_index),
    emitting_time_s = COALESCE((SELECT SUM(e.duration_ms) / 1e3 FROM emissions e
        WHERE e.session_id = steps.session_id AND e.port = steps.port
          AND e.step_index = steps.step_index), emitting_time_s)
WHERE ended_utc IS NOT NULL AND (session_id, port, step_index) =
    (SELECT session_id, port, step_index FROM emissions WHERE seq = ?)
"""
_SQL_RESUM_CLOSED_STEP_DERIVED = """
UPDATE steps SET mean_irradiance_mw_cm2 = CASE WHEN emitting_time_s > 0 THEN
        COALESCE(delivered_controller_j, delivered_host_j) * 1e3 / emitting_time_s / area_cm2
        ELSE mean_irradiance_mw_cm2 END
WHERE ended_utc IS NOT NULL AND (session_id, port, step_index) =
    (SELECT session_id, port, step_index FROM emissions WHERE seq = ?)
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
SELECT :id, s.id, :utc, :device_time_us, :kind, :code, :port, :severity, :message,
    CASE WHEN :session_id IS NULL OR s.id IS NOT NULL THEN :data_json
        ELSE json_set(COALESCE(:data_json, '{}'), '$.unrecorded_session_id', :session_id) END
FROM (SELECT 1) LEFT JOIN sessions s ON s.id = :session_id
"""
"""An event is never refused for its session: one whose session has no record (a start
stopped before its record was written) is kept with the session's id in its data."""
_SQL_OUTBOX = "INSERT INTO outbox (event_id) VALUES (?)"
_SQL_OUTBOX_PUBLISHED = (
    "UPDATE outbox SET published_utc = ? WHERE event_id = ? AND published_utc IS NULL"
)


def write_of(record: Record, seq: int | None = None) -> Write:
    """The rows of a record; ``seq`` is the number the store gave a new emission row."""
    match record:
        case SessionStarted():
            return _session_started(record)
        case SessionStateChanged():
            return Write(
                "session_state", ((_SQL_SESSION_STATE, (record.state, record.session_id)),)
            )
        case StepStarted():
            return _step_started(record)
        case EmissionStarted():
            return _emission_started(record, _given(seq))
        case EmissionProgress():
            return _emission_progress(record)
        case EmissionEnded():
            return _emission_ended(record)
        case EmissionReconciled():
            return _emission_reconciled(record)
        case PortReconciled():
            return _port_reconciled(record, _given(seq))
        case StepEnded():
            return _step_ended(record)
        case Event():
            return _event(record)
        case SessionEnded():
            return _session_ended(record)


def outbox_published(event_ids: list[str], utc: str) -> Write:
    return Write(
        "outbox_mark_published", tuple((_SQL_OUTBOX_PUBLISHED, (utc, eid)) for eid in event_ids)
    )


def _given(seq: int | None) -> int:
    if seq is None:
        raise ValueError("a new emission row needs the sequence number the store gives it")
    return seq


def _session_started(r: SessionStarted) -> Write:
    ports = [asdict(p) for p in r.ports]
    row = (
        r.session_id, utc_text(r.started_utc), r.state, r.protocol_id, r.protocol_version,
        r.protocol_title, r.protocol_sha256, r.signing_key_id, r.plan_hash, r.plan_json,
        r.patient_ref, r.operator, _json(dict(r.contraindications)), _json(ports),
        r.controller_serial, r.controller_firmware, r.session_token, r.course_sessions,
        r.course_interval_days, r.time_scale, r.notes, r.skin_type,
    )  # fmt: skip
    return Write("session_started", ((_SQL_SESSION_STARTED, row),))


def _step_started(r: StepStarted) -> Write:
    row = (
        r.session_id, r.port, r.step_index, r.site, r.site_label, r.region, r.area_covered_cm2,
        r.technique, r.wavelength_nm, r.mode, r.pulse_hz, r.duty_permille, r.pulse_width_ns,
        r.peak_power_mw, r.power_setpoint_mw, r.area_cm2, r.target_kind, r.target_value,
        r.prescribed_energy_j, r.prescribed_fluence_j_cm2, r.planned_time_s, r.max_time_s,
        utc_text(r.started_utc),
    )  # fmt: skip
    return Write("step_started", ((_SQL_STEP_STARTED, row),))


def _emission_started(r: EmissionStarted, seq: int) -> Write:
    q = r.request
    port = q.port if r.port is None else r.port
    row = (
        seq, r.session_id, port, q.port, r.step_index, q.wavelength_nm, _mode_name(q.mode),
        q.power_uw, q.pulse_hz, q.duty_permille, q.energy_budget_uj, q.max_duration_ms,
        utc_text(r.utc), r.device_time_us,
    )  # fmt: skip
    return Write("emission_started", ((_SQL_EMISSION_STARTED, row),))


def _emission_progress(r: EmissionProgress) -> Write:
    ctrl = _uj(r.controller_energy_uj)
    row = (_uj(r.host_energy_uj), ctrl, ctrl, r.device_time_us, utc_text(r.utc), r.seq)
    return Write("emission_progress", ((_SQL_EMISSION_PROGRESS, row),), coalesce_key=r.seq)


def _emission_ended(r: EmissionEnded) -> Write:
    reason, reason_code = _stop_reason(r.stop_reason)
    ctrl = _uj(r.controller_energy_uj)
    row = (
        utc_text(r.utc), r.device_time_us, _uj(r.host_energy_uj), ctrl, r.provisional, ctrl,
        r.duration_ms, reason, reason_code, r.host_stop_cause, r.seq,
    )  # fmt: skip
    return Write("emission_ended", ((_SQL_EMISSION_ENDED, row),))


def _emission_reconciled(r: EmissionReconciled) -> Write:
    reason, reason_code = _stop_reason(r.stop_reason)
    row = (
        int(r.controller_energy_uj), r.duration_ms, reason, reason_code, r.host_stop_cause,
        utc_text(r.utc), r.seq,
    )  # fmt: skip
    return Write(
        "reconcile_emission",
        (
            (_SQL_RECONCILE_EMISSION, row),
            (_SQL_RESUM_CLOSED_STEP, (r.seq,)),
            (_SQL_RESUM_CLOSED_STEP_DERIVED, (r.seq,)),
        ),
    )


def _port_reconciled(r: PortReconciled, seq: int) -> Write:
    now = utc_text(r.utc)
    total = int(r.controller_session_delivered_uj)
    sid, port = r.session_id, r.port
    row = (seq, sid, port, r.step_index, now, now, total, total, sid, port, total)
    return Write("reconcile_port", ((_SQL_RECONCILE_PORT, row),))


def _step_ended(r: StepEnded) -> Write:
    row = (
        utc_text(r.utc), r.outcome, r.stop_cause_code, r.stop_cause_message, r.delivered_host_j,
        r.delivered_controller_j, r.emitting_time_s, r.delivered_fluence_j_cm2,
        r.mean_irradiance_mw_cm2, r.session_id, r.port, r.step_index,
    )  # fmt: skip
    derived = (r.session_id, r.port, r.port, r.step_index)
    return Write("step_ended", ((_SQL_STEP_ENDED, row), (_SQL_STEP_DERIVED, derived)))


def _event(r: Event) -> Write:
    data_json = None if r.data is None else _json(dict(r.data))
    row = {
        "id": r.event_id, "session_id": r.session_id, "utc": utc_text(r.utc),
        "device_time_us": r.device_time_us, "kind": r.kind, "code": r.code, "port": r.port,
        "severity": r.severity, "message": r.message, "data_json": data_json,
    }  # fmt: skip
    return Write("event", ((_SQL_EVENT, row), (_SQL_OUTBOX, (r.event_id,))))


def _session_ended(r: SessionEnded) -> Write:
    now = utc_text(r.utc)
    sid, code, text = r.session_id, r.stop_cause_code, r.stop_cause_message
    cause = text or r.outcome
    # A step still open when a session "completes" did not complete.
    open_outcome = "interrupted" if r.outcome == "completed" else r.outcome
    return Write(
        "session_ended",
        (
            (_SQL_CLOSE_OPEN_EMISSIONS, (now, cause, sid)),
            (_SQL_CLOSE_OPEN_STEPS, (now, open_outcome, code, text, sid)),
            (_SQL_STEP_DERIVED, (sid, None, None, None)),
            (_SQL_SESSION_ENDED, (now, r.outcome, r.state or r.outcome, code, text, sid)),
        ),
    )


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
