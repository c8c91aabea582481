"""What a session runs and reports: its states, its step orders, live progress,
events and the recorder it writes to. Shared by the session and its port runners."""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pbmd.daemon.core.dose import DoseIntegrator
from pbmd.drivers import codec

if TYPE_CHECKING:
    pass


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
    phase: int = 0
    """The phase the step runs in: it starts when every step of earlier phases has ended."""
    patches: frozenset[str] = frozenset()
    """The patches of skin whose fluence this step adds to (empty: its site's name)."""

    @functools.cached_property
    def skin(self) -> frozenset[str]:
        """The patches of skin the fluence ceiling is counted on."""
        return self.patches or frozenset((self.site,))

    """Host backup timer (the step's max_time_s); None: planned time + 20 %."""

    @property
    def gated(self) -> bool:
        return self.confirm_placement or self.skin_contact or self.footswitch


class EventKind(enum.StrEnum):
    """What a session event says happened. The value is the kind's name on the
    wire (API watch, MQTT ``events``) and in the records."""

    STATE = "state"
    """The session changed state (data: from, to, cause)."""
    CONFIRMED = "confirmed"
    PAUSE_REQUESTED = "pause_requested"
    RESUMED = "resumed"
    ABORT = "abort"
    INTERRUPT = "interrupt"
    TRIP = "trip"
    SERVICE_REQUIRED = "service_required"
    LINK_LOST = "link_lost"
    REPLY_TIMEOUT = "reply_timeout"
    CONTROLLER_EVENT = "controller_event"
    DISARM_FAILED = "disarm_failed"
    STEP_SKIPPED = "step_skipped"
    STEP_STARTED = "step_started"
    STEP_COMPLETED = "step_completed"
    PORT_WAITING = "port_waiting"
    PORT_PAUSED = "port_paused"
    EMISSION_STARTED = "emission_started"
    EMISSION_ENDED = "emission_ended"
    PHASE_STARTED = "phase_started"
    """Every step of the earlier phases has ended: this phase's ports may start
    (data: phase, ports)."""


@dataclass(frozen=True)
class SessionEvent:
    """Something that happened, for watchers, records and dashboards."""

    kind: EventKind
    session_id: str
    message: str
    port: int | None = None
    step: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    utc: float = field(default_factory=time.time)


SessionListener = Callable[[SessionEvent], None]


class SessionError(Exception):
    """An operator request that cannot be done now, with what to do instead."""


class RecordingFailed(Exception):
    """The recorder could not make a record durable (raised by StoreRecorder.sync)."""


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


class Stopped(Exception):
    """A port runner or the session's work ends because the session was tripped or aborted."""
