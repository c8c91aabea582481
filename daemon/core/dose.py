"""The host's dose channel: measured power integrated over device time.

ICD §4 defines a telemetry sample's ``measured_power_uw`` as the *mean over
the sample interval*, stamped with the device time at the interval's end. The
energy of an interval is then exactly mean × length, so the integral is the
sum of those products over device time (the trapezoid over instantaneous
readings would lag a mean-valued signal by half a sample at every start and
stop). Host time never enters: a late or bunched telemetry frame changes
nothing, because each sample carries its own device time.

The integrator also predicts *when* the dose will be reached, from the current
rate and the device-clock mapping, so the stop can be sent to arrive on time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass
class DoseIntegrator:
    """Energy of one step on one port, across every emission of that step."""

    area_cm2: float
    energy_uj: float = 0.0
    emitting_time_us: int = 0
    peak_irradiance_mw_cm2: float = 0.0
    samples: int = 0
    last_device_time_us: int | None = None
    last_power_uw: float = 0.0
    _irradiance_time_product: float = field(default=0.0, repr=False)

    def add(self, device_time_us: int, measured_power_uw: int, emitting: bool) -> float:
        """Add one sample; returns the energy in µJ that this interval contributed."""
        previous = self.last_device_time_us
        self.last_device_time_us = device_time_us
        self.last_power_uw = float(measured_power_uw)
        if previous is None or device_time_us <= previous:
            return 0.0
        dt_us = device_time_us - previous
        delta_uj = measured_power_uw * dt_us / 1e6
        self.energy_uj += delta_uj
        self.samples += 1
        if emitting or measured_power_uw:
            self.emitting_time_us += dt_us
            irradiance = self.irradiance_mw_cm2(measured_power_uw)
            self.peak_irradiance_mw_cm2 = max(self.peak_irradiance_mw_cm2, irradiance)
        return delta_uj

    def rebase(self, device_time_us: int) -> None:
        """Start the next interval here (after a pause, at a new EMIT_START)."""
        self.last_device_time_us = device_time_us

    def irradiance_mw_cm2(self, power_uw: float) -> float:
        return power_uw / 1000.0 / self.area_cm2

    @property
    def energy_j(self) -> float:
        return self.energy_uj / 1e6

    @property
    def fluence_j_cm2(self) -> float:
        return self.energy_j / self.area_cm2

    @property
    def mean_irradiance_mw_cm2(self) -> float:
        if not self.emitting_time_us:
            return 0.0
        mean_power_uw = self.energy_uj / (self.emitting_time_us / 1e6)
        return self.irradiance_mw_cm2(mean_power_uw)

    def device_time_to_reach_us(self, target_uj: float, rate_uw: float | None = None) -> float:
        """Device time from the last sample until `target_uj`, at the current rate."""
        rate = self.last_power_uw if rate_uw is None else rate_uw
        remaining = target_uj - self.energy_uj
        if remaining <= 0:
            return 0.0
        if rate <= 0:
            return float("inf")
        return remaining / rate * 1e6


def integrate_samples(
    device_time_us: npt.NDArray[np.int64], measured_power_uw: npt.NDArray[np.int64]
) -> float:
    """Energy in µJ of a batch of samples (the same rule as :class:`DoseIntegrator`).

    Used where whole series are at hand (reconstructing a record, benchmarks);
    the live path adds one sample at a time, where numpy would only add overhead.
    """
    if len(device_time_us) < 2:
        return 0.0
    dt = np.diff(device_time_us.astype(np.float64))
    return float(np.sum(measured_power_uw[1:].astype(np.float64) * np.clip(dt, 0, None)) / 1e6)


class DeviceClock:
    """Maps the controller's device time to this host's monotonic clock.

    The mapping comes from PING/PONG, NTP-style: a PONG's device time was
    taken about half-way between the PING leaving and the PONG arriving, and
    the exchange with the shortest round trip in a window is the one least
    disturbed by queueing. The most recent such exchange anchors the offset;
    the rate (1.0 for a real controller, the time scale for a simulator) is
    measured between the best exchange of the first window and the current
    anchor, a baseline that grows with the connection. Telemetry stands in for
    both until PONGs arrive.
    """

    PONG_WINDOW = 20
    MIN_RATE_SPAN_S = 0.5

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None
        self._pongs: deque[tuple[float, float, int]] = deque(maxlen=self.PONG_WINDOW)
        self._base: tuple[float, float, int] | None = None
        self._base_candidates = 0
        self.ratio = 1.0

    def observe(self, host_monotonic_s: float, device_time_us: int) -> None:
        """A telemetry sample stamped `device_time_us` arrived at `host_monotonic_s`."""
        if self._first is None or (self._last is not None and device_time_us < self._last[1]):
            self._first = (host_monotonic_s, device_time_us)
        self._last = (host_monotonic_s, device_time_us)
        span_s = host_monotonic_s - self._first[0]
        if self._base is None and span_s >= 0.2:
            self.ratio = max((device_time_us - self._first[1]) / 1e6 / span_s, 1e-6)

    def observe_pong(self, sent_s: float, received_s: float, device_time_us: int) -> None:
        if self._pongs and device_time_us < self._pongs[-1][2]:
            # The device clock restarted: forget everything measured against it.
            self._pongs.clear()
            self._base = None
            self._base_candidates = 0
            self._first = self._last = None
        exchange = (received_s - sent_s, (sent_s + received_s) / 2, device_time_us)
        self._pongs.append(exchange)
        if self._base_candidates < self.PONG_WINDOW:
            self._base_candidates += 1
            if self._base is None or exchange[0] < self._base[0]:
                self._base = exchange
        anchor = min(self._pongs)
        base = self._base
        assert base is not None
        span_s = anchor[1] - base[1]
        if span_s >= self.MIN_RATE_SPAN_S:
            self.ratio = max((anchor[2] - base[2]) / 1e6 / span_s, 1e-6)

    @property
    def ready(self) -> bool:
        return self._last is not None or bool(self._pongs)

    @property
    def one_way_latency_s(self) -> float:
        """Half the best recent round trip: how long a frame takes to reach the device."""
        if not self._pongs:
            return 0.0
        return min(p[0] for p in self._pongs) / 2

    def _anchor(self) -> tuple[float, float]:
        """(host time, device time in µs) of one instant."""
        if self._pongs:
            _, mid_s, dev_us = min(self._pongs)
            return mid_s, float(dev_us)
        assert self._last is not None
        return self._last[0], float(self._last[1])

    def host_time_at(self, device_time_us: float) -> float:
        """Host monotonic time at which the device clock reaches `device_time_us`."""
        host_s, dev_us = self._anchor()
        return host_s + (device_time_us - dev_us) / 1e6 / self.ratio

    def device_time_now_us(self, host_monotonic_s: float) -> float:
        host_s, dev_us = self._anchor()
        return dev_us + (host_monotonic_s - host_s) * self.ratio * 1e6
