"""`pbmd demo` (the README's `make run`): the daemon and pbmctl, end to end, on the simulator.

It runs what a clinic would run, as separate processes: `pbmd run` on the
embedded default configuration (a simulated four-port controller, its device
clock sped up), then `pbmctl` over the control socket: the status, the
chronic lumbar protocol in the live view, and the treatment report. The
placements the protocol gates on are confirmed by pbmctl itself
(`--auto-confirm`), which the screen says; in a clinic the clinician
confirms each one. Finally the daemon is stopped with SIGTERM, as systemd
would, and must exit cleanly.

State (records, protocol library, socket) lives in a temporary directory that
is removed at the end unless `--keep` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from rich.console import Console

PROTOCOL = "lumbar-chronic-nonspecific"
PROTOCOL_EMISSION_S = 2480
"""Its emission time: pads 2 × 1000 s, then four probe points of 120 s (docs/library.md)."""
PATIENT = "DEMO-0001"
SKIN_TYPE = "III"
"""The demonstration patient's Fitzpatrick skin type, asked at session start."""
SCREENING = (
    "cancer",
    "pregnancy",
    "recent-radiotherapy",
    "bleeding-disorder",
    "deep-vein-thrombosis",
    "photosensitivity",
    "reduced-sensation",
)
DEFAULT_TIME_SCALE = 30.0
"""×30, not faster: every millisecond the host is late is that many ms of device time.
At ×60 a stop 5 ms late on a busy machine overran a probe point's energy budget
(E404); at ×30 the 41-minute protocol still takes under two minutes
(docs/performance.md, "Isolation of the safety core")."""
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class DemoFailed(Exception):
    pass


async def _copy_until_ready(
    proc: asyncio.subprocess.Process, log_file: Path, ready: asyncio.Event
) -> None:
    """Keep the daemon's JSON log in a file; note the line that says it is ready."""
    assert proc.stdout is not None
    with log_file.open("ab") as out:
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            out.write(line)
            out.flush()
            if not ready.is_set() and b'"daemon.ready"' in line:
                ready.set()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def _pbmctl(console: Console, env: dict[str, str], *args: str, show: bool = True) -> int:
    if show:
        console.print(f"\n[bold cyan]$ pbmctl {shlex.join(args)}[/]", highlight=False)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pbmd.daemon.clients.pbmctl", *args, env=env
    )
    return await proc.wait()


async def _pbmctl_json(env: dict[str, str], *args: str) -> object:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pbmd.daemon.clients.pbmctl",
        "--json",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise DemoFailed(f"pbmctl {' '.join(args)} failed (exit {proc.returncode})")
    return json.loads(out)


async def run_demo(time_scale: float, keep: bool, console: Console) -> int:
    state = Path(tempfile.mkdtemp(prefix="pbmd-demo-"))
    sock = state / "control.sock"
    log_file = state / "pbmd.log"
    env = {**os.environ, "PBMD_SOCKET": str(sock)}
    console.rule("[bold]pbmd demo[/]")
    console.print(
        "pbmd runs on its embedded default configuration: a simulated four-port controller "
        f"(device clock ×{time_scale:g}, so the protocol's {PROTOCOL_EMISSION_S // 60} minutes of "
        f"emission take about {PROTOCOL_EMISSION_S / time_scale:.0f} s) and the shipped "
        "protocols signed with the TEST key "
        "(NOT FOR CLINICAL USE).\n"
        f"state directory {state} · daemon log {log_file}",
        highlight=False,
    )
    daemon = await _start_daemon(console, time_scale, state, sock)
    ready = asyncio.Event()
    copier = asyncio.create_task(_copy_until_ready(daemon, log_file, ready))
    code = 1
    try:
        await _wait_ready(daemon, ready)
        if not ready.is_set():
            raise DemoFailed(f"pbmd did not become ready:\n{_tail(log_file)}")
        console.print(f"pbmd is ready (pid {daemon.pid})")
        code = await _treat(console, env)
    except DemoFailed as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        code = 1
    finally:
        code = await _stop(daemon, console, log_file, code)
        with contextlib.suppress(asyncio.CancelledError):
            await copier
        if keep:
            console.print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    return code


async def _start_daemon(
    console: Console, time_scale: float, state: Path, sock: Path
) -> asyncio.subprocess.Process:
    """`pbmd run` on the embedded default, in its own session (Ctrl-C reaches pbmctl;
    the daemon is stopped by _stop); under SCHED_FIFO where allowed, as pbmd.service
    runs it: at nice 0 a saturated machine starved it (and its simulator) past the
    telemetry staleness limit (E201)."""
    cmd = [
        sys.executable,
        "-m",
        "pbmd.daemon.cli",
        "run",
        "--sim-time-scale",
        str(time_scale),
        "--state-dir",
        str(state),
        "--socket",
        str(sock),
        "--log-format",
        "json",
        "--realtime",
    ]
    console.print(f"\n[bold cyan]$ pbmd {shlex.join(cmd[3:])} &[/]", highlight=False)
    return await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )


async def _wait_ready(daemon: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
    """Until the daemon says it is ready, exits, or READY_TIMEOUT_S passes."""
    waiter = asyncio.create_task(daemon.wait())
    got_ready = asyncio.create_task(ready.wait())
    await asyncio.wait(
        {waiter, got_ready}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    for task in (waiter, got_ready):
        task.cancel()
    await asyncio.gather(waiter, got_ready, return_exceptions=True)


async def _treat(console: Console, env: dict[str, str]) -> int:
    """What a clinic would run through pbmctl: status, the session live, its report."""
    await _pbmctl(console, env, "status")
    answers = [arg for name in SCREENING for arg in ("--contraindication", f"{name}=no")]
    console.print(
        "\n[bold yellow]The protocol gates every pad placement and every probe point on "
        "the clinician's confirmation. In this demonstration pbmctl confirms them itself "
        "(--auto-confirm) and says so.[/]"
    )
    started = await _pbmctl(
        console,
        env,
        "session",
        "start",
        PROTOCOL,
        "--patient",
        PATIENT,
        *answers,
        "--skin-type",
        SKIN_TYPE,
        "--auto-confirm",
    )
    listing = await _pbmctl_json(env, "records", "list", "--limit", "1")
    sessions = listing.get("sessions") if isinstance(listing, dict) else None
    if not sessions:
        raise DemoFailed("no session was recorded")
    session_id = str(sessions[0]["id"])
    await _pbmctl(console, env, "report", session_id)
    return 0 if started == 0 else started


async def _stop(
    daemon: asyncio.subprocess.Process, console: Console, log_file: Path, code: int
) -> int:
    if daemon.returncode is None:
        console.print(f"\n[bold cyan]$ kill -TERM {daemon.pid}[/]   (as systemd stops pbmd)")
        daemon.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.wait_for(daemon.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            daemon.kill()
            await daemon.wait()
            console.print("[bold red]pbmd did not stop within 30 s and was killed[/]")
            return code or 1
    else:
        rc = daemon.returncode
    if rc == 0:
        console.print(
            "pbmd stopped cleanly (exit 0): emission off, records flushed, socket removed"
        )
        return code
    console.print(f"[bold red]pbmd exited with {rc}[/]\n{_tail(log_file)}", highlight=False)
    return code or 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run pbmd and pbmctl end to end on the simulator (what `make run` runs)",
        description="Start `pbmd run` on the embedded default (simulated controller), run the "
        "chronic lumbar protocol through pbmctl in the live view with gated steps confirmed "
        "automatically, print the treatment report, stop the daemon.",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=DEFAULT_TIME_SCALE,
        help=f"device clock speed-up, 1..120 ({DEFAULT_TIME_SCALE:g})",
    )
    p.add_argument("--keep", action="store_true", help="keep the state directory")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    console = Console()
    try:
        return asyncio.run(run_demo(args.time_scale, args.keep, console))
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
