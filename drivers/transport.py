"""Byte links to a PBM-Link controller (ICD §2): serial, TCP and USB.

A :class:`Link` moves raw bytes and nothing else: framing, CRC and replies are
the client's business (``pbmd.drivers.client``) so that every transport
behaves identically above this line. :func:`open_link` picks the transport
from a URL:

- ``/dev/ttyACM0``, ``/dev/pts/7``, ``/dev/serial/by-id/...`` or
  ``serial:///dev/...``: a serial port at 921600 8N1, no flow control;
- ``socket://host:port``: TCP (the simulator), with Nagle off so a
  40-byte request is not held back waiting for more;
- ``usb://VID:PID`` or ``usb://VID:PID/SERIAL``: the vendor-class USB
  interface (ICD §2a), in ``pbmd.drivers.usb``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import socket
import urllib.parse
from typing import Final

import structlog

from pbmd.drivers.lifecycle import AsyncClosing

log = structlog.get_logger()

SERIAL_BAUDRATE: Final = 921600
"""ICD §2; a USB CDC-ACM port ignores it, a real UART does not."""

READ_CHUNK_BYTES: Final = 4096
"""Largest read handed to the client; any size works, the decoder reassembles."""

ACCEPTED_FORMS: Final = (
    "socket://HOST:PORT",
    "/dev/<serial device> (e.g. /dev/ttyACM0, /dev/serial/by-id/...)",
    "serial:///dev/<serial device>",
    "usb://VID:PID or usb://VID:PID/SERIAL (IDs in hexadecimal, e.g. usb://1209:0001/PBM-0042)",
)


class LinkError(OSError):
    """A link could not be opened, or failed while in use."""


class LinkURLError(ValueError):
    """The URL names no transport that :func:`open_link` can open."""


class Link(AsyncClosing):
    """A bidirectional byte stream to one controller.

    The contract every transport keeps, so the client never needs to know
    which one it has:

    - ``read()`` returns the next bytes available, at least one byte, with no
      regard for frame boundaries (a serial read or a USB bulk-IN transfer may
      carry part of a frame or several); it returns ``b""`` once, at the end of
      the stream, and raises :class:`OSError` if the transport fails.
    - ``write(data)`` hands one whole frame to the transport and returns when
      the transport has accepted it; it raises :class:`OSError` on failure.
      The client serialises its calls, so an implementation that splits a frame
      into several transfers (USB) need not lock.
    - ``close()`` releases the device; it is idempotent, and a ``read()`` after
      it returns ``b""``.

    The USB transport maps onto this directly: ``read()`` returns what one
    bulk-IN transfer on endpoint 0x81 brought (done by a reader thread) and
    ``write()`` is one bulk-OUT transfer on 0x01 (in a writer thread), so the
    client is unchanged.
    """

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The URL this link was opened from, for logs and errors."""

    @abc.abstractmethod
    async def read(self) -> bytes: ...

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


class StreamLink(Link):
    """A link over an asyncio stream pair (TCP, or a serial port via pyserial)."""

    def __init__(
        self, url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._url = url
        self._reader = reader
        self._writer = writer
        self._closed = False

    @property
    def url(self) -> str:
        return self._url

    async def read(self) -> bytes:
        if self._closed:
            return b""
        return await self._reader.read(READ_CHUNK_BYTES)

    async def write(self, data: bytes) -> None:
        if self._closed or self._writer.is_closing():
            raise LinkError(f"{self._url}: link is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_transport()
        # A peer that already reset the connection makes wait_closed() raise;
        # the link is closed either way.
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        log.debug("link.closed", url=self._url)

    def _close_transport(self) -> None:
        self._writer.close()


class TcpLink(StreamLink):
    """TCP to the simulator (``socket://host:port``)."""


class SerialLink(StreamLink):
    """A serial port (UART or USB CDC-ACM) through pyserial-asyncio-fast."""

    def _close_transport(self) -> None:
        # A graceful close() would tcdrain() first, which never returns on a
        # pty whose other end stopped reading. Our writes have already been
        # drained to the kernel, which flushes a real UART on close anyway.
        self._writer.transport.abort()


async def open_link(url: str) -> Link:
    """Open the transport that ``url`` names.

    Raises :class:`LinkURLError` for a URL of no accepted form, and
    :class:`LinkError` if the device or host cannot be opened.
    """
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme == "socket":
        return await _open_tcp(url, parsed)
    if scheme == "serial":
        if parsed.netloc or parsed.query or parsed.fragment or not parsed.path.startswith("/dev/"):
            raise LinkURLError(
                f"{url!r}: a serial URL is serial:///dev/<device> (empty host, absolute path); "
                f"accepted forms: {', '.join(ACCEPTED_FORMS)}"
            )
        return await _open_serial(url, parsed.path)
    if scheme == "" and url.startswith("/dev/") and len(url) > len("/dev/"):
        return await _open_serial(url, url)
    if scheme == "usb":
        from pbmd.drivers.usb import open_usb  # pyusb is loaded only for USB links

        return await open_usb(url)
    raise LinkURLError(
        f"{url!r} is not a controller link; accepted forms: {', '.join(ACCEPTED_FORMS)}"
    )


async def _open_tcp(url: str, parsed: urllib.parse.SplitResult) -> Link:
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as exc:  # a port that is not a number or out of range
        raise LinkURLError(f"{url!r}: {exc}; expected socket://HOST:PORT") from exc
    if not host or port is None or parsed.path not in ("", "/") or parsed.query:
        raise LinkURLError(f"{url!r}: expected socket://HOST:PORT")
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise LinkError(f"{url}: cannot connect: {exc}") from exc
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    log.debug("link.opened", url=url, transport="tcp")
    return TcpLink(url, reader, writer)


async def _open_serial(url: str, device: str) -> Link:
    # Imported here so that a host without serial ports (or pyserial) can still
    # use TCP; both are hard dependencies of the package all the same.
    import serial
    import serial_asyncio_fast

    try:
        reader, writer = await serial_asyncio_fast.open_serial_connection(
            url=device,
            baudrate=SERIAL_BAUDRATE,
            bytesize=serial.EIGHTBITS,
            parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE,
            xonxoff=False,
            rtscts=False,
            dsrdtr=False,
            # One host per controller (ICD §5a): a second daemon on the same
            # port would interleave frames with ours.
            exclusive=True,
        )
    except (OSError, ValueError) as exc:  # SerialException is an OSError
        raise LinkError(f"{url}: cannot open serial port: {exc}") from exc
    log.debug("link.opened", url=url, transport="serial", baudrate=SERIAL_BAUDRATE)
    return SerialLink(url, reader, writer)
