"""Signals and systemd's view of a real daemon: SIGHUP reloads and never stops,
other stop signals end cleanly (emission off, record, STOPPING=1, socket gone),
and STATUS= follows the session, its trip and a controller that is not there.

systemd's side is a real notify socket: a Unix datagram socket this test binds
and names in $NOTIFY_SOCKET, as systemd does for a Type=notify service.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import DaemonFactory
from .harness import (
    SHORT_SCREENING,
    TIMEOUT_S,
    RawClient,
    confirm_first_placements,
    pbmctl_json,
    run_session_confirming,
    write_protocol,
)
from .test_trip_acknowledge import trip_e104


class NotifySink:
    """What systemd would read from the daemon's $NOTIFY_SOCKET, every datagram kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def wait(self, predicate: Callable[[str], bool], what: str) -> str:
        """The first datagram (seen before or arriving within the bound) that matches."""
        for message in self.messages:
            if predicate(message):
                return message
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} on the notify socket; got {self.messages}")
            self.sock.settimeout(left)
            try:
                message = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if predicate(message):
                return message

    def statuses(self) -> list[str]:
        return [
            line[len("STATUS=") :]
            for m in self.messages
            for line in m.splitlines()
            if line.startswith("STATUS=")
        ]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink(workdir: Path) -> Iterator[NotifySink]:
    s = NotifySink(workdir / "notify.sock")
    yield s
    s.close()


def _has(line: str) -> Callable[[str], bool]:
    return lambda message: line in message.splitlines()


def _status(words: str) -> Callable[[str], bool]:
    return lambda message: any(
        line.startswith("STATUS=") and words in line for line in message.splitlines()
    )


def test_sighup_mid_session_reloads_and_the_session_completes(
    make_daemon: DaemonFactory, workdir: Path, sink: NotifySink
) -> None:
    d = make_daemon(env=sink.env).start()
    sink.wait(_has("READY=1"), "READY=1")
    pbmctl_json(d.socket_path, "protocol", "install", str(write_protocol(workdir)))
    text = d.config_path.read_text()
    d.config_path.write_text(text.replace('level = "info"', 'level = "warning"'))
    assert d.proc is not None
    pid = d.proc.pid
    reloaded: list[dict[str, object]] = []

    def hang_up_while_emitting() -> None:
        d.wait_log(
            lambda r: r.event == "session.event" and r.data.get("kind") == "emission_started"
        )
        os.kill(pid, signal.SIGHUP)
        reloaded.append(d.wait_log(lambda r: r.event == "daemon.reloaded").data)

    helper = threading.Thread(target=hang_up_while_emitting)
    helper.start()
    with RawClient(d.socket_path) as c:
        session_id, state = run_session_confirming(c, "service-short", "HUP-1", SHORT_SCREENING)
    helper.join(TIMEOUT_S)
    # The session ran on through the reload: nothing stopped, nothing was applied.
    assert state == "completed"
    assert reloaded and reloaded[0]["changed"] == ["logging.level"]
    assert reloaded[0]["applied"] == [] and reloaded[0]["restart_required"] is True
    assert d.proc.poll() is None
    # systemd saw a reload (RELOADING=1 … READY=1) and the status says what waits.
    sink.wait(_has("RELOADING=1"), "RELOADING=1")
    sink.wait(_status("logging.level): restart to apply"), "the pending change")
    # A file broken meanwhile is refused, the running configuration kept.
    d.config_path.write_text(text + "\n[api\n")
    os.kill(pid, signal.SIGHUP)
    refused = d.wait_log(lambda r: r.event == "daemon.reload_refused")
    assert refused.priority == 3 and refused.data["errors"] == ["(file)"]
    # SIGUSR1 means nothing to pbmd: logged, not a kill.
    os.kill(pid, signal.SIGUSR1)
    d.wait_log(lambda r: r.event == "daemon.signal_ignored" and r.data["signal"] == "SIGUSR1")
    st = pbmctl_json(d.socket_path, "status")
    assert st["session"]["session_id"] == session_id and st["ready"]["ok"] is True
    assert d.stop() == 0


def test_sigquit_mid_session_is_a_clean_stop(
    make_daemon: DaemonFactory, workdir: Path, sink: NotifySink
) -> None:
    d = make_daemon(env=sink.env).start()
    pbmctl_json(d.socket_path, "protocol", "install", str(write_protocol(workdir)))
    with RawClient(d.socket_path) as c:
        started = c.call(
            "session.start",
            {
                "protocol": "service-short",
                "patient_ref": "QUIT-1",
                "ports": [1],
                "contraindications": SHORT_SCREENING,
                "watch": True,
            },
        )
        confirm_first_placements(c, (1,))
        d.wait_log(
            lambda r: r.event == "session.event" and r.data.get("kind") == "emission_started"
        )
        assert d.stop(signal.SIGQUIT) == 0
    sink.wait(_has("STOPPING=1"), "STOPPING=1")
    assert not d.socket_path.exists(), "the control socket is removed"
    kinds = [r.data.get("kind") for r in d.records if r.event == "session.event"]
    assert "interrupt" in kinds[kinds.index("emission_started") :]
    db = sqlite3.connect(d.state_dir / "records.sqlite")
    try:
        outcome, cause, ended = db.execute(
            "SELECT outcome, stop_cause_message, ended_utc FROM sessions WHERE id = ?",
            (started["session_id"],),
        ).fetchone()
        open_emissions = db.execute(
            "SELECT COUNT(*) FROM emissions WHERE ended_utc IS NULL"
        ).fetchone()[0]
    finally:
        db.close()
    assert outcome == "interrupted" and ended is not None
    assert "pbmd stopping (SIGQUIT)" in cause
    assert open_emissions == 0


def test_status_follows_the_session_and_its_trip(
    make_daemon: DaemonFactory, workdir: Path, sink: NotifySink
) -> None:
    d = make_daemon(env=sink.env).start()
    sink.wait(_status("ready for a session"), "the ready status")
    pbmctl_json(d.socket_path, "protocol", "install", str(write_protocol(workdir)))
    with RawClient(d.socket_path) as c:
        trip_e104(d, c, "STATUS-1")
    running = sink.wait(_status(" running"), "the running session")
    session_id = pbmctl_json(d.socket_path, "status")["session"]["session_id"]
    assert f"session {session_id[:8]} running" in running
    ended = sink.wait(_status("last session"), "how the session ended")
    assert f"last session {session_id[:8]} faulted (E104" in ended
    # One line, each code once: how it ended, and what must happen before the next start.
    assert "\n" not in ended and len(ended) < 300
    assert "(E104: Measured power differed from the setpoint by more than 20 %)" in ended
    assert ended.endswith("not ready: acknowledge E104 (pbmctl session acknowledge E104)")
    assert d.stop() == 0


def test_status_says_it_waits_for_an_absent_serial_controller(
    make_daemon: DaemonFactory, sink: NotifySink
) -> None:
    d = make_daemon(
        env=sink.env,
        controllers_toml='\n[[controllers]]\nname = "main"\nlink = "/dev/ttyACM9"\n',
    )
    d.start(wait_ready=False)
    waiting = sink.wait(_status("waiting for controller main"), "the waiting status")
    assert "/dev/ttyACM9" in waiting
    assert "EXTEND_TIMEOUT_USEC=" in waiting  # waiting is not a hung start
    # Still waiting, not exited (Restart=on-failure would make that a loop).
    d.wait_log(lambda r: r.event == "controller.waiting")
    assert d.proc is not None and d.proc.poll() is None
    assert not any("READY=1" in m for m in sink.messages)
    d.stop()
