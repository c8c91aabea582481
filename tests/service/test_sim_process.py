"""The embedded simulator (link = "sim") is a process of its own, as a controller is a
device of its own: its death is a lost link (E203) that ends the session, and it does
not outlive the daemon."""

from __future__ import annotations

import os
import select
import signal
from pathlib import Path

from .conftest import DaemonFactory
from .harness import (
    SHORT_SCREENING,
    RawClient,
    confirm_first_placements,
    pbmctl_json,
    write_protocol,
)


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Until process `pid` has exited (a pidfd becomes readable then)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        assert ready, f"process {pid} still runs after {timeout_s} s"
    finally:
        os.close(fd)


def test_killed_simulator_process_is_a_lost_link(make_daemon: DaemonFactory, workdir: Path) -> None:
    d = make_daemon().start()
    daemon_pid = int(d.wait_log(lambda r: r.event == "daemon.ready").data["pid"])
    sim_pid = int(d.wait_log(lambda r: r.event == "controller.simulated").data["pid"])
    assert d.proc is not None and daemon_pid == d.proc.pid
    assert sim_pid != daemon_pid
    assert parent_of(sim_pid) == daemon_pid
    pbmctl_json(d.socket_path, "protocol", "install", str(write_protocol(workdir)))
    with RawClient(d.socket_path) as c:
        st = c.call("status")
        assert st["controllers"][0]["simulated"] is True
        assert st["controllers"][0]["sim_control"] is not None
        c.call(
            "session.start",
            {
                "protocol": "service-short",
                "patient_ref": "SIMPROC-1",
                "ports": [1],
                "contraindications": SHORT_SCREENING,
                "watch": True,
            },
        )
        confirm_first_placements(c, (1,))
        d.wait_log(
            lambda r: r.event == "session.event" and r.data.get("kind") == "emission_started"
        )
        os.kill(sim_pid, signal.SIGKILL)  # the controller dies mid-emission
        ended = c.next_notification("session.ended")["params"]
        assert ended["state"] == "faulted"
        assert ended["status"]["cause_code"] == "E203"
        assert all(p["state"] != "emitting" for p in ended["status"]["ports"])
        d.wait_log(lambda r: r.event == "controller.link_lost")
        # The link is reopened on a new simulator process (a power-cycled controller).
        restarted = d.wait_log(
            lambda r: r.event == "controller.simulated" and r.data["pid"] != sim_pid
        )
        d.wait_log(lambda r: r.event == "controller.reconnected", timeout_s=60)
        record = c.call("records.list")["sessions"][0]
        assert record["outcome"] == "faulted" and record["ended_utc"] is not None
    new_pid = int(restarted.data["pid"])
    assert parent_of(new_pid) == daemon_pid
    assert d.stop() == 0
    wait_gone(new_pid)


def test_simulator_process_dies_with_the_daemon(make_daemon: DaemonFactory) -> None:
    d = make_daemon().start()
    sim_pid = int(d.wait_log(lambda r: r.event == "controller.simulated").data["pid"])
    d.kill()  # SIGKILL: no clean stop
    wait_gone(sim_pid)
