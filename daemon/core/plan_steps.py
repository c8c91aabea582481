"""A frozen plan turned into the steps each port runs, with ceilings and backstops.

The engine hands these :class:`~pbmd.daemon.core.steps.StepOrder` lists to a
session; which contraindications block which emission by itself is decided
here too, so that the runner only compares sets.
"""

from __future__ import annotations

from typing import Any

from pbmd.daemon.core.controllers import PortMap
from pbmd.daemon.core.steps import StepOrder, TargetKind
from pbmd.drivers import codec
from pbmd.protocols.limits import EPILEPSY_MAX_PULSE_HZ, RED_MAX_NM, skin_mpe_mw_cm2
from pbmd.protocols.model import Contraindication, Region, Target
from pbmd.protocols.plan import Plan, PlannedEmission, PortPlan

# Contraindications that block only the steps they concern; every other one
# answered "yes" refuses a protocol that lists it.
REGIONS_BLOCKED: dict[Contraindication, frozenset[Region]] = {
    Contraindication.PREGNANCY: frozenset(
        {Region.LUMBAR, Region.SACRAL, Region.PELVIS, Region.ABDOMEN}
    ),
    Contraindication.HYPERTHYROIDISM: frozenset({Region.NECK, Region.CERVICAL}),
}


def blocked_by(e: PlannedEmission) -> frozenset[str]:
    """The contraindications that block this emission by themselves."""
    out = {c.value for c, regions in REGIONS_BLOCKED.items() if e.region in regions}
    if (
        e.mode == codec.EmitMode.PULSED
        and e.wavelength_nm < RED_MAX_NM
        and 0 < e.pulse_hz <= EPILEPSY_MAX_PULSE_HZ
    ):
        out.add(Contraindication.EPILEPSY.value)
    return frozenset(out)


def steps_from_plan(plan: Plan, port_map: PortMap) -> dict[int, list[StepOrder]]:
    """The engine's view of each planned emission, with ceilings and backstops."""
    limits = plan.limits
    out: dict[int, list[StepOrder]] = {}
    for port_plan in plan.ports:
        target = port_map[port_plan.port]
        for e in port_plan.emissions:
            channel = target.applicator.channel(e.wavelength_nm)
            ceiling = _irradiance_ceiling(limits, e.wavelength_nm) * plan.irradiance_derating
            out.setdefault(port_plan.port, []).append(
                StepOrder(
                    port=port_plan.port,
                    index=e.step_index,
                    site=e.site_id,
                    label=e.site_label,
                    wavelength_nm=e.wavelength_nm,
                    mode=e.mode,
                    power_uw=e.power_uw,
                    pulse_hz=e.pulse_hz,
                    duty_permille=e.duty_permille,
                    area_cm2=e.area_mm2 / 100.0,
                    target_kind=TargetKind.TIME if e.target == Target.TIME else TargetKind.ENERGY,
                    target_energy_uj=float(e.target_energy_uj),
                    target_time_s=e.expected_duration_ms / 1000.0,
                    planned_time_s=e.expected_duration_ms / 1000.0,
                    energy_budget_uj=e.energy_budget_uj,
                    max_duration_ms=e.max_duration_ms,
                    confirm_placement=e.gating.confirm_placement,
                    skin_contact=e.gating.skin_contact,
                    footswitch=e.gating.footswitch,
                    blocked_by=blocked_by(e),
                    # Measured irradiance may exceed the setpoint's by the deviation
                    # band before that check trips; the ceiling is the hard limit.
                    irradiance_ceiling_mw_cm2=ceiling,
                    fluence_ceiling_j_cm2=_fluence_ceiling(limits),
                    channel_max_power_uw=channel.max_power_uw if channel else 0,
                    backup_time_s=e.backup_time_s,
                    phase=e.phase,
                    patches=frozenset(e.patches),
                )
            )
    return out


def _irradiance_ceiling(limits: Any, wavelength_nm: int) -> float:
    """The lowest ceiling at a wavelength: skin MPE, site, site per wavelength."""
    at = getattr(limits, "irradiance_ceiling_at", None)
    if at is not None:
        return float(at(wavelength_nm)[0])
    return skin_mpe_mw_cm2(wavelength_nm)


def _fluence_ceiling(limits: Any) -> float:
    return float(getattr(limits, "fluence_ceiling_j_cm2", 10.0))


def applicator_mismatch(planned: PortPlan, info: codec.PortInfo) -> str | None:
    """How the applicator plugged in now differs from the one a port's plan was made
    for (kind, serial where the plan names one, area, the channels it uses), or None."""
    kind = codec.describe(codec.ApplicatorKind, info.applicator_kind).lower()
    wanted = codec.describe(codec.ApplicatorKind, planned.applicator_kind).lower()
    plugged = f"{kind} {info.applicator_serial}".strip()
    made_for = f"{wanted} {planned.applicator_serial}".strip()
    if info.applicator_kind == codec.ApplicatorKind.NONE:
        return f"no applicator is plugged in (the plan is for the {made_for})"
    if info.applicator_kind != planned.applicator_kind or (
        planned.applicator_serial and info.applicator_serial != planned.applicator_serial
    ):
        return f"the {plugged} is plugged in, not the {made_for} the plan was made for"
    if info.area_mm2 != planned.area_mm2:
        return (
            f"the {plugged} reports {info.area_mm2 / 100:g} cm², the plan was made for "
            f"{planned.area_mm2 / 100:g} cm²"
        )
    missing = sorted(
        {e.wavelength_nm for e in planned.emissions} - {c.wavelength_nm for c in info.channels}
    )
    if missing:
        return f"the {plugged} has no channel at {', '.join(f'{nm} nm' for nm in missing)}"
    return None
