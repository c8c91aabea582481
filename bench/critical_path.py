"""A phased session's wall time against its schedule's critical path.

Runs a two-phase session (format v2) against a simulated controller in its own
process: phase 1, DUO pads on ports 1–3, 660 nm then 830 nm; phase 2, when every
pad emission has ended, six 905 nm probe points on port 4 (the lumbar program's
shape). Placements are confirmed the moment they are asked for (an operator's
own time is not part of a schedule). The session's time is measured from the
end of the emission delay (RUNNING) to the host's event that the last emission
ended (which follows the controller's own end), converted to device time with
the clock rate the host measured. It is compared with two critical paths (the
phases one after another, each as long as its longest port):

- planned: the plan's, every step at its setpoint power;
- realised (the bound applies here): the same schedule with each step as long
  as the controller actually emitted for it. Energy-dosed steps of a warming
  pad take longer than planned (the simulator's LEDs lose power as they warm,
  as real ones do, and the dose is still delivered in full); no scheduler can
  win that time back, so the difference is the scheduler's own: the waits
  between steps and phases.

Arming and the emission delay come before the schedule and are printed on
their own.

The engine runs as the service does (systemd/pbmd.service, `pbmd run
--realtime`): SCHED_FIFO 10 where allowed, and the simulator child inherits it
as the daemon's embedded simulator does; `--no-realtime` runs both at the
normal policy, as on a workstation where real-time scheduling is refused.

    python bench/critical_path.py [--rounds 1] [--time-scale 5] [--no-realtime]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

from benchlib import Bench, TapSim, quiet_logs
from fixtures.protocols import V2_SITES, pad_step, probe_step, protocol_v2, site_v2

from pbmd.daemon.services import scheduling
from pbmd.protocols.plan import Plan
from pbmd.protocols.schedule import Item, build

BOUND = 0.005
"""The session may take at most 0.5 % longer than the critical path (issue 13)."""

SITES = V2_SITES + "".join(
    site_v2(f"point-{n}", f"probe point {n}", region)
    for n, region in enumerate(
        (
            "l3-l4-facet-left",
            "l3-l4-facet-right",
            "l4-l5-facet-right",
            "l5-s1-facet-right",
        ),
        1,
    )
)
POINTS = ("l4-left", "l5-left", "point-1", "point-2", "point-3", "point-4")


def phased_protocol() -> str:
    """Pads 3 J/cm² at 10 mW/cm² per wavelength (300 s each); then 4 J per point at
    50 mW (80 s each): 600 s + 480 s of critical path."""
    pads = {
        n: [
            pad_step(site=s, nm=nm, irradiance=10.0, fluence=3.0, phase="pads", assumption="Bench.")
            for nm in (660, 830)
        ]
        for n, s in ((1, "left"), (2, "right"), (3, "upper"))
    }
    probe = [probe_step(site=s, energy_j=4.0, phase="probe", assumption="Bench.") for s in POINTS]
    return protocol_v2(
        [("pads", "Pads, 660 then 830 nm"), ("probe", "Probe points, after the pads")],
        {**pads, 4: probe},
        SITES,
        protocol_id="bench-critical-path",
    )


def realised_path(the_plan: Plan, steps: list[dict[str, Any]]) -> tuple[float, float]:
    """The critical path (and phase 2's start) of the same schedule with each step as
    long as the controller actually emitted for it: the time no scheduler can beat."""
    phase_of = {(e.port, e.step_index): e.phase for p in the_plan.ports for e in p.emissions}
    timeline = build(
        [(p.id, p.title) for p in the_plan.phases],
        (
            Item(
                s["port"],
                s["step_index"],
                phase_of[(s["port"], s["step_index"])],
                float(s["emitting_time_s"]),
                s["site"],
            )
            for s in steps
        ),
    )
    return timeline.critical_path_s, timeline.phases[1].start_s


async def run(rounds: int, time_scale: float, realtime: bool) -> int:
    quiet_logs()
    sched = scheduling.apply(realtime)
    text = phased_protocol()
    overs: list[float] = []
    failed = 0
    async with TapSim(time_scale) as sim, Bench(sim.url) as bench:
        the_plan, contraindicated = bench.plan(text)
        planned_s = the_plan.expected_duration_ms / 1000.0
        print(
            f"x{time_scale:g}: planned critical path {planned_s:.1f} s of device time "
            f"(phase 2 at {the_plan.phases[1].expected_start_ms / 1000:.1f} s); telemetry "
            f"{bench.telemetry_hz} Hz; engine and simulator {sched['policy']} rt "
            f"{sched['rt_priority']} nice {sched['nice']}; {os.cpu_count()} CPUs, load "
            f"average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'round':>5} {'arming s':>9} {'realised s':>11} {'session s':>10} "
            f"{'vs planned %':>13} {'vs realised %':>14} {'phase 2 late s':>15} "
            f"{'clock ratio':>12}"
        )
        for n in range(1, rounds + 1):
            t0 = time.monotonic()
            session = await bench.start(the_plan, contraindicated)
            state = await session.wait()
            if state.value != "completed":
                failed += 1
                print(f"{n:5d} session {state.value}: {session.cause_message}")
                continue
            ratio = bench.handle.clock.ratio
            mine = [(t, e) for t, e in bench.events if e.session_id == session.id]
            running = next(
                t for t, e in mine if e.kind == "state" and e.data.get("to") == "running"
            )
            ended = max(t for t, e in mine if e.kind == "emission_ended")
            phase2 = next(
                t for t, e in mine if e.kind == "phase_started" and e.data.get("phase") == 1
            )
            await bench.store.sync()
            record = await bench.store.get_session(session.id)
            assert record is not None
            realised_s, phase2_at_s = realised_path(the_plan, record["steps"])
            session_s = (ended - running) * ratio
            over = session_s / realised_s - 1.0
            overs.append(over)
            print(
                f"{n:5d} {(running - t0) * ratio:9.2f} {realised_s:11.2f} {session_s:10.2f} "
                f"{(session_s / planned_s - 1) * 100:+13.3f} {over * 100:+14.3f} "
                f"{(phase2 - running) * ratio - phase2_at_s:+15.3f} {ratio:12.4f}"
            )
    if overs:
        print(
            f"session time over the critical path: mean {statistics.fmean(overs) * 100:+.3f} %, "
            f"max {max(overs) * 100:+.3f} % (bound +{BOUND * 100:g} %)"
        )
    ok = not failed and bool(overs) and max(overs) <= BOUND
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=5.0,
        help="device clock rate (default 5: every ms of host delay is 5 ms of device time)",
    )
    parser.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        help="do not ask for SCHED_FIFO (default: ask, as the service does)",
    )
    args = parser.parse_args()
    raise SystemExit(asyncio.run(run(args.rounds, args.time_scale, args.realtime)))


if __name__ == "__main__":
    main()
