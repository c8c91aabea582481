"""Runs `pbmd sim` as a separate process and talks to its control channel.

The conformance suite treats the simulator as a black box: it is started from the
command line exactly as a user would, its `link`/`control`/`ready` lines are
parsed, PBM-Link is spoken by the independent peer, and faults are injected over
the JSON-lines control channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pbmlink_peer import READY, Ack, Counters, Info, PbmLinkPeer, PortInfo, Stopped

PBMD = Path(sys.executable).parent / "pbmd"
START_TIMEOUT_S = 20.0

# Default catalog of `pbmd sim` (ICD appendix A): ports 1-3 DUO pad, port 4 the 905 nm probe.
PAD_PORTS = (1, 2, 3)
PROBE_PORT = 4
W660, W830, W905 = 660, 830, 905
PAD_660_MAX_UW = 1_800_000
PAD_830_MAX_UW = 2_700_000
PROBE_905_MAX_UW = 200_000
# A 905 nm superpulsed emission that the probe can do: 10 kHz, 200 ns pulses (2 permille).
PROBE_PULSED = {"mode": 1, "pulse_hz": 10_000, "duty_permille": 2}


@dataclass
class SimProcess:
    """One `pbmd sim` subprocess and the endpoints it announced."""

    proc: subprocess.Popen[bytes]
    time_scale: float
    link_host: str
    link_port: int
    control_host: str
    control_port: int
    stdout_lines: queue.Queue[str]
    stderr_file: Any
    exit_code: int | None = None

    def stderr_text(self) -> str:
        self.stderr_file.seek(0)
        return str(self.stderr_file.read().decode(errors="replace"))

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then reap (SIGKILL only if it ignores SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr_file.close()
        return self.exit_code


def _drain(stream: Any, lines: queue.Queue[str]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").rstrip("\n"))


def start_sim(time_scale: float, *extra: str) -> SimProcess:
    """Start `pbmd sim --tcp 127.0.0.1:0 --control 127.0.0.1:0` and wait for `ready`."""
    cmd = [
        str(PBMD), "sim", "--tcp", "127.0.0.1:0", "--control", "127.0.0.1:0",
        "--time-scale", f"{time_scale:g}", *extra,
    ]  # fmt: skip
    stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=stderr_file, stdin=subprocess.DEVNULL
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True).start()
    link: tuple[str, int] | None = None
    control: tuple[str, int] | None = None
    seen: list[str] = []
    try:
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(
                    f"`{' '.join(cmd)}` printed no `ready` within {START_TIMEOUT_S} s"
                ) from None
            seen.append(line)
            word, _, rest = line.partition(" ")
            if word == "link":
                assert rest.startswith("socket://"), f"link line {line!r} is not socket://"
                host, _, port = rest.removeprefix("socket://").rpartition(":")
                link = (host, int(port))
            elif word == "control":
                host, _, port = rest.rpartition(":")
                control = (host, int(port))
            elif line == "ready":
                break
        assert link is not None and control is not None, f"no link/control line in {seen}"
        assert (
            seen[:3] == [seen[0], seen[1], "ready"]
            and seen[0].startswith("link ")
            and (seen[1].startswith("control "))
        ), f"`pbmd sim` must print link, control, ready in that order, printed {seen}"
    except BaseException:
        proc.kill()
        proc.wait()
        stderr_file.seek(0)
        err = stderr_file.read().decode(errors="replace")
        stderr_file.close()
        raise AssertionError(f"`pbmd sim` did not start: stdout {seen}, stderr:\n{err}") from None
    return SimProcess(proc, time_scale, *link, *control, lines, stderr_file)


class ControlError(RuntimeError):
    """The control channel answered {"ok": false, ...}."""


class ControlClient:
    """JSON lines over TCP: one request, one reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int) -> ControlClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def call(self, op: str, **args: Any) -> Any:
        async with self._lock:
            self._writer.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            await self._writer.drain()
            line = await asyncio.wait_for(self._reader.readline(), 5.0)
        if not line:
            raise ControlError(f"control channel closed while asking {op}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(f"{op}({args}) refused: {reply.get('error')}")
        return reply.get("result")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


@dataclass
class Rig:
    """A simulator process with one host connection (the peer) and a control client."""

    sim: SimProcess
    peer: PbmLinkPeer
    control: ControlClient
    info: Info
    ports: dict[int, PortInfo] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.sim.time_scale

    def wall_s(self, device_ms: float) -> float:
        """Wall seconds that `device_ms` of device time take at this time scale."""
        return device_ms / 1000.0 / self.scale

    def bound_s(self, device_ms: float, margin_s: float = 3.0) -> float:
        """A failure bound for something that takes `device_ms` of device time."""
        return self.wall_s(device_ms) + margin_s

    async def arm_ready(self, token: int = 0x5EED0001) -> None:
        """ARM and wait until the controller reports state 2 (emission delay over)."""
        reply = await self.peer.arm(token)
        assert reply == Ack(), f"ARM({token:#x}) answered {reply}"
        await self.peer.wait_telemetry(
            lambda t: t.state == READY,
            timeout_s=self.bound_s(self.info.emission_delay_ms),
            what="state 2 after ARM",
        )

    async def start(self, port: int, wavelength_nm: int, power_uw: int, **kw: int) -> None:
        reply = await self.peer.emit_start(port, wavelength_nm, power_uw, **kw)
        assert reply == Ack(), f"EMIT_START port {port} {wavelength_nm} nm answered {reply}"


async def handshake(peer: PbmLinkPeer, telemetry_hz: int = 100) -> tuple[Info, dict[int, PortInfo]]:
    """ICD §6: HELLO, GET_PORT for each port, SET_TELEMETRY."""
    info = await peer.hello()
    assert isinstance(info, Info), f"HELLO answered {info}"
    ports: dict[int, PortInfo] = {}
    for n in range(1, info.port_count + 1):
        port_info = await peer.get_port(n)
        assert isinstance(port_info, PortInfo), f"GET_PORT {n} answered {port_info}"
        ports[n] = port_info
    reply = await peer.set_telemetry(telemetry_hz)
    assert reply == Ack(), f"SET_TELEMETRY {telemetry_hz} answered {reply}"
    return info, ports


# How `pbmd sim`'s control channel moves each interlock input out of / back to its run state.
INTERLOCK_INPUTS: dict[str, tuple[str, str, bool, int]] = {
    # name: (op, argument, value in the run state, ICD bit)
    "key": ("key", "on", True, 0x01),
    "remote": ("remote", "closed", True, 0x02),
    "estop": ("estop", "pressed", False, 0x04),
}


async def set_interlock(rig: Rig, name: str, run: bool) -> None:
    op, arg, run_value, _bit = INTERLOCK_INPUTS[name]
    await rig.control.call(op, **{arg: run_value if run else not run_value})


async def stop_record(rig: Rig, port: int, reason: int) -> Stopped:
    """After an emission on `port` ended with `reason`: STOPPED, COUNTERS and the held
    telemetry value must all report the same energy (ICD §5, §5a)."""
    stopped = await rig.peer.emit_stop(port)
    assert isinstance(stopped, Stopped), f"EMIT_STOP {port} answered {stopped}"
    assert stopped.port == port
    assert stopped.stop_reason == reason, (
        f"port {port}: stop reason {stopped.stop_reason}, want {reason}"
    )
    counters = await rig.peer.get_counters(port)
    assert isinstance(counters, Counters), f"GET_COUNTERS {port} answered {counters}"
    assert counters.emitting == 0
    assert counters.last_stop_reason == reason
    assert (counters.delivered_uj, counters.duration_ms) == (
        stopped.delivered_uj,
        stopped.duration_ms,
    ), f"COUNTERS {counters} disagrees with STOPPED {stopped}"
    t = await rig.peer.wait_telemetry()
    rec = t.port(port)
    assert not rec.emitting and rec.wavelength_nm == 0, f"port {port} still emitting: {rec}"
    assert rec.delivered_uj == stopped.delivered_uj, (
        f"telemetry delivered_uj {rec.delivered_uj} is not the ended emission's "
        f"{stopped.delivered_uj} (ICD §5a: held until the next EMIT_START)"
    )
    return stopped
