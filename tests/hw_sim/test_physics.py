"""The port model on its own: rise, noise, droop, heating, exact crossings, chunking."""

from __future__ import annotations

import numpy as np
import pytest

from pbmd.hw_sim import APPLICATORS
from pbmd.hw_sim.physics import (
    AMBIENT_C,
    OVER_TEMPERATURE_C,
    Emission,
    PhysicsEvent,
    PortPhysics,
)


def _port(name: str, seed: int = 0, noise: float = 0.01) -> PortPhysics:
    p = PortPhysics(port=1, seed=seed, noise_fraction=noise)
    p.plug(APPLICATORS[name])
    return p


def _start(p: PortPhysics, power_uw: int, budget_uj: int = 10**15, max_ms: int = 10**9) -> None:
    p.start(Emission(830, 0, power_uw, 0, 1000, budget_uj, max_ms, t_start_s=p.t_s))


def _run(p: PortPhysics, until_s: float, step_s: float) -> list[tuple[float, PhysicsEvent]]:
    """Advance like the controller does, returning the events met (emission stops at one)."""
    events = []
    while p.t_s < until_s:
        b = min(until_s, p.t_s + step_s)
        ev = p.scan(p.t_s, b, detect_faults=True)
        p.commit(ev[0] if ev else b)
        if ev:
            events.append(ev)
            p.stop(int(ev[1]))
    return events


def test_rise_time_is_about_1_ms() -> None:
    p = _port("probe_830", noise=0.0)
    _start(p, 100_000)
    levels = []
    for _ in range(60):
        before = p.true_total_uj
        _run(p, p.t_s + 50e-6, 50e-6)
        levels.append((p.true_total_uj - before) / 50e-6 / 100_000)
    t10 = next(i for i, v in enumerate(levels) if v >= 0.1) * 50e-6
    t90 = next(i for i, v in enumerate(levels) if v >= 0.9) * 50e-6
    assert 0.7e-3 < t90 - t10 < 1.3e-3
    assert levels[-1] > 0.99


def test_photodiode_noise_is_about_one_percent() -> None:
    p = _port("probe_830")
    _start(p, 100_000)
    _run(p, 0.01, 0.01)
    rates = []
    for _ in range(2000):
        before = p.pd_total_uj
        _run(p, p.t_s + 1e-3, 1e-3)
        rates.append((p.pd_total_uj - before) / 1e-3)
    rel = np.array(rates) / np.mean(rates)
    assert 0.008 < float(np.std(rel)) < 0.012


def test_noise_is_deterministic_per_seed_and_independent_of_chunking() -> None:
    a, b, c = _port("duo_pad", seed=3), _port("duo_pad", seed=3), _port("duo_pad", seed=4)
    for p in (a, b, c):
        _start(p, 1_000_000)
    _run(a, 10.0, 1.0)
    _run(b, 10.0, 0.0137)
    _run(c, 10.0, 1.0)
    assert a.emission is not None and b.emission is not None and c.emission is not None
    assert a.emission.energy_uj == pytest.approx(b.emission.energy_uj, rel=1e-7)
    assert a.temp_c == pytest.approx(b.temp_c, rel=1e-6)
    assert a.emission.energy_uj != c.emission.energy_uj


@pytest.mark.parametrize(("power_uw", "step_s"), [(2_700_000, 1.0), (100_000, 0.003)])
def test_budget_crossing_is_exact_whatever_the_step(power_uw: int, step_s: float) -> None:
    p = _port("duo_pad")
    budget_uj = power_uw * 5 + 1234
    _start(p, power_uw, budget_uj=budget_uj)
    events = _run(p, budget_uj / power_uw * 1.1, step_s)
    assert events[0][1] == PhysicsEvent.ENERGY_BUDGET
    assert p.last is not None
    assert p.last.energy_uj == pytest.approx(budget_uj, rel=1e-9)
    assert p.last.t_end_s == pytest.approx(budget_uj / power_uw, rel=0.02)


def test_max_duration_is_exact() -> None:
    p = _port("probe_830")
    _start(p, 100_000, max_ms=12_345)
    (t_s, kind), *rest = _run(p, 13.0, 0.7)
    assert (kind, rest) == (PhysicsEvent.MAX_DURATION, [])
    assert t_s == pytest.approx(12.345, abs=1e-9)
    assert p.last is not None and p.last.duration_ms(p.t_s) == 12_345


def test_pads_warm_a_few_degrees_over_ten_minutes_and_droop() -> None:
    for power_uw, low, high in [(2_700_000, 3.0, 5.0), (1_800_000, 2.0, 3.5)]:
        p = _port("duo_pad")
        _start(p, power_uw)
        _run(p, 1.0, 1.0)
        early = p.last_true_uw
        _run(p, 600.0, 1.0)
        assert low < p.temp_c - AMBIENT_C < high
        droop = 1 - p.last_true_uw / early
        assert 0.005 < droop < 0.02  # output falls a little as the pad warms


def test_probes_warm_more_and_normal_use_stays_below_41_c() -> None:
    pad = _port("duo_pad")
    _start(pad, 2_700_000)
    probe = _port("probe_905")
    _start(probe, 200_000)
    for p in (pad, probe):
        _run(p, 600.0, 2.0)
    assert probe.temp_c - AMBIENT_C > pad.temp_c - AMBIENT_C
    full = _port("probe_830")
    _start(full, 250_000)
    assert _run(full, 3600.0, 5.0) == []
    assert full.temp_c < OVER_TEMPERATURE_C - 3


def test_cooling_when_dark() -> None:
    p = _port("probe_830")
    p.temp_c = 40.0
    _run(p, 90.0, 1.0)  # one time constant
    assert p.temp_c == pytest.approx(AMBIENT_C + 15.0 / np.e, abs=0.05)


def test_calibration_drift_changes_the_reading_not_the_light() -> None:
    p = _port("duo_pad", noise=0.0)
    _start(p, 1_000_000)
    p.set_drift(0.1)  # +10 % per hour
    _run(p, 1800.0, 1.0)
    assert p.gain_at(p.t_s) == pytest.approx(1.05, rel=1e-6)
    assert p.last_rate_uw / p.last_true_uw == pytest.approx(1.05, rel=1e-3)


def test_overpower_needs_20_ms_above_120_percent() -> None:
    p = _port("duo_pad", noise=0.0)
    _start(p, 1_000_000)
    _run(p, 0.5, 0.1)
    p.power_factor = 1.25
    (t_s, kind), *rest = _run(p, 1.0, 0.0071)
    assert (kind, rest) == (PhysicsEvent.OVERPOWER, [])
    assert t_s == pytest.approx(0.52, abs=1e-9)
