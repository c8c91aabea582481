"""The simulator's applicator catalog (ICD appendix A) and its physical constants.

PORT_INFO is built from these entries, so the figures the host sees are the
ones the physics uses. A real controller reports its own applicators; the
daemon must never rely on these constants, only on what PORT_INFO says.
"""

from __future__ import annotations

from dataclasses import dataclass

from pbmd.drivers.codec import ApplicatorKind, Channel, ChannelMode, ChannelModes


@dataclass(frozen=True, slots=True)
class ChannelSpec(ChannelModes):
    """One wavelength channel of an applicator."""

    wavelength_nm: int
    max_power_uw: int
    modes: ChannelMode
    peak_power_mw: int
    max_pulse_hz: int  # upper end of the pulse-rate range (pulsed channels)

    def wire(self) -> Channel:
        """The PORT_INFO channel record."""
        return Channel(self.wavelength_nm, self.max_power_uw, int(self.modes), self.peak_power_mw)


@dataclass(frozen=True, slots=True)
class ApplicatorModel:
    """An applicator type: what PORT_INFO reports plus its thermal and optical behaviour.

    Thermal model (first order): the applicator temperature T relaxes towards
    ``ambient + rise_c_per_w × P_optical`` with time constant ``thermal_tau_s``
    (device time). Output power droops by ``droop_per_c`` per °C above
    ``DROOP_REFERENCE_C`` (LEDs and laser diodes lose efficiency as they warm).
    """

    name: str
    kind: ApplicatorKind
    serial_prefix: str
    area_mm2: int
    channels: tuple[ChannelSpec, ...]
    rise_c_per_w: float
    thermal_tau_s: float
    droop_per_c: float

    @property
    def has_contact_sensor(self) -> bool:
        """Probes sense skin contact; pads have no sensor (contact flag always 0)."""
        return self.kind == ApplicatorKind.PROBE

    def channel(self, wavelength_nm: int) -> ChannelSpec | None:
        return next((c for c in self.channels if c.wavelength_nm == wavelength_nm), None)


CW_AND_PULSED = ChannelMode.CONTINUOUS | ChannelMode.PULSED


def _probe(name: str, serial_prefix: str, channel: ChannelSpec) -> ApplicatorModel:
    """A one-channel laser probe: a 0.5 cm² beam and a small head.

    40 °C/W with a 90 s time constant (+4 °C at 100 mW, +10 °C at 250 mW).
    """
    return ApplicatorModel(
        name=name,
        kind=ApplicatorKind.PROBE,
        serial_prefix=serial_prefix,
        area_mm2=50,
        channels=(channel,),
        rise_c_per_w=40.0,
        thermal_tau_s=90.0,
        droop_per_c=0.005,
    )


APPLICATORS: dict[str, ApplicatorModel] = {
    # 180 emitters × 10 mW at 660 nm and 180 × 15 mW at 830 nm over 180 cm²;
    # pulsed 1–5000 Hz. A pad at full 830 nm power settles ~6 °C above ambient
    # with a 10-minute time constant: a few °C over a 10-minute step.
    "duo_pad": ApplicatorModel(
        name="duo_pad",
        kind=ApplicatorKind.PAD,
        serial_prefix="DUO",
        area_mm2=18_000,
        channels=(
            ChannelSpec(660, 1_800_000, CW_AND_PULSED, 1_800, 5_000),
            ChannelSpec(830, 2_700_000, CW_AND_PULSED, 2_700, 5_000),
        ),
        rise_c_per_w=2.2,
        thermal_tau_s=600.0,
        droop_per_c=0.003,
    ),
    # 830 nm laser probe: 100 mW typical, 250 mW maximum, 0.5 cm² beam.
    "probe_830": _probe("probe_830", "L830", ChannelSpec(830, 250_000, CW_AND_PULSED, 250, 5_000)),
    # 905 nm superpulsed probe: 4 diodes × 25 W peak, 200 ns pulses, pulsed only,
    # 1–10000 Hz; 200 mW average at 10 kHz (+8 °C at full power).
    "probe_905": _probe(
        "probe_905", "S905", ChannelSpec(905, 200_000, ChannelMode.PULSED, 100_000, 10_000)
    ),
}


def default_ports() -> dict[int, str | None]:
    """The MultiPort's default wiring: ports 1–3 a DUO pad, port 4 the 905 nm probe."""
    return {1: "duo_pad", 2: "duo_pad", 3: "duo_pad", 4: "probe_905"}


def applicator(name: str) -> ApplicatorModel:
    """Look a catalog entry up, with an error that lists the valid names."""
    try:
        return APPLICATORS[name]
    except KeyError:
        known = ", ".join(sorted(APPLICATORS))
        raise ValueError(f"unknown applicator {name!r}: choose one of {known}") from None
