"""Typed status values: what the core knows of its controllers and ports.

Built once per snapshot by the core (``read_hardware``), read by every
transport: the control API, MQTT and pbmctl's views each serialise them their
own way, so none of them reaches into the drivers, and an interlock has one
set of names everywhere (``key``, ``remote``, ``estop_released``,
``footswitch``).

A session's status (``SessionStatus``, one ``RunnerStatus`` per port with the
current step's ``StepStatus``) is built by ``Session.status()`` the same way.

Telemetry older than its staleness limit (ICD §6: N sample periods) is never
shown as the present: a stale controller's state reads ``unknown (stale N s)``
and a stale port's reading is absent, with the age said beside it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pbmd.daemon.core.steps import PortState, SessionState
from pbmd.drivers import codec

if TYPE_CHECKING:
    from pbmd.daemon.core.controllers import ControllerHandle, PortMap, PortTarget
    from pbmd.daemon.core.engine import Engine
    from pbmd.daemon.core.safety import SafetyLimits


def staleness_limit_s(limits: SafetyLimits, telemetry_hz: float) -> float:
    """How old telemetry may be and still count as the present (ICD §6)."""
    return limits.stale_telemetry_periods / telemetry_hz


def lower_name(enum_cls: type[Any], code: int) -> str:
    """A protocol enum's member name in lower case (``armed_ready``), or its number."""
    return codec.describe(enum_cls, code).lower()


@dataclass(frozen=True, slots=True)
class Interlocks:
    """The controller's interlock inputs, by their one set of names."""

    key: bool
    remote: bool
    estop_released: bool
    footswitch: bool

    @classmethod
    def from_bits(cls, bits: int) -> Interlocks:
        return cls(
            key=bool(bits & codec.Interlock.KEY),
            remote=bool(bits & codec.Interlock.REMOTE),
            estop_released=bool(bits & codec.Interlock.ESTOP_RELEASED),
            footswitch=bool(bits & codec.Interlock.FOOTSWITCH),
        )

    @property
    def run_permitted(self) -> bool:
        """The inputs that gate emission are closed (the footswitch only informs)."""
        return self.key and self.remote and self.estop_released

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Freshness:
    """How old a controller's latest telemetry is, against its staleness limit.

    Over a lost link the last sample is stale whatever its age: nothing newer
    can come."""

    age_s: float | None
    """None before the first sample."""
    limit_s: float
    link_open: bool = True

    @property
    def stale(self) -> bool:
        return self.age_s is not None and (not self.link_open or self.age_s > self.limit_s)

    @property
    def rounded_age_s(self) -> float | None:
        return None if self.age_s is None else round(self.age_s, 3)


@dataclass(frozen=True, slots=True)
class ControllerStatus:
    """One controller as its latest telemetry reports it."""

    name: str
    connected: bool
    serial: str | None
    firmware: str | None
    freshness: Freshness
    reported_state: str | None
    """The state the last sample showed (lower case), None before the first."""
    fault_code: int | None
    interlocks: Interlocks | None
    device_time_s: float | None

    @property
    def stale(self) -> bool:
        return self.freshness.stale

    @property
    def state(self) -> str | None:
        """The state to show: the reported one, or ``unknown (stale N s)``."""
        age = self.freshness.age_s
        if age is not None and self.freshness.stale:
            lost = "" if self.connected else "link lost, "
            return f"unknown ({lost}stale {age:.1f} s)"
        return self.reported_state


@dataclass(frozen=True, slots=True)
class Applicator:
    """The applicator a port reported (PORT_INFO)."""

    kind: str
    serial: str
    area_cm2: float
    channels_nm: tuple[int, ...]

    @classmethod
    def from_info(cls, info: codec.PortInfo) -> Applicator | None:
        """None for an empty port."""
        if info.applicator_kind == codec.ApplicatorKind.NONE:
            return None
        return cls(
            kind=lower_name(codec.ApplicatorKind, info.applicator_kind),
            serial=info.applicator_serial,
            area_cm2=info.area_mm2 / 100.0,
            channels_nm=tuple(c.wavelength_nm for c in info.channels),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "serial": self.serial,
            "area_cm2": self.area_cm2,
            "channels_nm": list(self.channels_nm),
        }


@dataclass(frozen=True, slots=True)
class PortReading:
    """A port's latest telemetry sample (present only while fresh)."""

    applicator_present: bool
    emitting: bool
    power_mw: float
    contact: bool
    fault: bool
    temperature_c: float
    flags: int

    @classmethod
    def from_sample(cls, s: codec.PortSample) -> PortReading:
        return cls(
            applicator_present=s.applicator_present,
            emitting=s.emitting,
            power_mw=s.measured_power_uw / 1000.0,
            contact=s.contact,
            fault=bool(s.flags & codec.PortFlag.FAULT),
            temperature_c=s.temp_centi_c / 100.0,
            flags=s.flags,
        )


@dataclass(frozen=True, slots=True)
class PortStatus:
    """One logical port: where it is wired, what is plugged in, what it does now."""

    port: int
    controller: str
    device_port: int
    applicator_known: bool
    """False while the controller has not reported the port's PORT_INFO."""
    applicator: Applicator | None
    reading: PortReading | None
    """None without a sample, or when the sample is stale (see ``freshness``)."""
    freshness: Freshness

    @property
    def telemetry_stale(self) -> bool:
        return self.freshness.stale


@dataclass(frozen=True, slots=True)
class Hardware:
    """Every controller and port, read at one instant."""

    controllers: tuple[ControllerStatus, ...]
    ports: tuple[PortStatus, ...]

    def controller(self, name: str) -> ControllerStatus | None:
        return next((c for c in self.controllers if c.name == name), None)


@dataclass(frozen=True, slots=True)
class StepStatus:
    """The current step at one port: what it delivers and how far it got.

    ``power_mw`` is the measured power while the port emits (0 otherwise);
    ``power_mw``, ``temperature_c`` and ``contact`` are None while the port's
    telemetry is missing or stale."""

    step: int
    steps: int
    site: str
    label: str
    wavelength_nm: int
    mode: str
    """``continuous`` or ``pulsed``."""
    pulse_hz: float
    setpoint_mw: float
    power_mw: float | None
    irradiance_mw_cm2: float | None
    energy_j: float
    controller_energy_j: float
    fluence_j_cm2: float
    target_kind: str
    target_energy_j: float
    target_fluence_j_cm2: float
    target_time_s: float
    elapsed_s: float
    remaining_s: float
    fraction: float
    temperature_c: float | None
    contact: bool | None


@dataclass(frozen=True, slots=True)
class RunnerStatus:
    """One port of a session: its state and, once it began, its current step."""

    port: int
    state: PortState
    wait_reason: str | None
    step: StepStatus | None


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A session at one instant, for every transport."""

    session_id: str
    state: SessionState
    protocol_id: str
    protocol_version: int
    plan_hash: str
    patient_ref: str
    started_utc: float | None
    ended_utc: float | None
    cause_code: str | None
    cause_message: str | None
    trip: str | None
    """The trip's description, None unless the supervisor tripped."""
    service_required: bool
    ports: tuple[RunnerStatus, ...]


def controller_status(
    ctrl: ControllerHandle, limit_s: float, now: float | None = None
) -> ControllerStatus:
    """``ctrl`` as its latest telemetry shows it, judged against ``limit_s``."""
    now = time.monotonic() if now is None else now
    seen = ctrl.telemetry_host_s
    connected = ctrl.client.is_open
    fresh = Freshness(None if seen is None else now - seen, limit_s, connected)
    serial = firmware = None
    try:
        info = ctrl.info
        serial, firmware = info.serial, info.firmware
    except Exception:  # the handshake's INFO is not there (a client that never opened)
        pass
    t = ctrl.telemetry
    return ControllerStatus(
        name=ctrl.name,
        connected=connected,
        serial=serial,
        firmware=firmware,
        freshness=fresh,
        reported_state=None if t is None else lower_name(codec.ControllerState, t.state),
        fault_code=None if t is None else t.fault_code,
        interlocks=None if t is None else Interlocks.from_bits(t.interlocks),
        device_time_s=None if t is None else t.device_time_us / 1e6,
    )


def port_status(target: PortTarget, fresh: Freshness) -> PortStatus:
    """One port, its reading withheld when its controller's telemetry is stale."""
    try:
        info: codec.PortInfo | None = target.applicator
    except KeyError:
        info = None
    sample = target.controller.sample(target.device_port)
    return PortStatus(
        port=target.logical_port,
        controller=target.controller.name,
        device_port=target.device_port,
        applicator_known=info is not None,
        applicator=None if info is None else Applicator.from_info(info),
        reading=None if sample is None or fresh.stale else PortReading.from_sample(sample),
        freshness=fresh,
    )


def read_hardware(port_map: PortMap, limit_s: float) -> Hardware:
    """Every controller and port of ``port_map``, at one instant."""
    now = time.monotonic()
    controllers = tuple(controller_status(c, limit_s, now) for c in port_map.controllers())
    fresh = {c.name: c.freshness for c in controllers}
    ports = tuple(port_status(t, fresh[t.controller.name]) for t in port_map.values())
    return Hardware(controllers, ports)


def snapshot(engine: Engine) -> Hardware:
    """The engine's controllers and ports now, judged by its staleness limit."""
    return read_hardware(engine.port_map, staleness_limit_s(engine.limits, engine.telemetry_hz))


def stale_reason(ctrl: ControllerHandle, limit_s: float) -> str | None:
    """Why ``ctrl``'s telemetry cannot be trusted as the present, or None.

    Readiness says this rather than what the stale sample showed (ports
    emitting, a state long left)."""
    fresh = controller_status(ctrl, limit_s).freshness
    age = fresh.age_s
    if age is None:
        return f"no telemetry from controller {ctrl.name} yet"
    if not fresh.stale:
        return None
    return (
        f"controller {ctrl.name}: link lost/stale, last telemetry {age:.1f} s ago "
        f"(limit {limit_s * 1000:.0f} ms); check the cable and the controller, "
        "then start again once it reports"
    )
