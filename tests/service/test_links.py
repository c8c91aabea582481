"""Controller links the configuration names: an external `pbmd sim` over socket://,
a link lost during a session, the reconnection, and a controller that is not there."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DaemonFactory
from .harness import (
    PBMD,
    SHORT_SCREENING,
    SHORT_STEPS,
    RawClient,
    run_session_confirming,
    write_protocol,
)


class Sim:
    """`pbmd sim --tcp` as a child process."""

    def __init__(self, port: int = 0, time_scale: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [
                *PBMD,
                "sim",
                "--realtime",
                "--tcp",
                f"127.0.0.1:{port}",
                "--time-scale",
                str(time_scale),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline().strip() for _ in range(3)]
        assert lines[2] == "ready", lines
        self.url = lines[0].removeprefix("link ")
        self.port = int(self.url.rpartition(":")[2])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    made: list[Sim] = []
    yield made
    for s in made:
        s.stop()
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def config_for(url: str) -> str:
    return f'\n[[controllers]]\nname = "main"\nlink = "{url}"\n'


def test_socket_link_lost_mid_session_then_reconnected(
    make_daemon: DaemonFactory, sims: list[Sim], workdir: Path
) -> None:
    sim = Sim()
    sims.append(sim)
    d = make_daemon(
        controllers_toml=config_for(sim.url), protocols="allow_unsigned = true\n"
    ).start()
    path = write_protocol(workdir)
    with RawClient(d.socket_path) as c:
        c.call("protocol.install", {"content": path.read_text()})  # unsigned: allowed here
        st = c.call("status")
        assert st["controllers"][0]["url"] == sim.url and st["controllers"][0]["connected"]
        assert any("UNSIGNED" in w for w in st["daemon"]["development"])
        c.call(
            "session.start",
            {
                "protocol": "service-short",
                "patient_ref": "LINK-1",
                "contraindications": SHORT_SCREENING,
                "watch": True,
            },
        )
        d.wait_log(lambda r: r.event == "session.event" and r.data.get("kind") == "port_waiting")
        sim.stop()  # the controller goes away
        ended = c.next_notification("session.ended")
        assert ended["params"]["state"] == "faulted"
        assert ended["params"]["status"]["cause_code"] in ("E203", "E202", "E201")
        d.wait_log(lambda r: r.event == "controller.link_lost")
        st = c.call("status")
        assert st["ready"]["ok"] is False
        # The last sample is not the present: over a lost link every reading is unknown.
        ctrl = st["controllers"][0]
        assert ctrl["connected"] is False and ctrl["telemetry_stale"] is True
        assert ctrl["state"].startswith("unknown (link lost, stale ")
        for port in st["ports"]:
            assert port["telemetry_stale"] is True and port["telemetry_age_s"] > 0
            assert port["emitting"] is None and port["power_mw"] is None
        # The controller comes back on the same address: pbmd reconnects by itself.
        sims.append(Sim(port=sim.port))
        d.wait_log(lambda r: r.event == "controller.reconnected", timeout_s=60)
        # A link fault may still be present: the operator acknowledges it first.
        code = ended["params"]["status"]["cause_code"]
        c.call("session.acknowledge", {"code": code, "note": "controller back on the line"})
        session_id, state = run_session_confirming(c, "service-short", "LINK-2", SHORT_SCREENING)
        assert state == "completed"
        record = c.call("records.show", {"session_id": session_id})["session"]
        assert len(record["steps"]) == SHORT_STEPS
        faulted = c.call("records.list")["sessions"][1]
        assert faulted["outcome"] == "faulted" and faulted["ended_utc"] is not None
    assert d.stop() == 0


def test_unreachable_controller_stops_the_start(make_daemon: DaemonFactory) -> None:
    d = make_daemon(controllers_toml=config_for("socket://127.0.0.1:9"))
    d.start(wait_ready=False)
    assert d.wait_exit() == 1
    assert "controller main at socket://127.0.0.1:9" in d.output()
    assert not d.socket_path.exists()


def test_a_socket_served_by_another_pbmd_is_not_taken(make_daemon: DaemonFactory) -> None:
    first = make_daemon("first").start()
    second = make_daemon("second", socket=first.socket_path)
    second.start(wait_ready=False)
    assert second.wait_exit() == 1
    assert "another pbmd is already serving" in second.output()
    with RawClient(first.socket_path) as c:  # the first one is untouched
        assert c.call("calibration.get") is not None


def test_session_on_a_subset_of_ports(make_daemon: DaemonFactory, workdir: Path) -> None:
    d = make_daemon().start()
    path = write_protocol(workdir)
    with RawClient(d.socket_path) as c:
        c.call(
            "protocol.install",
            {"content": path.read_text(), "signature": Path(str(path) + ".minisig").read_text()},
        )
        bad = c.request(
            "session.start",
            {
                "protocol": "service-short",
                "patient_ref": "SUB",
                "ports": [3],
                "contraindications": SHORT_SCREENING,
            },
        )
        assert bad["error"]["code"] == -32002 and "not in protocol" in bad["error"]["message"]
        session_id, state = run_session_confirming(
            c, "service-short", "SUB-1", SHORT_SCREENING, ports=[1, 4]
        )
        assert state == "completed"
        record = c.call("records.show", {"session_id": session_id})["session"]
    assert sorted({s["port"] for s in record["steps"]}) == [1, 4]
