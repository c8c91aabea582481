"""Endpoints of the treatment records and the reports made from them."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from pydantic import Field, StringConstraints

from pbmd.daemon.services.api.registry import NOT_FOUND, REFUSED, Caller, Params, Registry, RpcError
from pbmd.daemon.services.api.roles import STAFF, TECHNICIAN
from pbmd.daemon.services.records import RecordsError
from pbmd.daemon.services.report import build_report, render_text

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

log = structlog.get_logger()

SessionId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class RecordsListParams(Params):
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    offset: Annotated[int, Field(ge=0)] = 0
    since_utc: dt.datetime | None = Field(default=None, strict=False)


class SessionIdParams(Params):
    session_id: SessionId


class RecordsExportParams(Params):
    format: Literal["json", "csv"] = "json"
    since_utc: dt.datetime | None = Field(default=None, strict=False)
    session_ids: Annotated[list[SessionId], Field(max_length=1000)] | None = None


class ReportParams(Params):
    session_id: SessionId
    format: Literal["json", "text", "both"] = "both"


async def _session_row(service: Service, session_id: str) -> dict[str, Any]:
    """One session's record, or NOT_FOUND saying where to look."""
    try:
        row = await service.store.get_session(session_id)
    except RecordsError as exc:
        raise RpcError(REFUSED, str(exc)) from None
    if row is None:
        raise RpcError(
            NOT_FOUND,
            f"no session {session_id!r} in the records; `pbmctl records list` shows the sessions",
        )
    return row


def register(reg: Registry, service: Service) -> None:
    """`records.*` and `report.get`."""

    @reg.add("records.list", RecordsListParams, STAFF, "Sessions in the records, newest first.")
    async def records_list(caller: Caller, p: RecordsListParams) -> Any:
        try:
            rows = await service.store.list_sessions(p.limit, p.offset, p.since_utc)
        except RecordsError as exc:
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
        return {"session": await _session_row(service, p.session_id)}

    @reg.add(
        "records.export",
        RecordsExportParams,
        TECHNICIAN,
        "Export records as JSON or CSV.",
        heavy=True,
    )
    async def records_export(caller: Caller, p: RecordsExportParams) -> Any:
        try:
            content = await service.store.export(
                p.format, since_utc=p.since_utc, session_ids=p.session_ids
            )
        except RecordsError as exc:
            raise RpcError(REFUSED, str(exc)) from None
        log.info("records.exported", user=caller.peer.user, format=p.format)
        return {"format": p.format, "content": content}

    @reg.add("report.get", ReportParams, STAFF, "A session's treatment report.", heavy=True)
    async def report_get(caller: Caller, p: ReportParams) -> Any:
        row = await _session_row(service, p.session_id)

        def build() -> dict[str, Any]:
            report = build_report(row)
            out: dict[str, Any] = {"session_id": p.session_id}
            if p.format in ("json", "both"):
                out["report"] = report.to_dict()
            if p.format in ("text", "both"):
                out["text"] = render_text(report)
            return out

        return await asyncio.to_thread(build)
