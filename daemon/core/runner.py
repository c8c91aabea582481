"""The per-port scheduler: one :class:`PortRunner` walks one logical port's steps.

Each step emits until the host's dose channel says the prescription will be
reached by the time a stop takes effect, then sends EMIT_STOP so that it
arrives on time. Every telemetry sample is integrated and checked as it
arrives (in the reader's callback, with no task hop) against the per-sample
rules of :mod:`pbmd.daemon.core.rules`; anything wrong goes to the one latch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from pbmd.daemon.core.controllers import PortTarget, port_lit
from pbmd.daemon.core.dose import DoseIntegrator
from pbmd.daemon.core.emission import Emission
from pbmd.daemon.core.link_health import learn_emit_start
from pbmd.daemon.core.rules import SAMPLE_RULES, SampleView, backup_total_us, channels_disagree
from pbmd.daemon.core.safety import TripCause, nak_cause, stop_reason_cause
from pbmd.daemon.core.status import (
    RunnerStatus,
    StepStatus,
    controller_status,
    staleness_limit_s,
)
from pbmd.daemon.core.steps import (
    EventKind,
    PortState,
    SessionError,
    StepOrder,
    StepProgress,
    Stopped,
    TargetKind,
)
from pbmd.drivers import codec
from pbmd.drivers.client import NakReceived, OutcomeUnknown

if TYPE_CHECKING:
    from pbmd.daemon.core.session import Session

log = structlog.get_logger()

_EMITTING = int(codec.PortFlag.EMITTING)

SPIN_BEFORE_STOP_S = 0.002
"""The event loop's timers wake up to 1 ms late (epoll's millisecond timeout);
the last 2 ms before a stop are waited out by yielding, not by a timer."""


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
        self._emission: Emission | None = None
        self._confirmed = asyncio.Event()
        self._reconfirm = False
        self._resume = asyncio.Event()
        self._pause_requested = False
        self._gate_changed = asyncio.Event()
        self._lit_idle_samples = 0
        self._view = SampleView(session)
        self._view_em: Emission | None = None
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

    def status(self) -> RunnerStatus:
        step = None if self.current is None else self._step_status(self.progress[self.current])
        return RunnerStatus(self.port, self.state, self.wait_reason or None, step)

    def _step_status(self, prog: StepProgress) -> StepStatus:
        o = prog.order
        integ = prog.integrator
        sample = self._fresh_sample()
        power_uw = None if sample is None else sample.measured_power_uw if sample.emitting else 0
        rate = integ.last_power_uw or o.power_uw
        if prog.outcome != "pending":
            remaining_s = 0.0  # a step that ended has nothing left, whatever its last reading
        elif o.target_kind is TargetKind.TIME:
            remaining_s = max(o.target_time_s - prog.emitting_us / 1e6, 0.0)
        else:
            remaining_s = max(o.target_energy_uj - integ.energy_uj, 0.0) / max(rate, 1.0)
        return StepStatus(
            step=o.index,
            steps=len(self.steps),
            site=o.site,
            label=o.label,
            wavelength_nm=o.wavelength_nm,
            mode="pulsed" if o.mode == codec.EmitMode.PULSED else "continuous",
            pulse_hz=o.pulse_hz,
            setpoint_mw=o.power_uw / 1000,
            power_mw=None if power_uw is None else power_uw / 1000,
            irradiance_mw_cm2=None if power_uw is None else integ.irradiance_mw_cm2(power_uw),
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

    def _fresh_sample(self) -> codec.PortSample | None:
        """The port's latest sample, None when there is none or it is stale (the
        status never shows stale telemetry as the present)."""
        ctrl = self.target.controller
        limit_s = staleness_limit_s(self.session.limits, self.session.telemetry_hz)
        if controller_status(ctrl, limit_s).stale:
            return None
        return ctrl.sample(self.target.device_port)

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
            await self._wait_for_phase(order)
            await self._run_or_skip(prog)
        self.state = PortState.DONE
        self.wait_reason = ""
        # The listener stays until the session ends: a finished port is still
        # watched for light that should not be there.

    async def _wait_for_phase(self, order: StepOrder) -> None:
        """Hold the step until every step of the earlier phases has ended."""
        gate = self.session.phase_gate
        blocking = gate.blocking(order.phase)
        if blocking is None:
            return
        self.state = PortState.WAITING
        self.wait_reason = (
            f"phase {order.phase + 1} starts when phase {blocking + 1} has ended on ports "
            + ", ".join(map(str, gate.ports_in(blocking)))
        )
        self.session.emit(
            EventKind.PORT_WAITING,
            self.wait_reason,
            self.port,
            order.index,
            {"reasons": [self.wait_reason], "phase": order.phase},
        )
        await gate.wait(order.phase)
        self.wait_reason = ""

    async def _run_or_skip(self, prog: StepProgress) -> None:
        order = prog.order
        blocked = order.blocked_by & self.session.contraindications
        if not blocked:
            await self._run_step(prog)
            return
        prog.outcome = "skipped"
        self.session.phase_gate.ended(order)
        reason = ", ".join(sorted(blocked))
        prog.stop_causes.append(f"blocked by contraindication: {reason}")
        self.session.recorder.step_started(self.session, order)
        self.session.emit(
            EventKind.STEP_SKIPPED,
            f"step blocked by {reason}",
            self.port,
            order.index,
            {"contraindications": sorted(blocked)},
        )
        self.session.recorder.step_ended(self.session, order, prog)

    async def _run_step(self, prog: StepProgress) -> None:
        order = prog.order
        session = self.session
        session.recorder.step_started(session, order)
        session.emit(
            EventKind.STEP_STARTED,
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
        session.phase_gate.ended(order)  # the emission is over: a later phase may start
        session.recorder.step_ended(session, order, prog)
        await session.sync_records()
        session.emit(
            EventKind.STEP_COMPLETED,
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
                    EventKind.PORT_WAITING, reason, self.port, order.index, {"reasons": reasons}
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
        backup_left_us = backup_total_us(order, self.session.limits) - prog.emitted_us
        if order.target_kind is TargetKind.TIME:
            left_us = max(order.target_time_s * 1e6 - prog.emitted_us, 0.0)
            remaining_uj = order.power_uw * left_us / 1e6
        else:
            remaining_uj = max(order.target_energy_uj - prog.integrator.energy_uj, 0.0)
        return remaining_uj, backup_left_us

    async def _emit_once(self, prog: StepProgress) -> str:
        """One EMIT_START … STOPPED of a step: "done", or why it stopped early
        ("paused", "contact", "footswitch"); Stopped when the session is ending."""
        self.session.check_before_emission(prog.order)
        request = self._request(prog)
        if request is None:
            return "done"
        em = await self._start(prog, request)
        if em is None:
            return "contact"
        host_cause, stopped = await self._run_until_stopped(em, prog)
        # Read back: samples after STOPPED must show the port dark (the first may
        # still carry the end of the light); they also complete the host's integral.
        dark = await self._read_back_dark(em)
        if dark is None:
            self.session.trip(TripCause.TELEMETRY_STALE, "no telemetry after EMIT_STOP", self.port)
            raise Stopped()
        if not dark:
            self.session.trip(TripCause.STUCK_EMISSION, "port still lit after EMIT_STOP", self.port)
            raise Stopped()
        self._drop_emission()
        self._account(em, prog, stopped, host_cause)
        if self.session.supervisor.tripped is not None:
            raise Stopped()
        if em.ended_by_device is not None and em.ended_by_device not in _OPERATOR_REASONS:
            self._trip_device_stop(em.ended_by_device)
            raise Stopped()
        if host_cause == "dose reached":
            return "done"
        return self._stopped_early(em, prog, host_cause)

    def _request(self, prog: StepProgress) -> codec.EmitStart | None:
        """The EMIT_START for what is left of the step (None: nothing is), with the
        controller's backstops: the plan's energy-budget margin over the remaining
        dose, and the plan's max duration less what was emitted."""
        order = prog.order
        # Remaining dose and what is left of the backup timer (it keeps its
        # reading across pauses: the controller's durations of this step so far).
        remaining_uj, backup_left_us = self._remaining(prog)
        if remaining_uj <= 0:
            return None
        if backup_left_us <= 0:
            self.session.trip(
                TripCause.BACKUP_CHANNEL_STOP,
                f"backup timer used up with {remaining_uj / 1e6:.3f} J still to deliver",
                self.port,
            )
            raise Stopped()
        budget_uj = remaining_uj + (order.energy_budget_uj - order.target_energy_uj)
        max_duration_ms = min(order.max_duration_ms - prog.emitted_us / 1000, backup_left_us / 1000)
        pulsed = order.mode == codec.EmitMode.PULSED
        return codec.EmitStart(
            port=self.target.device_port,
            wavelength_nm=order.wavelength_nm,
            mode=int(order.mode),
            power_uw=order.power_uw,
            pulse_hz=order.pulse_hz if pulsed else 0,
            duty_permille=order.duty_permille if pulsed else 1000,
            energy_budget_uj=max(int(budget_uj), 1),
            max_duration_ms=max(int(max_duration_ms), 1),
        )

    async def _start(self, prog: StepProgress, request: codec.EmitStart) -> Emission | None:
        """Send EMIT_START; the running emission, or None when skin contact went
        between the gate and the request (back to the gate)."""
        order = prog.order
        session = self.session
        ctrl = self.target.controller
        integ = prog.integrator
        prog.emissions += 1
        clock = ctrl.clock
        sent_s = time.monotonic()
        start_guess_us = clock.device_time_now_us(sent_s)
        em = Emission(prog.emissions, request, sent_s, start_guess_us, integ.energy_uj)
        self._emission = em
        prog.running_us = 0.0
        if ctrl.telemetry is not None:
            # The next sample's mean covers the interval since the last one.
            integ.rebase(ctrl.telemetry.device_time_us)
        try:
            running_ms = await self._send_start(request)
        except NakReceived as exc:
            self._drop_emission()
            if exc.code == codec.NakError.NO_SKIN_CONTACT:
                prog.emissions -= 1
                self.contact_lost()
                return None
            session.trip(nak_cause(exc, ctrl.interlocks), f"EMIT_START refused: {exc}", self.port)
            raise Stopped() from exc
        acked_s = time.monotonic()
        em.acked = True
        if running_ms is None:
            # The ACK is sent when emission has begun: the start lies about half-way
            # through the round trip (as a PONG's device time does).
            em.start_device_us = clock.device_time_now_us((sent_s + acked_s) / 2)
        else:
            # Learned from the counters: the port has emitted for running_ms.
            em.start_device_us = clock.device_time_now_us(acked_s) - running_ms * 1000
        self.state = PortState.EMITTING
        self.wait_reason = ""
        session.recorder.emission_started(
            session, order, em.number, request, int(em.start_device_us)
        )
        session.emit(
            EventKind.EMISSION_STARTED,
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
        self._plan_stop(em, prog, em.start_device_us, float(order.power_uw), acked_s)
        return em

    async def _send_start(self, request: codec.EmitStart) -> int | None:
        """EMIT_START, acknowledged: None. Unanswered (OutcomeUnknown), it is never
        sent again blindly (ICD §6): the counters say whether the port emits; if it
        does, the emission runs (how long it has run, ms, is returned); if it does
        not, a fresh EMIT_START is sent once more; a second loss, or a state that
        cannot be learned, trips the session."""
        session = self.session
        ctrl = self.target.controller
        for attempt in (1, 2):
            try:
                await session.command(ctrl.client.emit_start(request))
                return None
            except OutcomeUnknown as exc:
                learned = await session.learn(
                    learn_emit_start(ctrl, self.target.device_port), str(exc), self.port
                )
                em = self._emission
                started = learned.executed or (em is not None and em.ended.is_set())
                log.warning(
                    "emit_start.outcome_learned", port=self.port, emitting=started, attempt=attempt
                )
                if started:
                    return learned.duration_ms
                if attempt == 2:
                    session.trip(TripCause.REPLY_TIMEOUT, "EMIT_START unanswered twice", self.port)
                    raise Stopped() from exc
        raise AssertionError("unreachable")

    async def _run_until_stopped(
        self, em: Emission, prog: StepProgress
    ) -> tuple[str, codec.Stopped]:
        """Until the stop is due, then EMIT_STOP: why the host stopped, and STOPPED."""
        try:
            try:
                host_cause = await self._until_stop(em, prog)
            finally:
                if em.timer is not None:
                    em.timer.cancel()
            em.stop_requested = True
            stopped = await self.session.command(
                self.target.controller.client.emit_stop(self.target.device_port)
            )
        finally:
            em.release_gc()
        if em.ended_by_device is None and stopped.stop_reason != codec.StopReason.HOST_STOP:
            em.ended_by_device = stopped.stop_reason
        return host_cause, stopped

    def _account(
        self, em: Emission, prog: StepProgress, stopped: codec.Stopped, host_cause: str
    ) -> None:
        """A finished emission: both channels' figures, the record, the end-of-emission
        agreement of the channels, the event."""
        order = prog.order
        session = self.session
        ctrl = self.target.controller
        prog.running_us = 0.0
        prog.controller_energy_uj += stopped.delivered_uj
        prog.emitted_us += stopped.duration_ms * 1000
        if host_cause == "dose reached" and order.target_kind is TargetKind.ENERGY:
            # Learn how late the stop landed, by the controller's own count.
            over_uj = prog.controller_energy_uj - order.target_energy_uj
            if order.power_uw > 0 and ctrl.clock.ratio > 0:
                ctrl.learn_stop_lateness(over_uj / order.power_uw / ctrl.clock.ratio)
        emission_host_uj = prog.integrator.energy_uj - em.energy_before_uj
        session.recorder.emission_ended(
            session, order, em.number, emission_host_uj, stopped, host_cause
        )
        disagree = channels_disagree(emission_host_uj, stopped.delivered_uj, session.limits)
        if disagree is not None:
            session.trip(
                TripCause.DOSE_CHANNELS_DISAGREE,
                f"{disagree} at the end of the emission",
                self.port,
            )
        session.emit(
            EventKind.EMISSION_ENDED,
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

    def _stopped_early(self, em: Emission, prog: StepProgress, host_cause: str) -> str:
        """Paused, skin contact lost or footswitch released: the port waits."""
        if em.ended_by_device == codec.StopReason.CONTACT_LOST:
            prog.stop_causes.append("skin contact lost")
            self.contact_lost()
            self.state = PortState.GATED
            self._paused(prog, "skin contact lost; confirm the placement again")
            return "contact"
        if host_cause == "footswitch released":
            prog.stop_causes.append(host_cause)
            self.state = PortState.GATED
            return "footswitch"
        prog.stop_causes.append("paused by operator")
        self.state = PortState.PAUSED
        self._paused(prog, "paused; delivered dose kept")
        return "paused"

    def _paused(self, prog: StepProgress, message: str) -> None:
        self.session.emit(
            EventKind.PORT_PAUSED,
            message,
            self.port,
            prog.order.index,
            {"energy_j": prog.integrator.energy_j},
        )

    def _trip_device_stop(self, reason: int) -> None:
        """The controller ended the emission itself for a reason no operator gave."""
        self.session.trip(
            stop_reason_cause(reason),
            "controller ended the emission: " + codec.describe(codec.StopReason, reason),
            self.port,
        )

    async def _read_back_dark(self, em: Emission) -> bool | None:
        """After STOPPED: True once a sample shows the port dark, False if it stays lit
        for the read-back time, None if no sample arrives at all."""
        port = self.target.device_port
        dark_power_uw = self.session.limits.dark_power_uw

        def lit(t: codec.Telemetry) -> bool:
            """A sample without the port counts as lit: it cannot show it dark."""
            return port > len(t.ports) or port_lit(t.ports[port - 1], dark_power_uw)

        def settled(t: codec.Telemetry) -> bool:
            return port > len(t.ports) or (not lit(t) and em.tail_taken)

        last = await self.target.controller.sample_until(self.session.readback_timeout_s, settled)
        return None if last is None else not lit(last)

    async def _until_stop(self, em: Emission, prog: StepProgress) -> str:
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
                        raise Stopped()
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
        # The safety rules of a running emission (ceilings, deviation, channel
        # agreement, backup timer): the first one broken trips.
        view = self._view
        if self._view_em is not em:  # a new emission: its step once, not every sample
            self._view_em = em
            view.order = order
            view.prog = prog
            view.integ = integ
            view.em = em
        view.power_uw = sample.measured_power_uw
        view.delivered_uj = sample.delivered_uj
        view.device_time_us = t.device_time_us
        site_fluence = session.site_fluence_j_cm2(order)
        view.site_fluence_j_cm2 = site_fluence
        limits = session.limits
        for rule in SAMPLE_RULES:
            detail = rule.check(view, limits)
            if detail is not None:
                session.trip(rule.cause, detail, self.port)
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
        em: Emission,
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
                site = session.site_fluence_j_cm2(order)
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
            self._trip_device_stop(reason)


_OPERATOR_REASONS = {codec.StopReason.HOST_STOP, codec.StopReason.CONTACT_LOST}
