"""Endpoints that describe the daemon: its methods and its status."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pbmd.daemon.services.api.registry import Caller, NoParams, RawJson, Registry, encode_value
from pbmd.daemon.services.api.roles import ANYONE

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
