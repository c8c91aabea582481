"""Time from a fault becoming observable to ALL_OFF on the wire, with and without load.

Each trial starts a session (a pad on port 1 and the 905 nm probe on port 4, both
emitting), breaks something through the simulator's fault API, and measures from
the moment the fault became observable to the moment the controller received
ALL_OFF (the simulator runs in its own process and stamps what it receives on the
system-wide monotonic clock):

- key off, over-temperature: the controller sending the EVENT that reports it
  (INTERLOCK_CHANGED, FAULT);
- photodiode gain 0.7 (power deviation): the arrival at the host of the first
  telemetry sample showing measured power more than 20 % off the setpoint;
- telemetry stall: the staleness deadline, 5 sample periods after the last sample.

Loads: none; a CPU-bound thread in the engine's process (GIL contention); two
CPU-bound processes (the 2-core box saturated); a task flooding session.status()
and JSON encoding (API clients polling).

    python bench/trip_latency.py [--trials 20] [--time-scale 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from benchlib import Bench, TapSim, protocol, quiet_logs, summary

from pbmd.drivers import codec

TEXT = protocol({1: [(660, 4.0, 6.0)]}, [(50.0, 4.0)], protocol_id="bench-trip")
SETPOINT_UW = 720_000


class Fault:
    def __init__(self, name: str, op: str, args: dict[str, Any], observed: str) -> None:
        self.name = name
        self.op = op
        self.args = args
        self.observed = observed  # "event", "telemetry" or "stale"


FAULTS = [
    Fault("key off", "key", {"on": False}, "event"),
    Fault("over-temperature", "over_temperature", {"port": 1}, "event"),
    Fault("power deviation", "photodiode_gain", {"port": 1, "gain": 0.7}, "telemetry"),
    Fault("telemetry stall", "telemetry_stall", {"on": True}, "stale"),
]


@contextlib.asynccontextmanager
async def load(kind: str, bench: Bench) -> AsyncIterator[None]:
    if kind == "none":
        yield
    elif kind == "cpu thread":
        stop = threading.Event()

        def burn() -> None:
            x = 0
            while not stop.is_set():
                for _ in range(10_000):
                    x += 1

        thread = threading.Thread(target=burn, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
    elif kind == "cpu processes":
        procs = [
            await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
            for _ in range(2)
        ]
        try:
            yield
        finally:
            for p in procs:
                p.kill()
                await p.wait()
    elif kind == "status flood":
        calls = 0

        async def flood() -> None:
            nonlocal calls
            while True:
                s = bench.engine.session
                if s is not None:
                    json.dumps(s.status(), default=str)
                    calls += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(flood())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    else:
        raise ValueError(kind)


async def trial(
    sim: TapSim,
    bench: Bench,
    fault: Fault,
    arrivals: list[tuple[float, codec.Telemetry]],
    written: list[float],
) -> tuple[float, float] | None:
    """One trip: (observable → ALL_OFF written by the engine, → received by the controller),
    or None if the session tripped on its own before the fault was injected."""
    the_plan, contraindicated = bench.plan(TEXT)
    session = await bench.start(the_plan, contraindicated)
    t_start = time.monotonic()
    for port in (1, 4):
        await bench.wait_event(
            lambda e, p=port: (
                e.session_id == session.id
                and (
                    (e.kind == "emission_started" and e.port == p)
                    or (e.kind == "state" and e.data.get("to") in ("faulted", "aborted"))
                )
            ),
            10.0,
            t_start,
        )
    for _ in range(3):
        await bench.handle.next_sample(1.0)
    if session.state.final or session.supervisor.tripped is not None:
        # Tripped before the fault was injected (e.g. telemetry late under load):
        # reported, then the controller is put back for the next trial.
        await session.wait()
        await restore(sim, bench, time.monotonic())
        return None
    t_req = time.monotonic()
    sim.inject(fault.op, **fault.args)
    t_inject = await sim.wait(lambda k, w: k == "inject", 5.0, t_req)
    t_off = await sim.wait(lambda k, w: k == "rx" and w == "AllOff", 5.0, t_req)
    await session.wait()
    if fault.observed == "event":
        observed = await sim.wait(lambda k, w: k == "tx" and w.startswith("Event"), 5.0, t_inject)
    elif fault.observed == "telemetry":
        observed = next(
            t
            for t, tm in arrivals
            if t >= t_inject and abs(tm.ports[0].measured_power_uw / SETPOINT_UW - 1) > 0.2
        )
    else:
        last = max(t for t, _ in arrivals if t <= t_off)
        observed = last + 5 / bench.telemetry_hz
    await restore(sim, bench, t_off)
    t_written = next(t for t in written if t >= t_req)
    return t_written - observed, t_off - observed


async def restore(sim: TapSim, bench: Bench, after: float) -> None:
    """Put everything back for the next trial."""
    sim.inject("clear")
    sim.inject("temperature", port=1, celsius=25.0)
    await sim.wait(lambda k, w: k == "inject" and w == "temperature", 5.0, after)
    while True:
        with contextlib.suppress(Exception):
            await bench.client.clear_fault()
        t = await bench.handle.next_sample(2.0)
        if (
            t.state == codec.ControllerState.STANDBY
            and not t.fault_code
            and not any(p.emitting or p.measured_power_uw for p in t.ports)
        ):
            break
    bench.engine.service_required = None


def tap_writes(bench: Bench, written: list[float]) -> None:
    """Stamp every ALL_OFF the engine hands to the socket (the host's side of the wire)."""
    link = bench.client.link
    write = link.write

    async def stamped(data: bytes) -> None:
        frames = codec.StreamDecoder().feed(data)
        if frames and frames[0].msg_type == codec.AllOff.TYPE:
            written.append(time.monotonic())
        await write(data)

    link.write = stamped  # type: ignore[method-assign]


async def run(trials: int, time_scale: float, loads: list[str]) -> None:
    quiet_logs()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    early: list[str] = []
    async with TapSim(time_scale) as sim, Bench(sim.url) as bench:
        written: list[float] = []
        tap_writes(bench, written)
        arrivals: list[tuple[float, codec.Telemetry]] = []
        bench.client.add_telemetry_listener(lambda t: arrivals.append((time.monotonic(), t)))
        # (registered after the handle's listener: its stamp is a few µs late, never early)
        for kind in loads:
            async with load(kind, bench):
                for fault in FAULTS:
                    for _ in range(trials):
                        arrivals.clear()
                        latency = await trial(sim, bench, fault, arrivals, written)
                        if latency is None:
                            s = bench.engine.session
                            early.append(f"{kind}: {s.cause_message if s else '?'}")
                            continue
                        results.setdefault((kind, fault.name), []).append(latency)
    for line in early:
        print(f"session tripped before the injection (not counted): {line}")
    for i, what in enumerate(("written by the engine", "received by the controller")):
        print(
            f"trip latency, fault observable → ALL_OFF {what} "
            f"(x{time_scale:g}, telemetry 50 Hz, simulator in its own process), ms:"
        )
        for (kind, name), pairs in results.items():
            values = [pair[i] for pair in pairs]
            print(f"  {kind:14} {name:18} {summary(values, scale=1000, fmt='.2f')}")
        for kind in loads:
            values = [pair[i] for (k, _), ps in results.items() if k == kind for pair in ps]
            print(f"  {kind:14} {'all faults':18} {summary(values, scale=1000, fmt='.2f')}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20, help="per fault and load")
    parser.add_argument("--time-scale", type=float, default=60.0)
    parser.add_argument(
        "--loads",
        default="none,cpu thread,cpu processes,status flood",
        help="comma-separated: none, cpu thread, cpu processes, status flood",
    )
    args = parser.parse_args()
    asyncio.run(run(args.trials, args.time_scale, [s.strip() for s in args.loads.split(",")]))


if __name__ == "__main__":
    main()
