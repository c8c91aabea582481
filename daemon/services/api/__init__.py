"""The control API: one endpoint registry, served as JSON-RPC 2.0 over a Unix socket.

The registry (Moonraker's pattern) maps a method name to its handler, its
parameter model (pydantic, strict) and the roles that may call it; it knows
nothing of sockets, so another transport can serve the same endpoints. The
transport here is newline-delimited JSON-RPC 2.0 on a Unix stream socket,
callers identified by the kernel (SO_PEERCRED, SO_PEERGROUPS):

- *reader*: anyone who can connect: status, session.watch, protocol list/show/validate;
- *clinician*: members of the clinician group: sessions, records, reports;
- *technician*: members of the technician group: protocol install/remove,
  records export, calibration, clearing a controller fault, records, reports;
- root and the daemon's own user hold every role.

The API shares the event loop that times dose stops, so it is built never to
hold it for long: lines are bounded, JSON is parsed per request with a yield
between requests, all clients together get a bounded number of requests per
loop turn (`Budget`), replies go through a bounded per-client queue (a client
that does not read is dropped, never waited for), large results are encoded
in a worker thread, and every handler that touches files or SQLite runs in a
thread.

Where things live: `roles` (who is calling), `registry` (endpoints, errors,
JSON encoding), `server` (the socket, connections, budgets), `watch` (session
streams); the endpoints by domain, each with a `register(registry, service)`:
`status`, `protocols`, `sessions`, `records` (and reports), `technician`
(calibration, controller faults, the service latch), `courses` (patients, courses,
outcomes, FHIR and PDF exports). Endpoints only adapt: the
engine's use cases decide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pbmd.daemon.services.api import (
    courses,
    protocols,
    records,
    sessions,
    status,
    technician,
)
from pbmd.daemon.services.api.registry import (
    ERROR_NAMES,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    JSONRPC,
    METHOD_NOT_FOUND,
    NO_SESSION,
    NOT_AUTHORISED,
    NOT_FOUND,
    OVERLOADED,
    PARSE_ERROR,
    REFUSED,
    SHUTTING_DOWN,
    TOO_LARGE,
    Caller,
    Endpoint,
    NoParams,
    Params,
    RawJson,
    Registry,
    RpcError,
    decode,
    encode,
    encode_value,
    notification,
)
from pbmd.daemon.services.api.roles import (
    ANYONE,
    CLINICIAN,
    STAFF,
    TECHNICIAN,
    Peer,
    Role,
    RoleResolver,
    peer_credentials,
)
from pbmd.daemon.services.api.server import Budget, Connection, JsonRpcServer, ServerStats
from pbmd.daemon.services.api.watch import WatchHub, event_dict, redact_session, session_json

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

__all__ = [
    "ANYONE",
    "CLINICIAN",
    "ERROR_NAMES",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "JSONRPC",
    "METHOD_NOT_FOUND",
    "NOT_AUTHORISED",
    "NOT_FOUND",
    "NO_SESSION",
    "OVERLOADED",
    "PARSE_ERROR",
    "REFUSED",
    "SHUTTING_DOWN",
    "STAFF",
    "TECHNICIAN",
    "TOO_LARGE",
    "Budget",
    "Caller",
    "Connection",
    "Endpoint",
    "JsonRpcServer",
    "NoParams",
    "Params",
    "Peer",
    "RawJson",
    "Registry",
    "Role",
    "RoleResolver",
    "RpcError",
    "ServerStats",
    "WatchHub",
    "build_registry",
    "decode",
    "encode",
    "encode_value",
    "event_dict",
    "notification",
    "peer_credentials",
    "redact_session",
    "session_json",
]


def build_registry(service: Service) -> Registry:
    """Every method of the control API, each domain registering its own endpoints."""
    reg = Registry(service.roles.role_help)
    for domain in (status, protocols, sessions, records, technician, courses):
        domain.register(reg, service)
    return reg
