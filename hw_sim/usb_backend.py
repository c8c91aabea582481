"""The simulator as a USB vendor-class device: a pyusb backend (ICD §2a).

:class:`SimulatedUsbBackend` implements pyusb's ``IBackend`` so that the host
runs pyusb's own code path (``usb.core.find``, ``set_configuration``, claiming
the interface, bulk transfers, string descriptors, errors) against devices
that are simulators. Each :class:`SimulatedUsbDevice` has real descriptors:
VID:PID 1209:0001, one configuration, interface 0 of class 0xFF with bulk OUT
0x01 and IN 0x81 of wMaxPacketSize 64 (full speed) or 512 (high speed), and
the simulator's INFO serial as its serial-number string.

The bytes travel over a loopback TCP connection to the simulator, opened when
the interface is claimed: the simulator stays a byte stream (in this process or
another), and every blocking call happens in the host's USB threads, as
libusb's would. ``unplug()`` makes the device vanish (every later call fails
with LIBUSB_ERROR_NO_DEVICE), ``plug()`` re-enumerates it at a new address,
and ``inject()`` makes one stage fail with a libusb error, so the messages for
no permission or a busy device can be tested.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import select
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final

import usb.backend
import usb.core

from pbmd.drivers import usb as usb_link

BACKEND_NAME: Final = "sim"
"""``usb://...?backend=sim`` selects the shared simulated backend."""

PRODUCT: Final = "PBM MultiPort Controller"
MANUFACTURER: Final = "pbmd simulator"
FULL_SPEED_PACKET: Final = 64
HIGH_SPEED_PACKET: Final = 512
_SPEED = {FULL_SPEED_PACKET: 3, HIGH_SPEED_PACKET: 4}  # libusb_speed: full, high
_STRINGS = {1: MANUFACTURER, 2: PRODUCT, 3: None}  # 3: the serial, per device
_ERROR_TEXT = {
    usb_link.LIBUSB_ERROR_ACCESS: "Access denied (insufficient permissions)",
    usb_link.LIBUSB_ERROR_NO_DEVICE: "No such device (it may have been disconnected)",
    usb_link.LIBUSB_ERROR_BUSY: "Resource busy",
    usb_link.LIBUSB_ERROR_TIMEOUT: "Operation timed out",
    usb_link.LIBUSB_ERROR_PIPE: "Pipe error",
    usb_link.LIBUSB_ERROR_IO: "Input/Output Error",
}
_ERRNO = {
    usb_link.LIBUSB_ERROR_ACCESS: 13,
    usb_link.LIBUSB_ERROR_NO_DEVICE: 19,
    usb_link.LIBUSB_ERROR_BUSY: 16,
    usb_link.LIBUSB_ERROR_TIMEOUT: 110,
    usb_link.LIBUSB_ERROR_PIPE: 32,
    usb_link.LIBUSB_ERROR_IO: 5,
}
STAGES: Final = ("open", "set_configuration", "claim", "clear_halt", "read", "write")
_addresses = itertools.count(2)


def usb_error(code: int) -> usb.core.USBError:
    """The error pyusb's libusb1 backend raises for ``code``."""
    cls = usb.core.USBTimeoutError if code == usb_link.LIBUSB_ERROR_TIMEOUT else usb.core.USBError
    return cls(_ERROR_TEXT.get(code, "Other error"), code, _ERRNO.get(code))


@dataclass(eq=False)
class SimulatedUsbDevice:
    """One simulated controller on the bus, reaching its simulator at ``link_url``."""

    link_url: str
    serial: str
    vid: int = usb_link.TEST_VENDOR_ID
    pid: int = usb_link.TEST_PRODUCT_ID
    max_packet: int = FULL_SPEED_PACKET
    kernel_driver: bool = False
    bus: int = 1
    address: int = field(default_factory=lambda: next(_addresses))
    plugged: bool = True
    configuration: int = 0
    claimed_by: _Handle | None = None
    failures: dict[str, int] = field(default_factory=dict)
    generation: int = 0

    def inject(self, stage: str, code: int | None) -> None:
        """Make ``stage`` (one of STAGES) fail with libusb error ``code`` (None: stop)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        if code is None:
            self.failures.pop(stage, None)
        else:
            self.failures[stage] = code

    def unplug(self) -> None:
        """The device disappears from the bus; open handles fail with NO_DEVICE."""
        self.plugged = False
        self.generation += 1
        handle, self.claimed_by = self.claimed_by, None
        if handle is not None:
            handle.disconnect()

    def plug(self) -> None:
        """Re-enumerate: back on the bus at a new address, unconfigured."""
        self.address = next(_addresses)
        self.configuration = 0
        self.plugged = True

    def strings(self, index: int) -> str | None:
        return self.serial if index == 3 else _STRINGS.get(index)


class _Handle:
    """An opened device: the TCP connection to the simulator while the interface is claimed."""

    def __init__(self, device: SimulatedUsbDevice) -> None:
        self.device = device
        self.generation = device.generation
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()

    def check(self, stage: str | None = None) -> None:
        dev = self.device
        if not dev.plugged or dev.generation != self.generation:
            raise usb_error(usb_link.LIBUSB_ERROR_NO_DEVICE)
        code = dev.failures.get(stage) if stage is not None else None
        if code is not None:
            raise usb_error(code)

    def pipe(self, stage: str, ep: int, expected: int) -> socket.socket:
        """The connection behind a bulk transfer on ``ep``; a pipe error on a wrong endpoint."""
        self.check(stage)
        if ep != expected or self.sock is None:
            raise usb_error(usb_link.LIBUSB_ERROR_PIPE)
        return self.sock

    def connect(self) -> None:
        parsed = urllib.parse.urlsplit(self.device.link_url)
        try:
            sock = socket.create_connection((parsed.hostname, parsed.port), timeout=2.0)
        except OSError:
            raise usb_error(usb_link.LIBUSB_ERROR_NO_DEVICE) from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    def disconnect(self) -> None:
        with self.lock:
            sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class SimulatedUsbBackend(usb.backend.IBackend):  # type: ignore[misc]
    """A bus of simulated PBM-Link controllers, as pyusb sees it."""

    def __init__(self) -> None:
        self.devices: list[SimulatedUsbDevice] = []

    def attach(self, device: SimulatedUsbDevice) -> SimulatedUsbDevice:
        self.devices.append(device)
        return device

    def remove(self, device: SimulatedUsbDevice) -> None:
        device.unplug()
        if device in self.devices:
            self.devices.remove(device)

    # -- enumeration and descriptors ---------------------------------------------------

    def enumerate_devices(self) -> list[SimulatedUsbDevice]:
        return [d for d in self.devices if d.plugged]

    def get_parent(self, dev: SimulatedUsbDevice) -> None:
        return None

    def get_device_descriptor(self, dev: SimulatedUsbDevice) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=18, bDescriptorType=1, bcdUSB=0x0200, bDeviceClass=0, bDeviceSubClass=0,
            bDeviceProtocol=0, bMaxPacketSize0=64, idVendor=dev.vid, idProduct=dev.pid,
            bcdDevice=0x0100, iManufacturer=1, iProduct=2, iSerialNumber=3,
            bNumConfigurations=1, address=dev.address, bus=dev.bus, port_number=1,
            port_numbers=(1,), speed=_SPEED.get(dev.max_packet, 3),
        )  # fmt: skip

    def get_configuration_descriptor(self, dev: SimulatedUsbDevice, config: int) -> Any:
        self._index(config)
        return SimpleNamespace(
            bLength=9, bDescriptorType=2, wTotalLength=9 + 9 + 7 + 7, bNumInterfaces=1,
            bConfigurationValue=usb_link.CONFIGURATION, iConfiguration=0, bmAttributes=0x80,
            bMaxPower=250, extra_descriptors=[],
        )  # fmt: skip

    def get_interface_descriptor(
        self, dev: SimulatedUsbDevice, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        for index in (intf, alt, config):
            self._index(index)
        return SimpleNamespace(
            bLength=9, bDescriptorType=4, bInterfaceNumber=usb_link.INTERFACE,
            bAlternateSetting=0, bNumEndpoints=2, bInterfaceClass=0xFF, bInterfaceSubClass=0,
            bInterfaceProtocol=0, iInterface=0, extra_descriptors=[],
        )  # fmt: skip

    def get_endpoint_descriptor(
        self, dev: SimulatedUsbDevice, ep: int, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        for index in (intf, alt, config):
            self._index(index)
        if ep not in (0, 1):
            raise IndexError("invalid endpoint index " + str(ep))
        address = (usb_link.ENDPOINT_OUT, usb_link.ENDPOINT_IN)[ep]
        return SimpleNamespace(
            bLength=7, bDescriptorType=5, bEndpointAddress=address, bmAttributes=0x02,
            wMaxPacketSize=dev.max_packet, bInterval=0, bRefresh=0, bSynchAddress=0,
            extra_descriptors=[],
        )  # fmt: skip

    @staticmethod
    def _index(index: int) -> None:
        if index != 0:
            raise IndexError("invalid descriptor index " + str(index))

    # -- device handles ------------------------------------------------------------------

    def open_device(self, dev: SimulatedUsbDevice) -> _Handle:
        handle = _Handle(dev)
        handle.check("open")
        return handle

    def close_device(self, handle: _Handle) -> None:
        self.release_interface(handle, usb_link.INTERFACE)

    def set_configuration(self, handle: _Handle, config_value: int) -> None:
        handle.check("set_configuration")
        if config_value not in (0, usb_link.CONFIGURATION):
            raise usb_error(usb_link.LIBUSB_ERROR_IO)
        handle.device.configuration = config_value

    def get_configuration(self, handle: _Handle) -> int:
        handle.check()
        return handle.device.configuration

    def set_interface_altsetting(self, handle: _Handle, intf: int, altsetting: int) -> None:
        handle.check()

    def claim_interface(self, handle: _Handle, intf: int) -> None:
        handle.check("claim")
        dev = handle.device
        if dev.claimed_by is not None and dev.claimed_by is not handle:
            raise usb_error(usb_link.LIBUSB_ERROR_BUSY)
        if dev.configuration != usb_link.CONFIGURATION or intf != usb_link.INTERFACE:
            raise usb_error(usb_link.LIBUSB_ERROR_IO)
        if dev.kernel_driver:
            raise usb_error(usb_link.LIBUSB_ERROR_BUSY)
        if handle.sock is None:
            handle.connect()
        dev.claimed_by = handle

    def release_interface(self, handle: _Handle, intf: int) -> None:
        if handle.device.claimed_by is handle:
            handle.device.claimed_by = None
        handle.disconnect()

    def is_kernel_driver_active(self, handle: _Handle, intf: int) -> bool:
        handle.check()
        return handle.device.kernel_driver

    def detach_kernel_driver(self, handle: _Handle, intf: int) -> None:
        handle.check()
        handle.device.kernel_driver = False

    def clear_halt(self, handle: _Handle, ep: int) -> None:
        handle.check("clear_halt")

    # -- transfers -------------------------------------------------------------------------

    def ctrl_transfer(
        self,
        handle: _Handle,
        bmRequestType: int,  # pyusb's parameter names
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: array.array[int],
        timeout: int,
    ) -> int:
        """Standard GET_DESCRIPTOR(STRING) only: the device needs no other control request."""
        handle.check()
        if bmRequestType != 0x80 or bRequest != 0x06 or wValue >> 8 != 3:
            raise usb_error(usb_link.LIBUSB_ERROR_PIPE)
        index = wValue & 0xFF
        if index == 0:
            body = bytes((4, 3, 0x09, 0x04))  # LANGID en-US
        else:
            text = handle.device.strings(index)
            if text is None:
                raise usb_error(usb_link.LIBUSB_ERROR_PIPE)
            encoded = text.encode("utf-16-le")
            body = bytes((2 + len(encoded), 3)) + encoded
        n = min(len(body), len(data))
        data[:n] = array.array("B", body[:n])
        return n

    def bulk_write(
        self, handle: _Handle, ep: int, intf: int, data: array.array[int], timeout: int
    ) -> int:
        sock = handle.pipe("write", ep, usb_link.ENDPOINT_OUT)
        try:
            sock.sendall(data.tobytes())
        except OSError:
            raise usb_error(usb_link.LIBUSB_ERROR_NO_DEVICE) from None
        return len(data)

    def bulk_read(
        self, handle: _Handle, ep: int, intf: int, buff: array.array[int], timeout: int
    ) -> int:
        """One IN transfer: what the simulator has sent, up to the buffer (a short packet)."""
        sock = handle.pipe("read", ep, usb_link.ENDPOINT_IN)
        try:
            ready, _, _ = select.select([sock], [], [], timeout / 1000.0 if timeout else None)
            data = sock.recv(len(buff)) if ready else None
        except (OSError, ValueError):  # ValueError: closed meanwhile by unplug()
            handle.check()
            raise usb_error(usb_link.LIBUSB_ERROR_NO_DEVICE) from None
        if data is None:
            raise usb_error(usb_link.LIBUSB_ERROR_TIMEOUT)
        if not data:  # the simulator went away: so did the device
            raise usb_error(usb_link.LIBUSB_ERROR_NO_DEVICE)
        buff[: len(data)] = array.array("B", data)
        return len(data)


_shared: SimulatedUsbBackend | None = None


def shared_backend() -> SimulatedUsbBackend:
    """The process's simulated bus, registered for ``usb://...?backend=sim``."""
    global _shared
    if _shared is None:
        _shared = SimulatedUsbBackend()
        usb_link.register_backend(BACKEND_NAME, _shared)
    return _shared


def device_url(device: SimulatedUsbDevice, backend: str = BACKEND_NAME) -> str:
    """The link URL that opens ``device`` through the named backend."""
    return f"usb://{device.vid:04x}:{device.pid:04x}/{device.serial}?backend={backend}"
