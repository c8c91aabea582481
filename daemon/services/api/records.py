"""Endpoints of the treatment records and the reports made from them."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from pydantic import AfterValidator, Field, StringConstraints

from pbmd.daemon.services.api.registry import NOT_FOUND, REFUSED, Caller, Params, Registry, RpcError
from pbmd.daemon.services.api.roles import STAFF, TECHNICIAN, sees_outcomes
from pbmd.daemon.services.clinic_db import ClinicReads, ClinicUnavailable
from pbmd.daemon.services.courses.text import course_text
from pbmd.daemon.services.records import RecordsError
from pbmd.daemon.services.report import build_report, render_text

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

log = structlog.get_logger()

SessionId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
"""A session's id or a unique prefix of it (at least `MIN_PREFIX` characters), as git
takes a commit's."""

MIN_PREFIX = 4
CANDIDATES_SHOWN = 10


def _local_if_naive(value: dt.datetime) -> dt.datetime:
    """A date or time without a zone ("2025-01-31") is the workstation's local time, as
    the clinician means it; one with a zone is taken as given."""
    return value.astimezone() if value.tzinfo is None else value


Since = Annotated[dt.datetime, Field(strict=False), AfterValidator(_local_if_naive)]
"""ISO 8601 date or time; without a zone, the workstation's local time."""


PatientRef = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class ClinicParam(Params):
    clinic: bool = False
    """Read the clinic database (every workstation) instead of this workstation's records."""


class RecordsListParams(ClinicParam):
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    offset: Annotated[int, Field(ge=0)] = 0
    since_utc: Since | None = None
    patient_ref: PatientRef | None = None
    """Only this patient's sessions."""


class SessionIdParams(ClinicParam):
    session_id: SessionId


class RecordsExportParams(ClinicParam):
    format: Literal["json", "csv"] = "json"
    since_utc: Since | None = None
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


async def resolve_session_id(
    given: str, match: Callable[[str, int], Awaitable[list[str]]], where: str
) -> str:
    """The one session id ``given`` names: the id itself or a unique prefix of it.
    ``match(prefix, limit)`` lists ids that start with a prefix. NOT_FOUND when none
    does; REFUSED, with the candidates, when several do."""
    found = await match(given, CANDIDATES_SHOWN + 1)
    if given in found:
        return given
    if len(found) == 1 and len(given) >= MIN_PREFIX:
        return found[0]
    if not found:
        raise RpcError(
            NOT_FOUND, f"no session {given!r} in {where}; `pbmctl records list` shows the sessions"
        )
    if len(given) < MIN_PREFIX:
        raise RpcError(
            REFUSED,
            f"session {given!r}: give at least {MIN_PREFIX} characters of its id",
            {"candidates": found[:CANDIDATES_SHOWN]},
        )
    more = len(found) > CANDIDATES_SHOWN
    shown = ", ".join(found[:CANDIDATES_SHOWN]) + (", …" if more else "")
    count = f"more than {CANDIDATES_SHOWN}" if more else str(len(found))
    raise RpcError(
        REFUSED,
        f"session {given!r} is ambiguous: {count} sessions start with it ({shown}); "
        "give more characters",
        {"candidates": found[:CANDIDATES_SHOWN]},
    )


async def _resolve(service: Service, clinic: ClinicReads | None, given: str) -> str:
    """A session id or prefix, in the clinic database or this workstation's records."""
    where = "the clinic database" if clinic is not None else "the records"
    match = clinic.match_session_ids if clinic is not None else service.store.match_session_ids
    try:
        return await resolve_session_id(given, match, where)
    except (RecordsError, ClinicUnavailable) as exc:
        raise RpcError(REFUSED, str(exc)) from None


async def _session_row(service: Service, p: SessionIdParams | ReportParams) -> dict[str, Any]:
    """One session's record (by its id or a unique prefix), or NOT_FOUND."""
    clinic = _clinic(service, p)
    session_id = await _resolve(service, clinic, p.session_id)
    try:
        if clinic is not None:
            row = await clinic.get_session(session_id)
        else:
            row = await service.store.get_session(session_id)
    except (RecordsError, ClinicUnavailable) as exc:
        raise RpcError(REFUSED, str(exc)) from None
    if row is None:  # removed between the two reads
        raise RpcError(NOT_FOUND, f"session {session_id!r} is no longer in the records")
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
        ids = (
            None
            if p.session_ids is None
            else [await _resolve(service, clinic, given) for given in p.session_ids]
        )
        try:
            if clinic is not None:
                content = await clinic.export(
                    p.format,
                    since_utc=p.since_utc,
                    session_ids=ids,
                    patient_ref=p.patient_ref,
                )
            else:
                content = await service.store.export(
                    p.format, since_utc=p.since_utc, session_ids=ids
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
            out: dict[str, Any] = {"session_id": str(row["id"])}
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
