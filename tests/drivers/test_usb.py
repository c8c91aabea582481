"""The USB link (ICD §2a) through pyusb's own code path, against simulated devices.

Each test has its own simulated bus (a pyusb backend registered under a name of
its own), so devices, unplugging and injected errors stay within the test.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import usb.core
from pbm_link_script import WAIT_S, wait_until

from pbmd.drivers import codec
from pbmd.drivers import usb as usb_link
from pbmd.drivers.client import ControllerClient, LinkClosed, open_controller
from pbmd.drivers.transport import LinkError, open_link
from pbmd.hw_sim import SimConfig, Simulator
from pbmd.hw_sim.usb_backend import (
    HIGH_SPEED_PACKET,
    SimulatedUsbBackend,
    SimulatedUsbDevice,
    device_url,
)

TIME_SCALE = 60.0
TOKEN = 0x5E55_2015


class Bus:
    """One test's simulated USB bus and the simulators on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backend = SimulatedUsbBackend()
        self.sims: list[Simulator] = []

    async def plug(self, serial: str = "PBM-0042", **device: object) -> SimulatedUsbDevice:
        sim = Simulator(SimConfig(time_scale=TIME_SCALE, serial=serial))
        self.sims.append(sim)
        await sim.start()
        link_url = await sim.listen_tcp("127.0.0.1", 0)
        return self.backend.attach(SimulatedUsbDevice(link_url, serial, **device))  # type: ignore[arg-type]

    def url(self, device: SimulatedUsbDevice | None = None, ids: str = "1209:0001") -> str:
        path = f"/{device.serial}" if device is not None else ""
        return f"usb://{ids}{path}?backend={self.name}"


@pytest.fixture
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    name = f"test-{request.node.name}"
    b = Bus(name)
    usb_link.register_backend(name, b.backend)
    try:
        yield b
    finally:
        usb_link.unregister_backend(name)
        for device in list(b.backend.devices):
            b.backend.remove(device)
        for sim in b.sims:
            await sim.close()


async def ping_serial(url: str) -> str:
    client = await open_controller(url, telemetry_hz=20)
    try:
        await client.ping()
        return client.info.serial
    finally:
        await client.close()


def test_urls_name_ids_serial_and_backend() -> None:
    t = usb_link.parse_usb_url("usb://1209:0001/PBM-0042?backend=sim")
    assert (t.vid, t.pid, t.serial, t.backend) == (0x1209, 0x0001, "PBM-0042", "sim")
    assert usb_link.parse_usb_url("USB://CAFE:beef") == usb_link.UsbTarget(0xCAFE, 0xBEEF)
    assert device_url(SimulatedUsbDevice("socket://x:1", "S1")) == "usb://1209:0001/S1?backend=sim"


async def test_descriptors_are_a_vendor_class_interface(bus: Bus) -> None:
    """pyusb reads the simulated descriptors as it would a real controller's."""
    device = await bus.plug(max_packet=HIGH_SPEED_PACKET)
    (dev,) = usb.core.find(find_all=True, idVendor=0x1209, idProduct=0x0001, backend=bus.backend)
    assert dev.serial_number == "PBM-0042" and dev.product == "PBM MultiPort Controller"
    intf = dev[0][(0, 0)]
    assert (dev[0].bConfigurationValue, intf.bInterfaceClass) == (1, 0xFF)
    assert sorted(e.bEndpointAddress for e in intf) == [0x01, 0x81]
    assert {e.wMaxPacketSize for e in intf} == {HIGH_SPEED_PACKET}
    usb.util.dispose_resources(dev)
    link = await open_link(bus.url(device))
    try:
        assert isinstance(link, usb_link.UsbLink) and link.max_packet == HIGH_SPEED_PACKET
        assert device.configuration == 1 and device.claimed_by is not None
    finally:
        await link.close()
    assert device.claimed_by is None
    assert await link.read() == b""


async def test_the_client_runs_an_emission_over_usb(bus: Bus) -> None:
    device = await bus.plug(kernel_driver=True)  # a bound kernel driver is detached
    client = await open_controller(bus.url(device), telemetry_hz=50)
    try:
        assert client.info.serial == "PBM-0042"
        await client.arm(TOKEN)
        with client.subscribe_telemetry() as sub:
            async with asyncio.timeout(WAIT_S):
                async for sample in sub:
                    if sample.state == codec.ControllerState.ARMED_READY:
                        break
        await client.emit_start(
            codec.EmitStart(1, 660, codec.EmitMode.CONTINUOUS, 500_000, 0, 1000, 10**9, 60_000)
        )
        stopped = await client.emit_stop(1)
        assert stopped.delivered_uj >= 0
    finally:
        await client.close()
    assert not device.kernel_driver


async def test_reads_and_writes_never_run_on_the_event_loop(bus: Bus) -> None:
    device = await bus.plug()
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    original_read, original_write = bus.backend.bulk_read, bus.backend.bulk_write

    def spy(fn: Callable[..., int]) -> Callable[..., int]:
        def call(*args: object) -> int:
            threads.add(threading.get_ident())
            return fn(*args)

        return call

    bus.backend.bulk_read = spy(original_read)  # type: ignore[method-assign]
    bus.backend.bulk_write = spy(original_write)  # type: ignore[method-assign]
    assert await ping_serial(bus.url(device)) == "PBM-0042"
    assert threads and loop_thread not in threads


async def test_the_link_threads_run_real_time_where_allowed(bus: Bus) -> None:
    """The bulk-IN reader and the bulk-OUT writer move bytes between the controller
    and the loop at SCHED_FIFO LINK_THREAD_PRIORITY (as root, as the tests and
    pbmd.service run); elsewhere they keep the process's scheduling."""
    device = await bus.plug()
    policies: dict[str, set[tuple[int, int]]] = {"read": set(), "write": set()}
    original_read, original_write = bus.backend.bulk_read, bus.backend.bulk_write

    def spy(kind: str, fn: Callable[..., int]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            policies[kind].add((os.sched_getscheduler(0), os.sched_getparam(0).sched_priority))
            return fn(*args)

        return call

    bus.backend.bulk_read = spy("read", original_read)  # type: ignore[method-assign]
    bus.backend.bulk_write = spy("write", original_write)  # type: ignore[method-assign]
    assert await ping_serial(bus.url(device)) == "PBM-0042"
    allowed = os.geteuid() == 0
    expected = (os.SCHED_FIFO, usb_link.LINK_THREAD_PRIORITY) if allowed else (os.SCHED_OTHER, 0)
    assert policies == {"read": {expected}, "write": {expected}}


async def test_two_devices_are_told_apart_by_serial(bus: Bus) -> None:
    first = await bus.plug("PBM-0001")
    second = await bus.plug("PBM-0002")
    assert await ping_serial(bus.url(second)) == "PBM-0002"
    assert await ping_serial(bus.url(first)) == "PBM-0001"
    assert await ping_serial(bus.url()) == "PBM-0001"  # no serial: the first one
    with pytest.raises(LinkError, match=r"PBM-0009.*attached with those IDs: PBM-0001, PBM-0002"):
        await open_link(bus.url(SimulatedUsbDevice("socket://x:1", "PBM-0009")))
    found = usb_link.scan_usb([usb_link.parse_usb_url(bus.url())])
    assert [(c.serial, c.problem) for c in found] == [("PBM-0001", None), ("PBM-0002", None)]
    assert found[0].url == "usb://1209:0001/PBM-0001"


async def test_no_such_device_says_what_to_check(bus: Bus) -> None:
    await bus.plug()
    with pytest.raises(LinkError, match="no USB device cafe:0001 is attached") as caught:
        await open_link(bus.url(ids="cafe:0001"))
    assert "powered" in str(caught.value) and "pbmctl controller scan" in str(caught.value)


async def test_no_permission_names_the_udev_rule(bus: Bus) -> None:
    device = await bus.plug()
    device.inject("open", usb_link.LIBUSB_ERROR_ACCESS)
    for url in (bus.url(device), bus.url()):
        with pytest.raises(LinkError, match="permission denied") as caught:
            await open_link(url)
        assert "60-pbm-controller.rules" in str(caught.value) and "udevadm" in str(caught.value)
    (candidate,) = usb_link.scan_usb([usb_link.parse_usb_url(bus.url())])
    assert candidate.serial is None and "permission denied" in (candidate.problem or "")


async def test_a_busy_device_names_the_other_program(bus: Bus) -> None:
    device = await bus.plug()
    holder = await open_link(bus.url(device))
    try:
        with pytest.raises(LinkError, match=r"busy.*another pbmd"):
            await open_link(bus.url(device))
    finally:
        await holder.close()
    device.inject("claim", usb_link.LIBUSB_ERROR_BUSY)
    with pytest.raises(LinkError, match="busy"):
        await open_link(bus.url(device))
    device.inject("claim", None)
    assert await ping_serial(bus.url(device)) == "PBM-0042"


async def test_a_stall_that_clearing_does_not_recover_is_a_lost_link(bus: Bus) -> None:
    device = await bus.plug()
    device.inject("clear_halt", usb_link.LIBUSB_ERROR_PIPE)
    with pytest.raises(LinkError, match="endpoint stalled"):
        await open_link(bus.url(device))
    device.inject("clear_halt", None)
    client = await open_controller(bus.url(device), telemetry_hz=20)
    lost: list[LinkClosed] = []
    client.add_link_lost_listener(lost.append)
    try:
        device.inject("read", usb_link.LIBUSB_ERROR_PIPE)
        await wait_until(lambda: bool(lost))
        assert "endpoint stalled" in str(lost[0])
    finally:
        await client.close()


async def test_unplug_is_a_lost_link_and_replug_a_new_one(bus: Bus) -> None:
    device = await bus.plug()
    client: ControllerClient = await open_controller(bus.url(device), telemetry_hz=20)
    lost: list[LinkClosed] = []
    client.add_link_lost_listener(lost.append)
    try:
        device.unplug()
        await wait_until(lambda: bool(lost))
        assert "the device is gone" in str(lost[0])
        with pytest.raises(LinkClosed):
            await client.ping()
    finally:
        await client.close()
    with pytest.raises(LinkError, match="no USB device"):
        await open_link(bus.url(device))
    old_address = device.address
    device.plug()
    assert device.address != old_address
    assert await ping_serial(bus.url(device)) == "PBM-0042"


async def test_unknown_backend_is_explained() -> None:
    with pytest.raises(LinkError, match="no USB backend 'nope'"):
        await open_link("usb://1209:0001?backend=nope")


async def test_scan_command_shows_links_and_permission_fixes(
    bus: Bus, capsys: pytest.CaptureFixture[str]
) -> None:
    from pbmd.daemon.clients import pbmctl

    await bus.plug("PBM-0001")
    denied = await bus.plug("PBM-0002")
    denied.inject("open", usb_link.LIBUSB_ERROR_ACCESS)
    assert pbmctl.main(["controller", "scan", "--id", f"1209:0001?backend={bus.name}"]) == 0
    text = capsys.readouterr().out
    assert 'link = "usb://1209:0001/PBM-0001"' in text and "ok: pbmd can open it" in text
    assert "permission denied" in text and "60-pbm-controller.rules" in text


def test_udev_rule_gives_group_mode_systemd_tag_and_stable_names() -> None:
    from pathlib import Path

    rules = Path(__file__).resolve().parents[2] / "systemd" / "60-pbm-controller.rules"
    lines = [line for line in rules.read_text().splitlines() if line and line[0] != "#"]
    usb_rule = next(line for line in lines if 'SUBSYSTEM=="usb"' in line)
    for part in (
        'ENV{DEVTYPE}=="usb_device"',
        'ATTR{idVendor}=="1209"',
        'ATTR{idProduct}=="0001"',
        'MODE="0660"',
        'GROUP="pbmd"',
        'TAG+="systemd"',
        'SYMLINK+="pbm/controller"',
        'SYMLINK+="pbm/usb-$attr{serial}"',
    ):
        assert part in usb_rule, part
    assert "TEST-ONLY" in rules.read_text()
