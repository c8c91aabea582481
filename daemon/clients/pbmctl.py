"""`pbmctl`: the clinician's and technician's command line.

Every command but `protocol validate` (offline, from pbmd.protocols) talks to
the daemon over its control socket (JSON-RPC 2.0, docs/api.md). `--json`
prints what the daemon returned, for scripts; otherwise the output is for
people, with a live view of a running session. Exit statuses are listed by
`pbmctl --help` and in docs/api.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from pbmd.daemon.clients import ctl_courses, ctl_scan
from pbmd.daemon.clients import ctl_view as view
from pbmd.daemon.clients.ctl_client import (
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SESSION_FAILED,
    EXIT_USAGE,
    Client,
    CtlError,
    RemoteError,
    find_socket,
    parse_answers,
    parse_ports,
)
from pbmd.daemon.clients.ctl_follow import follow


class Out:
    """Where results go: JSON for scripts, rich for people; errors to stderr."""

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode
        # Off a terminal (logs, pipes) rich would wrap at 80 columns; tables need more.
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
        # Off a terminal (logs, scripts) a message stays on one line, however long.
        self.err = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())

    def data(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def line(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def result(self, value: Any, human: Callable[[Console], None]) -> None:
        if self.json:
            self.data(value)
        else:
            human(self.console)

    def error(self, exc: CtlError) -> None:
        if self.json:
            self.data({"error": exc.as_dict()})
            return
        self.err.print(f"[bold red]pbmctl:[/] {exc.message}", markup=True)
        data = exc.data if isinstance(exc, RemoteError) else None
        if isinstance(data, Mapping):
            for issue in (data.get("issues") or [])[:20]:
                if isinstance(issue, Mapping):
                    self.err.print(f"  {issue.get('message')}", markup=False)
            for err in (data.get("errors") or [])[:20]:
                if isinstance(err, Mapping):
                    self.err.print(f"  {err.get('param')}: {err.get('problem')}", markup=False)


Command = Callable[[argparse.Namespace, Client, Out], Awaitable[int]]


# --------------------------------------------------------------------------- commands


async def cmd_status(args: argparse.Namespace, client: Client, out: Out) -> int:
    st = await client.call("status")
    out.result(st, lambda c: view.render_status(c, st))
    return EXIT_OK


async def cmd_protocol_list(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("protocol.list")
    out.result(res, lambda c: view.render_protocol_list(c, res["protocols"]))
    return EXIT_OK


async def cmd_protocol_show(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("protocol.show", {"id": args.id, "source": args.source})

    def human(c: Console) -> None:
        view.render_protocol(c, res)
        if args.source:
            c.print(res["source"], markup=False, highlight=False)

    out.result(res, human)
    return EXIT_OK


def _read_protocol_files(path: Path, signature: Path | None) -> dict[str, Any]:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"cannot read {path}: {exc}") from None
    sig_path = signature or Path(str(path) + ".minisig")
    params: dict[str, Any] = {"content": content, "filename": path.name}
    try:
        params["signature"] = sig_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if signature is not None:
            raise CtlError(f"no signature file {signature}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"cannot read {sig_path}: {exc}") from None
    return params


async def cmd_protocol_install(args: argparse.Namespace, client: Client, out: Out) -> int:
    params = _read_protocol_files(args.file, args.signature)
    res = await client.call("protocol.install", params)
    e = res["installed"]
    out.result(
        res,
        lambda c: c.print(
            f"installed [bold]{e['id']}[/] v{e['version']} — {e['title']} "
            f"({'signed by ' + e['signed_by'] if e.get('signed_by') else '[bold red]UNSIGNED[/]'})"
        ),
    )
    return EXIT_OK


async def cmd_protocol_remove(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("protocol.remove", {"id": args.id})
    e = res["removed"]
    out.result(
        res,
        lambda c: c.print(
            f"removed {e['id']} v{e['version']}; a later install needs a version above "
            f"{e['version']}"
        ),
    )
    return EXIT_OK


async def cmd_protocol_check(args: argparse.Namespace, client: Client, out: Out) -> int:
    """`protocol validate --daemon FILE`: check a file against the daemon's keys and limits."""
    params = _read_protocol_files(args.file, args.signature)
    res = await client.call("protocol.validate", params)

    def human(c: Console) -> None:
        if res["valid"]:
            c.print(f"[bold green]VALID[/] for this daemon, signed by {res.get('signed_by')}")
            view.render_protocol(c, res)
        else:
            c.print(f"[bold red]REFUSED[/] ({res['fault']}): {res['message']}")

    out.result(res, human)
    return EXIT_OK if res["valid"] else EXIT_REFUSED


def _ask_contraindications(out: Out, data: Mapping[str, Any]) -> dict[str, bool]:
    answers: dict[str, bool] = {}
    out.console.print("[bold]Screening: answer each contraindication of this protocol.[/]")
    descriptions = data.get("descriptions") or {}
    for name in data.get("missing") or []:
        while True:
            text = out.console.input(f"  {name} — {descriptions.get(name, '')}? [y/n] ")
            if text.strip().lower() in ("y", "yes", "n", "no"):
                answers[name] = text.strip().lower() in ("y", "yes")
                break
    return answers


SKIN_TYPES = ("I", "II", "III", "IV", "V", "VI")


def _ask_skin_type(out: Out) -> str:
    """The patient's Fitzpatrick skin type, asked on a terminal like the screening."""
    while True:
        text = out.console.input(
            "  Fitzpatrick skin type of the patient (I lightest … VI darkest)? "
        )
        if text.strip().upper() in SKIN_TYPES:
            return text.strip().upper()


async def cmd_session_start(args: argparse.Namespace, client: Client, out: Out) -> int:
    try:
        answers = parse_answers(args.contraindication)
        ports = parse_ports(args.ports) if args.ports else None
    except ValueError as exc:
        out.err.print(f"pbmctl: {exc}")
        return EXIT_USAGE
    watch = args.watch or args.auto_confirm
    if args.course is not None:
        return await _course_session_start(args, client, out, answers, ports, watch)
    if args.patient is None or args.protocol is None:
        out.err.print("pbmctl: give PROTOCOL and --patient REF, or --course COURSE")
        return EXIT_USAGE
    params: dict[str, Any] = {
        "protocol": args.protocol,
        "patient_ref": args.patient,
        "contraindications": answers,
        "watch": watch,
    }
    if ports:
        params["ports"] = ports
    skin_type = args.skin_type
    if skin_type is None and not out.json and sys.stdin.isatty():
        skin_type = _ask_skin_type(out)
    if skin_type is not None:
        params["skin_type"] = skin_type
    try:
        res = await client.call("session.start", params)
    except RemoteError as exc:
        data = exc.data if isinstance(exc.data, Mapping) else {}
        if data.get("missing") and not out.json and sys.stdin.isatty():
            out.err.print(f"pbmctl: {exc.message}")
            params["contraindications"] = {**answers, **_ask_contraindications(out, data)}
            res = await client.call("session.start", params)
        else:
            raise
    if not watch:
        out.result(
            res,
            lambda c: c.print(
                f"session [bold]{res['session_id']}[/] started ({args.protocol}, patient "
                f"{args.patient}); follow it with `pbmctl session watch`"
            ),
        )
        return EXIT_OK
    return await follow(client, out, res["session_id"], res["status"], args.auto_confirm)


async def _course_session_start(
    args: argparse.Namespace,
    client: Client,
    out: Out,
    answers: dict[str, bool],
    ports: list[int] | None,
    watch: bool,
) -> int:
    """`session start --course`: the course's protocol, patient and skin type."""
    params: dict[str, Any] = {
        "course_id": args.course,
        "contraindications": answers,
        "watch": watch,
    }
    if ports:
        params["ports"] = ports
    if args.override_reason:
        params["override_reason"] = args.override_reason
    res = await client.call("course.session_start", params)
    place = res["course"]
    if not watch:
        out.result(
            res,
            lambda c: c.print(
                f"session [bold]{res['session_id']}[/] started: session {place['number']} of "
                f"{place['of']} of course {place['course_id']}"
            ),
        )
        return EXIT_OK
    return await follow(client, out, res["session_id"], res["status"], args.auto_confirm)


async def cmd_session_watch(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("session.watch", {"session_id": args.session} if args.session else None)
    if res["session_id"] is None:
        if out.json:
            out.line(res)
        else:
            out.err.print(
                "pbmctl: no session since pbmd started; start one with `pbmctl session start`"
            )
        return EXIT_REFUSED
    if not res["watching"]:
        status = res["status"]
        if out.json:  # the same JSON lines as a followed session: its status, its end
            out.line({"session_id": res["session_id"], "status": status})
            out.line({"session_id": res["session_id"], "state": status["state"]})
        else:
            sv = view.SessionView(status, auto_confirm=False, interactive=False)
            out.console.print(sv.render_final())
        return EXIT_OK if status["state"] == "completed" else EXIT_SESSION_FAILED
    return await follow(client, out, res["session_id"], res["status"], args.auto_confirm)


def _one_call(method: str, key: str, text: str) -> Command:
    """A command that passes one argument in one call and, when it succeeds, prints
    ``text`` formatted with the arguments (and ``{ports}``: "port N" or "all ports").
    ``key`` names the argument; "port?" sends the port only when one was given."""

    async def run(args: argparse.Namespace, client: Client, out: Out) -> int:
        port = getattr(args, "port", None)
        if key == "port?":
            params: dict[str, Any] = {"port": port} if port is not None else {}
        else:
            params = {key: getattr(args, key)}
        res = await client.call(method, params)
        ports = f"port {port}" if port is not None else "all ports"
        line = text.format(**vars(args), ports=ports)
        out.result(res, lambda c: c.print(line))
        return EXIT_OK

    return run


cmd_session_confirm = _one_call("session.confirm", "port", "port {port}: placement confirmed")
cmd_session_pause = _one_call(
    "session.pause", "port?", "{ports}: paused; resume with `pbmctl session resume`"
)
cmd_session_resume = _one_call("session.resume", "port?", "{ports}: resumed")
cmd_clear_fault = _one_call(
    "controller.clear_fault", "controller", "controller {controller}: fault cleared"
)
cmd_service_clear = _one_call(
    "service.clear", "note", "service latch cleared; sessions may start again"
)


async def cmd_session_acknowledge(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("session.acknowledge", {"code": args.code, "note": args.note})
    out.result(
        res,
        lambda c: c.print(
            f"{res['acknowledged']} acknowledged by {res['user']}; sessions may start again"
        ),
    )
    return EXIT_OK


async def cmd_session_abort(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("session.abort", {"reason": args.reason})
    out.result(res, lambda c: c.print(f"session {res['session_id']}: {res['state']}; emission off"))
    return EXIT_OK


def _clinic_params(args: argparse.Namespace) -> dict[str, Any]:
    """``--clinic`` (and ``--patient``): read the clinic database, every workstation."""
    out: dict[str, Any] = {}
    if getattr(args, "clinic", False):
        out["clinic"] = True
    if getattr(args, "patient", None):
        out["patient_ref"] = args.patient
    return out


async def cmd_records_list(args: argparse.Namespace, client: Client, out: Out) -> int:
    params: dict[str, Any] = {"limit": args.limit, **_clinic_params(args)}
    if args.since:
        params["since_utc"] = args.since
    res = await client.call("records.list", params)
    # A clinic-wide list says where each session was given.
    shown = [
        {**s, "id": f"{s['id']} ({s['workstation_id']})"} if "workstation_id" in s else s
        for s in res["sessions"]
    ]
    out.result(res, lambda c: view.render_records(c, shown))
    return EXIT_OK


async def cmd_records_show(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("records.show", {"session_id": args.session, **_clinic_params(args)})
    out.result(res, lambda c: view.render_record(c, res["session"]))
    return EXIT_OK


async def cmd_records_export(args: argparse.Namespace, client: Client, out: Out) -> int:
    params: dict[str, Any] = {"format": args.format, **_clinic_params(args)}
    if args.since:
        params["since_utc"] = args.since
    if args.session:
        params["session_ids"] = args.session
    res = await client.call("records.export", params, timeout_s=600)
    if args.output is not None:
        try:
            args.output.write_text(res["content"], encoding="utf-8")
        except OSError as exc:
            raise CtlError(f"cannot write {args.output}: {exc}") from None
        summary = {
            "format": res["format"],
            "output": str(args.output),
            "bytes": len(res["content"].encode()),
        }
        out.result(summary, lambda c: c.print(f"wrote {summary['bytes']} bytes to {args.output}"))
    elif out.json:
        out.data(res)
    else:
        sys.stdout.write(res["content"])
    return EXIT_OK


async def cmd_report(args: argparse.Namespace, client: Client, out: Out) -> int:
    fmt = "json" if out.json else "text"
    params = {"session_id": args.session, "format": fmt, **_clinic_params(args)}
    res = await client.call("report.get", params)
    if out.json:
        out.data(res)
    else:
        sys.stdout.write(res["text"])
    return EXIT_OK


async def cmd_calibration_show(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("calibration.get")
    out.result(
        res,
        lambda c: c.print(
            f"calibration due {res['due'] or '(none)'}"
            + (" [bold red]OVERDUE[/]" if res["overdue"] else "")
            + f" · {res['source']}"
        ),
    )
    return EXIT_OK


async def cmd_calibration_set(args: argparse.Namespace, client: Client, out: Out) -> int:
    res = await client.call("calibration.set", {"due": args.due})
    out.result(res, lambda c: c.print(f"calibration due {res['due']} · {res['source']}"))
    if res.get("overdue"):
        out.err.print(
            f"[bold yellow]pbmctl: warning:[/] {res['due']} is already past: calibration is "
            "overdue and the next session start will be refused (E602) until a date after "
            "today is set, once the system is recalibrated",
            markup=True,
        )
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError("parser has no sub-commands")


class UsageError(CtlError):
    """A wrong command line, with the usage of the command it was meant for."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage

    def as_dict(self) -> dict[str, Any]:
        return {"message": self.message, "usage": self.usage.strip(), "exit_code": self.exit_code}


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting, so that `--json`
    can answer a wrong command line with a JSON error as it answers every other error.
    Sub-command parsers are of this class too (argparse makes them of their parent's)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pbmctl",
        description="pbmctl: control and inspect a pbmd photobiomodulation daemon",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status:\n"
        + "\n".join(f"  {code:3d}  {text}" for code, text in EXIT_CODES.items()),
    )
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="the daemon's control socket (default: $PBMD_SOCKET, the configuration, "
        "/run/pbmd/control.sock, the user's runtime or state directory)",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="read the socket path from this configuration"
    )
    parser.add_argument("--json", dest="global_json", action="store_true", help="JSON output")
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="reply timeout (default 60 s)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = _Adder()
    add(sub, "status", cmd_status, "daemon, controllers, ports, records, current session")
    _add_protocol_commands(sub, add)
    _add_session_commands(sub, add)
    _add_records_commands(sub, add)
    _add_upkeep_commands(sub, add)
    ctl_courses.register(sub, add)
    return parser


class _Adder:
    """Adds a command to a group; every command takes --json and --socket after its name."""

    def __init__(self) -> None:
        self.common = _Parser(add_help=False)
        self.common.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="JSON output"
        )
        self.common.add_argument(
            "--socket",
            type=Path,
            metavar="PATH",
            default=argparse.SUPPRESS,
            help="the daemon's control socket",
        )

    def __call__(
        self, subs: argparse._SubParsersAction[Any], name: str, fn: Command, text: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subs.add_parser(
            name, help=text, description=text, parents=[self.common]
        )
        p.set_defaults(run=fn)
        return p


def _add_protocol_commands(sub: argparse._SubParsersAction[Any], add: _Adder) -> None:
    from pbmd.protocols import cli as protocol_cli

    protocol_cli.register_pbmctl(sub)
    psub = _subparsers(sub.choices["protocol"])
    add(psub, "list", cmd_protocol_list, "installed protocols")
    p = add(psub, "show", cmd_protocol_show, "an installed protocol, step by step")
    p.add_argument("id", metavar="ID")
    p.add_argument("--source", action="store_true", help="also print the file")
    p = add(psub, "install", cmd_protocol_install, "install a signed protocol file (technician)")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--signature", type=Path, metavar="SIG", help="default: FILE.minisig")
    p = add(psub, "remove", cmd_protocol_remove, "uninstall a protocol (technician)")
    p.add_argument("id", metavar="ID")
    p = add(
        psub,
        "check",
        cmd_protocol_check,
        "check a file as the daemon would install it (its keys and limits), without installing",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--signature", type=Path, metavar="SIG", help="default: FILE.minisig")


def _session_start_usage(args: argparse.Namespace) -> str | None:
    """What a `session start` command line lacks, found before pbmd is asked."""
    if args.course is None and (args.protocol is None or args.patient is None):
        return "give PROTOCOL and --patient REF, or --course COURSE"
    return None


def _add_session_commands(sub: argparse._SubParsersAction[Any], add: _Adder) -> None:
    session = sub.add_parser("session", help="treatment sessions")
    ssub = session.add_subparsers(dest="session_command", required=True, metavar="COMMAND")
    p = add(ssub, "start", cmd_session_start, "start a protocol for a patient (clinician)")
    p.add_argument("protocol", metavar="PROTOCOL", nargs="?", help="not with --course")
    p.set_defaults(usage_parser=p, usage_check=_session_start_usage)
    p.add_argument("--patient", metavar="REF", help="the patient's reference")
    p.add_argument(
        "--course",
        metavar="COURSE",
        help="the next session of this course (its patient, "
        "protocol and skin type; the plan is checked first)",
    )
    p.add_argument("--override-reason", metavar="TEXT", help="override the course plan's refusal")
    p.add_argument("--ports", metavar="LIST", help="a subset of the protocol's ports, e.g. 1,2")
    p.add_argument(
        "--contraindication",
        action="append",
        default=[],
        metavar="NAME=yes|no",
        help="a screening answer (repeat for each; asked for when missing on a terminal)",
    )
    p.add_argument(
        "--skin-type",
        choices=("I", "II", "III", "IV", "V", "VI"),
        type=str.upper,
        help="the patient's Fitzpatrick skin type (asked for when missing on a terminal); "
        "recorded, and lowers irradiance ceilings where the site configures a derating",
    )
    p.add_argument("--watch", action="store_true", help="follow the session live")
    p.add_argument(
        "--auto-confirm",
        action="store_true",
        help="confirm every gated placement automatically (demonstration only; implies --watch)",
    )
    ctl_courses.register_session_export(ssub, add)
    p = add(ssub, "watch", cmd_session_watch, "follow the running session live")
    p.add_argument(
        "session", nargs="?", metavar="SESSION", help="its id or a unique prefix (default: current)"
    )
    p.add_argument("--auto-confirm", action="store_true", help="demonstration only")
    p = add(ssub, "confirm", cmd_session_confirm, "confirm the placement on a port (clinician)")
    p.add_argument("port", type=int, metavar="PORT")
    p = add(ssub, "pause", cmd_session_pause, "pause one port or all (clinician)")
    p.add_argument("port", type=int, nargs="?", metavar="PORT")
    p = add(ssub, "resume", cmd_session_resume, "resume one port or all (clinician)")
    p.add_argument("port", type=int, nargs="?", metavar="PORT")
    p = add(ssub, "abort", cmd_session_abort, "stop all emission, end the session (clinician)")
    p.add_argument("--reason", default="aborted by operator", metavar="TEXT")
    p = add(
        ssub,
        "acknowledge",
        cmd_session_acknowledge,
        "acknowledge the cause of the last trip once it is found (clinician, technician)",
    )
    p.add_argument("code", metavar="CODE", help="the trip's code, e.g. E104")
    p.add_argument("--note", default="", metavar="TEXT", help="what was found (recorded)")


def _add_records_commands(sub: argparse._SubParsersAction[Any], add: _Adder) -> None:
    records = sub.add_parser("records", help="treatment records")
    rsub = records.add_subparsers(dest="records_command", required=True, metavar="COMMAND")
    p = add(rsub, "list", cmd_records_list, "sessions, newest first")
    p.add_argument("--limit", type=int, default=20, metavar="N")
    p.add_argument("--since", metavar="DATE", help=SINCE_HELP)
    _clinic_flags(p, patient=True)
    p = add(rsub, "show", cmd_records_show, "one session's record")
    p.add_argument("session", metavar="SESSION", help=SESSION_HELP)
    _clinic_flags(p, patient=False)
    p = add(rsub, "export", cmd_records_export, "export records (technician)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("--since", metavar="DATE", help=SINCE_HELP)
    p.add_argument(
        "--session", action="append", metavar="SESSION", help="only these (repeat; ids or prefixes)"
    )
    p.add_argument("--output", "-o", type=Path, metavar="FILE")
    _clinic_flags(p, patient=True)
    p = add(sub, "report", cmd_report, "a session's treatment report")
    p.add_argument("session", metavar="SESSION", help=SESSION_HELP)
    _clinic_flags(p, patient=False)


SINCE_HELP = (
    "sessions started at or after this ISO date or time, e.g. 2025-01-31 or "
    "2025-01-31T14:00; without a zone it is this workstation's local time"
)
SESSION_HELP = "the session's id or a unique prefix of it (at least 4 characters)"


def _clinic_flags(p: argparse.ArgumentParser, *, patient: bool) -> None:
    p.add_argument(
        "--clinic",
        action="store_true",
        help="read the clinic database: every workstation's sessions",
    )
    if patient:
        p.add_argument("--patient", metavar="REF", help="only this patient's sessions")


def _add_upkeep_commands(sub: argparse._SubParsersAction[Any], add: _Adder) -> None:
    """The technician's upkeep: the calibration date, controller faults, the service latch."""

    cal = sub.add_parser("calibration", help="the calibration due date")
    csub = cal.add_subparsers(dest="calibration_command", required=True, metavar="COMMAND")
    add(csub, "show", cmd_calibration_show, "the due date and where it is set")
    p = add(csub, "set", cmd_calibration_set, "record the next due date (technician)")
    p.add_argument("due", metavar="DATE", help="ISO date, e.g. 2025-06-30")

    ctl = sub.add_parser("controller", help="controllers")
    ksub = ctl.add_subparsers(dest="controller_command", required=True, metavar="COMMAND")
    p = add(ksub, "clear-fault", cmd_clear_fault, "clear a latched fault (technician)")
    p.add_argument("controller", metavar="NAME")
    ctl_scan.register(ksub)  # local: runs without the daemon

    svc = sub.add_parser("service", help="the service-required latch")
    vsub = svc.add_subparsers(dest="service_command", required=True, metavar="COMMAND")
    p = add(
        vsub,
        "clear",
        cmd_service_clear,
        "record the service done after a port stayed lit (technician)",
    )
    p.add_argument("--note", required=True, help="what was checked or repaired (recorded)")


async def _run(args: argparse.Namespace, out: Out) -> int:
    fn: Command = args.run
    path = find_socket(args.socket, args.config)
    client = await Client.connect(path)
    client.timeout_s = args.timeout
    try:
        return await fn(args, client, out)
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check = getattr(args, "usage_check", None)
        if check is not None and (problem := check(args)) is not None:
            args.usage_parser.error(problem)
    except UsageError as exc:
        if "--json" in argv:
            Out(True).error(exc)
        else:
            sys.stderr.write(f"{exc.usage}pbmctl: error: {exc.message}\n")
        raise SystemExit(exc.exit_code) from None  # as argparse ends a wrong command line
    args.json = bool(args.global_json or getattr(args, "json", False))
    if not hasattr(args, "run"):
        code: int = args.func(args)  # offline commands (protocol validate)
        return code
    out = Out(args.json)
    try:
        return asyncio.run(_run(args, out))
    except CtlError as exc:
        out.error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        out.err.print(
            "pbmctl: interrupted; a running session is not affected (follow it with "
            "`pbmctl session watch`, stop it with `pbmctl session abort`)"
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
