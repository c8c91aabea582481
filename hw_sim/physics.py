"""Optical and thermal model of one port: emitter, monitor photodiode, applicator heat.

The model is advanced lazily, only when something looks at it (a request, a
telemetry tick, a scheduled wake-up), but always over the exact device-time
interval, in photodiode samples of ``ADC_PERIOD_S``. Every advance is a
``scan`` (compute the interval, find the earliest event in it: energy budget
reached, max duration, overpower, over-temperature) followed by a ``commit``
up to that event. An emission therefore stops at the device time of the
crossing with its energy clipped exactly there, however late the event loop
happens to wake up.

Signals (µW, µJ, device seconds):

* true power   = setpoint × power_factor × droop(T) × (1 − e^(−t/τ_rise))
* measured     = true × photodiode gain × (1 + noise_fraction · N(0, 1)) per sample,
  where the gain may drift by ``drift_per_hour`` (calibration drift)
* the controller's own dose integral (``Emission.energy_uj``) and the
  telemetry's mean measured power both integrate the same measured signal, so a
  host that integrates telemetry agrees with the controller to rounding.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .applicators import ApplicatorModel

FloatArray = npt.NDArray[np.float64]

ADC_PERIOD_S = 5e-3  # photodiode sample period (device time); fewer samples per tick
# keep the simulator's loop free, and a host at ×60 time scale feels every
# millisecond the simulator spends computing as 60 ms of device time
RISE_TIME_S = 1e-3  # 10–90 % optical rise time on start
RISE_TAU_S = RISE_TIME_S / math.log(9.0)  # first-order rise: t90 − t10 = τ·ln 9
AMBIENT_C = 25.0
DROOP_REFERENCE_C = 25.0
OVERPOWER_RATIO = 1.2  # measured above 120 % of the setpoint ...
OVERPOWER_HOLD_S = 0.020  # ... for 20 ms of device time latches fault 2
OVER_TEMPERATURE_C = 41.0
MAX_SCAN_S = 10.0  # longest interval advanced in one step (thermal τ is minutes)


class PhysicsEvent(enum.IntEnum):
    """What a scan can find; the value orders events that fall on the same instant."""

    OVERPOWER = 0
    OVER_TEMPERATURE = 1
    ENERGY_BUDGET = 2
    MAX_DURATION = 3


@dataclass
class Emission:
    """The controller's record of one emission: its parameters and its own dose channel."""

    wavelength_nm: int
    mode: int
    setpoint_uw: int
    pulse_hz: int
    duty_permille: int
    energy_budget_uj: int
    max_duration_ms: int
    t_start_s: float
    energy_uj: float = 0.0  # integral of measured power (the controller's dose channel)
    true_energy_uj: float = 0.0  # what really left the applicator (for snapshot only)
    t_end_s: float | None = None
    stop_reason: int = 0

    def duration_s(self, now_s: float) -> float:
        end = self.t_end_s if self.t_end_s is not None else now_s
        return max(0.0, end - self.t_start_s)

    def duration_ms(self, now_s: float) -> int:
        return round(self.duration_s(now_s) * 1000.0)

    @property
    def t_limit_s(self) -> float:
        return self.t_start_s + self.max_duration_ms / 1000.0


@dataclass
class _Scan:
    """The computed interval of the last scan, kept for the commit that follows."""

    a: float
    b: float
    edges: FloatArray
    widths: FloatArray
    measured_uj: FloatArray
    true_uj: FloatArray
    rate_uw: FloatArray
    over: npt.NDArray[np.bool_]
    run_after_s: FloatArray
    temp_ss_c: float
    temp0_c: float


@dataclass
class _DarkScan:
    """A scan with no light: only the interval is kept."""

    a: float
    b: float


@dataclass
class PortPhysics:
    """One port: the applicator plugged in, its emitter, photodiode and temperature."""

    port: int
    seed: int
    noise_fraction: float
    model: ApplicatorModel | None = None
    temp_c: float = AMBIENT_C
    contact: bool = True
    # injected faults
    power_factor: float = 1.0
    pd_gain: float = 1.0
    drift_per_hour: float = 0.0
    drift_t0_s: float = 0.0
    integrator_gain: float = 1.0  # the controller's dose integral counts gain × photodiode
    stuck: bool = False
    # emitter (the physical light source; may disagree with the controller when stuck)
    light_on: bool = False
    light_uw: float = 0.0
    t_on_s: float = 0.0
    # the controller's view
    emission: Emission | None = None  # running
    last: Emission | None = None  # last finished
    over_run_s: float = 0.0
    pd_total_uj: float = 0.0  # every photon the photodiode saw (telemetry's mean power)
    true_total_uj: float = 0.0
    last_rate_uw: float = 0.0
    last_true_uw: float = 0.0
    t_s: float = 0.0
    emitter_starts: int = 0
    _rng: np.random.Generator | None = field(default=None, repr=False)
    _noise: FloatArray = field(default_factory=lambda: np.zeros(0), repr=False)
    _noise_k0: int = 0
    _scan: _Scan | _DarkScan | None = field(default=None, repr=False)

    # -- emitter --------------------------------------------------------------------

    @property
    def has_light(self) -> bool:
        return self.light_on and self.model is not None

    @property
    def setpoint_uw(self) -> float:
        """What the controller believes the port emits (0 when idle)."""
        return float(self.emission.setpoint_uw) if self.emission is not None else 0.0

    def start(self, emission: Emission) -> None:
        """Begin an emission at ``emission.t_start_s`` (== the current model time)."""
        self.emission = emission
        self.over_run_s = 0.0
        self.last_rate_uw = 0.0
        self._light(emission.setpoint_uw, emission.t_start_s)

    def stop(self, reason: int) -> Emission | None:
        """End the running emission now; a stuck emitter keeps its light on."""
        em = self.emission
        if em is None:
            return None
        em.t_end_s = self.t_s
        em.stop_reason = reason
        self.last = em
        self.emission = None
        self.over_run_s = 0.0
        if not self.stuck:
            self.light_on = False
            self.light_uw = 0.0
        return em

    def set_stuck(self, on: bool) -> None:
        self.stuck = on
        if not on and self.emission is None:
            self.light_on = False
            self.light_uw = 0.0

    def plug(self, model: ApplicatorModel | None) -> None:
        """Applicator change: a new one starts at ambient temperature and in contact."""
        self.model = model
        self.temp_c = AMBIENT_C
        self.contact = True
        if model is None:
            self.light_on = False
            self.light_uw = 0.0
            self.over_run_s = 0.0

    def _light(self, power_uw: float, t_s: float) -> None:
        self.light_on = True
        self.light_uw = float(power_uw)
        self.t_on_s = t_s
        self.emitter_starts += 1
        # One noise stream per emitter start: the noise of an emission depends only
        # on the seed, the port and how many emissions came before on that port.
        self._rng = np.random.default_rng([self.seed, self.port, self.emitter_starts])
        self._noise = np.zeros(0)
        self._noise_k0 = 0

    def gain_at(self, t_s: float) -> float:
        return max(0.0, self.pd_gain * (1.0 + self.drift_per_hour * (t_s - self.drift_t0_s) / 3600))

    def set_gain(self, gain: float) -> None:
        self.pd_gain = gain
        self.drift_t0_s = self.t_s

    def set_drift(self, fraction_per_hour: float) -> None:
        self.pd_gain = self.gain_at(self.t_s)
        self.drift_t0_s = self.t_s
        self.drift_per_hour = fraction_per_hour

    def droop(self, temp_c: float) -> float:
        if self.model is None:
            return 0.0
        return max(0.0, 1.0 - self.model.droop_per_c * (temp_c - DROOP_REFERENCE_C))

    def level_uw(self) -> float:
        """True optical power after the rise, at the present temperature."""
        return (
            self.light_uw * self.power_factor * self.droop(self.temp_c) if self.has_light else 0.0
        )

    def _level_over(self, a: float, b: float) -> float:
        """True power level over (a, b], with droop at the interval's mean temperature.

        The temperature is predicted from the level at its start (first order), so
        the result hardly depends on how the model's time is cut into intervals.
        """
        level0 = self.level_uw()
        if self.model is None or b <= a:
            return level0
        tau = self.model.thermal_tau_s
        span = b - a
        temp_ss = AMBIENT_C + self.model.rise_c_per_w * level0 / 1e6
        temp_mean = temp_ss + (self.temp_c - temp_ss) * tau / span * -math.expm1(-span / tau)
        return self.light_uw * self.power_factor * self.droop(temp_mean)

    # -- noise ----------------------------------------------------------------------

    def _noise_for(self, k: npt.NDArray[np.int64]) -> FloatArray:
        if self._rng is None or k.size == 0:
            return np.zeros(k.size)
        need = int(k[-1]) + 1 - (self._noise_k0 + self._noise.size)
        if need > 0:  # drawn in sample order, in blocks: the same values however it is cut
            block = max(need, 1024)
            self._noise = np.concatenate([self._noise, self._rng.standard_normal(block)])
        out: FloatArray = self._noise[k - self._noise_k0]
        return out

    def _forget_noise_before(self, k: int) -> None:
        drop = k - self._noise_k0
        if drop > 4096:
            self._noise = self._noise[drop:]
            self._noise_k0 = k

    # -- scan and commit ------------------------------------------------------------

    def scan(self, a: float, b: float, detect_faults: bool) -> tuple[float, PhysicsEvent] | None:
        """Compute (a, b] and return the earliest event in it, without committing."""
        if not self.has_light or b <= a:
            return self._scan_dark(a, b)
        dt = ADC_PERIOD_S
        k_first = math.floor((a - self.t_on_s) / dt)
        k_last = math.ceil((b - self.t_on_s) / dt)
        inner = self.t_on_s + dt * np.arange(k_first + 1, k_last, dtype=np.float64)
        inner = inner[(inner > a) & (inner < b)]
        edges = np.concatenate(([a], inner, [b]))
        widths = edges[1:] - edges[:-1]
        mids = 0.5 * (edges[:-1] + edges[1:])
        k = np.floor((mids - self.t_on_s) / dt).astype(np.int64)
        x0 = (edges[:-1] - self.t_on_s) / RISE_TAU_S
        x1 = (edges[1:] - self.t_on_s) / RISE_TAU_S
        rise_s = widths - RISE_TAU_S * (np.exp(-x0) - np.exp(-x1))
        true_uj = self._level_over(a, b) * np.maximum(rise_s, 0.0)
        gain = np.maximum(
            0.0, self.pd_gain * (1.0 + self.drift_per_hour * (mids - self.drift_t0_s) / 3600)
        )
        noise = np.maximum(0.0, 1.0 + self.noise_fraction * self._noise_for(k))
        measured_uj = true_uj * gain * noise
        rate_uw = measured_uj / widths
        n = widths.size
        events: list[tuple[float, PhysicsEvent]] = []

        # overpower: a run of measured power above 120 % of the setpoint
        over = np.zeros(n, dtype=np.bool_)
        run_after = np.zeros(n)
        if detect_faults and self.has_light and n:
            over = rate_uw > OVERPOWER_RATIO * self.setpoint_uw
            if over.any():
                run = self.over_run_s
                for i in range(n):
                    if over[i]:
                        if run + widths[i] >= OVERPOWER_HOLD_S:
                            events.append(
                                (float(edges[i]) + (OVERPOWER_HOLD_S - run), PhysicsEvent.OVERPOWER)
                            )
                            run_after[i:] = run + widths[i]  # beyond the event: unused
                            break
                        run += widths[i]
                    else:
                        run = 0.0
                    run_after[i] = run

        # thermal: first order towards ambient + rise × mean optical power
        temp0 = self.temp_c
        temp_ss = temp0
        if self.model is not None:
            span = b - a
            mean_w = float(true_uj.sum()) / span / 1e6 if span > 0 else 0.0
            temp_ss = AMBIENT_C + self.model.rise_c_per_w * mean_w
            if detect_faults and temp0 <= OVER_TEMPERATURE_C < temp_ss:
                dt_cross = self.model.thermal_tau_s * math.log(
                    (temp0 - temp_ss) / (OVER_TEMPERATURE_C - temp_ss)
                )
                if a + dt_cross <= b:
                    events.append((a + dt_cross, PhysicsEvent.OVER_TEMPERATURE))

        em = self.emission
        if em is not None:
            if em.t_limit_s <= b:
                events.append((max(a, em.t_limit_s), PhysicsEvent.MAX_DURATION))
            if n:
                cum = em.energy_uj + np.cumsum(measured_uj) * self.integrator_gain
                j = int(np.searchsorted(cum, float(em.energy_budget_uj), side="left"))
                if j < n:
                    step = float(measured_uj[j]) * self.integrator_gain
                    before = float(cum[j]) - step
                    frac = (em.energy_budget_uj - before) / step if step > 0 else 0.0
                    t_cross = float(edges[j]) + min(max(frac, 0.0), 1.0) * float(widths[j])
                    events.append((t_cross, PhysicsEvent.ENERGY_BUDGET))

        self._scan = _Scan(
            a, b, edges, widths, measured_uj, true_uj, rate_uw, over, run_after, temp_ss, temp0
        )
        if not events:
            return None
        return min(events, key=lambda e: (e[0], int(e[1])))

    def _scan_dark(self, a: float, b: float) -> tuple[float, PhysicsEvent] | None:
        """No light (or no time): only cooling, and a backup timer that may run out."""
        self._scan = _DarkScan(a, b)
        em = self.emission
        if em is not None and em.t_limit_s <= b:
            return (max(a, em.t_limit_s), PhysicsEvent.MAX_DURATION)
        return None

    def commit(self, t: float) -> None:
        """Advance the port's state to ``t`` (within the last scan's interval)."""
        sc = self._scan
        self._scan = None
        if isinstance(sc, _DarkScan):
            t = min(max(t, sc.a), sc.b)
            if self.model is not None and t > sc.a:
                self.temp_c = AMBIENT_C + (self.temp_c - AMBIENT_C) * math.exp(
                    -(t - sc.a) / self.model.thermal_tau_s
                )
            if not self.has_light:
                self.over_run_s = 0.0
                self.last_rate_uw = self.last_true_uw = 0.0
            self.t_s = max(self.t_s, t)
            return
        if sc is None or t <= sc.a:
            self.t_s = max(self.t_s, t)
            return
        t = min(t, sc.b)
        n = sc.widths.size
        n_full = int(np.searchsorted(sc.edges[1:], t, side="right"))
        d_meas = float(sc.measured_uj[:n_full].sum())
        d_true = float(sc.true_uj[:n_full].sum())
        run = float(sc.run_after_s[n_full - 1]) if n_full else self.over_run_s
        idx = min(n_full, n - 1) if n else -1
        if n_full < n:
            frac = (t - float(sc.edges[n_full])) / float(sc.widths[n_full])
            if frac > 0:
                d_meas += frac * float(sc.measured_uj[n_full])
                d_true += frac * float(sc.true_uj[n_full])
                run = run + frac * float(sc.widths[n_full]) if sc.over[n_full] else 0.0
        self.pd_total_uj += d_meas
        self.true_total_uj += d_true
        if self.emission is not None:
            self.emission.energy_uj += d_meas * self.integrator_gain
            self.emission.true_energy_uj += d_true
        self.over_run_s = run if self.has_light else 0.0
        if idx >= 0:
            self.last_rate_uw = float(sc.rate_uw[idx])
            self.last_true_uw = float(sc.true_uj[idx] / sc.widths[idx])
        if self.model is not None:
            self.temp_c = sc.temp_ss_c + (sc.temp0_c - sc.temp_ss_c) * math.exp(
                -(t - sc.a) / self.model.thermal_tau_s
            )
        if self.has_light:
            self._forget_noise_before(math.floor((t - self.t_on_s) / ADC_PERIOD_S))
        self.t_s = t

    # -- prediction (for wake-ups; exactness comes from scan, not from these) --------

    def predict(self, now_s: float, detect_faults: bool) -> float | None:
        """Device time of the next likely event, so the simulator can wake for it."""
        times: list[float] = []
        # expected measured power from the present factors (noise-free), so an injected
        # change is predicted at once rather than after the next sample
        rate = self.level_uw() * self.gain_at(now_s) if self.has_light else 0.0
        em = self.emission
        if em is not None:
            times.append(em.t_limit_s)
            counted = rate * self.integrator_gain
            if counted > 0.0:
                times.append(now_s + max(0.0, em.energy_budget_uj - em.energy_uj) / counted)
        if detect_faults and self.has_light:
            if rate > OVERPOWER_RATIO * self.setpoint_uw:
                times.append(now_s + max(0.0, OVERPOWER_HOLD_S - self.over_run_s))
            if self.model is not None:
                temp_ss = AMBIENT_C + self.model.rise_c_per_w * self.level_uw() / 1e6
                if self.temp_c <= OVER_TEMPERATURE_C < temp_ss:
                    times.append(
                        now_s
                        + self.model.thermal_tau_s
                        * math.log((self.temp_c - temp_ss) / (OVER_TEMPERATURE_C - temp_ss))
                    )
        return min(times) if times else None
