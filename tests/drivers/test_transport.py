"""open_link over real transports: a pty pair and a TCP server, each with a
small hand-written controller on the far end, plus every refused URL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from pbm_link_script import WAIT_S, wait_until

from pbmd.drivers import codec
from pbmd.drivers.client import ControllerClient, LinkClosed, UnexpectedReply, open_controller
from pbmd.drivers.transport import (
    Link,
    LinkError,
    LinkURLError,
    SerialLink,
    TcpLink,
    open_link,
)

PAD = codec.PortInfo(
    1, 1, "DUO-000001", 18000, (codec.Channel(660, 1_800_000, 3), codec.Channel(830, 2_700_000, 3))
)


class MiniController:
    """Just enough of a one-port controller to answer the handshake and pings."""

    def __init__(self) -> None:
        self.decoder = codec.StreamDecoder()
        self.received: list[codec.Frame] = []
        self.got_frame = asyncio.Event()

    def answer(self, data: bytes) -> bytes:
        out = bytearray()
        for frame in self.decoder.feed(data):
            self.received.append(frame)
            self.got_frame.set()
            reply: codec.Message
            if frame.msg_type == codec.Hello.TYPE:
                reply = codec.Info(1, 1, 200, 250, 2000, "MINI-1", "0.1")
            elif frame.msg_type == codec.GetPort.TYPE:
                reply = PAD
            elif frame.msg_type == codec.Ping.TYPE:
                reply = codec.Pong(len(self.received))
            else:
                reply = codec.Ack()
            out += codec.encode_frame(reply, frame.seq)
            if frame.msg_type == codec.SetTelemetry.TYPE:
                out += codec.encode_frame(
                    codec.Telemetry(1, 0, 7, 0, (codec.PortSample(1, 0, 0, 0, 2400),)), 1
                )
        return bytes(out)

    def count(self, msg_type: int) -> int:
        return sum(1 for f in self.received if f.msg_type == msg_type)

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self.got_frame.clear()
                await self.got_frame.wait()


# --- pty --------------------------------------------------------------------------


class PtyController(MiniController):
    """The controller on the master side of a pty; the client opens the slave path."""

    def __init__(self) -> None:
        super().__init__()
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)  # the pty stays alive while the master is open
        os.set_blocking(self.master, False)
        asyncio.get_running_loop().add_reader(self.master, self._readable)
        self.open = True

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO while no slave is open
            return
        reply = self.answer(data)
        if reply:
            os.write(self.master, reply)

    def hang_up(self) -> None:
        if self.open:
            self.open = False
            asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)


@pytest.fixture
async def pty_controller() -> AsyncIterator[PtyController]:
    device = PtyController()
    yield device
    device.hang_up()


@pytest.mark.parametrize("form", ["path", "serial_url"])
async def test_controller_over_a_pty(pty_controller: PtyController, form: str) -> None:
    url = pty_controller.path if form == "path" else f"serial://{pty_controller.path}"
    client = await open_controller(url, telemetry_hz=20)
    try:
        assert isinstance(client.link, SerialLink) and client.url == url
        assert client.info.serial == "MINI-1" and client.ports == {1: PAD}
        types = [f.msg_type for f in pty_controller.received[:3]]
        assert types == [codec.Hello.TYPE, codec.GetPort.TYPE, codec.SetTelemetry.TYPE]
        await pty_controller.wait_for(lambda: pty_controller.count(codec.Ping.TYPE) >= 5)
        await wait_until(lambda: client.stats.telemetry_rx == 1)
        assert (await client.ping()).device_time_us > 0
    finally:
        await client.close()
    assert client.stats.heartbeat_failures == 0


async def test_serial_port_settings(pty_controller: PtyController) -> None:
    link = await open_link(pty_controller.path)
    try:
        assert isinstance(link, SerialLink)
        port = link._writer.transport.get_extra_info("serial")
        assert port is not None
        assert (port.baudrate, port.bytesize, port.parity, port.stopbits) == (921600, 8, "N", 1)
        assert not (port.xonxoff or port.rtscts or port.dsrdtr)
        # A second opener is refused: one host per controller.
        with pytest.raises(LinkError, match="cannot open serial port"):
            await open_link(pty_controller.path)
    finally:
        await link.close()
        await link.close()  # idempotent
    assert await link.read() == b""


async def test_pty_hang_up_is_a_link_loss(pty_controller: PtyController) -> None:
    client = await open_controller(pty_controller.path, telemetry_hz=0)
    lost: list[LinkClosed] = []
    client.add_link_lost_listener(lost.append)
    try:
        pty_controller.hang_up()
        await wait_until(lambda: bool(lost))
        assert not client.heartbeat_running or not client.is_open
        with pytest.raises(LinkClosed):
            await client.ping()
    finally:
        await client.close()
    assert len(lost) == 1 and "read failed" in lost[0].reason


# --- TCP --------------------------------------------------------------------------


class TcpController(MiniController):
    def __init__(self) -> None:
        super().__init__()
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.nodelay: list[int] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"socket://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.append(writer)
        try:
            while data := await reader.read(4096):
                reply = self.answer(data)
                if reply:
                    writer.write(reply)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def drop_connections(self) -> None:
        for writer in self.writers:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.drop_connections()
        await asyncio.gather(*self.handlers, return_exceptions=True)


@pytest.fixture
async def tcp_controller() -> AsyncIterator[TcpController]:
    device = TcpController()
    yield device
    await device.stop()


async def test_controller_over_tcp(tcp_controller: TcpController) -> None:
    url = await tcp_controller.start()
    client = await open_controller(url, telemetry_hz=10)
    try:
        assert isinstance(client.link, TcpLink)
        sock = client.link._writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert client.info.firmware == "0.1"
        await tcp_controller.wait_for(lambda: tcp_controller.count(codec.Ping.TYPE) >= 5)
        # MiniController answers ACK to anything else: the client must say so.
        with pytest.raises(UnexpectedReply, match="expected Counters"):
            await client.get_counters(1)
    finally:
        await client.close()


async def test_tcp_peer_closing_is_a_link_loss(tcp_controller: TcpController) -> None:
    url = await tcp_controller.start()
    client = await open_controller(url, telemetry_hz=0)
    lost: list[LinkClosed] = []
    client.add_link_lost_listener(lost.append)
    try:
        tcp_controller.drop_connections()
        await wait_until(lambda: bool(lost))
        assert "end of stream" in lost[0].reason or "read failed" in lost[0].reason
    finally:
        await client.close()
    assert client.link_lost and not client.heartbeat_running


async def test_link_is_an_async_context_manager(tcp_controller: TcpController) -> None:
    url = await tcp_controller.start()
    async with await open_link(url) as link:
        await link.write(codec.encode_frame(codec.Ping(), 1))
        frames = codec.iter_frames([await link.read()])
        assert frames[0].msg_type == codec.Pong.TYPE and frames[0].seq == 1
    assert await link.read() == b""
    with pytest.raises(LinkError, match="closed"):
        await link.write(b"\x00")


async def test_connection_refused_is_a_link_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(LinkError, match="cannot connect"):
            await open_link(f"socket://127.0.0.1:{port}")


# --- refused URLs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "usb://",
        "USB://controller",
        "usb://1209",
        "usb://1209:01",
        "usb://1209:0001/a/b",
        "usb://1209:0001/SERIAL-LONGER-THAN-16",
        "usb://1209:0001?baud=9600",
    ],
)
async def test_malformed_usb_urls_name_the_usb_form(url: str) -> None:
    with pytest.raises(LinkURLError, match="usb://VID:PID/SERIAL"):
        await open_link(url)


@pytest.mark.parametrize(
    "url",
    ["", "http://example.com", "COM3", "tty0", "ftp://x:1", "/dev/", "/tmp/not-a-device"],
)
async def test_unknown_forms_name_the_accepted_ones(url: str) -> None:
    with pytest.raises(LinkURLError) as caught:
        await open_link(url)
    message = str(caught.value)
    assert "socket://HOST:PORT" in message and "/dev/" in message and "serial:///dev/" in message


@pytest.mark.parametrize(
    "url",
    [
        "socket://127.0.0.1",
        "socket://:4000",
        "socket://127.0.0.1:notaport",
        "socket://127.0.0.1:99999",
        "socket://127.0.0.1:4000/path",
        "serial://dev/ttyUSB0",
        "serial:///tmp/x",
        "serial:///dev/ttyUSB0?baudrate=9600",
    ],
)
async def test_malformed_urls(url: str) -> None:
    with pytest.raises(LinkURLError):
        await open_link(url)


async def test_missing_serial_device_is_a_link_error() -> None:
    with pytest.raises(LinkError, match="/dev/pbm-no-such-port"):
        await open_link("/dev/pbm-no-such-port")


async def test_open_controller_closes_the_link_when_the_handshake_fails(
    tcp_controller: TcpController,
) -> None:
    url = await tcp_controller.start()
    with pytest.raises(ValueError, match="max_telemetry_hz"):
        await open_controller(url, telemetry_hz=1000)
    # The server sees the client go away: its handler finishes by itself.
    await asyncio.wait_for(asyncio.gather(*tcp_controller.handlers), WAIT_S)


def test_link_is_the_transport_contract() -> None:
    for cls in (TcpLink, SerialLink):
        assert issubclass(cls, Link)
    with pytest.raises(TypeError):
        Link()  # type: ignore[abstract]


async def test_client_accepts_any_link_implementation() -> None:
    """A future USB link only has to implement the four members."""

    class Loopback(Link):
        def __init__(self) -> None:
            self.queue: asyncio.Queue[bytes] = asyncio.Queue()

        @property
        def url(self) -> str:
            return "loop://"

        async def read(self) -> bytes:
            return await self.queue.get()

        async def write(self, data: bytes) -> None:
            (frame,) = codec.iter_frames([data])
            self.queue.put_nowait(codec.encode_frame(codec.Pong(7), frame.seq))

        async def close(self) -> None:
            self.queue.put_nowait(b"")

    client = ControllerClient(Loopback())
    try:
        assert (await client.ping()).device_time_us == 7
    finally:
        await client.close()
