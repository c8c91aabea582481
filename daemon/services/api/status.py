"""Endpoints that describe the daemon: its methods and its status.

Also the API's spelling of the core's typed status values (``port_json``,
``controller_json``): stale telemetry reads as absent, with its age beside it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pbmd.daemon.core.status import ControllerStatus, PortStatus
from pbmd.daemon.services.api.registry import Caller, NoParams, RawJson, Registry, encode_value
from pbmd.daemon.services.api.roles import ANYONE
from pbmd.drivers import codec

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

STATUS_MAX_AGE_S = 0.05
"""A status snapshot is shared by every request within this age."""


def register(reg: Registry, service: Service) -> None:
    """`api.methods` and `status`."""

    @reg.add("api.methods", NoParams, ANYONE, "The methods, their roles and params schemas.")
    async def methods(caller: Caller, p: NoParams) -> Any:
        return {"methods": reg.describe(), "you": caller.peer.as_dict()}

    cache: dict[bool, tuple[float, bytes]] = {}

    @reg.add("status", NoParams, ANYONE, "Daemon, controllers, ports, records, current session.")
    async def status(caller: Caller, p: NoParams) -> Any:
        # One snapshot serves every caller for STATUS_MAX_AGE_S: a thousand requests a
        # second cost a thousand splices, not a thousand snapshots.
        full = caller.peer.sees_patients
        now = time.monotonic()
        hit = cache.get(full)
        if hit is None or now - hit[0] > STATUS_MAX_AGE_S:
            hit = (now, encode_value(service.status(full=full)))
            cache[full] = hit
        body = hit[1]
        return RawJson(b'{"caller": ' + encode_value(caller.peer.as_dict()) + b", " + body[1:])


def port_json(p: PortStatus) -> dict[str, Any]:
    """A port in ``status``: its readings null while they are not known to be current."""
    r = p.reading
    return {
        "port": p.port,
        "controller": p.controller,
        "device_port": p.device_port,
        "applicator": None if p.applicator is None else p.applicator.as_dict(),
        "emitting": None if r is None else r.emitting,
        "power_mw": None if r is None else r.power_mw,
        "temperature_c": None if r is None else r.temperature_c,
        "contact": None if r is None else r.contact,
        "telemetry_stale": p.telemetry_stale,
        "telemetry_age_s": p.freshness.rounded_age_s,
    }


def controller_json(c: ControllerStatus) -> dict[str, Any]:
    """A controller's telemetry fields in ``status`` (the link's own are added by it)."""
    out: dict[str, Any] = {
        "telemetry_age_s": c.freshness.rounded_age_s,
        "telemetry_stale": c.stale,
    }
    if c.reported_state is not None:
        code = c.fault_code
        out.update(
            state=c.state,
            fault=None if not code else codec.describe(codec.FaultCode, code),
            interlocks=None if c.interlocks is None else c.interlocks.as_dict(),
            device_time_s=c.device_time_s,
        )
    return out
