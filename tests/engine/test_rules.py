"""The rule table, the limits registry behind it, and the one switch-off routine."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest

from pbmd.daemon.core.dose import DoseIntegrator
from pbmd.daemon.core.emission import Emission
from pbmd.daemon.core.rules import (
    ALL_RULES,
    SAMPLE_RULES,
    SampleView,
    first_broken,
)
from pbmd.daemon.core.safety import (
    IDLE_ESCALATION,
    REGISTRY_NAMES,
    SafetyLimits,
    Supervisor,
    TripCause,
    switch_off,
)
from pbmd.daemon.core.steps import StepOrder, StepProgress, TargetKind
from pbmd.drivers import codec
from pbmd.protocols.limits import LIMITS


def _registry_name(field: str) -> str:
    return REGISTRY_NAMES.get(field, field)


def test_every_rule_trips_with_a_registered_cause_and_registered_limits() -> None:
    fields = {f.name for f in dataclasses.fields(SafetyLimits)}
    names = [r.name for r in ALL_RULES]
    assert len(names) == len(set(names)), names
    for rule in ALL_RULES:
        assert rule.cause in list(TripCause), rule
        assert rule.watches, rule
        for used in rule.limits:
            assert used in fields, f"{rule.name}: {used} is not a SafetyLimits field"
            assert _registry_name(used) in LIMITS, f"{rule.name}: {used} not in the registry"


def test_safety_limits_come_from_the_registry_and_keep_to_its_bounds() -> None:
    limits = SafetyLimits()
    for f in dataclasses.fields(SafetyLimits):
        quantity = LIMITS[_registry_name(f.name)]
        assert getattr(limits, f.name) == quantity.default, f.name
        assert quantity.source and quantity.unit, quantity
    too_wide = LIMITS["power_deviation_fraction"].maximum * 2
    with pytest.raises(ValueError, match="power_deviation_fraction"):
        SafetyLimits(power_deviation_fraction=too_wide)
    # The clinician's sentence says the registry's figure.
    assert f"{LIMITS['power_deviation_fraction'].percent} %" in TripCause.POWER_DEVIATION.message


def _view(power_uw: int, max_power_uw: int) -> SampleView:
    order = StepOrder(
        port=1, index=0, site="knee", wavelength_nm=830, mode=codec.EmitMode.CONTINUOUS,
        power_uw=max_power_uw, pulse_hz=0, duty_permille=1000, area_cm2=1.0,
        target_kind=TargetKind.ENERGY, target_energy_uj=1e6, target_time_s=10.0,
        planned_time_s=10.0, energy_budget_uj=1_050_000, max_duration_ms=12_000,
        channel_max_power_uw=max_power_uw,
    )  # fmt: skip
    request = codec.EmitStart(1, 830, 0, max_power_uw, 0, 1000, 1_050_000, 12_000)
    view = SampleView(cast(Any, None))  # no rule before the deviation one needs the session
    view.order = order
    view.integ = DoseIntegrator(order.area_cm2)
    view.prog = StepProgress(order, view.integ)
    view.em = Emission(1, request, 0.0, 0.0, 0.0)
    view.power_uw = power_uw
    view.delivered_uj = 0
    view.device_time_us = 0
    view.site_fluence_j_cm2 = 0.0
    return view


def test_all_rules_hold_within_limits() -> None:
    assert first_broken(SAMPLE_RULES, _view(100_000, 100_000), SafetyLimits()) is None


def test_a_broken_rule_trips_the_latch_with_its_code() -> None:
    limits = SafetyLimits()
    over = int(100_000 * (1 + limits.power_ceiling_tolerance)) + 1_000
    broken = first_broken(SAMPLE_RULES, _view(over, 100_000), limits)
    assert broken is not None
    rule, detail = broken
    assert rule.cause is TripCause.POWER_CEILING
    supervisor = Supervisor([], limits)
    assert supervisor.trip(rule.cause, detail, 1)
    assert supervisor.tripped is not None and supervisor.tripped.cause.code == "E103"
    assert "applicator maximum 100.0 mW" in supervisor.tripped.describe()


class _StuckController:
    """A controller whose port stays lit whatever it is told."""

    name = "stuck"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def all_off(self) -> None:
        self.sent.append("ALL_OFF")

    async def disarm(self) -> None:
        self.sent.append("DISARM")

    def lit_ports(self, dark_power_uw: int = 500) -> set[int]:
        return {2}

    async def wait_dark(self, timeout_s: float, dark_power_uw: int = 500) -> bool | None:
        return False


async def test_the_switch_off_escalates_and_reads_back_each_step() -> None:
    ctrl = _StuckController()
    attempts = await switch_off(ctrl, IDLE_ESCALATION, timeout_s=0.01, dark_power_uw=500)
    assert ctrl.sent == ["ALL_OFF", "DISARM"]
    assert [(a.step, a.dark, a.lit) for a in attempts] == [
        ("ALL_OFF", False, (2,)),
        ("DISARM", False, (2,)),
    ]


async def test_the_supervisor_escalates_a_stuck_port_to_service() -> None:
    ctrl = _StuckController()
    supervisor = Supervisor([ctrl], SafetyLimits())
    supervisor.start()
    try:
        supervisor.trip(TripCause.POWER_CEILING, "test", 2)
        await supervisor.wait_done()
    finally:
        await supervisor.close()
    assert ctrl.sent == ["ALL_OFF", "ALL_OFF", "DISARM"]
    assert supervisor.service_required
    assert supervisor.escalation[-1].endswith("hardware fault, service required")
