"""A treatment session: the state machine from arming to its end.

One :class:`Session` runs a frozen plan. Each logical port has a
:class:`~pbmd.daemon.core.runner.PortRunner` task that walks its steps in
order. The controller's energy budget and max duration, and the host's own
backup timer, stand behind the host's stop (margins in
:mod:`pbmd.protocols.limits`). Every check is a rule in
:mod:`pbmd.daemon.core.rules`; anything wrong goes to the one
:class:`~pbmd.daemon.core.safety.Supervisor` latch.

Nothing resumes by itself: a trip ends the session; a pause, a lost probe
contact or a released footswitch wait for an operator's action.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.emission import GC_QUIET
from pbmd.daemon.core.link_health import (
    Learned,
    OutcomeNotLearned,
    StalenessWatch,
    learn_arm,
)
from pbmd.daemon.core.phases import PhaseGate
from pbmd.daemon.core.rules import (
    CONTROLLER_RULES,
    EVENT_RULES,
    TELEMETRY_STALE,
    ControllerView,
    EventView,
    first_broken,
)
from pbmd.daemon.core.runner import PortRunner
from pbmd.daemon.core.safety import (
    READ_BACK_ONLY,
    EndCause,
    SafetyLimits,
    Supervisor,
    Trip,
    TripCause,
    all_off_everywhere,
    nak_cause,
    service_reason,
    switch_off,
)
from pbmd.daemon.core.status import SessionStatus
from pbmd.daemon.core.steps import (
    EventKind,
    PortState,
    RecordingFailed,
    SessionError,
    SessionEvent,
    SessionListener,
    SessionState,
    StepOrder,
    StepProgress,
    Stopped,
    TargetKind,
)
from pbmd.drivers import codec
from pbmd.drivers.client import (
    ClientError,
    EmissionInhibited,
    LinkClosed,
    NakReceived,
    OutcomeUnknown,
    ReplyTimeout,
)
from pbmd.drivers.listeners import Listeners

__all__ = [
    "EventKind",
    "PortRunner",
    "PortState",
    "RecordingFailed",
    "Session",
    "SessionError",
    "SessionEvent",
    "SessionListener",
    "SessionState",
    "StepOrder",
    "StepProgress",
    "TargetKind",
]

if TYPE_CHECKING:
    from pbmd.daemon.core.recording import StoreRecorder

log = structlog.get_logger()

T = TypeVar("T")

RECANCEL_INTERVAL_S = 0.25
"""While a trip or an abort waits for the session's work to stop, how often the
work is cancelled again (emission is already off: this bounds a hang, not a dose)."""
_ARMED = (codec.ControllerState.ARMED_DELAY, codec.ControllerState.ARMED_READY)


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
        recorder: StoreRecorder,
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
        self.phase_gate = PhaseGate(steps, self._phase_opened)
        self.runners = {
            port: PortRunner(self, port_map[port], list(port_steps))
            for port, port_steps in sorted(steps.items())
        }
        # Which steps reach each patch of skin at each wavelength (read on every sample).
        self._on_skin: dict[tuple[str, int], list[StepProgress]] = {}
        for runner in self.runners.values():
            for prog in runner.progress:
                for patch in prog.order.skin:
                    self._on_skin.setdefault((patch, prog.order.wavelength_nm), []).append(prog)
        self._listeners: Listeners[SessionEvent] = Listeners("session event", log=log)
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
        self._controller_view = ControllerView()
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

    def site_fluence_j_cm2(self, order: StepOrder) -> float:
        """The highest fluence at the order's wavelength on any patch of skin it reaches,
        from every step of the session that reaches that patch (v1: its site's name)."""
        highest = 0.0
        for patch in order.skin:
            total = 0.0
            for prog in self._on_skin[(patch, order.wavelength_nm)]:
                total += prog.integrator.fluence_j_cm2
            highest = max(highest, total)
        return highest

    def _phase_opened(self, phase: int, ports: tuple[int, ...]) -> None:
        if len(self.phase_gate.phases) > 1:
            self.emit(
                EventKind.PHASE_STARTED,
                f"phase {phase + 1} of {len(self.phase_gate.phases)}: ports "
                + ", ".join(map(str, ports)),
                data={"phase": phase, "ports": list(ports)},
            )

    def status(self) -> SessionStatus:
        trip = self.supervisor.tripped
        return SessionStatus(
            session_id=self.id,
            state=self.state,
            protocol_id=self.protocol_id,
            protocol_version=self.protocol_version,
            plan_hash=self.plan_hash,
            patient_ref=self.patient_ref,
            started_utc=self.started_utc,
            ended_utc=self.ended_utc,
            cause_code=self.cause_code,
            cause_message=self.cause_message,
            trip=trip.describe() if trip is not None else None,
            service_required=self.supervisor.service_required,
            ports=tuple(r.status() for r in self.runners.values()),
        )

    def add_listener(self, listener: SessionListener) -> Callable[[], None]:
        return self._listeners.add(listener)

    def emit(
        self,
        kind: EventKind,
        message: str,
        port: int | None = None,
        step: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        event = SessionEvent(kind, self.id, message, port, step, dict(data or {}))
        log.info(
            "session.event",
            kind=kind.value,
            session_id=self.id,
            port=port,
            step=step,
            message=message,
        )
        try:
            self.recorder.event(event)
        except Exception:
            log.exception("session.record_event_failed")
        self._listeners(event)

    def _set_state(self, state: SessionState, cause: str) -> None:
        previous = self.state
        self.state = state
        self.emit(
            EventKind.STATE,
            f"{previous.value} → {state.value}: {cause}",
            data={"from": previous.value, "to": state.value, "cause": cause},
        )

    # ---------------------------------------------------------- operator

    def confirm(self, port: int) -> None:
        self._runner(port).confirm()
        self.emit(EventKind.CONFIRMED, "placement confirmed by operator", port)

    def pause(self, port: int | None = None) -> None:
        self._require_running("pause")
        for runner in self._runners(port):
            runner.request_pause()
        self.emit(EventKind.PAUSE_REQUESTED, "pause requested by operator", port)

    def resume(self, port: int | None = None) -> None:
        self._require_running("resume")
        for runner in self._runners(port):
            runner.request_resume()
        self.emit(EventKind.RESUMED, "resumed by operator", port)

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
        failed = [
            f"{c.name}: {r!r}" for c, r in await all_off_everywhere(self.port_map.controllers())
        ]
        kind = EventKind.ABORT if cause is EndCause.OPERATOR_ABORT else EventKind.INTERRUPT
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
            raise Stopped()
        if not self._verify_plan():
            self.trip(
                TripCause.PLAN_HASH_MISMATCH, f"plan {self.plan_hash[:12]} changed", order.port
            )
            raise Stopped()
        overdue = self._calibration_overdue() if self._calibration_overdue else None
        if overdue:
            self.trip(TripCause.CALIBRATION_OVERDUE, overdue, order.port)
            raise Stopped()

    async def command(self, aw: Awaitable[T]) -> T:
        """Await a controller request; a late reply or lost link trips the session.

        OutcomeUnknown (EMIT_START or ARM unanswered on a healthy link) goes to
        the caller, which learns the outcome before anything else (ICD §6)."""
        try:
            return await aw
        except OutcomeUnknown:
            raise
        except ReplyTimeout as exc:
            self.trip(TripCause.REPLY_TIMEOUT, str(exc))
            raise Stopped() from exc
        except LinkClosed as exc:
            self.trip(TripCause.LINK_LOST, str(exc))
            raise Stopped() from exc
        except EmissionInhibited as exc:
            # A trip or an abort got there first; it is the cause, not this.
            raise Stopped() from exc

    async def sync_records(self) -> None:
        """Make the records durable (a step boundary); a failure trips the session."""
        try:
            await self.recorder.sync()
        except RecordingFailed as exc:
            self.trip(TripCause.RECORDS_FAILED, str(exc))
            raise Stopped() from exc

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
        except Stopped:
            pass
        except BaseExceptionGroup as group:
            # Runners that stopped because of a trip end the group with Stopped.
            rest = group.subgroup(lambda e: not isinstance(e, Stopped | asyncio.CancelledError))
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
            raise Stopped()  # aborted before it began
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
            raise Stopped()
        # READY: plan hash, calibration.
        first = next(iter(self.runners.values()), None)
        if not self._verify_plan():
            self.trip(TripCause.PLAN_HASH_MISMATCH, "plan changed before arming")
            raise Stopped()
        overdue = self._calibration_overdue() if self._calibration_overdue else None
        if overdue:
            self.trip(TripCause.CALIBRATION_OVERDUE, overdue, first.port if first else None)
            raise Stopped()
        self._set_state(SessionState.READY, "plan verified, controller ready")
        # ARMED: emission indicator on, emission delay.
        for ctrl in self.port_map.controllers():
            await self._arm(ctrl)
        self._set_state(SessionState.ARMED, "armed; emission delay running")
        await self._wait_armed_ready()
        self._set_state(SessionState.RUNNING, "emission delay elapsed")
        self.phase_gate.start()
        async with asyncio.TaskGroup() as group:
            for runner in self.runners.values():
                group.create_task(runner.run(), name=f"port-{runner.port}")

    async def _arm(self, ctrl: ControllerHandle) -> None:
        """ARM one controller. An ARM left unanswered is never sent again blindly:
        the counters say whether it took effect; if not, it is asked once more."""
        t = ctrl.telemetry
        if t is not None and t.state in _ARMED:
            # Still armed: a previous session's DISARM did not land (its reply was
            # lost). ARM while armed would not restart the emission delay (ICD §5a).
            await self.command(ctrl.client.disarm())
        for attempt in (1, 2):
            try:
                await self.command(ctrl.client.arm(self.token))
                return
            except NakReceived as exc:
                self.trip(nak_cause(exc, ctrl.interlocks), f"{ctrl.name}: ARM refused: {exc}")
                raise Stopped() from exc
            except OutcomeUnknown as exc:
                learned = await self.learn(learn_arm(ctrl, self.token), f"{ctrl.name}: {exc}")
                log.warning("arm.outcome_learned", controller=ctrl.name, armed=learned.executed)
                if learned.executed:
                    return
                if attempt == 2:
                    self.trip(TripCause.REPLY_TIMEOUT, f"{ctrl.name}: ARM unanswered twice")
                    raise Stopped() from exc

    async def learn(self, aw: Awaitable[Learned], what: str, port: int | None = None) -> Learned:
        """The outcome of an unanswered EMIT_START or ARM (`what`), or a trip saying
        that it could not be learned (the state of the controller is unknown)."""
        try:
            return await self.command(aw)
        except OutcomeNotLearned as exc:
            cause = TripCause.LINK_LOST if exc.link_lost else TripCause.REPLY_TIMEOUT
            self.trip(cause, f"{what}; the controller's state could not be learned: {exc}", port)
            raise Stopped() from exc

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
                    raise Stopped() from None
                if self.supervisor.tripped is not None:
                    raise Stopped()
                if tele.state == codec.ControllerState.ARMED_READY:
                    break

    async def _watch_staleness(self) -> None:
        """Telemetry older than N sample periods is a link fault (ICD §6), judged on
        the link, not on the host's own lateness (:class:`StalenessWatch`)."""
        watch = StalenessWatch(
            self.port_map.controllers(),
            self.limits,
            self.telemetry_period_s,
            functools.partial(self.trip, TELEMETRY_STALE.cause),
        )
        await watch.run()

    def _on_link_lost(self, name: str, exc: BaseException) -> None:
        if self._closing:
            # Emission already ended and was read back; closing out only notes it.
            self.emit(EventKind.LINK_LOST, f"{name}: {exc}")
            return
        self.trip(TripCause.LINK_LOST, f"{name}: {exc}")

    def _on_reply_timeout(self, name: str, exc: BaseException) -> None:
        """A missed reply deadline is a link fault (ICD §6), heartbeats included."""
        if self._closing:
            self.emit(EventKind.REPLY_TIMEOUT, f"{name}: {exc}")
            return
        self.trip(TripCause.REPLY_TIMEOUT, f"{name}: {exc}")

    def _check_controller(self, name: str, t: codec.Telemetry, host_s: float = 0.0) -> None:
        if self.state.final or self.state is SessionState.IDLE or self._closing:
            # Closing out disarms: the samples after it are expected to say so.
            return
        view = self._controller_view
        view.t = t
        view.running = self.state is SessionState.RUNNING
        broken = first_broken(CONTROLLER_RULES, view, self.limits)
        if broken is not None:
            rule, detail = broken
            self.trip(rule.cause, f"{name}: {detail}")

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
        on_port = self._runners_on(controller, ev.port)
        view = EventView(ev, bool(on_port) and not self.state.final)
        broken = first_broken(EVENT_RULES, view, self.limits)
        if broken is not None:
            rule, detail = broken
            self.trip(
                rule.cause, f"{controller}: {detail}", on_port[0].port if rule.at_port else None
            )
        if ev.code == codec.EventCode.EMISSION_ENDED:
            for runner in on_port:
                runner.on_emission_ended(ev.value)
        elif ev.code == codec.EventCode.INTERLOCK_CHANGED:
            for runner in self.runners.values():
                runner.interlocks_changed()
        elif ev.code == codec.EventCode.CONTACT_CHANGED:
            for runner in on_port:
                if ev.value == 0:
                    runner.contact_lost()
                runner.gate_inputs_changed()
        self.emit(EventKind.CONTROLLER_EVENT, f"{data['code']} value {ev.value}", data=data)

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
            provisional = delivered is None  # no counters: the last sample, a lower bound
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
                if not em.acked and (provisional or em.seen_emitting or delivered):
                    # Its reply never came, yet it may have run (or did): it is
                    # recorded, so its energy is not lost from the record.
                    self.recorder.emission_started(self, prog.order, em.number, em.request, None)
                self.recorder.emission_ended(
                    self, prog.order, em.number, host_uj, stopped, cause, provisional=provisional
                )
            except Exception:
                log.exception("session.record_emission_failed")
            prog.controller_energy_uj += delivered or 0
            if duration_ms is not None:
                prog.emitted_us += duration_ms * 1000
                prog.running_us = 0.0
            runner._drop_emission()

    async def _final_state(self) -> SessionState:
        """How the session ends: an abort's ALL_OFF read back (light that stays is a
        fault), a trip's handling waited for, and the cause set."""
        if self.supervisor.tripped is None and self.aborting:
            # An abort's ALL_OFF is read back like a trip's; light that stays is a fault.
            for ctrl in self.port_map.controllers():
                attempts = await switch_off(
                    ctrl,
                    READ_BACK_ONLY,
                    timeout_s=self.readback_timeout_s,
                    dark_power_uw=self.limits.dark_power_uw,
                    first_sent=True,
                )
                if attempts[-1].dark is False:
                    self.trip(
                        TripCause.STUCK_EMISSION,
                        f"{ctrl.name}: ports {list(attempts[-1].lit)} still lit after ALL_OFF",
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
            if self.supervisor.service_required:
                # Whatever tripped first, a port that stayed lit through ALL_OFF and
                # DISARM is what the clinician must act on now.
                self.cause_code = TripCause.STUCK_EMISSION.code
                self.cause_message = service_reason(trip)
            final = SessionState.FAULTED
        elif self.aborting:
            final = (
                SessionState.INTERRUPTED
                if self.end_cause is EndCause.DAEMON_STOPPED
                else SessionState.ABORTED
            )
        else:
            final = SessionState.COMPLETED
        return final

    async def _finish(self) -> None:
        self._closing = True
        if self._stale_task is not None:
            self._stale_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stale_task
        final = await self._final_state()
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
                self.emit(EventKind.DISARM_FAILED, f"{ctrl.name}: {exc}")
        self.ended_utc = time.time()
        self._set_state(final, self.cause_message or final.value)
        try:
            if self.started_utc is None:
                # Stopped before its record began (a trip while the clock settled):
                # the session the operator started still gets its record and cause.
                self.started_utc = self.ended_utc
                self.recorder.session_started(self)
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
