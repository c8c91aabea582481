"""Requests and refusals of ICD §3 and §5a, over a real TCP socket."""

from __future__ import annotations

import itertools
import random
import struct

import pytest

from pbmd.drivers import codec
from pbmd.drivers.codec import ApplicatorKind, ChannelMode, ControllerState, NakError

from .conftest import Lab
from .host import emit, probe_pulse

BAD_PORTS = (0, 5, 255)


async def test_hello_reports_the_controller(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False)
    info = await rig.host.expect(codec.Hello(), codec.Info)
    assert info == codec.Info(1, 4, 200, 250, 2000, "PBM-SIM-0001", "sim-1.0.0")


async def test_port_info_follows_the_catalog(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False)
    cw_pulsed = int(ChannelMode.CONTINUOUS | ChannelMode.PULSED)
    for port in (1, 2, 3):
        pad = await rig.host.expect(codec.GetPort(port), codec.PortInfo)
        assert pad.port == port
        assert pad.applicator_kind == ApplicatorKind.PAD
        assert pad.area_mm2 == 18_000
        assert pad.channels == (
            codec.Channel(660, 1_800_000, cw_pulsed, 1_800),
            codec.Channel(830, 2_700_000, cw_pulsed, 2_700),
        )
        assert pad.applicator_serial.startswith("DUO-")
    probe = await rig.host.expect(codec.GetPort(4), codec.PortInfo)
    assert probe.applicator_kind == ApplicatorKind.PROBE
    assert probe.area_mm2 == 50
    assert probe.channels == (codec.Channel(905, 200_000, int(ChannelMode.PULSED), 100_000),)


async def test_configured_ports_and_empty_port(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False, ports={1: "probe_830", 2: None, 3: "duo_pad"})
    info = await rig.host.expect(codec.Hello(), codec.Info)
    assert info.port_count == 3
    probe = await rig.host.expect(codec.GetPort(1), codec.PortInfo)
    assert probe.applicator_kind == ApplicatorKind.PROBE
    assert probe.channels == (codec.Channel(830, 250_000, 3, 250),)
    empty = await rig.host.expect(codec.GetPort(2), codec.PortInfo)
    assert empty == codec.PortInfo(2, 0, "", 0, ())
    assert await rig.host.nak(codec.GetPort(4)) == NakError.BAD_PORT


async def test_ping_reports_device_time_running_time_scale_faster(lab: Lab) -> None:
    rig = await lab.rig(time_scale=60, heartbeat=False)
    first = await rig.host.expect(codec.Ping(), codec.Pong)
    start = rig.host.received[-1].wall_s
    await rig.host.wait_telemetry(lambda t: t.device_time_us > first.device_time_us + 3_000_000)
    last = await rig.host.expect(codec.Ping(), codec.Pong)
    wall = rig.host.received[-1].wall_s - start
    ratio = (last.device_time_us - first.device_time_us) / 1e6 / wall
    assert 40 < ratio < 62, f"device clock ran {ratio:.1f}× wall time at time scale 60"


@pytest.mark.parametrize("port", BAD_PORTS)
async def test_nak_1_for_a_bad_port_on_every_port_request(lab: Lab, port: int) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    assert await host.nak(codec.GetPort(port)) == NakError.BAD_PORT
    assert await host.nak(codec.EmitStop(port)) == NakError.BAD_PORT
    assert await host.nak(codec.GetCounters(port)) == NakError.BAD_PORT
    assert await host.nak(emit(port, 660, 1000)) == NakError.BAD_PORT


@pytest.mark.parametrize("msg_type", [0x00, 0x0C, 0x7F, 0x80, 0x81, 0x90, 0x91, 0xFE, 0xFF])
async def test_nak_11_for_types_the_controller_does_not_serve(lab: Lab, msg_type: int) -> None:
    rig = await lab.rig(heartbeat=False)
    reply = await rig.host.raw_request(msg_type, b"\x01\x02")
    assert reply == codec.Nak(NakError.UNKNOWN_MESSAGE_TYPE)


WRONG_LENGTHS = [
    (codec.Hello.TYPE, b"\x00"),
    (codec.Ping.TYPE, b"\x00\x00"),
    (codec.GetPort.TYPE, b""),
    (codec.GetPort.TYPE, b"\x01\x00"),
    (codec.SetTelemetry.TYPE, b"\x0a"),
    (codec.SetTelemetry.TYPE, b"\x0a\x00\x00"),
    (codec.Arm.TYPE, b"\x01\x00\x00"),
    (codec.Arm.TYPE, b"\x01\x00\x00\x00\x00"),
    (codec.EmitStart.TYPE, bytes(25)),
    (codec.EmitStart.TYPE, bytes(27)),
    (codec.EmitStop.TYPE, b""),
    (codec.EmitStop.TYPE, b"\x01\x01"),
    (codec.ClearFault.TYPE, b"\x00"),
    (codec.GetCounters.TYPE, b""),
    (codec.GetCounters.TYPE, b"\x01\x01"),
]


@pytest.mark.parametrize(("msg_type", "payload"), WRONG_LENGTHS)
async def test_nak_10_for_a_payload_of_the_wrong_length(
    lab: Lab, msg_type: int, payload: bytes
) -> None:
    rig = await lab.rig(heartbeat=False)
    reply = await rig.host.raw_request(msg_type, payload)
    assert reply == codec.Nak(NakError.BAD_PARAMETER)


async def test_all_off_and_disarm_are_accepted_with_any_payload(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    await host.ack(emit(1, 660, 100_000))
    mark = host.mark()
    assert await host.raw_request(codec.AllOff.TYPE, b"junk") == codec.Ack()
    await host.wait_event(codec.EventCode.EMISSION_ENDED, port=1, value=9, after=mark)
    assert await host.raw_request(codec.Disarm.TYPE, b"\x01") == codec.Ack()
    await host.wait_state(ControllerState.STANDBY)


async def test_set_telemetry_range(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False)
    host = rig.host
    await host.ack(codec.SetTelemetry(0))
    await host.ack(codec.SetTelemetry(200))
    assert await host.nak(codec.SetTelemetry(201)) == NakError.BAD_PARAMETER
    assert await host.nak(codec.SetTelemetry(0xFFFF)) == NakError.BAD_PARAMETER


async def test_telemetry_rate_is_per_wall_second_at_any_time_scale(lab: Lab) -> None:
    rig = await lab.rig(time_scale=120, telemetry_hz=50, heartbeat=False)
    host = rig.host
    mark = host.mark()
    await host.wait_for(lambda _r: len(host.telemetry(mark)) >= 26, what="26 telemetry frames")
    frames = [r for r in host.received[mark:] if isinstance(r.message, codec.Telemetry)][:26]
    wall = frames[-1].wall_s - frames[0].wall_s
    assert 0.35 < wall < 1.0, f"25 periods at 50 Hz took {wall:.3f} s wall"
    times = [r.message.device_time_us for r in frames if isinstance(r.message, codec.Telemetry)]
    steps = [b - a for a, b in itertools.pairwise(times)]
    assert all(s > 0 for s in steps)
    mean_step_s = sum(steps) / len(steps) / 1e6
    assert 1.6 < mean_step_s < 3.2, f"device time per sample {mean_step_s:.2f} s (expect 2.4)"
    assert all(len(t.ports) == 4 for t in host.telemetry(mark))


async def test_telemetry_off_sends_nothing(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False)
    host = rig.host
    await host.ack(codec.SetTelemetry(0))
    mark = host.mark()
    await host.ping_through(0.1)  # 10 periods of the old rate
    assert host.telemetry(mark) == []


GARBAGE = [
    b"\x00\x00\x00",  # empty frames
    b"\x05\x01\x02\x03\x04\x00",  # too short
    codec.cobs_encode(b"\x01\x02\x03\x00\x00\x00\xff\xff") + b"\x00",  # bad crc
    codec.cobs_encode(codec.encode_body(0x01, 1, b"")[:-2] + b"\x00\x00") + b"\x00",
    bytes(range(1, 256)) * 4 + b"\x00",  # oversize
    b"\x02\x00\x00",  # cobs block of zero
]


async def test_garbage_is_counted_and_dropped_and_the_link_survives(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False)
    host = rig.host
    body = codec.encode_body(codec.Hello.TYPE, 77, b"")
    wrong_version = bytearray(body)
    wrong_version[0] = 2
    wrong_version[-2:] = struct.pack("<H", codec.crc16_ccitt_false(bytes(wrong_version[:-2])))
    wrong_length = bytearray(codec.encode_body(codec.GetPort.TYPE, 78, b"\x01"))
    wrong_length[4] = 3
    wrong_length[-2:] = struct.pack("<H", codec.crc16_ccitt_false(bytes(wrong_length[:-2])))
    before = rig.sim.snapshot()["link"]["rx_dropped_total"]
    for chunk in [*GARBAGE, codec.cobs_encode(bytes(wrong_version)) + b"\x00"]:
        host.send_raw(chunk)
    host.send_raw(codec.cobs_encode(bytes(wrong_length)) + b"\x00")
    rng = random.Random(7)
    host.send_raw(bytes(rng.randrange(256) for _ in range(20_000)) + b"\x00")
    info = await host.expect(codec.Hello(), codec.Info)
    assert info.protocol_version == 1
    snap = rig.sim.snapshot()
    assert snap["link"]["rx_dropped_total"] - before >= 8
    assert snap["link"]["rx_empty"] >= 2
    assert snap["internal_errors"] == 0
    assert host.replies(77) == [] and host.replies(78) == []


async def test_random_valid_frames_never_crash_the_controller(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    rng = random.Random(11)
    seqs = []
    for _ in range(400):
        msg_type = rng.choice([*range(0x01, 0x0D), 0x80, 0xFE, rng.randrange(256)])
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 4, 26, 40])))
        if msg_type == codec.Disarm.TYPE:
            continue
        seqs.append(host.send_body(msg_type, payload))
    for seq in seqs:
        await host.reply_to(seq)
    assert all(len(host.replies(s)) == 1 for s in seqs)
    assert rig.sim.snapshot()["internal_errors"] == 0
    await host.ack(codec.AllOff())


async def test_several_frames_in_one_write_and_split_frames(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False)
    host = rig.host
    seqs = [host.next_seq() for _ in range(6)]
    wire = b"".join(codec.encode_frame(codec.Ping(), s) for s in seqs)
    host.send_raw(wire[:5])
    host.send_raw(wire[5:])
    for seq in seqs:
        assert isinstance(await host.reply_to(seq), codec.Pong)
    answered = [r.seq for r in host.received if r.msg_type == codec.Pong.TYPE]
    assert answered[-6:] == seqs


async def test_emit_start_with_pulsed_probe_parameters(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    await rig.host.ack(probe_pulse(200_000))
    t = await rig.host.wait_telemetry(lambda t: t.ports[3].emitting)
    assert t.ports[3].wavelength_nm == 905
