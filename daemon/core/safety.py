"""Safety supervision: the registry of trip causes, the latch, and switching off.

Everything that can end a treatment abnormally is named here, once, with a
distinct code and a sentence a clinician can act on (and the mappings from
interlock bits, controller stop reasons and NAKs to those causes). The
:class:`Supervisor` holds the single latched :meth:`Supervisor.trip`: the first
cause wins, ALL_OFF goes to every controller before anything else happens,
emission is read back from telemetry and escalated if a port keeps emitting,
and only then are the session, the record and the listeners told. Nothing here
waits on MQTT, disk or a client: records and notifications are handed off after
emission is off.

Also here: :func:`switch_off`, the one switch-off-and-read-back routine (the
supervisor, the idle watch, an abort and a shutdown all use it);
:class:`ServiceLatch`, the one service-required latch; and
:class:`SafetyLimits`, whose figures come from the limits registry
(pbmd.protocols.limits). The rules that decide when to trip are data in
:mod:`pbmd.daemon.core.rules`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import structlog

from pbmd.daemon.core.controllers import ControllerHandle
from pbmd.drivers import codec
from pbmd.drivers.client import NakReceived
from pbmd.drivers.listeners import Listeners
from pbmd.protocols.limits import LIMITS, limit

log = structlog.get_logger()


@dataclass(frozen=True)
class CauseInfo:
    code: str
    message: str
    needs_service: bool = False


class _Cause(enum.Enum):
    """A registry entry: the code and the sentence a clinician reads."""

    @property
    def code(self) -> str:
        return str(self.value.code)

    @property
    def message(self) -> str:
        return str(self.value.message)


class TripCause(_Cause):
    """Why a treatment was stopped by the system (not by the operator)."""

    FLUENCE_CEILING = CauseInfo(
        "E101", "The fluence ceiling for a site would have been exceeded; emission stopped."
    )
    IRRADIANCE_CEILING = CauseInfo(
        "E102", "Measured irradiance exceeded the safe ceiling for this wavelength."
    )
    POWER_CEILING = CauseInfo("E103", "Measured optical power exceeded the applicator's maximum.")
    POWER_DEVIATION = CauseInfo(
        "E104",
        f"Measured power differed from the setpoint by more than "
        f"{LIMITS['power_deviation_fraction'].percent} %. "
        "Check the applicator and its calibration.",
    )
    DOSE_CHANNELS_DISAGREE = CauseInfo(
        "E105",
        "The daemon's and the controller's dose measurements disagree. "
        "The delivered dose cannot be trusted; have the system checked.",
    )
    TELEMETRY_STALE = CauseInfo(
        "E201", "The controller stopped reporting measurements; emission stopped."
    )
    REPLY_TIMEOUT = CauseInfo("E202", "The controller did not answer in time; emission stopped.")
    LINK_LOST = CauseInfo("E203", "The connection to the controller was lost; emission stopped.")
    KEY_OFF = CauseInfo("E301", "The key switch was turned off.")
    REMOTE_INTERLOCK_OPEN = CauseInfo("E302", "The remote interlock (door loop) opened.")
    EMERGENCY_STOP = CauseInfo("E303", "The emergency stop was pressed.")
    CONTROLLER_FAULT = CauseInfo("E401", "The controller reported a fault and stopped emission.")
    APPLICATOR_REMOVED = CauseInfo("E402", "An applicator was unplugged during treatment.")
    UNEXPECTED_STOP = CauseInfo(
        "E403", "The controller stopped an emission for a reason the daemon did not expect."
    )
    BACKUP_CHANNEL_STOP = CauseInfo(
        "E404",
        "A backup dose channel (energy budget or timer) ended an emission before the "
        "prescribed dose was measured. Have the system checked.",
    )
    STUCK_EMISSION = CauseInfo(
        "E501",
        "A port kept emitting after it was told to stop. Disconnect the applicator; "
        "the system needs service before further use.",
        needs_service=True,
    )
    IDLE_EMISSION = CauseInfo(
        "E502",
        "A port emitted while no treatment was running; it was switched off. "
        "Have the system checked before the next treatment.",
    )
    PLAN_HASH_MISMATCH = CauseInfo(
        "E601", "The treatment plan changed after it was confirmed; nothing was emitted."
    )
    CALIBRATION_OVERDUE = CauseInfo("E602", "Calibration is overdue; recalibrate before treating.")
    RECORDS_FAILED = CauseInfo(
        "E701", "Treatment records cannot be written (disk full or failing); emission stopped."
    )
    INTERNAL_ERROR = CauseInfo(
        "E901", "An internal error occurred in the daemon; emission stopped."
    )


ACKNOWLEDGE_BEFORE_RESTART: frozenset[TripCause] = frozenset(
    {
        TripCause.IRRADIANCE_CEILING,
        TripCause.POWER_CEILING,
        TripCause.POWER_DEVIATION,
        TripCause.DOSE_CHANNELS_DISAGREE,
        TripCause.TELEMETRY_STALE,
        TripCause.REPLY_TIMEOUT,
        TripCause.LINK_LOST,
        TripCause.BACKUP_CHANNEL_STOP,
    }
)
"""Trips whose cause may still be present while the controller latches nothing (a
weak or miscalibrated emitter, a failing link): the next session would emit into
the same fault. No session starts after one until an operator has acknowledged
that cause by its code (:class:`AcknowledgementGate`). Causes the controller
latches (E401), the interlocks and applicators (read at every start) and the
service latch (E501) have their own gates."""


class EndCause(_Cause):
    """Why a treatment ended early without a fault: a person or the service chose it."""

    OPERATOR_ABORT = CauseInfo("A001", "The operator aborted the treatment.")
    DAEMON_STOPPED = CauseInfo(
        "I001",
        "pbmd was stopped during the treatment; emission was switched off and the "
        "delivered dose recorded. Start a new session to continue.",
    )
    RESTART_RECONCILED = CauseInfo(
        "E902",
        "pbmd stopped during the treatment and was restarted; the delivered dose was "
        "taken from the record and the controller's counters.",
    )


@dataclass(frozen=True)
class Trip:
    cause: TripCause
    detail: str
    port: int | None
    monotonic_s: float
    utc: float

    def describe(self) -> str:
        where = f" (port {self.port})" if self.port is not None else ""
        return f"{self.cause.code} {self.cause.message}{where} {self.detail}".strip()


def _count(name: str) -> int:
    """A whole-number default from the limits registry (µs, µW, µJ, samples)."""
    return int(limit(name))


@dataclass(frozen=True)
class SafetyLimits:
    """The supervisor's thresholds as this engine runs them. Each field is a quantity
    of the limits registry (pbmd.protocols.limits: unit, hard bounds, source);
    :data:`REGISTRY_NAMES` says which, and a value outside its bounds is refused."""

    power_deviation_fraction: float = limit("power_deviation_fraction")
    power_deviation_grace_us: int = _count("power_deviation_grace_us")
    power_ceiling_tolerance: float = limit("power_ceiling_tolerance")
    dose_disagreement_fraction: float = limit("dose_disagreement_fraction")
    dose_disagreement_floor_uj: int = _count("dose_disagreement_floor_uj")
    stale_telemetry_periods: float = limit("stale_telemetry_periods")
    stop_readback_timeout_s: float = limit("stop_readback_timeout_s")
    backup_timer_fraction: float = limit("max_duration_margin")
    """Host backup timer (as the controller's max duration): planned time + this."""
    energy_budget_fraction: float = limit("energy_budget_margin")
    dark_power_uw: int = _count("dark_power_uw")
    idle_lit_samples: int = _count("idle_lit_samples")
    fluence_ceiling_tolerance_fraction: float = limit("fluence_ceiling_tolerance_fraction")

    def __post_init__(self) -> None:
        for f in fields(self):
            LIMITS[REGISTRY_NAMES.get(f.name, f.name)].check(getattr(self, f.name))


REGISTRY_NAMES = {
    "backup_timer_fraction": "max_duration_margin",
    "energy_budget_fraction": "energy_budget_margin",
}
"""SafetyLimits fields named differently from their registry quantity."""


class ControllerPort(Protocol):
    """What the supervisor needs of a controller: stop everything, read back."""

    name: str

    async def all_off(self) -> None: ...
    async def disarm(self) -> None: ...
    def lit_ports(self, dark_power_uw: int = ...) -> set[int]: ...
    async def wait_dark(self, timeout_s: float, dark_power_uw: int = ...) -> bool | None:
        """True: every port dark; False: still lit; None: cannot be read back (no link)."""
        ...


TripListener = Callable[[Trip], None]

ALL_OFF = "ALL_OFF"
DISARM = "DISARM"

TRIP_ESCALATION = (ALL_OFF, ALL_OFF, DISARM)
"""After a trip: the first ALL_OFF (sent to every controller at once), ALL_OFF
again, then DISARM, each read back before the next."""
IDLE_ESCALATION = (ALL_OFF, DISARM)
"""Light with no session running: ALL_OFF, then DISARM, each read back."""
READ_BACK_ONLY = (ALL_OFF,)
"""An abort's ALL_OFF (already sent): read back only; light that stays trips E501."""


@dataclass(frozen=True)
class OffAttempt:
    """One step of a switch-off and what the read-back after it showed."""

    step: str
    error: Exception | None
    """The request failed (sent, but not acknowledged); None when it went through
    or when it was sent before the routine began."""
    dark: bool | None
    """True: every port dark; False: still lit (or the read-back failed); None:
    cannot be read back (no link: the controller's watchdog stops emission)."""
    lit: tuple[int, ...]
    """The ports lit at the read-back (empty unless ``dark`` is False)."""


async def switch_off(
    ctrl: ControllerPort,
    steps: Sequence[str],
    *,
    timeout_s: float,
    dark_power_uw: int,
    first_sent: bool = False,
) -> list[OffAttempt]:
    """The one switch-off-and-read-back routine: each step (ALL_OFF or DISARM) then a
    read-back, escalating to the next step only while the read-back shows light.

    Used by the supervisor after a trip, by the idle watch, and by an abort or a
    shutdown. `first_sent`: the first step was already sent (to every controller
    at once, for latency) and is only read back here. A read-back that fails is
    taken as lit, never as dark."""
    attempts: list[OffAttempt] = []
    for i, step in enumerate(steps):
        error: Exception | None = None
        if not (first_sent and i == 0):
            try:
                await (ctrl.all_off() if step == ALL_OFF else ctrl.disarm())
            except Exception as exc:
                error = exc
        dark: bool | None
        try:
            dark = await ctrl.wait_dark(timeout_s, dark_power_uw)
        except Exception:
            log.exception("switch_off.readback_failed", controller=ctrl.name)
            dark = False
        lit = tuple(sorted(ctrl.lit_ports(dark_power_uw))) if dark is False else ()
        attempts.append(OffAttempt(step, error, dark, lit))
        if dark is not False:
            break
    return attempts


async def all_off_everywhere(
    controllers: Sequence[ControllerPort],
) -> list[tuple[ControllerPort, BaseException]]:
    """ALL_OFF to every controller at once; the ones whose ALL_OFF failed, with why."""
    results = await asyncio.gather(*(c.all_off() for c in controllers), return_exceptions=True)
    return [
        (c, r) for c, r in zip(controllers, results, strict=True) if isinstance(r, BaseException)
    ]


def service_reason(trip: Trip) -> str:
    """What the service-required latch and the session say when a port stayed lit
    through ALL_OFF and DISARM: E501, whatever tripped first (the clinician must act
    on the light now)."""
    stuck = TripCause.STUCK_EMISSION
    if trip.cause is stuck:
        return trip.describe()
    return f"{stuck.code} {stuck.message} (tripped by {trip.describe()})"


class ServiceLatch:
    """The one service-required latch: set when a port stayed lit through ALL_OFF and
    DISARM, in a session or between sessions. No session starts until a technician
    clears it; ``on_set`` is told (the service persists it)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.on_set: Callable[[str], None] | None = None

    def set(self, reason: str) -> None:
        self.reason = reason
        if self.on_set is not None:
            try:
                self.on_set(reason)
            except Exception:
                log.exception("service_latch.listener_failed")


@dataclass(frozen=True)
class Acknowledged:
    """An operator's acknowledgement of a trip: who, when, and what they found."""

    trip: Trip
    session_id: str | None
    user: str
    note: str
    utc: float


class NotAwaited(ValueError):
    """Nothing (or another cause) awaits acknowledgement; the message says which."""


class AcknowledgementGate:
    """After a trip in :data:`ACKNOWLEDGE_BEFORE_RESTART`, no session starts until an
    operator acknowledges that cause by its code (pbmctl session acknowledge CODE)."""

    def __init__(self) -> None:
        self.awaiting: Trip | None = None
        self.session_id: str | None = None
        self.on_change: Callable[[AcknowledgementGate], None] | None = None
        """Told after the gate closes or opens (the service keeps a copy across
        restarts, off the safety path): a restart must not open it."""

    def tripped(self, trip: Trip, session_id: str | None) -> None:
        """A session tripped: hold the gate when the cause may still be present."""
        if trip.cause in ACKNOWLEDGE_BEFORE_RESTART:
            self.awaiting = trip
            self.session_id = session_id
            self._changed()

    def restore(self, code: str, detail: str, port: int | None, session_id: str | None) -> None:
        """Hold the gate again for a trip kept from before a restart."""
        cause = next((c for c in TripCause if c.code == code), None)
        if cause is None:  # unknown or unreadable: held under the most general link cause
            cause, detail = TripCause.LINK_LOST, f"{code}: {detail}"
        self.awaiting = Trip(cause, detail, port, time.monotonic(), time.time())
        self.session_id = session_id

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.exception("acknowledgement.persist_failed")

    def refusal(self) -> str | None:
        """Why no session may start yet, with the command that allows it; or None."""
        trip = self.awaiting
        if trip is None:
            return None
        code = trip.cause.code
        where = f" (session {self.session_id})" if self.session_id else ""
        return (
            f"{code} ended the last session{where}: {trip.describe()} The cause may still "
            f"be present. Find and correct it, then acknowledge it: pbmctl session "
            f'acknowledge {code} --note "what was found"'
        )

    def acknowledge(
        self, code: str, user: str, note: str, record: Callable[[Acknowledged], None]
    ) -> Acknowledged:
        """Open the gate for `code` (the cause awaiting acknowledgement), or NotAwaited.
        `record` is called first; if it raises, the gate stays closed."""
        trip = self.awaiting
        if trip is None:
            raise NotAwaited("no trip awaits acknowledgement; nothing to acknowledge")
        if code.strip().upper() != trip.cause.code:
            raise NotAwaited(
                f"the trip awaiting acknowledgement is {trip.cause.code} "
                f"({trip.cause.message}), not {code}"
            )
        done = Acknowledged(trip, self.session_id, user, note, time.time())
        record(done)
        self.awaiting = None
        self.session_id = None
        self._changed()
        return done


@dataclass(frozen=True)
class IdleEmission:
    """What the idle watch found and did on one controller."""

    controller: str
    ports: tuple[int, ...]
    escalation: tuple[str, ...]
    stuck: bool
    """Still lit after ALL_OFF and DISARM: the system needs service."""
    monotonic_s: float

    def describe(self) -> str:
        cause = TripCause.STUCK_EMISSION if self.stuck else TripCause.IDLE_EMISSION
        ports = ", ".join(str(p) for p in self.ports)
        return (
            f"{cause.code} {cause.message} ({self.controller} port(s) {ports} lit with no "
            f"session running; {' → '.join(self.escalation)})"
        )


_READ_BACK_WORDS = {True: "dark", False: "still lit", None: "cannot read back"}


class IdleWatch:
    """Between sessions nothing may emit. Telemetry that shows a port emitting or lit
    while no session runs gets ALL_OFF at once (EMIT_START inhibited first), then a
    read-back, DISARM if still lit, and a report; light through all of that means
    the system needs service. Runs from the telemetry callback: it never waits on
    disk or clients, and its report is handed on after emission is off."""

    def __init__(
        self,
        idle: Callable[[], bool],
        report: Callable[[IdleEmission], None],
        limits: SafetyLimits,
    ) -> None:
        self._idle = idle
        self._report = report
        self.limits = limits
        self._lit_runs: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: set[str] = set()
        self._known_stuck: dict[str, set[int]] = {}

    def known_stuck(self, controller: str, ports: set[int]) -> None:
        """Light already reported as stuck (service required): not switched off again
        at every sample while it stays; a port lit beyond these still is."""
        if ports:
            self._known_stuck.setdefault(controller, set()).update(ports)

    def on_sample(self, ctrl: ControllerHandle) -> None:
        if not self._idle() or ctrl.name in self._busy:
            self._lit_runs[ctrl.name] = 0
            return
        lit = ctrl.lit_ports(self.limits.dark_power_uw)
        if not lit:
            self._lit_runs[ctrl.name] = 0
            self._known_stuck.pop(ctrl.name, None)
            return
        if lit <= self._known_stuck.get(ctrl.name, set()):
            return
        run = self._lit_runs.get(ctrl.name, 0) + 1
        self._lit_runs[ctrl.name] = run
        if run < self.limits.idle_lit_samples:
            return
        self._busy.add(ctrl.name)
        ctrl.client.inhibit_emission(f"{TripCause.IDLE_EMISSION.code} light with no session")
        task = asyncio.create_task(
            self._switch_off(ctrl, tuple(sorted(lit)), time.monotonic()),
            name=f"idle-watch-{ctrl.name}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _switch_off(
        self, ctrl: ControllerHandle, ports: tuple[int, ...], found_s: float
    ) -> None:
        try:
            attempts = await switch_off(
                ctrl,
                IDLE_ESCALATION,
                timeout_s=self.limits.stop_readback_timeout_s,
                dark_power_uw=self.limits.dark_power_uw,
            )
            escalation = [
                a.step if a.error is None else f"{a.step} failed ({a.error})" for a in attempts
            ]
            last = attempts[-1]
            escalation.append(_READ_BACK_WORDS[last.dark])
            found = IdleEmission(ctrl.name, ports, tuple(escalation), last.dark is False, found_s)
            if last.dark is False:
                self.known_stuck(ctrl.name, set(last.lit))
            log.critical("idle.emission", description=found.describe())
            try:
                self._report(found)
            except Exception:
                log.exception("idle.report_failed")
        finally:
            self._busy.discard(ctrl.name)
            self._lit_runs[ctrl.name] = 0

    async def settled(self) -> None:
        """Wait until every switch-off under way has been reported."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Supervisor:
    """One task and one latch: the first trip turns everything off and stays."""

    def __init__(self, controllers: Sequence[ControllerPort], limits: SafetyLimits) -> None:
        self._controllers = list(controllers)
        self.limits = limits
        self._trip: Trip | None = None
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._listeners: Listeners[Trip] = Listeners("trip", log=log)
        self._latch_hooks: Listeners[Trip] = Listeners("trip latch hook", log=log)
        self._task: asyncio.Task[None] | None = None
        self.escalation: list[str] = []
        self.service_required = False
        self.all_off_sent_monotonic_s: float | None = None

    @property
    def tripped(self) -> Trip | None:
        return self._trip

    def add_listener(self, listener: TripListener) -> Callable[[], None]:
        """Called once emission is off and read back; returns a remover."""
        return self._listeners.add(listener)

    def add_latch_hook(self, hook: TripListener) -> None:
        """Called synchronously inside trip(), before anything awaits (inhibits)."""
        self._latch_hooks.add(hook)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="safety-supervisor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def trip(self, cause: TripCause, detail: str = "", port: int | None = None) -> bool:
        """Latch `cause` if nothing is latched yet. Safe from any callback; never blocks.

        Returns True for the trip that latched, False for later ones (recorded
        by the caller as consequences, not causes).
        """
        if self._trip is not None:
            log.info("trip.ignored_latched", cause=cause.name, detail=detail, port=port)
            return False
        self._trip = Trip(cause, detail, port, time.monotonic(), time.time())
        # The supervisor's task is woken first, so that its ALL_OFF is the first
        # thing the loop runs after this callback; the hooks (inhibit EMIT_START,
        # cancel the session's work) are synchronous and queue behind it.
        self._wake.set()
        self._latch_hooks(self._trip)
        log.error("safety.trip", code=cause.code, cause=cause.name, detail=detail, port=port)
        return True

    async def wait_done(self) -> Trip:
        """Wait until a trip has been fully handled (emission off, listeners told)."""
        await self._done.wait()
        assert self._trip is not None
        return self._trip

    async def _run(self) -> None:
        await self._wake.wait()
        trip = self._trip
        assert trip is not None
        try:
            await self._all_off_everywhere()
            await self._verify_dark()
        except Exception as exc:  # a bug here must not keep the listeners from hearing
            log.exception("trip.handling_failed")
            self.escalation.append(f"trip handling failed: {exc!r}")
        finally:
            self._listeners(trip)
            self._done.set()

    async def _all_off_everywhere(self) -> None:
        failed = await all_off_everywhere(self._controllers)
        self.all_off_sent_monotonic_s = time.monotonic()
        for ctrl, exc in failed:
            self.escalation.append(f"ALL_OFF to {ctrl.name} failed: {exc!r}")
            log.error("trip.all_off_failed", controller=ctrl.name, error=repr(exc))

    async def _verify_dark(self) -> None:
        """Read back that every port stopped; escalate ALL_OFF → DISARM → service.

        A controller that cannot be read back (its link is gone) is not a stuck
        emitter: its own watchdog stops emission within watchdog_ms of the
        last frame (ICD §5), which is noted, not escalated to service.
        """
        for ctrl in self._controllers:
            attempts = await switch_off(
                ctrl,
                TRIP_ESCALATION,
                timeout_s=self.limits.stop_readback_timeout_s,
                dark_power_uw=self.limits.dark_power_uw,
                first_sent=True,
            )
            self._note_escalation(ctrl.name, attempts)
        for line in self.escalation:
            log.critical("trip.escalation", step=line)

    _FAILED = ("ALL_OFF", "second ALL_OFF", "DISARM")
    _STILL_LIT = (
        "still lit after ALL_OFF; ALL_OFF again",
        "still lit; DISARM",
        "still lit after ALL_OFF and DISARM: hardware fault, service required",
    )

    def _note_escalation(self, name: str, attempts: Sequence[OffAttempt]) -> None:
        if attempts[0].dark is None:
            self.escalation.append(
                f"{name}: cannot read back (link down); the controller's watchdog stops emission"
            )
            return
        for i, attempt in enumerate(attempts):
            if attempt.error is not None:
                self.escalation.append(f"{name}: {self._FAILED[i]} failed: {attempt.error!r}")
            if attempt.dark is False:
                self.escalation.append(f"{name}: ports {list(attempt.lit)} {self._STILL_LIT[i]}")
        if attempts[-1].dark is False and len(attempts) == len(TRIP_ESCALATION):
            self.service_required = True


_KEY = int(codec.Interlock.KEY)
_REMOTE = int(codec.Interlock.REMOTE)
_ESTOP_RELEASED = int(codec.Interlock.ESTOP_RELEASED)
_RUN_BITS = _KEY | _REMOTE | _ESTOP_RELEASED


def interlock_cause(bits: int) -> TripCause | None:
    """The trip cause for a set of interlock bits, or None when all are in run state."""
    if bits & _RUN_BITS == _RUN_BITS:  # int arithmetic: checked on every sample
        return None
    if not bits & _ESTOP_RELEASED:
        return TripCause.EMERGENCY_STOP
    if not bits & _KEY:
        return TripCause.KEY_OFF
    return TripCause.REMOTE_INTERLOCK_OPEN


def stop_reason_cause(reason: int) -> TripCause:
    """Map a controller stop reason that the host did not ask for to a trip cause."""
    mapping = {
        codec.StopReason.ENERGY_BUDGET: TripCause.BACKUP_CHANNEL_STOP,
        codec.StopReason.MAX_DURATION: TripCause.BACKUP_CHANNEL_STOP,
        codec.StopReason.INTERLOCK: TripCause.REMOTE_INTERLOCK_OPEN,
        codec.StopReason.WATCHDOG: TripCause.CONTROLLER_FAULT,
        codec.StopReason.OVERPOWER: TripCause.CONTROLLER_FAULT,
        codec.StopReason.OVER_TEMPERATURE: TripCause.CONTROLLER_FAULT,
        codec.StopReason.APPLICATOR_REMOVED: TripCause.APPLICATOR_REMOVED,
    }
    try:
        return mapping.get(codec.StopReason(reason), TripCause.UNEXPECTED_STOP)
    except ValueError:
        return TripCause.UNEXPECTED_STOP


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
