"""A second, independent host side of PBM-Link v1, written from ICD.md alone.

It shares no code with pbmd on purpose: its own COBS, its own CRC-16/CCITT-FALSE
and its own packing of every message, using only the standard library. When pbmd's
codec and simulator agree with each other but not with the ICD, this peer is what
notices. It is deliberately small and strict: every frame the controller sends is
checked against ICD §2 and §4, and anything that does not fit is recorded in
``PbmLinkPeer.violations`` instead of being silently accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

# --- ICD §2: framing -------------------------------------------------------------------

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<BBHH")  # version, type, seq, length
CRC = struct.Struct("<H")
MAX_BODY_BYTES = 512
MAX_PAYLOAD_BYTES = MAX_BODY_BYTES - HEADER.size - CRC.size  # 504


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, xorout 0."""
    crc = 0xFFFF
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing (no trailing delimiter)."""
    out = bytearray([0])
    code_at = 0
    code = 1
    for byte in data:
        if byte == 0:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
            continue
        out.append(byte)
        code += 1
        if code == 0xFF:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
    out[code_at] = code
    return bytes(out)


class CobsError(ValueError):
    """The bytes between two delimiters are not a valid COBS encoding."""


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0:
            raise CobsError("zero byte inside a COBS frame")
        i += 1
        end = i + code - 1
        if end > len(data):
            raise CobsError("COBS block runs past the end of the frame")
        out += data[i:end]
        i = end
        if code < 0xFF and i < len(data):
            out.append(0)
    return bytes(out)


def build_body(msg_type: int, seq: int, payload: bytes = b"", *, version: int = 1) -> bytes:
    """Header + payload + CRC, before stuffing."""
    head = HEADER.pack(version, msg_type, seq & 0xFFFF, len(payload)) + payload
    return head + CRC.pack(crc16_ccitt_false(head))


def frame_bytes(body: bytes) -> bytes:
    """What goes on the wire for one body: COBS(body) 0x00."""
    return cobs_encode(body) + b"\x00"


@dataclass(frozen=True)
class Frame:
    msg_type: int
    seq: int
    payload: bytes


class FrameError(ValueError):
    """A body that ICD §2 says must be dropped."""


def parse_body(body: bytes) -> Frame:
    if len(body) > MAX_BODY_BYTES:
        raise FrameError(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    if len(body) < HEADER.size + CRC.size:
        raise FrameError(f"body of {len(body)} bytes is shorter than header + crc")
    version, msg_type, seq, length = HEADER.unpack_from(body)
    if len(body) != HEADER.size + length + CRC.size:
        raise FrameError(f"length field {length} disagrees with a body of {len(body)} bytes")
    (crc,) = CRC.unpack_from(body, len(body) - CRC.size)
    if crc != crc16_ccitt_false(body[: -CRC.size]):
        raise FrameError("bad crc")
    if version != PROTOCOL_VERSION:
        raise FrameError(f"version {version}")
    return Frame(msg_type, seq, body[HEADER.size : HEADER.size + length])


class FrameSplitter:
    """Reassembles frames from arbitrary chunks of the byte stream (split on 0x00)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.empty_frames = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        encoded: list[bytes] = []
        while True:
            end = self._buf.find(0)
            if end < 0:
                return encoded
            piece = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if piece:
                encoded.append(piece)
            else:
                self.empty_frames += 1


# --- ICD §3: host -> controller ----------------------------------------------------------

HELLO = 0x01
PING = 0x02
GET_PORT = 0x03
SET_TELEMETRY = 0x04
ARM = 0x05
DISARM = 0x06
EMIT_START = 0x07
EMIT_STOP = 0x08
ALL_OFF = 0x09
CLEAR_FAULT = 0x0A
GET_COUNTERS = 0x0B

# --- ICD §4: controller -> host ----------------------------------------------------------

ACK = 0x80
INFO = 0x81
PONG = 0x82
PORT_INFO = 0x83
STOPPED = 0x88
COUNTERS = 0x8B
TELEMETRY = 0x90
EVENT = 0x91
NAK = 0xFE

DEVICE_INITIATED = frozenset({TELEMETRY, EVENT})
REPLY_TYPES = frozenset({ACK, INFO, PONG, PORT_INFO, STOPPED, COUNTERS, NAK})

EMIT_START_FMT = struct.Struct("<BHBIIHQI")
INFO_FMT = struct.Struct("<BBHHH16s12s")
PONG_FMT = struct.Struct("<Q")
PORT_INFO_HEAD_FMT = struct.Struct("<BB12sIB")
CHANNEL_FMT = struct.Struct("<HIBI")
STOPPED_FMT = struct.Struct("<BQIB")
COUNTERS_FMT = struct.Struct("<BIBQIBQ")
TELEMETRY_HEAD_FMT = struct.Struct("<QBBH")
PORT_RECORD_FMT = struct.Struct("<BHIQh")
EVENT_FMT = struct.Struct("<QBBI")
NAK_FMT = struct.Struct("<B")

# flags of a telemetry port record
FLAG_PRESENT = 0x01
FLAG_EMITTING = 0x02
FLAG_CONTACT = 0x04
FLAG_PORT_FAULT = 0x08

# interlock bits (1 = run state)
IL_KEY = 0x01
IL_REMOTE = 0x02
IL_ESTOP = 0x04
IL_FOOTSWITCH = 0x08

# controller states
STANDBY, DELAY, READY, FAULTED = 0, 1, 2, 3

# event codes
EV_EMISSION_ENDED = 1
EV_INTERLOCK_CHANGED = 2
EV_APPLICATOR_CHANGED = 3
EV_FAULT = 4
EV_WATCHDOG_EXPIRED = 5
EV_CONTACT_CHANGED = 6

# stop reasons
SR_HOST_STOP = 1
SR_ENERGY_BUDGET = 2
SR_MAX_DURATION = 3
SR_INTERLOCK = 4
SR_WATCHDOG = 5
SR_OVERPOWER = 6
SR_OVER_TEMPERATURE = 7
SR_APPLICATOR_REMOVED = 8
SR_ALL_OFF = 9
SR_DISARM = 10
SR_CONTACT_LOST = 11

# fault codes
FAULT_NONE = 0
FAULT_WATCHDOG = 1
FAULT_OVERPOWER = 2
FAULT_OVER_TEMPERATURE = 3

# NAK errors
NAK_BAD_PORT = 1
NAK_NO_APPLICATOR = 2
NAK_WAVELENGTH = 3
NAK_POWER = 4
NAK_NOT_ARMED = 5
NAK_EMISSION_DELAY = 6
NAK_INTERLOCK = 7
NAK_FAULT = 8
NAK_ALREADY_EMITTING = 9
NAK_BAD_PARAMETER = 10
NAK_UNKNOWN_TYPE = 11
NAK_NO_CONTACT = 12


def _text(raw: bytes) -> str:
    """A fixed-width NUL-padded ASCII field (raises if it is not)."""
    text, _, pad = raw.partition(b"\x00")
    if pad.strip(b"\x00"):
        raise ValueError(f"string field {raw!r} has bytes after its NUL padding")
    return text.decode("ascii")


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Nak:
    error: int


@dataclass(frozen=True)
class Info:
    protocol_version: int
    port_count: int
    max_telemetry_hz: int
    watchdog_ms: int
    emission_delay_ms: int
    serial: str
    firmware: str


@dataclass(frozen=True)
class Pong:
    device_time_us: int


@dataclass(frozen=True)
class ChannelDesc:
    wavelength_nm: int
    max_power_uw: int
    modes: int
    peak_power_mw: int


@dataclass(frozen=True)
class PortInfo:
    port: int
    applicator_kind: int
    applicator_serial: str
    area_mm2: int
    channels: tuple[ChannelDesc, ...]


@dataclass(frozen=True)
class Stopped:
    port: int
    delivered_uj: int
    duration_ms: int
    stop_reason: int


@dataclass(frozen=True)
class Counters:
    port: int
    session_token: int
    emitting: int
    delivered_uj: int
    duration_ms: int
    last_stop_reason: int
    session_delivered_uj: int


@dataclass(frozen=True)
class PortRecord:
    flags: int
    wavelength_nm: int
    measured_power_uw: int
    delivered_uj: int
    temp_centi_c: int

    @property
    def emitting(self) -> bool:
        return bool(self.flags & FLAG_EMITTING)


@dataclass(frozen=True)
class Telemetry:
    device_time_us: int
    state: int
    interlocks: int
    fault_code: int
    ports: tuple[PortRecord, ...]

    def port(self, number: int) -> PortRecord:
        """The record of port `number` (1-based, as on the wire)."""
        return self.ports[number - 1]


@dataclass(frozen=True)
class Event:
    device_time_us: int
    port: int
    code: int
    value: int


Message = Ack | Nak | Info | Pong | PortInfo | Stopped | Counters | Telemetry | Event


def _exact(payload: bytes, fmt: struct.Struct, name: str) -> tuple[object, ...]:
    if len(payload) != fmt.size:
        raise ValueError(f"{name} payload is {len(payload)} bytes, ICD says {fmt.size}")
    return fmt.unpack(payload)


def unpack_message(frame: Frame) -> Message:
    """Decode a controller->host frame per ICD §4 (ValueError if it does not fit)."""
    p = frame.payload
    t = frame.msg_type
    if t == ACK:
        if p:
            raise ValueError(f"ACK payload is {len(p)} bytes, ICD says 0")
        return Ack()
    if t == NAK:
        (error,) = _exact(p, NAK_FMT, "NAK")
        return Nak(int(error))  # type: ignore[call-overload]
    if t == INFO:
        ver, count, max_hz, wd, delay, serial, fw = _exact(p, INFO_FMT, "INFO")
        return Info(ver, count, max_hz, wd, delay, _text(serial), _text(fw))  # type: ignore[arg-type]
    if t == PONG:
        (device_time_us,) = _exact(p, PONG_FMT, "PONG")
        return Pong(device_time_us)  # type: ignore[arg-type]
    if t == PORT_INFO:
        if len(p) < PORT_INFO_HEAD_FMT.size:
            raise ValueError(f"PORT_INFO payload of {len(p)} bytes is shorter than its head")
        port, kind, serial, area, n = PORT_INFO_HEAD_FMT.unpack_from(p)
        expected = PORT_INFO_HEAD_FMT.size + n * CHANNEL_FMT.size
        if len(p) != expected:
            raise ValueError(f"PORT_INFO with {n} channels is {len(p)} bytes, ICD says {expected}")
        channels = tuple(
            ChannelDesc(*CHANNEL_FMT.unpack_from(p, PORT_INFO_HEAD_FMT.size + i * CHANNEL_FMT.size))
            for i in range(n)
        )
        return PortInfo(port, kind, _text(serial), area, channels)
    if t == STOPPED:
        return Stopped(*_exact(p, STOPPED_FMT, "STOPPED"))  # type: ignore[arg-type]
    if t == COUNTERS:
        return Counters(*_exact(p, COUNTERS_FMT, "COUNTERS"))  # type: ignore[arg-type]
    if t == TELEMETRY:
        head = TELEMETRY_HEAD_FMT.size
        if len(p) < head or (len(p) - head) % PORT_RECORD_FMT.size:
            raise ValueError(f"TELEMETRY payload of {len(p)} bytes is not 12 + 17 x ports")
        device_time_us, state, interlocks, fault = TELEMETRY_HEAD_FMT.unpack_from(p)
        ports = tuple(
            PortRecord(*PORT_RECORD_FMT.unpack_from(p, off))
            for off in range(head, len(p), PORT_RECORD_FMT.size)
        )
        return Telemetry(device_time_us, state, interlocks, fault, ports)
    if t == EVENT:
        return Event(*_exact(p, EVENT_FMT, "EVENT"))  # type: ignore[arg-type]
    raise ValueError(f"type 0x{t:02X} is not a controller->host message of ICD §4")


def pack_emit_start(
    port: int,
    wavelength_nm: int,
    power_uw: int,
    *,
    mode: int = 0,
    pulse_hz: int = 0,
    duty_permille: int = 1000,
    energy_budget_uj: int = 10**9,
    max_duration_ms: int = 3_600_000,
) -> bytes:
    return EMIT_START_FMT.pack(
        port, wavelength_nm, mode, power_uw, pulse_hz, duty_permille,
        energy_budget_uj, max_duration_ms,
    )  # fmt: skip


_T = TypeVar("_T")

# --- the peer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One valid frame from the controller, in stream order."""

    index: int
    wall_s: float  # time.monotonic() when it was read
    frame: Frame
    message: Message


class PeerTimeout(AssertionError):
    """A frame or condition did not arrive within its failure bound."""


@dataclass
class LinkStats:
    frames: int = 0
    empty: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


class PbmLinkPeer:
    """A PBM-Link host connection over TCP, with an optional PING heartbeat.

    Every frame is kept in `received` (stream order) so that tests can ask what
    came before or after a given reply; `violations` lists everything the
    controller sent that ICD §2/§4 does not allow.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._splitter = FrameSplitter()
        self._next_seq = 1
        self._pending: dict[int, asyncio.Future[Received]] = {}
        self._heartbeat_seqs: set[int] = set()
        self._requests_per_seq: dict[int, int] = {}  # valid frames sent with each seq
        self._wake = asyncio.Event()
        self._heartbeat_on = False
        self._heartbeat_s = 0.05
        self.received: list[Received] = []
        self.replies_by_seq: dict[int, list[Received]] = {}
        self.violations: list[str] = []
        self.stats = LinkStats()
        self.last_tx_s = time.monotonic()
        self.eof = asyncio.Event()
        self._read_task = asyncio.create_task(self._read_loop(), name="pbmlink-peer-read")
        self._beat_task = asyncio.create_task(self._heartbeat_loop(), name="pbmlink-peer-beat")

    @classmethod
    async def connect(cls, host: str, port: int, *, heartbeat: bool = True) -> PbmLinkPeer:
        reader, writer = await asyncio.open_connection(host, port)
        peer = cls(reader, writer)
        peer.set_heartbeat(heartbeat)
        return peer

    # -- sending -------------------------------------------------------------------------

    def new_seq(self) -> int:
        seq = self._next_seq
        self._next_seq = (self._next_seq + 1) & 0xFFFF
        return seq

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (garbage, hand-made frames, partial frames)."""
        if self.eof.is_set():
            raise ConnectionError("link closed by the controller")
        self._writer.write(data)
        self.last_tx_s = time.monotonic()
        await self._writer.drain()

    async def send(self, msg_type: int, payload: bytes = b"", *, seq: int | None = None) -> int:
        """Send one valid frame without waiting for its reply; returns its seq."""
        seq = self.new_seq() if seq is None else seq
        await self._send_frame(msg_type, seq, payload)
        return seq

    async def _send_frame(self, msg_type: int, seq: int, payload: bytes) -> None:
        self._requests_per_seq[seq] = self._requests_per_seq.get(seq, 0) + 1
        await self.send_raw(frame_bytes(build_body(msg_type, seq, payload)))

    async def request(
        self,
        msg_type: int,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        timeout_s: float = 1.0,
    ) -> Received:
        """Send a request and wait for the reply that echoes its seq."""
        seq = self.new_seq() if seq is None else seq
        fut: asyncio.Future[Received] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            await self._send_frame(msg_type, seq, payload)
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except TimeoutError:
                raise PeerTimeout(
                    f"no reply to type 0x{msg_type:02X} seq {seq} within {timeout_s} s"
                ) from None
        finally:
            self._pending.pop(seq, None)
            if not fut.done():
                fut.cancel()

    async def call(self, msg_type: int, payload: bytes = b"", **kw: float) -> Message:
        return (await self.request(msg_type, payload, **kw)).message  # type: ignore[arg-type]

    # -- typed requests (each returns the decoded reply, ACK/NAK included) ----------------

    async def hello(self) -> Info | Nak:
        return await self._typed(HELLO, b"", Info)

    async def ping(self) -> Pong:
        reply = await self.call(PING)
        assert isinstance(reply, Pong), f"PING answered with {reply}"
        return reply

    async def get_port(self, port: int) -> PortInfo | Nak:
        return await self._typed(GET_PORT, bytes([port]), PortInfo)

    async def set_telemetry(self, rate_hz: int) -> Ack | Nak:
        return await self._typed(SET_TELEMETRY, struct.pack("<H", rate_hz), Ack)

    async def arm(self, session_token: int) -> Ack | Nak:
        return await self._typed(ARM, struct.pack("<I", session_token), Ack)

    async def disarm(self) -> Ack | Nak:
        return await self._typed(DISARM, b"", Ack)

    async def emit_start(
        self, port: int, wavelength_nm: int, power_uw: int, **kw: int
    ) -> Ack | Nak:
        return await self._typed(
            EMIT_START, pack_emit_start(port, wavelength_nm, power_uw, **kw), Ack
        )

    async def emit_stop(self, port: int) -> Stopped | Nak:
        return await self._typed(EMIT_STOP, bytes([port]), Stopped)

    async def all_off(self) -> Ack | Nak:
        return await self._typed(ALL_OFF, b"", Ack)

    async def clear_fault(self) -> Ack | Nak:
        return await self._typed(CLEAR_FAULT, b"", Ack)

    async def get_counters(self, port: int) -> Counters | Nak:
        return await self._typed(GET_COUNTERS, bytes([port]), Counters)

    async def _typed(self, msg_type: int, payload: bytes, ok: type[_T]) -> _T | Nak:
        reply = await self.call(msg_type, payload)
        assert isinstance(reply, (ok, Nak)), (
            f"request 0x{msg_type:02X} answered with {reply!r}, ICD says {ok.__name__} or NAK"
        )
        return reply

    # -- heartbeat -----------------------------------------------------------------------

    def set_heartbeat(self, on: bool, interval_s: float = 0.05) -> None:
        """PING every `interval_s` (ICD §5: every <= 100 ms keeps the watchdog fed)."""
        self._heartbeat_on = on
        self._heartbeat_s = interval_s

    async def _heartbeat_loop(self) -> None:
        while not self.eof.is_set():
            if self._heartbeat_on:
                seq = self.new_seq()
                self._heartbeat_seqs.add(seq)
                try:
                    await self._send_frame(PING, seq, b"")
                except (ConnectionError, OSError):
                    return
            await asyncio.sleep(self._heartbeat_s)

    # -- receiving -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                chunk = await self._reader.read(65536)
                if not chunk:
                    break
                now = time.monotonic()
                for encoded in self._splitter.feed(chunk):
                    self._accept(encoded, now)
                self.stats.empty = self._splitter.empty_frames
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("link closed by the controller"))
            self._pulse()

    def _drop(self, reason: str, detail: str) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        self.violations.append(f"controller sent an invalid frame ({reason}): {detail}")

    def _accept(self, encoded: bytes, now: float) -> None:
        try:
            body = cobs_decode(encoded)
        except CobsError as exc:
            self._drop("cobs", str(exc))
            return
        try:
            frame = parse_body(body)
        except FrameError as exc:
            self._drop("frame", f"{exc}: {body.hex()}")
            return
        try:
            message = unpack_message(frame)
        except ValueError as exc:
            self._drop("message", f"{exc}: type 0x{frame.msg_type:02X} {frame.payload.hex()}")
            return
        self.stats.frames += 1
        rec = Received(len(self.received), now, frame, message)
        self.received.append(rec)
        if frame.msg_type in REPLY_TYPES:
            answered = self.replies_by_seq.setdefault(frame.seq, [])
            answered.append(rec)
            if len(answered) > max(1, self._requests_per_seq.get(frame.seq, 0)):
                self.violations.append(f"second reply to seq {frame.seq}: {message}")
            fut = self._pending.get(frame.seq)
            if fut is not None and not fut.done():
                fut.set_result(rec)
        self._pulse()

    def _pulse(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    # -- waiting -------------------------------------------------------------------------

    def mark(self) -> int:
        """Index of the next frame to arrive: pass it as `after` to wait on what follows."""
        return len(self.received)

    async def wait_for(
        self,
        predicate: Callable[[Received], bool],
        *,
        after: int = 0,
        timeout_s: float = 2.0,
        what: str = "frame",
    ) -> Received:
        """The first frame at index >= `after` that satisfies `predicate`."""
        deadline = time.monotonic() + timeout_s
        pos = after
        while True:
            while pos < len(self.received):
                rec = self.received[pos]
                pos += 1
                if predicate(rec):
                    return rec
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.eof.is_set():
                why = "link closed" if self.eof.is_set() else f"{timeout_s} s"
                raise PeerTimeout(f"no {what} after frame {after} ({why})")
            wake = self._wake
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), remaining)

    async def wait_telemetry(
        self,
        predicate: Callable[[Telemetry], bool] = lambda _t: True,
        *,
        after: int | None = None,
        timeout_s: float = 2.0,
        what: str = "telemetry",
    ) -> Telemetry:
        rec = await self.wait_for(
            lambda r: isinstance(r.message, Telemetry) and predicate(r.message),
            after=self.mark() if after is None else after,
            timeout_s=timeout_s,
            what=what,
        )
        assert isinstance(rec.message, Telemetry)
        return rec.message

    async def wait_event(
        self,
        code: int,
        *,
        port: int | None = None,
        value: int | None = None,
        after: int = 0,
        timeout_s: float = 2.0,
    ) -> Event:
        def match(r: Received) -> bool:
            m = r.message
            return (
                isinstance(m, Event)
                and m.code == code
                and (port is None or m.port == port)
                and (value is None or m.value == value)
            )

        rec = await self.wait_for(
            match, after=after, timeout_s=timeout_s, what=f"event {code} port {port} value {value}"
        )
        assert isinstance(rec.message, Event)
        return rec.message

    def telemetry(self, after: int = 0, before: int | None = None) -> list[Telemetry]:
        return [r.message for r in self.received[after:before] if isinstance(r.message, Telemetry)]

    def events(self, after: int = 0, code: int | None = None) -> list[Event]:
        return [
            r.message
            for r in self.received[after:]
            if isinstance(r.message, Event) and (code is None or r.message.code == code)
        ]

    def is_heartbeat(self, seq: int) -> bool:
        """Whether `seq` was one of the heartbeat's own PINGs."""
        return seq in self._heartbeat_seqs

    # -- closing -------------------------------------------------------------------------

    async def close(self) -> None:
        self._heartbeat_on = False
        self._beat_task.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._read_task.cancel()
        await asyncio.gather(self._read_task, self._beat_task, return_exceptions=True)
