"""The safety rules, as data: what each watches, the limits it reads, its cause.

Every check that can stop a treatment is a :class:`Rule` in one of the tables
below, in the order it is checked (the first broken rule is the cause). A
rule's ``check`` returns None while all is well, or the detail a trip records;
whoever evaluates a table calls the one latch, ``Supervisor.trip``, with the
rule's cause. Limits come from the limits registry (pbmd.protocols.limits,
through ``SafetyLimits``) or from the frozen plan's ceilings (the order).

The per-sample table runs in the telemetry reader's callback, 50–100 times a
second per port: its input is one :class:`SampleView` per port runner,
refilled in place, and a rule that holds costs one function call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pbmd.daemon.core.dose import DoseIntegrator
from pbmd.daemon.core.emission import Emission
from pbmd.daemon.core.safety import SafetyLimits, TripCause
from pbmd.daemon.core.steps import StepOrder, StepProgress
from pbmd.drivers import codec

if TYPE_CHECKING:
    from pbmd.daemon.core.session import Session

In = TypeVar("In")


@dataclass(frozen=True)
class Rule(Generic[In]):
    """One safety rule."""

    name: str
    watches: str
    """What it looks at, in words."""
    cause: TripCause
    limits: tuple[str, ...]
    """The quantities of the limits registry it reads (SafetyLimits fields)."""
    check: Callable[[In, SafetyLimits], str | None]
    """None while the rule holds; else the detail of the trip."""
    at_port: bool = False
    """The trip names the session's port where it happened (else the whole session)."""


def first_broken(
    rules: Sequence[Rule[In]], value: In, limits: SafetyLimits
) -> tuple[Rule[In], str] | None:
    """The first rule `value` breaks, with the detail; None when all hold."""
    for rule in rules:
        detail = rule.check(value, limits)
        if detail is not None:
            return rule, detail
    return None


# ------------------------------------------------- every sample of an emission


class SampleView:
    """What one telemetry sample says about a running emission, for the rules.
    One per port runner, refilled in place at every sample (no allocation)."""

    __slots__ = (
        "delivered_uj",
        "device_time_us",
        "em",
        "integ",
        "order",
        "power_uw",
        "prog",
        "session",
        "site_fluence_j_cm2",
    )

    def __init__(self, session: Session) -> None:
        self.session = session
        self.order: StepOrder
        self.prog: StepProgress
        self.integ: DoseIntegrator
        self.em: Emission
        self.power_uw = 0
        self.delivered_uj = 0
        self.device_time_us = 0
        self.site_fluence_j_cm2 = 0.0


def backup_total_us(order: StepOrder, limits: SafetyLimits) -> float:
    """The host backup timer: the step's max time, else planned time + the margin."""
    if order.backup_time_s is not None:
        return order.backup_time_s * 1e6
    return order.planned_time_s * 1e6 * (1 + limits.backup_timer_fraction)


def channels_disagree(host_uj: float, controller_uj: int, limits: SafetyLimits) -> str | None:
    """The host's and the controller's dose of one emission differ beyond the limit."""
    allowed = max(
        limits.dose_disagreement_fraction * controller_uj, limits.dose_disagreement_floor_uj
    )
    if abs(host_uj - controller_uj) > allowed:
        return f"host {host_uj / 1e6:.3f} J vs controller {controller_uj / 1e6:.3f} J"
    return None


def _power_ceiling(v: SampleView, limits: SafetyLimits) -> str | None:
    ceiling = v.order.channel_max_power_uw
    if ceiling and v.power_uw > ceiling * (1 + limits.power_ceiling_tolerance):
        return f"{v.power_uw / 1000:.1f} mW measured, applicator maximum {ceiling / 1000:.1f} mW"
    return None


def _irradiance_ceiling(v: SampleView, limits: SafetyLimits) -> str | None:
    # After the first full interval: the first sample's mean holds the rise.
    if v.em.samples < 2:
        return None
    irradiance = v.integ.irradiance_mw_cm2(v.power_uw)
    ceiling = v.order.irradiance_ceiling_mw_cm2
    if irradiance > ceiling:
        return f"{irradiance:.1f} mW/cm² measured, ceiling {ceiling:.1f} mW/cm²"
    return None


def _fluence_ceiling(v: SampleView, limits: SafetyLimits) -> str | None:
    o = v.order
    if v.site_fluence_j_cm2 > o.fluence_ceiling_j_cm2 * (
        1 + limits.fluence_ceiling_tolerance_fraction
    ):
        return (
            f"{v.site_fluence_j_cm2:.2f} J/cm² at {o.site} {o.wavelength_nm} nm, "
            f"ceiling {o.fluence_ceiling_j_cm2} J/cm²"
        )
    return None


def _power_deviation(v: SampleView, limits: SafetyLimits) -> str | None:
    """Measured vs setpoint, after the first full interval (the rise is ~1 ms), for
    longer than the grace time (device time)."""
    setpoint = v.order.power_uw
    em = v.em
    if em.samples < 2 or setpoint <= 0:
        return None
    if abs(v.power_uw - setpoint) / setpoint <= limits.power_deviation_fraction:
        em.deviation_since_us = None
        return None
    if em.deviation_since_us is None:
        # From the start of the interval this sample covers.
        em.deviation_since_us = int(v.device_time_us - v.session.telemetry_period_us())
    if v.device_time_us - em.deviation_since_us >= limits.power_deviation_grace_us:
        return f"{v.power_uw / 1000:.1f} mW measured, setpoint {setpoint / 1000:.1f} mW"
    return None


def _running_channels(v: SampleView, limits: SafetyLimits) -> str | None:
    return channels_disagree(v.integ.energy_uj - v.em.energy_before_uj, v.delivered_uj, limits)


def _backup_timer(v: SampleView, limits: SafetyLimits) -> str | None:
    if v.prog.emitting_us > backup_total_us(v.order, limits):
        return "host backup timer expired before the prescribed dose was measured"
    return None


SAMPLE_RULES: tuple[Rule[SampleView], ...] = (
    Rule("power ceiling", "measured power vs the applicator channel's maximum",
         TripCause.POWER_CEILING, ("power_ceiling_tolerance",), _power_ceiling),
    Rule("irradiance ceiling", "measured irradiance vs the plan's ceiling (skin MPE, site)",
         TripCause.IRRADIANCE_CEILING, (), _irradiance_ceiling),
    Rule("fluence ceiling", "the site's fluence per wavelength this session vs its ceiling",
         TripCause.FLUENCE_CEILING, ("fluence_ceiling_tolerance_fraction",), _fluence_ceiling),
    Rule("power deviation", "measured power vs the setpoint, sustained",
         TripCause.POWER_DEVIATION, ("power_deviation_fraction", "power_deviation_grace_us"),
         _power_deviation),
    Rule("dose channels agree", "host vs controller energy of the running emission",
         TripCause.DOSE_CHANNELS_DISAGREE,
         ("dose_disagreement_fraction", "dose_disagreement_floor_uj"), _running_channels),
    Rule("host backup timer", "emitting time of the step vs the backup timer",
         TripCause.BACKUP_CHANNEL_STOP, ("backup_timer_fraction",), _backup_timer),
)  # fmt: skip
"""Checked on every sample of a running emission, after it shows emitting."""


# ------------------------------------------- every sample of each controller


class ControllerView:
    """One controller's latest telemetry, for the rules (refilled in place)."""

    __slots__ = ("running", "t")

    def __init__(self) -> None:
        self.t: codec.Telemetry
        self.running = False


def _fault(v: ControllerView, limits: SafetyLimits) -> str | None:
    t = v.t
    if t.state == codec.ControllerState.FAULT or t.fault_code:
        return f"fault {codec.describe(codec.FaultCode, t.fault_code)}"
    return None


def _interlock(bit: codec.Interlock) -> Callable[[int], str | None]:
    mask = int(bit)

    def check(bits: int) -> str | None:
        return None if bits & mask else f"interlock bits {bits:04b}"

    return check


_ESTOP = _interlock(codec.Interlock.ESTOP_RELEASED)
_KEY = _interlock(codec.Interlock.KEY)
_REMOTE = _interlock(codec.Interlock.REMOTE)


def _left_armed(v: ControllerView, limits: SafetyLimits) -> str | None:
    t = v.t
    if v.running and t.state != codec.ControllerState.ARMED_READY:
        # Disarmed under a running session (nobody here asked for it).
        return f"controller left the armed state ({codec.describe(codec.ControllerState, t.state)})"
    return None


CONTROLLER_RULES: tuple[Rule[ControllerView], ...] = (
    Rule("controller fault", "the controller's state and fault code",
         TripCause.CONTROLLER_FAULT, (), _fault),
    Rule("emergency stop", "the E-stop interlock bit", TripCause.EMERGENCY_STOP, (),
         lambda v, _: _ESTOP(v.t.interlocks)),
    Rule("key switch", "the key interlock bit", TripCause.KEY_OFF, (),
         lambda v, _: _KEY(v.t.interlocks)),
    Rule("remote interlock", "the remote (door loop) interlock bit",
         TripCause.REMOTE_INTERLOCK_OPEN, (), lambda v, _: _REMOTE(v.t.interlocks)),
    Rule("stays armed", "the controller's state while the session runs",
         TripCause.UNEXPECTED_STOP, (), _left_armed),
)  # fmt: skip
"""Checked on every sample of every controller of a session, until it closes out."""


# ----------------------------------------------------------- controller events


@dataclass(frozen=True)
class EventView:
    """A controller event, and whether a port of the session sits where it happened."""

    ev: codec.Event
    on_session_port: bool


def _fault_event(v: EventView, limits: SafetyLimits) -> str | None:
    ev = v.ev
    if ev.code != codec.EventCode.FAULT:
        return None
    where = f" on port {ev.port}" if ev.port else ""
    return f"{codec.describe(codec.FaultCode, ev.value)}{where}"


def _watchdog_event(v: EventView, limits: SafetyLimits) -> str | None:
    if v.ev.code != codec.EventCode.WATCHDOG_EXPIRED:
        return None
    return f"watchdog expired after {v.ev.value} ms of silence"


def _interlock_event(check: Callable[[int], str | None]) -> Callable[[EventView, SafetyLimits],
                                                                     str | None]:  # fmt: skip
    def rule(v: EventView, limits: SafetyLimits) -> str | None:
        return check(v.ev.value) if v.ev.code == codec.EventCode.INTERLOCK_CHANGED else None

    return rule


def _applicator_event(v: EventView, limits: SafetyLimits) -> str | None:
    ev = v.ev
    if ev.code != codec.EventCode.APPLICATOR_CHANGED or not v.on_session_port:
        return None
    what = "removed" if ev.value == 0 else f"changed to kind {ev.value}"
    return f"port {ev.port}: applicator {what}"


EVENT_RULES: tuple[Rule[EventView], ...] = (
    Rule("fault event", "FAULT events", TripCause.CONTROLLER_FAULT, (), _fault_event),
    Rule("watchdog event", "WATCHDOG_EXPIRED events", TripCause.CONTROLLER_FAULT, (),
         _watchdog_event),
    Rule("emergency stop event", "INTERLOCK_CHANGED: E-stop", TripCause.EMERGENCY_STOP, (),
         _interlock_event(_ESTOP)),
    Rule("key switch event", "INTERLOCK_CHANGED: key", TripCause.KEY_OFF, (),
         _interlock_event(_KEY)),
    Rule("remote interlock event", "INTERLOCK_CHANGED: remote",
         TripCause.REMOTE_INTERLOCK_OPEN, (), _interlock_event(_REMOTE)),
    Rule("applicator stays", "APPLICATOR_CHANGED on a port of the session",
         TripCause.APPLICATOR_REMOVED, (), _applicator_event, at_port=True),
)  # fmt: skip
"""Checked on every event of every controller of a session."""


# ------------------------------------------------------------------- the link


@dataclass(frozen=True)
class TelemetryAge:
    """How old the oldest controller's last telemetry is, and one sample period."""

    age_s: float
    period_s: float


def _stale(v: TelemetryAge, limits: SafetyLimits) -> str | None:
    limit_s = limits.stale_telemetry_periods * v.period_s
    if v.age_s > limit_s:
        return f"last telemetry {v.age_s * 1000:.0f} ms ago (limit {limit_s * 1000:.0f} ms)"
    return None


TELEMETRY_STALE = Rule(
    "telemetry fresh",
    "the age of each controller's last telemetry (ICD §6)",
    TripCause.TELEMETRY_STALE,
    ("stale_telemetry_periods",),
    _stale,
)
"""Checked by the session's staleness watch."""

ALL_RULES: tuple[Rule[Any], ...] = (*SAMPLE_RULES, *CONTROLLER_RULES, *EVENT_RULES, TELEMETRY_STALE)
"""Every rule, for listings and the registry checks."""
