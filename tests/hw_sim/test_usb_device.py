"""The simulator as a USB device (ICD §2a), driven with plain pyusb calls."""

from __future__ import annotations

import asyncio

import usb.core
import usb.util

from pbmd.drivers import codec
from pbmd.hw_sim import SimConfig, Simulator
from pbmd.hw_sim.usb_backend import shared_backend

from .conftest import Lab


def exchange_hello(dev: usb.core.Device) -> tuple[codec.Info, int]:
    """HELLO as one OUT transfer; INFO read back in single-packet IN transfers."""
    dev.set_configuration(1)
    usb.util.claim_interface(dev, 0)
    dev.clear_halt(0x01)
    dev.clear_halt(0x81)
    dev.write(0x01, codec.encode_frame(codec.Hello(), 7), 1000)
    decoder = codec.StreamDecoder()
    transfers = 0
    while True:
        chunk = bytes(dev.read(0x81, 64, 1000))  # one packet: frames span transfers
        transfers += 1
        for frame in decoder.feed(chunk):
            if frame.msg_type == codec.Info.TYPE and frame.seq == 7:
                message = frame.message()
                assert isinstance(message, codec.Info)
                return message, transfers


async def test_listen_usb_puts_the_simulator_on_the_bus(lab: Lab) -> None:
    sim = await lab.sim(serial="PBM-HWSIM-1")
    url = await sim.listen_usb()
    assert url == "usb://1209:0001/PBM-HWSIM-1?backend=sim"
    (device,) = sim.usb_devices
    assert device in shared_backend().devices
    dev = usb.core.find(
        idVendor=0x1209,
        idProduct=0x0001,
        backend=shared_backend(),
        custom_match=lambda d: d.serial_number == "PBM-HWSIM-1",
    )
    try:
        info, transfers = await asyncio.to_thread(exchange_hello, dev)
    finally:
        usb.util.dispose_resources(dev)
    assert info.serial == "PBM-HWSIM-1" and transfers >= 1
    await sim.close()
    assert device not in shared_backend().devices and not device.plugged


def read_telemetry(dev: usb.core.Device) -> tuple[codec.Frame, int]:
    """Telemetry on, then one-packet IN transfers until a whole telemetry frame is in."""
    dev.write(0x01, codec.encode_frame(codec.SetTelemetry(100), 8), 1000)
    decoder = codec.StreamDecoder()
    while True:
        chunk = bytes(dev.read(0x81, 64, 1000))
        assert 0 < len(chunk) <= 64
        for frame in decoder.feed(chunk):
            if frame.msg_type == codec.Telemetry.TYPE:
                return frame, len(codec.encode_frame(frame.message(), frame.seq))


async def test_frames_longer_than_a_packet_span_transfers(lab: Lab) -> None:
    sim = await lab.sim(serial="PBM-HWSIM-2")
    await sim.listen_usb()
    dev = usb.core.find(
        backend=shared_backend(), custom_match=lambda d: d.serial_number == "PBM-HWSIM-2"
    )
    try:
        await asyncio.to_thread(exchange_hello, dev)
        frame, wire_len = await asyncio.to_thread(read_telemetry, dev)
    finally:
        usb.util.dispose_resources(dev)
    assert len(frame.message().ports) == 4 and wire_len > 64  # reassembled from 2+ packets


async def test_two_simulators_are_two_devices() -> None:
    sims = [Simulator(SimConfig(time_scale=60.0, serial=f"PBM-TWO-{i}")) for i in (1, 2)]
    try:
        for sim in sims:
            await sim.start()
            await sim.listen_usb()
        serials = {
            d.serial
            for d in shared_backend().enumerate_devices()
            if d.serial.startswith("PBM-TWO-")
        }
        assert serials == {"PBM-TWO-1", "PBM-TWO-2"}
    finally:
        for sim in sims:
            await sim.close()
