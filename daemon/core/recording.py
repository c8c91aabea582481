"""What the safety core records, and the narrow interface it records through.

The core never imports the records store. It describes what happens as typed
records (the frozen dataclasses below: a session started, an emission ended, an
event, ...) and hands each to a `RecordSink` with ``sink.write(record)``; the
services' SQLite store is one. Records are plain values, so the same objects
could cross a queue to a sink in another thread or process.

`RecordSink` also offers every record as a keyword call built from the record's
own fields (``sink.event("trip", "...", code="E101")`` writes an `Event`), so a
record's parameters are written once, in its dataclass.

`StoreRecorder` turns one session's life (its plan, steps, emissions, events)
into those records; the engine gives one to every session it starts.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, get_args

from pbmd.daemon.core.controllers import ControllerHandle, PortTarget
from pbmd.daemon.core.safety import EndCause
from pbmd.daemon.core.session import (
    EventKind,
    RecordingFailed,
    Session,
    SessionEvent,
    StepOrder,
    StepProgress,
)
from pbmd.drivers import codec
from pbmd.protocols.plan import Plan, PlannedEmission, canonical_json

if TYPE_CHECKING:
    from pbmd.daemon.core.engine import SessionRequest

SessionOutcome = Literal["completed", "aborted", "faulted", "interrupted"]
StepOutcome = Literal["completed", "aborted", "faulted", "interrupted", "skipped"]
Severity = Literal["debug", "info", "warning", "error", "critical"]
UtcTime = datetime | float | None
"""An aware datetime, POSIX seconds, or None for the time the sink writes the record."""


_SESSION_OUTCOMES = frozenset(get_args(SessionOutcome))
_STEP_OUTCOMES = frozenset(get_args(StepOutcome))
_SEVERITIES = frozenset(get_args(Severity))


def _check_choice(value: str, allowed: frozenset[str], what: str) -> None:
    """Refuse a value outside a Literal type at the record's construction, not in the writer."""
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {sorted(allowed)}")


class RecordsError(Exception):
    """Base class of the records store's errors."""


class RecordsUnavailable(RecordsError):
    """Records cannot be written (or read) now; the message says why and how to fix it."""


@dataclass(frozen=True, slots=True)
class SessionPort:
    """A port in use by a session and the applicator the controller reported on it."""

    port: int
    applicator_kind: str
    applicator_serial: str | None = None
    beam_area_cm2: float | None = None
    channels_nm: tuple[int, ...] = ()
    controller: str | None = None
    """The configured name of the controller the port runs on (sessions may span two)."""
    controller_serial: str | None = None
    controller_firmware: str | None = None


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """Everything fixed when a session starts: who, what protocol, which frozen plan."""

    session_id: str
    protocol_id: str
    protocol_version: int
    protocol_sha256: str
    plan_hash: str
    plan_json: str
    """The canonical JSON the plan hash was computed over, stored byte for byte."""
    patient_ref: str
    contraindications: Mapping[str, bool | None]
    """Screening answers: contraindication name -> present (None: not asked)."""
    ports: Sequence[SessionPort]
    session_token: int | None = None
    signing_key_id: str | None = None
    protocol_title: str | None = None
    controller_serial: str | None = None
    controller_firmware: str | None = None
    operator: str | None = None
    course_sessions: int | None = None
    course_interval_days: float | None = None
    time_scale: float = 1.0
    notes: str | None = None
    skin_type: str | None = None
    """Fitzpatrick skin type I–VI as asked at start (None: not asked)."""
    state: str = "ready"
    started_utc: UtcTime = None


@dataclass(frozen=True, slots=True)
class StepStarted:
    """One step of the plan as it starts: the Jenkins & Carroll parameters it prescribes."""

    session_id: str
    port: int
    step_index: int
    site: str
    wavelength_nm: int
    mode: str
    """"continuous" or "pulsed"."""
    power_setpoint_mw: float
    """Average optical power setpoint."""
    area_cm2: float
    """Beam (emitting) area at the skin."""
    target_kind: str
    """Which quantity ends the step: "fluence_j_cm2", "energy_j" or "time_s"."""
    target_value: float
    prescribed_energy_j: float | None
    prescribed_fluence_j_cm2: float | None
    planned_time_s: float | None
    max_time_s: float | None = None
    site_label: str | None = None
    region: str | None = None
    area_covered_cm2: float | None = None
    technique: str | None = None
    pulse_hz: float | None = None
    duty_permille: int | None = None
    pulse_width_ns: float | None = None
    peak_power_mw: float | None = None
    started_utc: UtcTime = None


SessionStart = SessionStarted
"""The name the store's callers know the record by."""
StepStart = StepStarted
"""The name the store's callers know the record by."""


@dataclass(frozen=True, slots=True)
class SessionStateChanged:
    """The session's latest state (idle, ready, armed, running, paused, ...)."""

    session_id: str
    state: str


@dataclass(frozen=True, slots=True)
class EmissionStarted:
    """An EMIT_START as sent. The sink answers with the emission's sequence number, unique
    in the records and increasing in start order, that the emission's later records name."""

    session_id: str
    step_index: int | None
    request: codec.EmitStart
    _: KW_ONLY
    port: int | None = None
    """The session's (logical) port, the one its steps use; default: the request's."""
    device_time_us: int | None = None
    utc: UtcTime = None


@dataclass(frozen=True, slots=True)
class EmissionProgress:
    """Latest energies of a running emission (host integrator, controller telemetry).

    Sent as often as telemetry arrives: within one batch the sink writes only the
    latest of an emission, so a crash loses at most one batch."""

    seq: int
    _: KW_ONLY
    host_energy_uj: float
    controller_energy_uj: float | None = None
    device_time_us: int | None = None
    utc: UtcTime = None


@dataclass(frozen=True, slots=True)
class EmissionEnded:
    """The end of an emission: the STOPPED reply (controller channel) and why the host
    stopped it. Controller fields are None when no STOPPED arrived."""

    seq: int
    _: KW_ONLY
    host_stop_cause: str
    host_energy_uj: float | None
    controller_energy_uj: float | None = None
    duration_ms: int | None = None
    stop_reason: codec.StopReason | int | None = None
    device_time_us: int | None = None
    utc: UtcTime = None
    provisional: bool = False
    """The controller energy is the last telemetry sample (the link was lost): a lower
    bound until GET_COUNTERS on reconnection replaces it (`EmissionReconciled`)."""


@dataclass(frozen=True, slots=True)
class EmissionReconciled:
    """After a restart or a reconnection: the controller energy of an unfinished or
    provisional emission, read by GET_COUNTERS (final from then on)."""

    seq: int
    _: KW_ONLY
    controller_energy_uj: int
    duration_ms: int | None
    stop_reason: codec.StopReason | int | None
    host_stop_cause: str = "interrupted (daemon restarted)"
    utc: UtcTime = None


@dataclass(frozen=True, slots=True)
class PortReconciled:
    """After a restart: dose the controller counted on a port that no emission holds.

    Sent after `EmissionReconciled` for the port's open emission. If the counters'
    session total exceeds the recorded controller energies, the sink adds one
    emission of origin 'counters' with the difference and answers with the
    sequence number that emission gets if it is needed."""

    session_id: str
    port: int
    """The session's (logical) port, as in `EmissionStarted`."""
    _: KW_ONLY
    controller_session_delivered_uj: int
    step_index: int | None = None
    utc: UtcTime = None


@dataclass(frozen=True, slots=True)
class StepEnded:
    """How a step ended. Delivered values left None are summed from its emissions
    (energy, emitting time) and derived from those (fluence, irradiance)."""

    session_id: str
    port: int
    step_index: int
    _: KW_ONLY
    outcome: StepOutcome
    stop_cause_code: str | None = None
    stop_cause_message: str | None = None
    delivered_host_j: float | None = None
    delivered_controller_j: float | None = None
    delivered_fluence_j_cm2: float | None = None
    mean_irradiance_mw_cm2: float | None = None
    emitting_time_s: float | None = None
    utc: UtcTime = None

    def __post_init__(self) -> None:
        _check_choice(self.outcome, _STEP_OUTCOMES, "step outcome")


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened (a trip, a refusal, a reconciliation), queued for MQTT too.
    The sink answers with its id."""

    kind: str
    message: str
    _: KW_ONLY
    code: str | None = None
    session_id: str | None = None
    port: int | None = None
    severity: Severity = "info"
    device_time_us: int | None = None
    data: Mapping[str, Any] | None = None
    utc: UtcTime = None
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        _check_choice(self.severity, _SEVERITIES, "severity")


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """A session closed. Steps and emissions still open are closed with it: their
    delivered totals are summed from the emission rows (both channels)."""

    session_id: str
    _: KW_ONLY
    outcome: SessionOutcome
    stop_cause_code: str | None = None
    stop_cause_message: str | None = None
    state: str | None = None
    utc: UtcTime = None

    def __post_init__(self) -> None:
        _check_choice(self.outcome, _SESSION_OUTCOMES, "session outcome")


Record = (
    SessionStarted
    | SessionStateChanged
    | StepStarted
    | EmissionStarted
    | EmissionProgress
    | EmissionEnded
    | EmissionReconciled
    | PortReconciled
    | StepEnded
    | Event
    | SessionEnded
)
"""Every record the core writes."""

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Rec = TypeVar("_Rec")
Answer = int | str | None
"""What `RecordSink.write` answers: an emission's number, an event's id, or None."""


def _keyword_call(
    record_type: Callable[_P, _Rec], answer: Callable[[Answer, _Rec], _R]
) -> Callable[Concatenate[RecordSink, _P], _R]:
    """A sink method whose parameters are the record's fields: it builds the record,
    writes it, and returns what ``answer`` makes of the sink's answer."""

    def call(self: RecordSink, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        record = record_type(*args, **kwargs)
        return answer(self.write(record), record)  # type: ignore[arg-type]

    call.__doc__ = record_type.__doc__
    return call


def _nothing(answer: Answer, record: object) -> None:
    return None


def _number(answer: Answer, record: object) -> int:
    if not isinstance(answer, int):
        raise TypeError(f"the sink answered {record!r} with {answer!r}, not its number")
    return answer


def _event_id(answer: Answer, record: Event) -> str:
    return record.event_id


class RecordSink(abc.ABC):
    """Where the core's records go (the services' RecordStore implements it).

    `write` only queues the record (no I/O on the caller's thread); `sync` is the
    barrier the engine awaits at step boundaries. ``on_failure`` is called on the
    event loop when records can no longer be written.
    """

    on_failure: Callable[[BaseException], None] | None = None

    @abc.abstractmethod
    def write(self, record: Record) -> Answer:
        """Queue one record. Answers an `EmissionStarted` or `PortReconciled` with the
        emission's sequence number, an `Event` with its id, anything else with None."""

    @abc.abstractmethod
    def check_ready(self) -> None:
        """Refuse a new session (RecordsUnavailable) if its records could not be kept."""

    @abc.abstractmethod
    async def sync(self) -> None:
        """Resolve when everything written before is durable (RecordsUnavailable if not)."""

    @abc.abstractmethod
    async def unfinished_sessions(self) -> list[dict[str, Any]]:
        """Sessions never closed (the daemon died), with their steps and emissions."""

    @abc.abstractmethod
    async def sessions_to_reconcile(self) -> list[dict[str, Any]]:
        """Sessions whose dose waits for the controllers' counters: those never closed
        and those holding a provisional emission (a link was lost while it ran)."""

    # Each record as a keyword call, its parameters those of the record.

    def session_started(self, record: SessionStarted) -> None:
        self.write(record)

    def step_started(self, record: StepStarted) -> None:
        self.write(record)

    session_state = _keyword_call(SessionStateChanged, _nothing)
    emission_started = _keyword_call(EmissionStarted, _number)
    emission_progress = _keyword_call(EmissionProgress, _nothing)
    emission_ended = _keyword_call(EmissionEnded, _nothing)
    reconcile_emission = _keyword_call(EmissionReconciled, _nothing)
    reconcile_port = _keyword_call(PortReconciled, _number)
    step_ended = _keyword_call(StepEnded, _nothing)
    event = _keyword_call(Event, _event_id)
    session_ended = _keyword_call(SessionEnded, _nothing)


def _session_port(port: int, target: PortTarget) -> SessionPort:
    """A port in use, its applicator and the controller it runs on."""
    applicator = target.applicator
    return SessionPort(
        port=port,
        applicator_kind=codec.describe(codec.ApplicatorKind, applicator.applicator_kind),
        applicator_serial=applicator.applicator_serial,
        beam_area_cm2=applicator.area_mm2 / 100.0,
        channels_nm=tuple(c.wavelength_nm for c in applicator.channels),
        controller=target.controller.name,
        controller_serial=target.controller.info.serial,
        controller_firmware=target.controller.info.firmware,
    )


class StoreRecorder:
    """Writes one session to the records store (the session's Recorder)."""

    def __init__(
        self,
        store: RecordSink,
        request: SessionRequest,
        controller: ControllerHandle,
        plan: Plan | None = None,
    ) -> None:
        self.store = store
        self.request = request
        self.controller = controller
        self.plan = plan or request.plan
        """The plan as verified at start (a private copy): what the records describe."""
        self._emissions: dict[tuple[int, int, int], int] = {}
        self.provisional: list[int] = []
        """Emissions recorded with a provisional controller energy (the link was lost)."""

    def session_started(self, session: Session) -> None:
        plan = self.plan
        ports = [_session_port(p, session.port_map[p]) for p in session.runners]
        self.store.write(
            SessionStarted(
                session_id=session.id,
                protocol_id=plan.protocol_id,
                protocol_version=plan.protocol_version,
                protocol_sha256=plan.protocol_sha256,
                plan_hash=plan.content_hash,
                plan_json=canonical_json(plan).decode("utf-8"),
                patient_ref=session.patient_ref,
                contraindications=dict(self.request.contraindications),
                ports=ports,
                session_token=session.token,
                signing_key_id=self.request.signing_key_id,
                protocol_title=plan.protocol_title,
                controller_serial=self.controller.info.serial,
                controller_firmware=self.controller.info.firmware,
                operator=self.request.operator,
                course_sessions=plan.course.sessions,
                course_interval_days=plan.course.interval_days,
                time_scale=self.controller.clock.ratio,
                skin_type=plan.skin_type,
            )
        )

    def _emission(self, port: int, step: int) -> PlannedEmission:
        return next(e for e in self.plan.port(port).emissions if e.step_index == step)

    def step_started(self, session: Session, step: StepOrder) -> None:
        e = self._emission(step.port, step.index)
        self.store.write(
            StepStarted(
                session_id=session.id,
                port=step.port,
                step_index=step.index,
                site=e.site_id,
                site_label=e.site_label,
                region=e.region.value,
                area_covered_cm2=e.area_covered_cm2,
                technique=e.technique.value,
                wavelength_nm=e.wavelength_nm,
                mode="pulsed" if e.mode == codec.EmitMode.PULSED else "continuous",
                pulse_hz=e.pulse_hz or None,
                duty_permille=e.duty_permille if e.mode == codec.EmitMode.PULSED else None,
                pulse_width_ns=e.pulse_width_ns,
                peak_power_mw=e.peak_power_mw,
                power_setpoint_mw=e.power_uw / 1000.0,
                area_cm2=e.area_mm2 / 100.0,
                target_kind=e.target.value,
                target_value=e.target_value,
                prescribed_energy_j=e.target_energy_uj / 1e6,
                prescribed_fluence_j_cm2=e.target_energy_uj / 1e6 / (e.area_mm2 / 100.0),
                planned_time_s=e.expected_duration_ms / 1000.0,
                max_time_s=e.backup_time_s,
            )
        )

    def emission_started(
        self,
        session: Session,
        step: StepOrder,
        emission_no: int,
        request: codec.EmitStart,
        device_time_us: int | None,
    ) -> None:
        record = EmissionStarted(
            session.id, step.index, request, port=step.port, device_time_us=device_time_us
        )
        self._emissions[(step.port, step.index, emission_no)] = _number(
            self.store.write(record), record
        )

    def emission_progress(
        self,
        session: Session,
        step: StepOrder,
        emission_no: int,
        host_energy_uj: float,
        controller_energy_uj: int,
        device_time_us: int,
    ) -> None:
        seq = self._emissions.get((step.port, step.index, emission_no))
        if seq is not None:
            self.store.write(
                EmissionProgress(
                    seq,
                    host_energy_uj=host_energy_uj,
                    controller_energy_uj=controller_energy_uj,
                    device_time_us=device_time_us,
                )
            )

    def emission_ended(
        self,
        session: Session,
        step: StepOrder,
        emission_no: int,
        host_energy_uj: float,
        stopped: codec.Stopped | None,
        host_stop_cause: str,
        provisional: bool = False,
    ) -> None:
        seq = self._emissions.get((step.port, step.index, emission_no))
        if seq is None:
            return
        if provisional:
            self.provisional.append(seq)
        self.store.write(
            EmissionEnded(
                seq,
                host_stop_cause=host_stop_cause,
                host_energy_uj=host_energy_uj,
                controller_energy_uj=stopped.delivered_uj if stopped else None,
                duration_ms=stopped.duration_ms if stopped and not provisional else None,
                stop_reason=stopped.stop_reason if stopped and not provisional else None,
                provisional=provisional,
            )
        )

    def step_ended(self, session: Session, step: StepOrder, progress: StepProgress) -> None:
        outcome = {"completed": "completed", "skipped": "skipped"}.get(progress.outcome)
        if outcome is None:
            if session.supervisor.tripped:
                outcome = "faulted"
            elif session.end_cause is EndCause.DAEMON_STOPPED:
                outcome = "interrupted"
            else:
                outcome = "aborted"
        integ = progress.integrator
        self.store.write(
            StepEnded(
                session.id,
                step.port,
                step.index,
                outcome=outcome,  # type: ignore[arg-type]
                stop_cause_code=session.cause_code
                if outcome in ("faulted", "aborted", "interrupted")
                else None,
                stop_cause_message=summarize_causes(progress.stop_causes),
                delivered_host_j=integ.energy_j,
                delivered_controller_j=progress.controller_energy_uj / 1e6,
                delivered_fluence_j_cm2=integ.fluence_j_cm2,
                mean_irradiance_mw_cm2=_mean_irradiance(progress),
                emitting_time_s=progress.emitted_us / 1e6 if progress.emissions else None,
            )
        )

    def event(self, event: SessionEvent) -> None:
        severity = _SEVERITY.get(event.kind, "info")
        code = event.data.get("code") if event.kind in _SEVERITY else None
        self.store.write(
            Event(
                event.kind.value,
                event.message,
                code=str(code) if code is not None else None,
                session_id=event.session_id,
                port=event.port,
                severity=severity,  # type: ignore[arg-type]
                data=dict(event.data) | ({"step": event.step} if event.step is not None else {}),
            )
        )

    def session_ended(self, session: Session) -> None:
        self.store.write(
            SessionEnded(
                session.id,
                outcome=session.state.value,  # type: ignore[arg-type]
                stop_cause_code=session.cause_code,
                stop_cause_message=session.cause_message,
            )
        )

    async def sync(self) -> None:
        try:
            await self.store.sync()
        except RecordsError as exc:
            raise RecordingFailed(str(exc)) from exc


_SEVERITY = {
    EventKind.TRIP: "error",
    EventKind.ABORT: "warning",
    EventKind.INTERRUPT: "warning",
    EventKind.SERVICE_REQUIRED: "critical",
}
"""Event kinds that carry a cause code, and how severe they are."""


def summarize_causes(causes: Sequence[str]) -> str | None:
    """Each distinct cause once, in the order first seen, with how often it stopped the
    step: a step paused five times reads "paused by operator ×5", not the phrase five
    times over. Idempotent, so a record already summarized (or one written by an older
    pbmd, its causes joined with "; ") reads the same through it."""
    counts: dict[str, int] = {}
    for cause in causes:
        text, sep, times = cause.strip().rpartition(" ×")
        if not (sep and times.isdigit()):
            text, times = cause.strip(), "1"
        if text:
            counts[text] = counts.get(text, 0) + int(times)
    return "; ".join(c if n == 1 else f"{c} ×{n}" for c, n in counts.items()) or None


def _mean_irradiance(progress: StepProgress) -> float | None:
    """Delivered energy over the controller's emitting time, per area (DOSIMETRY.md)."""
    if not progress.emitted_us:
        return None
    seconds = progress.emitted_us / 1e6
    energy_j = (progress.controller_energy_uj or progress.integrator.energy_uj) / 1e6
    return energy_j / seconds * 1000.0 / progress.order.area_cm2
