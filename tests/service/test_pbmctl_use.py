"""pbmctl as a clinic uses it, against a real daemon: dates without a zone, short
session ids, the live view under a real terminal (a pty), progress off a terminal,
JSON for scripts, warnings, and the report of a session cut short."""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime as dt
import fcntl
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import DaemonFactory
from .harness import (
    PBMCTL,
    SCREENING_CHRONIC,
    SHORT_SCREENING,
    SHORT_STEPS,
    TIMEOUT_S,
    Daemon,
    RawClient,
    pbmctl,
    pbmctl_json,
    run_session_confirming,
    screening_args,
    write_protocol,
)


def _installed(daemon: Daemon, workdir: Path) -> None:
    pbmctl_json(daemon.socket_path, "protocol", "install", str(write_protocol(workdir)))


def test_dates_without_a_zone_short_ids_and_csv(daemon: Daemon, workdir: Path) -> None:
    """`--since 2025-01-31` (the help's own example) is the workstation's local day;
    a unique prefix names a session anywhere an id does; the CSV export neutralises
    cells a spreadsheet would run as formulas and ends its lines with CRLF."""
    sock = daemon.socket_path
    _installed(daemon, workdir)
    patient = "=cmd|' /C calc'!A0"
    with RawClient(sock) as client:
        session_id, state = run_session_confirming(
            client, "service-short", patient, SHORT_SCREENING
        )
    assert state == "completed"

    today = dt.date.today().isoformat()  # the local day the session ran on
    listed = pbmctl_json(sock, "records", "list", "--since", "2025-01-31")["sessions"]
    assert [s["id"] for s in listed] == [session_id]
    assert pbmctl_json(sock, "records", "list", "--since", today)["sessions"] != []
    tomorrow = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    assert pbmctl_json(sock, "records", "list", "--since", tomorrow)["sessions"] == []
    human = pbmctl(sock, "records", "list", "--since", "2025-01-31")
    assert human.returncode == 0 and session_id[:8] in human.stdout, human.stderr
    exported = pbmctl(sock, "records", "export", "--since", "2026-12-06", "--format", "csv")
    assert exported.returncode == 0, exported.stderr

    short = session_id[:8]
    assert pbmctl_json(sock, "records", "show", short)["session"]["id"] == session_id
    report = pbmctl_json(sock, "report", short)
    assert report["session_id"] == session_id and report["report"]["session_id"] == session_id
    assert pbmctl(sock, "report", session_id[:5]).returncode == 0
    watched = pbmctl(sock, "--json", "session", "watch", short)
    assert watched.returncode == 0, watched.stderr
    too_short = pbmctl(sock, "--json", "report", session_id[:2])
    assert too_short.returncode == 1
    assert "at least 4 characters" in json.loads(too_short.stdout)["error"]["message"]
    other = pbmctl(sock, "--json", "session", "watch", "ffffffff-0000")
    assert other.returncode == 1 and "no session" in json.loads(other.stdout)["error"]["message"]

    path = workdir / "steps.csv"
    pbmctl_json(sock, "records", "export", "--format", "csv", "--session", short, "-o", str(path))
    raw = path.read_bytes()
    assert raw.count(b"\r\n") == SHORT_STEPS + 1 and b"\n" not in raw.replace(b"\r\n", b"")
    rows = list(csv.DictReader(io.StringIO(raw.decode())))
    assert {r["session_id"] for r in rows} == {session_id}
    assert {r["session_patient_ref"] for r in rows} == {"'" + patient}


def test_usage_errors_json_unwrapped_stderr_and_calibration_warning(
    daemon: Daemon, workdir: Path
) -> None:
    sock = daemon.socket_path
    usage = pbmctl(sock, "--json", "session", "start")
    assert usage.returncode == 2
    error = json.loads(usage.stdout)["error"]
    assert "--patient" in error["message"] and error["exit_code"] == 2
    assert error["usage"].startswith("usage: pbmctl session start")
    plain = pbmctl(sock, "session", "start")
    assert plain.returncode == 2 and "pbmctl: error:" in plain.stderr

    missing = "0123456789abcdef-0123456789abcdef-0123456789abcdef-0123456789"
    gone = pbmctl(sock, "report", missing)
    assert gone.returncode == 1
    message = gone.stderr.strip()
    assert len(message) > 80 and "\n" not in message, gone.stderr  # one line, not wrapped

    past = pbmctl(sock, "calibration", "set", "2020-01-01")
    assert past.returncode == 0
    assert "((" not in past.stdout and "))" not in past.stdout, past.stdout
    assert "E602" in past.stderr and "past" in past.stderr, past.stderr
    later = pbmctl(sock, "calibration", "set", "2999-01-01")
    assert later.returncode == 0 and later.stderr == ""


def test_off_a_terminal_watch_prints_progress_per_port(daemon: Daemon, workdir: Path) -> None:
    """`make run | tee`: a compact progress line per port, not only the events."""
    _installed(daemon, workdir)
    res = pbmctl(
        daemon.socket_path,
        "session",
        "start",
        "service-short",
        "--patient",
        "TEE-1",
        *screening_args(SHORT_SCREENING),
        "--auto-confirm",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    progress = [
        line
        for line in res.stdout.splitlines()
        if re.search(r" port \d step \d/\d .*\d+% [\d.]+/[\d.]+ J/cm²", line)
    ]
    assert {line.split(" port ")[1][0] for line in progress} == {"1", "2", "4"}, res.stdout
    assert any(" 100% " in line and " done " in line for line in progress), res.stdout
    # modest: never more than a line per port per step, state and 10 % step
    assert len(progress) <= SHORT_STEPS * 14, len(progress)


def test_watch_of_an_ended_session_prints_json_lines(daemon: Daemon, workdir: Path) -> None:
    _installed(daemon, workdir)
    with RawClient(daemon.socket_path) as client:
        session_id, _ = run_session_confirming(client, "service-short", "JSONL-1", SHORT_SCREENING)
    res = pbmctl(daemon.socket_path, "--json", "session", "watch")
    assert res.returncode == 0
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines[0]["session_id"] == session_id and lines[0]["status"]["state"] == "completed"
    assert lines[-1] == {"session_id": session_id, "state": "completed"}


def test_report_of_an_aborted_session_lists_every_planned_step(
    daemon: Daemon, workdir: Path
) -> None:
    """Aborted before most steps began: the report lists all five with 0 delivered for
    the ones never started, and prescribes the whole plan."""
    _installed(daemon, workdir)
    sock = daemon.socket_path
    with RawClient(sock) as client:
        started = client.call(
            "session.start",
            {
                "protocol": "service-short",
                "patient_ref": "CUT-1",
                "contraindications": SHORT_SCREENING,
                "watch": True,
            },
        )
        client.call("session.abort", {"reason": "patient asked to stop"})
        client.next_notification("session.ended")  # sent once the record is closed
    doc = pbmctl_json(sock, "report", started["session_id"])["report"]
    steps = {(s["port"], s["step_index"]): s for s in doc["steps"]}
    assert sorted(steps) == [(1, 0), (1, 1), (2, 0), (4, 0), (4, 1)]
    missed = [s for s in doc["steps"] if s["outcome"] == "not started"]
    assert steps[(1, 1)] in missed  # the pad's 830 nm step waits for 660 nm to end
    assert all(s["energy_host_j"] == 0.0 for s in missed)
    assert doc["energy_prescribed_j"] == sum(s["energy_prescribed_j"] for s in doc["steps"])
    protocol = pbmctl_json(sock, "protocol", "show", "service-short")["protocol"]
    planned_j = sum(st["energy_j"] for p in protocol["ports"] for st in p["steps"])
    assert abs(doc["energy_prescribed_j"] - planned_j) < 1e-6 * planned_j
    text = pbmctl(sock, "report", started["session_id"][:8]).stdout
    assert "not started" in text and f"/{SHORT_STEPS}" in text


# --------------------------------------------------------------------------- a real terminal

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")


class Terminal:
    """A pty pbmctl runs in: everything it draws is kept (escapes removed) and a test
    waits for a text to appear, bounded by a timeout."""

    def __init__(self, columns: int = 132, rows: int = 50) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.saved = termios.tcgetattr(self.slave)
        self.text = ""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        # A read may end inside a UTF-8 character or an escape sequence: both are
        # completed by the next read before they are kept.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(self.master, 1 << 16)
            except OSError:  # EIO: the slave side is closed
                chunk = b""
            with self._cond:
                if not chunk:
                    self.text += _ANSI.sub("", pending + decoder.decode(b"", final=True))
                    self._cond.notify_all()
                    return
                pending += decoder.decode(chunk)
                cut = pending.rfind("\x1b")
                if cut < 0 or _ANSI.match(pending, cut) or len(pending) - cut > 32:
                    cut = len(pending)
                self.text += _ANSI.sub("", pending[:cut])
                pending = pending[cut:]
                self._cond.notify_all()

    def wait_for(self, text: str, after: int = 0, timeout_s: float = TIMEOUT_S) -> int:
        """Where ``text`` appears after offset ``after`` (waits for it)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (i := self.text.find(text, after)) < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{text!r} not shown; the screen:\n{self.text[-3000:]}")
                self._cond.wait(left)
            return i

    def lflags(self) -> int:
        return int(termios.tcgetattr(self.slave)[3])

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        os.close(self.slave)
        self._thread.join(10)
        os.close(self.master)


@contextmanager
def pbmctl_on_terminal(
    daemon: Daemon, *args: str, deaf: bool = False
) -> Iterator[tuple[Terminal, subprocess.Popen[bytes]]]:
    """``deaf``: started as a launcher may start it, SIGINT ignored and the stop
    signals blocked (both are inherited across exec)."""
    term = Terminal()
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    argv = [PBMCTL[0], "-X", "faulthandler", *PBMCTL[1:], "--socket", str(daemon.socket_path)]
    launcher = [sys.executable, "-c", _DEAF_LAUNCHER] if deaf else []
    proc = subprocess.Popen(
        [*launcher, *argv, *args],
        stdin=term.slave,
        stdout=term.slave,
        stderr=term.slave,
        env=env,
    )
    try:
        yield term, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        term.close()


_DEAF_LAUNCHER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
os.execv(sys.argv[1], sys.argv[1:])
"""
"""Execs its arguments with SIGINT ignored and the stop signals blocked, as a launcher
may (both survive exec; the same pid, so the test signals pbmctl itself)."""


def test_live_view_keys_under_a_real_terminal(daemon: Daemon, workdir: Path) -> None:
    """Echo off and single keys while the live view runs (p, r, Enter, a typed word);
    the paused state shown whole; the terminal's mode back as it was when pbmctl ends."""
    _installed(daemon, workdir)
    args = ["session", "start", "service-short", "--patient", "PTY-1", "--skin-type", "III"]
    with pbmctl_on_terminal(daemon, *args, *screening_args(SHORT_SCREENING), "--watch") as (
        term,
        proc,
    ):
        at = term.wait_for("p: pause all")
        flags = term.lflags()
        assert not flags & termios.ECHO and not flags & termios.ICANON
        at = term.wait_for("RUNNING", at)  # a session pauses once it runs
        term.type("p")  # no Enter: cbreak
        at = term.wait_for("all ports paused", at)
        # port 1 waits for its placement and is paused: both, not "paused+co…"
        at = term.wait_for("paused+confirm", at)
        term.type("r")
        at = term.wait_for("all ports resumed", at)
        at = term.wait_for("660 confirm ", at)  # the status after the resume: gated again
        term.type("\r")
        at = term.wait_for("placement at Left lumbar paraspinal muscles confirmed", at)
        term.type("abort")  # a word, not echoed by the terminal: the view shows it
        at = term.wait_for("> abort", at)
        term.type("\r")
        assert proc.wait(TIMEOUT_S) == 4, term.text[-3000:]
        term.wait_for("ended: ABORTED", at)
        assert termios.tcgetattr(term.slave) == term.saved


def test_live_view_restores_the_terminal_when_stopped(make_daemon: DaemonFactory) -> None:
    """SIGTERM and Ctrl-C (SIGINT) while following: exit 130, the terminal as it was;
    Ctrl-C also when pbmctl was started with SIGINT ignored and blocked."""
    daemon = make_daemon(time_scale=1.0).start()
    with RawClient(daemon.socket_path) as client:
        client.call(
            "session.start",
            {
                "protocol": "lumbar-chronic-nonspecific",
                "patient_ref": "SIG-1",
                "contraindications": SCREENING_CHRONIC,
            },
        )
        try:
            for sig, deaf in (
                (signal.SIGTERM, False),
                (signal.SIGINT, False),
                (signal.SIGINT, True),
            ):
                with pbmctl_on_terminal(daemon, "session", "watch", deaf=deaf) as (term, proc):
                    term.wait_for("p: pause all")
                    assert not term.lflags() & termios.ECHO
                    proc.send_signal(sig)
                    try:
                        code = proc.wait(TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        proc.send_signal(signal.SIGABRT)  # faulthandler: where it hangs
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(5)
                        raise AssertionError(
                            f"{sig.name} did not end pbmctl: {term.text[-4000:]}"
                        ) from None
                    assert code == 130, term.text[-2000:]
                    assert termios.tcgetattr(term.slave) == term.saved, sig
                    term.wait_for("the session goes on" if sig == signal.SIGTERM else "interrupted")
        finally:
            client.call("session.abort", {"reason": "test over"})
