"""Synthetic sessions written through the store's public write API.

A lumbar session on two ports: a DUO pad (660 nm then 830 nm, 180 cm², dosed
by fluence) and the superpulsed 905 nm probe (0.5 cm², 4 J per point). One
completes; one is faulted by a dose-channel disagreement with several stop
causes at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from pbmd.daemon.services.records import RecordStore, SessionPort, SessionStart, StepStart
from pbmd.drivers import codec

T0_S = 1_700_000_000.0
PAD_AREA_CM2 = 180.0
PROBE_AREA_CM2 = 0.5


@dataclass(frozen=True)
class StepSpec:
    port: int
    index: int
    site: str
    wavelength_nm: int
    power_mw: float
    area_cm2: float
    energy_j: float
    time_s: float
    pulsed: bool = False


PAD_660 = StepSpec(1, 0, "lumbar-pad", 660, 1800.0, PAD_AREA_CM2, 720.0, 400.0)
PAD_830 = StepSpec(1, 1, "lumbar-pad", 830, 2700.0, PAD_AREA_CM2, 720.0, 266.667)
PROBE_905 = StepSpec(4, 0, "l4-left", 905, 200.0, PROBE_AREA_CM2, 4.0, 20.0, pulsed=True)


def session_start(session_id: str, *, signing_key_id: str | None = "RWTtestkey") -> SessionStart:
    return SessionStart(
        session_id=session_id,
        protocol_id="chronic-lumbar",
        protocol_version=3,
        protocol_title="Chronic low back pain, lumbar",
        protocol_sha256="a" * 64,
        signing_key_id=signing_key_id,
        plan_hash="b" * 64,
        plan_json='{"ports":{"1":[],"4":[]}}',
        patient_ref="PAT-0042",
        operator="dr.lee",
        contraindications={"epilepsy": False, "pregnancy": False, "cancer": None},
        ports=[
            SessionPort(1, "pad", "DUO-1001", PAD_AREA_CM2, (660, 830)),
            SessionPort(4, "probe", "P905-7", PROBE_AREA_CM2, (905,)),
        ],
        session_token=0xC0FFEE,
        controller_serial="SIM-0001",
        controller_firmware="1.2.3",
        course_sessions=10,
        course_interval_days=2.0,
        time_scale=60.0,
        started_utc=T0_S,
    )


def step_start(session_id: str, s: StepSpec, t_s: float) -> StepStart:
    return StepStart(
        session_id=session_id,
        port=s.port,
        step_index=s.index,
        site=s.site,
        site_label="Lumbar, L1–S1" if s.port == 1 else "L4, left paraspinal",
        region="lumbar",
        area_covered_cm2=s.area_cm2 if s.port == 1 else 1.0,
        technique="contact",
        wavelength_nm=s.wavelength_nm,
        mode="pulsed" if s.pulsed else "continuous",
        pulse_hz=10_000.0 if s.pulsed else None,
        duty_permille=2 if s.pulsed else None,
        pulse_width_ns=None,  # left for the report to derive from duty and rate
        peak_power_mw=100_000.0 if s.pulsed else None,
        power_setpoint_mw=s.power_mw,
        area_cm2=s.area_cm2,
        target_kind="fluence_j_cm2" if s.port == 1 else "energy_j",
        target_value=s.energy_j / s.area_cm2 if s.port == 1 else s.energy_j,
        prescribed_energy_j=s.energy_j,
        prescribed_fluence_j_cm2=s.energy_j / s.area_cm2,
        planned_time_s=s.time_s,
        max_time_s=s.time_s * 1.2,
        started_utc=t_s,
    )


def emit_request(s: StepSpec) -> codec.EmitStart:
    return codec.EmitStart(
        port=s.port,
        wavelength_nm=s.wavelength_nm,
        mode=int(codec.EmitMode.PULSED if s.pulsed else codec.EmitMode.CONTINUOUS),
        power_uw=round(s.power_mw * 1000),
        pulse_hz=10_000 if s.pulsed else 0,
        duty_permille=2 if s.pulsed else 0,
        energy_budget_uj=round(s.energy_j * 1.05e6),
        max_duration_ms=round(s.time_s * 1200),
    )


def run_step(
    store: RecordStore,
    session_id: str,
    s: StepSpec,
    t_s: float,
    *,
    host_j: float,
    ctrl_j: float,
    stop_reason: codec.StopReason = codec.StopReason.HOST_STOP,
    host_cause: str = "dose reached",
    outcome: str = "completed",
    cause_code: str | None = None,
    cause_message: str | None = None,
) -> int:
    """Write one step with one emission; returns the emission's sequence number."""
    store.step_started(step_start(session_id, s, t_s))
    seq = store.emission_started(
        session_id, s.index, emit_request(s), device_time_us=int(t_s * 1e6), utc=t_s
    )
    duration_s = ctrl_j / (s.power_mw / 1e3)
    for k in range(1, 11):
        store.emission_progress(
            seq,
            host_energy_uj=host_j * 1e6 * k / 11,
            controller_energy_uj=ctrl_j * 1e6 * k / 11,
            device_time_us=int((t_s + duration_s * k / 11) * 1e6),
        )
    store.emission_ended(
        seq,
        host_stop_cause=host_cause,
        host_energy_uj=host_j * 1e6,
        controller_energy_uj=ctrl_j * 1e6,
        duration_ms=round(duration_s * 1e3),
        stop_reason=stop_reason,
        utc=t_s + duration_s,
    )
    store.step_ended(
        session_id,
        s.port,
        s.index,
        outcome=outcome,  # type: ignore[arg-type]
        stop_cause_code=cause_code,
        stop_cause_message=cause_message,
        utc=t_s + duration_s,
    )
    return seq


def write_completed(store: RecordStore, session_id: str) -> None:
    store.session_started(session_start(session_id))
    store.event("state", "session running", session_id=session_id, utc=T0_S + 1)
    run_step(store, session_id, PAD_660, T0_S + 10, host_j=720.36, ctrl_j=719.64)
    run_step(store, session_id, PAD_830, T0_S + 420, host_j=720.0, ctrl_j=720.72)
    run_step(store, session_id, PROBE_905, T0_S + 10, host_j=4.002, ctrl_j=3.998)
    store.session_ended(session_id, outcome="completed", utc=T0_S + 700)


E105 = "The daemon's and the controller's dose measurements disagree."


def write_faulted(store: RecordStore, session_id: str) -> None:
    """Port 1 finishes 660 nm, then E105 trips during 830 nm; the 905 nm probe had just
    been ended early by the controller's energy budget."""
    store.session_started(session_start(session_id, signing_key_id=None))
    run_step(store, session_id, PAD_660, T0_S + 10, host_j=720.0, ctrl_j=720.1)
    run_step(
        store, session_id, PROBE_905, T0_S + 10, host_j=3.70, ctrl_j=4.20,
        stop_reason=codec.StopReason.ENERGY_BUDGET, host_cause="ended by the controller",
        outcome="faulted", cause_code="E404",
        cause_message="A backup dose channel ended an emission before the prescribed dose.",
    )
    store.event(
        "trip", E105, code="E105", session_id=session_id, port=1, severity="error",
        utc=T0_S + 500,
    )
    run_step(
        store, session_id, PAD_830, T0_S + 420, host_j=180.0, ctrl_j=190.0,
        stop_reason=codec.StopReason.ALL_OFF, host_cause="trip E105",
        outcome="faulted", cause_code="E105", cause_message=E105,
    )
    store.session_ended(
        session_id, outcome="faulted", stop_cause_code="E105", stop_cause_message=E105,
        utc=T0_S + 501,
    )


def planned_emission(s: StepSpec) -> dict[str, object]:
    """A step as the frozen plan holds it (`pbmd.protocols.plan.PlannedEmission`, JSON)."""
    return {
        "port": s.port,
        "step_index": s.index,
        "site_id": s.site,
        "site_label": "L4, left paraspinal" if s.pulsed else "Lumbar, L1–S1",
        "region": "lumbar",
        "area_covered_cm2": s.area_cm2,
        "technique": "contact",
        "wavelength_nm": s.wavelength_nm,
        "mode": int(codec.EmitMode.PULSED if s.pulsed else codec.EmitMode.CONTINUOUS),
        "power_uw": round(s.power_mw * 1000),
        "pulse_hz": 10_000 if s.pulsed else 0,
        "duty_permille": 2 if s.pulsed else 1000,
        "pulse_width_ns": None,
        "peak_power_mw": 100_000.0 if s.pulsed else None,
        "area_mm2": round(s.area_cm2 * 100),
        "target": "energy_j",
        "target_value": s.energy_j,
        "target_energy_uj": round(s.energy_j * 1e6),
        "expected_duration_ms": round(s.time_s * 1000),
    }


def write_aborted_early(store: RecordStore, session_id: str) -> None:
    """The plan holds the pad's two steps on port 1 (controller "a") and the probe on
    port 4 (controller "b"); the 660 nm step is paused three times, then the session is
    aborted: the 830 nm step and the probe point never start."""
    plan = {
        "ports": [
            {"port": 1, "emissions": [planned_emission(PAD_660), planned_emission(PAD_830)]},
            {"port": 4, "emissions": [planned_emission(PROBE_905)]},
        ]
    }
    start = session_start(session_id)
    start = replace(
        start,
        plan_json=json.dumps(plan),
        ports=[
            SessionPort(1, "pad", "DUO-1001", PAD_AREA_CM2, (660, 830), "a", "SIM-A", "1.2.3"),
            SessionPort(4, "probe", "P905-7", PROBE_AREA_CM2, (905,), "b", "SIM-B", "1.2.4"),
        ],
    )
    store.session_started(start)
    run_step(
        store, session_id, PAD_660, T0_S + 10, host_j=300.0, ctrl_j=300.2,
        outcome="aborted", cause_code="E001",
        cause_message="; ".join(["paused by operator"] * 3 + ["aborted by operator"]),
    )  # fmt: skip
    store.session_ended(
        session_id, outcome="aborted", stop_cause_code="E001",
        stop_cause_message="aborted by operator", utc=T0_S + 300,
    )  # fmt: skip
