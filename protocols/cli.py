"""Protocol commands of `pbmd` and `pbmctl`.

`pbmd protocol schema` prints the JSON schema of the file format for editors.
`pbmctl protocol validate FILE…` checks files offline, without a daemon, and
prints what each step will deliver. Commands that need the daemon's library
(list, show, install, remove) are added by the control API.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from pbmd.protocols.errors import Issue, ProtocolInvalid
from pbmd.protocols.limits import DEFAULT_LIMITS
from pbmd.protocols.loader import LoadedProtocol, load_protocol
from pbmd.protocols.model import Mode, Protocol
from pbmd.protocols.signing import PublicKey, SignatureError, verify


def schema() -> dict[str, Any]:
    """The JSON schema of a protocol file."""
    return Protocol.model_json_schema()


def _cmd_schema(args: argparse.Namespace) -> int:
    out: TextIO = sys.stdout
    out.write(json.dumps(schema(), indent=2, ensure_ascii=False) + "\n")
    return 0


def register_pbmd(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pbmd protocol schema`."""
    protocol = subparsers.add_parser("protocol", help="protocol file tools")
    sub = protocol.add_subparsers(dest="protocol_command", required=True, metavar="COMMAND")
    cmd = sub.add_parser("schema", help="print the JSON schema of protocol files (for editors)")
    cmd.set_defaults(func=_cmd_schema)


def register_pbmctl(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pbmctl protocol validate` (offline)."""
    protocol = subparsers.add_parser("protocol", help="treatment protocols")
    sub = protocol.add_subparsers(dest="protocol_command", required=True, metavar="COMMAND")
    cmd = sub.add_parser(
        "validate",
        help="check protocol files offline and show what every step delivers",
        description="Check protocol files without a daemon. Exit status 0 when every file "
        "is valid, 1 otherwise.",
    )
    cmd.add_argument("files", nargs="+", metavar="FILE", type=Path)
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUBKEY",
        type=Path,
        help="also verify FILE.minisig against this minisign public key (repeatable)",
    )
    cmd.set_defaults(func=_cmd_validate)


# --------------------------------------------------------------------------


def _minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


def _print_protocol(console: Console, path: Path, loaded: LoadedProtocol, signed: str) -> None:
    protocol = loaded.protocol
    console.print(
        f"[bold green]VALID[/] {path}: [bold]{protocol.id}[/] v{protocol.version} — "
        f"{protocol.title}{signed}",
        highlight=False,
    )
    for number, port in sorted(protocol.ports.items()):
        app = port.applicator
        table = Table(
            title=f"port {number}: {app.kind.value}, "
            f"{', '.join(str(c) for c in app.channels_nm)} nm, {app.beam_area_cm2:g} cm²",
            title_justify="left",
            show_edge=False,
        )
        for heading in ("#", "site", "λ nm", "mode", "mW", "mW/cm²", "time", "J", "J/cm²", "gate"):
            table.add_column(heading, justify="left" if heading in ("site", "mode") else "right")
        for dose in (d for d in loaded.doses if d.port == number):
            step = port.steps[dose.index]
            mode = (
                f"pulsed {dose.pulse_hz} Hz {dose.duty * 1000:g}‰"
                if dose.mode is Mode.PULSED and dose.duty is not None
                else "cw"
            )
            gates = "".join(
                letter
                for letter, on in (
                    ("P", step.gating.confirm_placement),
                    ("C", step.gating.skin_contact),
                    ("F", step.gating.footswitch),
                )
                if on
            )
            table.add_row(
                str(dose.index + 1),
                dose.site,
                str(dose.wavelength_nm),
                mode,
                f"{dose.power_mw:.4g}",
                f"{dose.irradiance_mw_cm2:.4g}",
                f"{dose.time_s:.0f} s",
                f"{dose.energy_j:.4g}",
                f"{dose.fluence_j_cm2:.3g}",
                gates or "-",
            )
        console.print(table)
    course = protocol.course
    console.print(
        f"session: {_minutes(loaded.session_time_s)} of emission (phases one after another, "
        f"the ports of a phase at once); course: {course.sessions} sessions, at least "
        f"{course.interval_days:g} days apart; gates: P placement confirmed, C skin contact, "
        "F footswitch",
        highlight=False,
    )
    console.print("[bold]timeline[/] (if nobody waits)")
    for line in loaded.timeline().lines():
        console.print(f"  {line}", highlight=False, markup=False)
    console.print("[bold]sources[/]")
    for evidence in protocol.evidence:
        console.print(f"  {evidence.ref}: {evidence.relevance}", highlight=False, markup=False)
    for number, port in sorted(protocol.ports.items()):
        for index, step in enumerate(port.steps):
            parts = [f"{', '.join(step.sources)}: {step.basis}"] if step.sources else []
            if step.assumption:
                parts.append(f"assumption: {step.assumption}")
            if not parts:
                continue
            said = "; ".join(parts)
            console.print(
                f"  port {number} step {index + 1} dose — {said}", highlight=False, markup=False
            )
    for total in protocol.totals:
        parts = [f"{', '.join(total.sources)}: {total.basis}"] if total.sources else []
        if total.assumption:
            parts.append(f"assumption: {total.assumption}")
        stated = ", ".join(
            text
            for text in (
                None if total.energy_j is None else f"{total.energy_j:g} J",
                None if total.points is None else f"{total.points} points",
            )
            if text
        )
        console.print(
            f"  total {total.label}: {stated} — {'; '.join(parts)}", highlight=False, markup=False
        )
    for line in loaded.v1_reading:
        console.print(f"[yellow]{line}[/]", highlight=False)


def _print_issue(console: Console, issue: Issue) -> None:
    colour = "red" if issue.severity.value == "error" else "yellow"
    console.print(f"  {issue}", style=colour, highlight=False, markup=False, soft_wrap=True)


def _cmd_validate(args: argparse.Namespace) -> int:
    out: TextIO = sys.stdout
    console = Console(file=out, width=120, soft_wrap=True)
    keys: list[PublicKey] = []
    for key_path in args.key:
        try:
            keys.append(PublicKey.from_file(key_path))
        except (OSError, SignatureError) as exc:
            console.print(f"[red]cannot use key {key_path}: {exc}[/]", highlight=False)
            return 2
    results: list[dict[str, Any]] = []
    all_valid = True
    for path in args.files:
        entry: dict[str, Any] = {"file": str(path)}
        try:
            loaded = load_protocol(path, DEFAULT_LIMITS)
        except ProtocolInvalid as exc:
            all_valid = False
            entry.update(
                valid=False,
                errors=[i.as_dict() for i in exc.errors],
                warnings=[i.as_dict() for i in exc.warnings],
            )
            if not args.json:
                console.print(
                    f"[bold red]INVALID[/] {path}: {len(exc.errors)} error(s)", highlight=False
                )
                for issue in (*exc.errors, *exc.warnings):
                    _print_issue(console, issue)
            results.append(entry)
            continue
        signed = ""
        signature_error: str | None = None
        if keys:
            sig_path = Path(str(path) + ".minisig")
            try:
                verified = verify(path.read_bytes(), sig_path.read_bytes(), keys)
                signed = f" (signed by {verified.key.id_hex})"
                entry["signed_by"] = verified.key.id_hex
            except FileNotFoundError:
                signature_error = f"no signature file {sig_path}"
            except (OSError, SignatureError) as exc:
                signature_error = f"signature refused: {exc}"
        entry.update(
            valid=signature_error is None,
            protocol=loaded.as_dict(),
            errors=[],
            warnings=[i.as_dict() for i in loaded.warnings],
        )
        if signature_error is not None:
            all_valid = False
            entry["errors"] = [{"rule": "signature", "message": signature_error}]
        if not args.json:
            if signature_error is not None:
                console.print(f"[bold red]INVALID[/] {path}: {signature_error}", highlight=False)
            else:
                _print_protocol(console, path, loaded, signed)
            for issue in loaded.warnings:
                _print_issue(console, issue)
        results.append(entry)
    if args.json:
        out.write(
            json.dumps({"valid": all_valid, "files": results}, indent=2, ensure_ascii=False) + "\n"
        )
    return 0 if all_valid else 1
