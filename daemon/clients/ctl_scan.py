"""`pbmctl controller scan`: the PBM-Link controllers attached to this computer.

It runs locally, without the daemon: it lists USB devices with a controller's
VID:PID (those of the configuration's ``usb://`` links, 1209:0001 for
development units, and any given with ``--id``) and the serial ports those
IDs provide or the configuration names, each with its serial number, the link
URL to configure, and whether this user can open it (and the fix if not).
Nothing is claimed and no serial port is opened: a controller that a running
pbmd holds is not disturbed (a HELLO on its port would take its link over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pbmd.drivers import usb as usb_link
from pbmd.drivers.transport import LinkError, LinkURLError

SERIAL_FIX = (
    "add the user to the device's group (ls -l shows it; usually dialout, or pbmd with "
    "systemd/60-pbm-controller.rules installed) and log in again"
)


@dataclass(frozen=True)
class Found:
    """One attached controller (or candidate), as the scan shows it."""

    transport: str
    ids: str
    serial: str | None
    link: str
    where: str
    problem: str | None


def configured_links(config_file: Path | None) -> list[str]:
    """The links of the configuration's controllers; none if it cannot be read."""
    from pbmd.daemon.services import config as cfg

    path = config_file or (
        Path(os.environ["PBMD_CONFIG"]) if os.environ.get("PBMD_CONFIG") else None
    )
    if path is None and os.access(cfg.SYSTEM_CONFIG, os.R_OK):
        path = cfg.SYSTEM_CONFIG
    if path is None:
        return []
    try:
        config, _ = cfg.load(path)
    except cfg.ConfigError:
        return []
    return [c.link for c in config.controllers]


def targets_for(links: list[str], ids: list[str]) -> list[usb_link.UsbTarget]:
    """The VID:PIDs to look for: given, configured, and the development test ID."""
    targets = [usb_link.parse_usb_url(f"usb://{i}") for i in ids]
    for link in links:
        if link.lower().startswith("usb://"):
            t = usb_link.parse_usb_url(link)
            targets.append(usb_link.UsbTarget(t.vid, t.pid, None, t.backend))
    targets.append(usb_link.UsbTarget(usb_link.TEST_VENDOR_ID, usb_link.TEST_PRODUCT_ID))
    return targets


def scan_usb(targets: list[usb_link.UsbTarget]) -> tuple[list[Found], list[str]]:
    try:
        devices = usb_link.scan_usb(targets)
    except LinkError as exc:
        return [], [f"usb: {exc}"]
    found = [
        Found("usb", d.ids, d.serial, d.url, f"bus {d.bus} address {d.address}", d.problem)
        for d in devices
    ]
    return found, []


def scan_serial(targets: list[usb_link.UsbTarget], links: list[str]) -> list[Found]:
    """Serial ports with a target's VID:PID, and the serial links the configuration names."""
    from serial.tools import list_ports

    wanted = {(t.vid, t.pid) for t in targets}
    named = {
        link.removeprefix("serial://") for link in links if link.startswith(("/dev/", "serial://"))
    }
    found: list[Found] = []
    for port in list_ports.comports():
        aliases = {port.device, *(p for p in named if os.path.realpath(p) == port.device)}
        if (port.vid, port.pid) not in wanted and not aliases & named:
            continue
        ids = f"{port.vid:04x}:{port.pid:04x}" if port.vid is not None else "-"
        link = min(aliases & named or {by_id(port.device) or port.device})
        ok = os.access(port.device, os.R_OK | os.W_OK)
        problem = None if ok else f"{port.device}: permission denied; {SERIAL_FIX}"
        found.append(Found("serial", ids, port.serial_number, link, port.device, problem))
    return found


def by_id(device: str) -> str | None:
    """The stable /dev/serial/by-id/ name of a serial device, if udev made one."""
    folder = Path("/dev/serial/by-id")
    if not folder.is_dir():
        return None
    for entry in sorted(folder.iterdir()):
        if os.path.realpath(entry) == device:
            return str(entry)
    return None


def render(found: list[Found], notes: list[str]) -> str:
    if not found:
        lines = [
            "no PBM-Link controller found: check that it is powered and its USB cable plugged "
            "in (lsusb lists what is attached); a controller with its own VID:PID is found "
            "with --id VID:PID or when a usb:// link in the configuration names it"
        ]
    else:
        lines = []
        for f in found:
            state = "ok: pbmd can open it as this user" if f.problem is None else f.problem
            lines.append(
                f"{f.transport:6} {f.ids:9}  serial {f.serial or '?':16}  {f.where}\n"
                f'       link = "{f.link}"\n       {state}'
            )
    return "\n".join(lines + notes)


def cmd_scan(args: argparse.Namespace) -> int:
    links = configured_links(args.config)
    try:
        targets = targets_for(links, args.ids)
    except LinkURLError:
        print("pbmctl: --id takes VID:PID in hexadecimal, e.g. --id 1209:0001", file=sys.stderr)
        return 2
    found, notes = scan_usb(targets)
    found += scan_serial(targets, links)
    if args.json:
        out: dict[str, Any] = {"controllers": [asdict(f) for f in found], "notes": notes}
        print(json.dumps(out, indent=2))
    else:
        print(render(found, notes))
    return 0


def register(controller_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = "list PBM-Link controllers on USB and serial ports, and whether pbmd can open them"
    p = controller_commands.add_parser("scan", help=text, description=text)
    p.add_argument(
        "--id",
        dest="ids",
        action="append",
        default=[],
        metavar="VID:PID",
        help="also look for this USB ID (hexadecimal; repeat for several)",
    )
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_scan)
