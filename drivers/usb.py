"""The USB vendor-class link (ICD §2a): pyusb on libusb, kept off the event loop.

``usb://VID:PID`` opens the first device with those IDs, ``usb://VID:PID/SERIAL``
the one whose serial-number string is SERIAL (which equals INFO's serial), so
two controllers with the same IDs are told apart. VID:PID come from the
configuration: 1209:0001 is the pid.codes test ID that only the simulator and
development units use.

libusb calls block, so none runs on the event loop: a reader thread does bulk-IN
transfers with a short timeout and hands the bytes to the loop, and writes run
in a one-thread executor. The safety core therefore never waits on USB. A
device that disappears (LIBUSB_ERROR_NO_DEVICE) or an endpoint that stays
stalled is a lost link, like a serial port that vanishes; after
re-enumeration the device is a new link that the service reopens as after any
loss.

Which pyusb backend serves a URL: libusb-1.0 by default; ``?backend=NAME``
selects one registered with :func:`register_backend` (the simulator's
``sim`` backend, see ``pbmd.hw_sim.usb_backend``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Final

import structlog

from pbmd.drivers.transport import Link, LinkError, LinkURLError

log = structlog.get_logger()

TEST_VENDOR_ID: Final = 0x1209
TEST_PRODUCT_ID: Final = 0x0001
"""The pid.codes test ID (ICD §2a): simulator and development units only."""

CONFIGURATION: Final = 1
INTERFACE: Final = 0
ENDPOINT_OUT: Final = 0x01
ENDPOINT_IN: Final = 0x81

READ_TIMEOUT_MS: Final = 50
"""How long one bulk-IN transfer waits; bounds how long close() waits for the reader."""

WRITE_TIMEOUT_MS: Final = 100
"""A frame the controller has not taken within the ICD's reply limit is a failing link."""

LINK_THREAD_PRIORITY: Final = 11
"""SCHED_FIFO priority of the reader and writer threads, where the process may ask
for it: one above the daemon's loop (10, daemon/services/scheduling.py). They only
move bytes between the device and the loop, as a serial port's interrupt handler
does; a reader that a busy machine left without CPU for 80 ms made telemetry look
100 ms stale (E201) while the controller was sending it, and a late writer delays
the EMIT_STOP that ends a dose."""

READ_PACKETS: Final = 64
"""Bulk-IN buffer in packets (4 KiB at full speed): a multiple of wMaxPacketSize."""

# libusb error codes (libusb.h); pyusb puts them in USBError.backend_error_code.
LIBUSB_ERROR_IO: Final = -1
LIBUSB_ERROR_ACCESS: Final = -3
LIBUSB_ERROR_NO_DEVICE: Final = -4
LIBUSB_ERROR_BUSY: Final = -6
LIBUSB_ERROR_TIMEOUT: Final = -7
LIBUSB_ERROR_PIPE: Final = -9

UDEV_FIX: Final = (
    "install the udev rule (sudo install -m 644 systemd/60-pbm-controller.rules "
    "/etc/udev/rules.d/ && sudo udevadm control --reload && sudo udevadm trigger), with "
    "the controller's VID:PID in it, and run pbmd as the pbmd service user (or a member of group "
    "pbmd); see docs/usb.md"
)

_URL_RE = re.compile(r"^([0-9A-Fa-f]{4}):([0-9A-Fa-f]{4})$")
_SERIAL_RE = re.compile(r"^[\x21-\x2E\x30-\x7E]{1,16}$")
"""INFO's serial: up to 16 printable ASCII characters; no "/" (it ends the URL path)."""

_backends: dict[str, Any] = {}


def register_backend(name: str, backend: Any) -> None:
    """Make a pyusb backend available as ``usb://...?backend=NAME``."""
    _backends[name] = backend


def unregister_backend(name: str) -> None:
    _backends.pop(name, None)


@dataclass(frozen=True)
class UsbTarget:
    """What a ``usb://`` URL names."""

    vid: int
    pid: int
    serial: str | None = None
    backend: str | None = None

    @property
    def ids(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"

    def __str__(self) -> str:
        return self.ids + (f" serial {self.serial}" if self.serial else "")


def parse_usb_url(url: str) -> UsbTarget:
    """``usb://VID:PID[/SERIAL][?backend=NAME]`` (hexadecimal IDs, as lsusb prints them)."""
    parsed = urllib.parse.urlsplit(url)
    m = _URL_RE.match(parsed.netloc)
    serial = parsed.path.removeprefix("/") or None
    query = urllib.parse.parse_qs(parsed.query)
    if (
        parsed.scheme.lower() != "usb"
        or m is None
        or (serial is not None and not _SERIAL_RE.match(serial))
        or parsed.fragment
        or set(query) - {"backend"}
    ):
        raise LinkURLError(
            f"{url!r}: a USB URL is usb://VID:PID or usb://VID:PID/SERIAL, IDs in "
            "hexadecimal as lsusb prints them, e.g. usb://1209:0001/PBM-0042"
        )
    backend = query["backend"][-1] if "backend" in query else None
    return UsbTarget(int(m.group(1), 16), int(m.group(2), 16), serial, backend)


def backend_for(target: UsbTarget) -> Any:
    """The pyusb backend that serves ``target``; LinkError with the fix if there is none."""
    if target.backend is not None:
        try:
            return _backends[target.backend]
        except KeyError:
            raise LinkError(
                f"no USB backend {target.backend!r} in this process (the simulated one exists "
                'only beside an embedded simulator: link = "sim" with transport = "usb")'
            ) from None
    import usb.backend.libusb1

    backend = usb.backend.libusb1.get_backend()
    if backend is None:
        raise LinkError(
            "libusb-1.0 is not installed; install it (apt install libusb-1.0-0, or "
            "make system-deps) to use usb:// links"
        )
    return backend


def error_code(exc: BaseException) -> int | None:
    """The libusb error code of a pyusb error, from errno if the backend gave none."""
    code = getattr(exc, "backend_error_code", None)
    if isinstance(code, int):
        return code
    return {
        errno.EACCES: LIBUSB_ERROR_ACCESS,
        errno.EPERM: LIBUSB_ERROR_ACCESS,
        errno.ENODEV: LIBUSB_ERROR_NO_DEVICE,
        errno.EBUSY: LIBUSB_ERROR_BUSY,
        errno.EPIPE: LIBUSB_ERROR_PIPE,
        errno.ETIMEDOUT: LIBUSB_ERROR_TIMEOUT,
    }.get(getattr(exc, "errno", None) or 0)


def explain(exc: BaseException, what: str) -> str:
    """A user's message for a USB failure: what happened, and what fixes it."""
    code = error_code(exc)
    if code == LIBUSB_ERROR_ACCESS:
        return f"{what}: permission denied ({exc}); {UDEV_FIX}"
    if code == LIBUSB_ERROR_BUSY:
        return (
            f"{what}: the device is busy ({exc}): another program has claimed it, most "
            "likely another pbmd (systemctl status pbmd) or a test tool; stop that program"
        )
    if code == LIBUSB_ERROR_NO_DEVICE:
        return (
            f"{what}: the device is gone ({exc}): it was unplugged, lost power or reset; "
            "check the cable and power"
        )
    if code == LIBUSB_ERROR_PIPE:
        return f"{what}: endpoint stalled ({exc}); power-cycle the controller if it persists"
    return f"{what}: {exc}"


def find_devices(target: UsbTarget, backend: Any) -> list[Any]:
    """The attached devices with the target's VID:PID (serial not checked)."""
    import usb.core

    try:
        return list(
            usb.core.find(find_all=True, idVendor=target.vid, idProduct=target.pid, backend=backend)
        )
    except usb.core.USBError as exc:
        raise LinkError(explain(exc, f"usb {target.ids}: cannot list USB devices")) from exc


def where(dev: Any) -> str:
    return f"bus {dev.bus} address {dev.address}"


def read_strings(dev: Any) -> tuple[str | None, str | None]:
    """The device's serial and product strings.

    libusb reads string descriptors through an opened device, so this is where a
    device the user may not open says so; the language IDs are read first and
    directly, because pyusb's ``langids`` property hides that error.
    """
    import usb.util

    usb.util.get_langids(dev)
    return dev.serial_number, dev.product


def select_device(target: UsbTarget, devices: list[Any]) -> Any:
    """The first device, or the one whose serial is the target's; LinkError with the fix."""
    import usb.core
    import usb.util

    if target.serial is None and devices:
        return devices[0]
    seen: list[str] = []
    for dev in devices:
        try:
            serial, _product = read_strings(dev)
        except (usb.core.USBError, ValueError) as exc:
            usb.util.dispose_resources(dev)
            raise LinkError(
                explain(exc, f"usb {target.ids} at {where(dev)}: cannot read its serial")
            ) from exc
        if serial == target.serial:
            return dev
        usb.util.dispose_resources(dev)  # opened to read its serial; not ours
        seen.append(str(serial))
    others = f" (attached with those IDs: {', '.join(seen)})" if seen else ""
    raise LinkError(
        f"no USB device {target} is attached{others}; check that the controller is powered "
        "and its cable plugged in, and the VID:PID and serial in the link URL "
        "(pbmctl controller scan lists what is attached)"
    )


def prepare(dev: Any, target: UsbTarget) -> int:
    """ICD §2a opening: configuration 1, claim interface 0, clear halts; returns wMaxPacketSize."""
    import usb.core
    import usb.util

    what = f"usb {target} at {where(dev)}"
    try:
        try:
            configured = dev.get_active_configuration().bConfigurationValue
        except usb.core.USBError as exc:
            if error_code(exc) in (LIBUSB_ERROR_ACCESS, LIBUSB_ERROR_NO_DEVICE):
                raise
            configured = 0
        if configured != CONFIGURATION:
            dev.set_configuration(CONFIGURATION)
        with contextlib.suppress(NotImplementedError):  # a platform that cannot tell
            if dev.is_kernel_driver_active(INTERFACE):
                dev.detach_kernel_driver(INTERFACE)
        usb.util.claim_interface(dev, INTERFACE)
        intf = dev.get_active_configuration()[(INTERFACE, 0)]
        ep_in = usb.util.find_descriptor(intf, bEndpointAddress=ENDPOINT_IN)
        ep_out = usb.util.find_descriptor(intf, bEndpointAddress=ENDPOINT_OUT)
        if ep_in is None or ep_out is None:
            raise LinkError(
                f"{what}: interface 0 has no bulk endpoints 0x01/0x81; is it a "
                "PBM-Link controller (ICD §2a)? Check the VID:PID in the link URL"
            )
        dev.clear_halt(ENDPOINT_OUT)
        dev.clear_halt(ENDPOINT_IN)
        return int(ep_in.wMaxPacketSize)
    except usb.core.USBError as exc:
        usb.util.dispose_resources(dev)
        raise LinkError(explain(exc, f"{what}: cannot open")) from exc
    except LinkError:
        usb.util.dispose_resources(dev)
        raise


class UsbLink(Link):
    """One claimed PBM-Link USB interface: a reader thread and a writer thread."""

    def __init__(self, url: str, dev: Any, max_packet: int) -> None:
        self._url = url
        self._dev = dev
        self.max_packet = max_packet
        self._loop = asyncio.get_running_loop()
        self._incoming: asyncio.Queue[bytes | OSError] = asyncio.Queue()
        self._stop = threading.Event()
        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="usb-out", initializer=_link_thread_priority
        )
        self._reader = threading.Thread(target=self._read_loop, name="usb-in", daemon=True)
        self._closed = False
        self._ended = False
        self._reader.start()

    @property
    def url(self) -> str:
        return self._url

    def _read_loop(self) -> None:
        import usb.core

        _link_thread_priority()
        size = max(1, READ_PACKETS) * self.max_packet
        while not self._stop.is_set():
            try:
                data = bytes(self._dev.read(ENDPOINT_IN, size, READ_TIMEOUT_MS))
            except usb.core.USBTimeoutError:
                continue
            except usb.core.USBError as exc:
                if not self._stop.is_set():
                    self._hand_over(LinkError(explain(exc, f"{self._url}: link lost")))
                return
            if data:  # a zero-length packet ends a transfer and carries nothing
                self._hand_over(data)

    def _hand_over(self, item: bytes | OSError) -> None:
        try:
            self._loop.call_soon_threadsafe(self._incoming.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            self._stop.set()

    async def read(self) -> bytes:
        if self._closed or self._ended:
            return b""
        item = await self._incoming.get()
        if isinstance(item, OSError):
            self._ended = True
            raise item
        return item

    async def write(self, data: bytes) -> None:
        if self._closed or self._ended:
            raise LinkError(f"{self._url}: link is closed")
        try:
            await self._loop.run_in_executor(self._writer, self._write_frame, data)
        except OSError as exc:
            raise LinkError(explain(exc, f"{self._url}: write failed")) from exc

    def _write_frame(self, data: bytes) -> None:
        # one frame, one OUT transfer (ICD §2a); libusb splits it into packets
        self._dev.write(ENDPOINT_OUT, data, WRITE_TIMEOUT_MS)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        await asyncio.to_thread(self._release)
        log.debug("link.closed", url=self._url)

    def _release(self) -> None:
        import usb.core
        import usb.util

        self._reader.join()
        self._writer.shutdown(wait=True)
        with contextlib.suppress(usb.core.USBError):  # a device that is gone has nothing left
            usb.util.release_interface(self._dev, INTERFACE)
        usb.util.dispose_resources(self._dev)


async def open_usb(url: str) -> UsbLink:
    """Find, open and claim the device ``url`` names (the blocking part in a thread)."""
    target = parse_usb_url(url)

    def locate() -> tuple[Any, int]:
        backend = backend_for(target)
        dev = select_device(target, find_devices(target, backend))
        return dev, prepare(dev, target)

    dev, max_packet = await asyncio.to_thread(locate)
    log.debug("link.opened", url=url, transport="usb", bus=dev.bus, address=dev.address)
    return UsbLink(url, dev, max_packet)


@dataclass(frozen=True)
class UsbCandidate:
    """An attached device with a PBM-Link VID:PID, as ``pbmctl controller scan`` shows it."""

    ids: str
    bus: int
    address: int
    serial: str | None
    product: str | None
    problem: str | None
    """Why this user cannot open it (with the fix), or None if it can."""

    @property
    def url(self) -> str:
        return f"usb://{self.ids}" + (f"/{self.serial}" if self.serial else "")


def scan_usb(targets: list[UsbTarget]) -> list[UsbCandidate]:
    """Every attached device with one of the targets' VID:PID; opens each only to read strings.

    Reading the serial needs an opened device, so a device this user may not
    open is listed with the permission problem and its fix instead. Nothing is
    claimed: a controller a running pbmd holds is not disturbed.
    """
    import usb.core
    import usb.util

    found: list[UsbCandidate] = []
    seen: set[tuple[int, int, str | None]] = set()
    for target in targets:
        key = (target.vid, target.pid, target.backend)
        if key in seen:
            continue
        seen.add(key)
        for dev in find_devices(target, backend_for(target)):
            serial = product = problem = None
            try:
                serial, product = read_strings(dev)
            except (usb.core.USBError, ValueError) as exc:
                problem = explain(exc, f"usb {target.ids} at {where(dev)}")
            finally:
                usb.util.dispose_resources(dev)
            found.append(
                UsbCandidate(target.ids, int(dev.bus), int(dev.address), serial, product, problem)
            )
    return found


def _link_thread_priority() -> None:
    """LINK_THREAD_PRIORITY for the calling thread; where that is not allowed (no root or
    CAP_SYS_NICE), the thread keeps the process's scheduling."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(LINK_THREAD_PRIORITY))
    except OSError as exc:
        log.debug("usb.thread_priority_refused", reason=exc.strerror or str(exc))
