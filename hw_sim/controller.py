"""The controller's firmware logic: requests, refusals, state machine, guarantees (ICD §3–5a).

Everything here runs on the event loop thread and never blocks. Before any
request, injection, telemetry sample or snapshot the model is advanced to
"now" (``sync``), so every guarantee (emission delay, watchdog, energy budget,
max duration, overpower, over-temperature) fires at its exact device time and
is seen before whatever triggered the sync. Wake-ups are scheduled for the
predicted events so stops are also sent promptly when the host is silent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from pbmd.drivers import codec
from pbmd.drivers.codec import (
    ControllerState,
    EventCode,
    FaultCode,
    Interlock,
    NakError,
    PortFlag,
    StopReason,
)

from .applicators import ApplicatorModel, applicator
from .config import SimConfig
from .physics import MAX_SCAN_S, OVER_TEMPERATURE_C, Emission, PhysicsEvent, PortPhysics

log = logging.getLogger(__name__)

RUN_BITS = int(Interlock.run_state())
_FLAG_APPLICATOR = int(PortFlag.APPLICATOR)
_FLAG_EMITTING = int(PortFlag.EMITTING)
_FLAG_CONTACT = int(PortFlag.CONTACT)
_FLAG_FAULT = int(PortFlag.FAULT)
DEFAULT_INTERLOCKS = RUN_BITS  # key on, loop closed, e-stop released, footswitch up
PERIODIC_WAKE_S = 0.1  # wall: keeps temperatures and light checks current between events
MIN_WAKE_S = 0.0002  # wall: never spin on a prediction that keeps landing "now"
OWN_STALL_S = 0.020
"""Wall: a wake-up this much overdue means the simulator itself was not running."""
LISTEN_AGAIN_S = 0.100
"""Wall: after its own stall, how long the watchdog waits for frames already sent
(once per silence: a second overdue deadline without a frame expires)."""

_HOST_TYPES: dict[int, type[codec.Message]] = {c.TYPE: c for c in codec.HOST_MESSAGES}
_FAULT_STOP_REASON = {
    FaultCode.WATCHDOG: StopReason.WATCHDOG,
    FaultCode.OVERPOWER: StopReason.OVERPOWER,
    FaultCode.OVER_TEMPERATURE: StopReason.OVER_TEMPERATURE,
    FaultCode.PHOTODIODE: StopReason.DISARM,
    FaultCode.INTERNAL: StopReason.DISARM,
}


class Outbox(Protocol):
    """Where the controller's frames go (the simulator's link, with its injected faults)."""

    def reply(self, seq: int, msg: codec.Message) -> None: ...

    def event(self, msg: codec.Event) -> None: ...

    def telemetry_rate_changed(self, rate_hz: int) -> None: ...


class Clock:
    """Device clock: wall time since start × time scale."""

    def __init__(self, loop: asyncio.AbstractEventLoop, time_scale: float) -> None:
        self.loop = loop
        self.scale = time_scale
        self.wall0 = loop.time()

    def wall(self) -> float:
        return self.loop.time()

    def device_us_at(self, wall: float) -> int:
        return max(0, int((wall - self.wall0) * self.scale * 1e6))

    def device_s_at(self, wall: float) -> float:
        return (wall - self.wall0) * self.scale

    def wall_at(self, device_s: float) -> float:
        return self.wall0 + device_s / self.scale


def _us(t_s: float) -> int:
    return max(0, round(t_s * 1e6))


def _uj(energy: float) -> int:
    return max(0, round(energy))


COMMAND_LOG_LENGTH = 20_000
"""Entries the command log keeps (the oldest go first): a long session's commands."""

_QUERIES = (codec.Hello, codec.Ping, codec.GetPort, codec.GetCounters)
"""Requests that change nothing; the command log leaves them out."""


@dataclass
class PortSlot:
    """A port: its physics plus the controller's per-port bookkeeping."""

    number: int
    phys: PortPhysics
    serial: str = ""
    plugged: int = 0
    # reported energies of finished emissions since the ARM with the current token; integer
    # so that session_delivered_uj is exactly the sum of what STOPPED reported
    session_uj: int = 0
    tm_prev_pd_uj: float = 0.0  # photodiode integral at the previous telemetry sample
    tm_prev_power_uw: int = 0

    @property
    def model(self) -> ApplicatorModel | None:
        return self.phys.model

    def session_delivered_uj(self) -> int:
        running = _uj(self.phys.emission.energy_uj) if self.phys.emission is not None else 0
        return max(0, self.session_uj + running)


class Controller:
    """The simulated MultiPort controller's firmware."""

    def __init__(self, config: SimConfig, clock: Clock, outbox: Outbox) -> None:
        self.config = config
        self.clock = clock
        self.out = outbox
        self.state = ControllerState.STANDBY
        self.fault_code = FaultCode.NONE
        self.fault_port = 0
        self.injected_fault_persists = False
        self.interlocks = DEFAULT_INTERLOCKS
        self.session_token = 0
        self.telemetry_hz = 0
        self.t = 0.0  # model time (device seconds), always <= now
        self.now_us = 0
        self.arm_t = 0.0
        self.last_rx_wall = clock.wall()
        self.tm_prev_us = 0
        self.requests = 0
        self.naks: dict[int, int] = {}
        self.internal_errors = 0
        self.own_stalls_forgiven = 0
        """Watchdog deadlines that passed while the simulator itself was not running."""
        self._forgiven_since_rx = False
        self.command_log: deque[dict[str, Any]] = deque(maxlen=COMMAND_LOG_LENGTH)
        """What the firmware itself did, in device time: every command it answered
        (queries left out) and every emission end, whatever ended it."""
        self._log_index = 0
        self._events: list[codec.Event] = []
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = 0.0
        self._closed = False
        self.slots: dict[int, PortSlot] = {}
        for n in range(1, config.port_count + 1):
            phys = PortPhysics(n, config.seed, config.noise_fraction)
            slot = PortSlot(n, phys)
            self.slots[n] = slot
            name = config.ports.get(n)
            self._plug(slot, applicator(name) if name else None)

    # -- time ------------------------------------------------------------------------

    @property
    def port_count(self) -> int:
        return len(self.slots)

    def sync(self) -> None:
        """Advance the model to the present and send what happened on the way."""
        self._forgive_own_stall()
        self.now_us = max(self.now_us, self.clock.device_us_at(self.clock.wall()))
        self._advance(self.now_us / 1e6)
        self._flush()

    def _forgive_own_stall(self) -> None:
        """A real controller receives bytes as they arrive; this one reads them only
        when its process runs. If its own wake-up is overdue (a busy machine did not
        run it) and the watchdog deadline passed meanwhile, the host's frames may be
        waiting unread: the watchdog waits LISTEN_AGAIN_S for them from now, as the
        host does for telemetry after its own stall (ICD §6). A host that really went
        silent still trips it, that much later."""
        if self._wake is None or self.state == ControllerState.FAULT:
            return
        now = self.clock.wall()
        watchdog_s = self.config.watchdog_ms / 1000.0
        overdue = now - self._wake_at > OWN_STALL_S
        if overdue and self._watchdog_active() and self.last_rx_wall + watchdog_s < now:
            if self._forgiven_since_rx:
                return  # the host had its second chance: silence it is
            self._forgiven_since_rx = True
            self.last_rx_wall = now + LISTEN_AGAIN_S - watchdog_s
            self.own_stalls_forgiven += 1

    def _watchdog_active(self) -> bool:
        armed = self.state in (ControllerState.ARMED_DELAY, ControllerState.ARMED_READY)
        return armed or any(s.phys.emission is not None for s in self.slots.values())

    def _next_control_event(self) -> tuple[float, str] | None:
        found: list[tuple[float, str]] = []
        if self.state == ControllerState.ARMED_DELAY:
            found.append((self.arm_t + self.config.emission_delay_ms / 1000.0, "delay"))
        if self._watchdog_active():
            deadline = self.last_rx_wall + self.config.watchdog_ms / 1000.0
            found.append((self.clock.device_s_at(deadline), "watchdog"))
        return min(found) if found else None

    def _advance(self, target: float) -> None:
        guard = 0
        while True:
            self._check_levels()
            if self.t >= target:
                return
            guard += 1
            if guard > 100_000:  # cannot happen; never hang the loop if it does
                log.error("model advance did not converge at t=%.6f", self.t)
                self.internal_errors += 1
                for slot in self.slots.values():
                    slot.phys.commit(target)
                self.t = target
                return
            detect = self.state != ControllerState.FAULT
            ctrl = self._next_control_event()
            b = min(target, self.t + MAX_SCAN_S)
            if ctrl is not None and ctrl[0] < b:
                b = max(ctrl[0], self.t)
            best: tuple[float, PhysicsEvent, PortSlot] | None = None
            for slot in self.slots.values():
                ev = slot.phys.scan(self.t, b, detect)
                if ev is not None and (best is None or (ev[0], ev[1]) < (best[0], best[1])):
                    best = (ev[0], ev[1], slot)
            t_ev = min(best[0], b) if best is not None else b
            t_ev = max(t_ev, self.t)
            for slot in self.slots.values():
                slot.phys.commit(t_ev)
            self.t = t_ev
            if best is not None:
                self._physics_event(best[2], best[1])
            elif ctrl is not None and t_ev >= ctrl[0]:
                self._control_event(ctrl[1])

    def _check_levels(self) -> None:
        """Conditions that hold at an instant rather than cross within an interval."""
        if self.state == ControllerState.FAULT:
            return
        for slot in self.slots.values():
            if slot.model is not None and slot.phys.temp_c > OVER_TEMPERATURE_C:
                self._latch(FaultCode.OVER_TEMPERATURE, slot.number)
                return

    def _physics_event(self, slot: PortSlot, kind: PhysicsEvent) -> None:
        if kind == PhysicsEvent.ENERGY_BUDGET:
            em = slot.phys.emission
            if em is not None:
                em.energy_uj = float(em.energy_budget_uj)  # clipped at the crossing
            self._stop(slot, StopReason.ENERGY_BUDGET)
        elif kind == PhysicsEvent.MAX_DURATION:
            self._stop(slot, StopReason.MAX_DURATION)
        elif kind == PhysicsEvent.OVERPOWER:
            self._latch(FaultCode.OVERPOWER, slot.number)
        elif kind == PhysicsEvent.OVER_TEMPERATURE:
            self._latch(FaultCode.OVER_TEMPERATURE, slot.number)

    def _control_event(self, kind: str) -> None:
        if kind == "delay":
            self.state = ControllerState.ARMED_READY
        elif kind == "watchdog":
            # the silence when it expired (the model stands at the deadline)
            silence_ms = max(
                self.config.watchdog_ms,
                round((self.clock.wall_at(self.t) - self.last_rx_wall) * 1000),
            )
            self._event(0, EventCode.WATCHDOG_EXPIRED, min(silence_ms, 0xFFFF_FFFF))
            self._latch(FaultCode.WATCHDOG, 0)

    # -- guarantees ------------------------------------------------------------------

    def _event(self, port: int, code: EventCode, value: int) -> None:
        self._events.append(codec.Event(_us(self.t), port, int(code), int(value)))

    def _flush(self) -> None:
        events, self._events = self._events, []
        for ev in events:
            self.out.event(ev)

    def _stop(self, slot: PortSlot, reason: StopReason) -> None:
        em = slot.phys.stop(int(reason))
        if em is None:
            return
        slot.session_uj += _uj(em.energy_uj)
        self._event(slot.number, EventCode.EMISSION_ENDED, int(reason))
        self._log(
            {
                "device_time_us": _us(self.t),
                "kind": "emission_ended",
                "port": slot.number,
                "stop_reason": int(reason),
                "energy_uj": _uj(em.energy_uj),
                "duration_ms": em.duration_ms(self.t),
            }
        )

    def _stop_all(self, reason: StopReason) -> None:
        for slot in self.slots.values():
            self._stop(slot, reason)

    def _latch(self, code: FaultCode, port: int) -> None:
        if self.state == ControllerState.FAULT:
            return  # the first fault stays latched
        self.state = ControllerState.FAULT
        self.fault_code = code
        self.fault_port = port
        self._event(port, EventCode.FAULT, int(code))
        self._stop_all(_FAULT_STOP_REASON[code])

    def _fault_cause_present(self) -> bool:
        for slot in self.slots.values():
            if slot.phys.has_light and slot.phys.emission is None:
                return True  # light on a port that should be dark (stuck emitter)
            if slot.model is not None and slot.phys.temp_c > OVER_TEMPERATURE_C:
                return True
        return self.injected_fault_persists

    @property
    def interlocks_ok(self) -> bool:
        return self.interlocks & RUN_BITS == RUN_BITS

    # -- requests --------------------------------------------------------------------

    def handle_frame(self, frame: codec.Frame) -> None:
        """Answer one valid host frame (it feeds the watchdog first)."""
        self.sync()
        self.last_rx_wall = self.clock.wall()
        self._forgiven_since_rx = False
        self.requests += 1
        try:
            reply = self._dispatch(frame)
        except Exception:  # never let a request take the controller down
            log.exception("internal error answering type 0x%02X", frame.msg_type)
            self.internal_errors += 1
            reply = codec.Nak(int(NakError.BAD_PARAMETER))
        if isinstance(reply, codec.Nak):
            self.naks[reply.error] = self.naks.get(reply.error, 0) + 1
        self._log_command(frame, reply)
        self.out.reply(frame.seq, reply)
        self._flush()
        self.reschedule()

    def _nak(self, error: NakError) -> codec.Nak:
        return codec.Nak(int(error))

    def _log(self, entry: dict[str, Any]) -> None:
        entry["i"] = self._log_index
        self._log_index += 1
        self.command_log.append(entry)

    def _log_command(self, frame: codec.Frame, reply: codec.Message) -> None:
        """One answered command, as the firmware saw it (an undecodable one by its type)."""
        cls = _HOST_TYPES.get(frame.msg_type)
        if cls in _QUERIES:
            return
        entry: dict[str, Any] = {
            "device_time_us": _us(self.t),
            "kind": "request",
            "request": cls.__name__ if cls is not None else f"0x{frame.msg_type:02X}",
            "reply": type(reply).__name__,
            "nak_error": reply.error if isinstance(reply, codec.Nak) else None,
        }
        if cls is not None and cls not in (codec.Disarm, codec.AllOff):
            try:
                msg = cls.unpack_payload(frame.payload)
            except codec.PayloadLengthError:
                msg = None
            if isinstance(msg, codec.EmitStart):
                entry.update(
                    port=msg.port,
                    wavelength_nm=msg.wavelength_nm,
                    power_uw=msg.power_uw,
                    energy_budget_uj=msg.energy_budget_uj,
                )
            elif isinstance(msg, codec.EmitStop):
                entry["port"] = msg.port
        self._log(entry)

    def command_log_since(self, since: int = 0) -> list[dict[str, Any]]:
        """The command log's entries numbered `since` and after (oldest first)."""
        self.sync()
        return [dict(e) for e in self.command_log if e["i"] >= since]

    def _dispatch(self, frame: codec.Frame) -> codec.Message:
        cls = _HOST_TYPES.get(frame.msg_type)
        if cls is None:
            return self._nak(NakError.UNKNOWN_MESSAGE_TYPE)
        if cls is codec.Disarm:
            return self._disarm()
        if cls is codec.AllOff:
            self._stop_all(StopReason.ALL_OFF)
            return codec.Ack()
        try:
            msg = cls.unpack_payload(frame.payload)
        except codec.PayloadLengthError:
            return self._nak(NakError.BAD_PARAMETER)
        if isinstance(msg, codec.Hello):
            return self._info()
        if isinstance(msg, codec.Ping):
            return codec.Pong(self.now_us)
        if isinstance(msg, codec.GetPort):
            return self._port_info(msg.port)
        if isinstance(msg, codec.SetTelemetry):
            return self._set_telemetry(msg.rate_hz)
        if isinstance(msg, codec.Arm):
            return self._arm(msg.session_token)
        if isinstance(msg, codec.EmitStart):
            return self._emit_start(msg)
        if isinstance(msg, codec.EmitStop):
            return self._emit_stop(msg.port)
        if isinstance(msg, codec.ClearFault):
            return self._clear_fault()
        if isinstance(msg, codec.GetCounters):
            return self._counters(msg.port)
        return self._nak(NakError.UNKNOWN_MESSAGE_TYPE)

    def _info(self) -> codec.Info:
        c = self.config
        return codec.Info(
            codec.PROTOCOL_VERSION,
            self.port_count,
            c.max_telemetry_hz,
            c.watchdog_ms,
            c.emission_delay_ms,
            c.serial,
            c.firmware,
        )

    def port_info(self, port: int) -> codec.PortInfo:
        slot = self.slots[port]
        model = slot.model
        if model is None:
            return codec.PortInfo(port, int(codec.ApplicatorKind.NONE), "", 0, ())
        channels = tuple(ch.wire() for ch in model.channels)
        return codec.PortInfo(port, int(model.kind), slot.serial, model.area_mm2, channels)

    def _port_info(self, port: int) -> codec.Message:
        if port not in self.slots:
            return self._nak(NakError.BAD_PORT)
        return self.port_info(port)

    def _set_telemetry(self, rate_hz: int) -> codec.Message:
        if rate_hz > self.config.max_telemetry_hz:
            return self._nak(NakError.BAD_PARAMETER)
        self.telemetry_hz = rate_hz
        self._reset_telemetry_interval()
        self.out.telemetry_rate_changed(rate_hz)
        return codec.Ack()

    def _arm(self, token: int) -> codec.Message:
        if self.state == ControllerState.FAULT:
            return self._nak(NakError.FAULT_LATCHED)
        if not self.interlocks_ok:
            return self._nak(NakError.INTERLOCK_OPEN)
        if token == 0:
            return self._nak(NakError.BAD_PARAMETER)
        if token != self.session_token:
            self.session_token = token
            for slot in self.slots.values():
                # the sum restarts here; a running emission counts from now on
                em = slot.phys.emission
                slot.session_uj = -_uj(em.energy_uj) if em is not None else 0
        if self.state == ControllerState.STANDBY:
            self.state = ControllerState.ARMED_DELAY
            self.arm_t = self.t
            if self.config.emission_delay_ms == 0:
                self.state = ControllerState.ARMED_READY
        return codec.Ack()

    def _disarm(self) -> codec.Message:
        self._stop_all(StopReason.DISARM)
        if self.state in (ControllerState.ARMED_DELAY, ControllerState.ARMED_READY):
            self.state = ControllerState.STANDBY
        return codec.Ack()

    def _emit_start(self, m: codec.EmitStart) -> codec.Message:
        # ICD §5a: 8, 7, 5, 6, 1, 2, 3, 9, 4, 10, 12
        if self.state == ControllerState.FAULT:
            return self._nak(NakError.FAULT_LATCHED)
        if not self.interlocks_ok:
            return self._nak(NakError.INTERLOCK_OPEN)
        if self.state == ControllerState.STANDBY:
            return self._nak(NakError.NOT_ARMED)
        if self.state == ControllerState.ARMED_DELAY:
            return self._nak(NakError.EMISSION_DELAY_ACTIVE)
        slot = self.slots.get(m.port)
        if slot is None:
            return self._nak(NakError.BAD_PORT)
        model = slot.model
        if model is None:
            return self._nak(NakError.NO_APPLICATOR)
        channel = model.channel(m.wavelength_nm)
        if channel is None:
            return self._nak(NakError.WAVELENGTH_NOT_ON_APPLICATOR)
        if slot.phys.emission is not None:
            return self._nak(NakError.PORT_ALREADY_EMITTING)
        if m.power_uw > channel.max_power_uw:
            return self._nak(NakError.POWER_ABOVE_MAXIMUM)
        if m.energy_budget_uj == 0 or m.max_duration_ms == 0:
            return self._nak(NakError.BAD_PARAMETER)
        if m.mode == codec.EmitMode.CONTINUOUS:
            if not channel.continuous:
                return self._nak(NakError.BAD_PARAMETER)
        elif m.mode == codec.EmitMode.PULSED:
            if not channel.pulsed or m.pulse_hz == 0 or m.duty_permille == 0:
                return self._nak(NakError.BAD_PARAMETER)
            if m.duty_permille > 1000 or m.pulse_hz > channel.max_pulse_hz:
                return self._nak(NakError.BAD_PARAMETER)
        else:
            return self._nak(NakError.BAD_PARAMETER)
        if model.has_contact_sensor and not slot.phys.contact:
            return self._nak(NakError.NO_SKIN_CONTACT)
        slot.phys.start(
            Emission(
                wavelength_nm=m.wavelength_nm,
                mode=m.mode,
                setpoint_uw=m.power_uw,
                pulse_hz=m.pulse_hz,
                duty_permille=m.duty_permille,
                energy_budget_uj=m.energy_budget_uj,
                max_duration_ms=m.max_duration_ms,
                t_start_s=self.t,
            )
        )
        return codec.Ack()

    def _stopped(self, slot: PortSlot) -> codec.Stopped:
        em = slot.phys.last
        if em is None:
            return codec.Stopped(slot.number, 0, 0, 0)
        return codec.Stopped(slot.number, _uj(em.energy_uj), em.duration_ms(self.t), em.stop_reason)

    def _emit_stop(self, port: int) -> codec.Message:
        slot = self.slots.get(port)
        if slot is None:
            return self._nak(NakError.BAD_PORT)
        self._stop(slot, StopReason.HOST_STOP)
        return self._stopped(slot)

    def _clear_fault(self) -> codec.Message:
        if self.state != ControllerState.FAULT:
            return codec.Ack()
        if self._fault_cause_present():
            return self._nak(NakError.FAULT_LATCHED)
        if not self.interlocks_ok:
            return self._nak(NakError.INTERLOCK_OPEN)
        self.state = ControllerState.STANDBY
        self.fault_code = FaultCode.NONE
        self.fault_port = 0
        return codec.Ack()

    def counters(self, port: int) -> codec.Counters:
        slot = self.slots[port]
        em = slot.phys.emission or slot.phys.last
        return codec.Counters(
            port=port,
            session_token=self.session_token,
            emitting=int(slot.phys.emission is not None),
            delivered_uj=_uj(em.energy_uj) if em is not None else 0,
            duration_ms=em.duration_ms(self.t) if em is not None else 0,
            last_stop_reason=slot.phys.last.stop_reason if slot.phys.last is not None else 0,
            session_delivered_uj=slot.session_delivered_uj(),
        )

    def _counters(self, port: int) -> codec.Message:
        if port not in self.slots:
            return self._nak(NakError.BAD_PORT)
        return self.counters(port)

    # -- telemetry -------------------------------------------------------------------

    def _reset_telemetry_interval(self) -> None:
        self.tm_prev_us = self.now_us
        for slot in self.slots.values():
            slot.tm_prev_pd_uj = slot.phys.pd_total_uj

    def telemetry(self) -> codec.Telemetry:
        """One sample: measured power is the photodiode's mean since the previous sample."""
        self.sync()
        span_s = (self.now_us - self.tm_prev_us) / 1e6
        samples = []
        for slot in self.slots.values():
            p = slot.phys
            if span_s > 0:
                power = max(0, round((p.pd_total_uj - slot.tm_prev_pd_uj) / span_s))
                slot.tm_prev_power_uw = min(power, 0xFFFF_FFFF)
            slot.tm_prev_pd_uj = p.pd_total_uj
            samples.append(self._sample(slot, slot.tm_prev_power_uw))
        self.tm_prev_us = self.now_us
        return codec.Telemetry(
            self.now_us, int(self.state), self.interlocks, int(self.fault_code), tuple(samples)
        )

    def _sample(self, slot: PortSlot, power_uw: int) -> codec.PortSample:
        p = slot.phys
        flags = 0
        model = p.model
        if model is not None:
            flags |= _FLAG_APPLICATOR
            if p.contact and model.has_contact_sensor:
                flags |= _FLAG_CONTACT
        if p.emission is not None:
            flags |= _FLAG_EMITTING
        if self.fault_port == slot.number and self.state == ControllerState.FAULT:
            flags |= _FLAG_FAULT
        em = p.emission or p.last
        temp = round(p.temp_c * 100) if slot.model is not None else 0
        return codec.PortSample(
            flags=flags,
            wavelength_nm=p.emission.wavelength_nm if p.emission is not None else 0,
            measured_power_uw=power_uw,
            delivered_uj=_uj(em.energy_uj) if em is not None else 0,
            temp_centi_c=max(-0x8000, min(0x7FFF, temp)),
        )

    # -- wake-ups --------------------------------------------------------------------

    def reschedule(self) -> None:
        """Wake up for the next predicted event (or periodically while light is on)."""
        if self._closed:
            return
        detect = self.state != ControllerState.FAULT
        times: list[float] = []
        ctrl = self._next_control_event()
        if ctrl is not None:
            times.append(self.clock.wall_at(ctrl[0]))
        light = False
        for slot in self.slots.values():
            t = slot.phys.predict(self.t, detect)
            if t is not None:
                times.append(self.clock.wall_at(t))
            light = light or slot.phys.has_light
        now = self.clock.wall()
        if light:
            times.append(now + PERIODIC_WAKE_S)
        if not times:
            self._cancel_wake()
            return
        when = max(min(times) + 2e-6, now + MIN_WAKE_S)
        if self._wake is not None and abs(self._wake_at - when) < 1e-4:
            return
        self._cancel_wake()
        self._wake_at = when
        self._wake = self.clock.loop.call_at(when, self._on_wake)

    def _cancel_wake(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

    def _on_wake(self) -> None:
        try:
            self.sync()  # with the wake-up still marked due: its lateness is measured
        except Exception:
            log.exception("simulator wake-up failed")
            self.internal_errors += 1
        self._wake = None
        self.reschedule()

    def close(self) -> None:
        self._closed = True
        self._cancel_wake()

    # -- injections (used by the fault injector) -------------------------------------

    @contextmanager
    def mutation(self) -> Iterator[None]:
        """Sync, change something physical, then let the firmware react at once."""
        self.sync()
        yield
        self._advance(self.t)
        self._check_levels()
        self._flush()
        self.reschedule()

    def slot(self, port: int) -> PortSlot:
        slot = self.slots.get(port)
        if slot is None:
            raise ValueError(f"port {port} does not exist: ports are 1..{self.port_count}")
        return slot

    def _plug(self, slot: PortSlot, model: ApplicatorModel | None) -> None:
        slot.phys.plug(model)
        if model is not None:
            slot.plugged += 1
            slot.serial = f"{model.serial_prefix}-{slot.number}{slot.plugged:06d}"[:12]
        else:
            slot.serial = ""

    def set_interlocks(self, bits: int) -> None:
        if not 0 <= bits <= 0x0F:
            raise ValueError(f"interlock bits {bits:#x} must be within 0x0..0xF")
        with self.mutation():
            if bits == self.interlocks:
                return
            was_ok = self.interlocks_ok
            self.interlocks = bits
            self._event(0, EventCode.INTERLOCK_CHANGED, bits)
            if was_ok and not self.interlocks_ok:
                self._stop_all(StopReason.INTERLOCK)
                if self.state in (ControllerState.ARMED_DELAY, ControllerState.ARMED_READY):
                    self.state = ControllerState.STANDBY

    def set_contact(self, port: int, on: bool) -> None:
        slot = self.slot(port)
        if slot.model is None:
            raise ValueError(f"port {port} has no applicator: plug a probe first")
        if not slot.model.has_contact_sensor:
            raise ValueError(f"port {port} holds a pad, which has no skin-contact sensor")
        with self.mutation():
            if slot.phys.contact == on:
                return
            slot.phys.contact = on
            self._event(port, EventCode.CONTACT_CHANGED, int(on))
            if not on:
                self._stop(slot, StopReason.CONTACT_LOST)

    def plug(self, port: int, name: str | None) -> None:
        slot = self.slot(port)
        model = applicator(name) if name else None
        with self.mutation():
            if slot.model is None and model is None:
                return
            self._plug(slot, model)
            self._event(port, EventCode.APPLICATOR_CHANGED, int(model.kind) if model else 0)
            self._stop(slot, StopReason.APPLICATOR_REMOVED)

    def set_temperature(self, port: int, celsius: float) -> None:
        slot = self.slot(port)
        if slot.model is None:
            raise ValueError(f"port {port} has no applicator whose temperature could be set")
        if not -40.0 <= celsius <= 300.0:
            raise ValueError(f"temperature {celsius} °C is outside -40..300")
        with self.mutation():
            slot.phys.temp_c = float(celsius)

    def latch_fault(self, code: int, port: int, persist: bool) -> None:
        try:
            fault = FaultCode(code)
        except ValueError:
            raise ValueError(f"fault code {code} is not one of 1..5 (ICD §4)") from None
        if fault == FaultCode.NONE:
            raise ValueError("fault code 0 means no fault: use 1..5")
        if port != 0:
            self.slot(port)
        with self.mutation():
            self.injected_fault_persists = persist
            self._latch(fault, port)

    # -- introspection ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        self.sync()
        ports = []
        for slot in self.slots.values():
            p = slot.phys
            em = p.emission or p.last
            ports.append(
                {
                    "port": slot.number,
                    "applicator": slot.model.name if slot.model else None,
                    "kind": int(slot.model.kind) if slot.model else 0,
                    "serial": slot.serial,
                    "emitting": p.emission is not None,
                    "light_on": p.has_light,
                    "wavelength_nm": p.emission.wavelength_nm if p.emission else 0,
                    "setpoint_uw": p.emission.setpoint_uw if p.emission else 0,
                    "measured_power_uw": round(p.last_rate_uw) if p.has_light else 0,
                    "true_power_uw": round(p.last_true_uw) if p.has_light else 0,
                    "delivered_uj": _uj(em.energy_uj) if em else 0,
                    "true_delivered_uj": _uj(em.true_energy_uj) if em else 0,
                    "duration_ms": em.duration_ms(self.t) if em else 0,
                    "temp_c": round(p.temp_c, 3) if slot.model else None,
                    "contact": bool(slot.model and slot.model.has_contact_sensor and p.contact),
                    "counters": {
                        "last_stop_reason": p.last.stop_reason if p.last else 0,
                        "session_delivered_uj": slot.session_delivered_uj(),
                    },
                    "faults": {
                        "power_factor": p.power_factor,
                        "photodiode_gain": p.gain_at(self.t),
                        "calibration_drift_per_hour": p.drift_per_hour,
                        "integrator_gain": p.integrator_gain,
                        "stuck_on": p.stuck,
                    },
                }
            )
        return {
            "device_time_us": self.now_us,
            "time_scale": self.config.time_scale,
            "state": int(self.state),
            "state_name": self.state.name.lower(),
            "interlocks": self.interlocks,
            "fault": int(self.fault_code),
            "fault_port": self.fault_port,
            "session_token": self.session_token,
            "telemetry_hz": self.telemetry_hz,
            "requests": self.requests,
            "naks": {str(k): v for k, v in sorted(self.naks.items())},
            "internal_errors": self.internal_errors,
            "own_stalls_forgiven": self.own_stalls_forgiven,
            "ports": ports,
        }
