"""Endpoints of the treatment records and the reports made from them."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from pydantic import Field, StringConstraints

from pbmd.daemon.services.api.courses import sees_outcomes
from pbmd.daemon.services.api.registry import NOT_FOUND, REFUSED, Caller, Params, Registry, RpcError
from pbmd.daemon.services.api.roles import STAFF, TECHNICIAN
from pbmd.daemon.services.clinic_db import ClinicReads, ClinicUnavailable
from pbmd.daemon.services.courses.text import course_text
from pbmd.daemon.services.records import RecordsError
from pbmd.daemon.services.report import build_report, render_text

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

log = structlog.get_logger()

SessionId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


PatientRef = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class ClinicParam(Params):
    clinic: bool = False
    """Read the clinic database (every workstation) instead of this workstation's records."""


class RecordsListParams(ClinicParam):
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    offset: Annotated[int, Field(ge=0)] = 0
    since_utc: dt.datetime | None = Field(default=None, strict=False)
    patient_ref: PatientRef | None = None
    """Only this patient's sessions."""


class SessionIdParams(ClinicParam):
    session_id: SessionId


class RecordsExportParams(ClinicParam):
    format: Literal["json", "csv"] = "json"
    since_utc: dt.datetime | None = Field(default=None, strict=False)
    session_ids: Annotated[list[SessionId], Field(max_length=1000)] | None = None
    patient_ref: PatientRef | None = None


class ReportParams(ClinicParam):
    session_id: SessionId
    format: Literal["json", "text", "both"] = "both"


def _clinic(service: Service, p: ClinicParam) -> ClinicReads | None:
    """The clinic database's reads when asked for (REFUSED if none is configured)."""
    patient = getattr(p, "patient_ref", None)
    if not p.clinic:
        if patient is not None and not isinstance(p, RecordsListParams):
            raise RpcError(REFUSED, "patient_ref filters clinic reads: add clinic = true")
        return None
    if service.config.clinic_db is None:
        raise RpcError(
            REFUSED,
            "no clinic database is configured on this workstation ([clinic_db] in the "
            "configuration; docs/clinic-db.md)",
        )
    return ClinicReads(service.config.clinic_db)


async def _session_row(service: Service, p: SessionIdParams | ReportParams) -> dict[str, Any]:
    """One session's record, or NOT_FOUND saying where to look."""
    clinic = _clinic(service, p)
    try:
        if clinic is not None:
            row = await clinic.get_session(p.session_id)
        else:
            row = await service.store.get_session(p.session_id)
    except (RecordsError, ClinicUnavailable) as exc:
        raise RpcError(REFUSED, str(exc)) from None
    if row is None:
        where = "the clinic database" if clinic is not None else "the records"
        flag = " --clinic" if clinic is not None else ""
        raise RpcError(
            NOT_FOUND,
            f"no session {p.session_id!r} in {where}; `pbmctl records list{flag}` shows "
            "the sessions",
        )
    return row


def register(reg: Registry, service: Service) -> None:
    """`records.*` and `report.get`."""

    @reg.add("records.list", RecordsListParams, STAFF, "Sessions in the records, newest first.")
    async def records_list(caller: Caller, p: RecordsListParams) -> Any:
        clinic = _clinic(service, p)
        try:
            if clinic is not None:
                rows = await clinic.list_sessions(p.limit, p.offset, p.since_utc, p.patient_ref)
            else:
                rows = await service.store.list_sessions(
                    p.limit, p.offset, p.since_utc, p.patient_ref
                )
        except (RecordsError, ClinicUnavailable) as exc:
            raise RpcError(REFUSED, str(exc)) from None
        return {"sessions": rows}

    @reg.add(
        "records.show",
        SessionIdParams,
        STAFF,
        "One session's record: steps, emissions, events.",
        heavy=True,
    )
    async def records_show(caller: Caller, p: SessionIdParams) -> Any:
        return {"session": await _session_row(service, p)}

    @reg.add(
        "records.export",
        RecordsExportParams,
        TECHNICIAN,
        "Export records as JSON or CSV.",
        heavy=True,
    )
    async def records_export(caller: Caller, p: RecordsExportParams) -> Any:
        clinic = _clinic(service, p)
        try:
            if clinic is not None:
                content = await clinic.export(
                    p.format,
                    since_utc=p.since_utc,
                    session_ids=p.session_ids,
                    patient_ref=p.patient_ref,
                )
            else:
                content = await service.store.export(
                    p.format, since_utc=p.since_utc, session_ids=p.session_ids
                )
        except (RecordsError, ClinicUnavailable) as exc:
            raise RpcError(REFUSED, str(exc)) from None
        log.info("records.exported", user=caller.peer.user, format=p.format, clinic=p.clinic)
        return {"format": p.format, "content": content}

    @reg.add("report.get", ReportParams, STAFF, "A session's treatment report.", heavy=True)
    async def report_get(caller: Caller, p: ReportParams) -> Any:
        row = await _session_row(service, p)
        # Its course, when it has one: "session n of N" and the course so far.
        course = None if p.clinic else await service.courses.session_context(p.session_id)
        if course is not None and not sees_outcomes(service, caller):
            course = {**course, "outcomes": [], "outcomes_hidden": True}

        def build() -> dict[str, Any]:
            report = build_report(row)
            out: dict[str, Any] = {"session_id": p.session_id}
            if p.format in ("json", "both"):
                out["report"] = report.to_dict()
            if p.format in ("text", "both"):
                out["text"] = render_text(report)
            if course is not None:
                out["course"] = course
                if "text" in out:
                    out["text"] = course_text(course, course["session_number"]) + out["text"]
            return out

        return await asyncio.to_thread(build)
