"""A treatment session: the state machine, the per-port scheduler and its checks.

One :class:`Session` runs a frozen plan. Each logical port has a
:class:`PortRunner` task that walks its steps in order; each step emits until
the host's dose channel says the prescription will be reached by the time a
stop takes effect, then sends EMIT_STOP so that it arrives on time. The
controller's energy budget (+5 %) and max duration (+20 %), and the host's own
backup timer, stand behind it. Every telemetry sample is checked as it
arrives (in the reader's callback, with no task hop); anything wrong goes to
the one :class:`~pbmd.daemon.core.safety.Supervisor` latch.

Nothing resumes by itself: a trip ends the session; a pause, a lost probe
contact or a released footswitch wait for an operator's action.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog

from pbmd.daemon.core.controllers import PortMap, PortTarget, port_lit
from pbmd.daemon.core.dose import DoseIntegrator
from pbmd.daemon.core.safety import (
    EndCause,
    SafetyLimits,
    Supervisor,
    Trip,
    TripCause,
    interlock_cause,
    stop_reason_cause,
)
from pbmd.drivers import codec
from pbmd.drivers.client import (
    ClientError,
    EmissionInhibited,
    LinkClosed,
    NakReceived,
    ReplyTimeout,
)

log = structlog.get_logger()

T = TypeVar("T")

_EMITTING = int(codec.PortFlag.EMITTING)

SPIN_BEFORE_STOP_S = 0.002
"""The event loop's timers wake up to 1 ms late (epoll's millisecond timeout);
the last 2 ms before a stop are waited out by yielding, not by a timer."""


RECANCEL_INTERVAL_S = 0.25
"""While a trip or an abort waits for the session's work to stop, how often the
work is cancelled again (emission is already off: this bounds a hang, not a dose)."""


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
    backup_time_s: float | None = None
    """Host backup timer (the step's max_time_s); None: planned time + 20 %."""

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


class RecordingFailed(Exception):
    """The recorder could not make a record durable (raised by Recorder.sync)."""


@dataclass
class StepProgress:
    """Live and final figures of one step (host and controller channels)."""

    order: StepOrder
    integrator: DoseIntegrator
    controller_energy_uj: int = 0
    emissions: int = 0
    outcome: str = "pending"
    stop_causes: list[str] = field(default_factory=list)
    emitted_us: int = 0
    """Device time the finished emissions of this step lasted (the controller's
    STOPPED durations): the backup timer's reading, kept across pauses."""
    running_us: float = 0.0
    """Device time the running emission has lasted so far (0 when none runs)."""

    @property
    def host_energy_uj(self) -> float:
        return self.integrator.energy_uj

    @property
    def emitting_us(self) -> float:
        return self.emitted_us + self.running_us

    @property
    def fraction(self) -> float:
        o = self.order
        if o.target_kind is TargetKind.TIME:
            return min(self.emitting_us / 1e6 / o.target_time_s, 1.0)
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
        """Device time the emission began (estimated from the EMIT_START round trip)."""
        self.energy_before_uj = energy_before_uj
        self.samples = 0
        self.deviation_since_us: int | None = None
        self.stop_at_host_s: float | None = None
        self.stop_kind = "dose reached"
        self.stop_due = asyncio.Event()
        self.ended_by_device: int | None = None  # stop reason when the controller ended it
        self.ended = asyncio.Event()
        self.stop_requested = False
        self.seen_emitting = False
        self.acked = False
        self.tail_taken = False
        """The first sample showing the port stopped (its mean holds the end of the
        light) has been integrated; later samples belong to no emission."""
        self.timer: asyncio.TimerHandle | None = None
        self.last_progress_host_s = start_host_s
        self._gc_held = False

    def hold_gc(self) -> None:
        """The stop is imminent: no cyclic-GC pause until it has been sent."""
        if not self._gc_held:
            self._gc_held = True
            GC_HOLD.acquire()

    def release_gc(self) -> None:
        if self._gc_held:
            self._gc_held = False
            GC_HOLD.release()


class _GcHold:
    """Keeps Python's cyclic garbage collector from running while any stop is
    imminent (counted over every port). A full collection can pause the event
    loop for tens of milliseconds; landing on a stop, that is dose (at ×60
    simulation, seconds of it). Held from the moment a stop is scheduled (at most
    a few telemetry periods ahead) until its EMIT_STOP has been answered; the
    collector then runs at its next allocation threshold as usual."""

    def __init__(self) -> None:
        self._holders = 0
        self._reenable = False

    def acquire(self) -> None:
        if self._holders == 0:
            self._reenable = gc.isenabled()
            gc.disable()
        self._holders += 1

    def release(self) -> None:
        self._holders = max(self._holders - 1, 0)
        if self._holders == 0 and self._reenable:
            self._reenable = False
            gc.enable()


GC_HOLD = _GcHold()


class _GcQuiet:
    """While a session runs, the cyclic collector looks only at what the session
    allocates: everything older is collected once and frozen at its start (before
    arming), and unfrozen at its end. A full collection over a large heap (a
    long-running daemon, or a test process) would otherwise pause the event loop
    for longer than the telemetry staleness limit."""

    def __init__(self) -> None:
        self._sessions = 0

    def session_starting(self) -> None:
        if self._sessions == 0:
            gc.collect()
            gc.freeze()
        self._sessions += 1

    def session_ended(self) -> None:
        self._sessions = max(self._sessions - 1, 0)
        if self._sessions == 0:
            gc.unfreeze()


GC_QUIET = _GcQuiet()


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
        self._reconfirm = False
        self._resume = asyncio.Event()
        self._pause_requested = False
        self._gate_changed = asyncio.Event()
        self._lit_idle_samples = 0
        self.wait_reason = ""
        self._remove_listener = target.controller.add_sample_listener(self._on_sample)

    # ------------------------------------------------------------ operator

    def confirm(self) -> None:
        if self.state not in (PortState.GATED, PortState.PAUSED):
            raise SessionError(f"port {self.port} is not waiting for a confirmation")
        self._confirmed.set()
        self._gate_changed.set()

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
        em = self._emission
        if em is not None:
            em.release_gc()

    def _drop_emission(self) -> None:
        """The emission is over (or never began): forget it, and any GC hold it has."""
        em = self._emission
        if em is not None:
            em.release_gc()
        self._emission = None

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
        if prog.outcome != "pending":
            remaining_s = 0.0  # a step that ended has nothing left, whatever its last reading
        elif o.target_kind is TargetKind.TIME:
            remaining_s = max(o.target_time_s - prog.emitting_us / 1e6, 0.0)
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
            elapsed_s=prog.emitting_us / 1e6,
            remaining_s=remaining_s,
            fraction=prog.fraction,
            temperature_c=sample.temp_centi_c / 100 if sample is not None else None,
            contact=sample.contact if sample is not None else None,
        )
        return out

    def _running_ctrl_j(self) -> float:
        em = self._emission
        sample = self.target.controller.sample(self.target.device_port)
        if em is None or sample is None or not em.seen_emitting:
            return 0.0
        return sample.delivered_uj / 1e6

    # ------------------------------------------------------------ the run

    async def run(self) -> None:
        for i, order in enumerate(self.steps):
            self.current = i
            prog = self.progress[i]
            blocked = order.blocked_by & self.session.contraindications
            if blocked:
                prog.outcome = "skipped"
                reason = ", ".join(sorted(blocked))
                prog.stop_causes.append(f"blocked by contraindication: {reason}")
                self.session.recorder.step_started(self.session, order)
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
        # The listener stays until the session ends: a finished port is still
        # watched for light that should not be there.

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
        self._reconfirm = False
        while True:
            await self._gate(order)
            outcome = await self._emit_once(prog)
            if outcome == "done":
                break
            # paused, contact lost or footswitch released: wait for the operator
        prog.outcome = "completed"
        self.state = PortState.WAITING
        session.recorder.step_ended(session, order, prog)
        await session.sync_records()
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
                "emitting_time_s": prog.emitted_us / 1e6,
            },
        )

    def _needs_confirmation(self, order: StepOrder) -> bool:
        return (order.confirm_placement or self._reconfirm) and not self._confirmed.is_set()

    async def _gate(self, order: StepOrder) -> None:
        """Wait until the operator and the applicator allow emission."""
        while True:
            reasons = []
            if self._pause_requested:
                reasons.append("paused by operator")
            if self._needs_confirmation(order):
                reasons.append("confirm placement")
            sample = self.target.controller.sample(self.target.device_port)
            if order.skin_contact and not (sample is not None and sample.contact):
                reasons.append("waiting for skin contact")
            if order.footswitch and not self._footswitch_pressed():
                reasons.append("press the footswitch")
            if not reasons:
                self.wait_reason = ""
                self._reconfirm = False
                return
            self.state = PortState.PAUSED if self._pause_requested else PortState.GATED
            reason = "; ".join(reasons)
            if reason != self.wait_reason:
                self.wait_reason = reason
                self.session.emit(
                    "port_waiting", reason, self.port, order.index, {"reasons": reasons}
                )
            self._gate_changed.clear()
            await self._gate_changed.wait()

    def gate_inputs_changed(self) -> None:
        """Telemetry changed contact or footswitch: re-evaluate a waiting gate."""
        self._gate_changed.set()

    def contact_lost(self) -> None:
        """Skin contact went (CONTACT_CHANGED 0): placement must be confirmed again."""
        if self.current is None or self.state is PortState.DONE:
            return
        order = self.progress[self.current].order
        if order.confirm_placement or order.skin_contact:
            self._confirmed.clear()
            self._reconfirm = True
        self._gate_changed.set()

    def interlocks_changed(self) -> None:
        """INTERLOCK_CHANGED: a released footswitch ends a footswitch-gated emission now."""
        self._gate_changed.set()
        em = self._emission
        if em is not None and self.current is not None:
            order = self.progress[self.current].order
            if order.footswitch and not self._footswitch_pressed():
                em.stop_due.set()

    def _remaining(self, prog: StepProgress) -> tuple[float, float]:
        """(energy still to deliver in µJ, backup timer left in device µs)."""
        order = prog.order
        backup_left_us = self._backup_total_us(order) - prog.emitted_us
        if order.target_kind is TargetKind.TIME:
            left_us = max(order.target_time_s * 1e6 - prog.emitted_us, 0.0)
            remaining_uj = order.power_uw * left_us / 1e6
        else:
            remaining_uj = max(order.target_energy_uj - prog.integrator.energy_uj, 0.0)
        return remaining_uj, backup_left_us

    def _backup_total_us(self, order: StepOrder) -> float:
        """The host backup timer: the step's max time, else planned time + 20 %."""
        if order.backup_time_s is not None:
            return order.backup_time_s * 1e6
        return order.planned_time_s * 1e6 * (1 + self.session.limits.backup_timer_fraction)

    async def _emit_once(self, prog: StepProgress) -> str:
        order = prog.order
        session = self.session
        integ = prog.integrator
        session.check_before_emission(order)
        # Remaining dose and what is left of the backup timer (it keeps its
        # reading across pauses: the controller's durations of this step so far).
        remaining_uj, backup_left_us = self._remaining(prog)
        if remaining_uj <= 0:
            return "done"
        if backup_left_us <= 0:
            session.trip(
                TripCause.BACKUP_CHANNEL_STOP,
                f"backup timer used up with {remaining_uj / 1e6:.3f} J still to deliver",
                self.port,
            )
            raise _Stopped()
        budget_uj = remaining_uj + order.target_energy_uj * session.limits.energy_budget_fraction
        # The controller's own timer: the plan's max duration less what was emitted.
        max_duration_ms = min(order.max_duration_ms - prog.emitted_us / 1000, backup_left_us / 1000)
        request = codec.EmitStart(
            port=self.target.device_port,
            wavelength_nm=order.wavelength_nm,
            mode=int(order.mode),
            power_uw=order.power_uw,
            pulse_hz=order.pulse_hz if order.mode == codec.EmitMode.PULSED else 0,
            duty_permille=order.duty_permille if order.mode == codec.EmitMode.PULSED else 1000,
            energy_budget_uj=max(int(budget_uj), 1),
            max_duration_ms=max(int(max_duration_ms), 1),
        )
        ctrl = self.target.controller
        prog.emissions += 1
        clock = ctrl.clock
        sent_s = time.monotonic()
        start_guess_us = clock.device_time_now_us(sent_s)
        em = _Emission(prog.emissions, request, sent_s, start_guess_us, integ.energy_uj)
        self._emission = em
        prog.running_us = 0.0
        if ctrl.telemetry is not None:
            # The next sample's mean covers the interval since the last one.
            integ.rebase(ctrl.telemetry.device_time_us)
        try:
            await session.command(ctrl.client.emit_start(request))
        except NakReceived as exc:
            self._drop_emission()
            if exc.code == codec.NakError.NO_SKIN_CONTACT:
                # Contact went between the gate and the request: back to the gate.
                prog.emissions -= 1
                self.contact_lost()
                return "contact"
            session.trip(nak_cause(exc, ctrl.interlocks), f"EMIT_START refused: {exc}", self.port)
            raise _Stopped() from exc
        acked_s = time.monotonic()
        em.acked = True
        # The ACK is sent when emission has begun: the start lies about half-way
        # through the round trip (as a PONG's device time does).
        em.start_device_us = clock.device_time_now_us((sent_s + acked_s) / 2)
        self.state = PortState.EMITTING
        self.wait_reason = ""
        session.recorder.emission_started(
            session, order, em.number, request, int(em.start_device_us)
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
        # A stop due within the first samples (a short step or the remainder of a
        # paused one) is scheduled now, at the setpoint; samples refine it.
        try:
            self._plan_stop(em, prog, em.start_device_us, float(order.power_uw), acked_s)
            try:
                host_cause = await self._until_stop(em, prog)
            finally:
                if em.timer is not None:
                    em.timer.cancel()
            em.stop_requested = True
            stopped = await session.command(ctrl.client.emit_stop(self.target.device_port))
        finally:
            em.release_gc()
        if em.ended_by_device is None and stopped.stop_reason != codec.StopReason.HOST_STOP:
            em.ended_by_device = stopped.stop_reason
        # Read back: samples after STOPPED must show the port dark (the first may
        # still carry the end of the light); they also complete the host's integral.
        dark = await self._read_back_dark(em)
        if dark is None:
            session.trip(TripCause.TELEMETRY_STALE, "no telemetry after EMIT_STOP", self.port)
            raise _Stopped()
        if not dark:
            session.trip(TripCause.STUCK_EMISSION, "port still lit after EMIT_STOP", self.port)
            raise _Stopped()
        self._drop_emission()
        prog.running_us = 0.0
        prog.controller_energy_uj += stopped.delivered_uj
        prog.emitted_us += stopped.duration_ms * 1000
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
        if session.supervisor.tripped is not None:
            raise _Stopped()
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
            self.contact_lost()
            self.state = PortState.GATED
            session.emit(
                "port_paused",
                "skin contact lost; confirm the placement again",
                self.port,
                order.index,
                {"energy_j": integ.energy_j},
            )
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

    async def _read_back_dark(self, em: _Emission) -> bool | None:
        """After STOPPED: True once a sample shows the port dark, False if it stays lit
        for the read-back time, None if no sample arrives at all."""
        ctrl = self.target.controller
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.session.readback_timeout_s
        seen = False
        lit = True
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                t = await ctrl.next_sample(left)
            except TimeoutError:
                break
            if self.target.device_port > len(t.ports):
                return False
            seen = True
            lit = port_lit(t.ports[self.target.device_port - 1], self.session.limits.dark_power_uw)
            if not lit and em.tail_taken:
                return True
        return (not lit) if seen else None

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
            if prog.order.footswitch and not self._footswitch_pressed():
                return "footswitch released"
            em.stop_due.clear()
            # The last stretch: yield until the stop time so it goes out on time.
            while True:
                stop_at = em.stop_at_host_s
                if stop_at is None or em.ended.is_set() or self._pause_requested:
                    break
                if time.monotonic() >= stop_at:
                    if em.stop_kind == "fluence ceiling":
                        # Stop right here, through the supervisor (ALL_OFF), and say why.
                        self.session.trip(
                            TripCause.FLUENCE_CEILING,
                            f"{prog.order.site} at {prog.order.wavelength_nm} nm would pass "
                            f"{prog.order.fluence_ceiling_j_cm2:g} J/cm²",
                            self.port,
                        )
                        raise _Stopped()
                    return em.stop_kind
                await asyncio.sleep(0)

    def _footswitch_pressed(self) -> bool:
        bits = self.target.controller.interlocks
        return bits is not None and bool(bits & codec.Interlock.FOOTSWITCH)

    # --------------------------------------------------- telemetry (reader)

    def _on_sample(self, t: codec.Telemetry, host_s: float) -> None:
        """Every sample: integrate, check, and schedule the stop. Never blocks."""
        dev_port = self.target.device_port
        if dev_port > len(t.ports):
            return
        sample = t.ports[dev_port - 1]
        session = self.session
        if self.current is not None and self.state in (PortState.GATED, PortState.PAUSED):
            self.gate_inputs_changed()
        em = self._emission
        if em is None or self.current is None or em.tail_taken:
            self._check_idle(sample)
            return
        self._lit_idle_samples = 0
        prog = self.progress[self.current]
        order = prog.order
        integ = prog.integrator
        emitting = bool(sample.flags & _EMITTING)
        integ.add(t.device_time_us, sample.measured_power_uw, emitting)
        if emitting:
            # Until the port shows emitting, delivered_uj still holds the
            # previous emission's value (ICD §5a): count and check from here.
            em.seen_emitting = True
            prog.running_us = max(t.device_time_us - em.start_device_us, 0.0)
        elif (
            em.seen_emitting
            or em.stop_requested
            or em.ended_by_device is not None
            or sample.measured_power_uw > session.limits.dark_power_uw
        ):
            # The first sample after the light went out: its mean holds the end.
            em.tail_taken = True
            return
        if not em.seen_emitting:
            return
        em.samples += 1
        if session.supervisor.tripped is not None or em.stop_requested:
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
        if em.samples >= 2 and irradiance > order.irradiance_ceiling_mw_cm2:
            session.trip(
                TripCause.IRRADIANCE_CEILING,
                f"{irradiance:.1f} mW/cm² measured, "
                f"ceiling {order.irradiance_ceiling_mw_cm2:.1f} mW/cm²",
                self.port,
            )
            return
        site_fluence = session.site_fluence_j_cm2(order.site, order.wavelength_nm)
        tolerance = 1 + session.limits.fluence_ceiling_tolerance_fraction
        if site_fluence > order.fluence_ceiling_j_cm2 * tolerance:
            session.trip(
                TripCause.FLUENCE_CEILING,
                f"{site_fluence:.2f} J/cm² at {order.site} "
                f"{order.wavelength_nm} nm, ceiling {order.fluence_ceiling_j_cm2} J/cm²",
                self.port,
            )
            return
        # Measured vs setpoint, after the first full interval (the rise is ~1 ms).
        if em.samples >= 2 and order.power_uw > 0:
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
        if prog.emitting_us > self._backup_total_us(order):
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
        if order.footswitch and not self._footswitch_pressed():
            em.stop_due.set()
            return
        self._plan_stop(
            em, prog, float(t.device_time_us), float(integ.last_power_uw), host_s, site_fluence
        )

    def _check_idle(self, sample: codec.PortSample) -> None:
        """No emission runs on this port: light here is a stuck emitter (two samples,
        so that the end of a stop's light in one sample's mean is not mistaken)."""
        if not port_lit(sample, self.session.limits.dark_power_uw):
            self._lit_idle_samples = 0
            return
        self._lit_idle_samples += 1
        if self._lit_idle_samples >= 2 and not self.session.state.final:
            self.session.trip(
                TripCause.STUCK_EMISSION,
                f"port lit ({sample.measured_power_uw / 1000:.1f} mW measured) while no "
                "emission runs on it",
                self.port,
            )

    def _plan_stop(
        self,
        em: _Emission,
        prog: StepProgress,
        base_device_us: float,
        rate_uw: float,
        host_s: float,
        site_fluence_j_cm2: float | None = None,
    ) -> None:
        """Schedule the stop: where the dose (or the site's fluence ceiling) is reached.

        From `base_device_us` (a sample's device time, or the emission's start)
        at `rate_uw`, in device time, mapped to host time and sent early by the
        link's one-way latency and the learned lateness, so it takes effect on
        time. Only stops due within the next few samples are scheduled; later
        samples refine them.
        """
        if em.ended.is_set() or em.stop_requested:
            return
        order = prog.order
        integ = prog.integrator
        session = self.session
        if rate_uw <= 0:
            return
        if order.target_kind is TargetKind.TIME:
            reach_us = em.start_device_us + order.target_time_s * 1e6 - prog.emitted_us
            left_uj = rate_uw * max(reach_us - base_device_us, 0.0) / 1e6
        else:
            left_uj = max(order.target_energy_uj - integ.energy_uj, 0.0)
            reach_us = base_device_us + left_uj / rate_uw * 1e6
        kind = "dose reached"
        ceiling = order.fluence_ceiling_j_cm2
        if ceiling != float("inf"):
            site = site_fluence_j_cm2
            if site is None:
                site = session.site_fluence_j_cm2(order.site, order.wavelength_nm)
            headroom_uj = max((ceiling - site) * order.area_cm2 * 1e6, 0.0)
            if headroom_uj < left_uj - max(1e-3 * order.target_energy_uj, 1.0):
                kind = "fluence ceiling"
                reach_us = base_device_us + headroom_uj / rate_uw * 1e6
        ctrl = self.target.controller
        clock = ctrl.clock
        horizon_s = 2.5 * session.telemetry_period_s
        if (reach_us - base_device_us) / 1e6 / clock.ratio > 2 * horizon_s and em.timer is None:
            return  # far off: the next samples will schedule it (no clock mapping needed)
        stop_at = clock.host_time_at(reach_us) - clock.one_way_latency_s - ctrl.stop_lead_s
        horizon = host_s + horizon_s
        if em.timer is not None:
            em.timer.cancel()
            em.timer = None
        if stop_at > horizon:
            em.stop_at_host_s = None
            em.release_gc()
            return
        em.stop_at_host_s = stop_at
        em.stop_kind = kind
        em.hold_gc()
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
        if reason not in _OPERATOR_REASONS:
            # A backstop (energy budget, max duration) or the firmware ended it: trip
            # now, not after this port's read-back.
            self.session.trip(
                stop_reason_cause(reason),
                "controller ended the emission: " + codec.describe(codec.StopReason, reason),
                self.port,
            )


_OPERATOR_REASONS = {codec.StopReason.HOST_STOP, codec.StopReason.CONTACT_LOST}


def nak_cause(exc: NakReceived, interlocks: int | None) -> TripCause:
    """The trip cause behind a NAK to a request the session needed."""
    code = exc.code
    if code == codec.NakError.INTERLOCK_OPEN:
        cause = interlock_cause(interlocks) if interlocks is not None else None
        return cause or TripCause.REMOTE_INTERLOCK_OPEN
    if code == codec.NakError.FAULT_LATCHED:
        return TripCause.CONTROLLER_FAULT
    if code == codec.NakError.NO_APPLICATOR:
        return TripCause.APPLICATOR_REMOVED
    return TripCause.UNEXPECTED_STOP


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
        calibration_overdue: Callable[[], str | None] | None = None,
    ) -> None:
        self.id = session_id or str(uuid.uuid4())
        self.plan_hash = plan_hash
        self._verify_plan = verify_plan
        self._calibration_overdue = calibration_overdue
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
        self.readback_timeout_s = max(limits.stop_readback_timeout_s, 6.0 / telemetry_hz)
        self.runners = {
            port: PortRunner(self, port_map[port], list(port_steps))
            for port, port_steps in sorted(steps.items())
        }
        self._listeners: list[SessionListener] = []
        self._done = asyncio.Event()
        self.aborting = False
        self.end_cause: EndCause | None = None
        self._stop_requested = False
        self._unsubscribe: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._work: asyncio.Task[None] | None = None
        self._stale_task: asyncio.Task[None] | None = None
        self._closing = False
        self._gc_quiet = False
        # The latch stops the work at once (synchronously, with the inhibit), so
        # no runner step follows a trip; the supervisor's ALL_OFF is already due.
        supervisor.add_latch_hook(self._on_latch)

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
            "service_required": self.supervisor.service_required,
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
        await self._end_early(EndCause.OPERATOR_ABORT, reason)

    async def interrupt(self, reason: str) -> None:
        """The service is stopping: ALL_OFF at once, then the session ends as
        interrupted (not aborted: nobody chose to end this treatment)."""
        await self._end_early(EndCause.DAEMON_STOPPED, reason)

    async def _end_early(self, cause: EndCause, reason: str) -> None:
        """EMIT_START is inhibited first (synchronously), so a start already queued
        behind the ALL_OFF never reaches the wire after it."""
        if self.state.final:
            raise SessionError(f"session already {self.state.value}")
        if self.supervisor.tripped is not None or self.aborting:
            await self.wait()  # already ending: the first cause stays the cause
            return
        self.aborting = True
        self.end_cause = cause
        self.cause_code = cause.code
        self.cause_message = reason
        for ctrl in self.port_map.controllers():
            ctrl.client.inhibit_emission(f"{cause.code} {reason}")
        results = await asyncio.gather(
            *(c.all_off() for c in self.port_map.controllers()), return_exceptions=True
        )
        failed = [
            f"{c.name}: {r!r}"
            for c, r in zip(self.port_map.controllers(), results, strict=True)
            if isinstance(r, BaseException)
        ]
        kind = "abort" if cause is EndCause.OPERATOR_ABORT else "interrupt"
        self.emit(kind, reason, data={"code": cause.code, "all_off_failed": failed})
        self._stop_work()
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
        if self.supervisor.tripped is not None or self.aborting:
            raise _Stopped()
        if not self._verify_plan():
            self.trip(
                TripCause.PLAN_HASH_MISMATCH, f"plan {self.plan_hash[:12]} changed", order.port
            )
            raise _Stopped()
        overdue = self._calibration_overdue() if self._calibration_overdue else None
        if overdue:
            self.trip(TripCause.CALIBRATION_OVERDUE, overdue, order.port)
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
        except EmissionInhibited as exc:
            # A trip or an abort got there first; it is the cause, not this.
            raise _Stopped() from exc

    async def sync_records(self) -> None:
        """Make the records durable (a step boundary); a failure trips the session."""
        try:
            await self.recorder.sync()
        except RecordingFailed as exc:
            self.trip(TripCause.RECORDS_FAILED, str(exc))
            raise _Stopped() from exc

    # --------------------------------------------------------------- run

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"session-{self.id[:8]}")
        return self._task

    async def wait(self) -> SessionState:
        await self._done.wait()
        return self.state

    @property
    def closed(self) -> bool:
        """Ended and closed out: controllers disarmed, the record written."""
        return self._done.is_set()

    def _stop_work(self) -> None:
        self._stop_requested = True
        if self._work is not None and not self._work.done():
            self._work.cancel()

    def _on_latch(self, trip: Trip) -> None:
        if self.cause_code is None or self.aborting:
            self.cause_code = trip.cause.code
            self.cause_message = trip.describe()
        self._stop_work()

    async def _run(self) -> None:
        """The work (arming, the port runners) runs in its own task, which a trip or
        an abort cancels; closing out (records, disarm) runs here after it, where no
        cancellation can cut it short."""
        work = asyncio.create_task(self._main(), name=f"session-work-{self.id[:8]}")
        self._work = work
        try:
            while not (await asyncio.wait([work], timeout=RECANCEL_INTERVAL_S))[0]:
                if self._stop_requested:
                    # A cancellation can be lost on its way in (asyncio.wait_for in
                    # Python 3.11 drops one that meets a result); ask again until the
                    # work has stopped, or a session could wait at a gate forever.
                    work.cancel()
        except asyncio.CancelledError:
            # This task was cancelled from outside (shutdown): stop safely, then go.
            if self.supervisor.tripped is None and not self.aborting:
                self.trip(TripCause.INTERNAL_ERROR, "session task cancelled")
            work.cancel()
            await asyncio.wait([work])
            await self._finish()
            raise
        if not work.cancelled():
            exc = work.exception()
            if exc is not None:
                self._work_failed(exc)
        await self._finish()

    def _work_failed(self, exc: BaseException) -> None:
        """The work ended by an exception: trips are already latched; anything else
        is a bug, which must still end with emission off."""
        if self.supervisor.tripped is not None or self.aborting:
            return
        excs = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
        for e in excs:
            if isinstance(e, RecordingFailed):
                self.trip(TripCause.RECORDS_FAILED, str(e))
                return
        log.error("session.crashed", error=repr(exc), exc_info=exc)
        self.trip(TripCause.INTERNAL_ERROR, repr(exc))

    async def _main(self) -> None:
        try:
            await self._main_work()
        except _Stopped:
            pass
        except BaseExceptionGroup as group:
            # Runners that stopped because of a trip end the group with _Stopped.
            rest = group.subgroup(lambda e: not isinstance(e, _Stopped | asyncio.CancelledError))
            if rest is not None:
                raise rest from None

    async def _main_work(self) -> None:
        # Before any watcher runs: the collection may take a while, nothing emits yet.
        GC_QUIET.session_starting()
        self._gc_quiet = True
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
        if self.aborting or self.supervisor.tripped is not None:
            raise _Stopped()  # aborted before it began
        # Stops are timed on the device clock: its rate must be measured (and the
        # record states the time scale it found).
        unsettled: str | None = None
        for ctrl in self.port_map.controllers():
            try:
                await ctrl.wait_clock_settled(self.readback_timeout_s * 20)
            except TimeoutError:
                unsettled = ctrl.name
        # The record next: whatever happens from here on belongs to it, and a
        # treatment that cannot be recorded does not start.
        self.started_utc = time.time()
        self.recorder.session_started(self)
        await self.sync_records()
        if unsettled is not None:
            self.trip(TripCause.TELEMETRY_STALE, f"{unsettled}: no telemetry before arming")
            raise _Stopped()
        # READY: plan hash, calibration.
        first = next(iter(self.runners.values()), None)
        if not self._verify_plan():
            self.trip(TripCause.PLAN_HASH_MISMATCH, "plan changed before arming")
            raise _Stopped()
        overdue = self._calibration_overdue() if self._calibration_overdue else None
        if overdue:
            self.trip(TripCause.CALIBRATION_OVERDUE, overdue, first.port if first else None)
            raise _Stopped()
        self._set_state(SessionState.READY, "plan verified, controller ready")
        # ARMED: emission indicator on, emission delay.
        for ctrl in self.port_map.controllers():
            try:
                await self.command(ctrl.client.arm(self.token))
            except NakReceived as exc:
                self.trip(nak_cause(exc, ctrl.interlocks), f"{ctrl.name}: ARM refused: {exc}")
                raise _Stopped() from exc
        self._set_state(SessionState.ARMED, "armed; emission delay running")
        await self._wait_armed_ready()
        self._set_state(SessionState.RUNNING, "emission delay elapsed")
        async with asyncio.TaskGroup() as group:
            for runner in self.runners.values():
                group.create_task(runner.run(), name=f"port-{runner.port}")

    async def _wait_armed_ready(self) -> None:
        """Until every controller reports the emission delay over. Only samples that
        arrived after the ARM's ACK count: an earlier one may still show the armed
        state a previous session left before its DISARM."""
        for ctrl in self.port_map.controllers():
            while True:
                try:
                    tele = await ctrl.next_sample(self.readback_timeout_s * 20)
                except TimeoutError:
                    self.trip(TripCause.TELEMETRY_STALE, "no telemetry while arming")
                    raise _Stopped() from None
                if self.supervisor.tripped is not None:
                    raise _Stopped()
                if tele.state == codec.ControllerState.ARMED_READY:
                    break

    async def _watch_staleness(self) -> None:
        """Telemetry older than N sample periods is a link fault (ICD §6)."""
        limit_s = self.limits.stale_telemetry_periods * self.telemetry_period_s
        # Counted from when watching began at the earliest: a pause before it (the
        # session's start-up collection) is not the controller's silence.
        began = time.monotonic()
        while True:
            now = time.monotonic()
            oldest = min(max(c.telemetry_host_s or now, began) for c in self.port_map.controllers())
            age = now - oldest
            if age > limit_s:
                self.trip(
                    TripCause.TELEMETRY_STALE,
                    f"last telemetry {age * 1000:.0f} ms ago (limit {limit_s * 1000:.0f} ms)",
                )
                return
            await asyncio.sleep(max(limit_s - age, 0.001) + 0.001)

    def _on_link_lost(self, name: str, exc: BaseException) -> None:
        if self._closing:
            # Emission already ended and was read back; closing out only notes it.
            self.emit("link_lost", f"{name}: {exc}")
            return
        self.trip(TripCause.LINK_LOST, f"{name}: {exc}")

    def _on_reply_timeout(self, name: str, exc: BaseException) -> None:
        """A missed reply deadline is a link fault (ICD §6), heartbeats included."""
        if self._closing:
            self.emit("reply_timeout", f"{name}: {exc}")
            return
        self.trip(TripCause.REPLY_TIMEOUT, f"{name}: {exc}")

    def _check_controller(self, name: str, t: codec.Telemetry, host_s: float = 0.0) -> None:
        if self.state.final or self.state is SessionState.IDLE or self._closing:
            # Closing out disarms: the samples after it are expected to say so.
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
            return
        if self.state is SessionState.RUNNING and t.state != codec.ControllerState.ARMED_READY:
            # Disarmed under a running session (nobody here asked for it).
            self.trip(
                TripCause.UNEXPECTED_STOP,
                f"{name}: controller left the armed state "
                f"({codec.describe(codec.ControllerState, t.state)})",
            )

    def _runners_on(self, controller: str, device_port: int) -> list[PortRunner]:
        return [
            r
            for r in self.runners.values()
            if r.target.controller.name == controller and r.target.device_port == device_port
        ]

    def _on_event(self, controller: str, ev: codec.Event) -> None:
        data = {
            "controller": controller,
            "code": codec.describe(codec.EventCode, ev.code),
            "value": ev.value,
            "device_time_us": ev.device_time_us,
        }
        if ev.code == codec.EventCode.EMISSION_ENDED:
            for runner in self._runners_on(controller, ev.port):
                runner.on_emission_ended(ev.value)
        elif ev.code == codec.EventCode.FAULT:
            self.trip(
                TripCause.CONTROLLER_FAULT,
                f"{controller}: {codec.describe(codec.FaultCode, ev.value)}"
                + (f" on port {ev.port}" if ev.port else ""),
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
            for runner in self.runners.values():
                runner.interlocks_changed()
        elif ev.code == codec.EventCode.APPLICATOR_CHANGED:
            runners = self._runners_on(controller, ev.port)
            if runners and not self.state.final:
                self.trip(
                    TripCause.APPLICATOR_REMOVED,
                    f"{controller} port {ev.port}: applicator "
                    + ("removed" if ev.value == 0 else f"changed to kind {ev.value}"),
                    runners[0].port,
                )
        elif ev.code == codec.EventCode.CONTACT_CHANGED:
            for runner in self._runners_on(controller, ev.port):
                if ev.value == 0:
                    runner.contact_lost()
                runner.gate_inputs_changed()
        self.emit("controller_event", f"{data['code']} value {ev.value}", data=data)

    def _on_trip(self, trip: Trip) -> None:
        """Emission is already off and read back (the supervisor sent ALL_OFF first)."""
        self._stop_work()

    async def _close_running_emissions(self, final: SessionState) -> None:
        """Record every emission that a trip or an abort cut short, with the dose the
        controller counted (GET_COUNTERS, else the last sample after the stop).

        The port's session total (COUNTERS ``session_delivered_uj``) less what the
        finished emissions of this session already account for is this emission's
        energy: right whether or not its EMIT_START was ever executed (a start
        whose reply never came may or may not have begun)."""
        cause = self.cause_message or final.value
        for runner in self.runners.values():
            em = runner._emission
            if em is None or runner.current is None:
                continue
            prog = runner.progress[runner.current]
            target = runner.target
            client = target.controller.client
            accounted = sum(p.controller_energy_uj for p in runner.progress)
            delivered: int | None = None
            duration_ms: int | None = None
            reason: int | None = None
            if client.is_open:
                try:
                    counters = await client.get_counters(target.device_port)
                except (ClientError, OSError) as exc:
                    log.warning("session.final_counters_failed", port=runner.port, error=str(exc))
                else:
                    if counters.session_token == self.token:
                        delivered = max(counters.session_delivered_uj - accounted, 0)
                        if em.acked or em.seen_emitting or delivered:
                            duration_ms = counters.duration_ms
                            reason = counters.last_stop_reason
                        else:
                            duration_ms = 0
            if delivered is None:
                sample = target.controller.sample(target.device_port)
                if sample is not None and em.seen_emitting:
                    delivered = sample.delivered_uj
            host_uj = prog.integrator.energy_uj - em.energy_before_uj
            stopped = (
                codec.Stopped(target.device_port, delivered, duration_ms or 0, reason or 0)
                if delivered is not None
                else None
            )
            try:
                self.recorder.emission_ended(self, prog.order, em.number, host_uj, stopped, cause)
            except Exception:
                log.exception("session.record_emission_failed")
            prog.controller_energy_uj += delivered or 0
            if duration_ms is not None:
                prog.emitted_us += duration_ms * 1000
                prog.running_us = 0.0
            runner._drop_emission()

    async def _finish(self) -> None:
        self._closing = True
        if self._stale_task is not None:
            self._stale_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stale_task
        if self.supervisor.tripped is None and self.aborting:
            # An abort's ALL_OFF is read back like a trip's; light that stays is a fault.
            for ctrl in self.port_map.controllers():
                dark = await ctrl.wait_dark(self.readback_timeout_s, self.limits.dark_power_uw)
                if dark is False:
                    self.trip(
                        TripCause.STUCK_EMISSION,
                        f"{ctrl.name}: ports {sorted(ctrl.lit_ports())} still lit after ALL_OFF",
                    )
        if (
            self.supervisor.tripped is None
            and not self.aborting
            and any(r.state is not PortState.DONE for r in self.runners.values())
        ):
            # Only a trip or an abort may end a session early; anything else is a bug.
            self.trip(TripCause.INTERNAL_ERROR, "the session ended before its steps were done")
        trip = self.supervisor.tripped
        if trip is not None:
            # Wait for the supervisor's ALL_OFF and read-back before closing out.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.supervisor.wait_done(), 5.0)
            self.cause_code = trip.cause.code
            self.cause_message = trip.describe()
            if self.supervisor.service_required and trip.cause is not TripCause.STUCK_EMISSION:
                # Whatever tripped first, a port that stayed lit through ALL_OFF and
                # DISARM is what the clinician must act on now.
                stuck = TripCause.STUCK_EMISSION
                self.cause_code = stuck.code
                self.cause_message = f"{stuck.code} {stuck.message} (tripped by {trip.describe()})"
            final = SessionState.FAULTED
        elif self.aborting:
            final = (
                SessionState.INTERRUPTED
                if self.end_cause is EndCause.DAEMON_STOPPED
                else SessionState.ABORTED
            )
        else:
            final = SessionState.COMPLETED
        # Nothing may start on these controllers until a person starts a session.
        for ctrl in self.port_map.controllers():
            ctrl.client.inhibit_emission(f"session {self.id[:8]} {final.value}")
        await self._close_running_emissions(final)
        for runner in self.runners.values():
            runner.detach()
            if runner.state not in (PortState.DONE, PortState.SKIPPED):
                runner.state = PortState.STOPPED
            if runner.current is not None:
                prog = runner.progress[runner.current]
                if prog.outcome == "pending":
                    prog.outcome = "stopped"
                    prog.stop_causes.append(self.cause_message or final.value)
                    with contextlib.suppress(Exception):
                        self.recorder.step_ended(self, prog.order, prog)
        # Disarm: emission indicator off. A failure here is recorded, not raised.
        for ctrl in self.port_map.controllers():
            if not ctrl.client.is_open:
                continue
            try:
                await ctrl.client.disarm()
            except (ClientError, OSError) as exc:
                self.emit("disarm_failed", f"{ctrl.name}: {exc}")
        self.ended_utc = time.time()
        self._set_state(final, self.cause_message or final.value)
        try:
            self.recorder.session_ended(self)
            await self.recorder.sync()
        except RecordingFailed as exc:
            # Held by the store and written once the disk recovers.
            log.error("session.record_end_failed", error=str(exc))
        except Exception:
            log.exception("session.record_end_failed")
        for undo in self._unsubscribe:
            undo()
        self._unsubscribe.clear()
        if self.supervisor.tripped is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.supervisor.wait_done(), 5.0)
        await self.supervisor.close()
        if self._gc_quiet:
            self._gc_quiet = False
            GC_QUIET.session_ended()
        self._done.set()
