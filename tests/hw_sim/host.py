"""A minimal PBM-Link host for the simulator's tests: the shared codec over a real stream.

Deliberately not the pbmd driver client: these tests pin down the controller's
behaviour byte for byte, so they speak frames directly over a TCP socket or a
pty slave descriptor and wait on what arrives, never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pbmd.drivers import codec
from pbmd.drivers.codec import ControllerState, EventCode

M = TypeVar("M", bound=codec.Message)

REPLY_TYPES = frozenset(c.TYPE for c in codec.DEVICE_MESSAGES) - {
    codec.Telemetry.TYPE,
    codec.Event.TYPE,
}
BOUND_S = 5.0  # failure bound of every wait (never a synchronisation delay)


@dataclass(frozen=True)
class Rx:
    """One frame from the controller, in stream order."""

    index: int
    wall_s: float
    seq: int
    msg_type: int
    message: codec.Message | None  # None when the payload does not parse


class TestHost:
    """Sends requests, records every frame, waits on conditions."""

    __test__ = False  # not a pytest class

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self.decoder = codec.StreamDecoder()
        self.received: list[Rx] = []
        self.eof = asyncio.Event()
        self._wake = asyncio.Event()
        self._seq = 0
        self._beat: asyncio.Task[None] | None = None
        self.sent_seqs: list[int] = []

    # -- receiving -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        now = time.monotonic()
        for frame in self.decoder.feed(data):
            try:
                msg: codec.Message | None = frame.message()
            except codec.CodecError:
                msg = None
            self.received.append(Rx(len(self.received), now, frame.seq, frame.msg_type, msg))
        self._pulse()

    def closed(self) -> None:
        self.eof.set()
        self._pulse()

    def _pulse(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def mark(self) -> int:
        return len(self.received)

    async def wait_for(
        self,
        predicate: Callable[[Rx], bool],
        *,
        after: int = 0,
        timeout_s: float = BOUND_S,
        what: str = "frame",
    ) -> Rx:
        deadline = time.monotonic() + timeout_s
        pos = after
        while True:
            while pos < len(self.received):
                rx = self.received[pos]
                pos += 1
                if predicate(rx):
                    return rx
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout_s} s")
            if self.eof.is_set():
                raise AssertionError(f"link closed while waiting for {what}")
            wake = self._wake
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), remaining)

    async def wait_event(
        self,
        code: EventCode,
        *,
        port: int | None = None,
        value: int | None = None,
        after: int = 0,
        timeout_s: float = BOUND_S,
    ) -> codec.Event:
        def match(rx: Rx) -> bool:
            m = rx.message
            return (
                isinstance(m, codec.Event)
                and m.code == code
                and (port is None or m.port == port)
                and (value is None or m.value == value)
            )

        rx = await self.wait_for(
            match, after=after, timeout_s=timeout_s, what=f"{code.name} port={port} value={value}"
        )
        assert isinstance(rx.message, codec.Event)
        return rx.message

    async def wait_telemetry(
        self,
        predicate: Callable[[codec.Telemetry], bool] = lambda _t: True,
        *,
        after: int | None = None,
        timeout_s: float = BOUND_S,
        what: str = "telemetry",
    ) -> codec.Telemetry:
        rx = await self.wait_for(
            lambda r: isinstance(r.message, codec.Telemetry) and predicate(r.message),
            after=self.mark() if after is None else after,
            timeout_s=timeout_s,
            what=what,
        )
        assert isinstance(rx.message, codec.Telemetry)
        return rx.message

    async def wait_state(self, state: ControllerState, timeout_s: float = BOUND_S) -> None:
        await self.wait_telemetry(lambda t: t.state == state, timeout_s=timeout_s, what=state.name)

    def events(self, after: int = 0, code: EventCode | None = None) -> list[codec.Event]:
        return [
            r.message
            for r in self.received[after:]
            if isinstance(r.message, codec.Event) and (code is None or r.message.code == code)
        ]

    def telemetry(self, after: int = 0) -> list[codec.Telemetry]:
        return [r.message for r in self.received[after:] if isinstance(r.message, codec.Telemetry)]

    def replies(self, seq: int) -> list[Rx]:
        return [r for r in self.received if r.seq == seq and r.msg_type in REPLY_TYPES]

    # -- sending ---------------------------------------------------------------------

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def send_raw(self, data: bytes) -> None:
        self._write(data)

    def send(self, msg: codec.Message, seq: int | None = None) -> int:
        seq = self.next_seq() if seq is None else seq
        self.sent_seqs.append(seq)
        self._write(codec.encode_frame(msg, seq))
        return seq

    def send_body(self, msg_type: int, payload: bytes, seq: int | None = None) -> int:
        """A valid frame with any type and payload (for refusal tests)."""
        seq = self.next_seq() if seq is None else seq
        self._write(codec.cobs_encode(codec.encode_body(msg_type, seq, payload)) + b"\x00")
        return seq

    async def reply_to(self, seq: int, timeout_s: float = BOUND_S) -> codec.Message:
        rx = await self.wait_for(
            lambda r: r.seq == seq and r.msg_type in REPLY_TYPES,
            timeout_s=timeout_s,
            what=f"reply to seq {seq}",
        )
        assert rx.message is not None, f"reply type 0x{rx.msg_type:02X} does not parse"
        return rx.message

    async def request(self, msg: codec.Message, timeout_s: float = BOUND_S) -> codec.Message:
        return await self.reply_to(self.send(msg), timeout_s)

    async def raw_request(self, msg_type: int, payload: bytes) -> codec.Message:
        return await self.reply_to(self.send_body(msg_type, payload))

    async def expect(self, msg: codec.Message, cls: type[M]) -> M:
        reply = await self.request(msg)
        assert isinstance(reply, cls), f"{msg} answered {reply}, expected {cls.__name__}"
        return reply

    async def ack(self, msg: codec.Message) -> None:
        reply = await self.request(msg)
        assert reply == codec.Ack(), f"{msg} answered {reply}"

    async def nak(self, msg: codec.Message) -> int:
        reply = await self.request(msg)
        assert isinstance(reply, codec.Nak), f"{msg} answered {reply}, expected a NAK"
        return reply.error

    async def handshake(self, telemetry_hz: int = 100) -> codec.Info:
        info = await self.expect(codec.Hello(), codec.Info)
        for port in range(1, info.port_count + 1):
            await self.expect(codec.GetPort(port), codec.PortInfo)
        await self.ack(codec.SetTelemetry(telemetry_hz))
        return info

    async def arm_ready(self, token: int = 0x1234) -> None:
        await self.ack(codec.Arm(token))
        await self.wait_state(ControllerState.ARMED_READY)

    async def ping_through(self, wall_s: float) -> None:
        """Exchange PINGs until ``wall_s`` has passed: proves time passed, by replies."""
        end = time.monotonic() + wall_s
        while time.monotonic() < end:
            await self.expect(codec.Ping(), codec.Pong)

    async def device_us(self) -> int:
        pong = await self.expect(codec.Ping(), codec.Pong)
        return pong.device_time_us

    # -- heartbeat -------------------------------------------------------------------

    def heartbeat(self, on: bool = True, interval_s: float = 0.05) -> None:
        """PING every interval (keeps the 250 ms watchdog fed)."""
        if on and self._beat is None:
            self._beat = asyncio.create_task(self._beat_loop(interval_s), name="host-heartbeat")
        elif not on and self._beat is not None:
            self._beat.cancel()
            self._beat = None

    async def _beat_loop(self, interval_s: float) -> None:
        while not self.eof.is_set():
            self.send(codec.Ping())
            await asyncio.sleep(interval_s)  # pacing, not synchronisation

    async def close(self) -> None:
        """Close the link (each transport implements it)."""
        raise NotImplementedError

    async def stop_heartbeat(self) -> None:
        beat, self._beat = self._beat, None
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat


class TcpHost(TestHost):
    """A host on a TCP link."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(self._send_bytes)
        self._reader = reader
        self._writer = writer
        self._task = asyncio.create_task(self._read_loop(), name="host-read")

    @classmethod
    async def connect(cls, url: str) -> TcpHost:
        host, _, port = url.removeprefix("socket://").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    def _send_bytes(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    async def _read_loop(self) -> None:
        try:
            while chunk := await self._reader.read(65536):
                self.feed(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed()

    async def close(self) -> None:
        await self.stop_heartbeat()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class PtyHost(TestHost):
    """A host that opens the pty slave path as a serial port would."""

    def __init__(self, path: str) -> None:
        super().__init__(self._send_bytes)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)

    def _send_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                continue
            view = view[n:]

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.fd)
            self.closed()
            return
        self.feed(data)

    async def close(self) -> None:
        await self.stop_heartbeat()
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = BOUND_S) -> None:
    """Poll an in-process condition (simulator state) until it holds; the timeout fails."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(0.002)  # a polling interval, not a synchronisation delay


def emit(
    port: int,
    wavelength_nm: int,
    power_uw: int,
    *,
    mode: int = 0,
    pulse_hz: int = 0,
    duty_permille: int = 1000,
    energy_budget_uj: int = 10**12,
    max_duration_ms: int = 3_600_000,
) -> codec.EmitStart:
    """EMIT_START with generous limits unless a test sets them."""
    return codec.EmitStart(
        port, wavelength_nm, mode, power_uw, pulse_hz, duty_permille, energy_budget_uj,
        max_duration_ms,
    )  # fmt: skip


def probe_pulse(power_uw: int = 100_000, **kw: int) -> codec.EmitStart:
    """EMIT_START for the 905 nm superpulsed probe on port 4 (10 kHz, 200 ns pulses)."""
    return emit(4, 905, power_uw, mode=1, pulse_hz=10_000, duty_permille=2, **kw)
