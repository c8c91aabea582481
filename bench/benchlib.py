"""Shared parts of the engine benchmarks: a simulated controller in its own process,
an engine on it, and synthetic protocols (`protocol`, from tests/fixtures/protocols.py).

The simulator runs in a child process (bench/sim_tap.py) so that it never shares
an event loop or a GIL with the engine under test, as a real controller would not.
That child stamps, with the system-wide monotonic clock (comparable between
processes on Linux), every host request it receives and every fault injected,
and prints them; the engine's own stamps use the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.engine import Engine, SessionRequest
from pbmd.daemon.core.session import Session, SessionEvent
from pbmd.daemon.services.records import RecordStore
from pbmd.drivers.client import ControllerClient, open_controller
from pbmd.protocols.loader import parse_protocol
from pbmd.protocols.plan import Plan, plan

HERE = Path(__file__).resolve().parent

# The protocol texts are the tests' (tests/fixtures/protocols.py), written once.
sys.path.insert(0, str(HERE.parent / "tests"))
from fixtures.protocols import bench_protocol  # noqa: E402

protocol = bench_protocol


def _drop(*_: object) -> Any:
    raise structlog.DropEvent


def quiet_logs() -> None:
    """No log output: the figures are the output (and logging costs time)."""
    structlog.configure(processors=[_drop])
    logging.basicConfig(level=logging.CRITICAL + 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 1)) - 1))
    return ordered[k]


def summary(values: Sequence[float], unit: str = "", scale: float = 1.0, fmt: str = ".3f") -> str:
    if not values:
        return "n=0"
    v = [x * scale for x in values]
    return (
        f"n={len(v)} p50={percentile(v, 0.5):{fmt}}{unit} p95={percentile(v, 0.95):{fmt}}{unit} "
        f"p99={percentile(v, 0.99):{fmt}}{unit} max={max(v):{fmt}}{unit} "
        f"mean={statistics.fmean(v):{fmt}}{unit}"
    )


class TapSim:
    """bench/sim_tap.py in a child process: PBM-Link over TCP, faults over stdin."""

    def __init__(self, time_scale: float, seed: int = 1, rt_priority: int = 0) -> None:
        self.time_scale = time_scale
        self.seed = seed
        self.rt_priority = rt_priority
        """If > 0, the child runs SCHED_FIFO at this priority, as a controller's own MCU
        would not wait for the host's CPU (needs CAP_SYS_NICE)."""
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.lines: list[tuple[str, float, str]] = []
        self._waiters: list[tuple[Callable[[str, str], bool], asyncio.Future[float]]] = []
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TapSim:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "sim_tap.py"),
            str(self.time_scale),
            str(self.seed),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        if self.rt_priority > 0:
            param = os.sched_param(self.rt_priority)
            os.sched_setscheduler(self.proc.pid, os.SCHED_FIFO, param)
        while True:
            line = (await self.proc.stdout.readline()).decode().split()
            if not line:
                raise RuntimeError("sim_tap exited")
            if line[0] == "link":
                self.url = line[1]
                break
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5.0)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                return
            kind, stamp, what = raw.decode().rstrip("\n").split(" ", 2)
            t = float(stamp)
            self.lines.append((kind, t, what))
            for waiter in list(self._waiters):
                pred, fut = waiter
                if not fut.done() and pred(kind, what):
                    fut.set_result(t)
                    self._waiters.remove(waiter)

    def inject(self, op: str, **args: Any) -> None:
        """A fault-injector call in the simulator process (stamped there)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")

    async def wait(self, pred: Callable[[str, str], bool], timeout_s: float, after: float) -> float:
        """Monotonic time of the first line at/after `after` matching `pred`."""
        for kind, t, what in self.lines:
            if t >= after and pred(kind, what):
                return t
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        def check(kind: str, what: str) -> bool:
            return pred(kind, what)

        self._waiters.append((check, fut))
        t = await asyncio.wait_for(fut, timeout_s)
        return t

    async def link_counters(self) -> dict[str, Any]:
        """The simulator's link counters (frames sent, corrupted each way, dropped)."""
        after = time.monotonic()
        self.inject("link_counters")
        t = await self.wait(lambda k, w: k == "counters", 5.0, after)
        what = next(w for k, stamp, w in self.lines if k == "counters" and stamp == t)
        counters: dict[str, Any] = json.loads(what)
        return counters


@dataclass
class Bench:
    """An engine on a TapSim, confirming every placement when asked."""

    url: str
    telemetry_hz: int = 50
    client: ControllerClient = field(init=False)
    handle: ControllerHandle = field(init=False)
    store: RecordStore = field(init=False)
    engine: Engine = field(init=False)
    events: list[tuple[float, SessionEvent]] = field(init=False, default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] = field(init=False)
    _done: asyncio.Event | None = field(init=False, default=None)

    async def __aenter__(self) -> Bench:
        self._tmp = tempfile.TemporaryDirectory(prefix="pbmd-bench-")
        self.client = await open_controller(self.url, telemetry_hz=self.telemetry_hz)
        self.handle = ControllerHandle("main", self.client)
        self.store = await RecordStore.open(Path(self._tmp.name) / "r.sqlite3", min_free_bytes=0)
        self.engine = Engine(
            PortMap.single(self.handle), self.store, telemetry_hz=self.telemetry_hz
        )
        self.engine.add_listener(self._on_event)
        await self.handle.wait_clock_settled(5.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        s = self.engine.session
        if s is not None and not s.state.final:
            await s.abort("bench ended")
        await self.store.close()
        self.handle.detach()
        await self.client.close()
        self._tmp.cleanup()

    def _on_event(self, ev: SessionEvent) -> None:
        self.events.append((time.monotonic(), ev))
        if ev.kind == "port_waiting" and "confirm placement" in ev.message:
            s = self.engine.session
            assert s is not None and ev.port is not None
            port = ev.port
            asyncio.get_running_loop().call_soon(lambda: _confirm(s, port))

    def plan(self, text: str) -> tuple[Plan, frozenset[str]]:
        loaded = parse_protocol(text)
        return (
            plan(loaded.protocol, self.engine.port_map.applicators()),
            frozenset(c.value for c in loaded.protocol.contraindications),
        )

    async def start(self, the_plan: Plan, contraindicated: frozenset[str]) -> Session:
        """Start a session; a trip of the previous one is acknowledged first, as the
        operator would once the benchmark has put the controller back."""
        awaiting = self.engine.acknowledgements.awaiting
        if awaiting is not None:
            self.engine.acknowledge(awaiting.cause.code, "bench", "fault removed by the benchmark")
        return await self.engine.start_session(
            SessionRequest(
                plan=the_plan,
                patient_ref="BENCH",
                contraindications={},
                contraindicated_by_protocol=contraindicated,
            )
        )

    async def wait_event(
        self, pred: Callable[[SessionEvent], bool], timeout_s: float, after: float
    ) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            for t, ev in self.events:
                if t >= after and pred(ev):
                    return t
            if time.monotonic() > deadline:
                raise TimeoutError("event did not come")
            await self.handle.next_sample(1.0)


class LagSampler:
    """How late the running event loop wakes from a short sleep: a task that sleeps
    `period_s` and appends its lateness (s) to `lags`, from entry to exit."""

    def __init__(self, lags: list[float], period_s: float = 0.005) -> None:
        self.lags = lags
        self.period_s = period_s
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LagSampler:
        self._task = asyncio.create_task(self._run(), name="lag-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            due = time.monotonic() + self.period_s
            await asyncio.sleep(self.period_s)
            self.lags.append(max(0.0, time.monotonic() - due))


class CpuLoad:
    """Another process saturating the CPUs, started on entry and stopped on exit:
    `stress-ng --cpu N` when installed (Debian package stress-ng), else N Python
    busy-loop processes of the bench's own (`label` says which ran)."""

    def __init__(self, workers: int, kind: str = "auto", timeout_s: float = 3600.0) -> None:
        self.workers = workers
        self.timeout_s = timeout_s  # a bound should the bench itself be killed
        if kind == "auto":
            kind = "stress-ng" if shutil.which("stress-ng") else "python"
        self.kind = kind
        self.label = {
            "none": "none",
            "stress-ng": f"stress-ng --cpu {workers}",
            "python": f"{workers} Python busy-loop processes (fallback, stress-ng not used)",
        }[kind]
        self._procs: list[asyncio.subprocess.Process] = []
        self.ended_early = False
        """The load had ended before it was stopped (the run was not all under load)."""

    async def __aenter__(self) -> CpuLoad:
        if self.kind == "stress-ng":
            timeout = f"{int(self.timeout_s) + 1}s"
            argv = ["stress-ng", "--cpu", str(self.workers), "--timeout", timeout, "--quiet"]
            self._procs = [await _spawn(argv)]
        elif self.kind == "python":
            # Each burns until stopped, or until the bench is gone (its parent changes).
            burn = "import os\nwhile os.getppid() == {}:\n    for _ in range(100_000): pass"
            argv = [sys.executable, "-c", burn.format(os.getpid())]
            self._procs = [await _spawn(argv) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ended_early = any(p.returncode is not None for p in self._procs)
        for p in self._procs:
            # Each child leads its own process group: stress-ng's workers go with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self._procs:
            try:
                await asyncio.wait_for(p.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                await p.wait()
        self._procs = []


async def _spawn(argv: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_ordinary_priority,
    )


def _ordinary_priority() -> None:
    """The load is other work on the workstation: normal policy and nice 0, whatever
    priority the bench itself runs at."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, 0, 0)


def _confirm(s: Session, port: int) -> None:
    with contextlib.suppress(Exception):
        s.confirm(port)
