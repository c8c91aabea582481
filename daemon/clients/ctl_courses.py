"""pbmctl's patient, course and outcome commands (the `patient.*`, `course.*` and
`outcome.record` methods of the control API)."""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from pbmd.daemon.clients.ctl_client import EXIT_OK, EXIT_USAGE, Client, parse_answers


class Output(Protocol):
    json: bool
    err: Console

    def result(self, value: Any, human: Callable[[Console], None]) -> None: ...

    def data(self, value: Any) -> None: ...


Command = Callable[[argparse.Namespace, Client, Any], Awaitable[int]]
Adder = Callable[..., argparse.ArgumentParser]


def _answers(args: argparse.Namespace, out: Output) -> dict[str, bool] | None:
    try:
        return parse_answers(args.contraindication)
    except ValueError as exc:
        out.err.print(f"pbmctl: {exc}")
        return None


def _show_patient(c: Console, p: Mapping[str, Any]) -> None:
    c.print(
        f"patient [bold]{p['id']}[/]  birth year {p['birth_year'] or '—'}  skin type "
        f"{p['skin_type'] or '—'}  registered {p['created_utc'][:10]}"
    )
    for s in p.get("screening") or []:
        c.print(
            f"  {s['name']:<24} {'PRESENT' if s['present'] else 'no':<8} "
            f"answered {s['answered_utc'][:10]}"
        )
    for course in p.get("courses") or []:
        c.print(
            f"  course {course['id']}  {course['state']:<6} {course['sessions_done']} of "
            f"{course['sessions_planned']}  {course['protocol_id']}  {course['diagnosis']}"
        )


async def cmd_patient_add(args: argparse.Namespace, client: Client, out: Any) -> int:
    answers = _answers(args, out)
    if answers is None:
        return EXIT_USAGE
    params: dict[str, Any] = {"patient_id": args.patient_id, "contraindications": answers}
    for key in ("birth_year", "skin_type", "notes"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    res = await client.call("patient.add", params)
    out.result(res, lambda c: _show_patient(c, res["patient"]))
    return EXIT_OK


async def cmd_patient_update(args: argparse.Namespace, client: Client, out: Any) -> int:
    answers = _answers(args, out)
    if answers is None:
        return EXIT_USAGE
    params: dict[str, Any] = {"patient_id": args.patient_id, "contraindications": answers}
    if args.skin_type is not None:
        params["skin_type"] = args.skin_type
    res = await client.call("patient.update", params)
    out.result(res, lambda c: _show_patient(c, res["patient"]))
    return EXIT_OK


async def cmd_patient_show(args: argparse.Namespace, client: Client, out: Any) -> int:
    res = await client.call("patient.show", {"patient_id": args.patient_id})
    out.result(res, lambda c: _show_patient(c, res["patient"]))
    return EXIT_OK


async def cmd_patient_list(args: argparse.Namespace, client: Client, out: Any) -> int:
    res = await client.call("patient.list", {"limit": args.limit})

    def human(c: Console) -> None:
        for p in res["patients"]:
            c.print(
                f"{p['id']:<20} skin {p['skin_type'] or '—':<4} open courses {p['open_courses']}"
            )

    out.result(res, human)
    return EXIT_OK


async def cmd_course_start(args: argparse.Namespace, client: Client, out: Any) -> int:
    params: dict[str, Any] = {
        "patient_id": args.patient,
        "diagnosis": args.diagnosis,
        "protocol": args.protocol,
        "sessions": args.sessions,
        "min_interval_days": args.min_interval_days,
    }
    for key in ("diagnosis_code", "diagnosis_system", "sessions_per_week", "reassess_after"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    res = await client.call("course.start", params)
    course = res["course"]
    out.result(
        res,
        lambda c: c.print(
            f"course [bold]{course['id']}[/] opened for patient {course['patient_id']}: "
            f"{course['sessions_planned']} sessions of {course['protocol_id']} "
            f"v{course['protocol_version']}; start each with `pbmctl session start --course "
            f"{course['id']}`"
        ),
    )
    return EXIT_OK


async def cmd_course_show(args: argparse.Namespace, client: Client, out: Any) -> int:
    res = await client.call("course.report", {"course_id": args.course_id, "format": "text"})
    if out.json:
        out.data(await client.call("course.show", {"course_id": args.course_id}))
    else:
        out.console.print(res["text"], markup=False, highlight=False)
    return EXIT_OK


async def cmd_course_close(args: argparse.Namespace, client: Client, out: Any) -> int:
    res = await client.call("course.close", {"course_id": args.course_id, "reason": args.reason})
    out.result(res, lambda c: c.print(f"course {args.course_id} closed: {args.reason}"))
    return EXIT_OK


_SUFFIX = {"png": "png", "svg": "svg", "plot-pdf": "pdf", "pdf": "pdf", "fhir": "json"}


async def cmd_course_report(args: argparse.Namespace, client: Client, out: Any) -> int:
    """`--format json` (the default with --json) prints the summary and the plotted series;
    a figure, PDF or FHIR bundle is written to --output."""
    fmt = args.format or ("json" if out.json else "text")
    if fmt in _SUFFIX and args.output is None:
        out.err.print(f"pbmctl: --format {fmt} writes a file: give --output FILE")
        return EXIT_USAGE
    res = await client.call("course.report", {"course_id": args.course_id, "format": fmt})
    if fmt == "text":
        out.console.print(res["text"], markup=False, highlight=False)
        return EXIT_OK
    if fmt == "json":
        out.data(res)
        return EXIT_OK
    return _write(res, args.output, out)


async def cmd_session_export(args: argparse.Namespace, client: Client, out: Any) -> int:
    res = await client.call("session.export", {"session_id": args.session, "format": args.format})
    return _write(res, args.output, out)


def _write(res: Mapping[str, Any], path: Path, out: Any) -> int:
    if "bundle" in res:
        data = json.dumps(res["bundle"], indent=2, ensure_ascii=False).encode()
    else:
        data = base64.b64decode(res["content_base64"])
    path.write_bytes(data)
    summary = {"format": res["format"], "output": str(path), "bytes": len(data)}
    out.result(summary, lambda c: c.print(f"wrote {len(data)} bytes ({res['format']}) to {path}"))
    return EXIT_OK


def _odi_sections(text: str) -> list[int | None]:
    """'3,2,-,1,...': ten section scores, '-' for one not answered."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part in ("-", ""):
            out.append(None)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(
                f"{part!r}: give ten comma-separated scores 0–5, '-' for a skipped section"
            )
    return out


async def cmd_outcome_record(args: argparse.Namespace, client: Client, out: Any) -> int:
    params: dict[str, Any] = {"course_id": args.course_id, "timing": args.timing}
    if args.nrs is not None:
        params["nrs_pain"] = args.nrs
    if args.odi is not None:
        params["odi_percent"] = args.odi
    if args.odi_sections is not None:
        params["odi_sections"] = args.odi_sections
    if args.note is not None:
        params["note"] = args.note
    res = await client.call("outcome.record", params)
    o = res["outcome"]
    out.result(
        res,
        lambda c: c.print(
            f"recorded {o['timing']} session {o['visit_number']}: pain NRS "
            f"{o['nrs_pain'] if o['nrs_pain'] is not None else '—'}, ODI "
            f"{o['odi_percent'] if o['odi_percent'] is not None else '—'} %"
        ),
    )
    return EXIT_OK


def register(sub: argparse._SubParsersAction[Any], add: Adder) -> None:
    """`patient`, `course`, `outcome` and `session export`."""
    patient = sub.add_parser("patient", help="patients (pseudonymous)")
    psub = patient.add_subparsers(dest="patient_command", required=True, metavar="COMMAND")
    p = add(psub, "add", cmd_patient_add, "register a patient (clinician)")
    p.add_argument("patient_id", metavar="ID", help="the clinic's identifier (not a name)")
    p.add_argument("--birth-year", type=int, metavar="YYYY")
    p.add_argument("--skin-type", type=str.upper, metavar="I-VI", help="Fitzpatrick skin type")
    p.add_argument("--notes", metavar="TEXT")
    p.add_argument("--contraindication", action="append", default=[], metavar="NAME=yes|no")
    p = add(psub, "update", cmd_patient_update, "new skin type or screening answers (clinician)")
    p.add_argument("patient_id", metavar="ID")
    p.add_argument("--skin-type", type=str.upper, metavar="I-VI")
    p.add_argument("--contraindication", action="append", default=[], metavar="NAME=yes|no")
    p = add(psub, "show", cmd_patient_show, "a patient's record and courses")
    p.add_argument("patient_id", metavar="ID")
    p = add(psub, "list", cmd_patient_list, "registered patients")
    p.add_argument("--limit", type=int, default=100, metavar="N")

    course = sub.add_parser("course", help="treatment courses")
    csub = course.add_subparsers(dest="course_command", required=True, metavar="COMMAND")
    p = add(csub, "start", cmd_course_start, "open a course for a patient (clinician)")
    p.add_argument("--patient", required=True, metavar="ID")
    p.add_argument("--diagnosis", required=True, metavar="TEXT")
    p.add_argument("--diagnosis-code", metavar="CODE", help="e.g. an ICD-10 code, M54.5")
    p.add_argument("--diagnosis-system", metavar="URI", help="the code's system")
    p.add_argument("--protocol", required=True, metavar="ID")
    p.add_argument("--sessions", type=int, required=True, metavar="N")
    p.add_argument("--min-interval-days", type=float, default=0.0, metavar="DAYS")
    p.add_argument("--sessions-per-week", type=int, metavar="N")
    p.add_argument("--reassess-after", type=int, metavar="N")
    p = add(csub, "show", cmd_course_show, "a course so far")
    p.add_argument("course_id", metavar="COURSE")
    p = add(csub, "close", cmd_course_close, "close a course (clinician)")
    p.add_argument("course_id", metavar="COURSE")
    p.add_argument("--reason", required=True, metavar="TEXT")
    p = add(csub, "report", cmd_course_report, "summary, plot, PDF report or FHIR bundle")
    p.add_argument("course_id", metavar="COURSE")
    p.add_argument(
        "--format", choices=("text", "json", "png", "svg", "plot-pdf", "pdf", "fhir"), default=None
    )
    p.add_argument("--output", "-o", type=Path, metavar="FILE")

    outcome = sub.add_parser("outcome", help="outcome measures")
    osub = outcome.add_subparsers(dest="outcome_command", required=True, metavar="COMMAND")
    p = add(osub, "record", cmd_outcome_record, "record pain NRS and/or ODI (clinician)")
    p.add_argument("course_id", metavar="COURSE")
    p.add_argument("--timing", choices=("before", "after", "reassessment"), default="before")
    p.add_argument("--nrs", type=int, metavar="0-10", help="pain, numeric rating scale")
    p.add_argument("--odi", type=float, metavar="PERCENT", help="ODI total, 0–100 %%")
    p.add_argument(
        "--odi-sections", type=_odi_sections, metavar="S1,...,S10", help="the ten scores 0–5"
    )
    p.add_argument("--note", metavar="TEXT")


def register_session_export(ssub: argparse._SubParsersAction[Any], add: Adder) -> None:
    p = add(ssub, "export", cmd_session_export, "a session as FHIR R4 JSON or a PDF report")
    p.add_argument("session", metavar="SESSION")
    p.add_argument("--format", choices=("fhir", "pdf"), default="fhir")
    p.add_argument("--output", "-o", type=Path, required=True, metavar="FILE")
