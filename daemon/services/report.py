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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pbmd.daemon.core.recording import summarize_causes
from pbmd.daemon.services import report_skin
from pbmd.daemon.services.records import RecordStore
from pbmd.daemon.services.report_skin import ReportPhase, ReportSkinPatch
from pbmd.drivers import codec

REPORT_VERSION = 2
"""2: planned steps that never started are listed (outcome "not started", delivered 0),
points count placements, ports name their controller."""
DASH = "—"
NOT_STARTED = "not started"
"""The outcome of a planned step the session ended before (no emission was started)."""

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
    """"stopped" or "counters" (final); "provisional" (the last sample before the link was
    lost: a lower bound until the controller's counters are read) or "telemetry" (the
    last sample before the record ended)."""
    controller_energy_final: bool | None
    """True: the controller's own figure (STOPPED, COUNTERS); False: a lower bound."""
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
    """Placements at this site in the session: one per port treating it, however many
    channel steps it runs there (a pad's 660 and 830 nm steps are one placement)."""
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
    """False when part of the controller figure is a telemetry reading (provisional, a
    lower bound), not STOPPED/COUNTERS."""
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
    controller: str | None
    controller_serial: str | None
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
class ReportController:
    name: str | None
    serial: str | None
    firmware: str | None
    ports: tuple[int, ...]


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
    controllers: tuple[ReportController, ...]
    """Every controller the session's ports ran on (one row when the record does not say
    which port ran where)."""
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
    controller_channel_final: bool | None
    """False while any emission's controller figure is provisional (a lower bound)."""
    stop_causes: tuple[StopCause, ...]
    unassigned_emissions: tuple[ReportEmission, ...]
    """Emissions without a step row (dose recovered from the controller's counters)."""
    alerts: tuple[ReportEvent, ...]
    """Events of severity warning and above, in order."""
    skin_type: str | None = None
    """The patient's Fitzpatrick skin type as asked at start (None: not asked)."""
    phases: tuple[ReportPhase, ...] = ()
    """The protocol's phases, planned and as they ran."""
    skin_patches: tuple[ReportSkinPatch, ...] = ()
    """Cumulative fluence per patch of skin, from every step that reaches it."""

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


def cause_text(code: str | None, message: str | None) -> str:
    """A stop cause with its code once: a trip's message already starts with its code
    ("E201 The controller…"), an abort's has a code and a plain message."""
    if code and code not in (message or "").split():
        return f"{code} {message or ''}".strip()
    return message or code or ""


def _step_causes(message: str | None) -> str | None:
    """A step's causes, each once with its count (records of an older pbmd repeat one
    cause per pause: "paused by operator; paused by operator; …")."""
    return None if message is None else summarize_causes(message.split("; "))


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


def _scaled(row: Mapping[str, Any], key: str, divisor: float) -> float | None:
    """A recorded value in another unit (µJ to J: 1e6, ms to s: 1e3); None stays None."""
    v = _f(row.get(key))
    return None if v is None else v / divisor


_FINAL_SOURCES = {"stopped": True, "counters": True, "provisional": False, "telemetry": False}
"""Whether a controller energy source is the controller's final figure."""


def _all_final(emissions: Iterable[ReportEmission]) -> bool | None:
    """None when no emission holds a controller figure, else whether all are final."""
    known = [e.controller_energy_final for e in emissions if e.controller_energy_final is not None]
    return all(known) if known else None


def _emission(e: Mapping[str, Any]) -> ReportEmission:
    reason = _s(e.get("stop_reason"))
    source = _s(e.get("controller_energy_source"))
    return ReportEmission(
        seq=int(e["seq"]),
        port=int(e["port"]),
        step_index=_i(e.get("step_index")),
        origin=str(e.get("origin") or "host"),
        started_utc=_s(e.get("started_utc")),
        ended_utc=_s(e.get("ended_utc")),
        wavelength_nm=_i(e.get("wavelength_nm")),
        power_setpoint_mw=_scaled(e, "power_uw", 1e3),
        energy_budget_j=_scaled(e, "energy_budget_uj", 1e6),
        max_duration_s=_scaled(e, "max_duration_ms", 1e3),
        duration_s=_scaled(e, "duration_ms", 1e3),
        host_energy_j=_scaled(e, "host_energy_uj", 1e6),
        controller_energy_j=_scaled(e, "controller_energy_uj", 1e6),
        controller_energy_source=source,
        controller_energy_final=_FINAL_SOURCES.get(source or ""),
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
        controller_channel_final=_all_final(emissions),
        fluence_prescribed_j_cm2=prescribed_h
        if prescribed_h is not None
        else _ratio(prescribed_j, area),
        fluence_delivered_j_cm2=_f(s.get("delivered_fluence_j_cm2")),
        outcome=_s(s.get("outcome")),
        stop_cause_code=_s(s.get("stop_cause_code")),
        stop_cause_message=_step_causes(_s(s.get("stop_cause_message"))),
        started_utc=_s(s.get("started_utc")),
        ended_utc=_s(s.get("ended_utc")),
        emissions=tuple(emissions),
    )


def build_report(session: Mapping[str, Any]) -> TreatmentReport:
    """The report of a session as returned by RecordStore.get_session()."""
    steps, orphans = _steps(session)
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
        controllers=_controllers(session),
        session_token=_i(session.get("session_token")),
        time_scale=_f(session.get("time_scale")),
        course_sessions=_i(session.get("course_sessions")),
        course_interval_days=_f(session.get("course_interval_days")),
        notes=_s(session.get("notes")),
        contraindications=_contraindications(session),
        steps=tuple(steps),
        ports=_ports(session, steps),
        energy_prescribed_j=_sum_all(s.energy_prescribed_j for s in steps),
        energy_host_j=_sum(s.energy_host_j for s in steps),
        energy_controller_j=_sum(
            [s.energy_controller_j for s in steps] + [e.controller_energy_j for e in orphans]
        ),
        controller_channel_final=_all_final([*(e for s in steps for e in s.emissions), *orphans]),
        stop_causes=_stop_causes(session, steps, orphans),
        unassigned_emissions=tuple(orphans),
        alerts=_alerts(session),
        skin_type=_s(session.get("skin_type")),
        phases=report_skin.phases(session),
        skin_patches=report_skin.skin(session),
    )


def _steps(session: Mapping[str, Any]) -> tuple[list[ReportStep], list[ReportEmission]]:
    """Every planned step (recorded or never started) with its emissions, and the
    emissions no step row owns (by seq)."""
    raw_steps = _with_planned(session)
    by_step: dict[tuple[int, int | None], list[ReportEmission]] = {}
    for e in session.get("emissions") or []:
        key = (int(e["port"]), _i(e.get("step_index")))
        by_step.setdefault(key, []).append(_emission(e))
    placements: dict[str, set[int]] = {}
    for s in raw_steps:
        placements.setdefault(str(s["site"]), set()).add(int(s["port"]))
    steps = [
        _step(
            s,
            by_step.pop((int(s["port"]), int(s["step_index"])), []),
            len(placements[str(s["site"])]),
        )
        for s in raw_steps
    ]
    orphans = sorted((e for es in by_step.values() for e in es), key=lambda e: e.seq)
    return steps, orphans


def _with_planned(session: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The recorded step rows and, for every step of the plan the session ended before,
    a row as the step would have had: prescribed as planned, delivered 0, outcome
    "not started" (so an aborted session shows what was missed). In (port, step) order."""
    rows: dict[tuple[int, int], Mapping[str, Any]] = {
        (int(s["port"]), int(s["step_index"])): s for s in session.get("steps") or []
    }
    if session.get("outcome") is not None:  # an open session's steps are still to come
        for e in _planned_emissions(session.get("plan_json")):
            key = (int(e["port"]), int(e["step_index"]))
            if key not in rows:
                rows[key] = _not_started(e)
    return [rows[k] for k in sorted(rows)]


def _planned_emissions(plan_json: Any) -> list[Mapping[str, Any]]:
    """The plan's steps (`PlannedEmission` as JSON); none when the plan is unreadable."""
    try:
        plan = json.loads(plan_json) if isinstance(plan_json, str) else None
    except ValueError:
        return []
    ports = plan.get("ports") if isinstance(plan, dict) else None
    if not isinstance(ports, list):
        return []
    return [
        e
        for p in ports
        if isinstance(p, dict)
        for e in p.get("emissions") or []
        if isinstance(e, dict) and "port" in e and "step_index" in e
    ]


def _not_started(e: Mapping[str, Any]) -> dict[str, Any]:
    """A planned step that never started, in the shape of a step row."""
    pulsed = e.get("mode") == int(codec.EmitMode.PULSED)
    area_cm2 = _scaled(e, "area_mm2", 100.0)
    energy_j = _scaled(e, "target_energy_uj", 1e6)
    return {
        "port": e["port"],
        "step_index": e["step_index"],
        "site": e.get("site_id") or DASH,
        "site_label": e.get("site_label"),
        "region": e.get("region"),
        "area_covered_cm2": e.get("area_covered_cm2"),
        "technique": e.get("technique"),
        "wavelength_nm": e.get("wavelength_nm") or 0,
        "mode": "pulsed" if pulsed else "continuous",
        "pulse_hz": e.get("pulse_hz") if pulsed else None,
        "duty_permille": e.get("duty_permille") if pulsed else None,
        "pulse_width_ns": e.get("pulse_width_ns"),
        "peak_power_mw": e.get("peak_power_mw"),
        "power_setpoint_mw": _scaled(e, "power_uw", 1e3),
        "area_cm2": area_cm2,
        "target_kind": e.get("target") or DASH,
        "target_value": e.get("target_value") or 0.0,
        "prescribed_energy_j": energy_j,
        "prescribed_fluence_j_cm2": _ratio(energy_j, area_cm2),
        "planned_time_s": _scaled(e, "expected_duration_ms", 1e3),
        "delivered_host_j": 0.0,
        "delivered_controller_j": 0.0,
        "delivered_fluence_j_cm2": 0.0,
        "emitting_time_s": 0.0,
        "outcome": NOT_STARTED,
    }


def _controllers(session: Mapping[str, Any]) -> tuple[ReportController, ...]:
    """The controllers named by the session's ports, in port order; the session's own
    controller when its ports do not say (records of an older pbmd)."""
    found: dict[tuple[str | None, str | None], list[int]] = {}
    firmware: dict[tuple[str | None, str | None], str | None] = {}
    for p in session.get("ports") or []:
        if isinstance(p, Mapping) and p.get("controller_serial") is not None:
            key = (_s(p.get("controller")), _s(p.get("controller_serial")))
            found.setdefault(key, []).append(int(p["port"]))
            firmware[key] = _s(p.get("controller_firmware"))
    if not found:
        serial = _s(session.get("controller_serial"))
        ports = tuple(int(p["port"]) for p in session.get("ports") or [] if "port" in p)
        return (ReportController(None, serial, _s(session.get("controller_firmware")), ports),)
    return tuple(
        ReportController(name, serial, firmware[(name, serial)], tuple(sorted(ports)))
        for (name, serial), ports in found.items()
    )


def _ports(session: Mapping[str, Any], steps: Sequence[ReportStep]) -> tuple[ReportPort, ...]:
    """Totals per port, for every port the session used or has a step on."""
    port_info = {int(p["port"]): p for p in session.get("ports") or [] if "port" in p}
    ports = []
    for n in sorted({s.port for s in steps} | set(port_info)):
        ps = [s for s in steps if s.port == n]
        info = port_info.get(n, {})
        presc = _sum_all(s.energy_prescribed_j for s in ps)
        host = _sum(s.energy_host_j for s in ps)
        ctrl = _sum(s.energy_controller_j for s in ps)
        ports.append(
            ReportPort(
                port=n,
                controller=_s(info.get("controller")),
                controller_serial=_s(info.get("controller_serial")),
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
    return tuple(ports)


def _alerts(session: Mapping[str, Any]) -> tuple[ReportEvent, ...]:
    return tuple(
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


def _contraindications(session: Mapping[str, Any]) -> tuple[ContraindicationAnswer, ...]:
    answers = session.get("contraindications") or {}
    return tuple(
        ContraindicationAnswer(
            name=str(name),
            present=None if answer is None else bool(answer),
            description=CONTRAINDICATION_TEXT.get(str(name)),
        )
        for name, answer in sorted(answers.items())
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
    """What the controller reported (STOPPED) and why the host stopped the emission."""
    out = []
    if e.controller_stop_reason is not None:
        text = e.controller_stop_reason_text or e.controller_stop_reason
        reason = e.controller_stop_reason
        out.append(StopCause("emission (controller)", port, step, e.seq, reason, text))
    if e.host_stop_cause is not None:
        out.append(StopCause("emission (host)", port, step, e.seq, None, e.host_stop_cause))
    return out


async def session_report(store: RecordStore, session_id: str) -> TreatmentReport | None:
    """Read a session from the store and build its report (None if there is no such session)."""
    session = await store.get_session(session_id)
    return None if session is None else build_report(session)


def render_text(r: TreatmentReport) -> str:
    """The report as plain text (fixed-width tables, no terminal styling)."""
    from pbmd.daemon.services.report_text import render_text as render

    return render(r)
