"""The treatment engine: controllers, the records store and one session at a time.

The engine is the library the service wraps. It refuses a session that could
not be delivered or recorded safely (records unavailable, calibration
overdue, a controller fault or open interlock, an applicator that is not the
one the plan was made for, a contraindicated protocol), turns a frozen plan
into the steps each port runs, and on start reconciles sessions that a crash
left open, or a link loss left provisional, from the controllers' own counters.

It also holds the operator's use cases (start a protocol by id, confirm, pause,
resume, abort, check a protocol against the connected applicators), so that
every transport (the control API, MQTT, a second API) only adapts its own
parameters and replies to them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.plan_steps import REGIONS_BLOCKED, applicator_mismatch, steps_from_plan
from pbmd.daemon.core.reconciliation import reconcile_sessions
from pbmd.daemon.core.recording import RecordsError, RecordSink, RecordsUnavailable, StoreRecorder
from pbmd.daemon.core.safety import (
    Acknowledged,
    AcknowledgementGate,
    IdleEmission,
    IdleWatch,
    NotAwaited,
    SafetyLimits,
    ServiceLatch,
    Supervisor,
    Trip,
    TripCause,
    interlock_cause,
    service_reason,
)
from pbmd.daemon.core.session import Session, SessionError, SessionListener, StepOrder
from pbmd.daemon.core.status import stale_reason, staleness_limit_s
from pbmd.daemon.core.steps import EventKind, SessionEvent
from pbmd.drivers import codec
from pbmd.drivers.client import ClientError
from pbmd.drivers.listeners import Listeners
from pbmd.protocols.errors import Issue, PlanError
from pbmd.protocols.limits import Limits
from pbmd.protocols.loader import LoadedProtocol
from pbmd.protocols.model import Contraindication, Protocol
from pbmd.protocols.plan import Plan, content_hash
from pbmd.protocols.plan import plan as make_plan
from pbmd.protocols.store import InstalledProtocol, ProtocolLibrary

log = structlog.get_logger()

GIL_SWITCH_INTERVAL_S = 0.0005
"""How long another thread may hold the GIL before the event loop's thread gets it."""


class StartRefused(SessionError):
    """A session was not started; the message says why and what to do."""

    def __init__(self, message: str, cause: TripCause | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class Unanswered(StartRefused):
    """The operator has not answered every contraindication the protocol lists."""

    def __init__(self, protocol_id: str, missing: list[str]) -> None:
        super().__init__(
            f"answer every contraindication {protocol_id} lists before starting; "
            f"unanswered: {', '.join(missing)} (pbmctl: --contraindication NAME=no)"
        )
        self.missing = missing


class NotRunnable(StartRefused):
    """The protocol cannot be planned for the applicators connected now."""

    def __init__(self, protocol_id: str, exc: PlanError) -> None:
        super().__init__(f"{protocol_id} cannot run on the connected applicators: {exc}")
        self.issues: list[Issue] = list(exc.errors)


class NoSession(SessionError):
    """An operator command (confirm, pause, resume, abort) with no session running."""


class CommandRefused(SessionError):
    """A technician's command the engine will not carry out now; the message says why."""


@dataclass(frozen=True)
class SessionRequest:
    plan: Plan
    patient_ref: str
    contraindications: Mapping[str, bool]
    ports: tuple[int, ...] | None = None
    signing_key_id: str | None = None
    protocol_title: str | None = None
    operator: str | None = None
    contraindicated_by_protocol: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StartCommand:
    """What an operator asks for: an installed protocol, for a patient, on some ports."""

    protocol_id: str
    patient_ref: str
    contraindications: Mapping[str, bool]
    """Screening answers, name -> present; every one the protocol lists is required."""
    ports: tuple[int, ...] | None = None
    operator: str | None = None
    skin_type: str | None = None
    """The patient's Fitzpatrick skin type (I–VI), recorded and used for any derating
    the site configures; None when the caller did not ask."""


class Engine:
    """Controllers, records and the current session."""

    def __init__(
        self,
        port_map: PortMap,
        store: RecordSink,
        *,
        limits: SafetyLimits | None = None,
        telemetry_hz: int = 50,
        calibration_due: dt.date | None = None,
        today: Callable[[], dt.date] = dt.date.today,
        gil_switch_interval_s: float | None = GIL_SWITCH_INTERVAL_S,
    ) -> None:
        if gil_switch_interval_s is not None:
            # Process-wide, deliberately: the engine's event loop must get the GIL
            # back from other threads (the records writer) within a millisecond or
            # so, not the interpreter's default 5 ms, or stops go out late.
            sys.setswitchinterval(gil_switch_interval_s)
        self.store = store
        self.limits = limits or SafetyLimits()
        self.idle_watch = IdleWatch(self._idle, self._idle_emission, self.limits)
        self._idle_detach: list[Callable[[], None]] = []
        self.port_map = port_map
        self.telemetry_hz = telemetry_hz
        self.calibration_due = calibration_due
        self._today = today
        self.session: Session | None = None
        self.service_latch = ServiceLatch()
        self.acknowledgements = AcknowledgementGate()
        """Holds the next start after a trip whose cause may still be present."""
        self.unreconciled: dict[str, str] = {}
        """Sessions a crash left open that could not be reconciled yet, with why."""
        self._listeners: Listeners[SessionEvent] = Listeners("session event", log=log)
        if store.on_failure is None:
            # A treatment that cannot be recorded stops, whoever opened the store.
            store.on_failure = self.on_records_failure

    def add_listener(self, listener: SessionListener) -> Callable[[], None]:
        """Session events of every session this engine runs; returns a remover."""
        return self._listeners.add(listener)

    @property
    def port_map(self) -> PortMap:
        return self._port_map

    @port_map.setter
    def port_map(self, port_map: PortMap) -> None:
        """A new map (a controller reconnected): the idle watch follows its controllers."""
        for undo in self._idle_detach:
            undo()
        self._port_map = port_map
        self._idle_detach = [
            ctrl.add_sample_listener(functools.partial(self._idle_sample, ctrl))
            for ctrl in port_map.controllers()
        ]

    def _idle_sample(self, ctrl: ControllerHandle, t: codec.Telemetry, now_s: float) -> None:
        self.idle_watch.on_sample(ctrl)

    def _idle(self) -> bool:
        return self.session is None or self.session.closed

    @property
    def service_required(self) -> str | None:
        """Why the system needs service (no session starts), or None."""
        return self.service_latch.reason

    @service_required.setter
    def service_required(self, reason: str | None) -> None:
        """Restored from, or cleared by, the service (a technician's action)."""
        self.service_latch.reason = reason

    @property
    def on_service_required(self) -> Callable[[str], None] | None:
        """Told once the latch is set, after emission is off (the service persists it)."""
        return self.service_latch.on_set

    @on_service_required.setter
    def on_service_required(self, listener: Callable[[str], None] | None) -> None:
        self.service_latch.on_set = listener

    def _idle_emission(self, found: IdleEmission) -> None:
        """Emission is off (or could not be): record it; light that stayed latches service."""
        cause = TripCause.STUCK_EMISSION if found.stuck else TripCause.IDLE_EMISSION
        if found.stuck and not self.service_required:
            self.service_latch.set(found.describe())
        try:
            self.store.event(
                "idle_emission",
                found.describe(),
                code=cause.code,
                severity="critical" if found.stuck else "error",
                data={
                    "controller": found.controller,
                    "ports": list(found.ports),
                    "escalation": list(found.escalation),
                    "service_required": found.stuck,
                },
            )
        except Exception:
            log.exception("engine.idle_record_failed")

    async def close(self) -> None:
        """Stop watching (the service is stopping or the controllers are going)."""
        for undo in self._idle_detach:
            undo()
        self._idle_detach.clear()
        await self.idle_watch.close()

    @property
    def controllers(self) -> list[ControllerHandle]:
        return self.port_map.controllers()

    # ------------------------------------------------------------------ checks

    def calibration_overdue(self) -> str | None:
        """Why calibration is overdue, or None while it is valid."""
        if self.calibration_due is not None and self._today() > self.calibration_due:
            return (
                f"calibration was due on {self.calibration_due.isoformat()}; recalibrate "
                "and update the due date"
            )
        return None

    def check_ready(self, ports: tuple[int, ...] | None = None) -> None:
        """Raise StartRefused with what to do, unless a session could start now."""
        if self.session is not None and not self.session.state.final:
            raise StartRefused(
                f"session {self.session.id} is {self.session.state.value}; "
                "end it before starting another"
            )
        if self.service_required:
            raise StartRefused(
                f"the system needs service: {self.service_required}", TripCause.STUCK_EMISSION
            )
        try:
            self.store.check_ready()
        except RecordsUnavailable as exc:
            raise StartRefused(
                f"{TripCause.RECORDS_FAILED.code} {exc}", TripCause.RECORDS_FAILED
            ) from exc
        if self.unreconciled:
            ids = ", ".join(sorted(self.unreconciled))
            raise StartRefused(
                f"session(s) {ids} left open by a restart could not be reconciled "
                "with the controller's counters yet; reconnect the controller (pbmd "
                "reconciles them as soon as it answers) before starting a session "
                "(a new session would reset the counters)"
            )
        overdue = self.calibration_overdue()
        if overdue:
            raise StartRefused(
                f"{TripCause.CALIBRATION_OVERDUE.code} {overdue}", TripCause.CALIBRATION_OVERDUE
            )
        for port, target in self.port_map.items():
            problem = target.controller.applicator_problem(target.device_port)
            if problem is not None and (ports is None or port in ports):
                raise StartRefused(f"port {port}: {problem}", TripCause.APPLICATOR_REMOVED)
        for ctrl in self.controllers:
            if not ctrl.client.is_open:
                raise StartRefused(f"controller {ctrl.name} is not connected", TripCause.LINK_LOST)
            stale = stale_reason(ctrl, staleness_limit_s(self.limits, self.telemetry_hz))
            if stale is not None:  # no telemetry yet, or too old to judge the controller by
                raise StartRefused(stale, TripCause.TELEMETRY_STALE)
            t = ctrl.telemetry
            assert t is not None
            if t.state == codec.ControllerState.FAULT:
                raise StartRefused(
                    f"controller {ctrl.name} has a latched fault "
                    f"({codec.describe(codec.FaultCode, t.fault_code)}): find the cause, then "
                    "clear the fault",
                    TripCause.CONTROLLER_FAULT,
                )
            cause = interlock_cause(t.interlocks)
            if cause is not None:
                raise StartRefused(
                    f"{cause.code} {cause.message} Close it, then start again.", cause
                )
            lit = sorted(ctrl.lit_ports(self.limits.dark_power_uw))
            if lit:
                raise StartRefused(
                    f"controller {ctrl.name}: ports {lit} emit while no session runs; "
                    "disconnect the applicators and have the system checked",
                    TripCause.STUCK_EMISSION,
                )
        # Last: a condition present now is what the operator must see first; once
        # nothing is wrong that pbmd can see, the last trip still needs a person.
        awaiting = self.acknowledgements.awaiting
        refusal = self.acknowledgements.refusal()
        if awaiting is not None and refusal is not None:
            raise StartRefused(refusal, awaiting.cause)

    # ---------------------------------------------------------------- use cases

    def plan_for(self, protocol: Protocol, limits: Limits, skin_type: str | None = None) -> Plan:
        """The protocol planned for the applicators connected now, or NotRunnable."""
        try:
            return make_plan(protocol, self.port_map.applicators(), limits, skin_type)
        except PlanError as exc:
            raise NotRunnable(protocol.id, exc) from None

    async def start_protocol(self, library: ProtocolLibrary, command: StartCommand) -> Session:
        """Start an installed protocol for a patient, as an operator asks for it by id.

        Refuses (StartRefused, or the library's LibraryError for a protocol that
        is not installed or no longer verifies) before anything is planned when
        the system is not ready, when a contraindication the protocol lists is
        unanswered, or when the protocol cannot run on the connected applicators.
        """
        self.check_ready(command.ports)
        loaded, entry = await asyncio.to_thread(_load, library, command.protocol_id)
        protocol = loaded.protocol
        listed = {c.value for c in protocol.contraindications}
        answers = {str(k): bool(v) for k, v in command.contraindications.items()}
        missing = sorted(listed - set(answers))
        if missing:
            raise Unanswered(protocol.id, missing)
        plan = await asyncio.to_thread(self.plan_for, protocol, library.limits, command.skin_type)
        session = await self.start_session(
            SessionRequest(
                plan=plan,
                patient_ref=command.patient_ref,
                contraindications=answers,
                ports=command.ports,
                signing_key_id=entry.signed_by,
                protocol_title=protocol.title,
                operator=command.operator,
                contraindicated_by_protocol=frozenset(listed),
            )
        )
        log.info(
            "session.started_by",
            session_id=session.id,
            protocol=protocol.id,
            user=command.operator,
            ports=list(session.runners),
        )
        return session

    def running(self, what: str) -> Session:
        """The session an operator command is for, or NoSession saying there is none."""
        s = self.session
        if s is None or s.state.final:
            raise NoSession(
                f"no session is running, nothing to {what}; start one with pbmctl session start"
            )
        return s

    def confirm(self, port: int) -> None:
        """The operator confirms the placement on a gated port."""
        self.running("confirm").confirm(port)

    def pause(self, port: int | None) -> None:
        """Pause one port, or every port (None)."""
        self.running("pause").pause(port)

    def resume(self, port: int | None) -> None:
        """Resume one port, or every port (None)."""
        self.running("resume").resume(port)

    async def abort(self, reason: str, operator: str | None) -> Session:
        """Stop all emission and end the session, saying who aborted it."""
        s = self.running("abort")
        await s.abort(f"{reason} ({operator})")
        return s

    def _refuse_mid_session(self, what: str) -> None:
        s = self.session
        if s is not None and not s.state.final:
            raise CommandRefused(f"a session is running; end it before {what}")

    async def clear_fault(self, ctrl: ControllerHandle | None, name: str, user: str) -> None:
        """Clear a controller's latched fault (a technician found its cause), never mid-session."""
        self._refuse_mid_session("clearing a fault")
        if ctrl is None or not ctrl.client.is_open:
            raise CommandRefused(f"controller {name} is not connected")
        try:
            await ctrl.client.clear_fault()
        except ClientError as exc:
            raise CommandRefused(f"controller {name} refused CLEAR_FAULT: {exc}") from None
        log.warning("controller.fault_cleared", controller=name, user=user)

    def clear_service_required(self, user: str, note: str, forget: Callable[[], None]) -> str:
        """A technician has serviced the system: record who and what, then allow sessions.

        `forget` removes the latch's stored copy first (the service's file); if it
        raises, the latch holds. Returns the cause that was cleared.
        """
        cause = self.service_required
        if cause is None:
            raise CommandRefused("no service is required; nothing to clear")
        self._refuse_mid_session("clearing")
        forget()
        self.service_required = None
        self.store.event(
            "service_cleared",
            f"service done by {user}: {note}",
            severity="warning",
            data={"user": user, "note": note, "cause": cause},
        )
        log.warning("service.cleared", user=user, note=note, cause=cause)
        return cause

    def acknowledge(self, cause_code: str, user: str, note: str) -> Acknowledged:
        """An operator acknowledges the cause of the last trip (found and corrected, or
        judged gone): recorded with who and when, then sessions may start again."""
        self._refuse_mid_session("acknowledging a trip")

        def record(done: Acknowledged) -> None:
            self.store.event(
                "trip_acknowledged",
                f"{done.trip.cause.code} acknowledged by {user}: {note}",
                code=done.trip.cause.code,
                session_id=done.session_id,
                severity="warning",
                data={"user": user, "note": note, "trip": done.trip.describe()},
            )

        try:
            done = self.acknowledgements.acknowledge(cause_code, user, note, record)
        except NotAwaited as exc:
            raise CommandRefused(str(exc)) from None
        log.warning("trip.acknowledged", code=done.trip.cause.code, user=user, note=note)
        return done

    # ----------------------------------------------------------------- sessions

    async def start_session(self, request: SessionRequest) -> Session:
        """Start a session, or raise StartRefused (recorded as an event) saying why."""
        # The session's tasks must not inherit the caller's log context (an API
        # connection's client, uid, pid): they outlive it and log for the session.
        saved = dict(structlog.contextvars.get_contextvars())
        structlog.contextvars.clear_contextvars()
        try:
            await self._settle_previous()
            return self._start_session(request)
        except StartRefused as exc:
            self._record_refusal(request, exc)
            raise
        finally:
            structlog.contextvars.bind_contextvars(**saved)

    async def _settle_previous(self) -> None:
        """The last session closed with provisional energy (a lost reply leaves one on a
        link that stays up, not only a lost link): read the counters now, before this
        start's ARM resets them; if they cannot be read, it stays in ``unreconciled``
        and the start is refused."""
        prev = self.session
        recorder = prev.recorder if prev is not None and prev.closed else None
        waiting = isinstance(recorder, StoreRecorder) and bool(recorder.provisional)
        if not waiting and not self.unreconciled:
            return
        try:
            await self.store.sync()
            settled = await self.reconcile()
        except (ClientError, RecordsError) as exc:
            log.error("sessions.reconcile_failed", error=str(exc))
            return
        if (
            isinstance(recorder, StoreRecorder)
            and prev is not None
            and (prev.id in settled or prev.id not in self.unreconciled)
        ):
            recorder.provisional.clear()

    def _record_refusal(self, request: SessionRequest, exc: StartRefused) -> None:
        cause = exc.cause
        try:
            self.store.event(
                "start_refused",
                str(exc),
                code=cause.code if cause is not None else None,
                severity="warning",
                data={
                    "cause": cause.name if cause is not None else None,
                    "protocol_id": request.plan.protocol_id,
                    "protocol_version": request.plan.protocol_version,
                    "patient_ref": request.patient_ref,
                },
            )
        except Exception:
            log.exception("engine.record_refusal_failed")
        log.warning("session.refused", reason=str(exc))

    def _screen(self, request: SessionRequest) -> tuple[tuple[int, ...], set[str]]:
        """The ports to run and the contraindications present, or StartRefused."""
        plan = request.plan
        if not plan.verify():
            raise StartRefused(
                f"{TripCause.PLAN_HASH_MISMATCH.code} the plan does not match its hash; plan again",
                TripCause.PLAN_HASH_MISMATCH,
            )
        ports = request.ports or tuple(p.port for p in plan.ports)
        unknown = [p for p in ports if p not in {pp.port for pp in plan.ports}]
        if unknown:
            raise StartRefused(
                f"ports {unknown} are not in protocol {plan.protocol_id!r} "
                f"(it uses {[p.port for p in plan.ports]})"
            )
        self.check_ready(ports)
        answers = {str(k): bool(v) for k, v in request.contraindications.items()}
        known = {c.value for c in Contraindication}
        bad = sorted(set(answers) - known)
        if bad:
            raise StartRefused(f"unknown contraindication(s) {bad}; known: {sorted(known)}")
        present = {k for k, v in answers.items() if v}
        refusing = sorted(
            present
            & set(request.contraindicated_by_protocol)
            - {c.value for c in REGIONS_BLOCKED}
            - {Contraindication.EPILEPSY.value}
        )
        if refusing:
            raise StartRefused(
                f"protocol {plan.protocol_id!r} is contraindicated for this "
                f"patient: {', '.join(refusing)}"
            )
        for port in ports:
            wrong = applicator_mismatch(plan.port(port), self.port_map[port].applicator)
            if wrong is not None:
                raise StartRefused(
                    f"port {port}: {wrong}; plug in the applicator the plan was made for, "
                    "or plan again for the one plugged in",
                    TripCause.APPLICATOR_REMOVED,
                )
        return ports, present

    def _steps(
        self, plan: Plan, ports: tuple[int, ...], present: set[str]
    ) -> dict[int, list[StepOrder]]:
        """Each port's steps, unless every one of them is contraindicated."""
        all_steps = steps_from_plan(plan, self.port_map)
        steps = {p: all_steps[p] for p in ports}
        blocked = {
            p: all(s.blocked_by & present for s in port_steps) for p, port_steps in steps.items()
        }
        if all(blocked.values()):
            names = sorted({c for ss in steps.values() for s in ss for c in s.blocked_by & present})
            raise StartRefused(
                f"every step of protocol {plan.protocol_id!r} on ports {list(ports)} is "
                f"contraindicated for this patient ({', '.join(names)}); nothing would be "
                "delivered"
            )
        return steps

    def _start_session(self, request: SessionRequest) -> Session:
        plan = request.plan
        ports, present = self._screen(request)
        # The session runs from a private copy of the verified plan; the caller's
        # object is checked against the same hash before every emission too, so an
        # edit anywhere is caught rather than silently ignored.
        frozen = plan.model_copy(deep=True)
        steps = self._steps(frozen, ports, present)
        sub_map = PortMap({p: self.port_map[p] for p in ports})
        supervisor = Supervisor(sub_map.controllers(), self.limits)
        for ctrl in sub_map.controllers():
            supervisor.add_latch_hook(functools.partial(_inhibit, ctrl))
        expected_hash = plan.content_hash

        def verify() -> bool:
            return content_hash(plan) == expected_hash and content_hash(frozen) == expected_hash

        recorder = StoreRecorder(self.store, request, sub_map.controllers()[0], frozen)
        session = Session(
            plan_hash=expected_hash,
            verify_plan=verify,
            steps=steps,
            port_map=sub_map,
            supervisor=supervisor,
            recorder=recorder,
            limits=self.limits,
            telemetry_hz=self.telemetry_hz,
            patient_ref=request.patient_ref,
            contraindications=frozenset(present),
            protocol_id=plan.protocol_id,
            protocol_version=plan.protocol_version,
            calibration_overdue=self.calibration_overdue,
        )
        session.add_listener(self._listeners)
        supervisor.add_listener(functools.partial(_emit_trip, session, supervisor))

        def on_trip(trip: Trip) -> None:
            self.acknowledgements.tripped(trip, session.id)
            if supervisor.service_required:
                dark_uw = self.limits.dark_power_uw
                for ctrl in sub_map.controllers():
                    self.idle_watch.known_stuck(ctrl.name, ctrl.lit_ports(dark_uw))
                self.service_latch.set(service_reason(trip))
                session.emit(
                    EventKind.SERVICE_REQUIRED,
                    "a port kept emitting after ALL_OFF and DISARM; no session can start "
                    "until the system has been serviced",
                    trip.port,
                    data={"code": TripCause.STUCK_EMISSION.code},
                )

        supervisor.add_listener(on_trip)
        supervisor.start()
        for ctrl in sub_map.controllers():
            ctrl.client.release_emission()
        self.session = session
        session.start()
        return session

    def on_records_failure(self, exc: BaseException) -> None:
        """The store could not write: a running treatment that cannot be recorded stops."""
        s = self.session
        if s is not None and not s.state.final:
            s.trip(TripCause.RECORDS_FAILED, str(exc))

    # ------------------------------------------------------------ reconciliation

    async def reconcile(self) -> list[str]:
        """Settle sessions whose dose waits for the controllers' counters: left open by
        a restart, or closed with a provisional emission after a link loss (see
        `reconciliation`). One that cannot be read yet stays in ``unreconciled``."""
        s = self.session
        if s is not None and not s.closed:
            # Reading counters switches off a port found emitting: never under a running
            # session. What waits stays in ``unreconciled`` for the next reconnection.
            return []
        own = s.id if s is not None else None
        return await reconcile_sessions(self.store, self.port_map, self.unreconciled, own=own)


def _load(library: ProtocolLibrary, protocol_id: str) -> tuple[LoadedProtocol, InstalledProtocol]:
    """An installed protocol, re-verified, and its index entry (worker thread)."""
    return library.load(protocol_id), library.show(protocol_id)


def _emit_trip(session: Session, supervisor: Supervisor, trip: Trip) -> None:
    """The session's record of a trip: what tripped, the escalation, how fast all went off."""
    session.emit(
        EventKind.TRIP,
        trip.describe(),
        trip.port,
        data={
            "code": trip.cause.code,
            "cause": trip.cause.name,
            "escalation": list(supervisor.escalation),
            "service_required": supervisor.service_required,
            "all_off_after_ms": (
                (supervisor.all_off_sent_monotonic_s - trip.monotonic_s) * 1000
                if supervisor.all_off_sent_monotonic_s is not None
                else None
            ),
        },
    )


def _inhibit(ctrl: ControllerHandle, trip: Trip) -> None:
    ctrl.client.inhibit_emission(f"{trip.cause.code} {trip.cause.name}")
