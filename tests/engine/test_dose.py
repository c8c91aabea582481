"""The host dose channel: interval means × device time, and the stop prediction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pbmd.daemon.core.dose import DeviceClock, DoseIntegrator, integrate_samples


def test_interval_means_integrate_exactly() -> None:
    integ = DoseIntegrator(area_cm2=180.0)
    integ.rebase(1_000_000)
    # 1.8 W for 3 intervals of 0.5 s, then a tail interval of 0.1 s at a mean of 0.9 W.
    for t_us, p_uw in (
        (1_500_000, 1_800_000),
        (2_000_000, 1_800_000),
        (2_500_000, 1_800_000),
        (3_000_000, 360_000),
    ):
        integ.add(t_us, p_uw, emitting=True)
    assert integ.energy_j == pytest.approx(1.8 * 1.5 + 0.36 * 0.5)
    assert integ.fluence_j_cm2 == pytest.approx(integ.energy_j / 180.0)
    assert integ.emitting_time_us == 2_000_000


def test_host_time_never_enters() -> None:
    """Bunched or late samples change nothing: each carries its device time."""
    a, b = DoseIntegrator(0.5), DoseIntegrator(0.5)
    samples = [(i * 20_000, 200_000) for i in range(1, 200)]
    a.rebase(0)
    b.rebase(0)
    for t, p in samples:
        a.add(t, p, True)
    for t, p in samples[::2]:  # every other sample lost: the next covers both
        b.add(t, p, True)
    assert a.energy_uj == pytest.approx(b.energy_uj, rel=0.02)


def test_out_of_order_sample_adds_nothing() -> None:
    integ = DoseIntegrator(1.0)
    integ.rebase(100)
    integ.add(200, 1000, True)
    before = integ.energy_uj
    assert integ.add(150, 10**9, True) == 0.0
    assert integ.energy_uj == before


@given(
    powers=st.lists(st.integers(0, 3_000_000), min_size=2, max_size=200),
    steps=st.lists(st.integers(1, 2_000_000), min_size=2, max_size=200),
)
def test_batch_and_live_paths_agree(powers: list[int], steps: list[int]) -> None:
    n = min(len(powers), len(steps))
    times = np.cumsum(np.array(steps[:n], dtype=np.int64))
    pw = np.array(powers[:n], dtype=np.int64)
    live = DoseIntegrator(1.0)
    live.rebase(int(times[0]))
    for t, p in zip(times[1:], pw[1:], strict=True):
        live.add(int(t), int(p), True)
    assert integrate_samples(times, pw) == pytest.approx(live.energy_uj, rel=1e-9, abs=1e-6)


def test_prediction_of_time_to_dose() -> None:
    integ = DoseIntegrator(180.0)
    integ.rebase(0)
    integ.add(1_000_000, 2_700_000, True)  # 2.7 J
    assert integ.device_time_to_reach_us(27_000_000) == pytest.approx(9_000_000)
    assert integ.device_time_to_reach_us(1_000_000) == 0.0
    integ.add(2_000_000, 0, False)
    assert integ.device_time_to_reach_us(27_000_000) == float("inf")


def test_device_clock_measures_the_ratio() -> None:
    clock = DeviceClock()
    for i in range(50):
        clock.observe(100.0 + i * 0.02, 5_000_000 + i * 1_200_000)  # ×60 at 50 Hz
    assert clock.ratio == pytest.approx(60.0)
    # Telemetry alone anchors the mapping at the latest sample.
    last_host = 100.0 + 49 * 0.02
    assert clock.host_time_at(5_000_000 + 50 * 1_200_000) == pytest.approx(last_host + 0.02)
    assert clock.one_way_latency_s == 0.0


def test_device_clock_anchors_on_the_fastest_pong() -> None:
    clock = DeviceClock()
    for i in range(50):
        clock.observe(100.0 + i * 0.02, i * 1_200_000)
    # Device time is 60 × (host − 100 s) + 30 ms; PONGs with queueing delays on one side.
    truth = lambda host_s: (host_s - 100.0) * 60e6 + 30_000  # noqa: E731
    clock.observe_pong(101.000, 101.004, int(truth(101.003)))  # 4 ms, skewed
    clock.observe_pong(101.050, 101.0504, int(truth(101.0502)))  # 0.4 ms, symmetric
    clock.observe_pong(101.100, 101.103, int(truth(101.1005)))  # 3 ms, skewed
    assert clock.one_way_latency_s == pytest.approx(0.0002)
    assert clock.host_time_at(truth(101.5)) == pytest.approx(101.5, abs=1e-6)
    assert clock.device_time_now_us(101.2) == pytest.approx(truth(101.2), abs=1.0)


def test_device_clock_restarts_after_device_reset() -> None:
    clock = DeviceClock()
    clock.observe(0.0, 10_000_000)
    clock.observe(1.0, 11_000_000)
    clock.observe(2.0, 50)  # device restarted
    clock.observe(3.0, 2_000_050)
    assert clock.ratio == pytest.approx(2.0)


def test_device_clock_rate_from_pongs_ignores_telemetry_jitter() -> None:
    clock = DeviceClock()
    # Telemetry arrives with bursts of host-side delay: its rate estimate is off.
    clock.observe(10.000, 0)
    clock.observe(10.300, 18_000_000 - 600_000)
    assert abs(clock.ratio - 60.0) > 0.5
    # PONGs every 50 ms; every fifth has a clean 0.2 ms round trip, others are delayed.
    for i in range(60):
        sent = 10.0 + i * 0.05
        rtt = 0.0002 if i % 5 == 0 else 0.004
        mid = sent + (rtt / 2 if i % 5 == 0 else 0.003)  # delayed replies are skewed
        clock.observe_pong(sent, sent + rtt, round((mid - 10.0) * 60e6))
    assert clock.ratio == pytest.approx(60.0, rel=1e-4)
    assert clock.host_time_at(60e6 * 3.5) == pytest.approx(13.5, abs=1e-5)
