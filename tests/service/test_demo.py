"""The README's job (`make run` runs `pbmd demo`) on a terminal, end to end."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

from .harness import PBMD

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
    rc, text = run_on_a_terminal([*PBMD, "demo", "--time-scale", "120"], timeout_s=240)
    assert rc == 0, text[-3000:]
    assert "pbmd is ready" in text
    assert "confirms every gated placement by itself" in text
    assert "confirmed automatically (--auto-confirm)" in text
    assert "━" in text  # the live view's progress bars
    assert "lumbar-chronic-nonspecific" in text
    assert "PHOTOBIOMODULATION TREATMENT REPORT" in text
    assert "Outcome           COMPLETED" in text
    assert "pbmd stopped cleanly (exit 0)" in text
