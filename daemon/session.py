"""A treatment session: the state machine, the per-port scheduler and its checks.

One :class:`Session` runs a frozen plan. Each logical port has a
:class:`PortRunner` task that walks its steps in order; each step emits until
the host's dose channel says the prescription will be reached by the time a
stop takes effect, then sends EMIT_STOP so that it arrives on time. The
controller's energy budget (+5 %) and max duration (+20 %), and the host's own
backup timer, stand behind it. Every telemetry sample is checked as it
arrives (in the reader's callback, with no task hop); anything wrong goes to
the one :class:`~pbmd.daemon.safety.Supervisor` latch.

Nothing resumes by itself: a trip ends the session; a pause, a lost probe
contact or a released footswitch wait for an operator's action.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog

from pbmd.daemon.controllers import PortMap, PortTarget
from pbmd.daemon.dose import DoseIntegrator
from pbmd.daemon.safety import (
    SafetyLimits,
    Supervisor,
    Trip,
    TripCause,
    interlock_cause,
    stop_reason_cause,
)
from pbmd.drivers import codec
from pbmd.drivers.client import ClientError, LinkClosed, NakReceived, ReplyTimeout

log = structlog.get_logger()

T = TypeVar("T")

SPIN_BEFORE_STOP_S = 0.002
"""The event loop's timers wake up to 1 ms late (epoll's millisecond timeout);
the last 2 ms before a stop are waited out by yielding, not by a timer."""


class SessionState(enum.StrEnum):
    IDLE = "idle"
    READY = "ready"
    ARMED = "armed"
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAULTED = "faulted"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = {SessionState.COMPLETED, SessionState.ABORTED, SessionState.FAULTED,
          SessionState.INTERRUPTED}  # fmt: skip


class PortState(enum.StrEnum):
    WAITING = "waiting"  # before its first step, or between steps
    GATED = "gated"  # waiting for confirmation, contact or footswitch
    EMITTING = "emitting"
    PAUSED = "paused"
    DONE = "done"
    SKIPPED = "skipped"
    STOPPED = "stopped"  # ended by abort or trip


class TargetKind(enum.StrEnum):
    ENERGY = "energy"
    TIME = "time"


@dataclass(frozen=True)
class StepOrder:
    """One step of one port, as the engine executes it (from the frozen plan)."""

    port: int
    index: int
    site: str
    wavelength_nm: int
    mode: codec.EmitMode
    power_uw: int
    pulse_hz: int
    duty_permille: int
    area_cm2: float
    target_kind: TargetKind
    target_energy_uj: float
    target_time_s: float
    planned_time_s: float
    energy_budget_uj: int
    max_duration_ms: int
    confirm_placement: bool = False
    skin_contact: bool = False
    footswitch: bool = False
    blocked_by: frozenset[str] = frozenset()
    irradiance_ceiling_mw_cm2: float = float("inf")
    fluence_ceiling_j_cm2: float = float("inf")
    channel_max_power_uw: int = 0
    label: str = ""

    @property
    def gated(self) -> bool:
        return self.confirm_placement or self.skin_contact or self.footswitch


@dataclass(frozen=True)
class SessionEvent:
    """Something that happened, for watchers, records and dashboards."""

    kind: str
    session_id: str
    message: str
    port: int | None = None
    step: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    utc: float = field(default_factory=time.time)


SessionListener = Callable[[SessionEvent], None]


class Recorder(Protocol):
    """What a session writes as it happens (implemented over the records store)."""

    def session_started(self, session: Session) -> None: ...
    def step_started(self, session: Session, step: StepOrder) -> None: ...
    def emission_started(
        self,
        session: Session,
        step: StepOrder,
        emission_no: int,
        request: codec.EmitStart,
        device_time_us: int | None,
    ) -> None: ...
    def emission_progress(
        self,
        session: Session,
        step: StepOrder,
        emission_no: int,
        host_energy_uj: float,
        controller_energy_uj: int,
        device_time_us: int,
    ) -> None: ...
    def emission_ended(
        self,
        session: Session,
        step: StepOrder,
        emission_no: int,
        host_energy_uj: float,
        stopped: codec.Stopped | None,
        host_stop_cause: str,
    ) -> None: ...
    def step_ended(self, session: Session, step: StepOrder, progress: StepProgress) -> None: ...
    def event(self, event: SessionEvent) -> None: ...
    def session_ended(self, session: Session) -> None: ...
    async def sync(self) -> None: ...


class SessionError(Exception):
    """An operator request that cannot be done now, with what to do instead."""


@dataclass
class StepProgress:
    """Live and final figures of one step (host and controller channels)."""

    order: StepOrder
    integrator: DoseIntegrator
    controller_energy_uj: int = 0
    emissions: int = 0
    outcome: str = "pending"
    stop_causes: list[str] = field(default_factory=list)
    emitting_backup_us: int = 0

    @property
    def host_energy_uj(self) -> float:
        return self.integrator.energy_uj

    @property
    def fraction(self) -> float:
        o = self.order
        if o.target_kind is TargetKind.TIME:
            return min(self.integrator.emitting_time_us / 1e6 / o.target_time_s, 1.0)
        return min(self.integrator.energy_uj / o.target_energy_uj, 1.0)


class _Emission:
    """State of one EMIT_START … STOPPED on one port."""

    def __init__(
        self,
        number: int,
        request: codec.EmitStart,
        start_host_s: float,
        start_device_us: float,
        energy_before_uj: float,
    ) -> None:
        self.number = number
        self.request = request
        self.start_host_s = start_host_s
        self.start_device_us = start_device_us
        self.energy_before_uj = energy_before_uj
        self.samples = 0
        self.deviation_since_us: int | None = None
        self.stop_at_host_s: float | None = None
        self.stop_due = asyncio.Event()
        self.ended_by_device: int | None = None  # stop reason when the controller ended it
        self.ended = asyncio.Event()
        self.stop_requested = False
        self.seen_emitting = False
        self.timer: asyncio.TimerHandle | None = None
        self.last_progress_host_s = start_host_s


class PortRunner:
    """Runs one logical port's steps in order."""

    def __init__(self, session: Session, target: PortTarget, steps: Sequence[StepOrder]) -> None:
        self.session = session
        self.target = target
        self.port = target.logical_port
        self.steps = list(steps)
        self.state = PortState.WAITING
        self.progress: list[StepProgress] = [
            StepProgress(s, DoseIntegrator(s.area_cm2)) for s in self.steps
        ]
        self.current: int | None = None
        self._emission: _Emission | None = None
        self._confirmed = asyncio.Event()
        self._resume = asyncio.Event()
        self._pause_requested = False
        self._gate_changed = asyncio.Event()
        self.wait_reason = ""
        self._remove_listener = target.controller.add_sample_listener(self._on_sample)

    # ------------------------------------------------------------ operator

    def confirm(self) -> None:
        if self.state is not PortState.GATED:
            raise SessionError(f"port {self.port} is not waiting for a confirmation")
        self._confirmed.set()

    def request_pause(self) -> None:
        self._pause_requested = True
        self._resume.clear()
        em = self._emission
        if em is not None:
            em.stop_due.set()
        self._gate_changed.set()

    def request_resume(self) -> None:
        if self.state is not PortState.PAUSED and not self._pause_requested:
            raise SessionError(f"port {self.port} is not paused")
        self._pause_requested = False
        self._resume.set()
        self._gate_changed.set()

    def detach(self) -> None:
        self._remove_listener()

    # ------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "port": self.port,
            "state": self.state.value,
            "wait_reason": self.wait_reason or None,
        }
        if self.current is None:
            return out
        prog = self.progress[self.current]
        o = prog.order
        integ = prog.integrator
        sample = self.target.controller.sample(self.target.device_port)
        power_uw = sample.measured_power_uw if sample is not None and sample.emitting else 0
        rate = integ.last_power_uw or o.power_uw
        if o.target_kind is TargetKind.TIME:
            remaining_s = max(o.target_time_s - integ.emitting_time_us / 1e6, 0.0)
        else:
            remaining_s = max(o.target_energy_uj - integ.energy_uj, 0.0) / max(rate, 1.0)
        out.update(
            step=o.index,
            steps=len(self.steps),
            site=o.site,
            label=o.label,
            wavelength_nm=o.wavelength_nm,
            mode="pulsed" if o.mode == codec.EmitMode.PULSED else "continuous",
            pulse_hz=o.pulse_hz,
            setpoint_mw=o.power_uw / 1000,
            power_mw=power_uw / 1000,
            irradiance_mw_cm2=integ.irradiance_mw_cm2(power_uw),
            energy_j=integ.energy_j,
            controller_energy_j=prog.controller_energy_uj / 1e6 + self._running_ctrl_j(),
            fluence_j_cm2=integ.fluence_j_cm2,
            target_kind=o.target_kind.value,
            target_energy_j=o.target_energy_uj / 1e6,
            target_fluence_j_cm2=o.target_energy_uj / 1e6 / o.area_cm2,
            target_time_s=o.target_time_s,
            elapsed_s=integ.emitting_time_us / 1e6,
            remaining_s=remaining_s,
            fraction=prog.fraction,
            temperature_c=sample.temp_centi_c / 100 if sample is not None else None,
            contact=sample.contact if sample is not None else None,
        )
        return out

    def _running_ctrl_j(self) -> float:
        em = self._emission
        sample = self.target.controller.sample(self.target.device_port)
        if em is None or sample is None:
            return 0.0
        return sample.delivered_uj / 1e6

    # ------------------------------------------------------------ the run

    async def run(self) -> None:
        try:
            for i, order in enumerate(self.steps):
                self.current = i
                prog = self.progress[i]
                blocked = order.blocked_by & self.session.contraindications
                if blocked:
                    prog.outcome = "skipped"
                    reason = ", ".join(sorted(blocked))
                    prog.stop_causes.append(f"blocked by contraindication: {reason}")
                    self.session.emit(
                        "step_skipped",
                        f"step blocked by {reason}",
                        self.port,
                        order.index,
                        {"contraindications": sorted(blocked)},
                    )
                    self.session.recorder.step_ended(self.session, order, prog)
                    continue
                await self._run_step(prog)
            self.state = PortState.DONE
            self.wait_reason = ""
        finally:
            self.detach()

    async def _run_step(self, prog: StepProgress) -> None:
        order = prog.order
        session = self.session
        session.recorder.step_started(session, order)
        session.emit(
            "step_started",
            f"{order.label or order.site}: {order.wavelength_nm} nm",
            self.port,
            order.index,
            {"site": order.site, "wavelength_nm": order.wavelength_nm},
        )
        self._confirmed.clear()
        while True:
            await self._gate(order)
            outcome = await self._emit_once(prog)
            if outcome == "done":
                break
            # paused, contact lost or footswitch released: wait for the operator
        prog.outcome = "completed"
        session.recorder.step_ended(session, order, prog)
        await session.recorder.sync()
        session.emit(
            "step_completed",
            f"delivered {prog.host_energy_uj / 1e6:.3f} J "
            f"(controller {prog.controller_energy_uj / 1e6:.3f} J)",
            self.port,
            order.index,
            {
                "energy_j": prog.host_energy_uj / 1e6,
                "controller_energy_j": prog.controller_energy_uj / 1e6,
                "prescribed_energy_j": order.target_energy_uj / 1e6,
                "fluence_j_cm2": prog.integrator.fluence_j_cm2,
            },
        )

    async def _gate(self, order: StepOrder) -> None:
        """Wait until the operator and the applicator allow emission."""
        while True:
            reasons = []
            if self._pause_requested:
                reasons.append("paused by operator")
            if order.confirm_placement and not self._confirmed.is_set():
                reasons.append("confirm placement")
            sample = self.target.controller.sample(self.target.device_port)
            if order.skin_contact and not (sample is not None and sample.contact):
                reasons.append("waiting for skin contact")
            tele = self.target.controller.telemetry
            if order.footswitch and not (
                tele is not None and tele.interlocks & codec.Interlock.FOOTSWITCH
            ):
                reasons.append("press the footswitch")
            if not reasons:
                self.wait_reason = ""
                return
            self.state = PortState.PAUSED if self._pause_requested else PortState.GATED
            reason = "; ".join(reasons)
            if reason != self.wait_reason:
                self.wait_reason = reason
                self.session.emit(
                    "port_waiting", reason, self.port, order.index, {"reasons": reasons}
                )
            self._gate_changed.clear()
            waits = [
                asyncio.ensure_future(self._gate_changed.wait()),
                asyncio.ensure_future(self._confirmed.wait()),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
                await asyncio.gather(*waits, return_exceptions=True)

    def gate_inputs_changed(self) -> None:
        """Telemetry changed contact or footswitch: re-evaluate a waiting gate."""
        self._gate_changed.set()

    async def _emit_once(self, prog: StepProgress) -> str:
        order = prog.order
        session = self.session
        integ = prog.integrator
        session.check_before_emission(order)
        # Remaining dose and what is left of the backup timer (it keeps its
        # reading across pauses).
        backup_total_us = order.planned_time_s * 1e6 * (1 + session.limits.backup_timer_fraction)
        backup_left_us = backup_total_us - integ.emitting_time_us
        if order.target_kind is TargetKind.TIME:
            remaining_uj = (
                order.power_uw * max(order.target_time_s * 1e6 - integ.emitting_time_us, 0) / 1e6
            )
        else:
            remaining_uj = max(order.target_energy_uj - integ.energy_uj, 0.0)
        if remaining_uj <= 0 or backup_left_us <= 0:
            return "done"
        budget_uj = remaining_uj + order.target_energy_uj * session.limits.energy_budget_fraction
        request = codec.EmitStart(
            port=self.target.device_port,
            wavelength_nm=order.wavelength_nm,
            mode=int(order.mode),
            power_uw=order.power_uw,
            pulse_hz=order.pulse_hz if order.mode == codec.EmitMode.PULSED else 0,
            duty_permille=order.duty_permille if order.mode == codec.EmitMode.PULSED else 1000,
            energy_budget_uj=max(int(budget_uj), 1),
            max_duration_ms=max(int(backup_left_us / 1000), 1),
        )
        ctrl = self.target.controller
        prog.emissions += 1
        clock = ctrl.clock
        now = time.monotonic()
        start_dev = clock.device_time_now_us(now) if clock.ready else 0.0
        em = _Emission(prog.emissions, request, now, start_dev, integ.energy_uj)
        self._emission = em
        if ctrl.telemetry is not None:
            # The next sample's mean covers the interval since the last one.
            integ.rebase(ctrl.telemetry.device_time_us)
        try:
            await session.command(ctrl.client.emit_start(request))
        except NakReceived as exc:
            self._emission = None
            if exc.code == codec.NakError.NO_SKIN_CONTACT:
                # Contact went between the gate and the request: back to the gate.
                prog.emissions -= 1
                return "contact"
            session.trip(TripCause.UNEXPECTED_STOP, f"EMIT_START refused: {exc}", self.port)
            raise
        self.state = PortState.EMITTING
        self.wait_reason = ""
        session.recorder.emission_started(
            session, order, em.number, request, int(start_dev) if clock.ready else None
        )
        session.emit(
            "emission_started",
            f"{order.wavelength_nm} nm at {order.power_uw / 1000:.1f} mW",
            self.port,
            order.index,
            {
                "emission": em.number,
                "power_mw": order.power_uw / 1000,
                "energy_budget_j": request.energy_budget_uj / 1e6,
                "max_duration_ms": request.max_duration_ms,
            },
        )
        try:
            host_cause = await self._until_stop(em, prog)
        finally:
            if em.timer is not None:
                em.timer.cancel()
        stopped: codec.Stopped | None = None
        if em.ended_by_device is None:
            em.stop_requested = True
            stopped = await session.command(ctrl.client.emit_stop(self.target.device_port))
            if stopped.stop_reason != codec.StopReason.HOST_STOP:
                em.ended_by_device = stopped.stop_reason
        else:
            stopped = await session.command(ctrl.client.emit_stop(self.target.device_port))
        # Read back: the next sample arrived after STOPPED was sent, so it must
        # show the port dark; it also carries the tail of the emission's energy.
        try:
            await ctrl.next_sample(session.readback_timeout_s)
        except TimeoutError:
            session.trip(TripCause.TELEMETRY_STALE, "no telemetry after EMIT_STOP", self.port)
            raise
        sample = ctrl.sample(self.target.device_port)
        if sample is not None and sample.emitting:
            session.trip(TripCause.STUCK_EMISSION, "port still emitting after EMIT_STOP", self.port)
            raise _Stopped()
        self._emission = None
        prog.controller_energy_uj += stopped.delivered_uj
        if host_cause == "dose reached" and order.target_kind is TargetKind.ENERGY:
            # Learn how late the stop landed, by the controller's own count.
            over_uj = prog.controller_energy_uj - order.target_energy_uj
            if order.power_uw > 0 and ctrl.clock.ratio > 0:
                ctrl.learn_stop_lateness(over_uj / order.power_uw / ctrl.clock.ratio)
        emission_host_uj = integ.energy_uj - em.energy_before_uj
        session.recorder.emission_ended(
            session, order, em.number, emission_host_uj, stopped, host_cause
        )
        self._check_channels(emission_host_uj, stopped.delivered_uj, final=True)
        session.emit(
            "emission_ended",
            host_cause,
            self.port,
            order.index,
            {
                "emission": em.number,
                "energy_j": emission_host_uj / 1e6,
                "controller_energy_j": stopped.delivered_uj / 1e6,
                "duration_ms": stopped.duration_ms,
                "stop_reason": codec.describe(codec.StopReason, stopped.stop_reason),
            },
        )
        if em.ended_by_device is not None and em.ended_by_device not in _OPERATOR_REASONS:
            cause = stop_reason_cause(em.ended_by_device)
            session.trip(
                cause,
                "controller ended the emission: "
                + codec.describe(codec.StopReason, em.ended_by_device),
                self.port,
            )
            raise _Stopped()
        if host_cause == "dose reached":
            return "done"
        if em.ended_by_device == codec.StopReason.CONTACT_LOST:
            prog.stop_causes.append("skin contact lost")
            self._confirmed.clear()  # placement must be confirmed again
            self._pause_requested = False
            self.state = PortState.GATED
            return "contact"
        if host_cause == "footswitch released":
            prog.stop_causes.append(host_cause)
            self.state = PortState.GATED
            return "footswitch"
        prog.stop_causes.append("paused by operator")
        self.state = PortState.PAUSED
        session.emit(
            "port_paused",
            "paused; delivered dose kept",
            self.port,
            order.index,
            {"energy_j": integ.energy_j},
        )
        return "paused"

    async def _until_stop(self, em: _Emission, prog: StepProgress) -> str:
        """Wait until the stop is due (dose, pause, footswitch) or the device ended it."""
        while True:
            stop_due = asyncio.ensure_future(em.stop_due.wait())
            ended = asyncio.ensure_future(em.ended.wait())
            try:
                await asyncio.wait([stop_due, ended], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_due.cancel()
                ended.cancel()
                await asyncio.gather(stop_due, ended, return_exceptions=True)
            if em.ended.is_set():
                return "ended by controller"
            if self._pause_requested:
                return "paused by operator"
            if self._footswitch_released(prog.order):
                return "footswitch released"
            if em.stop_at_host_s is None:
                em.stop_due.clear()
                continue
            # The last stretch: yield until the stop time so it goes out on time.
            while time.monotonic() < em.stop_at_host_s and not em.ended.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0)
            if em.ended.is_set():
                return "ended by controller"
            return "dose reached"

    def _footswitch_released(self, order: StepOrder) -> bool:
        tele = self.target.controller.telemetry
        return (
            order.footswitch
            and tele is not None
            and not (tele.interlocks & codec.Interlock.FOOTSWITCH)
        )

    # --------------------------------------------------- telemetry (reader)

    def _on_sample(self, t: codec.Telemetry, host_s: float) -> None:
        """Every sample: integrate, check, and schedule the stop. Never blocks."""
        dev_port = self.target.device_port
        if dev_port > len(t.ports):
            return
        sample = t.ports[dev_port - 1]
        if self.current is not None and self.state in (PortState.GATED, PortState.PAUSED):
            self.gate_inputs_changed()
        em = self._emission
        if em is None or self.current is None:
            return
        prog = self.progress[self.current]
        order = prog.order
        integ = prog.integrator
        integ.add(t.device_time_us, sample.measured_power_uw, sample.emitting)
        if sample.emitting:
            # Until the port shows emitting, delivered_uj still holds the
            # previous emission's value (ICD §5a): count and check from here.
            em.seen_emitting = True
        if not em.seen_emitting:
            return
        em.samples += 1
        session = self.session
        if session.supervisor.tripped is not None or (em.stop_requested and not sample.emitting):
            if not sample.emitting:
                self._check_channels(integ.energy_uj - em.energy_before_uj, sample.delivered_uj)
            return
        # Ceilings: measured power, irradiance, fluence per site and wavelength.
        power = sample.measured_power_uw
        if order.channel_max_power_uw and power > order.channel_max_power_uw * 1.05:
            session.trip(
                TripCause.POWER_CEILING,
                f"{power / 1000:.1f} mW measured, "
                f"applicator maximum {order.channel_max_power_uw / 1000:.1f} mW",
                self.port,
            )
            return
        irradiance = integ.irradiance_mw_cm2(power)
        if irradiance > order.irradiance_ceiling_mw_cm2:
            session.trip(
                TripCause.IRRADIANCE_CEILING,
                f"{irradiance:.1f} mW/cm² measured, "
                f"ceiling {order.irradiance_ceiling_mw_cm2:.1f} mW/cm²",
                self.port,
            )
            return
        site_fluence = session.site_fluence_j_cm2(order.site, order.wavelength_nm)
        if site_fluence > order.fluence_ceiling_j_cm2:
            session.trip(
                TripCause.FLUENCE_CEILING,
                f"{site_fluence:.2f} J/cm² at {order.site} "
                f"{order.wavelength_nm} nm, ceiling {order.fluence_ceiling_j_cm2} J/cm²",
                self.port,
            )
            return
        # Measured vs setpoint, after the first full interval (the rise is ~1 ms).
        if sample.emitting and em.samples >= 2 and order.power_uw > 0:
            deviation = abs(power - order.power_uw) / order.power_uw
            if deviation > session.limits.power_deviation_fraction:
                if em.deviation_since_us is None:
                    em.deviation_since_us = integ_prev(t, session.telemetry_period_us())
                if t.device_time_us - em.deviation_since_us >= (
                    session.limits.power_deviation_grace_us
                ):
                    session.trip(
                        TripCause.POWER_DEVIATION,
                        f"{power / 1000:.1f} mW measured, setpoint {order.power_uw / 1000:.1f} mW",
                        self.port,
                    )
                    return
            else:
                em.deviation_since_us = None
        # The two dose channels of the running emission must agree.
        self._check_channels(integ.energy_uj - em.energy_before_uj, sample.delivered_uj)
        if session.supervisor.tripped is not None:
            return
        # Host backup timer.
        backup_us = order.planned_time_s * 1e6 * (1 + session.limits.backup_timer_fraction)
        if integ.emitting_time_us > backup_us:
            session.trip(
                TripCause.BACKUP_CHANNEL_STOP,
                "host backup timer expired before the prescribed dose was measured",
                self.port,
            )
            return
        if host_s - em.last_progress_host_s >= session.progress_interval_s:
            em.last_progress_host_s = host_s
            session.recorder.emission_progress(
                session,
                order,
                em.number,
                integ.energy_uj - em.energy_before_uj,
                sample.delivered_uj,
                t.device_time_us,
            )
        if self._footswitch_released(order):
            em.stop_due.set()
            return
        if not sample.emitting or em.stop_requested:
            # Ended (by us, or by the controller: EMISSION_ENDED says why).
            return
        self._schedule_stop(em, prog, t, host_s)

    def _schedule_stop(
        self, em: _Emission, prog: StepProgress, t: codec.Telemetry, host_s: float
    ) -> None:
        order = prog.order
        integ = prog.integrator
        clock = self.target.controller.clock
        if order.target_kind is TargetKind.TIME:
            left_us = order.target_time_s * 1e6 - integ.emitting_time_us
        else:
            left_us = integ.device_time_to_reach_us(order.target_energy_uj)
        if left_us == float("inf"):
            return
        reach_device_us = t.device_time_us + max(left_us, 0.0)
        # Send so that the frame arrives when the device clock reaches the dose.
        ctrl = self.target.controller
        stop_at = clock.host_time_at(reach_device_us) - clock.one_way_latency_s - ctrl.stop_lead_s
        horizon = host_s + 2.5 * self.session.telemetry_period_s
        if stop_at > horizon:
            return
        em.stop_at_host_s = stop_at
        if em.timer is not None:
            em.timer.cancel()
        loop = asyncio.get_running_loop()
        wake = stop_at - SPIN_BEFORE_STOP_S
        if wake <= loop.time():
            em.stop_due.set()
        else:
            em.timer = loop.call_at(wake, em.stop_due.set)

    def _check_channels(self, host_uj: float, controller_uj: int, final: bool = False) -> None:
        limits = self.session.limits
        allowed = max(
            limits.dose_disagreement_fraction * controller_uj, limits.dose_disagreement_floor_uj
        )
        if abs(host_uj - controller_uj) > allowed:
            self.session.trip(
                TripCause.DOSE_CHANNELS_DISAGREE,
                f"host {host_uj / 1e6:.3f} J vs controller {controller_uj / 1e6:.3f} J"
                + (" at the end of the emission" if final else ""),
                self.port,
            )

    def on_emission_ended(self, reason: int) -> None:
        """EMISSION_ENDED for this port (from the event listener)."""
        em = self._emission
        if em is None or em.stop_requested:
            return
        if self.session.supervisor.tripped is not None or self.session.aborting:
            return  # our own ALL_OFF ended it; the session is already ending
        em.ended_by_device = reason
        em.ended.set()


_OPERATOR_REASONS = {codec.StopReason.HOST_STOP, codec.StopReason.CONTACT_LOST}


def integ_prev(t: codec.Telemetry, period_us: float) -> int:
    """Start of the interval a sample covers (its device time minus one period)."""
    return int(t.device_time_us - period_us)


class _Stopped(Exception):
    """A port runner ends because the session was tripped or aborted."""


class Session:
    """One treatment: a frozen plan on a set of ports, from arming to its end."""

    def __init__(
        self,
        *,
        plan_hash: str,
        verify_plan: Callable[[], bool],
        steps: Mapping[int, Sequence[StepOrder]],
        port_map: PortMap,
        supervisor: Supervisor,
        recorder: Recorder,
        limits: SafetyLimits,
        telemetry_hz: int,
        patient_ref: str,
        contraindications: frozenset[str],
        protocol_id: str,
        protocol_version: int,
        meta: Mapping[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or str(uuid.uuid4())
        self.plan_hash = plan_hash
        self._verify_plan = verify_plan
        self.port_map = port_map
        self.supervisor = supervisor
        self.recorder = recorder
        self.limits = limits
        self.telemetry_hz = telemetry_hz
        self.patient_ref = patient_ref
        self.contraindications = contraindications
        self.protocol_id = protocol_id
        self.protocol_version = protocol_version
        self.meta = dict(meta or {})
        self.token = secrets.randbelow(0xFFFF_FFFE) + 1
        self.state = SessionState.IDLE
        self.started_utc: float | None = None
        self.ended_utc: float | None = None
        self.cause_code: str | None = None
        self.cause_message: str | None = None
        self.progress_interval_s = 1.0
        self.readback_timeout_s = max(0.25, 6.0 / telemetry_hz)
        self.runners = {
            port: PortRunner(self, port_map[port], list(port_steps))
            for port, port_steps in sorted(steps.items())
        }
        self._listeners: list[SessionListener] = []
        self._done = asyncio.Event()
        self.aborting = False
        self._unsubscribe: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._stale_task: asyncio.Task[None] | None = None

    # --------------------------------------------------------------- info

    @property
    def telemetry_period_s(self) -> float:
        return 1.0 / self.telemetry_hz

    def telemetry_period_us(self) -> float:
        """One sample interval in device time, at the measured clock ratio."""
        ctrl = next(iter(self.port_map.values())).controller
        return self.telemetry_period_s * ctrl.clock.ratio * 1e6

    def site_fluence_j_cm2(self, site: str, wavelength_nm: int) -> float:
        total = 0.0
        for runner in self.runners.values():
            for prog in runner.progress:
                o = prog.order
                if o.site == site and o.wavelength_nm == wavelength_nm:
                    total += prog.integrator.fluence_j_cm2
        return total

    def status(self) -> dict[str, Any]:
        trip = self.supervisor.tripped
        return {
            "session_id": self.id,
            "state": self.state.value,
            "protocol_id": self.protocol_id,
            "protocol_version": self.protocol_version,
            "plan_hash": self.plan_hash,
            "patient_ref": self.patient_ref,
            "started_utc": self.started_utc,
            "ended_utc": self.ended_utc,
            "cause_code": self.cause_code,
            "cause_message": self.cause_message,
            "trip": trip.describe() if trip is not None else None,
            "ports": [r.status() for r in self.runners.values()],
        }

    def add_listener(self, listener: SessionListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def emit(
        self,
        kind: str,
        message: str,
        port: int | None = None,
        step: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        event = SessionEvent(kind, self.id, message, port, step, dict(data or {}))
        log.info(
            "session.event", kind=kind, session_id=self.id, port=port, step=step, message=message
        )
        try:
            self.recorder.event(event)
        except Exception:
            log.exception("session.record_event_failed")
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("session.listener_failed")

    def _set_state(self, state: SessionState, cause: str) -> None:
        previous = self.state
        self.state = state
        self.emit(
            "state",
            f"{previous.value} → {state.value}: {cause}",
            data={"from": previous.value, "to": state.value, "cause": cause},
        )

    # ---------------------------------------------------------- operator

    def confirm(self, port: int) -> None:
        self._runner(port).confirm()
        self.emit("confirmed", "placement confirmed by operator", port)

    def pause(self, port: int | None = None) -> None:
        self._require_running("pause")
        for runner in self._runners(port):
            runner.request_pause()
        self.emit("pause_requested", "pause requested by operator", port)

    def resume(self, port: int | None = None) -> None:
        self._require_running("resume")
        for runner in self._runners(port):
            runner.request_resume()
        self.emit("resumed", "resumed by operator", port)

    async def abort(self, reason: str = "aborted by operator") -> None:
        """Operator abort: ALL_OFF at once, then the session ends as aborted."""
        if self.state.final:
            raise SessionError(f"session already {self.state.value}")
        self.aborting = True
        self.cause_code = "A001"
        self.cause_message = reason
        await asyncio.gather(
            *(c.all_off() for c in self.port_map.controllers()), return_exceptions=True
        )
        self.emit("abort", reason)
        if self._task is not None:
            self._task.cancel()
        await self.wait()

    def _require_running(self, what: str) -> None:
        if self.state is not SessionState.RUNNING:
            raise SessionError(f"cannot {what}: session is {self.state.value}")

    def _runner(self, port: int) -> PortRunner:
        try:
            return self.runners[port]
        except KeyError:
            raise SessionError(
                f"port {port} is not part of this session (ports {sorted(self.runners)})"
            ) from None

    def _runners(self, port: int | None) -> list[PortRunner]:
        return list(self.runners.values()) if port is None else [self._runner(port)]

    # ------------------------------------------------------------ checks

    def trip(self, cause: TripCause, detail: str, port: int | None = None) -> None:
        self.supervisor.trip(cause, detail, port)

    def check_before_emission(self, order: StepOrder) -> None:
        if not self._verify_plan():
            self.trip(
                TripCause.PLAN_HASH_MISMATCH, f"plan {self.plan_hash[:12]} changed", order.port
            )
            raise _Stopped()
        if self.supervisor.tripped is not None or self.aborting:
            raise _Stopped()

    async def command(self, aw: Awaitable[T]) -> T:
        """Await a controller request; a late reply or lost link trips the session."""
        try:
            return await aw
        except ReplyTimeout as exc:
            self.trip(TripCause.REPLY_TIMEOUT, str(exc))
            raise _Stopped() from exc
        except LinkClosed as exc:
            self.trip(TripCause.LINK_LOST, str(exc))
            raise _Stopped() from exc

    # --------------------------------------------------------------- run

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"session-{self.id[:8]}")
        return self._task

    async def wait(self) -> SessionState:
        await self._done.wait()
        return self.state

    async def _run(self) -> None:
        try:
            await self._main()
        except asyncio.CancelledError:
            if not self.aborting and self.supervisor.tripped is None:
                self.trip(TripCause.INTERNAL_ERROR, "session task cancelled")
        except Exception as exc:  # a bug must still end with emission off
            if self.supervisor.tripped is None and not self.aborting:
                log.exception("session.crashed")
                self.trip(TripCause.INTERNAL_ERROR, repr(exc))
        finally:
            await self._finish()

    async def _main(self) -> None:
        self._unsubscribe.append(self.supervisor.add_listener(self._on_trip))
        for ctrl in self.port_map.controllers():
            client = ctrl.client
            self._unsubscribe += [
                client.add_event_listener(functools.partial(self._on_event, ctrl.name)),
                client.add_link_lost_listener(functools.partial(self._on_link_lost, ctrl.name)),
                client.add_reply_timeout_listener(
                    functools.partial(self._on_reply_timeout, ctrl.name)
                ),
                ctrl.add_sample_listener(functools.partial(self._check_controller, ctrl.name)),
            ]
        self._stale_task = asyncio.create_task(self._watch_staleness(), name="telemetry-stale")
        # READY: plan hash, interlocks, no fault.
        if not self._verify_plan():
            self.trip(TripCause.PLAN_HASH_MISMATCH, "plan changed before arming")
            raise _Stopped()
        self.started_utc = time.time()
        self.recorder.session_started(self)
        await self.recorder.sync()
        self._set_state(SessionState.READY, "plan verified, controller ready")
        # ARMED: emission indicator on, emission delay.
        for ctrl in self.port_map.controllers():
            await self.command(ctrl.client.arm(self.token))
        self._set_state(SessionState.ARMED, "armed; emission delay running")
        await self._wait_armed_ready()
        self._set_state(SessionState.RUNNING, "emission delay elapsed")
        async with asyncio.TaskGroup() as group:
            for runner in self.runners.values():
                group.create_task(runner.run(), name=f"port-{runner.port}")

    async def _wait_armed_ready(self) -> None:
        for ctrl in self.port_map.controllers():
            while True:
                tele = ctrl.telemetry
                if tele is not None and tele.state == codec.ControllerState.ARMED_READY:
                    break
                try:
                    await ctrl.next_sample(self.readback_timeout_s * 20)
                except TimeoutError:
                    self.trip(TripCause.TELEMETRY_STALE, "no telemetry while arming")
                    raise _Stopped() from None
                if self.supervisor.tripped is not None:
                    raise _Stopped()

    async def _watch_staleness(self) -> None:
        """Telemetry older than N sample periods is a link fault (ICD §6)."""
        limit_s = self.limits.stale_telemetry_periods * self.telemetry_period_s
        while True:
            now = time.monotonic()
            oldest = min((c.telemetry_host_s or now) for c in self.port_map.controllers())
            age = now - oldest
            if age > limit_s:
                self.trip(
                    TripCause.TELEMETRY_STALE,
                    f"last telemetry {age * 1000:.0f} ms ago (limit {limit_s * 1000:.0f} ms)",
                )
                return
            await asyncio.sleep(max(limit_s - age, 0.001) + 0.001)

    def _on_link_lost(self, name: str, exc: BaseException) -> None:
        self.trip(TripCause.LINK_LOST, f"{name}: {exc}")

    def _on_reply_timeout(self, name: str, exc: BaseException) -> None:
        """A missed reply deadline is a link fault (ICD §6), heartbeats included."""
        if not self.state.final:
            self.trip(TripCause.REPLY_TIMEOUT, f"{name}: {exc}")

    def _check_controller(self, name: str, t: codec.Telemetry, host_s: float = 0.0) -> None:
        if self.state.final or self.state is SessionState.IDLE:
            return
        if t.state == codec.ControllerState.FAULT or t.fault_code:
            self.trip(
                TripCause.CONTROLLER_FAULT,
                f"{name}: fault {codec.describe(codec.FaultCode, t.fault_code)}",
            )
            return
        cause = interlock_cause(t.interlocks)
        if cause is not None:
            self.trip(cause, f"{name}: interlock bits {t.interlocks:04b}")

    def _on_event(self, controller: str, ev: codec.Event) -> None:
        data = {
            "controller": controller,
            "code": codec.describe(codec.EventCode, ev.code),
            "value": ev.value,
            "device_time_us": ev.device_time_us,
        }
        if ev.code == codec.EventCode.EMISSION_ENDED:
            for runner in self.runners.values():
                if (
                    runner.target.controller.name == controller
                    and runner.target.device_port == ev.port
                ):
                    runner.on_emission_ended(ev.value)
        elif ev.code == codec.EventCode.FAULT:
            self.trip(
                TripCause.CONTROLLER_FAULT,
                f"{controller}: {codec.describe(codec.FaultCode, ev.value)}",
            )
        elif ev.code == codec.EventCode.WATCHDOG_EXPIRED:
            self.trip(
                TripCause.CONTROLLER_FAULT,
                f"{controller}: watchdog expired after {ev.value} ms of silence",
            )
        elif ev.code == codec.EventCode.INTERLOCK_CHANGED:
            cause = interlock_cause(ev.value)
            if cause is not None:
                self.trip(cause, f"{controller}: interlock bits {ev.value:04b}")
        elif ev.code == codec.EventCode.APPLICATOR_CHANGED:
            self.trip(
                TripCause.APPLICATOR_REMOVED,
                f"{controller} port {ev.port}: applicator changed to kind {ev.value}",
            )
        elif ev.code == codec.EventCode.CONTACT_CHANGED:
            for runner in self.runners.values():
                runner.gate_inputs_changed()
        self.emit("controller_event", f"{data['code']} value {ev.value}", data=data)

    def _on_trip(self, trip: Trip) -> None:
        """Emission is already off (the supervisor sent ALL_OFF first)."""
        if self.cause_code is None:
            self.cause_code = trip.cause.code
            self.cause_message = trip.describe()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _finish(self) -> None:
        if self._stale_task is not None:
            self._stale_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stale_task
        trip = self.supervisor.tripped
        if trip is not None:
            # Wait for the supervisor's ALL_OFF and read-back before closing out.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.supervisor.wait_done(), 5.0)
            self.cause_code = trip.cause.code
            self.cause_message = trip.describe()
            final = SessionState.FAULTED
        elif self.aborting:
            final = SessionState.ABORTED
        else:
            final = SessionState.COMPLETED
        for runner in self.runners.values():
            runner.detach()
            if runner.state not in (PortState.DONE, PortState.SKIPPED):
                runner.state = PortState.STOPPED
            if runner.current is not None:
                prog = runner.progress[runner.current]
                if prog.outcome == "pending":
                    prog.outcome = "stopped"
                    prog.stop_causes.append(self.cause_message or final.value)
                    # Take what the controller counted for a running emission.
                    sample = runner.target.controller.sample(runner.target.device_port)
                    em = runner._emission
                    if em is not None and sample is not None:
                        prog.controller_energy_uj += sample.delivered_uj
                    with contextlib.suppress(Exception):
                        self.recorder.step_ended(self, prog.order, prog)
        # Disarm: emission indicator off. A failure here is recorded, not raised.
        for ctrl in self.port_map.controllers():
            try:
                await ctrl.client.disarm()
            except (ClientError, OSError) as exc:
                self.emit("disarm_failed", f"{ctrl.name}: {exc}")
        self.ended_utc = time.time()
        self._set_state(final, self.cause_message or final.value)
        try:
            self.recorder.session_ended(self)
            await self.recorder.sync()
        except Exception:
            log.exception("session.record_end_failed")
        for undo in self._unsubscribe:
            undo()
        self._unsubscribe.clear()
        self._done.set()
