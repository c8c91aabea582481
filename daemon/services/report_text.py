"""The treatment report as plain text: fixed-width tables, no terminal styling.

The model and every figure come from `report` (built from the records only); this
module only lays them out. A value that was not recorded is "—".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pbmd.daemon.services.report import (
    DASH,
    NOT_STARTED,
    ReportController,
    ReportEmission,
    ReportStep,
    StopCause,
    TreatmentReport,
    _percent_off,
    _sum,
    cause_text,
)

Column = tuple[str, bool, Callable[[Any], str]]
"""One column of a text table: header, left-aligned (text) or not (numbers), and its cell."""

L, R = True, False


def _num(v: float | int | None, decimals: int = 1) -> str:
    if v is None:
        return DASH
    return f"{v:.{decimals}f}"


def _area(v: float | None) -> str:
    """An area as recorded: a probe's 0.5 cm² is not rounded to 0, a pad's 180 has no
    decimals."""
    return DASH if v is None else f"{v:g}"


def _pct(v: float | None) -> str:
    return DASH if v is None else f"{v:+.2f}"


def _text(v: object) -> str:
    return DASH if v is None or v == "" else str(v)


def _table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[str]:
    """Fixed-width columns: text columns left-aligned, numbers right."""
    left = [is_left for _, is_left, _ in columns]
    widths = [len(h) for h, _, _ in columns]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(widths[i]) if left[i] else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "  " + "  ".join(parts).rstrip()

    out = [line([h for h, _, _ in columns]), "  " + "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in rows)
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    total = round(seconds)
    return f"{total // 3600:d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _columns_table(columns: Sequence[Column], items: Iterable[Any]) -> list[str]:
    return _table(columns, [[cell(x) for _, _, cell in columns] for x in items])


def _step_no(i: int | None) -> str:
    return DASH if i is None else str(i + 1)


def _source(e: ReportEmission) -> str:
    """Where an emission's controller figure comes from; a lower bound is said so."""
    lower = " (lower bound)" if e.controller_energy_final is False else ""
    return _text(e.controller_energy_source) + lower


def _provisional(s: ReportStep) -> str:
    """A controller figure that includes a telemetry reading not yet confirmed."""
    return "*" if s.controller_channel_final is False else ""


_SCREENING_COLUMNS: tuple[Column, ...] = (
    ("contraindication", L, lambda c: c.name),
    ("present", L, lambda c: DASH if c.present is None else ("yes" if c.present else "no")),
    ("meaning", L, lambda c: _text(c.description)),
)
_BEAM_COLUMNS: tuple[Column, ...] = (
    ("port", R, lambda s: str(s.port)),
    ("step", R, lambda s: _step_no(s.step_index)),
    ("site", L, lambda s: s.site_label or s.site),
    ("technique", L, lambda s: _text(s.technique)),
    ("points", R, lambda s: str(s.points_at_site)),
    ("λ nm", R, lambda s: str(s.wavelength_nm)),
    ("mode", L, lambda s: s.mode),
    ("P set mW", R, lambda s: _num(s.average_power_setpoint_mw)),
    ("P mean mW", R, lambda s: _num(s.average_power_delivered_mw)),
    ("P peak mW", R, lambda s: _num(s.peak_power_mw)),
    ("f Hz", R, lambda s: _num(s.pulse_hz, 0)),
    ("width ns", R, lambda s: _num(s.pulse_width_ns, 0)),
    ("duty %", R, lambda s: _num(s.duty_percent, 2)),
    ("beam cm²", R, lambda s: _num(s.beam_area_cm2, 2)),
    ("covered cm²", R, lambda s: _area(s.area_covered_cm2)),
    ("I set mW/cm²", R, lambda s: _num(s.irradiance_setpoint_mw_cm2)),
    ("I mean mW/cm²", R, lambda s: _num(s.irradiance_delivered_mw_cm2)),
)
_DOSE_COLUMNS: tuple[Column, ...] = (
    ("port", R, lambda s: str(s.port)),
    ("step", R, lambda s: _step_no(s.step_index)),
    ("target", L, lambda s: s.target_kind),
    ("t plan s", R, lambda s: _num(s.exposure_time_planned_s)),
    ("t emit s", R, lambda s: _num(s.exposure_time_delivered_s)),
    ("E presc J", R, lambda s: _num(s.energy_prescribed_j, 3)),
    ("E host J", R, lambda s: _num(s.energy_host_j, 3)),
    ("host Δ %", R, lambda s: _pct(s.energy_host_vs_prescribed_percent)),
    ("E ctrl J", R, lambda s: _num(s.energy_controller_j, 3) + _provisional(s)),
    ("ctrl Δ %", R, lambda s: _pct(s.energy_controller_vs_prescribed_percent)),
    ("H presc J/cm²", R, lambda s: _num(s.fluence_prescribed_j_cm2, 3)),
    ("H deliv J/cm²", R, lambda s: _num(s.fluence_delivered_j_cm2, 3)),
    ("outcome", L, lambda s: _text(s.outcome)),
    ("cause", L, lambda s: _text(s.stop_cause_code)),
)
_PORT_COLUMNS: tuple[Column, ...] = (
    ("port", L, lambda p: str(p.port)),
    ("applicator", L, lambda p: _text(p.applicator_kind)),
    ("serial", L, lambda p: _text(p.applicator_serial)),
    ("steps done", R, lambda p: f"{p.steps_completed}/{p.steps}"),
    ("t emit s", R, lambda p: _num(p.exposure_time_delivered_s)),
    ("E presc J", R, lambda p: _num(p.energy_prescribed_j, 3)),
    ("E host J", R, lambda p: _num(p.energy_host_j, 3)),
    ("host Δ %", R, lambda p: _pct(p.energy_host_vs_prescribed_percent)),
    ("E ctrl J", R, lambda p: _num(p.energy_controller_j, 3)),
    ("ctrl Δ %", R, lambda p: _pct(p.energy_controller_vs_prescribed_percent)),
)
_EMISSION_COLUMNS: tuple[Column, ...] = (
    ("port", R, lambda e: str(e.port)),
    ("step", R, lambda e: _step_no(e.step_index)),
    ("#", R, lambda e: str(e.seq)),
    ("origin", L, lambda e: e.origin),
    ("t s", R, lambda e: _num(e.duration_s, 1)),
    ("E host J", R, lambda e: _num(e.host_energy_j, 3)),
    ("E ctrl J", R, lambda e: _num(e.controller_energy_j, 3)),
    ("ctrl source", L, lambda e: _source(e)),
    ("controller stop reason", L, lambda e: _text(e.controller_stop_reason)),
    ("host stop cause", L, lambda e: _text(e.host_stop_cause)),
)
_ALERT_COLUMNS: tuple[Column, ...] = (
    ("utc", L, lambda a: a.utc),
    ("severity", L, lambda a: a.severity),
    ("code", L, lambda a: _text(a.code)),
    ("port", R, lambda a: _text(a.port)),
    ("message", L, lambda a: a.message),
)


def render_text(r: TreatmentReport) -> str:
    """The report as plain text (fixed-width tables, no terminal styling)."""
    title = "PHOTOBIOMODULATION TREATMENT REPORT"
    out = [title, "=" * len(title), "", *_session_lines(r)]
    screening = _columns_table(_SCREENING_COLUMNS, r.contraindications)
    out += _section("Contraindication screening", screening if r.contraindications else [])
    out += _section(
        "Beam and exposure parameters per step (Jenkins & Carroll 2011)",
        _columns_table(_BEAM_COLUMNS, r.steps),
    )
    out += _section(
        "Dose per step: prescribed vs delivered (host and controller channels)",
        _columns_table(_DOSE_COLUMNS, r.steps),
    )
    if any(_provisional(s) for s in r.steps):
        out.append(
            "  * provisional, a lower bound: the controller figure includes a telemetry "
            "reading (e.g. the last before a link loss) not confirmed by STOPPED or COUNTERS"
        )
    missed = [s for s in r.steps if s.outcome == NOT_STARTED]
    if missed:
        out.append(
            f"  {len(missed)} planned step(s) not started: the session ended before them; "
            "their prescribed dose was not delivered"
        )
    out += _section("Phases (planned times from the start of emission)", _phase_lines(r))
    out += _section(
        "Skin: cumulative fluence per patch, every step that reaches it", _skin_lines(r)
    )
    out += _section("Per port", _port_lines(r))
    emissions = [e for s in r.steps for e in s.emissions] + list(r.unassigned_emissions)
    out += _section("Emissions", _columns_table(_EMISSION_COLUMNS, emissions) if emissions else [])
    out += _section("Stop causes", [_stop_cause_line(c) for c in r.stop_causes])
    out += _section(
        "Warnings and errors", _columns_table(_ALERT_COLUMNS, r.alerts) if r.alerts else []
    )
    out.append("")
    return "\n".join(out)


def _section(title: str, lines: Sequence[str]) -> list[str]:
    """A titled part of the text; a dash stands for an empty one."""
    return ["", title, *(lines or [f"  {DASH}"])]


def _session_lines(r: TreatmentReport) -> list[str]:
    """Who, when, what protocol and how it ended, as aligned "key  value" lines."""
    outcome = (r.outcome or "unfinished").upper()
    cause = cause_text(r.stop_cause_code, r.stop_cause_message)
    protocol = f"{_text(r.protocol_id)} version {_text(r.protocol_version)}"
    controller = "; ".join(_controller(c, len(r.controllers) > 1) for c in r.controllers)
    controller += f"; session token {_text(r.session_token)}"
    course = DASH
    if r.course_sessions is not None:
        days = _num(r.course_interval_days, 0)
        course = f"{r.course_sessions} sessions, at least {days} day(s) apart"
    kv = [
        ("Session", r.session_id),
        ("Patient", _text(r.patient_ref)),
        ("Operator", _text(r.operator)),
        ("Started (UTC)", _text(r.started_utc)),
        ("Ended (UTC)", _text(r.ended_utc)),
        ("Duration", _duration(r.duration_s)),
        ("Outcome", outcome + (f" — {cause}" if cause else "")),
        ("Protocol", protocol + (f" ({r.protocol_title})" if r.protocol_title else "")),
        ("Protocol SHA-256", _text(r.protocol_sha256)),
        ("Signing key", _text(r.signing_key_id)),
        ("Plan hash", _text(r.plan_hash)),
        ("Controller", controller),
        ("Controller dose", _finality(r.controller_channel_final)),
        ("Course", course),
    ]
    if r.time_scale is not None and r.time_scale != 1.0:
        kv.append(("Time scale", f"{r.time_scale:g}x (simulated controller)"))
    kv.append(("Skin type", f"Fitzpatrick {r.skin_type}" if r.skin_type else "not asked"))
    if r.notes:
        kv.append(("Notes", r.notes))
    width = max(len(k) for k, _ in kv)
    return [f"{k.ljust(width)}  {v}" for k, v in kv]


def _controller(c: ReportController, several: bool) -> str:
    """One controller: its name when there are several, serial, firmware, its ports."""
    name = f"{c.name}: " if several and c.name else ""
    ports = f", ports {', '.join(str(p) for p in c.ports)}" if several and c.ports else ""
    return f"{name}serial {_text(c.serial)}, firmware {_text(c.firmware)}{ports}"


def _finality(final: bool | None) -> str:
    """Whether the controller channel holds the controller's own figures."""
    if final is None:
        return DASH
    if final:
        return "final (the controller's STOPPED and COUNTERS figures)"
    return "PROVISIONAL: a lower bound until the controller's counters are read (see *)"


def _port_lines(r: TreatmentReport) -> list[str]:
    """The per-port table with a last row for all ports together."""
    rows = [[cell(p) for _, _, cell in _PORT_COLUMNS] for p in r.ports]
    done = sum(p.steps_completed for p in r.ports)
    total = [
        "all",
        "",
        "",
        f"{done}/{sum(p.steps for p in r.ports)}",
        _num(_sum(p.exposure_time_delivered_s for p in r.ports)),
        _num(r.energy_prescribed_j, 3),
        _num(r.energy_host_j, 3),
        _pct(_percent_off(r.energy_host_j, r.energy_prescribed_j)),
        _num(r.energy_controller_j, 3),
        _pct(_percent_off(r.energy_controller_j, r.energy_prescribed_j)),
    ]
    return _table(_PORT_COLUMNS, [*rows, total])


def _stop_cause_line(c: StopCause) -> str:
    where = ", ".join(
        x
        for x in (
            None if c.port is None else f"port {c.port}",
            None if c.step_index is None else f"step {c.step_index + 1}",
            None if c.emission_seq is None else f"emission #{c.emission_seq}",
        )
        if x
    )
    shown = c.code and c.source != "emission (controller)" and c.code not in c.message.split()
    code = f"{c.code} " if shown else ""
    return f"  {c.source}{' (' + where + ')' if where else ''}: {code}{c.message}"


def _phase_lines(r: TreatmentReport) -> list[str]:
    """Each phase: its ports, when it was due and when it ran, its steps."""
    lines = []
    for p in r.phases:
        due = (
            f"due at {_duration(p.planned_start_s)} for {_duration(p.planned_duration_s)}"
            if p.planned_start_s is not None
            else "planned before phases were recorded"
        )
        lines.append(
            f"  {p.index + 1}. {p.id} ({p.title}): ports {', '.join(map(str, p.ports))}; {due}; "
            f"ran {_text(p.started_utc)} – {_text(p.ended_utc)}; "
            f"{p.steps_completed} of {p.steps} steps completed"
        )
    return lines


def _skin_lines(r: TreatmentReport) -> list[str]:
    """Each patch: the fluence per wavelength and in all, prescribed and delivered,
    against the session's ceilings."""
    lines = []
    for p in r.skin_patches:
        per_nm = ", ".join(
            f"{d.wavelength_nm} nm {_num(d.fluence_delivered_j_cm2, 2)}"
            f" (of {_num(d.fluence_prescribed_j_cm2, 2)})"
            for d in p.by_wavelength
        )
        ceilings = f"ceiling {_num(p.ceiling_per_wavelength_j_cm2, 1)} per wavelength"
        if p.ceiling_total_j_cm2 is not None:
            ceilings += f", {_num(p.ceiling_total_j_cm2, 1)} in all"
        if p.ceiling_source:
            ceilings += f" ({p.ceiling_source})"
        kind = "" if p.body_region else " [site name, v1 protocol]"
        lines.append(f"  {p.patch}{kind}: {p.label}")
        lines.append(
            f"    J/cm² delivered: {per_nm}; in all {_num(p.fluence_delivered_j_cm2, 2)} "
            f"(of {_num(p.fluence_prescribed_j_cm2, 2)}); {ceilings}"
        )
        lines.append(f"    from {', '.join(p.steps)}")
    return lines
