"""Endpoints of the protocol library: list, show, validate, install, remove."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from pydantic import Field, StringConstraints

from pbmd.daemon.core.engine import NotRunnable
from pbmd.daemon.services.api.registry import (
    NOT_FOUND,
    REFUSED,
    Caller,
    NoParams,
    Params,
    Registry,
    RpcError,
)
from pbmd.daemon.services.api.roles import ANYONE, TECHNICIAN
from pbmd.protocols.store import LibraryError, LibraryFault, ProtocolLibrary

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

log = structlog.get_logger()

ProtocolId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
ProtocolText = Annotated[str, StringConstraints(min_length=1, max_length=1 << 20)]
SignatureText = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class ProtocolIdParams(Params):
    id: ProtocolId


class ProtocolShowParams(Params):
    id: ProtocolId
    source: bool = Field(default=False, description="Include the file's text.")


class ProtocolFileParams(Params):
    content: ProtocolText = Field(description="The protocol file (TOML text).")
    signature: SignatureText | None = Field(
        default=None, description="Its minisign signature (the .minisig file's text)."
    )
    filename: Annotated[str, StringConstraints(max_length=255)] | None = None


def library_error(exc: LibraryError) -> RpcError:
    """A library refusal as an error reply: not installed is NOT_FOUND, the rest REFUSED."""
    if exc.fault is LibraryFault.NOT_INSTALLED:
        return RpcError(
            NOT_FOUND,
            f"{exc}; `pbmctl protocol list` shows what is installed",
            {"fault": exc.fault.value},
        )
    data: dict[str, Any] = {"fault": exc.fault.value}
    if exc.issues:
        data["issues"] = [i.as_dict() for i in exc.issues]
    return RpcError(REFUSED, str(exc), data)


def describe(service: Service, protocol_id: str, source: bool) -> dict[str, Any]:
    """An installed protocol, re-verified, and whether it runs here (worker thread)."""
    library = service.library
    loaded, entry = library.load(protocol_id), library.show(protocol_id)
    out: dict[str, Any] = {
        "installed": entry.as_dict(),
        "protocol": loaded.as_dict(),
        "contraindications": [
            {"name": c.value, "description": c.description}
            for c in loaded.protocol.contraindications
        ],
        "cautions": list(loaded.protocol.cautions),
        "warnings": [i.as_dict() for i in loaded.warnings],
    }
    try:
        service.engine.plan_for(loaded.protocol, library.limits)
        out["runnable"] = {"ok": True, "issues": []}
    except NotRunnable as exc:
        out["runnable"] = {"ok": False, "issues": [i.as_dict() for i in exc.issues]}
    if source:
        out["source"] = (library.directory / entry.file).read_text(encoding="utf-8")
    return out


def validate(
    library: ProtocolLibrary, content: str, signature: str | None, source: str
) -> dict[str, Any]:
    """A protocol file checked as install would, without installing it (worker thread)."""
    try:
        loaded, verified = library.check(content.encode("utf-8"), signature, source=source)
    except LibraryError as exc:
        return {
            "valid": False,
            "fault": exc.fault.value,
            "message": str(exc),
            "issues": [i.as_dict() for i in exc.issues],
        }
    highest = library.highest_version(loaded.protocol.id)
    return {
        "valid": True,
        "signed_by": verified.key.id_hex if verified else None,
        "protocol": loaded.as_dict(),
        "warnings": [i.as_dict() for i in loaded.warnings],
        "installed_version": highest or None,
        "installable": loaded.protocol.version > highest,
    }


def register(reg: Registry, service: Service) -> None:
    """`protocol.*`."""

    @reg.add("protocol.list", NoParams, ANYONE, "Installed protocols.")
    async def protocol_list(caller: Caller, p: NoParams) -> Any:
        try:
            entries = await asyncio.to_thread(service.library.list)
        except LibraryError as exc:
            raise library_error(exc) from None
        return {"protocols": [e.as_dict() for e in entries]}

    @reg.add("protocol.show", ProtocolShowParams, ANYONE, "One installed protocol, step by step.")
    async def protocol_show(caller: Caller, p: ProtocolShowParams) -> Any:
        try:
            return await asyncio.to_thread(describe, service, p.id, p.source)
        except LibraryError as exc:
            raise library_error(exc) from None

    @reg.add(
        "protocol.validate",
        ProtocolFileParams,
        ANYONE,
        "Check a protocol file (and signature) as install would, without installing it.",
    )
    async def protocol_validate(caller: Caller, p: ProtocolFileParams) -> Any:
        return await asyncio.to_thread(
            validate, service.library, p.content, p.signature, p.filename or "<upload>"
        )

    @reg.add("protocol.install", ProtocolFileParams, TECHNICIAN, "Install a signed protocol.")
    async def protocol_install(caller: Caller, p: ProtocolFileParams) -> Any:
        source = p.filename or "<upload>"
        try:
            entry = await asyncio.to_thread(
                service.library.install_bytes,
                p.content.encode("utf-8"),
                p.signature,
                source=source,
            )
        except LibraryError as exc:
            log.warning(
                "protocol.install_refused", source=source, user=caller.peer.user, error=str(exc)
            )
            raise library_error(exc) from None
        log.info(
            "protocol.installed",
            id=entry.id,
            version=entry.version,
            signed_by=entry.signed_by,
            user=caller.peer.user,
        )
        return {"installed": entry.as_dict()}

    @reg.add("protocol.remove", ProtocolIdParams, TECHNICIAN, "Uninstall a protocol.")
    async def protocol_remove(caller: Caller, p: ProtocolIdParams) -> Any:
        try:
            entry = await asyncio.to_thread(service.library.remove, p.id)
        except LibraryError as exc:
            raise library_error(exc) from None
        log.info("protocol.removed", id=entry.id, version=entry.version, user=caller.peer.user)
        return {"removed": entry.as_dict()}
