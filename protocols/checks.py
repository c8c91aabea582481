"""Cross-field checks of a protocol: dose arithmetic, ceilings, combinations.

The pydantic models check each value on its own. Here every step is resolved
into the full set of quantities (power, irradiance, time, energy, fluence)
from what the file states and an emitting area, and checked against the
ceilings of :mod:`pbmd.protocols.limits`. The same resolution runs twice:
when a file is validated (with the area the file declares) and when it is
planned (with the area the controller reports), so a plan can never hold a
step that validation would have refused.

The functions take a :class:`ProtocolView`, which the loader can also build
from a file whose structure is partly invalid, so that one report lists as
many of a file's problems as can be found.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from pbmd.protocols import anatomy
from pbmd.protocols.body_map import body_map
from pbmd.protocols.errors import Issue, Path, Severity, show_value
from pbmd.protocols.evidence import REFERENCES
from pbmd.protocols.limits import (
    CONSISTENCY_TOLERANCE,
    EPILEPSY_MAX_PULSE_HZ,
    MAX_DURATION_MARGIN,
    PULSED_ONLY_MAX_NM,
    PULSED_ONLY_MIN_NM,
    RED_MAX_NM,
    Limits,
    single_pulse_mpe_j_cm2,
)
from pbmd.protocols.model import (
    Applicator,
    ApplicatorKind,
    Contraindication,
    Evidence,
    Mode,
    Phase,
    Protocol,
    Region,
    Site,
    Step,
    Target,
    Technique,
    Total,
)

PREGNANCY_REGIONS = frozenset({Region.LUMBAR, Region.SACRAL, Region.PELVIS, Region.ABDOMEN})
THYROID_REGIONS = frozenset({Region.NECK, Region.CERVICAL})
_PULSE_FIELDS = ("pulse_hz", "duty_permille", "pulse_width_ns", "peak_power_mw")
_SETPOINTS = frozenset({"power_mw", "irradiance_mw_cm2"})
_TARGETS = frozenset({"fluence_j_cm2", "energy_j", "time_s", "target"})


def _g(value: float) -> str:
    """Numbers as a technician reads them: 4 significant digits, no exponent, no float noise."""
    if abs(value) >= 1e4:
        return f"{value:.0f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


@dataclass(frozen=True, slots=True)
class StepDose:
    """One step resolved: every Jenkins & Carroll quantity the step implies."""

    port: int
    index: int
    path: Path
    site: str
    wavelength_nm: int
    mode: Mode
    technique: Technique
    area_cm2: float
    power_mw: float
    irradiance_mw_cm2: float
    pulse_hz: int | None
    duty: float | None
    pulse_width_ns: float | None
    peak_power_mw: float | None
    target: Target
    target_value: float
    time_s: float
    energy_j: float
    fluence_j_cm2: float
    max_time_s: float
    phase: int = 0
    """Index of the phase the step runs in (v1: always 0, one phase)."""


@dataclass
class PortView:
    key: str
    number: int
    applicator: Applicator | None
    steps: list[tuple[int, Step]] = field(default_factory=list)
    # fields of a step that failed validation and were left out: checks that
    # depend on them are skipped rather than reporting a consequence as a cause
    dropped: dict[int, frozenset[str]] = field(default_factory=dict)


@dataclass
class ProtocolView:
    """What of a protocol validated: enough to run every check that can run."""

    sites: dict[str, Site] = field(default_factory=dict)
    sites_complete: bool = True
    contraindications: frozenset[Contraindication] | None = frozenset()
    evidence: list[tuple[int, Evidence]] = field(default_factory=list)
    ports: list[PortView] = field(default_factory=list)
    schema_version: int | None = None
    body_map: str | None = None
    phases: list[tuple[int, Phase]] = field(default_factory=list)
    phases_complete: bool = True
    totals: list[tuple[int, Total]] = field(default_factory=list)

    @classmethod
    def of(cls, protocol: Protocol) -> ProtocolView:
        return cls(
            schema_version=protocol.schema_version,
            body_map=protocol.body_map,
            phases=list(enumerate(protocol.phases)),
            totals=list(enumerate(protocol.totals)),
            sites=dict(protocol.sites),
            contraindications=frozenset(protocol.contraindications),
            evidence=list(enumerate(protocol.evidence)),
            ports=[
                PortView(str(number), number, port.applicator, list(enumerate(port.steps)))
                for number, port in sorted(protocol.ports.items())
            ],
        )


def zone_of(site: Site) -> Region | None:
    """The coarse body region of a site: stated (v1) or the body map's (v2)."""
    if site.region is not None:
        return site.region
    region = body_map().regions.get(site.body_region or "")
    return None if region is None else region.zone


def area_covered_of(site: Site) -> float | None:
    """The skin area a site covers: stated, or (v2) its body region's."""
    if site.area_covered_cm2 is not None:
        return site.area_covered_cm2
    region = body_map().regions.get(site.body_region or "")
    return None if region is None else region.area_cm2


def step_path(port_key: str, index: int, *rest: str) -> Path:
    return ("ports", port_key, "steps", index, *rest)


def _setpoint_field(step: Step) -> str:
    return "irradiance_mw_cm2" if step.irradiance_mw_cm2 is not None else "power_mw"


def _stated_targets(step: Step) -> list[Target]:
    return [t for t in Target if getattr(step, t.value) is not None]


def _relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b))


def duty_of(step: Step) -> float | None:
    """Duty cycle as a fraction: pulse width × rate if the width is stated, else duty ‰."""
    if step.pulse_width_ns is not None and step.pulse_hz is not None:
        return step.pulse_width_ns * 1e-9 * step.pulse_hz
    if step.duty_permille is not None:
        return step.duty_permille / 1000.0
    return None


def choose_target(step: Step) -> Target | None:
    """The dose quantity that ends the step, or None if the file leaves it open."""
    stated = _stated_targets(step)
    if step.target is not None:
        return step.target if step.target in stated else None
    return stated[0] if len(stated) == 1 else None


def resolve_step(
    port: int, port_key: str, index: int, step: Step, area_cm2: float
) -> StepDose | None:
    """Every quantity of a step on an emitting area; None if the step is not determined."""
    target = choose_target(step)
    if target is None or not area_cm2 > 0:
        return None
    if step.power_mw is not None:
        power_mw = step.power_mw
    elif step.irradiance_mw_cm2 is not None:
        power_mw = step.irradiance_mw_cm2 * area_cm2
    else:
        return None
    irradiance = power_mw / area_cm2
    target_value = float(getattr(step, target.value))
    if target is Target.TIME:
        time_s = target_value
    elif target is Target.FLUENCE:
        time_s = target_value / (irradiance / 1000.0)
    else:
        time_s = target_value / (power_mw / 1000.0)
    energy_j = power_mw / 1000.0 * time_s
    pulsed = step.mode is Mode.PULSED
    return StepDose(
        port=port,
        index=index,
        path=step_path(port_key, index),
        site=step.site,
        wavelength_nm=step.wavelength_nm,
        mode=step.mode,
        technique=step.technique,
        area_cm2=area_cm2,
        power_mw=power_mw,
        irradiance_mw_cm2=irradiance,
        pulse_hz=step.pulse_hz if pulsed else None,
        duty=duty_of(step) if pulsed else None,
        pulse_width_ns=step.pulse_width_ns if pulsed else None,
        peak_power_mw=step.peak_power_mw if pulsed else None,
        target=target,
        target_value=target_value,
        time_s=time_s,
        energy_j=energy_j,
        fluence_j_cm2=energy_j / area_cm2,
        max_time_s=step.max_time_s,
    )


# --------------------------------------------------------------------------
# Checks of one step that do not need arithmetic


def check_step_structure(
    view: ProtocolView, port: PortView, index: int, step: Step
) -> Iterable[Issue]:
    """A step's fields on their own and against its site, applicator and siblings."""
    path = step_path(port.key, index)
    applicator = port.applicator
    yield from _check_site_and_channel(view, port, path, step)
    if step.mode is Mode.CONTINUOUS:
        yield from _check_continuous(path, step)
    elif not (port.dropped.get(index, frozenset()) & set(_PULSE_FIELDS)):
        yield from _check_pulsed(path, step)
        yield from _check_epilepsy(view, path, step)
    dropped = port.dropped.get(index, frozenset())
    if step.power_mw is None and step.irradiance_mw_cm2 is None and not (dropped & _SETPOINTS):
        yield Issue(
            "setpoint-missing",
            "the step has no power or irradiance setpoint",
            path=(*path, "power_mw"),
            allowed="power_mw or irradiance_mw_cm2 (or both, agreeing to 1 %)",
            fix="add power_mw or irradiance_mw_cm2",
        )

    stated = _stated_targets(step)
    if not (dropped & _TARGETS):
        yield from _check_targets(path, step, stated, applicator)

    yield from _check_applicator_rules(path, step, applicator, dropped)


def _check_site_and_channel(
    view: ProtocolView, port: PortView, path: Path, step: Step
) -> Iterable[Issue]:
    """The step's site is defined and its wavelength is a channel of the port's applicator."""
    applicator = port.applicator
    if step.site not in view.sites and view.sites_complete:
        known = ", ".join(sorted(view.sites)) or "none"
        yield Issue(
            "unknown-site",
            f"site {step.site!r} is not defined in [sites]",
            path=(*path, "site"),
            value=show_value(step.site),
            allowed=f"a key of [sites]: {known}",
            fix=f"add a [sites.{step.site}] table or use one of the defined sites",
        )

    if applicator is not None and step.wavelength_nm not in applicator.channels_nm:
        channels = ", ".join(f"{c} nm" for c in applicator.channels_nm)
        yield Issue(
            "wavelength-channel",
            f"{step.wavelength_nm} nm is not a channel of the applicator this port needs",
            path=(*path, "wavelength_nm"),
            value=str(step.wavelength_nm),
            allowed=channels,
            fix=f"use one of {channels}, or add {step.wavelength_nm} to "
            f"ports.{port.key}.applicator.channels_nm",
        )


def _check_continuous(path: Path, step: Step) -> Iterable[Issue]:
    """A continuous step: a wavelength that can emit continuously, and no pulse parameters."""
    if PULSED_ONLY_MIN_NM <= step.wavelength_nm <= PULSED_ONLY_MAX_NM:
        yield Issue(
            "pulsed-only",
            f"{step.wavelength_nm} nm superpulsed GaAs sources emit only pulses",
            path=(*path, "mode"),
            value='"continuous"',
            allowed=f'"pulsed" at {PULSED_ONLY_MIN_NM}–{PULSED_ONLY_MAX_NM} nm',
            fix='set mode = "pulsed" with pulse_hz and duty_permille or pulse_width_ns',
        )
    for name in _PULSE_FIELDS:
        value = getattr(step, name)
        if value is not None:
            yield Issue(
                "pulse-params-continuous",
                f"{name} is a pulse parameter but the step is continuous",
                path=(*path, name),
                value=show_value(value),
                allowed='pulse parameters only with mode = "pulsed"',
                fix=f'remove {name}, or set mode = "pulsed"',
            )


def _check_pulsed(path: Path, step: Step) -> Iterable[Issue]:
    """A pulsed step: rate and duty (or width) present, agreeing, and sayable in whole ‰."""
    if step.pulse_hz is None:
        yield Issue(
            "pulse-params-missing",
            "a pulsed step needs its repetition rate",
            path=(*path, "pulse_hz"),
            allowed="1–10000 Hz",
            fix="add pulse_hz",
        )
    if step.duty_permille is None and step.pulse_width_ns is None:
        yield Issue(
            "pulse-params-missing",
            "a pulsed step needs its duty cycle or its pulse width",
            path=(*path, "duty_permille"),
            allowed="duty_permille 1–999, or pulse_width_ns",
            fix="add duty_permille or pulse_width_ns",
        )
    if (
        step.duty_permille is not None
        and step.pulse_width_ns is not None
        and step.pulse_hz is not None
    ):
        implied = step.pulse_width_ns * 1e-9 * step.pulse_hz * 1000.0
        if abs(implied - step.duty_permille) > 0.5:
            yield Issue(
                "duty-consistency",
                f"duty_permille disagrees with pulse_width_ns × pulse_hz = {_g(implied)} ‰",
                path=(*path, "duty_permille"),
                value=str(step.duty_permille),
                allowed=f"{round(implied)} (pulse width × rate, rounded)",
                fix="state only one of duty_permille and pulse_width_ns, or make them agree",
            )
    duty = duty_of(step)
    if duty is not None and step.pulse_width_ns is not None and not 0.0005 <= duty < 0.9995:
        yield Issue(
            "duty-range",
            f"pulse_width_ns × pulse_hz gives a duty cycle of {_g(duty * 1000)} ‰, "
            "which the controller cannot be told (EMIT_START carries whole ‰)",
            path=(*path, "pulse_width_ns"),
            value=show_value(step.pulse_width_ns),
            allowed="a duty cycle of 1–999 ‰",
            fix="raise pulse_hz or the pulse width so that the duty is at least 1 ‰",
        )


def _check_epilepsy(view: ProtocolView, path: Path, step: Step) -> Iterable[Issue]:
    """Pulsed red light at low rates: refused unless epilepsy is screened for."""
    if (
        step.wavelength_nm < RED_MAX_NM
        and step.pulse_hz is not None
        and step.pulse_hz <= EPILEPSY_MAX_PULSE_HZ
    ):
        listed = (
            view.contraindications is None or Contraindication.EPILEPSY in view.contraindications
        )
        yield Issue(
            "epilepsy",
            f"red light ({step.wavelength_nm} nm) pulsed at {_g(step.pulse_hz)} Hz: "
            "pulsed red light at 5–10 Hz can trigger seizures",
            path=(*path, "pulse_hz"),
            value=_g(step.pulse_hz),
            allowed=f"above {_g(EPILEPSY_MAX_PULSE_HZ)} Hz, or continuous, or "
            '"epilepsy" listed in contraindications',
            fix='add "epilepsy" to contraindications (the clinician screens for it), '
            "or use continuous mode or a rate above 30 Hz",
            severity=Severity.WARNING if listed else Severity.ERROR,
        )


def _check_applicator_rules(
    path: Path, step: Step, applicator: Applicator | None, dropped: frozenset[str]
) -> Iterable[Issue]:
    """What the applicator kind demands: probes in contact and gated, pads without contact."""
    if applicator is not None and applicator.kind is ApplicatorKind.PROBE:
        if step.technique is not Technique.CONTACT:
            yield Issue(
                "probe-technique",
                "a probe emits only in skin contact (ICD §1)",
                path=(*path, "technique"),
                value=show_value(step.technique.value),
                allowed='"contact"',
                fix='set technique = "contact"',
            )
        missing = [
            name for name in ("confirm_placement", "skin_contact") if not getattr(step.gating, name)
        ]
        if missing and "gating" not in dropped:
            yield Issue(
                "probe-gating",
                "a probe step must wait for the operator to confirm the point and for skin contact",
                path=(*path, "gating", missing[0]),
                value="false",
                allowed="true",
                fix="set gating = { confirm_placement = true, skin_contact = true }",
            )
    if (
        applicator is not None
        and applicator.kind is ApplicatorKind.PAD
        and step.gating.skin_contact
    ):
        yield Issue(
            "pad-contact-gating",
            "pads have no skin-contact sensor; this step could never start",
            path=(*path, "gating", "skin_contact"),
            value="true",
            allowed="false for a pad",
            fix="remove skin_contact (use confirm_placement for pads)",
        )


def _check_targets(
    path: Path, step: Step, stated: list[Target], applicator: Applicator | None
) -> Iterable[Issue]:
    """The dose target: present, unambiguous, and in the unit the applicator is dosed in."""
    if not stated:
        yield Issue(
            "dose-missing",
            "the step has no dose target",
            path=(*path, "fluence_j_cm2"),
            allowed="fluence_j_cm2 (pads), energy_j (probes) or time_s",
            fix="add the quantity whose prescribed value ends the step",
        )
    elif step.target is not None and step.target not in stated:
        yield Issue(
            "target-not-stated",
            f"target names {step.target.value}, which the step does not state",
            path=(*path, "target"),
            value=show_value(step.target.value),
            allowed=", ".join(t.value for t in stated),
            fix=f"add {step.target.value} or name one of the stated quantities",
        )
    elif step.target is None and len(stated) > 1:
        yield Issue(
            "target-ambiguous",
            "several dose quantities are stated and none is named as the target",
            path=(*path, "target"),
            allowed=", ".join(f'"{t.value}"' for t in stated),
            fix="add target = one of them: the host ends the step when it reaches that value",
        )

    target = choose_target(step)
    wrong = _WRONG_TARGET.get(applicator.kind) if applicator is not None else None
    if wrong is not None and target is not None and target is wrong[0]:
        yield replace(
            wrong[1],
            path=(*path, "target" if step.target else target.value),
            value=show_value(target.value),
        )


# The dose quantity each applicator kind is not dosed in, and what to say instead.
_WRONG_TARGET: dict[ApplicatorKind, tuple[Target, Issue]] = {
    ApplicatorKind.PAD: (
        Target.ENERGY,
        Issue(
            "target-kind",
            "pads are dosed in J/cm² over their area, not in J",
            allowed="fluence_j_cm2 or time_s for a pad",
            fix="state fluence_j_cm2 (energy / pad area) instead of energy_j",
        ),
    ),
    ApplicatorKind.PROBE: (
        Target.FLUENCE,
        Issue(
            "target-kind",
            "probes are dosed in J per point, not in J/cm²",
            allowed="energy_j or time_s for a probe",
            fix="state energy_j (fluence × beam area) instead of fluence_j_cm2",
        ),
    ),
}


def check_consistency(port: PortView, index: int, step: Step, dose: StepDose) -> Iterable[Issue]:
    """Quantities stated more than once must agree to 1 %."""
    path = step_path(port.key, index)
    tol = CONSISTENCY_TOLERANCE
    pct = f"{tol * 100:g} %"
    for claim in _restated(step, dose):
        if _relative_gap(claim.stated, claim.implied) > tol:
            yield Issue(
                claim.rule,
                claim.message,
                path=(*path, claim.field),
                value=claim.value,
                allowed=f"{claim.allowed} ± {pct}",
                fix=claim.fix,
            )


@dataclass(frozen=True)
class _Restated:
    """A quantity the step states and the dose also implies: they must agree."""

    rule: str
    field: str
    stated: float
    implied: float
    message: str
    value: str
    allowed: str
    fix: str


def _restated(step: Step, dose: StepDose) -> Iterable[_Restated]:
    """Every quantity of the step that is stated besides the one the dose is computed from."""
    area = dose.area_cm2
    if step.power_mw is not None and step.irradiance_mw_cm2 is not None:
        implied = step.irradiance_mw_cm2 * area
        yield _Restated(
            "power-irradiance",
            "power_mw",
            step.power_mw,
            implied,
            f"power_mw disagrees with irradiance_mw_cm2 × beam area "
            f"({_g(step.irradiance_mw_cm2)} × {_g(area)} cm² = {_g(implied)} mW)",
            _g(step.power_mw),
            f"{_g(implied)} mW",
            "state only one of power_mw and irradiance_mw_cm2, or make them agree",
        )
    for target in Target:
        stated = getattr(step, target.value)
        if stated is None or target is dose.target:
            continue
        implied = {
            Target.TIME: dose.time_s,
            Target.FLUENCE: dose.fluence_j_cm2,
            Target.ENERGY: dose.energy_j,
        }[target]
        yield _Restated(
            "dose-consistency",
            target.value,
            float(stated),
            implied,
            f"{target.value} disagrees with the dose implied by the target "
            f"{dose.target.value} = {_g(dose.target_value)} at {_g(dose.power_mw)} mW "
            f"on {_g(area)} cm² ({_g(implied)})",
            _g(float(stated)),
            _g(implied),
            f"set {target.value} = {_g(implied)} or remove it",
        )
    if step.mode is Mode.PULSED and step.peak_power_mw is not None and dose.duty is not None:
        implied = step.peak_power_mw * dose.duty
        yield _Restated(
            "peak-consistency",
            "peak_power_mw",
            dose.power_mw,
            implied,
            f"average power {_g(dose.power_mw)} mW disagrees with peak power × duty "
            f"({_g(step.peak_power_mw)} mW × {_g(dose.duty * 1000)} ‰ = {_g(implied)} mW)",
            _g(step.peak_power_mw),
            f"{_g(dose.power_mw / dose.duty)} mW",
            "correct peak_power_mw, or the average setpoint, or the duty cycle",
        )


def check_dose(step: Step | None, dose: StepDose, limits: Limits) -> Iterable[Issue]:
    """Ceilings of one resolved step (irradiance, pulse exposure, time)."""
    setpoint = _setpoint_field(step) if step is not None else "power_mw"
    target_field = dose.target.value
    path = dose.path
    ceiling, origin = limits.irradiance_ceiling_at(dose.wavelength_nm)
    if dose.irradiance_mw_cm2 > ceiling:
        yield Issue(
            "irradiance-ceiling",
            f"irradiance {_g(dose.irradiance_mw_cm2)} mW/cm² at {dose.wavelength_nm} nm "
            f"is above the {origin}",
            path=(*path, setpoint),
            value=_g(dose.irradiance_mw_cm2) + " mW/cm²",
            allowed=f"≤ {_g(ceiling)} mW/cm² at {dose.wavelength_nm} nm",
            fix=f"lower the setpoint to at most {_g(ceiling)} mW/cm² "
            f"({_g(ceiling * dose.area_cm2)} mW on {_g(dose.area_cm2)} cm²)",
        )
    elif dose.irradiance_mw_cm2 > limits.irradiance_warning_mw_cm2:
        yield Issue(
            "irradiance-warning",
            f"irradiance {_g(dose.irradiance_mw_cm2)} mW/cm² is above "
            f"{_g(limits.irradiance_warning_mw_cm2)} mW/cm²: watch for skin heating",
            path=(*path, setpoint),
            value=_g(dose.irradiance_mw_cm2) + " mW/cm²",
            allowed=f"≤ {_g(limits.irradiance_warning_mw_cm2)} mW/cm² without a warning",
            fix="accept the warning, or lower the setpoint",
            severity=Severity.WARNING,
        )
    if dose.mode is Mode.PULSED and dose.pulse_hz and dose.duty:
        width_s = (
            dose.pulse_width_ns * 1e-9
            if dose.pulse_width_ns is not None
            else dose.duty / dose.pulse_hz
        )
        per_pulse = dose.power_mw / 1000.0 / dose.pulse_hz / dose.area_cm2
        pulse_mpe = single_pulse_mpe_j_cm2(dose.wavelength_nm, width_s)
        if per_pulse > pulse_mpe:
            yield Issue(
                "pulse-mpe",
                f"one pulse delivers {_g(per_pulse * 1000)} mJ/cm², above the single-pulse "
                f"skin MPE at {dose.wavelength_nm} nm and {_g(width_s * 1e9)} ns",
                path=(*path, "pulse_hz"),
                value=_g(dose.pulse_hz),
                allowed=f"≤ {_g(pulse_mpe * 1000)} mJ/cm² per pulse",
                fix="raise pulse_hz or lower the average power",
            )
    if not limits.step_time_min_s <= dose.time_s <= limits.step_time_max_s:
        yield Issue(
            "step-time",
            f"the step takes {_g(dose.time_s)} s at {_g(dose.power_mw)} mW",
            path=(*path, target_field),
            value=_g(dose.target_value),
            allowed=f"{_g(limits.step_time_min_s)}–{_g(limits.step_time_max_s)} s per step",
            fix="change the dose or the setpoint, or split the step",
        )
    needed = dose.time_s * (1.0 + MAX_DURATION_MARGIN)
    if dose.max_time_s < needed * (1 - 1e-9):
        yield Issue(
            "max-time",
            f"max_time_s leaves no room for the controller's backup timer: the step takes "
            f"{_g(dose.time_s)} s and the controller stops it at +{MAX_DURATION_MARGIN:.0%}",
            path=(*path, "max_time_s"),
            value=_g(dose.max_time_s),
            allowed=f"≥ {math.ceil(needed)} s (planned time + {MAX_DURATION_MARGIN:.0%}), "
            f"≤ {_g(limits.step_time_max_s)} s",
            fix=f"set max_time_s = {math.ceil(needed)}, or lower the dose",
        )


def check_totals(doses: list[StepDose], limits: Limits) -> Iterable[Issue]:
    """Fluence per site per wavelength per session; the session's total time."""
    by_site: dict[tuple[str, int], list[StepDose]] = defaultdict(list)
    for dose in doses:
        by_site[(dose.site, dose.wavelength_nm)].append(dose)
    ceiling = limits.fluence_ceiling_j_cm2
    for (site, wavelength_nm), steps in by_site.items():
        total = sum(d.fluence_j_cm2 for d in steps)
        if total > ceiling * (1 + 1e-9):
            parts = " + ".join(
                f"ports.{d.port}.steps[{d.index}] {_g(d.fluence_j_cm2)}" for d in steps
            )
            last = steps[-1]
            yield Issue(
                "fluence-ceiling",
                f"site {site!r} receives {_g(total)} J/cm² at {wavelength_nm} nm in one "
                f"session ({parts})",
                path=(*last.path, last.target.value),
                value=_g(total) + " J/cm²",
                allowed=f"≤ {_g(ceiling)} J/cm² per site per wavelength per session",
                fix=f"lower the dose of these steps so that they sum to at most {_g(ceiling)} "
                "J/cm²",
            )
    per_phase_port: dict[tuple[int, int], float] = defaultdict(float)
    for dose in doses:
        per_phase_port[(dose.phase, dose.port)] += dose.time_s
    if per_phase_port:
        longest_in: dict[int, tuple[float, int]] = {}
        for (phase, port), time_s in per_phase_port.items():
            longest_in[phase] = max(longest_in.get(phase, (0.0, port)), (time_s, port))
        critical_s = sum(time_s for time_s, _ in longest_in.values())
        if critical_s > limits.session_time_max_s:
            port = max(longest_in.values())[1]
            ports_text = (
                f"port {port} emits for {_g(critical_s / 60)} min in all; ports run at once"
                if len(longest_in) == 1
                else f"the phases, one after the other, take {_g(critical_s / 60)} min"
            )
            yield Issue(
                "session-time",
                f"{ports_text}, so the session lasts at least that long",
                path=("ports", str(port)),
                value=f"{_g(critical_s / 60)} min",
                allowed=f"≤ {_g(limits.session_time_max_s / 60)} min per session",
                fix="shorten or remove steps of this port, or split the program into two protocols",
            )


def check_header(view: ProtocolView) -> Iterable[Issue]:
    for index, evidence in view.evidence:
        if evidence.ref not in REFERENCES:
            yield Issue(
                "unknown-reference",
                f"{evidence.ref!r} is not a verified reference",
                path=("evidence", index, "ref"),
                value=show_value(evidence.ref),
                allowed=", ".join(sorted(REFERENCES)),
                fix="cite one of the verified references (a new source is added to "
                "pbmd.protocols.evidence after review)",
            )
    listed = view.contraindications
    if listed is None:
        return
    regions = {zone_of(site) for site in view.sites.values()}
    required: list[tuple[Contraindication, str]] = [(Contraindication.CANCER, "every protocol")]
    if regions & PREGNANCY_REGIONS:
        required.append((Contraindication.PREGNANCY, "abdomen, low back or pelvis sites"))
    if regions & THYROID_REGIONS:
        required.append((Contraindication.HYPERTHYROIDISM, "neck sites"))
    for code, why in required:
        if code not in listed:
            yield Issue(
                "contraindication-missing",
                f"{code.value!r} ({code.description}) must be listed for {why}",
                path=("contraindications",),
                value=None,
                allowed=f'a list that includes "{code.value}"',
                fix=f'add "{code.value}" to contraindications',
            )


def check_view(view: ProtocolView, limits: Limits) -> tuple[list[Issue], list[StepDose]]:
    """Every cross-field check that the validated parts of a protocol allow."""
    issues: list[Issue] = list(check_header(view))
    issues += anatomy.check_format(view)
    phase_of = anatomy.phase_indices(view)
    doses: list[StepDose] = []
    for port in view.ports:
        for index, step in port.steps:
            structural = list(check_step_structure(view, port, index, step))
            issues += structural
            failed = port.dropped.get(index, frozenset()) & Step.model_fields.keys()
            if port.applicator is None or failed:
                continue  # a value the arithmetic needs failed validation: reported already
            dose = resolve_step(port.number, port.key, index, step, port.applicator.beam_area_cm2)
            if dose is None:
                continue
            dose = replace(dose, phase=phase_of.get(step.phase or "", 0))
            issues += check_consistency(port, index, step, dose)
            issues += check_dose(step, dose, limits)
            doses.append(dose)
    if view.schema_version == 2:
        issues += anatomy.check_skin(view, doses, limits)
        issues += anatomy.check_stated_totals(view, doses)
    else:
        issues += check_totals(doses, limits)
        return issues, doses
    issues += [i for i in check_totals(doses, limits) if i.rule != "fluence-ceiling"]
    return issues, doses
