"""The endpoint registry (Moonraker's pattern) and JSON-RPC 2.0 errors and encoding.

The registry maps a method name to its handler, its parameter model (pydantic,
strict) and the roles that may call it; it knows nothing of sockets, so another
transport can serve the same endpoints. Each domain module registers its own
endpoints with `register(registry, service)`.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pbmd.daemon.services.api.roles import Peer, Role

JSONRPC = "2.0"

# JSON-RPC 2.0 error codes, and pbmd's in the server range (-32000..-32099).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
NOT_AUTHORISED = -32001
REFUSED = -32002
NOT_FOUND = -32003
NO_SESSION = -32004
TOO_LARGE = -32005
OVERLOADED = -32006
SHUTTING_DOWN = -32007

ERROR_NAMES: dict[int, str] = {
    PARSE_ERROR: "parse error",
    INVALID_REQUEST: "invalid request",
    METHOD_NOT_FOUND: "method not found",
    INVALID_PARAMS: "invalid params",
    INTERNAL_ERROR: "internal error",
    NOT_AUTHORISED: "not authorised",
    REFUSED: "refused",
    NOT_FOUND: "not found",
    NO_SESSION: "no session",
    TOO_LARGE: "request too large",
    OVERLOADED: "overloaded",
    SHUTTING_DOWN: "shutting down",
}

# --------------------------------------------------------------------------- registry


class RpcError(Exception):
    """An error reply: a JSON-RPC code, a message that says what to do, optional data."""

    def __init__(self, code: int, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = dict(data) if data is not None else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


class Caller(Protocol):
    """What a handler knows of its caller, whatever the transport."""

    @property
    def peer(self) -> Peer: ...

    @property
    def closed(self) -> bool: ...

    def notify(self, method: str, params: Mapping[str, Any]) -> bool: ...

    def send_encoded(self, data: bytes) -> bool: ...

    def on_close(self, callback: Callable[[], None]) -> None: ...


class Params(BaseModel):
    """Base of every params model: strict JSON types, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoParams(Params):
    pass


P = TypeVar("P", bound=Params)
Handler = Callable[[Caller, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    name: str
    handler: Handler
    params: type[Params]
    roles: frozenset[Role]
    summary: str
    heavy: bool = False
    """Results can be large: encode them in a worker thread."""


class Registry:
    """Method name → handler, params model, required role (any of `roles`)."""

    def __init__(self, role_help: Callable[[frozenset[Role]], str] | None = None) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._role_help = role_help or (lambda roles: ", ".join(sorted(roles)))

    def add(
        self,
        name: str,
        params: type[P],
        roles: frozenset[Role],
        summary: str,
        *,
        heavy: bool = False,
    ) -> Callable[[Callable[[Caller, P], Awaitable[Any]]], Callable[[Caller, P], Awaitable[Any]]]:
        def deco(
            fn: Callable[[Caller, P], Awaitable[Any]],
        ) -> Callable[[Caller, P], Awaitable[Any]]:
            if name in self._endpoints:
                raise ValueError(f"method {name} registered twice")
            self._endpoints[name] = Endpoint(name, fn, params, roles, summary, heavy)
            return fn

        return deco

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(sorted(self._endpoints.values(), key=lambda e: e.name))

    def __contains__(self, name: object) -> bool:
        return name in self._endpoints

    def get(self, name: str) -> Endpoint:
        ep = self._endpoints.get(name)
        if ep is None:
            raise RpcError(
                METHOD_NOT_FOUND,
                f"unknown method {name[:80]!r}; call api.methods for the list",
                {"methods": sorted(self._endpoints)},
            )
        return ep

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "method": ep.name,
                "roles": sorted(r.value for r in ep.roles),
                "summary": ep.summary,
                "params": ep.params.model_json_schema(),
            }
            for ep in self
        ]

    async def call(self, caller: Caller, name: str, raw: Any) -> tuple[Any, Endpoint]:
        """Check role and params, run the handler; RpcError for a refusal."""
        ep = self.get(name)
        if not ep.roles & caller.peer.roles:
            raise RpcError(
                NOT_AUTHORISED,
                f"{name} needs the {' or '.join(sorted(ep.roles))} role; user "
                f"{caller.peer.user} has {', '.join(sorted(caller.peer.roles))}. Ask an "
                f"administrator to add the user to {self._role_help(ep.roles)}, then log in "
                "again.",
                {"required": sorted(ep.roles), "roles": sorted(caller.peer.roles)},
            )
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RpcError(
                INVALID_PARAMS,
                f"{name} takes named params (a JSON object), not {type(raw).__name__}",
            )
        try:
            params = ep.params.model_validate(raw)
        except ValidationError as exc:
            errors = [
                {
                    "param": ".".join(str(p) for p in e["loc"]) or "(params)",
                    "problem": e["msg"],
                }
                for e in exc.errors(include_url=False)[:20]
            ]
            first = errors[0]
            raise RpcError(
                INVALID_PARAMS,
                f"{name}: {first['param']}: {first['problem']}"
                + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                {"errors": errors, "schema": ep.params.model_json_schema()},
            ) from None
        return await ep.handler(caller, params), ep


# --------------------------------------------------------------------------- encoding


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _default(value: Any) -> Any:
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, str | int) else value.name
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


@dataclass(frozen=True)
class RawJson:
    """A result already encoded as JSON (a cached status), put into the reply as is."""

    data: bytes


def encode_value(value: Any) -> bytes:
    """JSON without a newline; non-finite numbers become null (JSON has no NaN)."""
    try:
        text = json.dumps(value, default=_default, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(
            _finite(json.loads(json.dumps(value, default=_default, allow_nan=True))),
            ensure_ascii=False,
            allow_nan=False,
        )
    return text.encode("utf-8")


def _encode_one(message: Any) -> bytes:
    if isinstance(message, dict) and isinstance(message.get("result"), RawJson):
        raw: RawJson = message["result"]
        return (
            b'{"jsonrpc": "2.0", "id": '
            + encode_value(message.get("id"))
            + b', "result": '
            + raw.data
            + b"}"
        )
    return encode_value(message)


def encode(message: Mapping[str, Any] | Sequence[Any]) -> bytes:
    """One line: a message, or a batch of replies."""
    if isinstance(message, list):
        return b"[" + b", ".join(_encode_one(m) for m in message) + b"]\n"
    return _encode_one(message) + b"\n"


def notification(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "method": method, "params": params}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(line: bytes) -> Any:
    return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
