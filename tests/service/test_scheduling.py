"""The daemon says at start which CPU scheduling it runs under; `--realtime` asks for
SCHED_FIFO and, where that is not allowed, runs on at its nice value."""

from __future__ import annotations

import os
from pathlib import Path

from .conftest import DaemonFactory
from .harness import DEPLOYED_NICE


def test_the_scheduling_in_force_is_logged(make_daemon: DaemonFactory) -> None:
    d = make_daemon().start()
    rec = d.wait_log(lambda r: r.event == "daemon.scheduling")
    assert rec.data["policy"] == "other" and rec.data["rt_priority"] == 0
    assert rec.data["nice"] == (DEPLOYED_NICE or 0)
    assert d.stop() == 0


def test_realtime_runs_under_sched_fifo_where_allowed(make_daemon: DaemonFactory) -> None:
    d = make_daemon(args=("--realtime",), nice=None).start()
    ready = d.wait_log(lambda r: r.event == "daemon.ready")
    if os.geteuid() == 0:
        rec = d.wait_log(lambda r: r.event == "daemon.scheduling")
        assert rec.data["policy"] == "fifo" and rec.data["rt_priority"] == 10
        # Every thread (the log writer started before the switch too): one left behind
        # holding the GIL would hold the event loop up.
        tasks = os.listdir(f"/proc/{ready.data['pid']}/task")
        assert len(tasks) > 1
        assert all(os.sched_getscheduler(int(t)) == os.SCHED_FIFO for t in tasks)
        # The embedded simulator (the daemon's child) above the daemon, not beside it:
        # at the same priority a busy daemon thread would delay the "controller".
        pid = int(ready.data["pid"])
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 1
        sim = int(children[0])
        assert os.sched_getscheduler(sim) == os.SCHED_FIFO
        assert os.sched_getparam(sim).sched_priority == 20
    else:  # not allowed: said, and the daemon runs on at its nice value
        rec = d.wait_log(lambda r: r.event == "daemon.realtime_refused")
        assert rec.data["policy"] == "other" and "CAP_SYS_NICE" in rec.data["reason"]
    assert d.stop() == 0
