"""`pbmd demo`: the simulated controller driven through the real driver, live.

The simulator listens on a loopback TCP port and the driver talks PBM-Link to
it exactly as it would to hardware. Each port runs one scripted emission that
the controller ends by itself at its energy budget; the host integrates the
measured power from telemetry over device time beside the controller's own
integral, so the two dose channels can be compared on screen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field

import structlog
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pbmd.drivers import codec
from pbmd.drivers.client import ControllerClient, open_controller
from pbmd.hw_sim import SimConfig, Simulator

TELEMETRY_HZ = 20


@dataclass(frozen=True)
class ScriptedEmission:
    """One port's emission: setpoint, and the energy at which the controller stops it."""

    port: int
    wavelength_nm: int
    power_mw: float
    energy_j: float
    pulse_hz: int = 0
    duty_permille: int = 1000

    def request(self) -> codec.EmitStart:
        planned_s = self.energy_j / (self.power_mw / 1000.0)
        return codec.EmitStart(
            port=self.port,
            wavelength_nm=self.wavelength_nm,
            mode=codec.EmitMode.PULSED if self.pulse_hz else codec.EmitMode.CONTINUOUS,
            power_uw=round(self.power_mw * 1000),
            pulse_hz=self.pulse_hz,
            duty_permille=self.duty_permille,
            energy_budget_uj=round(self.energy_j * 1e6),
            max_duration_ms=round(planned_s * 1.2 * 1000),
        )


SCRIPT = (
    # Pads over 180 cm²: 10 mW/cm² red and 15 mW/cm² infrared, 1 J/cm² each.
    ScriptedEmission(port=1, wavelength_nm=660, power_mw=1800.0, energy_j=180.0),
    ScriptedEmission(port=2, wavelength_nm=830, power_mw=2700.0, energy_j=180.0),
    ScriptedEmission(port=3, wavelength_nm=660, power_mw=1800.0, energy_j=180.0),
    # Superpulsed 905 nm probe: 200 mW average at 10 kHz (200 ns pulses, 2 ‰ duty), 4 J.
    ScriptedEmission(
        port=4, wavelength_nm=905, power_mw=200.0, energy_j=4.0, pulse_hz=10_000, duty_permille=2
    ),
)


@dataclass
class PortView:
    """What the screen shows for one port, fed by telemetry."""

    emission: ScriptedEmission
    last_time_us: int | None = None
    last_power_uw: int = 0
    host_energy_uj: float = 0.0
    controller_energy_uj: int = 0
    temp_c: float = 0.0
    emitting: bool = False
    stopped: codec.Stopped | None = None
    counters: codec.Counters | None = None
    events: list[str] = field(default_factory=list)

    def on_sample(self, device_time_us: int, sample: codec.PortSample) -> None:
        # Host dose channel: measured power (mean over each interval) × device time.
        if self.last_time_us is not None and (sample.emitting or self.emitting):
            dt_s = (device_time_us - self.last_time_us) / 1e6
            self.host_energy_uj += sample.measured_power_uw * dt_s
        self.last_time_us = device_time_us
        self.last_power_uw = sample.measured_power_uw
        self.controller_energy_uj = sample.delivered_uj
        self.temp_c = sample.temp_centi_c / 100.0
        self.emitting = sample.emitting


_SHORT_REASON: dict[int, str] = {
    codec.StopReason.HOST_STOP: "host stop",
    codec.StopReason.ENERGY_BUDGET: "budget",
    codec.StopReason.MAX_DURATION: "max time",
}


def _render(views: dict[int, PortView], state: str, device_time_s: float, note: str) -> Group:
    table = Table(
        title=f"pbmd demo — simulated controller, device time {device_time_s:7.1f} s",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    for col in ("port", "λ nm", "mW", "host J", "ctrl J", "target J", "progress", "°C", "state"):
        table.add_column(col, justify="right", no_wrap=True)
    for port, v in sorted(views.items()):
        e = v.emission
        frac = min(v.controller_energy_uj / (e.energy_j * 1e6), 1.0)
        bar = "█" * round(frac * 8) + "·" * (8 - round(frac * 8))
        if v.stopped is not None:
            status = _SHORT_REASON.get(v.stopped.stop_reason, str(v.stopped.stop_reason))
        else:
            status = "emitting" if v.emitting else "waiting"
        table.add_row(
            str(port),
            str(e.wavelength_nm),
            f"{v.last_power_uw / 1000:.0f}",
            f"{v.host_energy_uj / 1e6:.2f}",
            f"{v.controller_energy_uj / 1e6:.2f}",
            f"{e.energy_j:.1f}",
            f"{bar}{frac * 100:4.0f}%",
            f"{v.temp_c:.1f}",
            status,
        )
    return Group(table, Text(f"controller: {state}   {note}\n"))


async def run_demo(time_scale: float, console: Console) -> int:
    sim = Simulator(SimConfig(time_scale=time_scale))
    await sim.start()
    client: ControllerClient | None = None
    try:
        url = await sim.listen_tcp("127.0.0.1", 0)
        console.print(f"simulated controller on [bold]{url}[/] (time scale ×{time_scale:g})")
        client = await open_controller(url, telemetry_hz=TELEMETRY_HZ)
        info = client.info
        console.print(
            f"HELLO: {info.serial} firmware {info.firmware}, {info.port_count} ports, "
            f"watchdog {info.watchdog_ms} ms, emission delay {info.emission_delay_ms} ms"
        )
        for port, pi in sorted(client.ports.items()):
            chans = ", ".join(
                f"{c.wavelength_nm} nm ≤{c.max_power_uw / 1000:.0f} mW" for c in pi.channels
            )
            kind = codec.describe(codec.ApplicatorKind, pi.applicator_kind)
            console.print(
                f"  port {port}: {kind} {pi.applicator_serial}, {pi.area_mm2 / 100:g} cm², {chans}"
            )
        return await _drive(client, console)
    finally:
        if client is not None:
            await client.close()
        await sim.close()


async def _drive(client: ControllerClient, console: Console) -> int:
    views = {e.port: PortView(e) for e in SCRIPT}
    latest: dict[str, object] = {"state": "standby", "time_s": 0.0}
    ended: dict[int, asyncio.Event] = {e.port: asyncio.Event() for e in SCRIPT}
    ready = asyncio.Event()

    def on_telemetry(t: codec.Telemetry) -> None:
        latest["state"] = codec.describe(codec.ControllerState, t.state)
        latest["time_s"] = t.device_time_us / 1e6
        if t.state == codec.ControllerState.ARMED_READY:
            ready.set()
        for port, v in views.items():
            if port <= len(t.ports):
                v.on_sample(t.device_time_us, t.ports[port - 1])

    def on_event(ev: codec.Event) -> None:
        if ev.code == codec.EventCode.EMISSION_ENDED and ev.port in ended:
            ended[ev.port].set()

    client.add_telemetry_listener(on_telemetry)
    client.add_event_listener(on_event)
    note = "arming: emission indicator on, waiting out the emission delay"
    with Live(console=console, refresh_per_second=8) as live:

        async def refresh() -> None:
            while True:
                live.update(
                    _render(views, str(latest["state"]), float(str(latest["time_s"])), note)
                )
                await asyncio.sleep(0.125)  # screen refresh cadence, not synchronisation

        painter = asyncio.create_task(refresh(), name="demo-refresh")
        try:
            await client.arm(secrets.randbelow(0xFFFF_FFFE) + 1)
            await asyncio.wait_for(ready.wait(), timeout=30)
            note = "emitting; the controller ends each emission at its energy budget"
            for e in SCRIPT:
                await client.emit_start(e.request())
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in ended.values())), 600)
            # The sample after the last stop carries the tail of each emission.
            tail = asyncio.Event()
            client.add_telemetry_listener(lambda _t: tail.set())
            await asyncio.wait_for(tail.wait(), timeout=5)
            for port, v in views.items():
                v.stopped = await client.emit_stop(port)  # idempotent: the last emission
                v.counters = await client.get_counters(port)
            note = "all emissions ended; disarmed"
            await client.disarm()
        finally:
            painter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await painter
            live.update(_render(views, str(latest["state"]), float(str(latest["time_s"])), note))
    _summary(views, console)
    return 0


def _summary(views: dict[int, PortView], console: Console) -> None:
    table = Table(title="controller STOPPED vs host integral")
    for col in ("port", "stop reason", "duration s", "ctrl J", "host J", "host−ctrl %"):
        table.add_column(col, justify="right", no_wrap=True)
    for port, v in sorted(views.items()):
        if v.stopped is None:
            continue
        ctrl_j = v.stopped.delivered_uj / 1e6
        host_j = v.host_energy_uj / 1e6
        diff = (host_j - ctrl_j) / ctrl_j * 100 if ctrl_j else 0.0
        table.add_row(
            str(port),
            codec.describe(codec.StopReason, v.stopped.stop_reason),
            f"{v.stopped.duration_ms / 1000:.2f}",
            f"{ctrl_j:.3f}",
            f"{host_j:.3f}",
            f"{diff:+.2f}",
        )
    console.print(table)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo", help="run the simulated controller through the driver and show live telemetry"
    )
    p.add_argument("--time-scale", type=float, default=10.0, help="device clock speed-up (1..120)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    console = Console()
    try:
        return asyncio.run(run_demo(args.time_scale, console))
    except KeyboardInterrupt:
        console.print("interrupted: the simulator stops all emission when the link closes")
        return 130
