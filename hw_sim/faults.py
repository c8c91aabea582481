"""Fault injection, in process (``sim.faults``) and over the JSON-lines control channel.

Every method of :class:`FaultInjector` changes the simulated hardware or link
and lets the firmware react at once (an interlock opening stops emission
before the method returns). ``clear()`` removes injected faults but never a
latched controller fault: that takes CLEAR_FAULT from the host, as on the real
device.

Control channel: JSON lines over TCP, one request per line,
``{"op": "<method or 'snapshot', 'ops' or 'command_log'>", "args": {...}}``, answered by
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pbmd.drivers.codec import CodecError, Interlock, cobs_decode, cobs_encode

from .physics import OVER_TEMPERATURE_C

if TYPE_CHECKING:
    from .controller import Controller
    from .server import Simulator

log = logging.getLogger(__name__)

MAX_CONTROL_LINE = 64 * 1024


@dataclass
class LinkFaults:
    """Faults of the host link (applied where frames are sent or received)."""

    telemetry_stall: bool = False
    corrupt_rate: float = 0.0
    """Fraction of controller → host frames corrupted."""
    corrupt_to_controller_rate: float = 0.0
    """Fraction of host → controller frames corrupted (before the firmware sees them)."""
    reply_delay_ms: float = 0.0
    drop_replies: bool = False
    drop_next: dict[str, int] = field(default_factory=dict)
    """Reply type name (e.g. "Ack") → how many of the next such replies are lost."""

    def drops_reply(self, reply: object) -> bool:
        """This reply is lost on the way (its request was executed all the same)."""
        if self.drop_replies:
            return True
        name = type(reply).__name__
        left = self.drop_next.get(name, 0)
        if left <= 0:
            return False
        self.drop_next[name] = left - 1
        return True


CORRUPT_DIRECTIONS = ("to_host", "to_controller", "both")


def corrupt_frame(frame: bytes, rng: random.Random) -> bytes:
    """One encoded frame (``COBS(body) 0x00``) with one body byte changed.

    The change is made in the body and the body stuffed again, so the frame
    stays well formed and fails only its CRC at the receiver (a CRC-16 sees
    every single-byte error), which then drops it as ICD §2 says. A frame that
    is not valid COBS is returned unchanged.
    """
    try:
        body = bytearray(cobs_decode(frame[:-1] if frame.endswith(b"\x00") else frame))
    except CodecError:
        return frame
    if not body:
        return frame
    i = rng.randrange(len(body))
    body[i] ^= rng.randrange(1, 256)
    return cobs_encode(bytes(body)) + b"\x00"


class IncomingCorruption:
    """Corrupts a fraction of the host's frames on their way into the simulator.

    Bytes arrive in arbitrary chunks; while a rate is set, a chunk is cut at
    frame delimiters and the partial frame at its end is held back until its
    delimiter arrives, so each whole frame gets exactly one draw.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._partial = bytearray()
        self.corrupted = 0

    def reset(self) -> None:
        """A new host: nothing of the previous one's partial frame carries over."""
        self._partial.clear()

    def apply(self, data: bytes, rate: float) -> bytes:
        if rate <= 0 and not self._partial:
            return data
        buf = self._partial + data
        end = buf.rfind(b"\x00") + 1
        self._partial = buf[end:]
        out = bytearray()
        start = 0
        while start < end:
            stop = buf.index(b"\x00", start) + 1
            frame = bytes(buf[start:stop])
            if stop - start > 1 and rate > 0 and self._rng.random() < rate:
                frame = corrupt_frame(frame, self._rng)
                self.corrupted += 1
            out += frame
            start = stop
        if rate <= 0:  # the rate went to 0 mid-frame: let the rest through as it is
            out += self._partial
            self._partial.clear()
        return bytes(out)


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"port must be an integer, got {value!r}")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not low <= float(value) <= high:
        raise ValueError(f"{name}={value} must be within {low:g}..{high:g}")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


class FaultInjector:
    """Breaks the simulated controller on purpose, the way hardware breaks."""

    OPS = (
        "photodiode_gain",
        "stuck_on",
        "telemetry_stall",
        "corrupt_frames",
        "reply_delay",
        "drop_replies",
        "drop_next_replies",
        "interlocks",
        "key",
        "remote",
        "estop",
        "footswitch",
        "contact",
        "unplug",
        "plug",
        "drop_link",
        "over_temperature",
        "temperature",
        "power_factor",
        "calibration_drift",
        "integrator_gain",
        "latch_fault",
        "clear",
    )

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self.link = LinkFaults()

    @property
    def _ctl(self) -> Controller:
        return self._sim.controller

    # -- optics ----------------------------------------------------------------------

    def photodiode_gain(self, port: int, gain: float) -> None:
        """Monitor photodiode reads ``gain`` × the true power (a gain error)."""
        g = _number(gain, "gain", 0.0, 100.0)
        slot = self._ctl.slot(_port(port))
        with self._ctl.mutation():
            slot.phys.set_gain(g)

    def integrator_gain(self, port: int, gain: float) -> None:
        """The controller's own dose integral (delivered_uj, STOPPED, COUNTERS, the
        energy budget) counts ``gain`` × what the photodiode measures, while
        telemetry's measured power stays right: the two dose channels disagree."""
        g = _number(gain, "gain", 0.0, 100.0)
        slot = self._ctl.slot(_port(port))
        with self._ctl.mutation():
            slot.phys.integrator_gain = g

    def calibration_drift(self, port: int, fraction_per_hour: float) -> None:
        """Photodiode gain drifts by this fraction per hour of device time (e.g. -0.05)."""
        f = _number(fraction_per_hour, "fraction_per_hour", -10.0, 10.0)
        slot = self._ctl.slot(_port(port))
        with self._ctl.mutation():
            slot.phys.set_drift(f)

    def power_factor(self, port: int, factor: float) -> None:
        """True emitted power = setpoint × factor (above 1.2 the controller trips overpower)."""
        f = _number(factor, "factor", 0.0, 100.0)
        slot = self._ctl.slot(_port(port))
        with self._ctl.mutation():
            slot.phys.power_factor = f

    def stuck_on(self, port: int, on: bool = True) -> None:
        """The emitter ignores 'off': light stays on after the controller stops the port."""
        flag = _flag(on, "on")
        slot = self._ctl.slot(_port(port))
        with self._ctl.mutation():
            slot.phys.set_stuck(flag)

    # -- thermal ---------------------------------------------------------------------

    def over_temperature(self, port: int) -> None:
        """Heat the applicator 1 °C past the 41.0 °C limit (fault 3 latches at once)."""
        self._ctl.set_temperature(_port(port), OVER_TEMPERATURE_C + 1.0)

    def temperature(self, port: int, celsius: float) -> None:
        """Set the applicator temperature; it then follows the thermal model."""
        self._ctl.set_temperature(_port(port), _number(celsius, "celsius", -40.0, 300.0))

    # -- inputs ----------------------------------------------------------------------

    def interlocks(self, bits: int) -> None:
        """Set all four interlock bits at once (1 = run state; 0x7 runs, 0xF with footswitch)."""
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"bits must be an integer 0..15, got {bits!r}")
        self._ctl.set_interlocks(bits)

    def _bit(self, bit: Interlock, run: bool) -> None:
        bits = self._ctl.interlocks
        self._ctl.set_interlocks(bits | int(bit) if run else bits & ~int(bit))

    def key(self, on: bool = True) -> None:
        """Key switch on (run) or off (stops emission and disarms)."""
        self._bit(Interlock.KEY, _flag(on, "on"))

    def remote(self, closed: bool = True) -> None:
        """Remote interlock (door) loop closed (run) or open."""
        self._bit(Interlock.REMOTE, _flag(closed, "closed"))

    def estop(self, pressed: bool = True) -> None:
        """Emergency stop pressed (stops everything) or released."""
        self._bit(Interlock.ESTOP_RELEASED, not _flag(pressed, "pressed"))

    def footswitch(self, pressed: bool = True) -> None:
        """Footswitch pressed or released (information only; never gates emission)."""
        self._bit(Interlock.FOOTSWITCH, _flag(pressed, "pressed"))

    def contact(self, port: int, on: bool = True) -> None:
        """Probe skin contact (probes start in contact); losing it stops the port."""
        self._ctl.set_contact(_port(port), _flag(on, "on"))

    def unplug(self, port: int) -> None:
        """Remove the applicator (stops the port, APPLICATOR_CHANGED value 0)."""
        self._ctl.plug(_port(port), None)

    def plug(self, port: int, applicator: str) -> None:
        """Plug a catalog applicator ("duo_pad", "probe_830", "probe_905") into a port."""
        if not isinstance(applicator, str):
            raise ValueError(f"applicator must be a catalog name, got {applicator!r}")
        self._ctl.plug(_port(port), applicator)

    def latch_fault(self, code: int, port: int = 0, persist: bool = False) -> None:
        """Latch a controller fault as the firmware would (e.g. 4 photodiode, 5 internal).

        With ``persist`` the cause stays present, so CLEAR_FAULT is refused (NAK 8)
        until ``clear()``.
        """
        if isinstance(code, bool) or not isinstance(code, int):
            raise ValueError(f"code must be an integer 1..5, got {code!r}")
        self._ctl.latch_fault(code, _port(port), _flag(persist, "persist"))

    # -- link ------------------------------------------------------------------------

    def telemetry_stall(self, on: bool = True) -> None:
        """Telemetry frames stop (replies and events still flow)."""
        self.link.telemetry_stall = _flag(on, "on")

    def corrupt_frames(self, rate: float, direction: str = "to_host") -> None:
        """A fraction 0..1 of frames get one body byte changed, so their CRC fails
        and the receiver drops them (ICD §2): ``direction`` "to_host" (controller →
        host, the default), "to_controller" (host → controller) or "both"."""
        r = _number(rate, "rate", 0.0, 1.0)
        if direction not in CORRUPT_DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(CORRUPT_DIRECTIONS)}")
        if direction in ("to_host", "both"):
            self.link.corrupt_rate = r
        if direction in ("to_controller", "both"):
            self.link.corrupt_to_controller_rate = r

    def reply_delay(self, ms: float) -> None:
        """Replies leave this many wall milliseconds late (events and telemetry do not)."""
        self.link.reply_delay_ms = _number(ms, "ms", 0.0, 60_000.0)

    def drop_replies(self, on: bool = True) -> None:
        """Requests are still executed but never answered."""
        self.link.drop_replies = _flag(on, "on")

    def drop_next_replies(self, count: int = 1, reply: str = "Ack") -> None:
        """The next ``count`` replies of one type (a codec name: "Ack" answers ARM and
        EMIT_START, "Pong", "Counters", ...) are lost; their requests are executed."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a whole number, got {count!r}")
        if not isinstance(reply, str):
            raise ValueError(f"reply must be a message name, got {reply!r}")
        self.link.drop_next[reply] = count

    def drop_link(self) -> None:
        """Cut the current host connection (TCP: closed; pty: silent until reopened)."""
        self._sim.drop_link()

    # -- all -------------------------------------------------------------------------

    def clear(self) -> None:
        """Remove every injected fault; latched controller faults stay (CLEAR_FAULT)."""
        self.link = LinkFaults()
        ctl = self._ctl
        with ctl.mutation():
            ctl.injected_fault_persists = False
            for slot in ctl.slots.values():
                p = slot.phys
                p.power_factor = 1.0
                p.drift_per_hour = 0.0
                p.integrator_gain = 1.0
                p.set_gain(1.0)
                p.set_stuck(False)
        ctl.set_interlocks(int(Interlock.run_state()))
        for slot in ctl.slots.values():
            if slot.model is not None and slot.model.has_contact_sensor and not slot.phys.contact:
                ctl.set_contact(slot.number, True)


# --------------------------------------------------------------------------------------
# control channel


def _describe(fn: Callable[..., Any]) -> str:
    return f"{fn.__name__}{inspect.signature(fn)}"


class ControlProtocol(asyncio.Protocol):
    """One control-channel client: JSON lines in, JSON lines out."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._sim._control_clients.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._sim._control_clients.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_CONTROL_LINE:
                    self._buf.clear()
                    self._send({"ok": False, "error": "request line too long (max 64 KiB)"})
                return
            line = bytes(self._buf[:end]).strip()
            del self._buf[: end + 1]
            if line:
                self._send(handle_control_request(self._sim, line))

    def _send(self, reply: dict[str, Any]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(json.dumps(reply).encode() + b"\n")


def handle_control_request(sim: Simulator, line: bytes) -> dict[str, Any]:
    """Run one control request; every failure becomes an explanatory error reply."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return {"ok": False, "error": f'not JSON ({exc}); send {{"op": "...", "args": {{...}}}}'}
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return {"ok": False, "error": 'a request is an object with a string "op"'}
    op = request["op"]
    args = request.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return {"ok": False, "error": '"args" must be an object of named arguments'}
    if op == "snapshot":
        return {"ok": True, "result": sim.snapshot()}
    if op == "command_log":
        since = args.get("since", 0)
        if set(args) - {"since"} or not isinstance(since, int) or since < 0:
            return {"ok": False, "error": 'command_log: args are {"since": n >= 0} or none'}
        return {"ok": True, "result": sim.controller.command_log_since(since)}
    if op == "ops":
        faults = sim.faults
        sigs = [_describe(getattr(faults, name)) for name in FaultInjector.OPS]
        return {"ok": True, "result": ["snapshot()", "ops()", "command_log(since=0)", *sigs]}
    if op not in FaultInjector.OPS:
        return {
            "ok": False,
            "error": f"unknown op {op!r}; ops: snapshot, ops, command_log, "
            f"{', '.join(FaultInjector.OPS)}",
        }
    method = getattr(sim.faults, op)
    try:
        inspect.signature(method).bind(**args)
    except TypeError as exc:
        return {"ok": False, "error": f"{op}: {exc}; expected {_describe(method)}"}
    try:
        result = method(**args)
    except ValueError as exc:
        return {"ok": False, "error": f"{op}: {exc}"}
    except Exception as exc:  # the channel must survive anything
        log.exception("control op %s failed", op)
        return {"ok": False, "error": f"{op}: internal error {exc!r}"}
    return {"ok": True, "result": result}
