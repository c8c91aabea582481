"""Every limit and margin pbmd checks against, in one registry.

Each :class:`Quantity` has a name, a unit, a default, the hard bounds no
configuration may leave, and where the figure comes from (shared
DOSIMETRY.md, DESIGN.md, the ICD, or "assumed" where pbmd chose it). Protocol
validation, planning, the safety rules and the messages a clinician reads all
take their figures from :data:`LIMITS`; nothing else writes them down.

Two layers on top: :class:`Limits`, the site's configured protocol ceilings
(the daemon's configuration supplies them), which may only be equal or
stricter than the hard bounds here; and the safety core's ``SafetyLimits``
(pbmd.daemon.core.safety), whose defaults and bounds are these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator


@dataclass(frozen=True)
class Quantity:
    """One limit or margin: what it is, in what unit, and why this figure."""

    name: str
    unit: str
    default: float
    minimum: float
    maximum: float
    source: str
    meaning: str

    def check(self, value: float) -> float:
        """`value` if within the hard bounds; ValueError saying which bound otherwise."""
        if not self.minimum <= value <= self.maximum:
            raise ValueError(
                f"{self.name} = {value:g} {self.unit} is outside its hard bounds "
                f"{self.minimum:g}–{self.maximum:g} {self.unit} ({self.source})"
            )
        return value

    @property
    def percent(self) -> str:
        """A fraction's default as people write it (0.2 → "20"), for messages."""
        return f"{self.default * 100:g}"


_QUANTITIES = (
    # ---------------------------------------------------------- the spectrum
    Quantity("mpe_wavelength_min_nm", "nm", 400, 400, 400, "ICNIRP / IEC 60825-1 "
             "(Directive 2006/25/EC)", "Shortest wavelength the skin MPE is tabled for."),
    Quantity("mpe_wavelength_max_nm", "nm", 1400, 1400, 1400, "ICNIRP / IEC 60825-1 "
             "(Directive 2006/25/EC)", "Longest wavelength the skin MPE is tabled for."),
    Quantity("wavelength_min_nm", "nm", 600, 600, 600, "DOSIMETRY.md",
             "Shortest wavelength a protocol may use (the therapeutic window, red)."),
    Quantity("wavelength_max_nm", "nm", 1100, 1100, 1100, "DOSIMETRY.md",
             "Longest wavelength a protocol may use (the therapeutic window, near infrared)."),
    Quantity("pulsed_only_min_nm", "nm", 890, 890, 890, "DOSIMETRY.md",
             "Superpulsed GaAs diodes (around 905 nm) only emit short pulses: from here…"),
    Quantity("pulsed_only_max_nm", "nm", 915, 915, 915, "DOSIMETRY.md", "…to here."),
    Quantity("red_max_nm", "nm", 700, 700, 700, "DOSIMETRY.md",
             "Red light below this, pulsed slowly, carries the epilepsy caution."),
    Quantity("epilepsy_max_pulse_hz", "Hz", 30.0, 30.0, 30.0, "assumed",
             "Pulsed red light at 5–10 Hz can trigger seizures; ~30 Hz is the "
             "conservative upper bound of the caution."),
    # -------------------------------------------- protocol and site ceilings
    Quantity("fluence_ceiling_j_cm2", "J/cm²", 10.0, 0.0, 20.0, "DESIGN.md \"Limits\"; "
             "DOSIMETRY.md (assumed: no source fixes it)",
             "Fluence per patch of skin (v1: per site) per wavelength per session; the hard "
             "bound is twice the default (the dose–response is biphasic)."),
    Quantity("total_fluence_ceiling_j_cm2", "J/cm²", 20.0, 0.0, 40.0, "DOSIMETRY.md "
             "(assumed: no source fixes it)",
             "Fluence per patch of skin over all wavelengths per session (v2 files); the "
             "hard bound is twice the default."),
    Quantity("mpe_fraction_sum_max", "fraction", 1.0, 1.0, 1.0, "IEC 60825-1 (DOSIMETRY.md: "
             "exposures of the same effect add)",
             "Sum over wavelengths of irradiance / skin MPE on one patch at one time."),
    Quantity("skin_type_derating", "fraction", 1.0, 0.1, 1.0, "assumed: no source gives a "
             "factor (Joensen et al. 2011 shows dark skin heats more, not by how much)",
             "Factor on the irradiance ceiling for one Fitzpatrick skin type; 1 = none."),
    Quantity("irradiance_warning_mw_cm2", "mW/cm²", 100.0, 0.0, math.inf,
             "DESIGN.md \"Limits\"", "Irradiance above this is accepted with a warning."),
    Quantity("step_time_s", "s", 1800.0, 1.0, 1800.0, "DESIGN.md \"Limits\"",
             "Time of one step."),
    Quantity("session_time_max_s", "s", 90 * 60.0, 0.0, 90 * 60.0, "assumed",
             "Time of one session."),
    Quantity("consistency_tolerance", "fraction", 0.01, 0.0, 0.01, "assumed",
             "Values a protocol states more than once must agree this closely."),
    Quantity("area_tolerance", "fraction", 0.05, 0.0, 0.05, "assumed",
             "A reported emitting area may differ this much from the protocol's before the "
             "plan refuses the applicator as a different one."),
    # ---------------------------------- the controller's independent channels
    Quantity("energy_budget_margin", "fraction", 0.05, 0.0, 0.10, "ICD §6 (\"a little "
             "above the prescription\"); DESIGN.md (\"a few % above\")",
             "Controller energy budget: prescription + this."),
    Quantity("max_duration_margin", "fraction", 0.20, 0.0, 0.50, "ICD §6 (\"a little "
             "above the planned time\")",
             "Controller max duration and the host's backup timer: planned time + this."),
    # ------------------------------------------------- the supervisor's rules
    Quantity("power_deviation_fraction", "fraction", 0.20, 0.0, 0.20,
             "DESIGN.md (±20 %); 21 CFR 1040.11(a): exposure accurate to ±20 %",
             "Measured power may differ from the setpoint by this."),
    Quantity("power_deviation_grace_us", "µs (device)", 100_000, 0, 500_000, "assumed",
             "A deviation must last this long after the rise to trip."),
    Quantity("power_ceiling_tolerance", "fraction", 0.05, 0.0, 0.05, "assumed",
             "Measured power may exceed the applicator's maximum by this (photodiode "
             "accuracy) before it trips."),
    Quantity("dose_disagreement_fraction", "fraction", 0.02, 0.0, 0.05, "assumed",
             "Host vs controller delivered energy."),
    Quantity("dose_disagreement_floor_uj", "µJ", 50_000, 0, 200_000, "assumed",
             "Absolute floor of the disagreement, so that tiny early energies do not trip "
             "on rounding."),
    Quantity("fluence_ceiling_tolerance_fraction", "fraction", 0.01, 0.0, 0.05, "assumed",
             "A sample showing the site's fluence ceiling passed by more than this trips "
             "(the host's stop at the ceiling did not land)."),
    Quantity("stale_telemetry_periods", "sample periods", 5.0, 1.0, 5.0, "ICD §6",
             "Telemetry older than this is a link fault."),
    Quantity("stop_readback_timeout_s", "s", 0.25, 0.0, 1.0, "assumed",
             "After EMIT_STOP or ALL_OFF, telemetry must show the port dark within this."),
    Quantity("dark_power_uw", "µW", 500, 0, 5_000, "assumed",
             "Measured power above this on a port that should be dark is light that should "
             "not be there: far above photodiode offset, far below any dose."),
    Quantity("idle_lit_samples", "samples", 3, 1, 10, "assumed",
             "Between sessions, this many samples in a row showing a port lit switch the "
             "controller off (one sample could be the tail of the last stop)."),
    Quantity("clock_rate_tolerance", "fraction", 0.02, 0.0, 0.05, "assumed",
             "The device clock's rate counts as measured once the mapping's rate agrees "
             "with telemetry's this closely."),
)  # fmt: skip

LIMITS: Mapping[str, Quantity] = MappingProxyType({q.name: q for q in _QUANTITIES})
"""Every limit and margin by name."""


def limit(name: str) -> float:
    """The default of a registered quantity."""
    return LIMITS[name].default


# Names the protocol checks and the plan have always used, from the registry.
MPE_WAVELENGTH_MIN_NM = int(limit("mpe_wavelength_min_nm"))
MPE_WAVELENGTH_MAX_NM = int(limit("mpe_wavelength_max_nm"))
WAVELENGTH_MIN_NM = int(limit("wavelength_min_nm"))
WAVELENGTH_MAX_NM = int(limit("wavelength_max_nm"))
PULSED_ONLY_MIN_NM = int(limit("pulsed_only_min_nm"))
PULSED_ONLY_MAX_NM = int(limit("pulsed_only_max_nm"))
RED_MAX_NM = int(limit("red_max_nm"))
EPILEPSY_MAX_PULSE_HZ = limit("epilepsy_max_pulse_hz")
HARD_FLUENCE_CEILING_J_CM2 = LIMITS["fluence_ceiling_j_cm2"].maximum
HARD_TOTAL_FLUENCE_CEILING_J_CM2 = LIMITS["total_fluence_ceiling_j_cm2"].maximum
DEFAULT_TOTAL_FLUENCE_CEILING_J_CM2 = limit("total_fluence_ceiling_j_cm2")
MPE_FRACTION_SUM_MAX = limit("mpe_fraction_sum_max")
SKIN_TYPES = ("I", "II", "III", "IV", "V", "VI")
"""Fitzpatrick skin types, lightest to darkest."""
HARD_STEP_TIME_MIN_S = LIMITS["step_time_s"].minimum
HARD_STEP_TIME_MAX_S = LIMITS["step_time_s"].maximum
HARD_SESSION_TIME_MAX_S = LIMITS["session_time_max_s"].maximum
DEFAULT_FLUENCE_CEILING_J_CM2 = limit("fluence_ceiling_j_cm2")
DEFAULT_IRRADIANCE_WARNING_MW_CM2 = limit("irradiance_warning_mw_cm2")
ENERGY_BUDGET_MARGIN = limit("energy_budget_margin")
MAX_DURATION_MARGIN = limit("max_duration_margin")
CONSISTENCY_TOLERANCE = limit("consistency_tolerance")
AREA_TOLERANCE = limit("area_tolerance")


def correction_factor_ca(wavelength_nm: float) -> float:
    """C_A of the skin MPE: 1 below 700 nm, 10^(0.002(λ−700)) to 1050 nm, 5 above."""
    if wavelength_nm < 700:
        return 1.0
    if wavelength_nm < 1050:
        return float(10 ** (0.002 * (wavelength_nm - 700)))
    return 5.0


def skin_mpe_mw_cm2(wavelength_nm: float) -> float:
    """Skin MPE for long exposures (10 s–30 000 s), average irradiance in mW/cm²."""
    if not MPE_WAVELENGTH_MIN_NM <= wavelength_nm <= MPE_WAVELENGTH_MAX_NM:
        raise ValueError(f"no skin MPE tabled for {wavelength_nm} nm")
    return 200.0 * correction_factor_ca(wavelength_nm)


def single_pulse_mpe_j_cm2(wavelength_nm: float, pulse_width_s: float) -> float:
    """Skin MPE of one pulse: 0.02·C_A J/cm² up to 100 ns, 1.1·C_A·t^0.25 to 10 s."""
    ca = correction_factor_ca(wavelength_nm)
    if pulse_width_s <= 100e-9:
        return 0.02 * ca
    return 1.1 * ca * math.pow(min(pulse_width_s, 10.0), 0.25)


class Limits(BaseModel):
    """A site's configured ceilings; defaults are pbmd's, never above the hard ones."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    fluence_ceiling_j_cm2: float = Field(
        default=DEFAULT_FLUENCE_CEILING_J_CM2,
        gt=0,
        le=HARD_FLUENCE_CEILING_J_CM2,
        description="Fluence per site per wavelength per session.",
    )
    fluence_ceiling_source: str = Field(
        default=LIMITS["fluence_ceiling_j_cm2"].source,
        min_length=1,
        max_length=200,
        description='Where the site\'s fluence ceiling comes from, or "assumed".',
    )
    total_fluence_ceiling_j_cm2: float = Field(
        default=DEFAULT_TOTAL_FLUENCE_CEILING_J_CM2,
        gt=0,
        le=HARD_TOTAL_FLUENCE_CEILING_J_CM2,
        description="Fluence per patch of skin over all wavelengths per session (v2 files).",
    )
    total_fluence_ceiling_source: str = Field(
        default=LIMITS["total_fluence_ceiling_j_cm2"].source,
        min_length=1,
        max_length=200,
        description='Where the total fluence ceiling comes from, or "assumed".',
    )
    irradiance_derating_by_skin_type: dict[str, float] = Field(
        default_factory=dict,
        description="Factor (0.1–1) on every irradiance ceiling for a Fitzpatrick skin type "
        '(keys "I"…"VI"); none by default: no source gives a factor.',
    )
    irradiance_derating_source: str = Field(
        default=LIMITS["skin_type_derating"].source,
        min_length=1,
        max_length=200,
        description='Where the derating factors come from, or "assumed".',
    )
    irradiance_warning_mw_cm2: float = Field(
        default=DEFAULT_IRRADIANCE_WARNING_MW_CM2,
        gt=0,
        description="Irradiance above this is accepted with a warning.",
    )
    irradiance_ceiling_mw_cm2: float | None = Field(
        default=None,
        gt=0,
        description="Site ceiling for every wavelength (the skin MPE applies as well).",
    )
    irradiance_ceiling_by_wavelength_mw_cm2: dict[Annotated[int, Strict(False)], float] = Field(
        default_factory=dict,
        description="Site ceilings for particular wavelengths, in mW/cm² (keys in nm; "
        'a TOML configuration writes them as "905" = 300.0).',
    )
    step_time_min_s: float = Field(
        default=HARD_STEP_TIME_MIN_S, ge=HARD_STEP_TIME_MIN_S, le=HARD_STEP_TIME_MAX_S
    )
    step_time_max_s: float = Field(
        default=HARD_STEP_TIME_MAX_S, ge=HARD_STEP_TIME_MIN_S, le=HARD_STEP_TIME_MAX_S
    )
    session_time_max_s: float = Field(
        default=HARD_SESSION_TIME_MAX_S, gt=0, le=HARD_SESSION_TIME_MAX_S
    )

    @model_validator(mode="after")
    def _within_hard_ceilings(self) -> Self:
        if self.step_time_min_s > self.step_time_max_s:
            raise ValueError("step_time_min_s is above step_time_max_s")
        derating = LIMITS["skin_type_derating"]
        for skin_type, factor in self.irradiance_derating_by_skin_type.items():
            if skin_type not in SKIN_TYPES:
                raise ValueError(
                    f"irradiance derating given for skin type {skin_type!r}: "
                    f"use one of {', '.join(SKIN_TYPES)}"
                )
            derating.check(factor)
        for wavelength_nm, ceiling in self.irradiance_ceiling_by_wavelength_mw_cm2.items():
            if not WAVELENGTH_MIN_NM <= wavelength_nm <= WAVELENGTH_MAX_NM:
                raise ValueError(
                    f"irradiance ceiling given for {wavelength_nm} nm, outside "
                    f"{WAVELENGTH_MIN_NM}–{WAVELENGTH_MAX_NM} nm"
                )
            if not 0 < ceiling <= skin_mpe_mw_cm2(wavelength_nm):
                raise ValueError(
                    f"irradiance ceiling {ceiling} mW/cm² at {wavelength_nm} nm must be "
                    f"above 0 and at most the skin MPE {skin_mpe_mw_cm2(wavelength_nm):.1f}"
                )
        return self

    def irradiance_ceiling_at(self, wavelength_nm: int) -> tuple[float, str]:
        """The lowest irradiance ceiling that applies at a wavelength, and its origin."""
        ceiling = skin_mpe_mw_cm2(wavelength_nm)
        origin = f"skin MPE at {wavelength_nm} nm (0.2·C_A W/cm²)"
        if self.irradiance_ceiling_mw_cm2 is not None and self.irradiance_ceiling_mw_cm2 < ceiling:
            ceiling = self.irradiance_ceiling_mw_cm2
            origin = "site irradiance ceiling"
        by_wavelength = self.irradiance_ceiling_by_wavelength_mw_cm2.get(wavelength_nm)
        if by_wavelength is not None and by_wavelength < ceiling:
            ceiling = by_wavelength
            origin = f"site irradiance ceiling at {wavelength_nm} nm"
        return ceiling, origin

    def derating(self, skin_type: str | None) -> float:
        """The factor on irradiance ceilings for a patient's skin type (1 = none)."""
        if skin_type is None:
            return 1.0
        return self.irradiance_derating_by_skin_type.get(skin_type, 1.0)


DEFAULT_LIMITS = Limits()
