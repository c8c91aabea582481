"""Endpoints of the technician: calibration, controller faults, the service latch."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, StringConstraints

from pbmd.daemon.core.engine import CommandRefused
from pbmd.daemon.services.api.registry import (
    INVALID_PARAMS,
    NOT_FOUND,
    REFUSED,
    Caller,
    NoParams,
    Params,
    Registry,
    RpcError,
)
from pbmd.daemon.services.api.roles import ANYONE, TECHNICIAN

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service


class CalibrationSetParams(Params):
    due: Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")] = Field(
        description="ISO date, e.g. 2025-06-30."
    )


class ServiceClearParams(Params):
    note: Annotated[str, StringConstraints(min_length=3, max_length=500, strip_whitespace=True)]


class ControllerParams(Params):
    controller: Annotated[str, StringConstraints(min_length=1, max_length=32)]


def register(reg: Registry, service: Service) -> None:
    """`calibration.*`, `controller.clear_fault` and `service.clear`."""

    @reg.add("calibration.get", NoParams, ANYONE, "The calibration due date and where it is set.")
    async def calibration_get(caller: Caller, p: NoParams) -> Any:
        return service.calibration_status()

    @reg.add("calibration.set", CalibrationSetParams, TECHNICIAN, "Record a new due date.")
    async def calibration_set(caller: Caller, p: CalibrationSetParams) -> Any:
        try:
            due = dt.date.fromisoformat(p.due)
        except ValueError:
            raise RpcError(
                INVALID_PARAMS, f"calibration.set: due: {p.due!r} is not a date"
            ) from None
        try:
            await asyncio.to_thread(service.set_calibration_due, due, caller.peer.user)
        except OSError as exc:
            raise RpcError(REFUSED, f"cannot store the calibration date: {exc}") from None
        return service.calibration_status()

    @reg.add(
        "controller.clear_fault",
        ControllerParams,
        TECHNICIAN,
        "Clear a controller's latched fault (after finding its cause).",
    )
    async def controller_clear_fault(caller: Caller, p: ControllerParams) -> Any:
        link = next((x for x in service.links if x.name == p.controller), None)
        if link is None:
            raise RpcError(
                NOT_FOUND,
                f"no controller {p.controller!r}; controllers: "
                f"{', '.join(x.name for x in service.links)}",
            )
        try:
            await service.engine.clear_fault(link.handle, p.controller, caller.peer.user)
        except CommandRefused as exc:
            raise RpcError(REFUSED, str(exc)) from None
        return {"controller": p.controller, "cleared": True}

    @reg.add(
        "service.clear",
        ServiceClearParams,
        TECHNICIAN,
        "Record that the system was serviced after a port stayed lit; sessions may start again.",
    )
    async def service_clear(caller: Caller, p: ServiceClearParams) -> Any:
        try:
            result = service.clear_service_required(caller.peer.user, p.note)
        except CommandRefused as exc:
            raise RpcError(REFUSED, str(exc)) from None
        await service.store.sync()
        return result
