"""Endpoints of the treatment session: start, watch, confirm, pause, resume, abort.

Each one adapts its params to one of the engine's use cases and the engine's
answer to a reply; the engine decides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, Strict, StringConstraints

from pbmd.daemon.core.engine import NoSession, NotRunnable, StartCommand, StartRefused, Unanswered
from pbmd.daemon.core.session import SessionError
from pbmd.daemon.services.api.protocols import ProtocolId, library_error
from pbmd.daemon.services.api.records import SessionId, resolve_session_id
from pbmd.daemon.services.api.registry import (
    NO_SESSION,
    REFUSED,
    Caller,
    Handler,
    Params,
    Registry,
    RpcError,
)
from pbmd.daemon.services.api.roles import ANYONE, CLINICIAN, STAFF
from pbmd.daemon.services.api.watch import session_json
from pbmd.protocols.model import Contraindication
from pbmd.protocols.store import LibraryError

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

PatientRef = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]
PortNumber = Annotated[int, Field(ge=1, le=8)]


class SessionStartParams(Params):
    protocol: ProtocolId
    patient_ref: PatientRef = Field(
        description="The clinic's reference for the patient (not a name): 1-64 characters."
    )
    contraindications: dict[Annotated[Contraindication, Strict(False)], bool] = Field(
        default_factory=dict,
        description="Screening answers, name -> present; every contraindication the protocol "
        "lists must be answered.",
    )
    ports: Annotated[list[PortNumber], Field(min_length=1, max_length=8)] | None = None
    skin_type: Literal["I", "II", "III", "IV", "V", "VI"] | None = Field(
        default=None,
        description="The patient's Fitzpatrick skin type, I (lightest) to VI (darkest): "
        "recorded with the session, and lowers the irradiance ceilings where the site "
        "configures a derating for it.",
    )
    watch: bool = Field(default=False, description="Stream the session on this connection.")


class WatchParams(Params):
    session_id: SessionId | None = Field(
        default=None,
        description="The session to watch, by its id or a unique prefix; it must be the "
        "current one (the default).",
    )


class PortParams(Params):
    port: PortNumber


class OptionalPortParams(Params):
    port: PortNumber | None = None


class AbortParams(Params):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=200)] = "aborted by operator"


class AcknowledgeParams(Params):
    code: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]\d{3}$")] = Field(
        description="The code of the trip being acknowledged, e.g. E104."
    )
    note: Annotated[str, StringConstraints(min_length=0, max_length=500, strip_whitespace=True)] = (
        Field(default="", description="What was found and done about the cause.")
    )


def refused(exc: StartRefused) -> RpcError:
    """A refused start as an error reply, with the cause's name and code when it has one."""
    if isinstance(exc, Unanswered):
        return RpcError(
            REFUSED,
            str(exc),
            {
                "missing": exc.missing,
                "descriptions": {m: Contraindication(m).description for m in exc.missing},
            },
        )
    if isinstance(exc, NotRunnable):
        return RpcError(REFUSED, str(exc), {"issues": [i.as_dict() for i in exc.issues]})
    cause = exc.cause
    return RpcError(
        REFUSED,
        str(exc),
        {"cause": cause.name if cause else None, "code": cause.code if cause else None},
    )


@contextlib.contextmanager
def _session_errors() -> Iterator[None]:
    """No session is NO_SESSION; a session that says no (wrong state, unknown port) refuses."""
    try:
        yield
    except NoSession as exc:
        raise RpcError(NO_SESSION, str(exc)) from None
    except StartRefused as exc:
        raise refused(exc) from None
    except SessionError as exc:
        raise RpcError(REFUSED, str(exc)) from None


def _port_command(command: Callable[[int | None], None], done: str) -> Handler:
    """A handler for a command on one port or all (pause, resume)."""

    async def handler(caller: Caller, p: OptionalPortParams) -> Any:
        with _session_errors():
            command(p.port)
        return {done: p.port if p.port is not None else "all"}

    return handler


def register(reg: Registry, service: Service) -> None:
    """`session.*`."""
    hub = service.watch_hub

    @reg.add("session.start", SessionStartParams, CLINICIAN, "Start a protocol for a patient.")
    async def session_start(caller: Caller, p: SessionStartParams) -> Any:
        command = StartCommand(
            protocol_id=p.protocol,
            patient_ref=p.patient_ref,
            contraindications={c.value: v for c, v in p.contraindications.items()},
            ports=tuple(p.ports) if p.ports else None,
            operator=caller.peer.user,
            skin_type=p.skin_type,
        )
        try:
            with _session_errors():
                session = await service.engine.start_protocol(service.library, command)
        except LibraryError as exc:
            raise library_error(exc) from None
        if p.watch:
            hub.subscribe(caller, session)
        return {
            "session_id": session.id,
            "status": session_json(session.status()),
            "watching": p.watch,
        }

    @reg.add("session.watch", WatchParams, ANYONE, "Stream the running session until it ends.")
    async def session_watch(caller: Caller, p: WatchParams) -> Any:
        s = service.engine.session
        if p.session_id is not None:
            current = s

            async def match(prefix: str, limit: int) -> list[str]:
                return [current.id] if current and current.id.startswith(prefix) else []

            await resolve_session_id(
                p.session_id,
                match,
                "the current session (`pbmctl report ID` shows an ended one's record)",
            )
        if s is None:
            return {"session_id": None, "status": None, "watching": False}
        shown = session_json(s.status(), full=caller.peer.sees_patients)
        if s.state.final:
            return {"session_id": s.id, "status": shown, "watching": False}
        hub.subscribe(caller, s)
        return {"session_id": s.id, "status": shown, "watching": True}

    @reg.add("session.confirm", PortParams, CLINICIAN, "Confirm the placement on a gated port.")
    async def session_confirm(caller: Caller, p: PortParams) -> Any:
        with _session_errors():
            service.engine.confirm(p.port)
        return {"confirmed": p.port}

    reg.add("session.pause", OptionalPortParams, CLINICIAN, "Pause one port or all.")(
        _port_command(lambda port: service.engine.pause(port), "paused")
    )
    reg.add("session.resume", OptionalPortParams, CLINICIAN, "Resume one port or all.")(
        _port_command(lambda port: service.engine.resume(port), "resumed")
    )

    @reg.add("session.abort", AbortParams, CLINICIAN, "Stop all emission and end the session.")
    async def session_abort(caller: Caller, p: AbortParams) -> Any:
        with _session_errors():
            s = await service.engine.abort(p.reason, caller.peer.user)
        return {"session_id": s.id, "state": s.state.value}

    @reg.add(
        "session.acknowledge",
        AcknowledgeParams,
        STAFF,
        "Acknowledge the cause of the last trip (found and corrected); sessions may start again.",
    )
    async def session_acknowledge(caller: Caller, p: AcknowledgeParams) -> Any:
        with _session_errors():  # CommandRefused is a SessionError: REFUSED, with why
            done = service.engine.acknowledge(p.code, caller.peer.user, p.note)
        await service.store.sync()
        return {
            "acknowledged": done.trip.cause.code,
            "cause": done.trip.cause.name,
            "session_id": done.session_id,
            "user": done.user,
            "note": done.note,
            "utc": done.utc,
        }
