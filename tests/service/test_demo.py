"""The README's job (`make run` runs `pbmd demo`) on a terminal, end to end."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import sqlite3
import struct
import subprocess
import termios
import time
from pathlib import Path

from pbmd.protocols.library import DIRECTORY
from pbmd.protocols.loader import load_protocol

from .conftest import DaemonFactory
from .harness import (
    PBMCTL,
    PBMD,
    SHORT_SCREENING,
    pbmctl_json,
    screening_args,
    write_protocol,
)

CHRONIC = DIRECTORY / "lumbar-chronic-nonspecific.toml"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_a_terminal(argv: list[str], timeout_s: float) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no end within {timeout_s} s:\n{out[-3000:].decode()}")
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            out += chunk
        rc = proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, ANSI.sub(b"", bytes(out)).decode(errors="replace")


def test_pbmd_demo_runs_the_lumbar_session_live_and_reports() -> None:
    """The README's job: the four-port lumbar session, gated steps confirmed, report,
    and a record in which every one of the 10 steps delivered its dose. At the demo's
    own time scale (×30, what `make run` runs)."""
    rc, text = run_on_a_terminal([*PBMD, "demo", "--keep"], timeout_s=300)
    kept = re.search(r"state kept in (\S+)", text)
    assert kept is not None, text[-3000:]
    state = Path(kept.group(1))
    try:
        assert rc == 0, text[-3000:]
        db = sqlite3.connect(state / "records.sqlite")
        try:
            (session_id, outcome, operator), = db.execute(
                "SELECT id, outcome, operator FROM sessions"
            ).fetchall()
            steps = db.execute(
                "SELECT outcome, delivered_controller_j, prescribed_energy_j FROM steps "
                "WHERE session_id = ?",
                (session_id,),
            ).fetchall()
        finally:
            db.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert outcome == "completed" and operator
    assert len(steps) == len(load_protocol(CHRONIC).doses) == 10  # 3 pads × 2, then 4 probe points
    assert all(o == "completed" for o, _, _ in steps)
    errors = [(delivered - prescribed) / prescribed for _, delivered, prescribed in steps]
    assert max(abs(e) for e in errors) < 0.02, errors
    assert "pbmd is ready" in text
    assert "confirms every gated placement by itself" in text
    assert "confirmed automatically (--auto-confirm)" in text
    assert "━" in text  # the live view's progress bars
    assert "lumbar-chronic-nonspecific" in text
    assert "PHOTOBIOMODULATION TREATMENT REPORT" in text
    assert "Outcome           COMPLETED" in text
    assert "Fitzpatrick III" in text  # the skin type, asked at start and recorded
    assert "pbmd stopped cleanly (exit 0)" in text


def test_live_view_prompts_and_enter_confirms(make_daemon: DaemonFactory, workdir: Path) -> None:
    d = make_daemon().start()
    path = write_protocol(workdir)
    pbmctl_json(d.socket_path, "protocol", "install", str(path))
    argv = [
        *PBMCTL,
        "--socket",
        str(d.socket_path),
        "session",
        "start",
        "service-short",
        "--patient",
        "KEYS-1",
        *screening_args(SHORT_SCREENING),
        "--watch",
    ]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    prompts = 0
    asked = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
            if not ready:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if not asked and b"skin type" in ANSI.sub(b"", bytes(out)):
                asked = True
                os.write(master, b"v\n")  # asked like the screening, on the terminal
            if b"[enter]" in ANSI.sub(b"", chunk):
                prompts += 1
                os.write(master, b"\n")  # the clinician confirms the placement
        rc = proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = ANSI.sub(b"", bytes(out)).decode(errors="replace")
    assert rc == 0, text[-3000:]
    assert "confirm placement at" in text and prompts >= 3
    assert "placement at" in text and "confirmed" in text
    assert "ended: COMPLETED" in text
    assert "Fitzpatrick skin type of the patient" in text
    db = sqlite3.connect(d.state_dir / "records.sqlite")
    try:
        assert db.execute("SELECT skin_type FROM sessions").fetchall() == [("V",)]
    finally:
        db.close()
