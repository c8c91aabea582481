"""Endpoints of patients, courses and outcomes: `patient.*`, `course.*`, `outcome.record`.

Clinicians register patients, start and close courses, start a course's sessions
and record outcomes; staff read patients and courses. Outcome measures are shown
to clinicians, and to technicians only where the configuration allows
([courses] technicians_see_outcomes). Each endpoint adapts its params to
`CourseService`, which decides.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, Strict, StringConstraints

from pbmd.daemon.core.engine import StartRefused
from pbmd.daemon.core.session import SessionError
from pbmd.daemon.services.api.registry import (
    INVALID_PARAMS,
    NOT_FOUND,
    REFUSED,
    Caller,
    Params,
    Registry,
    RpcError,
)
from pbmd.daemon.services.api.roles import CLINICIAN, STAFF, sees_outcomes
from pbmd.daemon.services.api.sessions import PatientRef, PortNumber, refused
from pbmd.daemon.services.api.watch import session_json
from pbmd.daemon.services.courses import (
    CoursePlan,
    Invalid,
    NotFound,
    OutcomeInput,
    Refused,
    fhir,
)
from pbmd.daemon.services.courses.text import course_text
from pbmd.daemon.services.records import RecordsError
from pbmd.protocols.model import Contraindication
from pbmd.protocols.store import LibraryError

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

CourseId = Annotated[str, StringConstraints(pattern=r"^c-[0-9a-f]{12}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=500)]
Answers = dict[Annotated[Contraindication, Strict(False)], bool]


class PatientAddParams(Params):
    patient_id: PatientRef = Field(description="The clinic's identifier (a pseudonym, no name).")
    birth_year: int | None = None
    skin_type: str | None = Field(default=None, description="Fitzpatrick I–VI.")
    notes: Annotated[str, StringConstraints(max_length=2000)] | None = None
    contraindications: Answers = Field(default_factory=dict)


class PatientUpdateParams(Params):
    patient_id: PatientRef
    skin_type: str | None = None
    contraindications: Answers = Field(default_factory=dict)


class PatientIdParams(Params):
    patient_id: PatientRef


class PatientListParams(Params):
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    offset: Annotated[int, Field(ge=0)] = 0


class CourseStartParams(Params):
    patient_id: PatientRef
    diagnosis: Text
    diagnosis_code: Annotated[str, StringConstraints(max_length=32)] | None = None
    diagnosis_system: Annotated[str, StringConstraints(max_length=200)] | None = None
    protocol: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    sessions: int
    min_interval_days: float = 0.0
    sessions_per_week: int | None = None
    reassess_after: int | None = None


class CourseIdParams(Params):
    course_id: CourseId


class CourseCloseParams(Params):
    course_id: CourseId
    reason: Text


class CourseSessionParams(Params):
    course_id: CourseId
    contraindications: Answers = Field(default_factory=dict)
    override_reason: Annotated[str, StringConstraints(max_length=500)] | None = Field(
        default=None, description="Why the plan's refusal is overridden (recorded)."
    )
    ports: Annotated[list[PortNumber], Field(min_length=1, max_length=8)] | None = None
    watch: bool = False


class OutcomeParams(Params):
    course_id: CourseId
    timing: str = "before"
    nrs_pain: int | None = None
    odi_percent: float | None = None
    odi_sections: Annotated[list[int | None], Field(max_length=20)] | None = None
    note: Annotated[str, StringConstraints(max_length=2000)] | None = None


class CourseReportParams(Params):
    course_id: CourseId
    format: Literal["json", "text", "png", "svg", "pdf", "plot-pdf", "fhir"] = "json"


class SessionExportParams(Params):
    session_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    format: Literal["fhir", "pdf"] = "fhir"


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except Refused as exc:
        raise RpcError(
            REFUSED, str(exc), {"refusals": [r.as_dict() for r in exc.refusals]}
        ) from None
    except NotFound as exc:
        raise RpcError(NOT_FOUND, str(exc)) from None
    except Invalid as exc:
        raise RpcError(INVALID_PARAMS, str(exc)) from None
    except LibraryError as exc:
        raise RpcError(REFUSED, str(exc)) from None
    except StartRefused as exc:
        raise refused(exc) from None
    except SessionError as exc:
        raise RpcError(REFUSED, str(exc)) from None
    except RecordsError as exc:
        raise RpcError(REFUSED, str(exc)) from None


def _shown(summary: dict[str, Any], visible: bool) -> dict[str, Any]:
    if visible:
        return summary
    return {**summary, "outcomes": [], "outcomes_hidden": True}


def register(reg: Registry, service: Service) -> None:
    """`patient.*`, `course.*`, `outcome.record`, `session.export`."""

    @reg.add("patient.add", PatientAddParams, CLINICIAN, "Register a patient (pseudonymous).")
    async def patient_add(caller: Caller, p: PatientAddParams) -> Any:
        with _errors():
            return {
                "patient": await service.courses.add_patient(
                    p.patient_id,
                    birth_year=p.birth_year,
                    skin_type=p.skin_type,
                    notes=p.notes,
                    screening={c.value: v for c, v in p.contraindications.items()},
                    user=caller.peer.user,
                )
            }

    @reg.add(
        "patient.update", PatientUpdateParams, CLINICIAN, "New skin type or screening answers."
    )
    async def patient_update(caller: Caller, p: PatientUpdateParams) -> Any:
        with _errors():
            return {
                "patient": await service.courses.update_patient(
                    p.patient_id,
                    skin_type=p.skin_type,
                    screening={c.value: v for c, v in p.contraindications.items()},
                    user=caller.peer.user,
                )
            }

    @reg.add("patient.show", PatientIdParams, STAFF, "A patient's record and courses.")
    async def patient_show(caller: Caller, p: PatientIdParams) -> Any:
        with _errors():
            return {"patient": await service.courses.patient(p.patient_id)}

    @reg.add("patient.list", PatientListParams, STAFF, "Registered patients.")
    async def patient_list(caller: Caller, p: PatientListParams) -> Any:
        with _errors():
            return {"patients": await service.courses.patients(p.limit, p.offset)}

    @reg.add("course.start", CourseStartParams, CLINICIAN, "Open a treatment course.")
    async def course_start(caller: Caller, p: CourseStartParams) -> Any:
        plan = CoursePlan(p.sessions, p.min_interval_days, p.sessions_per_week, p.reassess_after)
        with _errors():
            course = await service.courses.start_course(
                p.patient_id,
                diagnosis=p.diagnosis,
                protocol_id=p.protocol,
                plan=plan,
                diagnosis_code=p.diagnosis_code,
                diagnosis_system=p.diagnosis_system,
                user=caller.peer.user,
            )
        return {"course": course}

    @reg.add("course.show", CourseIdParams, STAFF, "A course so far: plan, sessions, dose.")
    async def course_show(caller: Caller, p: CourseIdParams) -> Any:
        with _errors():
            summary = await service.courses.summary(p.course_id)
        return {"summary": _shown(summary, sees_outcomes(service, caller))}

    @reg.add("course.close", CourseCloseParams, CLINICIAN, "Close a course, saying why.")
    async def course_close(caller: Caller, p: CourseCloseParams) -> Any:
        with _errors():
            return {
                "course": await service.courses.close_course(
                    p.course_id, p.reason, caller.peer.user
                )
            }

    @reg.add(
        "course.session_start",
        CourseSessionParams,
        CLINICIAN,
        "Start the course's next session (its plan checked first).",
    )
    async def course_session_start(caller: Caller, p: CourseSessionParams) -> Any:
        with _errors():
            session, place = await service.courses.start_session(
                p.course_id,
                contraindications={c.value: v for c, v in p.contraindications.items()},
                override_reason=p.override_reason,
                ports=tuple(p.ports) if p.ports else None,
                operator=caller.peer.user,
            )
        if p.watch:
            service.watch_hub.subscribe(caller, session)
        return {
            "session_id": session.id,
            "course": place,
            "status": session_json(session.status()),
            "watching": p.watch,
        }

    @reg.add("outcome.record", OutcomeParams, CLINICIAN, "Record pain (NRS) and/or ODI.")
    async def outcome_record(caller: Caller, p: OutcomeParams) -> Any:
        entry = OutcomeInput(p.timing, p.nrs_pain, p.odi_percent, p.odi_sections, p.note)
        with _errors():
            return {
                "outcome": await service.courses.record_outcome(
                    p.course_id, entry, caller.peer.user
                )
            }

    @reg.add(
        "course.report",
        CourseReportParams,
        STAFF,
        "A course summary: data, text, plot (PNG/SVG/PDF), PDF report or FHIR R4 bundle.",
        heavy=True,
    )
    async def course_report(caller: Caller, p: CourseReportParams) -> Any:
        with _errors():
            summary = _shown(
                await service.courses.summary(p.course_id), sees_outcomes(service, caller)
            )
            if p.format == "fhir":
                return {"format": "fhir", "bundle": await _course_bundle(service, summary)}
        await asyncio.to_thread(_load_renderers)
        from pbmd.daemon.services.courses import pdf, plot  # loaded: no wait here

        if p.format == "json":
            return {"format": "json", "summary": summary, "series": plot.series(summary)}
        if p.format == "text":
            return {"format": "text", "text": course_text(summary)}

        figure: dict[str, plot.PlotFormat] = {"png": "png", "svg": "svg", "plot-pdf": "pdf"}

        def render() -> bytes:
            if p.format == "pdf":
                return pdf.course_pdf(summary)
            return plot.render(summary, figure[p.format])

        content = await asyncio.to_thread(render)
        return {"format": p.format, "content_base64": base64.b64encode(content).decode()}

    @reg.add(
        "session.export",
        SessionExportParams,
        STAFF,
        "A session as an HL7 FHIR R4 bundle or a printable PDF report.",
        heavy=True,
    )
    async def session_export(caller: Caller, p: SessionExportParams) -> Any:
        with _errors():
            session = await service.store.get_session(p.session_id)
            if session is None:
                raise NotFound(f"no session {p.session_id!r} in the records")
            context = await service.courses.session_context(p.session_id)
        if context is not None:
            context = _shown(context, sees_outcomes(service, caller))
        if p.format == "fhir":
            with _errors():
                return {
                    "format": "fhir",
                    "bundle": await _session_bundle(service, session, context),
                }
        await asyncio.to_thread(_load_renderers)
        from pbmd.daemon.services.courses import pdf  # loaded: no wait here

        content = await asyncio.to_thread(pdf.session_pdf, session, context)
        return {"format": "pdf", "content_base64": base64.b64encode(content).decode()}


def _load_renderers() -> None:
    """Import the PDF and plot modules in a worker thread: matplotlib and fpdf2 take
    most of a second to load the first time, and on the event loop that would stop
    the controller's heartbeat (its 250 ms watchdog ended a session, E401)."""
    importlib.import_module("pbmd.daemon.services.courses.pdf")


async def _birth_year(service: Service, patient_id: str) -> int | None:
    try:
        patient = await service.courses.patient(patient_id)
    except NotFound:
        return None
    year = patient.get("birth_year")
    return None if year is None else int(year)


async def _course_bundle(service: Service, summary: dict[str, Any]) -> dict[str, Any]:
    course = await service.courses.course(summary["course"]["id"])
    sessions = []
    for v in course["visits"]:
        s = await service.store.get_session(str(v["session_id"]))
        if s is not None:
            sessions.append((s, int(v["number"])))
    return fhir.bundle(
        course["patient_id"],
        await _birth_year(service, course["patient_id"]),
        sessions,
        course,
        summary["outcomes"],
    )


async def _session_bundle(
    service: Service, session: dict[str, Any], context: dict[str, Any] | None
) -> dict[str, Any]:
    course = None
    outcomes: list[dict[str, Any]] = []
    number = None
    if context is not None:
        course = await service.courses.course(context["course"]["id"])
        number = int(context["session_number"])
        outcomes = [o for o in context["outcomes"] if int(o["visit_number"]) == number]
    return fhir.bundle(
        str(session["patient_ref"]),
        await _birth_year(service, str(session["patient_ref"])),
        [(session, number)],
        course,
        outcomes,
    )
