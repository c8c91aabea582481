"""A phased session's wall time against its schedule's critical path.

Runs a two-phase session (format v2) against a simulated controller in its own
process: phase 1, DUO pads on ports 1–3, 660 nm then 830 nm; phase 2, when every
pad emission has ended, six 905 nm probe points on port 4 (the lumbar program's
shape). Placements are confirmed the moment they are asked for (an operator's
own time is not part of a schedule). The schedule's critical path is the plan's
expected duration: the phases one after another, each as long as its longest
port. The session's time is measured from the end of the emission delay
(RUNNING) to the host's event that the last emission ended (which follows the
controller's own end), converted to device time with the clock rate the host
measured. Arming and the emission delay come before the schedule and are
printed on their own.

The engine runs as the service does (systemd/pbmd.service, `pbmd run
--realtime`): SCHED_FIFO 10 where allowed, and the simulator child inherits it
as the daemon's embedded simulator does; `--no-realtime` runs both at the
normal policy, as on a workstation where real-time scheduling is refused.

    python bench/critical_path.py [--rounds 3] [--time-scale 20] [--no-realtime]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from benchlib import Bench, TapSim, quiet_logs
from fixtures.protocols import V2_SITES, pad_step, probe_step, protocol_v2, site_v2

from pbmd.daemon.services import scheduling

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


async def run(rounds: int, time_scale: float, realtime: bool) -> int:
    quiet_logs()
    sched = scheduling.apply(realtime)
    text = phased_protocol()
    overs: list[float] = []
    failed = 0
    async with TapSim(time_scale) as sim, Bench(sim.url) as bench:
        the_plan, contraindicated = bench.plan(text)
        critical_s = the_plan.expected_duration_ms / 1000.0
        phase2_at_s = the_plan.phases[1].expected_start_ms / 1000.0
        print(
            f"critical path at x{time_scale:g}: {critical_s:.1f} s of device time "
            f"(phase 2 due at {phase2_at_s:.1f} s); telemetry {bench.telemetry_hz} Hz; "
            f"engine and simulator {sched['policy']} rt {sched['rt_priority']} nice "
            f"{sched['nice']}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'round':>5} {'arming s':>9} {'session s':>10} {'over %':>8} "
            f"{'phase 2 late s':>15} {'clock ratio':>12}"
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
            session_s = (ended - running) * ratio
            over = session_s / critical_s - 1.0
            overs.append(over)
            print(
                f"{n:5d} {(running - t0) * ratio:9.2f} {session_s:10.2f} {over * 100:+8.3f} "
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time-scale", type=float, default=20.0)
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
