"""CPU per port-sample of the telemetry path.

Four ports emit (three pads and the probe) against a simulated controller in its
own process, at 50 and at 100 telemetry frames per second (one frame carries a
sample of every port). Over a window of wall time the engine process's CPU time
is measured, and three figures are printed per port-sample:

- process: all CPU of the engine's process while the session runs (reading the
  socket, decoding, dispatch, the dose integrator and every check, records,
  heartbeats, the writer thread) divided by the port-samples received;
- idle link: the same process with the link up but no session (transport,
  decoding, dispatch, heartbeats): what the engine adds is the difference;
- engine callbacks: CPU inside the controller handle's telemetry callback alone
  (clock mapping, the four port runners' integration, ceilings, deviation,
  channel comparison, stop scheduling, the session's controller checks).

(At 200 Hz the staleness limit, 5 periods, is 25 ms: on a loaded 2-core machine
a scheduling gap that long trips the session, as it should.)

    python bench/cpu_per_sample.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

from benchlib import TapSim, protocol, quiet_logs

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.engine import Engine, SessionRequest
from pbmd.daemon.core.session import SessionEvent
from pbmd.daemon.services.records import RecordStore
from pbmd.drivers import codec
from pbmd.drivers.client import open_controller
from pbmd.protocols.loader import parse_protocol
from pbmd.protocols.plan import plan

TEXT = protocol(
    {1: [(660, 4.0, 6.0)], 2: [(660, 4.0, 6.0)], 3: [(830, 4.0, 6.0)]},
    [(10.0, 4.0)],
    protocol_id="bench-cpu",
)


class TimedHandle(ControllerHandle):
    """A controller handle that accounts the CPU of its telemetry callback."""

    def __init__(self, name: str, client: object) -> None:
        self.callback_ns = 0
        self.callbacks = 0
        super().__init__(name, client)  # type: ignore[arg-type]

    def _on_telemetry(self, t: codec.Telemetry) -> None:
        start = time.thread_time_ns()
        super()._on_telemetry(t)
        self.callback_ns += time.thread_time_ns() - start
        self.callbacks += 1


async def window(handle: TimedHandle, seconds: float) -> tuple[float, int, float]:
    """(process CPU s, frames, callback CPU s) over `seconds` of wall time."""
    cpu0, n0, cb0 = time.process_time(), handle.telemetry_count, handle.callback_ns
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await handle.next_sample(1.0)
    return (
        time.process_time() - cpu0,
        handle.telemetry_count - n0,
        (handle.callback_ns - cb0) / 1e9,
    )


async def measure(rate_hz: int, seconds: float) -> None:
    # Real time (x1): the per-sample work does not depend on the time scale, and the
    # simulator's physics stays cheap, so it cannot starve the machine.
    async with TapSim(1.0) as sim:
        client = await open_controller(sim.url, telemetry_hz=rate_hz)
        handle = TimedHandle("main", client)
        with tempfile.TemporaryDirectory() as tmp:
            store = await RecordStore.open(Path(tmp) / "r.sqlite3", min_free_bytes=0)
            engine = Engine(PortMap.single(handle), store, telemetry_hz=rate_hz)
            emitting: set[int] = set()
            all_emitting = asyncio.Event()

            def on_event(ev: SessionEvent) -> None:
                s = engine.session
                if ev.kind == "port_waiting" and "confirm placement" in ev.message:
                    assert s is not None and ev.port is not None
                    port = ev.port

                    def confirm() -> None:
                        with contextlib.suppress(Exception):
                            s.confirm(port)

                    asyncio.get_running_loop().call_soon(confirm)
                if ev.kind == "emission_started" and ev.port is not None:
                    emitting.add(ev.port)
                    if len(emitting) == 4:
                        all_emitting.set()

            engine.add_listener(on_event)
            await handle.wait_clock_settled(5.0)
            idle = await window(handle, seconds)
            loaded = parse_protocol(TEXT)
            session = await engine.start_session(
                SessionRequest(
                    plan=plan(loaded.protocol, engine.port_map.applicators()),
                    patient_ref="BENCH",
                    contraindications={},
                    contraindicated_by_protocol=frozenset(
                        c.value for c in loaded.protocol.contraindications
                    ),
                )
            )
            await asyncio.wait_for(all_emitting.wait(), 10.0)
            assert not session.state.final, session.cause_message
            busy = await window(handle, seconds)
            assert not session.state.final, session.cause_message
            await session.abort("bench done")
            await store.close()
        handle.detach()
        await client.close()
    ports = 4
    for label, (cpu_s, frames, cb_s) in (("idle link", idle), ("session", busy)):
        print(
            f"  {rate_hz:3d} Hz {label:9}: {frames} frames in {seconds:g} s; process CPU "
            f"{cpu_s / seconds * 100:5.1f} % = {cpu_s / max(frames * ports, 1) * 1e6:6.1f} µs "
            f"per port-sample; engine callbacks {cb_s / max(frames * ports, 1) * 1e6:6.1f} µs "
            "per port-sample"
        )
    extra = (busy[0] / max(busy[1], 1) - idle[0] / max(idle[1], 1)) / ports
    print(
        f"  {rate_hz:3d} Hz engine's share (session − idle link): "
        f"{extra * 1e6:.1f} µs per port-sample"
    )


async def run(seconds: float) -> None:
    quiet_logs()
    print(
        "CPU per port-sample of the telemetry path "
        "(4 ports emitting, simulator in its own process):"
    )
    for rate in (50, 100):
        await measure(rate, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window")
    args = parser.parse_args()
    asyncio.run(run(args.seconds))


if __name__ == "__main__":
    main()
