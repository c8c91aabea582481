"""Which CPU scheduling the daemon runs under, said at start, and `--realtime`.

The event loop times dose stops and judges telemetry deadlines: on a busy
workstation it must get the CPU when a sample arrives. systemd/pbmd.service asks
for SCHED_FIFO (priority 10) and a high CPUWeight; where real-time scheduling is
not allowed, Nice=-10 is what remains. `pbmd run --realtime` asks for SCHED_FIFO
itself (root or CAP_SYS_NICE, outside systemd) and falls back to the nice value
it was started with. Measured effect: docs/performance.md, "Isolation of the
safety core".
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

REALTIME_PRIORITY = 10
"""Low among real-time priorities: above every normal process, below the kernel's
own real-time threads (which run at 50 and up)."""

_POLICIES = {
    os.SCHED_OTHER: "other",
    os.SCHED_FIFO: "fifo",
    os.SCHED_RR: "rr",
    os.SCHED_BATCH: "batch",
    os.SCHED_IDLE: "idle",
}


def current() -> dict[str, Any]:
    """This process's policy, real-time priority, nice value and cgroup (v2 or cpu)."""
    policy = os.sched_getscheduler(0)
    return {
        "policy": _POLICIES.get(policy, str(policy)),
        "rt_priority": os.sched_getparam(0).sched_priority,
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "cgroup": _cgroup(),
    }


def _cgroup() -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        found[controllers] = path
    return found.get("") or found.get("cpu") or found.get("cpu,cpuacct")


def apply(realtime: bool) -> dict[str, Any]:
    """Ask for SCHED_FIFO if `realtime`; log and return the scheduling in force."""
    refused: str | None = None
    if realtime and os.sched_getscheduler(0) != os.SCHED_FIFO:
        try:
            _fifo_every_thread()
        except OSError as exc:
            refused = f"{exc.strerror or exc}; needs root or CAP_SYS_NICE"
    now = current()
    if refused is not None:
        log.warning("daemon.realtime_refused", reason=refused, **now)
    else:
        log.info("daemon.scheduling", **now)
    return now


def _fifo_every_thread() -> None:
    """SCHED_FIFO for every thread already running (the log writer), not only this one:
    a thread left at normal priority that holds the GIL when a busy machine preempts
    it would hold the real-time event loop up with it (measured: E201, 106 ms)."""
    param = os.sched_param(REALTIME_PRIORITY)
    os.sched_setscheduler(0, os.SCHED_FIFO, param)
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, param)
