"""Ceilings that every protocol and every plan is checked against.

Two layers: hard ceilings, constants in this file that no configuration can
raise, and :class:`Limits`, the site's configured values (the daemon's
configuration supplies them), which may only be equal or stricter. Where a
figure comes from is said next to it (shared DOSIMETRY.md, DESIGN.md).
"""

from __future__ import annotations

import math
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

# Skin maximum permissible exposure, ICNIRP / IEC 60825-1 as tabled in
# Directive 2006/25/EC, 400–1400 nm, exposures of 10 s to 30 000 s:
# E = 0.2 · C_A W/cm² = 200 · C_A mW/cm² (average power for pulsed sources).
MPE_WAVELENGTH_MIN_NM = 400
MPE_WAVELENGTH_MAX_NM = 1400

# The therapeutic window a protocol may use (red to near infrared).
WAVELENGTH_MIN_NM = 600
WAVELENGTH_MAX_NM = 1100

# Superpulsed GaAs diodes (around 905 nm) only emit short pulses.
PULSED_ONLY_MIN_NM = 890
PULSED_ONLY_MAX_NM = 915

# Red light below this wavelength, pulsed at or below EPILEPSY_MAX_PULSE_HZ,
# carries the epilepsy caution (pulsed red light at 5–10 Hz can trigger
# seizures; ~30 Hz is the conservative upper bound pbmd uses).
RED_MAX_NM = 700
EPILEPSY_MAX_PULSE_HZ = 30.0

# Hard ceilings (design assumptions, DESIGN.md "Limits"): configuration may
# only lower them.
HARD_FLUENCE_CEILING_J_CM2 = 20.0  # twice the default; the response is biphasic
HARD_STEP_TIME_MIN_S = 1.0
HARD_STEP_TIME_MAX_S = 1800.0
HARD_SESSION_TIME_MAX_S = 90 * 60.0

DEFAULT_FLUENCE_CEILING_J_CM2 = 10.0
DEFAULT_IRRADIANCE_WARNING_MW_CM2 = 100.0

# Margins of the controller's independent channels over the plan (ICD §6:
# "a little above the prescription / the planned time").
ENERGY_BUDGET_MARGIN = 0.05
MAX_DURATION_MARGIN = 0.20

# Values a protocol states more than once must agree this closely.
CONSISTENCY_TOLERANCE = 0.01

# A reported emitting area may differ this much from the one a protocol was
# written for before the plan refuses the applicator as a different one.
AREA_TOLERANCE = 0.05


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


DEFAULT_LIMITS = Limits()
