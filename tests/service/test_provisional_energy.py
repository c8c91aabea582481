"""The TCP link to a controller cut mid-emission, then back (ICD §6): the emission's
controller energy is recorded as provisional (the last sample, a lower bound) and
the session waits for the counters; on reconnection pbmd reads GET_COUNTERS and the
record holds exactly the controller's figure, final, and the report says which."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import DaemonFactory
from .harness import (
    PBMD,
    SHORT_SCREENING,
    Daemon,
    RawClient,
    pbmctl,
    pbmctl_json,
    write_protocol,
)
from .test_links import config_for
from .test_service_latch import sim_op


class SimProcess:
    """`pbmd sim --tcp` as a child process, with its control channel."""

    def __init__(self, time_scale: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [*PBMD, "sim", "--realtime", "--tcp", "127.0.0.1:0", "--time-scale", str(time_scale)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline().strip() for _ in range(3)]
        assert lines[2] == "ready", lines
        self.port = int(lines[0].rpartition(":")[2])
        host, _, port = lines[1].removeprefix("control ").rpartition(":")
        self.control = (host.strip("[]"), int(port))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class CuttableLink:
    """A TCP relay between pbmd and the controller that can be cut like a pulled cable
    and plugged back: while cut, a connection is accepted and closed at once."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.up = True
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        """The connections relayed now (both ends of each)."""
        self._opened: list[socket.socket] = []
        """Every socket opened, closed only at the end."""
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._opened.append(conn)
                if not self.up:
                    conn.shutdown(socket.SHUT_RDWR)
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    conn.shutdown(socket.SHUT_RDWR)
                    continue
                upstream.settimeout(None)
                self._opened.append(upstream)
                self._sockets += [conn, upstream]
            self._start(self._pump, conn, upstream)
            self._start(self._pump, upstream, conn)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self.up = False
            sockets, self._sockets = self._sockets, []
        for s in sockets:  # shut down, not closed: no descriptor is reused under a pump
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        with self._lock:
            self.up = True

    def close(self) -> None:
        self.cut()
        # Wake the accept thread (a close would not, and its descriptor could then be
        # reused by another test's socket while it still accepts on it); close after.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(10)
            assert not t.is_alive(), t
        self.listener.close()
        for s in self._opened:
            s.close()


@pytest.fixture
def sim() -> Iterator[SimProcess]:
    s = SimProcess()
    yield s
    s.stop()


@pytest.fixture
def link(sim: SimProcess) -> Iterator[CuttableLink]:
    relay = CuttableLink(sim.port)
    yield relay
    relay.close()


def wait_for(fn: Any, what: str, timeout_s: float = 30.0) -> Any:
    """Poll a reading until it gives something (records are committed by a writer thread)."""
    deadline = time.monotonic() + timeout_s
    while (value := fn()) is None:
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)
    return value


def port_rows(c: RawClient, session_id: str, port: int) -> tuple[dict[str, Any], list[Any]]:
    record = c.call("records.show", {"session_id": session_id})["session"]
    return record, [e for e in record["emissions"] if e["port"] == port]


def cut_mid_emission(
    d: Daemon, c: RawClient, sim: SimProcess, link: CuttableLink, workdir: Path
) -> tuple[str, int]:
    """Start a session, cut the link while port 2 emits; check the record is provisional
    right after the trip, and the report says so. The session id and the figure."""
    c.call("protocol.install", {"content": write_protocol(workdir).read_text()})
    started = c.call(
        "session.start",
        {
            "protocol": "service-short",
            "patient_ref": "CUT-1",
            "contraindications": SHORT_SCREENING,
            "watch": True,
        },
    )
    session_id = str(started["session_id"])
    # Port 2's pad step needs no placement prompt: cut once it has delivered energy.
    while True:
        msg = c.next_notification()
        # A session that ends before the cut fails here with its cause, not by a timeout.
        assert msg["method"] != "session.ended", msg["params"]
        if msg["method"] != "session.status":
            continue
        ports = {p["port"]: p for p in msg["params"]["status"].get("ports") or []}
        if (ports.get(2) or {}).get("controller_energy_j", 0) > 1.0:
            break
    link.cut()
    ended = c.next_notification("session.ended")
    assert ended["params"]["state"] == "faulted"
    d.wait_log(lambda r: r.event == "controller.link_lost")

    def closed() -> Any:
        record, rows = port_rows(c, session_id, 2)
        return None if record["ended_utc"] is None else rows

    rows = wait_for(closed, "closed record")
    assert [e["controller_energy_source"] for e in rows] == ["provisional"]
    lower_bound = int(rows[0]["controller_energy_uj"])
    assert lower_bound > 1_000_000
    assert "provisional" in c.call("status")["unreconciled"][session_id]
    report = c.call("report.get", {"session_id": session_id, "format": "both"})
    assert report["report"]["controller_channel_final"] is False
    step = next(s for s in report["report"]["steps"] if s["port"] == 2)
    assert step["controller_channel_final"] is False
    assert step["emissions"][0]["controller_energy_final"] is False
    assert "provisional (lower bound)" in report["text"] and "PROVISIONAL" in report["text"]
    text = pbmctl(d.socket_path, "report", session_id).stdout
    assert "Controller dose   PROVISIONAL: a lower bound" in text
    # What the controller itself delivered: it stopped the port (watchdog).
    snap = sim_op(sim.control, "snapshot")["ports"][1]
    assert snap["port"] == 2 and not snap["emitting"]
    assert snap["delivered_uj"] >= lower_bound
    print(f"\nprovisional {lower_bound / 1e6:.3f} J, delivered {snap['delivered_uj'] / 1e6:.3f} J")
    return session_id, lower_bound


def check_final(d: Daemon, c: RawClient, sim: SimProcess, session_id: str) -> None:
    """The record holds the controller's own figures, final; each port's emissions add
    up to its session total (nothing lost, nothing twice); the report says final."""
    record, rows = port_rows(c, session_id, 2)
    ports = {p["port"]: p for p in sim_op(sim.control, "snapshot")["ports"]}
    assert [e["controller_energy_source"] for e in rows] == ["counters"]
    assert rows[0]["controller_energy_uj"] == ports[2]["delivered_uj"]
    for e in record["emissions"]:
        assert e["controller_energy_source"] in ("stopped", "counters"), e
    for port in {e["port"] for e in record["emissions"]}:
        counted = sum(e["controller_energy_uj"] for e in record["emissions"] if e["port"] == port)
        assert counted == ports[port]["counters"]["session_delivered_uj"], port
    step_row = next(s for s in record["steps"] if s["port"] == 2)
    assert abs(step_row["delivered_controller_j"] - ports[2]["delivered_uj"] / 1e6) < 1e-6
    assert session_id not in c.call("status")["unreconciled"]

    report = pbmctl_json(d.socket_path, "report", session_id)
    doc = report.get("report", report)
    assert doc["controller_channel_final"] is True
    step = next(s for s in doc["steps"] if s["port"] == 2)
    assert step["controller_channel_final"] is True
    assert step["emissions"][0]["controller_energy_source"] == "counters"
    assert step["emissions"][0]["controller_energy_final"] is True
    text = pbmctl(d.socket_path, "report", session_id).stdout
    assert "Controller dose   final (the controller's STOPPED and COUNTERS figures)" in text
    assert "lower bound" not in text


def daemon_on(make_daemon: DaemonFactory, link: CuttableLink) -> Daemon:
    return make_daemon(
        controllers_toml=config_for(f"socket://127.0.0.1:{link.port}"),
        protocols="allow_unsigned = true\n",
    )


def test_link_cut_mid_emission_provisional_then_the_controllers_counters(
    make_daemon: DaemonFactory, sim: SimProcess, link: CuttableLink, workdir: Path
) -> None:
    d = daemon_on(make_daemon, link).start()
    with RawClient(d.socket_path) as c:
        session_id, _ = cut_mid_emission(d, c, sim, link, workdir)
        # The cable is back: pbmd reconnects, reads GET_COUNTERS, the figure is final.
        link.restore()
        d.wait_log(lambda r: r.event == "controller.reconnected", timeout_s=60)
        assert session_id in d.wait_log(lambda r: r.event == "sessions.reconciled").data["sessions"]
        check_final(d, c, sim, session_id)
    assert d.stop() == 0


def test_provisional_energy_settled_by_the_next_daemon_start(
    make_daemon: DaemonFactory, sim: SimProcess, link: CuttableLink, workdir: Path
) -> None:
    """pbmd stopped while the link was still cut: the next start reads the counters."""
    d = daemon_on(make_daemon, link).start()
    with RawClient(d.socket_path) as c:
        session_id, _ = cut_mid_emission(d, c, sim, link, workdir)
    d.stop()
    link.restore()
    d2 = daemon_on(make_daemon, link).start()
    assert session_id in d2.wait_log(lambda r: r.event == "sessions.reconciled").data["sessions"]
    with RawClient(d2.socket_path) as c:
        check_final(d2, c, sim, session_id)
    assert d2.stop() == 0
