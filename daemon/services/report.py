"""Treatment report of one session, as JSON and as plain text.

The report states, for every step, the Jenkins & Carroll reporting set
(Photomed Laser Surg 29:785, 2011): wavelength, mode, average power, for pulsed
sources peak power, pulse frequency, pulse width and duty cycle, beam area,
irradiance, exposure time, radiant energy, radiant exposure, anatomical site,
number of points and technique; prescribed next to delivered on both dose
channels (the daemon's integrator and the controller's counter), per step and
per port; and every cause that stopped an emission, a step or the session.

It is built only from what the records hold (`RecordStore.get_session()`).
A value that was not recorded is shown as "—" and is null in JSON; the only
figures computed are those that follow from recorded ones by the formulas of
DOSIMETRY.md (mean power = energy / emitting time, pulse width = duty / rate).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pbmd.daemon.services.records import RecordStore

REPORT_VERSION = 1
DASH = "—"

STOP_REASON_TEXT: dict[str, str] = {
    "none": "no stop reported",
    "host_stop": "stopped on the daemon's request (EMIT_STOP)",
    "energy_budget": "controller energy budget reached (secondary dose channel)",
    "max_duration": "controller maximum duration reached (timer backstop)",
    "interlock": "an interlock opened (key, remote interlock or emergency stop)",
    "watchdog": "controller watchdog: the daemon stopped answering",
    "overpower": "controller measured more power than allowed",
    "over_temperature": "applicator over temperature",
    "applicator_removed": "applicator removed",
    "all_off": "ALL_OFF: every port stopped",
    "disarm": "controller disarmed",
    "contact_lost": "skin contact lost",
}

CONTRAINDICATION_TEXT: dict[str, str] = {
    "cancer": "histologically proven cancer at or near the treated site",
    "pregnancy": "pregnancy, when treating the abdomen, low back or pelvis",
    "hyperthyroidism": "hyperthyroidism, when treating the neck or thyroid region",
    "epilepsy": "epilepsy (pulsed red light at 5–10 Hz can trigger seizures)",
    "recent-radiotherapy": "radiotherapy of the area within the last 6 months",
    "bleeding-disorder": "bleeding disorders",
    "deep-vein-thrombosis": "deep vein thrombosis",
    "photosensitivity": "photosensitivity disorders and photosensitising drugs",
    "reduced-sensation": "reduced sensation at the treated site",
}


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class ContraindicationAnswer:
    name: str
    present: bool | None
    """The screening answer; None when the question was not answered."""
    description: str | None


@dataclass(frozen=True, slots=True)
class ReportEmission:
    seq: int
    port: int
    step_index: int | None
    origin: str
    """"host" (sent and recorded by the daemon) or "counters" (recovered after a crash)."""
    started_utc: str | None
    ended_utc: str | None
    wavelength_nm: int | None
    power_setpoint_mw: float | None
    energy_budget_j: float | None
    max_duration_s: float | None
    duration_s: float | None
    host_energy_j: float | None
    controller_energy_j: float | None
    controller_energy_source: str | None
    """"stopped" or "counters" (final), "telemetry" (last sample before the record ended)."""
    controller_stop_reason: str | None
    controller_stop_reason_text: str | None
    host_stop_cause: str | None


@dataclass(frozen=True, slots=True)
class ReportStep:
    port: int
    step_index: int
    site: str
    site_label: str | None
    region: str | None
    points_at_site: int
    """Placements (steps) at this site in the session."""
    area_covered_cm2: float | None
    technique: str | None
    wavelength_nm: int
    mode: str
    average_power_setpoint_mw: float | None
    average_power_delivered_mw: float | None
    peak_power_mw: float | None
    pulse_hz: float | None
    pulse_width_ns: float | None
    duty_percent: float | None
    beam_area_cm2: float | None
    irradiance_setpoint_mw_cm2: float | None
    irradiance_delivered_mw_cm2: float | None
    target_kind: str
    target_value: float
    exposure_time_planned_s: float | None
    exposure_time_delivered_s: float | None
    energy_prescribed_j: float | None
    energy_host_j: float | None
    energy_controller_j: float | None
    energy_host_vs_prescribed_percent: float | None
    energy_controller_vs_prescribed_percent: float | None
    controller_channel_final: bool | None
    """False when part of the controller figure is a telemetry reading, not STOPPED/COUNTERS."""
    fluence_prescribed_j_cm2: float | None
    fluence_delivered_j_cm2: float | None
    outcome: str | None
    stop_cause_code: str | None
    stop_cause_message: str | None
    started_utc: str | None
    ended_utc: str | None
    emissions: tuple[ReportEmission, ...]


@dataclass(frozen=True, slots=True)
class ReportPort:
    port: int
    applicator_kind: str | None
    applicator_serial: str | None
    steps: int
    steps_completed: int
    energy_prescribed_j: float | None
    energy_host_j: float | None
    energy_controller_j: float | None
    energy_host_vs_prescribed_percent: float | None
    energy_controller_vs_prescribed_percent: float | None
    exposure_time_delivered_s: float | None


@dataclass(frozen=True, slots=True)
class StopCause:
    """One reason something stopped: the session, a step, or an emission."""

    source: str
    """"session", "step", "emission (controller)", "emission (host)" or "event"."""
    port: int | None
    step_index: int | None
    emission_seq: int | None
    code: str | None
    message: str


@dataclass(frozen=True, slots=True)
class ReportEvent:
    utc: str
    severity: str
    kind: str
    code: str | None
    port: int | None
    message: str


@dataclass(frozen=True, slots=True)
class TreatmentReport:
    report_version: int
    session_id: str
    patient_ref: str | None
    operator: str | None
    started_utc: str | None
    ended_utc: str | None
    duration_s: float | None
    state: str | None
    outcome: str | None
    stop_cause_code: str | None
    stop_cause_message: str | None
    protocol_id: str | None
    protocol_version: int | None
    protocol_title: str | None
    protocol_sha256: str | None
    signing_key_id: str | None
    plan_hash: str | None
    controller_serial: str | None
    controller_firmware: str | None
    session_token: int | None
    time_scale: float | None
    course_sessions: int | None
    course_interval_days: float | None
    notes: str | None
    contraindications: tuple[ContraindicationAnswer, ...]
    steps: tuple[ReportStep, ...]
    ports: tuple[ReportPort, ...]
    energy_prescribed_j: float | None
    energy_host_j: float | None
    energy_controller_j: float | None
    stop_causes: tuple[StopCause, ...]
    unassigned_emissions: tuple[ReportEmission, ...]
    """Emissions without a step row (dose recovered from the controller's counters)."""
    alerts: tuple[ReportEvent, ...]
    """Events of severity warning and above, in order."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped: dicts, lists, numbers, strings and None."""
        plain: dict[str, Any] = _plain(asdict(self))
        return plain

    def to_json(self) -> str:
        """Stable JSON: keys in model order, units in the names, null for not recorded."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def to_text(self) -> str:
        return render_text(self)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- building


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


def _i(v: Any) -> int | None:
    return None if v is None else int(v)


def _s(v: Any) -> str | None:
    return None if v is None else str(v)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _percent_off(delivered: float | None, prescribed: float | None) -> float | None:
    r = _ratio(delivered, prescribed)
    return None if r is None else (r - 1.0) * 100.0


def _sum(values: Iterable[float | None]) -> float | None:
    """Sum of known values; None when none is known."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _sum_all(values: Iterable[float | None]) -> float | None:
    """Sum only if every value is known (a total with a gap is not a total)."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    return sum(v for v in vals if v is not None)


def _parse_utc(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _emission(e: Mapping[str, Any]) -> ReportEmission:
    reason = _s(e.get("stop_reason"))
    power_uw = _f(e.get("power_uw"))
    budget_uj = _f(e.get("energy_budget_uj"))
    max_ms = _f(e.get("max_duration_ms"))
    duration_ms = _f(e.get("duration_ms"))
    host_uj = _f(e.get("host_energy_uj"))
    ctrl_uj = _f(e.get("controller_energy_uj"))
    return ReportEmission(
        seq=int(e["seq"]),
        port=int(e["port"]),
        step_index=_i(e.get("step_index")),
        origin=str(e.get("origin") or "host"),
        started_utc=_s(e.get("started_utc")),
        ended_utc=_s(e.get("ended_utc")),
        wavelength_nm=_i(e.get("wavelength_nm")),
        power_setpoint_mw=None if power_uw is None else power_uw / 1e3,
        energy_budget_j=None if budget_uj is None else budget_uj / 1e6,
        max_duration_s=None if max_ms is None else max_ms / 1e3,
        duration_s=None if duration_ms is None else duration_ms / 1e3,
        host_energy_j=None if host_uj is None else host_uj / 1e6,
        controller_energy_j=None if ctrl_uj is None else ctrl_uj / 1e6,
        controller_energy_source=_s(e.get("controller_energy_source")),
        controller_stop_reason=reason,
        controller_stop_reason_text=None
        if reason is None
        else STOP_REASON_TEXT.get(reason, f"unknown controller stop reason ({reason})"),
        host_stop_cause=_s(e.get("host_stop_cause")),
    )


def _step(
    s: Mapping[str, Any], emissions: Sequence[ReportEmission], points_at_site: int
) -> ReportStep:
    area = _f(s.get("area_cm2"))
    setpoint_mw = _f(s.get("power_setpoint_mw"))
    host_j = _f(s.get("delivered_host_j"))
    ctrl_j = _f(s.get("delivered_controller_j"))
    emitting_s = _f(s.get("emitting_time_s"))
    prescribed_j = _f(s.get("prescribed_energy_j"))
    prescribed_h = _f(s.get("prescribed_fluence_j_cm2"))
    if prescribed_j is None and prescribed_h is not None and area is not None:
        prescribed_j = prescribed_h * area
    # Mean delivered power follows from energy and time (controller channel first).
    delivered_j = ctrl_j if ctrl_j is not None else host_j
    mean_power_mw = None
    if delivered_j is not None and emitting_s:
        mean_power_mw = delivered_j / emitting_s * 1e3
    pulse_hz = _f(s.get("pulse_hz"))
    duty_permille = _f(s.get("duty_permille"))
    width_ns = _f(s.get("pulse_width_ns"))
    pulsed = s.get("mode") == "pulsed"
    if pulsed and width_ns is None and duty_permille and pulse_hz:
        width_ns = duty_permille / 1e3 / pulse_hz * 1e9
    if pulsed and duty_permille is None and width_ns and pulse_hz:
        duty_permille = width_ns * 1e-9 * pulse_hz * 1e3
    peak_mw = _f(s.get("peak_power_mw"))
    if pulsed and peak_mw is None and setpoint_mw is not None and duty_permille:
        peak_mw = setpoint_mw / (duty_permille / 1e3)
    with_ctrl = [e for e in emissions if e.controller_energy_j is not None]
    final: bool | None = None
    if with_ctrl:
        final = all(e.controller_energy_source in ("stopped", "counters") for e in with_ctrl)
    return ReportStep(
        port=int(s["port"]),
        step_index=int(s["step_index"]),
        site=str(s["site"]),
        site_label=_s(s.get("site_label")),
        region=_s(s.get("region")),
        points_at_site=points_at_site,
        area_covered_cm2=_f(s.get("area_covered_cm2")),
        technique=_s(s.get("technique")),
        wavelength_nm=int(s["wavelength_nm"]),
        mode=str(s["mode"]),
        average_power_setpoint_mw=setpoint_mw,
        average_power_delivered_mw=mean_power_mw,
        peak_power_mw=peak_mw if pulsed else _f(s.get("peak_power_mw")),
        pulse_hz=pulse_hz if pulsed else None,
        pulse_width_ns=width_ns if pulsed else None,
        duty_percent=None if not pulsed or duty_permille is None else duty_permille / 10.0,
        beam_area_cm2=area,
        irradiance_setpoint_mw_cm2=_ratio(setpoint_mw, area),
        irradiance_delivered_mw_cm2=_f(s.get("mean_irradiance_mw_cm2")),
        target_kind=str(s["target_kind"]),
        target_value=float(s["target_value"]),
        exposure_time_planned_s=_f(s.get("planned_time_s")),
        exposure_time_delivered_s=emitting_s,
        energy_prescribed_j=prescribed_j,
        energy_host_j=host_j,
        energy_controller_j=ctrl_j,
        energy_host_vs_prescribed_percent=_percent_off(host_j, prescribed_j),
        energy_controller_vs_prescribed_percent=_percent_off(ctrl_j, prescribed_j),
        controller_channel_final=final,
        fluence_prescribed_j_cm2=prescribed_h
        if prescribed_h is not None
        else _ratio(prescribed_j, area),
        fluence_delivered_j_cm2=_f(s.get("delivered_fluence_j_cm2")),
        outcome=_s(s.get("outcome")),
        stop_cause_code=_s(s.get("stop_cause_code")),
        stop_cause_message=_s(s.get("stop_cause_message")),
        started_utc=_s(s.get("started_utc")),
        ended_utc=_s(s.get("ended_utc")),
        emissions=tuple(emissions),
    )


def build_report(session: Mapping[str, Any]) -> TreatmentReport:
    """The report of a session as returned by RecordStore.get_session()."""
    raw_steps: list[Mapping[str, Any]] = list(session.get("steps") or [])
    raw_emissions: list[Mapping[str, Any]] = list(session.get("emissions") or [])
    by_step: dict[tuple[int, int | None], list[ReportEmission]] = {}
    for e in raw_emissions:
        key = (int(e["port"]), _i(e.get("step_index")))
        by_step.setdefault(key, []).append(_emission(e))
    points: dict[str, int] = {}
    for s in raw_steps:
        points[str(s["site"])] = points.get(str(s["site"]), 0) + 1
    steps = [
        _step(s, by_step.pop((int(s["port"]), int(s["step_index"])), []), points[str(s["site"])])
        for s in raw_steps
    ]
    orphans = sorted((e for es in by_step.values() for e in es), key=lambda e: e.seq)

    port_info = {int(p["port"]): p for p in session.get("ports") or [] if "port" in p}
    port_numbers = sorted({s.port for s in steps} | set(port_info))
    ports = []
    for n in port_numbers:
        ps = [s for s in steps if s.port == n]
        info = port_info.get(n, {})
        presc = _sum_all(s.energy_prescribed_j for s in ps)
        host = _sum(s.energy_host_j for s in ps)
        ctrl = _sum(s.energy_controller_j for s in ps)
        ports.append(
            ReportPort(
                port=n,
                applicator_kind=_s(info.get("applicator_kind")),
                applicator_serial=_s(info.get("applicator_serial")),
                steps=len(ps),
                steps_completed=sum(1 for s in ps if s.outcome == "completed"),
                energy_prescribed_j=presc,
                energy_host_j=host,
                energy_controller_j=ctrl,
                energy_host_vs_prescribed_percent=_percent_off(host, presc),
                energy_controller_vs_prescribed_percent=_percent_off(ctrl, presc),
                exposure_time_delivered_s=_sum(s.exposure_time_delivered_s for s in ps),
            )
        )

    stop_causes = _stop_causes(session, steps, orphans)
    alerts = tuple(
        ReportEvent(
            utc=str(ev["utc"]),
            severity=str(ev["severity"]),
            kind=str(ev["kind"]),
            code=_s(ev.get("code")),
            port=_i(ev.get("port")),
            message=str(ev["message"]),
        )
        for ev in session.get("events") or []
        if ev.get("severity") in ("warning", "error", "critical")
    )
    answers = session.get("contraindications") or {}
    contraindications = tuple(
        ContraindicationAnswer(
            name=str(name),
            present=None if answer is None else bool(answer),
            description=CONTRAINDICATION_TEXT.get(str(name)),
        )
        for name, answer in sorted(answers.items())
    )
    started = _s(session.get("started_utc"))
    ended = _s(session.get("ended_utc"))
    t0, t1 = _parse_utc(started), _parse_utc(ended)
    return TreatmentReport(
        report_version=REPORT_VERSION,
        session_id=str(session["id"]),
        patient_ref=_s(session.get("patient_ref")),
        operator=_s(session.get("operator")),
        started_utc=started,
        ended_utc=ended,
        duration_s=None if t0 is None or t1 is None else (t1 - t0).total_seconds(),
        state=_s(session.get("state")),
        outcome=_s(session.get("outcome")),
        stop_cause_code=_s(session.get("stop_cause_code")),
        stop_cause_message=_s(session.get("stop_cause_message")),
        protocol_id=_s(session.get("protocol_id")),
        protocol_version=_i(session.get("protocol_version")),
        protocol_title=_s(session.get("protocol_title")),
        protocol_sha256=_s(session.get("protocol_sha256")),
        signing_key_id=_s(session.get("signing_key_id")),
        plan_hash=_s(session.get("plan_hash")),
        controller_serial=_s(session.get("controller_serial")),
        controller_firmware=_s(session.get("controller_firmware")),
        session_token=_i(session.get("session_token")),
        time_scale=_f(session.get("time_scale")),
        course_sessions=_i(session.get("course_sessions")),
        course_interval_days=_f(session.get("course_interval_days")),
        notes=_s(session.get("notes")),
        contraindications=contraindications,
        steps=tuple(steps),
        ports=tuple(ports),
        energy_prescribed_j=_sum_all(s.energy_prescribed_j for s in steps),
        energy_host_j=_sum(s.energy_host_j for s in steps),
        energy_controller_j=_sum(
            [s.energy_controller_j for s in steps] + [e.controller_energy_j for e in orphans]
        ),
        stop_causes=stop_causes,
        unassigned_emissions=tuple(orphans),
        alerts=alerts,
    )


def _stop_causes(
    session: Mapping[str, Any], steps: Sequence[ReportStep], orphans: Sequence[ReportEmission]
) -> tuple[StopCause, ...]:
    causes: list[StopCause] = []
    if session.get("outcome") is not None or session.get("stop_cause_code") is not None:
        causes.append(
            StopCause(
                source="session",
                port=None,
                step_index=None,
                emission_seq=None,
                code=_s(session.get("stop_cause_code")),
                message=str(
                    session.get("stop_cause_message") or f"session {session.get('outcome')}"
                ),
            )
        )
    for step in steps:
        if step.stop_cause_code is not None or step.stop_cause_message is not None:
            causes.append(
                StopCause(
                    source="step",
                    port=step.port,
                    step_index=step.step_index,
                    emission_seq=None,
                    code=step.stop_cause_code,
                    message=f"step {step.outcome or 'unfinished'}: "
                    + (step.stop_cause_message or DASH),
                )
            )
        for e in step.emissions:
            causes.extend(_emission_causes(e, step.port, step.step_index))
    for e in orphans:
        causes.extend(_emission_causes(e, e.port, e.step_index))
    return tuple(causes)


def _emission_causes(e: ReportEmission, port: int | None, step: int | None) -> list[StopCause]:
    out = []
    if e.controller_stop_reason is not None:
        out.append(
            StopCause(
                source="emission (controller)",
                port=port,
                step_index=step,
                emission_seq=e.seq,
                code=e.controller_stop_reason,
                message=e.controller_stop_reason_text or e.controller_stop_reason,
            )
        )
    if e.host_stop_cause is not None:
        out.append(
            StopCause(
                source="emission (host)",
                port=port,
                step_index=step,
                emission_seq=e.seq,
                code=None,
                message=e.host_stop_cause,
            )
        )
    return out


async def session_report(store: RecordStore, session_id: str) -> TreatmentReport | None:
    """Read a session from the store and build its report (None if there is no such session)."""
    session = await store.get_session(session_id)
    return None if session is None else build_report(session)


# --------------------------------------------------------------------------- text


def _num(v: float | int | None, decimals: int = 1) -> str:
    if v is None:
        return DASH
    return f"{v:.{decimals}f}"


def _pct(v: float | None) -> str:
    return DASH if v is None else f"{v:+.2f}"


def _text(v: object) -> str:
    return DASH if v is None or v == "" else str(v)


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[int] = ()
) -> list[str]:
    """Fixed-width columns: text columns (indices in ``left``) left-aligned, numbers right."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  " + "  ".join(parts).rstrip()

    out = [line(headers), "  " + "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in rows)
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    total = round(seconds)
    return f"{total // 3600:d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def render_text(r: TreatmentReport) -> str:
    """The report as plain text (fixed-width tables, no terminal styling)."""
    out: list[str] = []
    title = "PHOTOBIOMODULATION TREATMENT REPORT"
    out += [title, "=" * len(title), ""]
    outcome = (r.outcome or "unfinished").upper()
    cause = " ".join(x for x in (r.stop_cause_code, r.stop_cause_message) if x)
    kv = [
        ("Session", r.session_id),
        ("Patient", _text(r.patient_ref)),
        ("Operator", _text(r.operator)),
        ("Started (UTC)", _text(r.started_utc)),
        ("Ended (UTC)", _text(r.ended_utc)),
        ("Duration", _duration(r.duration_s)),
        ("Outcome", outcome + (f" — {cause}" if cause else "")),
        ("Protocol", f"{_text(r.protocol_id)} version {_text(r.protocol_version)}"
         + (f" ({r.protocol_title})" if r.protocol_title else "")),
        ("Protocol SHA-256", _text(r.protocol_sha256)),
        ("Signing key", _text(r.signing_key_id)),
        ("Plan hash", _text(r.plan_hash)),
        ("Controller", f"serial {_text(r.controller_serial)}, firmware "
         f"{_text(r.controller_firmware)}, session token {_text(r.session_token)}"),
        ("Course", DASH if r.course_sessions is None else
         f"{r.course_sessions} sessions, at least {_num(r.course_interval_days, 0)} day(s) "
         "apart"),
    ]
    if r.time_scale is not None and r.time_scale != 1.0:
        kv.append(("Time scale", f"{r.time_scale:g}x (simulated controller)"))
    if r.notes:
        kv.append(("Notes", r.notes))
    width = max(len(k) for k, _ in kv)
    out += [f"{k.ljust(width)}  {v}" for k, v in kv]

    out += ["", "Contraindication screening"]
    if r.contraindications:
        rows = [
            [c.name, DASH if c.present is None else ("yes" if c.present else "no"),
             _text(c.description)]
            for c in r.contraindications
        ]
        out += _table(["contraindication", "present", "meaning"], rows, left=(0, 1, 2))
    else:
        out.append(f"  {DASH}")

    out += ["", "Beam and exposure parameters per step (Jenkins & Carroll 2011)"]
    rows = [
        [
            str(s.port), str(s.step_index + 1), s.site_label or s.site, _text(s.technique),
            str(s.points_at_site), str(s.wavelength_nm), s.mode,
            _num(s.average_power_setpoint_mw), _num(s.average_power_delivered_mw),
            _num(s.peak_power_mw), _num(s.pulse_hz, 0), _num(s.pulse_width_ns, 0),
            _num(s.duty_percent, 2), _num(s.beam_area_cm2, 2), _num(s.area_covered_cm2, 0),
            _num(s.irradiance_setpoint_mw_cm2), _num(s.irradiance_delivered_mw_cm2),
        ]
        for s in r.steps
    ]
    out += _table(
        ["port", "step", "site", "technique", "points", "λ nm", "mode", "P set mW",
         "P mean mW", "P peak mW", "f Hz", "width ns", "duty %", "beam cm²", "covered cm²",
         "I set mW/cm²", "I mean mW/cm²"],
        rows,
        left=(2, 3, 6),
    )

    out += ["", "Dose per step: prescribed vs delivered (host and controller channels)"]
    rows = []
    any_provisional = False
    for s in r.steps:
        mark = ""
        if s.controller_channel_final is False:
            mark, any_provisional = "*", True
        rows.append(
            [
                str(s.port), str(s.step_index + 1), s.target_kind,
                _num(s.exposure_time_planned_s), _num(s.exposure_time_delivered_s),
                _num(s.energy_prescribed_j, 3), _num(s.energy_host_j, 3),
                _pct(s.energy_host_vs_prescribed_percent),
                _num(s.energy_controller_j, 3) + mark,
                _pct(s.energy_controller_vs_prescribed_percent),
                _num(s.fluence_prescribed_j_cm2, 3), _num(s.fluence_delivered_j_cm2, 3),
                _text(s.outcome), _text(s.stop_cause_code),
            ]
        )
    out += _table(
        ["port", "step", "target", "t plan s", "t emit s", "E presc J", "E host J",
         "host Δ %", "E ctrl J", "ctrl Δ %", "H presc J/cm²", "H deliv J/cm²", "outcome",
         "cause"],
        rows,
        left=(2, 12, 13),
    )
    if any_provisional:
        out.append("  * controller figure includes a telemetry reading not confirmed by "
                   "STOPPED or COUNTERS")

    out += ["", "Per port"]
    rows = [
        [
            str(p.port), _text(p.applicator_kind), _text(p.applicator_serial),
            f"{p.steps_completed}/{p.steps}", _num(p.exposure_time_delivered_s),
            _num(p.energy_prescribed_j, 3), _num(p.energy_host_j, 3),
            _pct(p.energy_host_vs_prescribed_percent), _num(p.energy_controller_j, 3),
            _pct(p.energy_controller_vs_prescribed_percent),
        ]
        for p in r.ports
    ]
    rows.append(
        ["all", "", "", f"{sum(p.steps_completed for p in r.ports)}/"
         f"{sum(p.steps for p in r.ports)}",
         _num(_sum(p.exposure_time_delivered_s for p in r.ports)),
         _num(r.energy_prescribed_j, 3), _num(r.energy_host_j, 3),
         _pct(_percent_off(r.energy_host_j, r.energy_prescribed_j)),
         _num(r.energy_controller_j, 3),
         _pct(_percent_off(r.energy_controller_j, r.energy_prescribed_j))]
    )
    out += _table(
        ["port", "applicator", "serial", "steps done", "t emit s", "E presc J", "E host J",
         "host Δ %", "E ctrl J", "ctrl Δ %"],
        rows,
        left=(0, 1, 2),
    )

    out += ["", "Emissions"]
    rows = []
    for s in r.steps:
        for e in s.emissions:
            rows.append(_emission_row(e))
    rows.extend(_emission_row(e) for e in r.unassigned_emissions)
    if rows:
        out += _table(
            ["port", "step", "#", "origin", "t s", "E host J", "E ctrl J", "ctrl source",
             "controller stop reason", "host stop cause"],
            rows,
            left=(3, 7, 8, 9),
        )
    else:
        out.append(f"  {DASH}")

    out += ["", "Stop causes"]
    if r.stop_causes:
        for c in r.stop_causes:
            where = ", ".join(
                x
                for x in (
                    None if c.port is None else f"port {c.port}",
                    None if c.step_index is None else f"step {c.step_index + 1}",
                    None if c.emission_seq is None else f"emission #{c.emission_seq}",
                )
                if x
            )
            code = f"{c.code} " if c.code and c.source != "emission (controller)" else ""
            out.append(f"  {c.source}{' (' + where + ')' if where else ''}: {code}{c.message}")
    else:
        out.append(f"  {DASH}")

    out += ["", "Warnings and errors"]
    if r.alerts:
        out += _table(
            ["utc", "severity", "code", "port", "message"],
            [[a.utc, a.severity, _text(a.code), _text(a.port), a.message] for a in r.alerts],
            left=(0, 1, 2, 4),
        )
    else:
        out.append(f"  {DASH}")
    out.append("")
    return "\n".join(out)


def _emission_row(e: ReportEmission) -> list[str]:
    return [
        str(e.port),
        DASH if e.step_index is None else str(e.step_index + 1),
        str(e.seq),
        e.origin,
        _num(e.duration_s, 1),
        _num(e.host_energy_j, 3),
        _num(e.controller_energy_j, 3), _text(e.controller_energy_source),
        _text(e.controller_stop_reason), _text(e.host_stop_cause),
    ]
