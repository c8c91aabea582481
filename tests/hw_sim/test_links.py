"""Link faults, the control channel, the pty, and `pbmd sim` as a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import serial

from pbmd.daemon.cli import main
from pbmd.drivers import codec
from pbmd.drivers.codec import ControllerState, EventCode

from .conftest import Lab
from .host import BOUND_S, TcpHost, emit, wait_until

PBMD = Path(sys.executable).parent / "pbmd"


# -- link faults --------------------------------------------------------------------------


async def test_telemetry_stall_stops_only_telemetry(lab: Lab) -> None:
    rig = await lab.rig(telemetry_hz=100)
    host, faults = rig.host, rig.sim.faults
    await host.wait_telemetry()
    faults.telemetry_stall(True)
    await host.ping_through(0.02)  # whatever was in flight has arrived
    mark = host.mark()
    await host.ping_through(0.15)  # 15 periods, answered
    assert host.telemetry(mark) == []
    assert rig.sim.snapshot()["link"]["tx_dropped"]["telemetry_stall"] >= 10
    faults.telemetry_stall(False)
    await host.wait_telemetry()


async def test_corrupt_frames_are_dropped_by_the_host(lab: Lab) -> None:
    rig = await lab.rig(telemetry_hz=200, heartbeat=False)
    host, faults = rig.host, rig.sim.faults
    faults.corrupt_frames(1.0)

    async def drops(n: int) -> None:
        target = host.decoder.stats.dropped_total + n
        deadline = time.monotonic() + BOUND_S
        while host.decoder.stats.dropped_total < target:
            assert time.monotonic() < deadline, "no corrupted frames arrived"
            await asyncio.sleep(0.005)  # polling the host's own counter

    await drops(1)  # TCP keeps order: every frame sent before the change has arrived
    mark = host.mark()
    await drops(20)
    assert host.mark() == mark  # nothing valid got through
    faults.corrupt_frames(0.5)
    await host.wait_for(lambda _r: len(host.telemetry(mark)) >= 10, what="10 good telemetry")
    faults.corrupt_frames(0.0)
    assert isinstance(await host.request(codec.Hello()), codec.Info)
    assert rig.sim.snapshot()["link"]["tx_corrupted"] >= 20


async def test_reply_delay(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False)
    host = rig.host
    rig.sim.faults.reply_delay(120)
    sent = time.monotonic()
    seq = host.send(codec.Ping())
    await host.reply_to(seq)
    assert time.monotonic() - sent >= 0.12
    rig.sim.faults.reply_delay(0)
    await host.expect(codec.Ping(), codec.Pong)


async def test_drop_replies_executes_requests_silently(lab: Lab) -> None:
    rig = await lab.rig(heartbeat=False)
    host = rig.host
    rig.sim.faults.drop_replies(True)
    seq = host.send(codec.Arm(42))
    await host.wait_state(ControllerState.ARMED_DELAY)  # executed ...
    assert host.replies(seq) == []  # ... and never answered (the reply would precede this)
    rig.sim.faults.drop_replies(False)
    await host.ack(codec.Disarm())


async def test_drop_link_closes_the_tcp_connection_and_state_carries_over(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    rig.sim.faults.drop_link()
    await asyncio.wait_for(rig.host.eof.wait(), BOUND_S)
    again = await lab.tcp(rig.url)
    again.heartbeat()
    await again.ack(codec.SetTelemetry(50))
    t = await again.wait_telemetry()
    assert t.state == ControllerState.ARMED_READY
    await again.ack(emit(1, 660, 1000))


async def test_calibration_drift_over_device_time(lab: Lab) -> None:
    rig = await lab.rig(time_scale=120, armed=True)
    host = rig.host
    rig.sim.faults.calibration_drift(1, 5.0)  # +500 % per hour: +1 % every 7.2 s of device time
    await host.ack(emit(1, 830, 1_000_000))
    first = await host.wait_telemetry(lambda t: t.ports[0].emitting)
    later = await host.wait_telemetry(lambda t: t.device_time_us > first.device_time_us + 36e6)
    assert later.ports[0].measured_power_uw > first.ports[0].measured_power_uw * 1.03
    rig.sim.faults.clear()
    assert rig.sim.snapshot()["ports"][0]["faults"]["photodiode_gain"] == 1.0


async def test_clear_removes_injections_but_not_the_latched_fault(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    faults.reply_delay(10)
    faults.key(False)
    faults.contact(4, False)
    faults.power_factor(2, 0.5)
    faults.latch_fault(4)
    mark = host.mark()
    faults.clear()
    await host.wait_event(EventCode.INTERLOCK_CHANGED, value=0x07, after=mark)
    await host.wait_event(EventCode.CONTACT_CHANGED, port=4, value=1, after=mark)
    snap = rig.sim.snapshot()
    assert snap["state"] == ControllerState.FAULT and snap["fault"] == 4
    assert snap["ports"][1]["faults"]["power_factor"] == 1.0
    assert snap["link"]["faults"]["reply_delay_ms"] == 0.0
    await host.ack(codec.ClearFault())


async def test_injection_argument_errors_explain_themselves(lab: Lab) -> None:
    sim = await lab.sim()
    with pytest.raises(ValueError, match=r"ports are 1\.\.4"):
        sim.faults.unplug(9)
    with pytest.raises(ValueError, match="unknown applicator"):
        sim.faults.plug(1, "laser_9000")
    with pytest.raises(ValueError, match="rate"):
        sim.faults.corrupt_frames(2.0)
    with pytest.raises(ValueError, match="fault code"):
        sim.faults.latch_fault(9)


# -- control channel ----------------------------------------------------------------------


class Control:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call_raw(self, line: bytes) -> dict[str, Any]:
        self.writer.write(line + b"\n")
        reply = await asyncio.wait_for(self.reader.readline(), BOUND_S)
        result: dict[str, Any] = json.loads(reply)
        return result

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        return await self.call_raw(json.dumps({"op": op, "args": args}).encode())

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_control_channel_ops(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    address = await rig.sim.listen_control("127.0.0.1", 0)
    host_name, _, port = address.rpartition(":")
    ctl = Control(*await asyncio.open_connection(host_name, int(port)))
    other = Control(*await asyncio.open_connection(host_name, int(port)))
    try:
        ops = await ctl.call("ops")
        assert ops["ok"] and "key(on: 'bool' = True) -> 'None'" in ops["result"]
        snap = await other.call("snapshot")
        assert snap["ok"] and snap["result"]["state"] == ControllerState.ARMED_READY
        assert [p["applicator"] for p in snap["result"]["ports"]] == [
            "duo_pad", "duo_pad", "duo_pad", "probe_905",
        ]  # fmt: skip
        mark = rig.host.mark()
        assert await ctl.call("key", on=False) == {"ok": True, "result": None}
        await rig.host.wait_event(EventCode.INTERLOCK_CHANGED, value=0x06, after=mark)
        assert (await ctl.call("key"))["ok"]
        assert (await ctl.call("plug", port=2, applicator="probe_830"))["ok"]
        await rig.host.wait_event(EventCode.APPLICATOR_CHANGED, port=2, value=2, after=mark)
        bad = await ctl.call("unplug", port=12)
        assert not bad["ok"] and "ports are 1..4" in bad["error"]
        wrong = await ctl.call("contact", port=4, on=False, extra=1)
        assert not wrong["ok"] and "contact(port" in wrong["error"]
        unknown = await ctl.call("melt")
        assert not unknown["ok"] and "unknown op" in unknown["error"]
        assert not (await ctl.call_raw(b"{not json"))["ok"]
        assert not (await ctl.call_raw(b'["op"]'))["ok"]
        assert not (await ctl.call("key", on="yes"))["ok"]
        assert (await ctl.call("latch_fault", code=5, port=0, persist=False))["ok"]
        await rig.host.wait_event(EventCode.FAULT, value=5, after=mark)
        assert (await other.call("clear"))["ok"]
    finally:
        await ctl.close()
        await other.close()


async def test_command_log_is_the_firmwares_own_record_in_device_time(lab: Lab) -> None:
    """Commands in the order answered, queries left out, and each emission's end."""
    rig = await lab.rig(armed=True)
    address = await rig.sim.listen_control("127.0.0.1", 0)
    host_name, _, port = address.rpartition(":")
    ctl = Control(*await asyncio.open_connection(host_name, int(port)))
    try:
        before = (await ctl.call("command_log"))["result"]
        assert [e["request"] for e in before] == ["SetTelemetry", "Arm"]
        mark = rig.host.mark()
        await rig.host.request(emit(1, 660, 1_800_000, energy_budget_uj=9_000))
        await rig.host.wait_event(EventCode.EMISSION_ENDED, port=1, after=mark)
        refused = await rig.host.request(emit(9, 660, 1_000))
        assert isinstance(refused, codec.Nak)
        await rig.host.request(codec.GetCounters(1))
        log = (await ctl.call("command_log", since=len(before)))["result"]
        assert [e["i"] for e in log] == list(range(len(before), len(before) + 3))
        start, ended, bad = log
        assert start["request"] == "EmitStart" and start["reply"] == "Ack"
        assert (start["port"], start["wavelength_nm"], start["power_uw"]) == (1, 660, 1_800_000)
        assert ended["kind"] == "emission_ended" and ended["port"] == 1
        assert ended["stop_reason"] == codec.StopReason.ENERGY_BUDGET
        assert ended["energy_uj"] == 9_000
        # stamped when it happened: 9 mJ at about 1.8 W is about 5 ms of device time
        elapsed_ms = (ended["device_time_us"] - start["device_time_us"]) / 1000
        assert abs(elapsed_ms - ended["duration_ms"]) <= 1 and 4 <= elapsed_ms <= 7
        assert bad["reply"] == "Nak" and bad["nak_error"] == codec.NakError.BAD_PORT
        assert not (await ctl.call("command_log", since=-1))["ok"]
        assert not (await ctl.call("command_log", start=0))["ok"]
    finally:
        await ctl.close()


# -- pty ----------------------------------------------------------------------------------


async def test_pty_serves_raw_bytes_and_survives_the_host_closing(lab: Lab) -> None:
    sim = await lab.sim(time_scale=60)
    path = await sim.listen_pty()
    assert path.startswith("/dev/pts/")
    host = lab.pty(path)
    info = await host.expect(codec.Hello(), codec.Info)
    assert info.port_count == 4
    # every byte value passes unchanged (raw mode): GET_COUNTERS with seq 0x0D0A, 0x1113
    for seq in (0x0D0A, 0x1113, 0x7F03):
        host.send(codec.GetCounters(1), seq=seq)
        assert isinstance(await host.reply_to(seq), codec.Counters)
    await host.ack(codec.SetTelemetry(200))
    await host.wait_telemetry()
    await host.close()  # with telemetry unread; the master now reads EIO: no host
    await wait_until(lambda: not sim.snapshot()["link"]["ptys"][0]["host_open"], "pty closed")
    assert sim.snapshot()["link"]["host"] is None
    reopened_us = sim.device_time_us
    again = lab.pty(path)
    await again.expect(codec.Hello(), codec.Info)
    await again.wait_telemetry()  # the rate carried over
    assert again.decoder.stats.dropped_total == 0  # no half frame left over
    stale = [t for t in again.telemetry() if t.device_time_us < reopened_us]
    assert stale == [], "the new host read what the old one left unread"
    snap = sim.snapshot()
    assert snap["link"]["connections"] == 2 and snap["internal_errors"] == 0


async def test_pty_opens_with_pyserial_at_921600(lab: Lab) -> None:
    sim = await lab.sim()
    path = await sim.listen_pty()

    def exchange() -> bytes:
        with serial.Serial(path, 921600, bytesize=8, parity="N", stopbits=1, timeout=BOUND_S) as s:
            s.write(codec.encode_frame(codec.Hello(), 0x4242))
            return bytes(s.read_until(b"\x00"))

    wire = await asyncio.to_thread(exchange)
    frames = codec.StreamDecoder().feed(wire)
    assert len(frames) == 1 and frames[0].seq == 0x4242
    assert isinstance(frames[0].message(), codec.Info)


async def test_a_tcp_host_replaces_a_pty_host(lab: Lab) -> None:
    sim = await lab.sim()
    path = await sim.listen_pty()
    url = await sim.listen_tcp()
    on_pty = lab.pty(path)
    await on_pty.ack(codec.Arm(77))
    on_tcp = await lab.tcp(url)
    c = await on_tcp.expect(codec.GetCounters(1), codec.Counters)
    assert c.session_token == 77
    await on_tcp.ack(codec.Disarm())
    assert sim.snapshot()["link"]["host"].startswith("tcp:")


# -- pbmd sim -----------------------------------------------------------------------------


def _start_cli(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [str(PBMD), "sim", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline().rstrip("\n") for _ in range(3)]
    return proc, lines


def _stop_cli(proc: subprocess.Popen[str], sig: signal.Signals) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_pbmd_sim_tcp_prints_its_endpoints_and_exits_cleanly(sig: signal.Signals) -> None:
    proc, lines = await asyncio.to_thread(
        _start_cli, "--tcp", "127.0.0.1:0", "--time-scale", "60", "--control", "127.0.0.1:0",
        "--seed", "3", "--port", "4=probe_830", "--port", "3=none",
    )  # fmt: skip
    try:
        assert lines[0].startswith("link socket://127.0.0.1:"), lines
        assert lines[1].startswith("control 127.0.0.1:"), lines
        assert lines[2] == "ready"
        host = await TcpHost.connect(lines[0].removeprefix("link "))
        try:
            info = await host.handshake()
            assert info.port_count == 4
            probe = await host.expect(codec.GetPort(4), codec.PortInfo)
            assert probe.channels[0].wavelength_nm == 830
            empty = await host.expect(codec.GetPort(3), codec.PortInfo)
            assert empty.applicator_kind == 0
        finally:
            await host.close()
        addr, _, port = lines[1].removeprefix("control ").rpartition(":")
        ctl = Control(*await asyncio.open_connection(addr, int(port)))
        try:
            assert (await ctl.call("snapshot"))["result"]["time_scale"] == 60
        finally:
            await ctl.close()
    finally:
        code = await asyncio.to_thread(_stop_cli, proc, sig)
    assert code == 0


async def test_pbmd_sim_pty() -> None:
    proc, lines = await asyncio.to_thread(_start_cli, "--pty")
    try:
        assert lines[0].startswith("link /dev/pts/"), lines
        assert lines[1].startswith("control 127.0.0.1:") and lines[2] == "ready"
        path = lines[0].removeprefix("link ")
        assert await asyncio.to_thread(os.path.exists, path)
    finally:
        code = await asyncio.to_thread(_stop_cli, proc, signal.SIGTERM)
    assert code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--tcp", "nohost"],
        ["--pty", "--time-scale", "500"],
        ["--pty", "--port", "9=duo_pad"],
        ["--pty", "--port", "1=toaster"],
        ["--pty", "--tcp", "127.0.0.1:0"],
        [],
    ],
)
def test_pbmd_sim_refuses_bad_arguments(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sim", *args])
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and "pbmd sim" in out.err


async def test_drop_link_silences_a_pty_host_until_it_reopens(lab: Lab) -> None:
    sim = await lab.sim()
    path = await sim.listen_pty()
    host = lab.pty(path)
    await host.ack(codec.SetTelemetry(200))
    await host.wait_telemetry()
    sim.faults.drop_link()
    mark = host.mark()
    dropped = sim.snapshot()["link"]["tx_dropped"]["no_host"]
    host.send(codec.Ping())  # ignored: the line is cut
    await wait_until(
        lambda: sim.snapshot()["link"]["tx_dropped"]["no_host"] >= dropped + 5,
        "telemetry with no host",
    )
    assert host.received[mark:] == []
    assert sim.snapshot()["link"]["ptys"] == [{"path": path, "host_open": True, "silenced": True}]
    await host.close()
    await wait_until(lambda: not sim.snapshot()["link"]["ptys"][0]["host_open"], "pty closed")
    again = lab.pty(path)
    assert isinstance(await again.request(codec.Hello()), codec.Info)


CORRUPTION_FRAMES = 600
"""Frames per direction in the corruption-rate tests: at a rate of 0.2 the
count is 120 ± 10 (one standard deviation); the tests allow ± 40."""


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {BOUND_S} s"
        await asyncio.sleep(0.005)  # polling counters, not waiting for time to pass


async def test_corruption_to_the_host_hits_the_requested_fraction_and_fails_the_crc(
    lab: Lab,
) -> None:
    rig = await lab.rig(telemetry_hz=0, heartbeat=False)
    host, sim = rig.host, rig.sim
    sent_before = sim.snapshot()["link"]["tx_corrupted"]
    crc_before = host.decoder.stats.dropped["crc"]
    mark = host.mark()
    sim.faults.corrupt_frames(0.2, "to_host")
    seqs = [host.send(codec.Ping()) for _ in range(CORRUPTION_FRAMES)]

    def arrived() -> int:
        return len(host.received) - mark + host.decoder.stats.dropped["crc"] - crc_before

    await _until(lambda: arrived() >= CORRUPTION_FRAMES, "replies or CRC drops")
    corrupted = sim.snapshot()["link"]["tx_corrupted"] - sent_before
    assert 80 <= corrupted <= 160, f"{corrupted} of {CORRUPTION_FRAMES} corrupted at rate 0.2"
    # Every corrupted frame failed its CRC at the host and was dropped (ICD §2);
    # nothing else was dropped, and every other PING was answered.
    assert host.decoder.stats.dropped["crc"] - crc_before == corrupted
    assert host.decoder.stats.dropped_total - crc_before == corrupted
    assert sum(1 for seq in seqs if host.replies(seq)) == CORRUPTION_FRAMES - corrupted
    assert sim.snapshot()["link"]["rx_corrupted"] == 0


async def test_corruption_to_the_controller_hits_the_requested_fraction_and_fails_the_crc(
    lab: Lab,
) -> None:
    rig = await lab.rig(telemetry_hz=0, heartbeat=False)
    host, sim = rig.host, rig.sim
    before = sim.snapshot()["link"]
    sim.faults.corrupt_frames(0.2, "to_controller")
    seqs = [host.send(codec.Ping()) for _ in range(CORRUPTION_FRAMES)]

    def seen() -> int:
        link = sim.snapshot()["link"]
        return (link["rx_frames"] + link["rx_dropped_total"]) - (
            before["rx_frames"] + before["rx_dropped_total"]
        )

    await _until(lambda: seen() >= CORRUPTION_FRAMES, "frames at the controller")
    link = sim.snapshot()["link"]
    corrupted = link["rx_corrupted"] - before["rx_corrupted"]
    assert 80 <= corrupted <= 160, f"{corrupted} of {CORRUPTION_FRAMES} corrupted at rate 0.2"
    assert link["rx_dropped"]["crc"] - before["rx_dropped"]["crc"] == corrupted
    assert link["rx_dropped_total"] - before["rx_dropped_total"] == corrupted
    answered = CORRUPTION_FRAMES - corrupted
    await _until(lambda: sum(1 for s in seqs if host.replies(s)) >= answered, "PONGs")
    assert sum(1 for s in seqs if host.replies(s)) == answered
    assert link["tx_corrupted"] == before["tx_corrupted"]
    assert link["faults"]["corrupt_to_controller_rate"] == 0.2


async def test_corruption_both_ways_and_a_bad_direction(lab: Lab) -> None:
    sim = await lab.sim()
    sim.faults.corrupt_frames(0.01, "both")
    faults = sim.snapshot()["link"]["faults"]
    assert (faults["corrupt_rate"], faults["corrupt_to_controller_rate"]) == (0.01, 0.01)
    with pytest.raises(ValueError, match="direction"):
        sim.faults.corrupt_frames(0.1, "sideways")
    sim.faults.clear()
    faults = sim.snapshot()["link"]["faults"]
    assert (faults["corrupt_rate"], faults["corrupt_to_controller_rate"]) == (0.0, 0.0)
