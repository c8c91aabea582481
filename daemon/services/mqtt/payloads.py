"""The JSON payloads of the session, dose and event topics, and how they are encoded.

A payload is built from the core's typed session status (``Session.status()``,
a ``SessionStatus``) or from a records outbox row; the shapes are documented in docs/mqtt.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from typing import Any

from pbmd.daemon.core.status import RunnerStatus, SessionStatus
from pbmd.daemon.services.records import utc_text


def _clean(value: Any) -> Any:
    """JSON-safe: floats to 6 significant digits, non-finite floats to null."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def encode(payload: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON, compact, keys in a stable order."""
    return json.dumps(
        _clean(payload), ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def _utc(value: float | None) -> str | None:
    return None if value is None else utc_text(value)


_DOSE_KEYS: tuple[str, ...] = (
    "step", "steps", "site", "label", "wavelength_nm", "mode", "pulse_hz", "setpoint_mw",
    "power_mw", "irradiance_mw_cm2", "energy_j", "controller_energy_j", "fluence_j_cm2",
    "target_kind", "target_energy_j", "target_fluence_j_cm2", "target_time_s", "elapsed_s",
    "remaining_s", "fraction", "temperature_c", "contact",
)  # fmt: skip
_EVENT_KEYS: tuple[str, ...] = (
    "kind", "code", "severity", "message", "session_id", "port", "device_time_us", "data",
)  # fmt: skip
_SESSION_STEP_KEYS: tuple[str, ...] = ("step", "steps", "site", "label", "wavelength_nm")


def dose_payload(
    status_port: RunnerStatus, *, session_id: str, port: int, emitting: bool, seq: int
) -> dict[str, Any]:
    """One live sample of a port's dose (``port/<n>/dose``)."""
    payload: dict[str, Any] = {
        "ts": utc_text(),
        "seq": seq,
        "session_id": session_id,
        "port": port,
        "emitting": emitting,
    }
    step = status_port.step
    payload.update({k: None if step is None else getattr(step, k) for k in _DOSE_KEYS})
    return payload


def patient_hash(patient_ref: str, key: bytes) -> str:
    """The keyed hash a clinic may publish instead of a patient's identifier."""
    return hmac.new(key, patient_ref.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def session_payload(st: SessionStatus | None, patient_key: bytes | None = None) -> dict[str, Any]:
    if st is None:
        return {
            "session_id": None, "state": "idle", "protocol_id": None,
            "protocol_version": None, "plan_hash": None, "started_utc": None,
            "ended_utc": None, "cause_code": None, "cause_message": None, "trip": None,
            "ports": [],
        }  # fmt: skip
    # Never the patient reference: dashboards are not the clinical record. At most its
    # keyed hash, where the clinic chose that ([mqtt] patient_ids = "hash").
    hashed = (
        {} if patient_key is None else {"patient_hash": patient_hash(st.patient_ref, patient_key)}
    )
    return {
        **hashed,
        "session_id": st.session_id,
        "state": st.state.value,
        "protocol_id": st.protocol_id,
        "protocol_version": st.protocol_version,
        "plan_hash": st.plan_hash,
        "started_utc": _utc(st.started_utc),
        "ended_utc": _utc(st.ended_utc),
        "cause_code": st.cause_code,
        "cause_message": st.cause_message,
        "trip": st.trip,
        "ports": [_session_port(p) for p in st.ports],
    }


def _session_port(p: RunnerStatus) -> dict[str, Any]:
    step = p.step
    return {
        "port": p.port,
        "state": p.state.value,
        "wait_reason": p.wait_reason,
        **{k: None if step is None else getattr(step, k) for k in _SESSION_STEP_KEYS},
    }


def event_payload(row: Mapping[str, Any], patient_key: bytes | None = None) -> dict[str, Any]:
    """One recorded event (``events``), from its outbox row; a patient reference in its
    data (a refused start names the patient) is left out, or hashed where configured."""
    out = {
        "ts": row["utc"],
        "seq": int(row["outbox_seq"]),
        "id": str(row["id"]),
        **{k: row[k] for k in _EVENT_KEYS},
    }
    data = out.get("data")
    if isinstance(data, Mapping) and "patient_ref" in data:
        data = {k: v for k, v in data.items() if k != "patient_ref"}
        ref = row["data"]["patient_ref"]
        if patient_key is not None and isinstance(ref, str):
            data["patient_hash"] = patient_hash(ref, patient_key)
        out["data"] = data
    return out
