"""The protocol file format: pydantic models of one TOML treatment protocol.

A protocol is a prescription of light. The models carry every parameter of
the Jenkins & Carroll reporting set (Photomed Laser Surg 29:785, 2011) that a
protocol fixes in advance: wavelength, average power or irradiance, pulse
frequency, pulse width or duty cycle and peak power for pulsed sources, beam
area at the skin, exposure time, radiant energy, radiant exposure, site,
number of points, area covered, technique, and the number of sessions and
their interval. Where a file may state a quantity in more than one way, the
cross-checks live in :mod:`pbmd.protocols.checks`; the models here check
types, ranges and unknown keys only.

Every model is frozen and forbids unknown keys. Units are in field names.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from pbmd.protocols.limits import (
    HARD_STEP_TIME_MAX_S,
    HARD_STEP_TIME_MIN_S,
    WAVELENGTH_MAX_NM,
    WAVELENGTH_MIN_NM,
)

SCHEMA_VERSION = 2
"""The format this code writes about; files of version 1 still load (as one phase)."""
SCHEMA_VERSIONS = (1, 2)
MAX_PORTS = 8
MAX_PHASES = 16


class _Model(BaseModel):
    # strict: a TOML string never silently becomes a number; inf/nan refused
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class ApplicatorKind(enum.StrEnum):
    PAD = "pad"
    PROBE = "probe"


class Mode(enum.StrEnum):
    CONTINUOUS = "continuous"
    PULSED = "pulsed"


class Technique(enum.StrEnum):
    CONTACT = "contact"
    PROJECTION = "projection"


class Target(enum.StrEnum):
    """The quantity whose prescribed value ends a step (the host's primary dose channel)."""

    FLUENCE = "fluence_j_cm2"
    ENERGY = "energy_j"
    TIME = "time_s"


class Region(enum.StrEnum):
    HEAD = "head"
    NECK = "neck"
    CERVICAL = "cervical"
    SHOULDER = "shoulder"
    UPPER_LIMB = "upper-limb"
    THORACIC = "thoracic"
    LUMBAR = "lumbar"
    SACRAL = "sacral"
    PELVIS = "pelvis"
    ABDOMEN = "abdomen"
    HIP = "hip"
    LOWER_LIMB = "lower-limb"


class Contraindication(enum.StrEnum):
    """Contraindications with sources (DOSIMETRY.md); the clinician screens for them."""

    CANCER = "cancer"
    PREGNANCY = "pregnancy"
    HYPERTHYROIDISM = "hyperthyroidism"
    EPILEPSY = "epilepsy"
    RECENT_RADIOTHERAPY = "recent-radiotherapy"
    BLEEDING_DISORDER = "bleeding-disorder"
    DEEP_VEIN_THROMBOSIS = "deep-vein-thrombosis"
    PHOTOSENSITIVITY = "photosensitivity"
    REDUCED_SENSATION = "reduced-sensation"

    @property
    def description(self) -> str:
        return CONTRAINDICATION_TEXT[self]


CONTRAINDICATION_TEXT: dict[Contraindication, str] = {
    Contraindication.CANCER: "histologically proven cancer at or near the treated site",
    Contraindication.PREGNANCY: "pregnancy, when treating the abdomen, low back or pelvis",
    Contraindication.HYPERTHYROIDISM: "hyperthyroidism, when treating the neck or thyroid region",
    Contraindication.EPILEPSY: "epilepsy (pulsed red light at 5–10 Hz can trigger seizures)",
    Contraindication.RECENT_RADIOTHERAPY: "radiotherapy of the area within the last 6 months",
    Contraindication.BLEEDING_DISORDER: "bleeding disorders",
    Contraindication.DEEP_VEIN_THROMBOSIS: "deep vein thrombosis",
    Contraindication.PHOTOSENSITIVITY: "photosensitivity disorders and photosensitising drugs",
    Contraindication.REDUCED_SENSATION: "reduced sensation at the treated site",
}

Identifier = Annotated[
    str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}[a-z0-9]$", min_length=3, max_length=64)
]
ShortText = Annotated[str, Field(min_length=1, max_length=200)]
LongText = Annotated[str, Field(min_length=1, max_length=4000)]
PortNumber = Annotated[int, Strict(False), Field(ge=1, le=MAX_PORTS)]
WavelengthNm = Annotated[int, Field(ge=WAVELENGTH_MIN_NM, le=WAVELENGTH_MAX_NM)]

# Strict models take enums from TOML strings only when told to.
KindField = Annotated[ApplicatorKind, Strict(False)]
ModeField = Annotated[Mode, Strict(False)]
TechniqueField = Annotated[Technique, Strict(False)]
TargetField = Annotated[Target, Strict(False)]
RegionField = Annotated[Region, Strict(False)]
ContraindicationField = Annotated[Contraindication, Strict(False)]


class Evidence(_Model):
    """A source the protocol rests on, by key of the verified reference list."""

    ref: str = Field(description="Key of a verified reference (pbmd.protocols.evidence).")
    relevance: LongText = Field(description="What this protocol takes from the source.")


class Course(_Model):
    """Number of sessions and their interval (Jenkins & Carroll)."""

    sessions: int = Field(ge=1, le=60, description="Sessions in the course.")
    interval_days: float = Field(
        ge=1, le=30, description="Minimum days between two sessions (1 = daily)."
    )


class Site(_Model):
    """An anatomical site. v2: a region of the body map, whose ceilings are summed on
    the skin; v1: a named site, whose ceilings are summed per name and wavelength."""

    label: ShortText = Field(description="Anatomical site as the clinician reads it.")
    body_region: Identifier | None = Field(
        default=None,
        description="v2 (required): the region of the body map (protocols/body_map.toml) "
        "this site lies on.",
    )
    region: RegionField | None = Field(
        default=None,
        description="v1 (required there, not allowed in v2, where the map gives it): "
        "coarse body region, for the contraindication checks.",
    )
    area_covered_cm2: float | None = Field(
        default=None,
        ge=0.01,
        le=5000,
        description="Skin area this site covers (Jenkins & Carroll). Required in v1; in v2 "
        "the body region's area unless stated (never above it).",
    )


class Applicator(_Model):
    """The applicator a port needs; a plan refuses a port that reports another."""

    kind: KindField = Field(description='"pad" (LED/SLD array) or "probe" (one point).')
    channels_nm: list[WavelengthNm] = Field(
        min_length=1, max_length=8, description="Wavelength channels the steps use."
    )
    beam_area_cm2: float = Field(
        ge=0.01, le=1000, description="Emitting area at the skin the protocol was written for."
    )


class Gating(_Model):
    """What must hold before (and while) a step emits."""

    confirm_placement: bool = Field(
        default=False, description="The operator confirms the applicator placement first."
    )
    skin_contact: bool = Field(
        default=False, description="Emit only while the probe reports skin contact."
    )
    footswitch: bool = Field(default=False, description="Emit only while the footswitch is held.")


class Step(_Model):
    """One emission on one port: a site, a wavelength, a setpoint and a dose target."""

    site: str = Field(description="Key of a [sites] entry.")
    wavelength_nm: WavelengthNm = Field(description="Channel wavelength, nm.")
    mode: ModeField = Field(description='"continuous" or "pulsed".')
    technique: TechniqueField = Field(description='"contact" or "projection" (Jenkins & Carroll).')
    power_mw: float | None = Field(
        default=None, ge=0.01, le=100_000, description="Average optical power setpoint, mW."
    )
    irradiance_mw_cm2: float | None = Field(
        default=None, ge=0.01, le=1000, description="Average irradiance setpoint at the skin."
    )
    pulse_hz: int | None = Field(
        default=None, ge=1, le=10_000, description="Pulse repetition rate, Hz (pulsed only)."
    )
    duty_permille: int | None = Field(
        default=None, ge=1, le=999, description="Duty cycle in ‰ (pulsed only)."
    )
    pulse_width_ns: float | None = Field(
        default=None, ge=1, le=1e9, description="Pulse width (pulsed only)."
    )
    peak_power_mw: float | None = Field(
        default=None, ge=1, le=1_000_000, description="Peak power of a pulse (pulsed only)."
    )
    fluence_j_cm2: float | None = Field(
        default=None, ge=0.001, le=100, description="Radiant exposure target (pads)."
    )
    energy_j: float | None = Field(
        default=None, ge=0.001, le=10_000, description="Radiant energy target (per point)."
    )
    time_s: float | None = Field(
        default=None,
        ge=HARD_STEP_TIME_MIN_S,
        le=HARD_STEP_TIME_MAX_S,
        description="Exposure time target, s.",
    )
    target: TargetField | None = Field(
        default=None,
        description="Which stated dose quantity ends the step; needed when several are stated.",
    )
    max_time_s: float = Field(
        ge=HARD_STEP_TIME_MIN_S,
        le=HARD_STEP_TIME_MAX_S,
        description="Longest the step may take: the host's backup timer.",
    )
    gating: Gating = Field(default_factory=Gating)
    note: LongText | None = Field(default=None, description="Why this step is as it is.")
    phase: Identifier | None = Field(
        default=None,
        description="v2 (required): id of the [[phases]] entry this step runs in.",
    )
    sources: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="v2: [[evidence]] refs this step's dose comes from.",
    )
    basis: LongText | None = Field(
        default=None,
        description="v2: what in the sources gives this dose (required with sources).",
    )
    assumption: LongText | None = Field(
        default=None,
        description="v2: why this dose, where no source gives it (required without sources).",
    )


class Phase(_Model):
    """A stage of the session: its steps on every port run together; the next phase
    starts when every step of this one has ended."""

    id: Identifier = Field(description="Name the steps refer to with phase = …")
    title: ShortText = Field(description="What happens in this phase, for the clinician.")
    note: LongText | None = Field(default=None, description="Why the phase is as it is.")


class Total(_Model):
    """A total a source states (e.g. WALT: 16 J in all), checked against the steps."""

    label: ShortText = Field(description="What the total is.")
    phase: Identifier | None = Field(default=None, description="Only steps of this phase.")
    ports: list[PortNumber] = Field(
        default_factory=list, max_length=MAX_PORTS, description="Only these ports (all if empty)."
    )
    energy_j: float | None = Field(
        default=None, ge=0.001, le=100_000, description="Total energy of those steps, J."
    )
    points: int | None = Field(
        default=None, ge=1, le=64, description="Number of distinct sites of those steps."
    )
    sources: list[str] = Field(default_factory=list, max_length=8)
    basis: LongText | None = Field(default=None, description="What the sources state.")
    assumption: LongText | None = Field(
        default=None, description="Why this total, where no source gives it."
    )


class Port(_Model):
    applicator: Applicator
    steps: list[Step] = Field(min_length=1, max_length=64)


class Protocol(_Model):
    """A treatment protocol file (TOML), as validated and signed."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        title="pbmd treatment protocol",
        json_schema_extra={
            "$comment": "pbmd protocol file (TOML), schema_version 2; version 1 files "
            "still load as one phase with every port at once"
        },
    )

    schema_version: Literal[1, 2] = Field(
        description="Format version of this file: 2 (phases, body map, dose sources); "
        "1 is still read, as one phase."
    )
    id: Identifier = Field(description="Stable name, lower-case letters, digits and '-'.")
    version: int = Field(ge=1, le=2**31 - 1, description="Increases with every release.")
    title: ShortText
    indication: LongText
    evidence: list[Evidence] = Field(min_length=1, max_length=32)
    contraindications: list[ContraindicationField] = Field(min_length=1, max_length=16)
    cautions: list[LongText] = Field(default_factory=list, max_length=32)
    course: Course
    body_map: Identifier | None = Field(
        default=None, description='v2 (required): the body map\'s id, "pbmd-body-map".'
    )
    phases: list[Phase] = Field(
        default_factory=list,
        max_length=MAX_PHASES,
        description="v2 (required): the phases in the order they run.",
    )
    sites: dict[Identifier, Site] = Field(min_length=1, max_length=64)
    ports: dict[PortNumber, Port] = Field(min_length=1, max_length=MAX_PORTS)
    totals: list[Total] = Field(
        default_factory=list, max_length=32, description="v2: totals checked against the steps."
    )
