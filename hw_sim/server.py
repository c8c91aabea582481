"""The simulated controller as a process sees it: links (TCP, pty), telemetry, control channel.

One host connection at a time, over any link: a new TCP connection, or a host
opening the pty, replaces the previous host, and the controller's state and
counters carry over (ICD §5a). Nothing here creates asyncio tasks: links are
protocol callbacks and timers, so closing the simulator leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import termios
import tty
from typing import TYPE_CHECKING, Any, Protocol, Self

from pbmd.drivers import codec
from pbmd.drivers.lifecycle import AsyncClosing

from .config import SimConfig
from .controller import Clock, Controller
from .faults import ControlProtocol, FaultInjector, IncomingCorruption, corrupt_frame

if TYPE_CHECKING:
    from .usb_backend import SimulatedUsbDevice

log = logging.getLogger(__name__)

TELEMETRY_CATCH_UP_PERIODS = 5
"""How far behind a late telemetry schedule may fall and still be made up."""

WRITE_LIMIT_BYTES = 256 * 1024  # a host that stops reading loses frames, not memory
PTY_POLL_S = 0.005  # how often to look for a host opening the pty while none is open


class HostLink(Protocol):
    """A connection to the host: where frames are written."""

    name: str

    def write(self, data: bytes) -> bool: ...

    def drop(self) -> None: ...


class _TcpHost(asyncio.Protocol):
    """One TCP host connection."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._transport: asyncio.Transport | None = None
        self.name = "tcp"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.name = f"tcp:{peer[0]}:{peer[1]}" if peer else "tcp"
        self._sim._attach(self)

    def data_received(self, data: bytes) -> None:
        self._sim._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sim._detach(self)

    def write(self, data: bytes) -> bool:
        t = self._transport
        if t is None or t.is_closing() or t.get_write_buffer_size() > WRITE_LIMIT_BYTES:
            return False
        t.write(data)
        return True

    def drop(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _PtyHost:
    """A pseudo-terminal whose slave path a host opens like a serial port.

    The slave is in raw mode (bytes pass unchanged) at 921600 baud 8N1. The
    simulator keeps no slave descriptor open, so reading the master fails with
    EIO while no host has the path open: that means "no host", and the master
    is polled until a host opens it again.
    """

    def __init__(self, sim: Simulator, loop: asyncio.AbstractEventLoop) -> None:
        self._sim = sim
        self._loop = loop
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            attrs = termios.tcgetattr(slave)
            attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB | termios.CSTOPB)) | (
                termios.CS8 | termios.CREAD | termios.CLOCAL
            )
            attrs[4] = attrs[5] = termios.B921600
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            self.path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.fd = master
        self.name = f"pty:{self.path}"
        self._host_open = False
        self._silenced = False
        self._closed = False
        self._out = bytearray()
        self._writer_on = False
        self._poll_handle: asyncio.TimerHandle | None = None
        self._schedule_poll(0.0)

    # -- host presence ---------------------------------------------------------------

    @property
    def host_open(self) -> bool:
        return self._host_open

    @property
    def silenced(self) -> bool:
        return self._silenced

    def _schedule_poll(self, delay_s: float) -> None:
        if not self._closed:
            self._poll_handle = self._loop.call_later(delay_s, self._poll)

    def _poll(self) -> None:
        self._poll_handle = None
        if self._closed:
            return
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            self._host_opened()
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                log.warning("pty %s: %s", self.path, exc)
            self._schedule_poll(PTY_POLL_S)
            return
        if not data:
            self._schedule_poll(PTY_POLL_S)
            return
        self._host_opened()
        self._sim._received(self, data)

    def _host_opened(self) -> None:
        self._host_open = True
        self._silenced = False
        self._loop.add_reader(self.fd, self._readable)
        self._sim._attach(self)

    def _host_closed(self) -> None:
        self._loop.remove_reader(self.fd)
        self._stop_writer()
        self._host_open = False
        self._silenced = False
        self._out.clear()
        # what the departed host left unread must not reach the next one
        with contextlib.suppress(OSError):
            termios.tcflush(self.fd, termios.TCIOFLUSH)
        self._sim._detach(self)
        self._schedule_poll(PTY_POLL_S)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the last host descriptor was closed
            self._host_closed()
            return
        if not data:
            self._host_closed()
            return
        if not self._silenced:
            self._sim._received(self, data)

    # -- output ----------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        if self._closed or not self._host_open or self._silenced:
            return False
        if len(self._out) + len(data) > WRITE_LIMIT_BYTES:
            return False
        if self._out:
            self._out += data
            return True
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            return False
        if n < len(data):
            self._out += data[n:]
            if not self._writer_on:
                self._loop.add_writer(self.fd, self._writable)
                self._writer_on = True
        return True

    def _writable(self) -> None:
        try:
            n = os.write(self.fd, self._out)
        except BlockingIOError:
            return
        except OSError:
            self._out.clear()
            n = 0
        del self._out[:n]
        if not self._out:
            self._stop_writer()

    def _stop_writer(self) -> None:
        if self._writer_on:
            self._loop.remove_writer(self.fd)
            self._writer_on = False

    def drop(self) -> None:
        """Cut the line: the host hears nothing, and is ignored, until it reopens the path."""
        if self._host_open:
            self._silenced = True
            self._stop_writer()
            self._out.clear()
            with contextlib.suppress(OSError):
                termios.tcflush(self.fd, termios.TCOFLUSH)

    def close(self) -> None:
        self._closed = True
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        self._loop.remove_reader(self.fd)
        self._stop_writer()
        os.close(self.fd)


class Simulator(AsyncClosing):
    """A simulated PBM-Link controller (see docs/simulator.md).

    >>> async with Simulator(SimConfig(time_scale=60)) as sim:
    ...     url = await sim.listen_tcp("127.0.0.1", 0)
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.config.validate()
        self.faults = FaultInjector(self)
        self._controller: Controller | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: HostLink | None = None
        self._decoder = codec.StreamDecoder()
        self._rx_totals = codec.DecoderStats()
        self._servers: list[asyncio.Server] = []
        self._ptys: list[_PtyHost] = []
        self._usb: list[SimulatedUsbDevice] = []
        self._control_clients: set[asyncio.Transport] = set()
        self._delayed: set[asyncio.TimerHandle] = set()
        self._telemetry: asyncio.TimerHandle | None = None
        self._tm_next = 0.0
        self._tm_period = 0.0
        self._device_seq = 0
        self._fault_rng = random.Random(self.config.seed)
        self._incoming = IncomingCorruption(self._fault_rng)
        self.connections = 0
        self.rx_bytes = 0
        self.tx_frames = 0
        self.tx_corrupted = 0
        self.tx_dropped: dict[str, int] = {
            "no_host": 0,
            "telemetry_stall": 0,
            "drop_replies": 0,
            "overflow": 0,
        }

    # -- lifecycle -------------------------------------------------------------------

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            raise RuntimeError("the simulator is not started: await sim.start() first")
        return self._controller

    async def start(self) -> None:
        """Start the device clock (device time 0 is now) and the physics."""
        if self._controller is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._controller = Controller(self.config, Clock(self._loop, self.config.time_scale), self)
        self._controller.reschedule()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def close(self) -> None:
        """Close every listener and connection and cancel every timer."""
        if self._telemetry is not None:
            self._telemetry.cancel()
            self._telemetry = None
        for handle in self._delayed:
            handle.cancel()
        self._delayed.clear()
        if self._controller is not None:
            self._controller.close()
        link, self._link = self._link, None
        if link is not None:
            link.drop()
        for server in self._servers:
            server.close()
        for transport in list(self._control_clients):
            transport.abort()
        for pty in self._ptys:
            pty.close()
        self._ptys.clear()
        self._unplug_usb()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    @property
    def device_time_us(self) -> int:
        self.controller.sync()
        return self.controller.now_us

    # -- listeners -------------------------------------------------------------------

    async def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve PBM-Link on TCP; returns the link URL ``socket://host:port``."""
        loop = asyncio.get_running_loop()
        self.controller  # noqa: B018 - must be started
        server = await loop.create_server(lambda: _TcpHost(self), host, port)
        self._servers.append(server)
        addr = server.sockets[0].getsockname()
        shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"socket://{shown}:{addr[1]}"

    async def listen_pty(self) -> str:
        """Serve PBM-Link on a new pseudo-terminal; returns its path (e.g. /dev/pts/7)."""
        self.controller  # noqa: B018 - must be started
        pty = _PtyHost(self, asyncio.get_running_loop())
        self._ptys.append(pty)
        return pty.path

    async def listen_usb(self, max_packet: int = 64) -> str:
        """Appear on the process's simulated USB bus; returns ``usb://1209:0001/SERIAL?backend=sim``.

        The device carries the bytes over a loopback TCP listener of this simulator
        (see :mod:`pbmd.hw_sim.usb_backend`); closing the simulator unplugs it.
        """
        from .usb_backend import SimulatedUsbDevice, device_url, shared_backend

        link_url = await self.listen_tcp("127.0.0.1", 0)
        device = SimulatedUsbDevice(link_url, self.config.serial, max_packet=max_packet)
        self._usb.append(shared_backend().attach(device))
        return device_url(device)

    @property
    def usb_devices(self) -> list[SimulatedUsbDevice]:
        """This simulator's devices on the simulated USB bus (to unplug and replug them)."""
        return list(self._usb)

    def _unplug_usb(self) -> None:
        if self._usb:
            from .usb_backend import shared_backend

            for device in self._usb:
                shared_backend().remove(device)
            self._usb.clear()

    async def listen_control(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the JSON-lines control channel; returns ``host:port``."""
        loop = asyncio.get_running_loop()
        self.controller  # noqa: B018 - must be started
        server = await loop.create_server(lambda: ControlProtocol(self), host, port)
        self._servers.append(server)
        addr = server.sockets[0].getsockname()
        return f"{addr[0]}:{addr[1]}"

    # -- host link -------------------------------------------------------------------

    def _attach(self, link: HostLink) -> None:
        old = self._link
        self._link = link
        self._fold_decoder()
        self._incoming.reset()
        self.connections += 1
        log.info("host connected on %s", link.name)
        if old is not None and old is not link:
            log.info("host on %s replaced by %s", old.name, link.name)
            old.drop()

    def _detach(self, link: HostLink) -> None:
        if self._link is link:
            self._link = None
            log.info("host on %s gone", link.name)

    def drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.drop()

    def _fold_decoder(self) -> None:
        old = self._decoder.stats
        self._rx_totals.frames += old.frames
        self._rx_totals.empty += old.empty
        for reason, n in old.dropped.items():
            self._rx_totals.dropped[reason] += n
        self._decoder = codec.StreamDecoder()

    def _received(self, link: HostLink, data: bytes) -> None:
        if link is not self._link or self._controller is None:
            return
        self.rx_bytes += len(data)
        data = self._incoming.apply(data, self.faults.link.corrupt_to_controller_rate)
        try:
            frames = self._decoder.feed(data)
        except Exception:  # the decoder never raises; the simulator must not die if it does
            log.exception("decoder failed")
            self._controller.internal_errors += 1
            self._decoder = codec.StreamDecoder()
            return
        for frame in frames:
            if link is not self._link:
                return
            try:
                self._controller.handle_frame(frame)
            except Exception:  # a bug must cost one reply, never the link or the process
                log.exception("request type 0x%02X failed", frame.msg_type)
                self._controller.internal_errors += 1

    # -- output (the controller's Outbox) ----------------------------------------------

    def _next_seq(self) -> int:
        seq = self._device_seq
        self._device_seq = (self._device_seq + 1) & 0xFFFF
        return seq

    def reply(self, seq: int, msg: codec.Message) -> None:
        self._send(msg, seq, "reply")

    def event(self, msg: codec.Event) -> None:
        self._send(msg, self._next_seq(), "event")

    def telemetry_rate_changed(self, rate_hz: int) -> None:
        if self._telemetry is not None:
            self._telemetry.cancel()
            self._telemetry = None
        if rate_hz <= 0 or self._loop is None:
            return
        self._tm_period = 1.0 / rate_hz
        self._tm_next = self._loop.time() + self._tm_period
        self._telemetry = self._loop.call_at(self._tm_next, self._telemetry_tick)

    def _telemetry_tick(self) -> None:
        assert self._loop is not None
        ctl = self.controller
        try:
            msg = ctl.telemetry()
            self._send(msg, self._next_seq(), "telemetry")
            ctl.reschedule()
        except Exception:
            log.exception("telemetry sample failed")
            ctl.internal_errors += 1
        now = self._loop.time()
        self._tm_next += self._tm_period
        # A tick that ran late is made up at once, so the rate per wall second
        # holds on a busy machine; only after a long stall (a suspended
        # process) does the schedule restart instead of bursting.
        if self._tm_next < now - TELEMETRY_CATCH_UP_PERIODS * self._tm_period:
            self._tm_next = now + self._tm_period
        self._telemetry = self._loop.call_at(self._tm_next, self._telemetry_tick)

    def _send(self, msg: codec.Message, seq: int, kind: str) -> None:
        link = self._link
        lf = self.faults.link
        if link is None:
            self.tx_dropped["no_host"] += 1
            return
        if kind == "telemetry" and lf.telemetry_stall:
            self.tx_dropped["telemetry_stall"] += 1
            return
        if kind == "reply" and lf.drops_reply(msg):
            self.tx_dropped["drop_replies"] += 1
            return
        data = codec.encode_frame(msg, seq)
        if lf.corrupt_rate > 0 and self._fault_rng.random() < lf.corrupt_rate:
            self.tx_corrupted += 1
            data = corrupt_frame(data, self._fault_rng)
        if kind == "reply" and lf.reply_delay_ms > 0 and self._loop is not None:
            handle: asyncio.TimerHandle | None = None

            def later() -> None:
                if handle is not None:
                    self._delayed.discard(handle)
                if self._link is link:
                    self._write(link, data)

            handle = self._loop.call_later(lf.reply_delay_ms / 1000.0, later)
            self._delayed.add(handle)
            return
        self._write(link, data)

    def _write(self, link: HostLink, data: bytes) -> None:
        if link.write(data):
            self.tx_frames += 1
        else:
            self.tx_dropped["overflow"] += 1

    # -- introspection ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Controller, ports and link counters as plain JSON-able data."""
        snap = self.controller.snapshot()
        dec = self._decoder.stats
        dropped = {r: self._rx_totals.dropped[r] + dec.dropped[r] for r in dec.dropped}
        lf = self.faults.link
        snap["link"] = {
            "host": self._link.name if self._link is not None else None,
            "connections": self.connections,
            "rx_bytes": self.rx_bytes,
            "rx_frames": self._rx_totals.frames + dec.frames,
            "rx_empty": self._rx_totals.empty + dec.empty,
            "rx_dropped": dropped,
            "rx_dropped_total": sum(dropped.values()),
            "tx_frames": self.tx_frames,
            "tx_corrupted": self.tx_corrupted,
            "rx_corrupted": self._incoming.corrupted,
            "tx_dropped": dict(self.tx_dropped),
            "ptys": [
                {"path": p.path, "host_open": p.host_open, "silenced": p.silenced}
                for p in self._ptys
            ],
            "faults": {
                "telemetry_stall": lf.telemetry_stall,
                "corrupt_rate": lf.corrupt_rate,
                "corrupt_to_controller_rate": lf.corrupt_to_controller_rate,
                "reply_delay_ms": lf.reply_delay_ms,
                "drop_replies": lf.drop_replies,
            },
        }
        return snap
