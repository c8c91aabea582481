"""Runs `pbmd sim` as a separate process and talks to its control channel.

The conformance suite treats the simulator as a black box: it is started from the
command line exactly as a user would, its `link`/`control`/`ready` lines are
parsed, PBM-Link is spoken by the independent peer, and faults are injected over
the JSON-lines control channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
DEFAULT_APPLICATORS = {1: "duo_pad", 2: "duo_pad", 3: "duo_pad", 4: "probe_905"}
RUN_INTERLOCKS = 0b0111  # key on, remote closed, e-stop released; footswitch not pressed
_tokens = itertools.count(0x5E55_0001)


def new_token() -> int:
    """A session token no other test has used (an ARM with a used token continues its sums)."""
    return next(_tokens) & 0xFFFF_FFFF or next(_tokens)


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
    stdout_lines: queue.Queue[str | None]
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


def _drain(stream: Any, lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").rstrip("\n"))
    lines.put(None)  # end of output: the process is gone


class PendingSim:
    """A `pbmd sim` process that has been started but not yet waited for."""

    def __init__(self, time_scale: float, *extra: str) -> None:
        self.time_scale = time_scale
        self.cmd = [
            str(PBMD), "sim", "--realtime", "--tcp", "127.0.0.1:0", "--control", "127.0.0.1:0",
            "--time-scale", f"{time_scale:g}", *extra,
        ]  # fmt: skip
        self.stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=self.stderr_file, stdin=subprocess.DEVNULL
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_drain, args=(self.proc.stdout, self.lines), daemon=True).start()

    def wait_ready(self) -> SimProcess:
        """Parse the `link`, `control` and `ready` lines (in that order)."""
        link: tuple[str, int] | None = None
        control: tuple[str, int] | None = None
        seen: list[str] = []
        try:
            while True:
                try:
                    line = self.lines.get(timeout=START_TIMEOUT_S)
                except queue.Empty:
                    raise AssertionError(f"no `ready` within {START_TIMEOUT_S} s") from None
                if line is None:
                    raise AssertionError(f"exited with code {self.proc.wait()}")
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
            assert link is not None and control is not None, "no link or control line"
            assert [w.split(" ")[0] for w in seen[:3]] == ["link", "control", "ready"], (
                "`pbmd sim` must print link, control, ready in that order"
            )
        except BaseException as exc:
            self.proc.kill()
            self.proc.wait()
            self.stderr_file.seek(0)
            err = self.stderr_file.read().decode(errors="replace")
            self.stderr_file.close()
            raise AssertionError(
                f"`{' '.join(self.cmd)}` did not start ({exc}): stdout {seen}, stderr:\n{err}"
            ) from None
        return SimProcess(self.proc, self.time_scale, *link, *control, self.lines, self.stderr_file)

    def discard(self) -> None:
        """Stop a spare that no test took (SIGTERM, reap)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr_file.close()


def start_sim(time_scale: float, *extra: str) -> SimProcess:
    """Start `pbmd sim --tcp 127.0.0.1:0 --control 127.0.0.1:0` and wait for `ready`."""
    return PendingSim(time_scale, *extra).wait_ready()


class SimPool:
    """Starts the next simulator while the current test runs.

    `pbmd sim` takes a second or two to import and start; every stateful test gets a
    fresh one, so the suite keeps one spare per plain time scale already starting in
    the background. A taken simulator belongs to the test (and its teardown).
    """

    def __init__(self) -> None:
        self._spares: dict[float, PendingSim] = {}

    def take(self, time_scale: float, *extra: str) -> SimProcess:
        if extra:  # one-off command lines get no spare
            return start_sim(time_scale, *extra)
        spare = self._spares.pop(time_scale, None)
        pending = spare if spare is not None else PendingSim(time_scale)
        self._spares[time_scale] = PendingSim(time_scale)
        return pending.wait_ready()

    def close(self) -> None:
        for spare in self._spares.values():
            spare.discard()
        self._spares.clear()


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

    async def arm_ready(self, token: int | None = None) -> None:
        """ARM and wait until the controller reports state 2 (emission delay over)."""
        token = new_token() if token is None else token
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


@dataclass
class Baseline:
    """What a freshly started simulator looks like; a reused one is brought back to it."""

    applicators: dict[int, tuple[int, tuple[int, ...]]]  # port -> (kind, wavelengths)
    temp_centi_c: dict[int, int]
    interlocks: int


def _fingerprint(info: PortInfo) -> tuple[int, tuple[int, ...]]:
    return info.applicator_kind, tuple(c.wavelength_nm for c in info.channels)


async def take_baseline(peer: PbmLinkPeer, ports: dict[int, PortInfo]) -> Baseline:
    t = await peer.wait_telemetry()
    return Baseline(
        {n: _fingerprint(p) for n, p in ports.items()},
        {n: t.port(n).temp_centi_c for n in ports},
        t.interlocks,
    )


async def reset_to_baseline(peer: PbmLinkPeer, control: ControlClient, base: Baseline) -> str:
    """Undo what an earlier test did to a shared simulator; '' when clean, else what is not.

    Uses its own host connection, which the next test's connection then replaces, so a
    test's stream starts clean too.
    """
    await control.call("clear")
    await control.call("interlocks", bits=base.interlocks)
    await control.call("footswitch", pressed=bool(base.interlocks & 0x08))
    await peer.hello()
    await peer.all_off()
    await peer.disarm()
    for port, print_ in base.applicators.items():
        info = await peer.get_port(port)
        if not isinstance(info, PortInfo) or _fingerprint(info) != print_:
            with contextlib.suppress(ControlError):
                await control.call("unplug", port=port)
            await control.call("plug", port=port, applicator=DEFAULT_APPLICATORS[port])
        if print_[0] == 2:
            await control.call("contact", port=port, on=True)
        await control.call("temperature", port=port, celsius=base.temp_centi_c[port] / 100)
    await peer.set_telemetry(100)
    await peer.wait_telemetry(lambda t: all(p.temp_centi_c < 4100 for p in t.ports))
    await peer.clear_fault()
    t = await peer.wait_telemetry()
    problems = []
    if (t.state, t.fault_code, t.interlocks) != (0, 0, base.interlocks):
        problems.append(f"state {t.state} fault {t.fault_code} interlocks {t.interlocks:#06b}")
    for port, rec in enumerate(t.ports, 1):
        want = 0x01 | (0x04 if base.applicators[port][0] == 2 else 0)
        if rec.flags != want:
            problems.append(f"port {port} flags {rec.flags:#06b}")
    return "; ".join(problems)
