"""`pbmd sim`: run a simulated controller in the foreground.

Prints, one line each and flushed, ``link <url or pty path>``, ``control
<host:port>`` (not with ``--no-control``) and ``ready``, then serves until SIGINT
or SIGTERM (exit 0). Scripts, test harnesses and the daemon's embedded simulator
(daemon/services/sim_process.py) parse these lines to find the endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from typing import Any

from .applicators import APPLICATORS, default_ports
from .config import MAX_PORTS, MAX_TIME_SCALE, SimConfig
from .server import Simulator


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (port 0 = any free port)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _port_spec(text: str) -> tuple[int, str | None]:
    number, sep, name = text.partition("=")
    if not sep or not number.isdigit() or not 1 <= int(number) <= MAX_PORTS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not N=APPLICATOR with N in 1..{MAX_PORTS} (e.g. 4=probe_830)"
        )
    if name == "none":
        return int(number), None
    if name not in APPLICATORS:
        known = ", ".join(sorted(APPLICATORS))
        raise argparse.ArgumentTypeError(f"{name!r} is not an applicator: {known} or none")
    return int(number), name


def _time_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1.0 <= value <= MAX_TIME_SCALE:
        raise argparse.ArgumentTypeError(f"time scale must be within 1..{MAX_TIME_SCALE:g}")
    return value


def register(subparsers: Any) -> None:
    """Add the `sim` sub-command to `pbmd`."""
    p = subparsers.add_parser(
        "sim",
        help="run a simulated PBM-Link controller",
        description=(
            "Run a simulated PBM-Link controller (ICD v1) in the foreground. Prints "
            "'link ...', 'control HOST:PORT' and 'ready', then serves until SIGINT/SIGTERM."
        ),
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", type=_host_port, metavar="HOST:PORT", help="serve on TCP")
    where.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal")
    p.add_argument(
        "--time-scale",
        type=_time_scale,
        default=1.0,
        metavar="X",
        help=f"device clock speed-up, 1..{MAX_TIME_SCALE:g} (default 1)",
    )
    p.add_argument(
        "--control",
        type=_host_port,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="JSON-lines control channel (default 127.0.0.1:0, any free port)",
    )
    p.add_argument(
        "--no-control", action="store_true", help="open no control channel (no fault injection)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument(
        "--emission-delay-ms",
        type=int,
        default=SimConfig.emission_delay_ms,
        metavar="MS",
        help=f"delay between EMIT_START and light (default {SimConfig.emission_delay_ms})",
    )
    p.add_argument(
        "--serial", default=SimConfig.serial, help=f"serial number (default {SimConfig.serial})"
    )
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when the process that started it dies (Linux; the daemon's own simulator)",
    )
    p.add_argument(
        "--port",
        type=_port_spec,
        action="append",
        default=[],
        metavar="N=APPLICATOR|none",
        help="applicator of port N: duo_pad, probe_830, probe_905 or none (repeatable; "
        "default 1-3 duo_pad, 4 probe_905)",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help=f"run at SCHED_FIFO priority {REALTIME_PRIORITY}, as a controller has a processor "
        "of its own (root or CAP_SYS_NICE; otherwise a warning and normal scheduling)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of `pbmd sim`; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ports = default_ports()
    for number, name in args.port:
        ports[number] = name
    config = SimConfig(
        time_scale=args.time_scale,
        ports=ports,
        seed=args.seed,
        emission_delay_ms=args.emission_delay_ms,
        serial=args.serial,
    )
    try:
        config.validate()
    except ValueError as exc:
        print(f"pbmd sim: {exc}", file=sys.stderr)
        return 2
    if args.exit_with_parent:
        _exit_with_parent()
    if args.realtime:
        _realtime()
    try:
        asyncio.run(_serve(config, args))
    except OSError as exc:
        print(f"pbmd sim: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: SimConfig, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Simulator(config) as sim:
        if args.pty:
            link = await sim.listen_pty()
        else:
            link = await sim.listen_tcp(*args.tcp)
        print(f"link {link}", flush=True)
        if not args.no_control:
            control = await sim.listen_control(*args.control)
            print(f"control {control}", flush=True)
        print("ready", flush=True)
        await stop.wait()


REALTIME_PRIORITY = 20
"""Above the daemon's own SCHED_FIFO priority (10, daemon/services/scheduling.py): a
real controller never waits for the host's CPU, and a simulator that stands in for
one on the same machine must not either, or its own stalls read as link faults."""


def _realtime() -> None:
    """SCHED_FIFO at REALTIME_PRIORITY for this process (threads it starts later
    inherit it). A process that already runs real-time below it (the daemon's child:
    FIFO 10 inherited) is raised to it, so that the daemon's own threads never delay
    the controller; where that is refused (pbmd.service may forbid asking:
    RestrictRealtime=), it keeps what it inherited."""
    inherited_rt = os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR)
    if inherited_rt and os.sched_getparam(0).sched_priority >= REALTIME_PRIORITY:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except OSError as exc:
        if inherited_rt:
            return
        print(
            f"pbmd sim: --realtime refused ({exc.strerror or exc}; needs root or "
            "CAP_SYS_NICE); running at normal priority",
            file=sys.stderr,
        )


def _exit_with_parent() -> None:
    """SIGTERM when the parent dies (PR_SET_PDEATHSIG), as a controller loses its host:
    a killed daemon leaves no simulator behind."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)
