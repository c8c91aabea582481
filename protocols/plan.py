"""From a protocol and the applicators a controller reports to a frozen Plan.

A Plan is what the treatment engine runs: per port, the ordered emissions
with their EMIT_START setpoints in the controller's units (µW, Hz, ‰), the
host's dose target, and the two independent backstops the controller
enforces by itself (energy budget +5 %, max duration +20 %). Every number is
computed from what PORT_INFO reported (area, channel maxima, modes), never
from a catalogue, and every ceiling the validator applies is applied again
with those numbers. The Plan is immutable and carries a SHA-256 over its
canonical JSON; the engine checks it again just before emission, so nothing
can edit a plan between confirmation and beam-on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pbmd.drivers import codec
from pbmd.protocols import anatomy
from pbmd.protocols.body_map import body_map
from pbmd.protocols.checks import (
    ProtocolView,
    StepDose,
    area_covered_of,
    check_dose,
    check_totals,
    check_view,
    resolve_step,
    zone_of,
)
from pbmd.protocols.errors import Issue, PlanError, Severity
from pbmd.protocols.limits import (
    AREA_TOLERANCE,
    DEFAULT_LIMITS,
    ENERGY_BUDGET_MARGIN,
    MAX_DURATION_MARGIN,
    SKIN_TYPES,
    Limits,
)
from pbmd.protocols.model import (
    Applicator,
    ApplicatorKind,
    Course,
    Gating,
    Mode,
    Port,
    Protocol,
    Region,
    Step,
    Target,
    Technique,
)
from pbmd.protocols.schedule import V1_PHASE_ID, V1_PHASE_TITLE, Item, build

_KIND_ON_WIRE = {
    ApplicatorKind.PAD: codec.ApplicatorKind.PAD,
    ApplicatorKind.PROBE: codec.ApplicatorKind.PROBE,
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlannedEmission(_Frozen):
    """One step as the controller will be told it, with the host's dose target."""

    port: int = Field(description="Logical port (the key of the applicators mapping).")
    step_index: int = Field(description="Position of the step in the port's list, from 0.")
    site_id: str
    site_label: str
    region: Region
    area_covered_cm2: float
    technique: Technique
    # EMIT_START setpoints
    wavelength_nm: int
    mode: codec.EmitMode
    power_uw: int = Field(description="Average optical power setpoint.")
    pulse_hz: int = Field(description="0 when continuous.")
    duty_permille: int = Field(description="1000 when continuous.")
    pulse_width_ns: float | None = Field(description="As stated by the protocol, if stated.")
    peak_power_mw: float | None = Field(description="Average power ÷ duty (pulsed only).")
    # geometry, reported by PORT_INFO
    area_mm2: int
    irradiance_mw_cm2: float
    # the host's primary dose channel
    target: Target
    target_value: float = Field(description="In the target's unit: J/cm², J or s.")
    target_energy_uj: int = Field(description="Energy at which the host ends the step.")
    expected_duration_ms: int
    expected_energy_uj: int
    expected_fluence_j_cm2: float
    # the controller's independent channels and the host's backup timer
    energy_budget_uj: int = Field(description="Controller stops here: target energy +5 %.")
    max_duration_ms: int = Field(description="Controller stops here: planned time +20 %.")
    backup_time_s: float = Field(description="Host backup timer: the step's max_time_s.")
    gating: Gating
    # format v2: when it runs, where on the skin, where its dose comes from
    phase: int = Field(default=0, description="Index of the phase (v1: 0, the only one).")
    body_region: str | None = Field(default=None, description="Body-map region (v2).")
    patches: tuple[str, ...] = Field(
        default=(),
        description="Patches of skin whose cumulative fluence this emission adds to: the "
        "body-map regions it reaches (v2), or its site's name (v1).",
    )
    sources: tuple[str, ...] = ()
    basis: str | None = None
    assumption: str | None = None

    def emit_start(self, port: int | None = None) -> codec.EmitStart:
        """The EMIT_START request of this emission (on `port`, if the link numbers differ)."""
        return codec.EmitStart(
            port=self.port if port is None else port,
            wavelength_nm=self.wavelength_nm,
            mode=int(self.mode),
            power_uw=self.power_uw,
            pulse_hz=self.pulse_hz,
            duty_permille=self.duty_permille,
            energy_budget_uj=self.energy_budget_uj,
            max_duration_ms=self.max_duration_ms,
        )


class PortPlan(_Frozen):
    port: int
    applicator_kind: codec.ApplicatorKind
    applicator_serial: str
    area_mm2: int
    emissions: tuple[PlannedEmission, ...]
    expected_duration_ms: int
    expected_energy_uj: int

    @property
    def points(self) -> int:
        """Number of distinct sites the port treats (Jenkins & Carroll)."""
        return len({e.site_id for e in self.emissions})


class PlanPhase(_Frozen):
    """One phase: the ports whose steps run together, when nobody waits."""

    index: int
    id: str
    title: str
    ports: tuple[int, ...]
    expected_start_ms: int
    expected_duration_ms: int


class Plan(_Frozen):
    """A protocol bound to the connected applicators, frozen and hashed."""

    protocol_id: str
    protocol_version: int
    protocol_title: str
    protocol_sha256: str = Field(description="SHA-256 of the protocol's canonical JSON.")
    course: Course
    limits: Limits
    ports: tuple[PortPlan, ...]
    expected_duration_ms: int = Field(
        description="The critical path: the phases one after another, each as long as its "
        "longest port."
    )
    phases: tuple[PlanPhase, ...] = ()
    schema_version: int = 1
    body_map: str | None = Field(default=None, description="Body map id and version (v2).")
    skin_type: str | None = Field(default=None, description="Patient's Fitzpatrick skin type.")
    irradiance_derating: float = Field(
        default=1.0, description="Factor on the irradiance ceilings for this skin type."
    )
    warnings: tuple[str, ...]
    content_hash: str = Field(description="SHA-256 of this plan's canonical JSON.")

    def port(self, number: int) -> PortPlan:
        for port in self.ports:
            if port.port == number:
                return port
        raise KeyError(number)

    def compute_hash(self) -> str:
        return content_hash(self)

    def verify(self) -> bool:
        return self.compute_hash() == self.content_hash


class PlanIntegrityError(ValueError):
    """A plan's content no longer matches its hash: it must not run."""


def canonical_json(value: BaseModel, *, exclude: set[str] | None = None) -> bytes:
    """Sorted keys, no whitespace, no NaN: the same bytes for the same content."""
    data = value.model_dump(mode="json", exclude=exclude)
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def content_hash(plan: Plan) -> str:
    return hashlib.sha256(canonical_json(plan, exclude={"content_hash"})).hexdigest()


def protocol_hash(protocol: Protocol) -> str:
    return hashlib.sha256(canonical_json(protocol)).hexdigest()


def verify_plan(plan: Plan, expected_hash: str | None = None) -> None:
    """Raise PlanIntegrityError unless the plan hashes to its (and the expected) hash."""
    actual = content_hash(plan)
    if actual != plan.content_hash:
        raise PlanIntegrityError(
            f"plan of {plan.protocol_id!r} was altered: content hashes to {actual[:16]}…, "
            f"the plan says {plan.content_hash[:16]}…"
        )
    if expected_hash is not None and expected_hash != actual:
        raise PlanIntegrityError(
            f"plan of {plan.protocol_id!r} is not the confirmed one: {actual[:16]}… "
            f"≠ {expected_hash[:16]}…"
        )


def plan(
    protocol: Protocol,
    applicators: Mapping[int, codec.PortInfo],
    limits: Limits = DEFAULT_LIMITS,
    skin_type: str | None = None,
) -> Plan:
    """Bind a validated protocol to the reported applicators; PlanError lists every misfit."""
    if skin_type is not None and skin_type not in SKIN_TYPES:
        raise ValueError(f"skin type {skin_type!r}: use one of {', '.join(SKIN_TYPES)}")
    # A Plan exists only for a protocol that passes every check under these
    # limits, however the Protocol object was made (not only via the loader).
    view = ProtocolView.of(protocol)
    findings, _ = check_view(view, limits)
    refusals = [i for i in findings if i.severity is Severity.ERROR]
    if refusals:
        raise PlanError(protocol.id, [_on_protocol(i, protocol) for i in refusals])

    tally = _Tally()
    ports: list[PortPlan] = []
    for number, port in sorted(protocol.ports.items()):
        port_plan = _plan_port(protocol, number, port, applicators.get(number), limits, tally)
        if port_plan is not None:
            ports.append(port_plan)
    phase_of = anatomy.phase_indices(view)
    tally.doses = [
        replace(d, phase=phase_of.get(protocol.ports[d.port].steps[d.index].phase or "", 0))
        for d in tally.doses
    ]
    if protocol.schema_version == 2:
        for issue in anatomy.check_skin(view, tally.doses, limits):
            tally.add(issue)
    for issue in check_totals(tally.doses, limits):
        if protocol.schema_version == 1 or issue.rule != "fluence-ceiling":
            tally.add(issue)
    derating = limits.derating(skin_type)
    for issue in anatomy.check_derated(tally.doses, limits, skin_type):
        tally.add(issue)
    if tally.errors:
        raise PlanError(protocol.id, [_on_protocol(i, protocol) for i in tally.errors])

    ports = [_placed(p, protocol, phase_of) for p in ports]
    phases = _phases(protocol, ports)
    the_map = body_map()
    fields: dict[str, Any] = {
        "phases": phases,
        "schema_version": protocol.schema_version,
        "body_map": f"{the_map.id} v{the_map.version}" if protocol.schema_version == 2 else None,
        "skin_type": skin_type,
        "irradiance_derating": derating,
        "protocol_id": protocol.id,
        "protocol_version": protocol.version,
        "protocol_title": protocol.title,
        "protocol_sha256": protocol_hash(protocol),
        "course": protocol.course,
        "limits": limits,
        "ports": tuple(ports),
        "expected_duration_ms": sum(p.expected_duration_ms for p in phases),
        "warnings": tuple(str(_on_protocol(w, protocol)) for w in tally.warnings),
        "content_hash": "",
    }
    draft = Plan(**fields)
    return draft.model_copy(update={"content_hash": content_hash(draft)})


def _placed(port: PortPlan, protocol: Protocol, phase_of: Mapping[str, int]) -> PortPlan:
    """The port's emissions with their phase, body region and the patches they reach."""
    the_map = body_map()
    emissions = []
    for e in port.emissions:
        step = protocol.ports[port.port].steps[e.step_index]
        region = protocol.sites[step.site].body_region
        patches = (
            tuple(sorted(the_map.reached_by(region)))
            if region is not None and region in the_map
            else (e.site_id,)
        )
        emissions.append(
            e.model_copy(
                update={
                    "phase": phase_of.get(step.phase or "", 0),
                    "body_region": region,
                    "patches": patches,
                    "sources": tuple(step.sources),
                    "basis": step.basis,
                    "assumption": step.assumption,
                }
            )
        )
    return port.model_copy(update={"emissions": tuple(emissions)})


def _phases(protocol: Protocol, ports: list[PortPlan]) -> tuple[PlanPhase, ...]:
    """The plan's phases in order, timed as the engine runs them when nobody waits."""
    declared = [(p.id, p.title) for p in protocol.phases] or [(V1_PHASE_ID, V1_PHASE_TITLE)]
    timeline = build(
        declared,
        (
            Item(e.port, e.step_index, e.phase, e.expected_duration_ms / 1000.0, e.site_id)
            for p in ports
            for e in p.emissions
        ),
    )
    return tuple(
        PlanPhase(
            index=slot.index,
            id=slot.id,
            title=slot.title,
            ports=slot.ports,
            expected_start_ms=round(slot.start_s * 1000.0),
            expected_duration_ms=round((slot.end_s - slot.start_s) * 1000.0),
        )
        for slot in timeline.phases
    )


@dataclass
class _Tally:
    """What planning has found so far, in the order it found it."""

    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    doses: list[StepDose] = field(default_factory=list)

    def add(self, issue: Issue) -> None:
        (self.warnings if issue.severity is Severity.WARNING else self.errors).append(issue)


def _plan_port(
    protocol: Protocol,
    number: int,
    port: Port,
    info: codec.PortInfo | None,
    limits: Limits,
    tally: _Tally,
) -> PortPlan | None:
    """One port's emissions, or None when its applicator does not fit (the misfit is tallied)."""
    key = str(number)
    misfit = _applicator_misfit(number, key, port.applicator, info)
    if misfit is not None or info is None:
        if misfit is not None:
            tally.errors.append(misfit)
        return None
    area_cm2 = info.area_mm2 / 100.0
    emissions: list[PlannedEmission] = []
    for index, step in enumerate(port.steps):
        planned = _plan_step(protocol, number, key, index, step, info, area_cm2)
        if isinstance(planned, Issue):
            tally.errors.append(planned)
            continue
        emission, dose = planned
        tally.doses.append(dose)
        emissions.append(emission)
        for issue in check_dose(step, dose, limits):
            tally.add(issue)
    return PortPlan(
        port=number,
        applicator_kind=codec.ApplicatorKind(info.applicator_kind),
        applicator_serial=info.applicator_serial,
        area_mm2=info.area_mm2,
        emissions=tuple(emissions),
        expected_duration_ms=sum(e.expected_duration_ms for e in emissions),
        expected_energy_uj=sum(e.expected_energy_uj for e in emissions),
    )


def _applicator_misfit(
    number: int, key: str, need: Applicator, info: codec.PortInfo | None
) -> Issue | None:
    """Why the reported applicator cannot carry the port's steps, or None when it can."""
    where = ("ports", key, "applicator")
    channels = ", ".join(f"{c} nm" for c in need.channels_nm)
    if info is None or info.applicator_kind == codec.ApplicatorKind.NONE:
        return Issue(
            "no-applicator",
            f"port {number} has no applicator; the protocol needs a {need.kind.value} "
            f"with {channels}",
            path=where,
            allowed=f"a {need.kind.value} on port {number}",
            fix=f"plug a {need.kind.value} ({channels}) into port {number}",
        )
    if info.applicator_kind != _KIND_ON_WIRE[need.kind]:
        return Issue(
            "applicator-kind",
            f"port {number} reports a "
            f"{codec.describe(codec.ApplicatorKind, info.applicator_kind).lower()} "
            f"(serial {info.applicator_serial or '?'}), the protocol needs a "
            f"{need.kind.value}",
            path=(*where, "kind"),
            value=codec.describe(codec.ApplicatorKind, info.applicator_kind).lower(),
            allowed=need.kind.value,
            fix=f"plug a {need.kind.value} with {channels} into port {number}",
        )
    area_cm2 = info.area_mm2 / 100.0
    if area_cm2 <= 0 or abs(area_cm2 - need.beam_area_cm2) > AREA_TOLERANCE * need.beam_area_cm2:
        return Issue(
            "applicator-area",
            f"port {number} reports an emitting area of {area_cm2:g} cm²; the protocol "
            f"was written for {need.beam_area_cm2:g} cm²",
            path=(*where, "beam_area_cm2"),
            value=f"{area_cm2:g} cm²",
            allowed=f"{need.beam_area_cm2:g} cm² ± {AREA_TOLERANCE:.0%}",
            fix="use the applicator the protocol was written for, or a protocol "
            "written for this one",
        )
    return None


def _mode_misfit(
    number: int, path: tuple[str | int, ...], step: Step, channel: codec.Channel
) -> Issue | None:
    """Why the channel cannot emit in the step's mode, or None when it can."""
    pulsed = step.mode is Mode.PULSED
    if (pulsed and not channel.pulsed) or (not pulsed and not channel.continuous):
        offered = [
            m for m, ok in (("continuous", channel.continuous), ("pulsed", channel.pulsed)) if ok
        ]
        return Issue(
            "mode-unavailable",
            f"the {step.wavelength_nm} nm channel on port {number} does not offer "
            f"{step.mode.value} emission",
            path=(*path, "mode"),
            value=f'"{step.mode.value}"',
            allowed=" or ".join(offered) or "nothing",
            fix="use an applicator that offers this mode",
        )
    return None


def _plan_step(
    protocol: Protocol,
    number: int,
    key: str,
    index: int,
    step: Step,
    info: codec.PortInfo,
    area_cm2: float,
) -> tuple[PlannedEmission, StepDose] | Issue:
    """One step as the controller will run it, or the first reason it cannot run."""
    path = ("ports", key, "steps", index)
    channel = info.channel(step.wavelength_nm)
    if channel is None:
        reported = ", ".join(f"{c.wavelength_nm} nm" for c in info.channels) or "none"
        return Issue(
            "channel-missing",
            f"the applicator on port {number} has no {step.wavelength_nm} nm channel",
            path=(*path, "wavelength_nm"),
            value=str(step.wavelength_nm),
            allowed=f"reported channels: {reported}",
            fix=f"plug an applicator with a {step.wavelength_nm} nm channel into port {number}",
        )
    misfit = _mode_misfit(number, path, step, channel)
    if misfit is not None:
        return misfit
    dose = resolve_step(number, key, index, step, area_cm2)
    if dose is None:  # validated protocols always resolve
        return Issue("unresolved", "the step's dose cannot be computed", path=path)
    power_uw = round(dose.power_mw * 1000.0)
    if power_uw < 1 or power_uw > channel.max_power_uw:
        return Issue(
            "power-above-max",
            f"{dose.power_mw:g} mW at {step.wavelength_nm} nm is above what the "
            f"applicator on port {number} reports it can emit",
            path=(*path, "power_mw" if step.power_mw is not None else "irradiance_mw_cm2"),
            value=f"{dose.power_mw:g} mW",
            allowed=f"1 µW – {channel.max_power_uw / 1000:g} mW",
            fix="lower the setpoint or use a stronger applicator",
        )
    pulse = _pulse_setpoints(number, path, step, dose, channel)
    if isinstance(pulse, Issue):
        return pulse
    emission = _emission(protocol, number, index, step, dose, info, area_cm2, power_uw, pulse)
    return emission, dose


def _pulse_setpoints(
    number: int,
    path: tuple[str | int, ...],
    step: Step,
    dose: StepDose,
    channel: codec.Channel,
) -> tuple[int, int, float | None] | Issue:
    """(pulse_hz, duty ‰, peak mW) for the step, or why the channel's peak forbids it."""
    duty_permille = 1000
    pulse_hz = 0
    peak_mw: float | None = None
    if step.mode is Mode.PULSED and dose.duty is not None and dose.pulse_hz is not None:
        pulse_hz = dose.pulse_hz
        duty_permille = min(999, max(1, round(dose.duty * 1000)))
        peak_mw = dose.power_mw / dose.duty
        if channel.peak_power_mw and peak_mw > channel.peak_power_mw * (1 + 1e-9):
            return Issue(
                "peak-power",
                f"{dose.power_mw:g} mW average at {dose.duty * 1000:g} ‰ duty needs "
                f"{peak_mw:g} mW peak; the applicator on port {number} reports "
                f"{channel.peak_power_mw} mW",
                path=(*path, "power_mw"),
                value=f"{peak_mw:g} mW peak",
                allowed=f"≤ {channel.peak_power_mw} mW peak, i.e. ≤ "
                f"{channel.peak_power_mw * dose.duty:g} mW average at this duty",
                fix="lower the average power or raise the duty cycle (pulse rate or width)",
            )
    return pulse_hz, duty_permille, peak_mw


def _emission(
    protocol: Protocol,
    number: int,
    index: int,
    step: Step,
    dose: StepDose,
    info: codec.PortInfo,
    area_cm2: float,
    power_uw: int,
    pulse: tuple[int, int, float | None],
) -> PlannedEmission:
    """The step's setpoints, target and the controller's two backstops."""
    pulse_hz, duty_permille, peak_mw = pulse
    irradiance = power_uw / 1000.0 / area_cm2
    if dose.target is Target.TIME:
        duration_s = dose.target_value
        target_energy_uj = round(power_uw * duration_s)
    else:
        if dose.target is Target.FLUENCE:
            target_energy_uj = round(dose.target_value * area_cm2 * 1e6)
        else:
            target_energy_uj = round(dose.target_value * 1e6)
        duration_s = target_energy_uj / power_uw
    expected_ms = max(1, round(duration_s * 1000.0))
    max_time_ms = round(step.max_time_s * 1000.0)
    max_duration_ms = min(math.ceil(expected_ms * (1 + MAX_DURATION_MARGIN)), max_time_ms)
    site = protocol.sites[step.site]  # checked by check_view in plan()
    zone, covered_cm2 = zone_of(site), area_covered_of(site)
    if zone is None or covered_cm2 is None:  # check_view refused such a site already
        raise ValueError(f"site {step.site!r} has no zone or area")
    return PlannedEmission(
        port=number,
        step_index=index,
        site_id=step.site,
        site_label=site.label,
        region=zone,
        area_covered_cm2=covered_cm2,
        technique=step.technique,
        wavelength_nm=step.wavelength_nm,
        mode=codec.EmitMode.PULSED if step.mode is Mode.PULSED else codec.EmitMode.CONTINUOUS,
        power_uw=power_uw,
        pulse_hz=pulse_hz,
        duty_permille=duty_permille,
        pulse_width_ns=dose.pulse_width_ns,
        peak_power_mw=peak_mw,
        area_mm2=info.area_mm2,
        irradiance_mw_cm2=irradiance,
        target=dose.target,
        target_value=dose.target_value,
        target_energy_uj=target_energy_uj,
        expected_duration_ms=expected_ms,
        expected_energy_uj=target_energy_uj,
        expected_fluence_j_cm2=target_energy_uj / 1e6 / area_cm2,
        energy_budget_uj=math.ceil(target_energy_uj * (1 + ENERGY_BUDGET_MARGIN)),
        max_duration_ms=max_duration_ms,
        backup_time_s=step.max_time_s,
        gating=step.gating,
    )


def _on_protocol(issue: Issue, protocol: Protocol) -> Issue:
    """Name the protocol where a file name would be."""
    return replace(issue, file=f"{protocol.id} v{protocol.version}")
