"""The embedded simulator (link = "sim") as a process of its own, as real hardware would be.

Its physics, timers and sockets run in `pbmd sim`, a child process, so that they
never share the daemon's event loop or GIL with the safety core (a simulator in
the daemon's loop delayed telemetry and stops on a loaded machine; see
docs/performance.md, "Isolation of the safety core"). The child prints its link
and control addresses and ``ready`` (hw_sim/cli.py); it dies with the daemon
(``--exit-with-parent``), and its death is a lost link, as a controller's would be.
It asks for real-time scheduling (``--realtime``) above the daemon's own: a real
controller has a processor of its own and never waits for the workstation's CPU,
so the simulator's stalls on a busy machine must not read as link faults (E201).
Where that is not allowed it says so and runs at normal priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import structlog

from pbmd.daemon.services import config as cfg
from pbmd.hw_sim.usb_backend import SimulatedUsbDevice, device_url, shared_backend

log = structlog.get_logger()

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


class SimStartError(Exception):
    """The simulator process did not come up; the message says what it printed."""


class SimProcess:
    """One `pbmd sim` child: its pid, link URL and (when configured) control address."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, control: str | None) -> None:
        self.proc = proc
        self.url = url
        self.control_address = control
        self.usb_device: SimulatedUsbDevice | None = None
        """With transport = "usb": the device on this process's simulated USB bus."""

    def plug_usb(self) -> None:
        """Appear on the daemon's simulated USB bus (hw_sim/usb_backend.py), carrying the
        bytes to the child over its TCP link; the link URL becomes the usb:// one."""
        device = SimulatedUsbDevice(self.url, self.serial)
        self.usb_device = shared_backend().attach(device)
        self.url = device_url(device)

    serial: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    @classmethod
    async def start(cls, opts: cfg.SimOptions) -> SimProcess:
        """Spawn `pbmd sim` with these options and wait for its ``ready`` line."""
        argv = [sys.executable, "-m", "pbmd.daemon.cli", "sim", "--exit-with-parent", "--realtime"]
        argv += ["--pty"] if opts.transport == "pty" else ["--tcp", "127.0.0.1:0"]
        argv += ["--time-scale", repr(opts.time_scale), "--seed", str(opts.seed)]
        argv += ["--emission-delay-ms", str(opts.emission_delay_ms), "--serial", opts.serial]
        for number, name in opts.port_map().items():
            argv += ["--port", f"{number}={name or 'none'}"]
        argv += ["--no-control"] if opts.control is None else ["--control", opts.control]
        # Its own session: a Ctrl-C meant for the daemon must not reach the controller.
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            url, control = await asyncio.wait_for(_read_ready(proc), READY_TIMEOUT_S)
        except (TimeoutError, SimStartError) as exc:
            await _kill(proc)
            err = b"" if proc.stderr is None else await proc.stderr.read()
            said = err.decode(errors="replace").strip() or "nothing"
            raise SimStartError(f"{exc or 'no ready line in time'}; it said: {said}") from None
        sim = cls(proc, url, control)
        sim.serial = opts.serial
        if opts.transport == "usb":
            sim.plug_usb()
        # Drain its output from now on: a full pipe would stall the simulator.
        sim._drain = asyncio.create_task(_drain(proc), name=f"sim-{proc.pid}-output")
        return sim

    async def close(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; reaped either way."""
        if self.usb_device is not None:
            shared_backend().remove(self.usb_device)
            self.usb_device = None
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("controller.sim_kill", pid=self.pid)
                await _kill(self.proc)
        await self.proc.wait()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain

    _drain: asyncio.Task[None]


async def _read_ready(proc: asyncio.subprocess.Process) -> tuple[str, str | None]:
    assert proc.stdout is not None
    url: str | None = None
    control: str | None = None
    while True:
        line = (await proc.stdout.readline()).decode(errors="replace").strip()
        if not line:
            raise SimStartError(f"the simulator exited (status {await proc.wait()})")
        key, _, value = line.partition(" ")
        if key == "link":
            url = value
        elif key == "control":
            control = value
        elif key == "ready" and url is not None:
            return url, control


async def _drain(proc: asyncio.subprocess.Process) -> None:
    async def copy(stream: asyncio.StreamReader | None, level: str) -> None:
        if stream is None:
            return
        while line := await stream.readline():
            getattr(log, level)("controller.sim_output", pid=proc.pid, line=line.decode().rstrip())

    await asyncio.gather(copy(proc.stdout, "info"), copy(proc.stderr, "warning"))


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()
