"""Every message of ICD §3/§4 that needs no arming: layouts, sizes, defaults, refusals.

These tests share one simulator per time scale and never change its arming state.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from . import pbmlink_peer as pl
from .harness import PAD_PORTS, PROBE_PORT, W660, W830, W905, Rig
from .pbmlink_peer import Ack, Counters, Info, Nak, PortInfo, Stopped, Telemetry


async def test_hello_answers_info_with_the_icd_defaults(shared_rig: Rig) -> None:
    rec = await shared_rig.peer.request(pl.HELLO)
    assert rec.frame.msg_type == pl.INFO
    assert len(rec.frame.payload) == 1 + 1 + 2 + 2 + 2 + 16 + 12
    info = rec.message
    assert isinstance(info, Info)
    assert info.protocol_version == 1
    assert info.port_count == 4  # "the MultiPort has 4"
    assert info.watchdog_ms == 250
    assert info.emission_delay_ms == 2000
    assert info.max_telemetry_hz >= 1
    assert info.serial.isprintable() and info.firmware.isprintable()


async def test_ping_answers_pong_with_a_device_clock_that_runs_forward(shared_rig: Rig) -> None:
    first = await shared_rig.peer.request(pl.PING)
    assert first.frame.msg_type == pl.PONG and len(first.frame.payload) == 8
    second = await shared_rig.peer.ping()
    assert isinstance(first.message, pl.Pong)
    assert second.device_time_us > first.message.device_time_us


async def test_get_port_answers_port_info_for_every_port(shared_rig: Rig) -> None:
    for n in range(1, shared_rig.info.port_count + 1):
        rec = await shared_rig.peer.request(pl.GET_PORT, bytes([n]))
        assert rec.frame.msg_type == pl.PORT_INFO
        info = rec.message
        assert isinstance(info, PortInfo)
        assert len(rec.frame.payload) == 19 + 11 * len(info.channels)
        assert info.port == n
        assert info.applicator_kind in (1, 2)
        assert len(info.channels) >= 1
        for ch in info.channels:
            assert ch.modes & 0b11 and not ch.modes & ~0b11, f"modes {ch.modes:#b}"
            assert ch.max_power_uw > 0


async def test_port_info_matches_the_default_catalog(shared_rig: Rig) -> None:
    """ICD appendix A: the simulator's defaults (ports 1-3 DUO pad, 4 the 905 nm probe)."""
    for n in PAD_PORTS:
        pad = await shared_rig.peer.get_port(n)
        assert isinstance(pad, PortInfo)
        assert pad.applicator_kind == 1
        assert pad.area_mm2 == 18_000  # 180 cm²
        channels = {c.wavelength_nm: c for c in pad.channels}
        assert sorted(channels) == [W660, W830]
        assert channels[W660].max_power_uw == 1_800_000
        assert channels[W830].max_power_uw == 2_700_000
        assert all(c.modes == 0b11 for c in pad.channels)
    probe = await shared_rig.peer.get_port(PROBE_PORT)
    assert isinstance(probe, PortInfo)
    assert probe.applicator_kind == 2
    assert probe.area_mm2 == 50  # 0.5 cm²
    (ch,) = probe.channels
    assert (ch.wavelength_nm, ch.max_power_uw, ch.modes) == (W905, 200_000, 0b10)
    assert ch.peak_power_mw == 100_000  # 4 diodes × 25 W


@pytest.mark.parametrize("rate_hz", [0, 1, 50])
async def test_set_telemetry_within_range_is_acked(shared_rig: Rig, rate_hz: int) -> None:
    rec = await shared_rig.peer.request(pl.SET_TELEMETRY, struct.pack("<H", rate_hz))
    assert rec.frame.msg_type == pl.ACK and rec.frame.payload == b""


async def test_set_telemetry_range_is_one_to_max(shared_rig: Rig) -> None:
    peer, top = shared_rig.peer, shared_rig.info.max_telemetry_hz
    assert await peer.set_telemetry(top) == Ack()
    assert await peer.set_telemetry(top + 1) == Nak(pl.NAK_BAD_PARAMETER)
    assert await peer.set_telemetry(0xFFFF) == Nak(pl.NAK_BAD_PARAMETER)


async def test_set_telemetry_zero_turns_telemetry_off(shared_rig: Rig) -> None:
    peer = shared_rig.peer
    await peer.wait_telemetry()
    ack = await peer.request(pl.SET_TELEMETRY, struct.pack("<H", 0))
    assert ack.message == Ack()
    # Silence is the behaviour under test: watch the stream for 20 periods of 100 Hz.
    await asyncio.sleep(0.2)
    sentinel = await peer.request(pl.PING)
    assert peer.telemetry(ack.index + 1, sentinel.index) == []
    assert await peer.set_telemetry(100) == Ack()
    await peer.wait_telemetry()


async def test_telemetry_layout_in_standby(shared_rig: Rig) -> None:
    peer = shared_rig.peer
    start = peer.mark()
    await peer.wait_telemetry()
    rec = next(r for r in peer.received[start:] if r.frame.msg_type == pl.TELEMETRY)
    t = rec.message
    assert isinstance(t, Telemetry)
    assert len(rec.frame.payload) == 12 + 17 * shared_rig.info.port_count
    assert len(t.ports) == shared_rig.info.port_count
    assert t.state == pl.STANDBY and t.fault_code == 0
    assert t.interlocks & 0b111 == 0b111, f"interlocks {t.interlocks:#06b} not in run state"
    assert t.interlocks & ~0b1111 == 0, "only bits 0-3 are defined"
    for n, p in enumerate(t.ports, 1):
        assert p.flags & pl.FLAG_PRESENT, f"port {n} reports no applicator"
        assert not p.flags & pl.FLAG_EMITTING
        assert p.wavelength_nm == 0, "wavelength_nm is 0 when idle"
        assert 1000 <= p.temp_centi_c <= 4100, f"port {n} at {p.temp_centi_c / 100} °C"
    for n in PAD_PORTS:
        assert not t.port(n).flags & pl.FLAG_CONTACT, "pads have no contact sensor"
    assert t.port(PROBE_PORT).flags & pl.FLAG_CONTACT, "probes start in contact (sim default)"


async def test_get_counters_before_any_arm(shared_rig: Rig) -> None:
    for n in range(1, shared_rig.info.port_count + 1):
        rec = await shared_rig.peer.request(pl.GET_COUNTERS, bytes([n]))
        assert rec.frame.msg_type == pl.COUNTERS and len(rec.frame.payload) == 27
        assert rec.message == Counters(n, 0, 0, 0, 0, 0, 0)


async def test_emit_stop_on_a_port_that_never_emitted_is_all_zero_without_event(
    shared_rig: Rig,
) -> None:
    peer = shared_rig.peer
    start = peer.mark()
    for n in range(1, shared_rig.info.port_count + 1):
        rec = await peer.request(pl.EMIT_STOP, bytes([n]))
        assert rec.frame.msg_type == pl.STOPPED and len(rec.frame.payload) == 14
        assert rec.message == Stopped(n, 0, 0, 0)
    await peer.wait_telemetry()  # a little later in the stream
    assert peer.events(start, pl.EV_EMISSION_ENDED) == []


@pytest.mark.parametrize("port", [0, 5, 8, 255])
@pytest.mark.parametrize("msg_type", [pl.GET_PORT, pl.EMIT_STOP, pl.GET_COUNTERS])
async def test_port_outside_range_gets_nak_1(shared_rig: Rig, msg_type: int, port: int) -> None:
    rec = await shared_rig.peer.request(msg_type, bytes([port]))
    assert rec.message == Nak(pl.NAK_BAD_PORT)


@pytest.mark.parametrize(
    ("msg_type", "payload"),
    [
        (pl.HELLO, b"\x00"),
        (pl.PING, b"\x01\x02"),
        (pl.GET_PORT, b""),
        (pl.GET_PORT, b"\x01\x00"),
        (pl.SET_TELEMETRY, b"\x0a"),
        (pl.SET_TELEMETRY, b"\x0a\x00\x00"),
        (pl.ARM, b"\x01\x00\x00"),
        (pl.ARM, b"\x01\x00\x00\x00\x00"),
        (pl.EMIT_STOP, b""),
        (pl.EMIT_STOP, b"\x01\x00"),
        (pl.CLEAR_FAULT, b"\x00"),
        (pl.GET_COUNTERS, b""),
        (pl.GET_COUNTERS, b"\x01\x01"),
    ],
    ids=lambda v: v.hex() if isinstance(v, bytes) else f"0x{v:02X}",
)
async def test_known_type_with_wrong_payload_length_gets_nak_10(
    shared_rig: Rig, msg_type: int, payload: bytes
) -> None:
    rec = await shared_rig.peer.request(msg_type, payload)
    assert rec.message == Nak(pl.NAK_BAD_PARAMETER)


async def test_arm_with_token_zero_gets_nak_10(shared_rig: Rig) -> None:
    assert await shared_rig.peer.arm(0) == Nak(pl.NAK_BAD_PARAMETER)
    t = await shared_rig.peer.wait_telemetry()
    assert t.state == pl.STANDBY


@pytest.mark.parametrize("msg_type", [pl.ALL_OFF, pl.DISARM])
@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x01\x02\x03\x04\x05\x06\x07"])
async def test_all_off_and_disarm_are_always_accepted(
    shared_rig: Rig, msg_type: int, payload: bytes
) -> None:
    rec = await shared_rig.peer.request(msg_type, payload)
    assert rec.frame.msg_type == pl.ACK and rec.message == Ack()
    assert (await shared_rig.peer.wait_telemetry()).state == pl.STANDBY


async def test_emit_start_in_standby_gets_nak_5(shared_rig: Rig) -> None:
    assert await shared_rig.peer.emit_start(1, W660, 1000) == Nak(pl.NAK_NOT_ARMED)
