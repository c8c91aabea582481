"""Fault campaign: many short sessions on the simulator, faults injected at random
instants in random combinations, and after each session the safety invariants,
checked against the simulated controller's own log.

Every session is a short random protocol (pads on some of ports 1-3, the 905 nm
probe's points on port 4) on a simulated controller in a process of its own
(bench/campaign/controller_log.py) whose device clock runs at ``--time-scale``.
Most sessions run on the safety core in this process (an Engine over the real
byte protocol, as in the other benchmarks); every ``--daemon-every``-th session
runs in a real `pbmd run` process, driven over its control socket, for the faults
only a process can have: SIGKILL and restart, records on a full disk, and the MQTT
broker going away.

Faults, each at a random instant of the session (several per session, or none):
every op of the simulator's fault injector (pbmd.hw_sim.faults) but ``clear``,
which is the technician's repair, so: optics (photodiode gain, calibration drift,
power factor, integrator gain, a stuck emitter), heat (over-temperature, a
temperature), the interlocks (key, remote, E-stop, footswitch, all bits at once),
probe contact, unplugging or swapping an applicator, a latched controller fault,
and the link (corruption either way, telemetry stall, late, lost or dropped
replies, the link cut); plus a host stall (the engine's event loop blocked), and in
the `pbmd run` sessions SIGKILL-and-restart, disk full (the records directory on a
tmpfs that is filled; needs root to mount it) and a broker outage (mosquitto
killed, then started again).

After each session, once the campaign has repaired what it broke (as a technician
would: the fault removed, CLEAR_FAULT, the trip acknowledged, the service latch
cleared), these invariants are checked; a violation is printed with its session:

1. no emission after a stop: the controller accepted no EMIT_START later than
   0.25 s after the session's trip or abort (or, in `pbmd run`, after the session
   said it ended or the daemon was killed), and every emission of the session had
   ended within 1 s of it;
2. within budget: no emission delivered more than its EMIT_START's energy budget,
   no budget was above the plan's for that port, and no port delivered more than
   the sum of its plan's budgets;
3. the record is complete and equals the controller: the session, its steps and
   emissions are closed, no energy is left provisional, and per port the recorded
   controller energy equals the controller's session counter (GET_COUNTERS'
   session_delivered_uj, read from the simulator) and the sum of its own
   EMISSION_ENDED energies;
4. nothing resumed by itself: between the end of a session and the next start
   the controller received no ARM and began no emission (across restarts too);
5. every stop has a cause and a message: a session that did not complete names a
   registered cause code and a message, in the record and on the session.

Spurious stops: sessions that did not complete although no fault had been injected
before they stopped. The run prints a table (sessions, faults by kind, violations,
spurious stops) and exits 1 on any violation; with ``--seed`` and ``--sessions``
it is reproducible from its command line, which it prints.

    python bench/fault_campaign.py --sessions 500 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import protocol, quiet_logs
from campaign.sim_child import SimChild

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.engine import Engine, SessionRequest, StartRefused
from pbmd.daemon.core.reconciliation import hold_for_counters
from pbmd.daemon.core.safety import EndCause, TripCause
from pbmd.daemon.core.session import Session, SessionEvent
from pbmd.daemon.services.records import RecordStore
from pbmd.drivers import codec
from pbmd.drivers.client import open_controller
from pbmd.protocols.loader import parse_protocol
from pbmd.protocols.plan import Plan, plan

HERE = Path(__file__).resolve().parent
REGISTERED = {c.code for c in TripCause} | {c.code for c in EndCause}
DEFAULT_APPLICATORS = {1: "duo_pad", 2: "duo_pad", 3: "duo_pad", 4: "probe_905"}
START_SLACK_S = 0.25
"""An EMIT_START already on the wire when the trip latched may still land this late."""
END_BOUND_S = 1.0
"""Every emission of a stopped session has ended this long after the stop (ALL_OFF,
or the controller's 250 ms watchdog when the link is gone)."""
TELEMETRY_HZ = 50

Step = tuple[float, str, dict[str, Any]]
"""(seconds after the fault's instant, op, args): one request to the simulator, or
the campaign's own ops ("host_stall", "sigkill", "disk_full", "broker_down")."""


# ------------------------------------------------------------------------ faults


def _port(rng: random.Random, ports: list[int]) -> int:
    return rng.choice(ports)


def _sim_fault(kind: str, rng: random.Random, ports: list[int]) -> list[Step]:
    """The requests one fault of `kind` makes (ports: those the session uses)."""
    p = _port(rng, ports)
    if kind == "photodiode_gain":
        return [(0.0, kind, {"port": p, "gain": rng.choice([0.5, 0.75, 0.9, 1.1, 1.3, 2.0])})]
    if kind == "calibration_drift":
        return [(0.0, kind, {"port": p, "fraction_per_hour": rng.choice([-30.0, -5.0, 5.0, 30.0])})]
    if kind == "power_factor":
        return [(0.0, kind, {"port": p, "factor": rng.choice([0.5, 0.85, 1.1, 1.3, 2.0])})]
    if kind == "integrator_gain":
        return [(0.0, kind, {"port": p, "gain": rng.choice([0.5, 0.9, 1.05, 1.5])})]
    if kind == "stuck_on":
        return [(0.0, kind, {"port": p, "on": True})]
    if kind == "over_temperature":
        return [(0.0, kind, {"port": p})]
    if kind == "temperature":
        return [(0.0, kind, {"port": p, "celsius": rng.choice([38.0, 40.9, 41.5, 45.0])})]
    if kind == "interlocks":
        return [(0.0, kind, {"bits": rng.randrange(16)})]
    if kind == "key":
        return [(0.0, kind, {"on": False})]
    if kind == "remote":
        return [(0.0, kind, {"closed": False})]
    if kind == "estop":
        return [(0.0, kind, {"pressed": True})]
    if kind == "footswitch":
        return [(0.0, kind, {"pressed": rng.random() < 0.5})]
    if kind == "contact":  # the probe lifted off the skin, then put back
        back = rng.uniform(0.05, 0.4)
        return [(0.0, kind, {"port": 4, "on": False}), (back, kind, {"port": 4, "on": True})]
    if kind == "unplug":
        return [(0.0, kind, {"port": p})]
    if kind == "plug":  # an applicator swapped for another kind
        other = "probe_830" if p == 4 else rng.choice(["probe_830", "probe_905"])
        return [(0.0, kind, {"port": p, "applicator": other})]
    if kind == "latch_fault":
        code = rng.randint(1, 5)
        return [(0.0, kind, {"code": code, "port": p, "persist": rng.random() < 0.3})]
    if kind == "telemetry_stall":
        return [(0.0, kind, {"on": True})]
    if kind == "corrupt_frames":
        rate = rng.choice([0.01, 0.05, 0.3])
        direction = rng.choice(["to_host", "to_controller", "both"])
        return [(0.0, kind, {"rate": rate, "direction": direction})]
    if kind == "reply_delay":
        return [(0.0, kind, {"ms": rng.choice([10.0, 60.0, 150.0, 400.0])})]
    if kind == "drop_replies":
        return [(0.0, kind, {"on": True})]
    if kind == "drop_next_replies":
        reply = rng.choice(["Ack", "Pong", "Stopped", "Counters"])
        return [(0.0, kind, {"count": rng.randint(1, 3), "reply": reply})]
    if kind == "drop_link":
        return [(0.0, kind, {})]
    if kind == "host_stall":
        return [(0.0, kind, {"s": rng.choice([0.05, 0.15, 0.3, 0.6])})]
    raise ValueError(f"no such fault kind {kind!r}")


ENGINE_KINDS = (
    "photodiode_gain", "calibration_drift", "power_factor", "integrator_gain", "stuck_on",
    "over_temperature", "temperature", "interlocks", "key", "remote", "estop", "footswitch",
    "contact", "unplug", "plug", "latch_fault", "telemetry_stall", "corrupt_frames",
    "reply_delay", "drop_replies", "drop_next_replies", "drop_link", "host_stall",
)  # fmt: skip
"""Every fault-injector op but ``clear`` (the repair), and a host stall."""
DAEMON_KINDS = ("sigkill", "disk_full", "broker_down")
"""Faults of the process around the core: only a real `pbmd run` can have them."""


@dataclass
class Injection:
    at_s: float
    kind: str
    steps: list[Step]


def draw_faults(rng: random.Random, kinds: tuple[str, ...], ports: list[int],
                span_s: float, most: int) -> list[Injection]:  # fmt: skip
    """None (one session in eight), else 1..`most` kinds at random instants of the span."""
    if rng.random() < 0.125:
        return []
    chosen = rng.sample(kinds, rng.randint(1, most))
    return sorted(
        (Injection(rng.uniform(0.0, span_s), k, _sim_fault(k, rng, ports)) for k in chosen),
        key=lambda i: i.at_s,
    )


# ------------------------------------------------------------------ protocols


@dataclass
class Spec:
    text: str
    ports: list[int]
    device_s: float
    """The longest port's device time."""


def draw_protocol(rng: random.Random, index: int) -> Spec:
    """Pads on one or two of ports 1-3 (one or two steps of 6-20 s of device time), and
    on half the sessions the 905 nm probe on port 4 (one or two points of 3-10 s)."""
    pads: dict[int, list[tuple[int, float, float]]] = {}
    longest = 0.0
    for number in sorted(rng.sample([1, 2, 3], rng.randint(1, 2))):
        steps, total = [], 0.0
        for nm in rng.sample([660, 830], rng.randint(1, 2)):
            irradiance = rng.choice([4.0, 6.0, 8.0, 10.0])
            seconds = rng.uniform(6.0, 20.0)
            fluence = round(irradiance * seconds / 1000, 3)
            steps.append((nm, irradiance, fluence))
            total += fluence / irradiance * 1000
        pads[number] = steps
        longest = max(longest, total)
    points: list[tuple[float, float]] = []
    if rng.random() < 0.5:
        total = 0.0
        for _ in range(rng.randint(1, 2)):
            power = rng.choice([50.0, 100.0])
            energy = round(power * rng.uniform(3.0, 10.0) / 1000, 3)
            points.append((power, energy))
            total += energy / power * 1000
        longest = max(longest, total)
    ports = sorted(pads) + ([4] if points else [])
    return Spec(protocol(pads, points, protocol_id=f"campaign-{index}"), ports, longest)


# ---------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    index: int
    where: str
    """"engine" (in this process) or "daemon" (`pbmd run`)."""
    faults: list[Injection]
    injected: list[str] = field(default_factory=list)
    """The kinds actually injected (a fault due after the session ended is not)."""
    state: str = ""
    cause: str = ""
    first_fault_s: float | None = None
    stop_s: float | None = None
    violations: list[str] = field(default_factory=list)
    refused: int = 0
    """Starts refused before this one was accepted (pressed again)."""
    evidence: list[str] = field(default_factory=list)
    """The record's emissions and the controller's log, printed with a violation."""

    def fault_began(self, kind: str) -> None:
        """The first step of a fault of ``kind`` was injected now."""
        self.injected.append(kind)
        if self.first_fault_s is None:
            self.first_fault_s = time.monotonic()

    @property
    def spurious(self) -> bool:
        if self.state == "completed":
            return False
        return self.first_fault_s is None or (
            self.stop_s is not None and self.stop_s < self.first_fault_s
        )


@dataclass
class SessionLog:
    """What the simulator logged for one session, and when the session stopped."""

    token: int
    lines: list[dict[str, Any]]
    stop_s: float
    """Monotonic time of the trip or abort (or completion)."""
    stopped: bool
    """Stopped by a trip, an abort, a kill: not completed."""


def check_emissions(log: SessionLog, budgets: dict[int, list[int]]) -> list[str]:
    """Invariants 1 and 2, from the controller's own log of one session."""
    bad: list[str] = []
    starts = [x for x in log.lines if x["k"] == "start" and x["token"] == log.token]
    ends = [x for x in log.lines if x["k"] == "end" and x["token"] == log.token]
    for s in starts:
        if log.stopped and s["t"] > log.stop_s + START_SLACK_S:
            bad.append(
                f"emission began on port {s['port']} {s['t'] - log.stop_s:.3f} s after the stop"
            )
        planned = budgets.get(s["port"], [])
        if not planned or s["budget_uj"] > max(planned):
            bad.append(
                f"port {s['port']}: EMIT_START budget {s['budget_uj']} µJ above the plan's "
                f"{max(planned, default=0)} µJ"
            )
    open_ports = Counter(s["port"] for s in starts)
    open_ports.subtract(Counter(e["port"] for e in ends))
    for port, left in open_ports.items():
        if left > 0:
            bad.append(f"port {port}: {left} emission(s) never ended")
    bound = END_BOUND_S if log.stopped else START_SLACK_S
    for e in ends:
        if e["uj"] > e["budget_uj"]:
            bad.append(f"port {e['port']}: delivered {e['uj']} µJ over its budget {e['budget_uj']}")
        if e["t"] > log.stop_s + bound:
            bad.append(
                f"port {e['port']}: emission ended {e['t'] - log.stop_s:.3f} s after the stop"
            )
    for port, planned in budgets.items():
        total = sum(e["uj"] for e in ends if e["port"] == port)
        if total > sum(planned):
            bad.append(f"port {port}: {total} µJ delivered, plan's budgets sum to {sum(planned)}")
    return bad


def check_record(record: dict[str, Any] | None, log: SessionLog,
                 counters: tuple[int, dict[int, int]]) -> list[str]:  # fmt: skip
    """Invariants 3 and 5: the record is complete and equals the controller."""
    if record is None:
        return ["no record of the session"]
    bad: list[str] = []
    if record.get("ended_utc") is None or record.get("outcome") is None:
        bad.append(f"record not closed (outcome {record.get('outcome')})")
    if record.get("outcome") != "completed":
        code, message = record.get("stop_cause_code"), record.get("stop_cause_message")
        if code not in REGISTERED or not message:
            bad.append(f"stop without a registered cause and message: {code!r} {message!r}")
    for step in record.get("steps", []):
        if step.get("outcome") is None:
            bad.append(f"port {step['port']} step {step['step_index']} has no outcome")
    recorded: Counter[int] = Counter()
    for em in record.get("emissions", []):
        if em.get("ended_utc") is None:
            bad.append(f"port {em['port']} emission {em['seq']} not closed")
        if em.get("controller_energy_source") not in ("stopped", "counters"):
            bad.append(
                f"port {em['port']} emission {em['seq']}: controller energy "
                f"{em.get('controller_energy_source')}"
            )
        recorded[int(em["port"])] += int(em.get("controller_energy_uj") or 0)
    ended: Counter[int] = Counter()
    for e in log.lines:
        if e["k"] == "end" and e["token"] == log.token:
            ended[int(e["port"])] += int(e["uj"])
    token, per_port = counters
    for port in set(recorded) | set(ended):
        if recorded[port] != ended[port]:
            bad.append(
                f"port {port}: recorded {recorded[port]} µJ, the controller's stops sum to "
                f"{ended[port]} µJ"
            )
        if token == log.token and per_port.get(port, 0) != recorded[port]:
            bad.append(
                f"port {port}: recorded {recorded[port]} µJ, controller counter "
                f"{per_port.get(port, 0)} µJ"
            )
    return bad


def check_quiet(lines: list[dict[str, Any]], what: str) -> list[str]:
    """Invariant 4: nothing armed or emitted while no session was started."""
    return [
        f"{'ARM' if x['k'] == 'rx' else 'emission on port ' + str(x['port'])} {what}"
        for x in lines
        if x["k"] == "start" or (x["k"] == "rx" and x["m"] == "Arm")
    ]


def evidence(record: dict[str, Any] | None, log: SessionLog, t0: float) -> list[str]:
    """What a violation is judged on: the record's emissions, the controller's log."""
    lines = [f"stop at +{log.stop_s - t0:.3f} s, token {log.token}"]
    for em in (record or {}).get("emissions", []):
        lines.append(
            "record: port {port} step {step_index} origin {origin} controller "
            "{controller_energy_uj} µJ ({controller_energy_source}) host {host_energy_uj} µJ "
            "stop {stop_reason} / {host_stop_cause}".format(**em)
        )
    for x in log.lines:
        what = {k: v for k, v in x.items() if k not in ("k", "t")}
        lines.append(f"controller: +{x['t'] - t0:.3f} s {x['k']} {what}")
    return lines


def report_late(out: Outcome, late: list[str]) -> None:
    """A record check made after the session's own line was printed."""
    for v in late:
        print(f"session {out.index} ({out.where}): VIOLATION: {v}", flush=True)


def plan_budgets(the_plan: Plan) -> dict[int, list[int]]:
    return {pp.port: [e.energy_budget_uj for e in pp.emissions] for pp in the_plan.ports}


# ------------------------------------------------------- the engine in-process


class EngineRig:
    """The safety core in this process on the campaign's simulator; reconnects after a
    lost link as the service does (counters reconciled before the next start)."""

    def __init__(self, sim: SimChild, store: RecordStore) -> None:
        self.sim = sim
        self.store = store
        self.engine: Engine | None = None
        self.handle: ControllerHandle | None = None
        self.confirm_tasks: set[asyncio.Task[None]] = set()
        self.quiet_from = 0
        """Index in the simulator's log where the last repair ended: from there to the
        next start nothing may arm or emit."""
        self.pending: Callable[[], Awaitable[None]] | None = None
        """The last session's record check: made once the next session has started (a
        session closed with provisional energy is settled from the counters before
        the next ARM resets them) or, for the last one, after a final reconcile."""

    async def check_pending(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            await pending()

    async def connect(self) -> None:
        client = await open_controller(self.sim.url, telemetry_hz=TELEMETRY_HZ)
        self.handle = ControllerHandle("main", client)
        if self.engine is None:
            self.engine = Engine(PortMap.single(self.handle), self.store, telemetry_hz=TELEMETRY_HZ)
            self.engine.add_listener(self._on_event)
        else:
            self.engine.port_map = PortMap.single(self.handle)
        await self.handle.wait_clock_settled(5.0)

    async def reconnect_if_lost(self, session: Session | None) -> None:
        assert self.handle is not None and self.engine is not None
        if self.handle.client.is_open:
            return
        if session is not None:
            hold_for_counters(session, self.engine.unreconciled)
        self.handle.detach()
        with contextlib.suppress(Exception):
            await self.handle.client.close()
        await self.connect()
        if self.engine.unreconciled:
            await self.engine.reconcile()

    def _on_event(self, ev: SessionEvent) -> None:
        if ev.kind == "port_waiting" and "confirm placement" in ev.message and ev.port:
            task = asyncio.get_running_loop().create_task(self._confirm(ev.port))
            self.confirm_tasks.add(task)
            task.add_done_callback(self.confirm_tasks.discard)

    async def _confirm(self, port: int) -> None:
        """The clinician confirms the placement (again, until the session takes it)."""
        assert self.engine is not None and self.handle is not None
        for _ in range(40):
            s = self.engine.session
            if s is None or s.state.final:
                return
            try:
                s.confirm(port)
                return
            except Exception:
                await self.handle.next_sample(1.0)

    async def close(self) -> None:
        if self.pending is not None and self.engine is not None:
            with contextlib.suppress(Exception):
                await self.reconnect_if_lost(self.engine.session)
                await self.store.sync()
                await self.engine.reconcile()
            await self.check_pending()
        for task in list(self.confirm_tasks):
            task.cancel()
        await asyncio.gather(*self.confirm_tasks, return_exceptions=True)
        if self.engine is not None:
            s = self.engine.session
            if s is not None and not s.state.final:
                await s.abort("campaign ended")
            await self.engine.close()
        if self.handle is not None:
            self.handle.detach()
            await self.handle.client.close()


async def repair_engine(rig: EngineRig, touched: set[int]) -> None:
    """What a technician does after a stop: remove the fault, put the applicators back,
    CLEAR_FAULT until the controller is in standby and dark, acknowledge the trip and
    clear the service latch."""
    sim = rig.sim
    await asyncio.to_thread(sim.call, "clear")
    for port in sorted(touched):
        await asyncio.to_thread(sim.call, "plug", port=port, applicator=DEFAULT_APPLICATORS[port])
        await asyncio.to_thread(sim.call, "temperature", port=port, celsius=25.0)
    engine = rig.engine
    assert engine is not None
    deadline = time.monotonic() + 20.0
    while True:
        session = engine.session
        await rig.reconnect_if_lost(session)
        assert rig.handle is not None
        with contextlib.suppress(Exception):
            await rig.handle.client.clear_fault()
        with contextlib.suppress(Exception):
            t = await rig.handle.next_sample(1.0)
            ready = (
                t.state != codec.ControllerState.FAULT  # left armed: the next start disarms
                and not t.fault_code
                and not rig.handle.lit_ports()
                and rig.handle.client.is_open
            )
            if ready:
                with contextlib.suppress(StartRefused):
                    engine.check_ready()
                    break
                if engine.unreconciled:  # as a start would (Engine._settle_previous)
                    with contextlib.suppress(Exception):
                        await engine.reconcile()
                if engine.service_required:
                    engine.clear_service_required("campaign", "fault removed", lambda: None)
                awaiting = engine.acknowledgements.awaiting
                if awaiting is not None:
                    engine.acknowledge(awaiting.cause.code, "campaign", "fault removed")
                with contextlib.suppress(StartRefused):
                    engine.check_ready()
                    break
        if time.monotonic() > deadline:
            t = rig.handle.telemetry if rig.handle is not None else None
            try:
                engine.check_ready()
                refusal = "none"
            except StartRefused as exc:
                refusal = str(exc)
            raise RepairFailed(
                f"not back to standby within 20 s: telemetry state "
                f"{t.state if t else None} fault {t.fault_code if t else None}, lit "
                f"{sorted(rig.handle.lit_ports()) if rig.handle else None}, link open "
                f"{rig.handle.client.is_open if rig.handle else None}, start refused: {refusal}"
            )


class RepairFailed(RuntimeError):
    """The campaign could not put the system back (said with what it found)."""


@dataclass
class Draw:
    """One session as drawn from the seed: where it runs, its protocol, its faults."""

    index: int
    where: str
    spec: Spec
    faults: list[Injection]

    def wall_s(self, time_scale: float) -> float:
        return self.spec.device_s / time_scale + 2.0 / time_scale


def draw_session(rng: random.Random, index: int, time_scale: float, in_daemon: bool) -> Draw:
    """Everything random about a session, drawn before it runs: the same seed gives
    the same sessions whatever happened in the earlier ones (``--from``)."""
    spec = draw_protocol(rng, index)
    wall_s = spec.device_s / time_scale + 2.0 / time_scale
    if not in_daemon:
        faults = draw_faults(rng, ENGINE_KINDS, spec.ports, wall_s * 1.2, 3)
        return Draw(index, "engine", spec, faults)
    own = rng.choice(DAEMON_KINDS)
    faults = [Injection(rng.uniform(0.05, wall_s * 0.9), own, [(0.0, own, {})])]
    if own == "broker_down":
        faults[0].steps.append((rng.uniform(0.1, 0.6), "broker_up", {}))
    if rng.random() < 0.3:
        extra = rng.choice(ENGINE_KINDS[:-1])  # no host stall: the host is another process
        faults.append(
            Injection(rng.uniform(0.0, wall_s), extra, _sim_fault(extra, rng, spec.ports))
        )
    return Draw(index, "daemon", spec, sorted(faults, key=lambda f: f.at_s))


async def engine_session(rig: EngineRig, drawn: Draw, time_scale: float) -> Outcome:
    """One session on the in-process engine, with its faults, repair and checks."""
    index, spec, faults = drawn.index, drawn.spec, drawn.faults
    wall_s = drawn.wall_s(time_scale)
    out = Outcome(index, "engine", faults)
    engine, sim = rig.engine, rig.sim
    assert engine is not None
    loaded = parse_protocol(spec.text)
    the_plan = plan(loaded.protocol, engine.port_map.applicators())
    before = await asyncio.to_thread(sim.mark)
    out.violations += check_quiet(sim.lines[rig.quiet_from : before], "between sessions")
    loop = asyncio.get_running_loop()
    touched: set[int] = set()
    request = SessionRequest(
        plan=the_plan,
        patient_ref=f"CAMPAIGN-{index}",
        contraindications={},
        contraindicated_by_protocol=frozenset(c.value for c in loaded.protocol.contraindications),
    )
    refusals: list[str] = []
    while True:  # a refusal (a momentary stale sample) is pressed again, as an operator would
        try:
            session = await engine.start_session(request)
            break
        except StartRefused as exc:
            refusals.append(str(exc))
            if len(refusals) >= 20:
                out.state, out.cause = "refused", str(exc)
                out.violations.append(f"start refused 20 times after the repair: {exc}")
                return out
            assert rig.handle is not None
            with contextlib.suppress(TimeoutError):
                await rig.handle.next_sample(1.0)
    out.refused = len(refusals)
    await rig.check_pending()
    t0 = time.monotonic()
    handles: list[asyncio.TimerHandle] = []

    def inject(f: Injection, step: Step) -> None:
        if session.state.final:
            return
        _, op, args = step
        if step is f.steps[0]:
            out.fault_began(f.kind)
        if op == "host_stall":
            time.sleep(float(args["s"]))  # the engine's loop blocked: a stalled host
            return
        if "port" in args and op in ("unplug", "plug", "temperature", "over_temperature"):
            touched.add(int(args["port"]))
        sim.send(op, **args)

    for f in faults:
        for step in f.steps:
            handles.append(loop.call_at(loop.time() + f.at_s + step[0], inject, f, step))
    timeout_s = wall_s * 4 + 15.0
    try:
        state = await asyncio.wait_for(session.wait(), timeout_s)
    except TimeoutError:
        await session.abort("campaign: the session overran its time")
        state = await session.wait()
        out.violations.append(f"session did not end by itself within {timeout_s:.0f} s")
    for h in handles:
        h.cancel()
    trip = session.supervisor.tripped
    stopped = state.value != "completed"
    stop_s = trip.monotonic_s if trip is not None else time.monotonic()
    out.state = state.value
    out.cause = f"{session.cause_code}: {session.cause_message}" if stopped else ""
    out.stop_s = stop_s if stopped else None
    if stopped and (session.cause_code not in REGISTERED or not session.cause_message):
        out.violations.append(f"stopped without a cause: {session.cause_code!r}")
    end_mark = await asyncio.to_thread(sim.mark)
    try:
        await repair_engine(rig, touched)
    except RepairFailed as exc:
        out.violations.append(f"the repair after the session failed: {exc}")
    after = await asyncio.to_thread(sim.mark)
    rig.quiet_from = after
    counters = await asyncio.to_thread(sim.counters)
    await rig.store.sync()
    record = await rig.store.get_session(session.id)
    log = SessionLog(int(record["session_token"] or 0) if record else 0, sim.lines[before:after],
                     stop_s, stopped)  # fmt: skip
    out.violations += check_emissions(log, plan_budgets(the_plan))
    out.violations += check_quiet(
        [x for x in sim.lines[end_mark:after] if x["t"] > stop_s + START_SLACK_S],
        "after the session ended (during the repair)",
    )

    async def check_later() -> None:
        await rig.store.sync()
        final = await rig.store.get_session(session.id)
        out.evidence = evidence(final, log, t0)
        late = check_record(final, log, counters)
        out.violations += late
        report_late(out, late)

    rig.pending = check_later
    return out


# ------------------------------------------------------------- pbmd run sessions


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A private mosquitto on a free port, killed and started again on demand."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            + ("user root\n" if os.geteuid() == 0 else ""),
            encoding="utf-8",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto", path="/usr/sbin:/usr/bin:/sbin:/bin") or "mosquitto"
        self.proc = subprocess.Popen(
            [exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()


class TmpfsRecords:
    """The records directory on a small tmpfs (root only), which the campaign fills."""

    SIZE_MB = 24

    def __init__(self, directory: Path) -> None:
        self.path = directory / "records"
        self.path.mkdir()
        self.mounted = False
        if os.geteuid() == 0 and shutil.which("mount"):
            res = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.SIZE_MB}m", "tmpfs", str(self.path)],
                capture_output=True,
            )
            self.mounted = res.returncode == 0
        self.filler = self.path / "filler"

    def fill(self) -> None:
        """Write until the file system is full (ENOSPC)."""
        with contextlib.suppress(OSError), open(self.filler, "ab") as f:
            block = b"\0" * (1 << 20)
            while True:
                f.write(block)
                f.flush()

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        self.free()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


class DaemonRig:
    """`pbmd run` on the campaign's simulator, driven over its control socket."""

    def __init__(self, sim: SimChild, workdir: Path, time_scale: float) -> None:
        sys.path.insert(0, str(HERE.parent / "tests"))
        sys.path.insert(0, str(HERE.parent / "tests" / "service"))
        from harness import Daemon, sign  # the service tests' harness

        self.sim = sim
        self.workdir = workdir
        self.records = TmpfsRecords(workdir)
        self.broker = Broker(workdir)
        self.broker.start()
        self.socket_path = workdir / "control.sock"
        self.config = workdir / "pbmd.toml"
        self.config.write_text(
            f"""\
state_dir = "{workdir / "state"}"

[[controllers]]
name = "main"
link = "{sim.url}"

[api]
socket = "{self.socket_path}"

[protocols]
trust_test_key = true
preload_shipped = false

[records]
path = "{self.records.path / "records.sqlite"}"
min_free_mb = 1
sync_interval_s = 0.2

[mqtt]
host = "127.0.0.1"
port = {self.broker.port}
device_id = "campaign"
reconnect_min_s = 0.2
reconnect_max_s = 1.0

[logging]
level = "info"
format = "json"
""",
            encoding="utf-8",
        )
        self._daemon_cls = Daemon
        self._sign = sign
        try:
            self.daemon = self._start()
        except BaseException:
            self.broker.close()
            self.records.close()
            raise
        self.time_scale = time_scale
        self.quiet_from = 0
        self.pending: Callable[[], None] | None = None
        """The last session's record check (see EngineRig.pending); the last one is
        made after a restart, which reconciles."""

    def _start(self) -> Any:
        d = self._daemon_cls(self.config, self.socket_path, self.workdir / "state", nice=None)
        return d.start()

    def client(self, timeout_s: float = 30.0) -> Any:
        from harness import RawClient

        return RawClient(self.socket_path, timeout_s=timeout_s)

    def install(self, spec: Spec, index: int) -> str:
        path = self.workdir / f"campaign-{index}.toml"
        path.write_text(spec.text, encoding="utf-8")
        sig = self._sign(path)
        with self.client() as c:
            c.call(
                "protocol.install",
                {
                    "content": spec.text,
                    "signature": sig.read_text(encoding="utf-8"),
                    "filename": path.name,
                },
            )
        return f"campaign-{index}"

    def record(self, session_id: str) -> dict[str, Any] | None:
        """The session's record, or None when the records hold no such session."""
        with self.client() as c:
            reply = c.request("records.show", {"session_id": session_id})
        if "error" in reply:
            return None
        return dict(reply["result"]["session"])

    def check_pending(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending()

    def restart(self) -> None:
        self.daemon = self._start()

    def repair(self, touched: set[int]) -> None:
        """The technician's repair, through pbmctl's API: fault removed, CLEAR_FAULT,
        the trip acknowledged, the service latch cleared, until the daemon is ready."""
        self.sim.call("clear")
        for port in sorted(touched):
            self.sim.call("plug", port=port, applicator=DEFAULT_APPLICATORS[port])
            self.sim.call("temperature", port=port, celsius=25.0)
        self.records.free()
        deadline = time.monotonic() + 30.0
        with self.client() as c:
            while True:
                status = c.call("status")
                ready = status["ready"]
                if ready["ok"] and not status.get("unreconciled"):
                    return
                if status.get("service_required"):
                    c.request("service.clear", {"note": "campaign: fault removed"})
                code = ready.get("code")
                if code:
                    c.request("session.acknowledge", {"code": code, "note": "fault removed"})
                c.request("controller.clear_fault", {"controller": "main"})
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pbmd did not become ready: {ready}")
                time.sleep(0.05)  # the daemon reconnects and reads again meanwhile

    def close(self) -> None:
        if self.pending is not None:
            with contextlib.suppress(Exception):
                self.daemon.stop()
                self.restart()
            self.check_pending()
        with contextlib.suppress(Exception):
            self.daemon.stop()
        self.broker.close()
        self.records.close()


def daemon_session(rig: DaemonRig, drawn: Draw) -> Outcome:
    """One session in `pbmd run`: one process fault (and maybe a controller fault)."""
    index, spec = drawn.index, drawn.spec
    wall_s = drawn.wall_s(rig.time_scale)
    faults = [
        f for f in drawn.faults if f.kind != "disk_full" or rig.records.mounted
    ]  # disk full needs the tmpfs (root)
    out = Outcome(index, "daemon", faults)
    protocol_id = rig.install(spec, index)
    loaded = parse_protocol(spec.text)
    the_plan_budgets = _daemon_budgets(spec)
    before = rig.sim.mark()
    out.violations += check_quiet(rig.sim.lines[rig.quiet_from : before], "between sessions")
    touched: set[int] = set()
    done = threading.Event()
    killed_at: list[float] = []
    lock = threading.Lock()

    def inject(f: Injection, step: Step) -> None:
        with lock:
            if done.is_set():
                return
            _, op, args = step
            if step is f.steps[0]:
                out.fault_began(f.kind)
            if op == "sigkill":
                killed_at.append(time.monotonic())
                rig.daemon.kill()
            elif op == "disk_full":
                rig.records.fill()
            elif op == "broker_down":
                rig.broker.kill()
            elif op == "broker_up":
                rig.broker.start()
            else:
                if "port" in args and op in ("unplug", "plug", "temperature", "over_temperature"):
                    touched.add(int(args["port"]))
                rig.sim.send(op, **args)

    timers: list[threading.Timer] = []
    for f in out.faults:
        for step in f.steps:
            timer = threading.Timer(f.at_s + step[0], inject, (f, step))
            timers.append(timer)
    contraindications = {c.value: False for c in loaded.protocol.contraindications}
    session_id = ""
    with rig.client(timeout_s=wall_s * 4 + 30.0) as c:
        result = c.call(
            "session.start",
            {
                "protocol": protocol_id,
                "patient_ref": f"CAMPAIGN-{index}",
                "contraindications": contraindications,
                "watch": False,
            },
        )
        session_id = str(result["session_id"])
    rig.check_pending()
    for timer in timers:
        timer.start()
    state = ""
    try:
        with rig.client(timeout_s=wall_s * 4 + 30.0) as c:
            state = _watch_confirming(c)
    except (EOFError, OSError, AssertionError):
        state = "killed"
    ended_s = time.monotonic()
    with lock:
        done.set()
    for timer in timers:
        timer.cancel()
    if killed_at:
        rig.daemon.wait_exit()
        # A link fault still injected would fail the restart's handshake (pbmd then
        # refuses to start, and says why): the controller's faults go first.
        rig.sim.call("clear")
        rig.restart()
        ended_s = killed_at[0]
    if "broker_down" in out.injected and (
        rig.broker.proc is None or rig.broker.proc.poll() is not None
    ):
        rig.broker.start()
    end_mark = rig.sim.mark()
    rig.repair(touched)
    after = rig.sim.mark()
    rig.quiet_from = after
    counters = rig.sim.counters()
    record = rig.record(session_id) or {}
    out.state = str(record.get("outcome") or state)
    stopped = out.state != "completed"
    if stopped:
        out.cause = f"{record.get('stop_cause_code')}: {record.get('stop_cause_message')}"
        out.stop_s = ended_s
    log = SessionLog(int(record.get("session_token") or 0), rig.sim.lines[before:after], ended_s,
                     stopped)  # fmt: skip
    out.violations += check_emissions(log, the_plan_budgets)
    out.violations += check_quiet(
        [x for x in rig.sim.lines[end_mark:after] if x["t"] > ended_s + START_SLACK_S],
        "after the session ended (restart and repair)",
    )

    def check_later() -> None:
        final = rig.record(session_id)
        out.evidence = evidence(final, log, out.first_fault_s or ended_s)
        late = check_record(final, log, counters)
        out.violations += late
        report_late(out, late)

    rig.pending = check_later
    return out


def _watch_confirming(c: Any) -> str:
    """Watch the running session, confirming each placement prompt; its final state."""
    result = c.call("session.watch")
    status = result.get("status") or {}
    confirmed: set[tuple[int, int]] = set()
    while True:
        for p in status.get("ports") or []:
            key = (int(p["port"]), int(p["step"]) if p.get("step") is not None else -1)
            gated = p.get("state") == "gated" and "confirm placement" in (
                p.get("wait_reason") or ""
            )
            if gated and key not in confirmed:
                confirmed.add(key)
                c.request("session.confirm", {"port": key[0]})
        if not result.get("watching", True):
            return str(status.get("state") or "")
        msg = c.next_notification()
        params = msg.get("params") or {}
        if msg["method"] == "session.ended":
            return str(params["state"])
        if msg["method"] == "session.status":
            status = params["status"]
        elif msg["method"] == "session.event":
            ev = params["event"]
            if ev["kind"] == "port_waiting" and "confirm placement" in ev["message"]:
                c.request("session.confirm", {"port": int(ev.get("port") or 0)})


def _daemon_budgets(spec: Spec) -> dict[int, list[int]]:
    """The plan's budgets as pbmd makes them, on the simulator's default applicators."""
    from pbmd.hw_sim.applicators import APPLICATORS

    loaded = parse_protocol(spec.text)
    infos = {}
    for port, name in DEFAULT_APPLICATORS.items():
        model = APPLICATORS[name]
        channels = tuple(ch.wire() for ch in model.channels)
        infos[port] = codec.PortInfo(port, int(model.kind), f"X-{port}", model.area_mm2, channels)
    return plan_budgets(plan(loaded.protocol, infos))


# ------------------------------------------------------------------------ report


def command_line(args: argparse.Namespace) -> str:
    start = f" --from {args.start_at}" if args.start_at > 1 else ""
    return (
        f"python bench/fault_campaign.py --sessions {args.sessions} --seed {args.seed} "
        f"--time-scale {args.time_scale:g} --daemon-every {args.daemon_every}{start}"
    )


def report(args: argparse.Namespace, outcomes: list[Outcome], wall_s: float) -> int:
    kinds: Counter[str] = Counter(k for o in outcomes for k in o.injected)
    violations = [(o, v) for o in outcomes for v in o.violations]
    spurious = [o for o in outcomes if o.spurious]
    states = Counter(o.state for o in outcomes)
    causes = Counter((o.cause.split(":")[0] if o.cause else "") for o in outcomes if o.cause)
    print()
    for o, v in violations:
        print(f"VIOLATION session {o.index} ({o.where}; faults {', '.join(o.injected) or '-'}; "
              f"{o.state} {o.cause}): {v}")  # fmt: skip
    for o in spurious:
        print(f"spurious stop: session {o.index} ({o.where}) {o.state} {o.cause}")
    print()
    print(
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; time scale x{args.time_scale:g}; seed {args.seed}; "
        f"wall {wall_s:.0f} s"
    )
    print(f"command: {command_line(args)}")
    print()
    engine_n = sum(1 for o in outcomes if o.where == "engine")
    print("| sessions | in-process engine | `pbmd run` | completed | stopped | "
          "invariant violations | spurious stops | wall time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {len(outcomes)} | {engine_n} | {len(outcomes) - engine_n} "
        f"| {states.get('completed', 0)} | {len(outcomes) - states.get('completed', 0)} "
        f"| {len(violations)} | {len(spurious)} | {wall_s:.0f} s |"
    )
    print()
    refused = sum(o.refused for o in outcomes)
    print(f"Starts refused and pressed again: {refused}")
    print()
    print("| fault kind | injected |")
    print("|---|---|")
    for kind in (*ENGINE_KINDS, *DAEMON_KINDS):
        print(f"| {kind} | {kinds.get(kind, 0)} |")
    print(f"| (sessions with no fault) | {sum(1 for o in outcomes if not o.injected)} |")
    print()
    print("| stop cause | sessions |")
    print("|---|---|")
    for code, n in sorted(causes.items()):
        print(f"| {code} | {n} |")
    if violations:
        print(f"\n{len(violations)} invariant violation(s); reproduce with: {command_line(args)}")
        for o in sorted({o.index: o for o, _ in violations}.values(), key=lambda o: o.index):
            one = argparse.Namespace(**{**vars(args), "sessions": o.index, "start_at": o.index})
            print(f"  session {o.index} alone: {command_line(one)} -v --evidence")
        return 1
    return 0


async def run(args: argparse.Namespace) -> int:
    quiet_logs()
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pbmd-campaign-") as tmp:
        workdir = Path(tmp)
        engine_sim = SimChild(args.time_scale, args.seed)
        daemon_sim: SimChild | None = None
        daemon: DaemonRig | None = None
        store = await RecordStore.open(workdir / "engine.sqlite3", min_free_bytes=0)
        rig = EngineRig(engine_sim, store)
        try:
            await rig.connect()
            for i in range(1, args.sessions + 1):
                in_daemon = args.daemon_every > 0 and i % args.daemon_every == 0
                drawn = draw_session(rng, i, args.time_scale, in_daemon)
                if i < args.start_at:
                    continue  # drawn, not run: the later sessions stay the same
                if in_daemon:
                    if daemon is None:
                        daemon_sim = SimChild(args.time_scale, args.seed + 1)
                        (workdir / "daemon").mkdir()
                        daemon = await asyncio.to_thread(
                            DaemonRig, daemon_sim, workdir / "daemon", args.time_scale
                        )
                        if not daemon.records.mounted:
                            print("disk full is not injected: mounting a tmpfs needs root")
                    o = await asyncio.to_thread(daemon_session, daemon, drawn)
                else:
                    o = await engine_session(rig, drawn, args.time_scale)
                outcomes.append(o)
                if args.verbose or o.violations:
                    print(f"session {i}: {o.where} faults [{', '.join(o.injected)}] -> "
                          f"{o.state} {o.cause}"[:220], flush=True)  # fmt: skip
                    for v in o.violations:
                        print(f"  VIOLATION: {v}", flush=True)
                    if o.violations and args.evidence:
                        print("\n".join(f"    {e}" for e in o.evidence), flush=True)
                elif i % 50 == 0:
                    print(f"{i} sessions, {time.monotonic() - t0:.0f} s", flush=True)
        finally:
            await rig.close()
            await store.close()
            if daemon is not None:
                await asyncio.to_thread(daemon.close)
            engine_sim.close()
            if daemon_sim is not None:
                daemon_sim.close()
    return report(args, outcomes, time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=20, help="sessions to run (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="draws of protocols and faults")
    parser.add_argument(
        "--time-scale", type=float, default=60.0, help="the simulator's device clock (default 60)"
    )
    parser.add_argument(
        "--daemon-every",
        type=int,
        default=10,
        help="every Nth session runs in `pbmd run` (SIGKILL, disk full, broker; 0: none)",
    )
    parser.add_argument(
        "--from",
        dest="start_at",
        type=int,
        default=1,
        metavar="N",
        help="draw sessions 1..N-1 but run from session N (to repeat a failing one)",
    )
    parser.add_argument(
        "--evidence", action="store_true", help="with a violation, the record and the log"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per session")
    args = parser.parse_args()
    if args.sessions < 1 or not 1 <= args.time_scale <= 120:
        parser.error("--sessions must be at least 1 and --time-scale within 1..120")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
