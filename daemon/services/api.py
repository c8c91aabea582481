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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import enum
import grp
import itertools
import json
import math
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, ValidationError

from pbmd.daemon.core.engine import SessionRequest, StartRefused
from pbmd.daemon.core.session import Session, SessionError, SessionEvent
from pbmd.daemon.services.records import RecordsError
from pbmd.daemon.services.report import build_report, render_text
from pbmd.protocols.errors import PlanError
from pbmd.protocols.model import Contraindication
from pbmd.protocols.plan import plan as make_plan
from pbmd.protocols.store import LibraryError, LibraryFault

if TYPE_CHECKING:
    from pbmd.daemon.services.service import Service

log = structlog.get_logger()

JSONRPC = "2.0"
MAX_BATCH = 64
STATUS_MAX_AGE_S = 0.05
"""A status snapshot is shared by every request within this age."""

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

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux ≥ 4.13


# --------------------------------------------------------------------------- roles


class Role(enum.StrEnum):
    READER = "reader"
    CLINICIAN = "clinician"
    TECHNICIAN = "technician"


ANYONE = frozenset({Role.READER})
CLINICIAN = frozenset({Role.CLINICIAN})
TECHNICIAN = frozenset({Role.TECHNICIAN})
STAFF = frozenset({Role.CLINICIAN, Role.TECHNICIAN})


@dataclass(frozen=True)
class Peer:
    """Who is calling, as the kernel says."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    user: str
    roles: frozenset[Role]

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "user": self.user,
            "roles": sorted(r.value for r in self.roles),
        }

    @property
    def sees_patients(self) -> bool:
        return bool(self.roles & STAFF)


class RoleResolver:
    """Roles from uid and groups; group names are looked up again every `ttl_s`."""

    def __init__(self, clinician_group: str, technician_group: str, ttl_s: float = 10.0) -> None:
        self.clinician_group = clinician_group
        self.technician_group = technician_group
        self.ttl_s = ttl_s
        self.daemon_uid = os.getuid()
        self._gids: tuple[int | None, int | None] = (None, None)
        self._gids_at = -math.inf
        self._users: dict[int, tuple[str, float]] = {}

    @staticmethod
    def _gid(name: str) -> int | None:
        if name.isdigit():
            return int(name)
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None

    def gids(self) -> tuple[int | None, int | None]:
        now = time.monotonic()
        if now - self._gids_at > self.ttl_s:
            self._gids = (self._gid(self.clinician_group), self._gid(self.technician_group))
            self._gids_at = now
        return self._gids

    def missing_groups(self) -> list[str]:
        clin, tech = self.gids()
        out = []
        if clin is None:
            out.append(self.clinician_group)
        if tech is None:
            out.append(self.technician_group)
        return out

    def user(self, uid: int) -> str:
        now = time.monotonic()
        cached = self._users.get(uid)
        if cached is not None and now - cached[1] < self.ttl_s:
            return cached[0]
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid {uid}"
        self._users[uid] = (name, now)
        return name

    def peer(self, pid: int, uid: int, gid: int, groups: frozenset[int]) -> Peer:
        roles = {Role.READER}
        if uid == 0 or uid == self.daemon_uid:
            roles |= STAFF
        clin, tech = self.gids()
        all_groups = groups | {gid}
        if clin is not None and clin in all_groups:
            roles.add(Role.CLINICIAN)
        if tech is not None and tech in all_groups:
            roles.add(Role.TECHNICIAN)
        return Peer(pid, uid, gid, frozenset(all_groups), self.user(uid), frozenset(roles))

    def role_help(self, roles: frozenset[Role]) -> str:
        names = []
        if Role.CLINICIAN in roles:
            names.append(f"the clinician group ({self.clinician_group})")
        if Role.TECHNICIAN in roles:
            names.append(f"the technician group ({self.technician_group})")
        return " or ".join(names) or "no group"


def peer_credentials(sock: Any) -> tuple[int, int, int, frozenset[int]]:
    """pid, uid, gid and supplementary groups of the process at the other end."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: frozenset[int] = frozenset()
    try:
        # 1024 bytes (256 groups) is the most Python's getsockopt() will ask for; a
        # caller in more groups gets ERANGE and the user database below.
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4]))
    except OSError:
        # Older kernels: the user database's view of the user's groups.
        with contextlib.suppress(KeyError):
            name = pwd.getpwuid(uid).pw_name
            groups = frozenset(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
    return pid, uid, gid, groups


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


# --------------------------------------------------------------------------- budget


class Budget:
    """At most `per_tick` API requests per event-loop turn, over all clients.

    A burst from many clients would otherwise run back to back between two
    timer checks of the session; this spreads it over loop turns, so a dose
    stop is never late by more than `per_tick` requests' worth of work.
    """

    def __init__(self, per_tick: int) -> None:
        self.per_tick = per_tick
        self.used = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._reset_scheduled = False
        self.deferred = 0

    async def take(self) -> None:
        if self.used < self.per_tick and not self.waiting:
            self.used += 1
            self._schedule_reset()
            return
        self.deferred += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self._schedule_reset()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.used -= 1  # granted but not used
            raise

    def _schedule_reset(self) -> None:
        if not self._reset_scheduled:
            self._reset_scheduled = True
            asyncio.get_running_loop().call_soon(self._reset)

    def _reset(self) -> None:
        self._reset_scheduled = False
        self.used = 0
        while self.waiting and self.used < self.per_tick:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                self.used += 1
        if self.waiting or self.used:
            self._schedule_reset()


# --------------------------------------------------------------------------- transport


@dataclass
class ServerStats:
    connections: int = 0
    rejected_connections: int = 0
    requests: int = 0
    errors: int = 0
    parse_errors: int = 0
    oversized: int = 0
    dropped_slow: int = 0
    notifications: int = 0
    latency_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=4096)
    )

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(int(q * len(lat)), len(lat) - 1)], 3) if lat else None

        return {
            "connections": self.connections,
            "rejected_connections": self.rejected_connections,
            "requests": self.requests,
            "errors": self.errors,
            "parse_errors": self.parse_errors,
            "oversized": self.oversized,
            "dropped_slow": self.dropped_slow,
            "notifications": self.notifications,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p99": pct(0.99),
            "latency_ms_max": round(lat[-1], 3) if lat else None,
        }


class Connection:
    """One client: a reader loop, a bounded send queue, a writer loop."""

    def __init__(
        self,
        server: JsonRpcServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        number: int,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self._peer = peer
        self.number = number
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._closing = False
        self._cleanups: list[Callable[[], None]] = []
        self._writer_task: asyncio.Task[None] | None = None
        self._high_water = writer.transport.get_write_buffer_limits()[1]

    # -- Caller

    @property
    def peer(self) -> Peer:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    def on_close(self, callback: Callable[[], None]) -> None:
        if self._closed:
            callback()
        else:
            self._cleanups.append(callback)

    def notify(self, method: str, params: Mapping[str, Any]) -> bool:
        return self.send_encoded(encode(notification(method, params)))

    def send_encoded(self, data: bytes) -> bool:
        if self.closed:
            return False
        transport = self.writer.transport
        if not self._queue and transport.get_write_buffer_size() < self._high_water:
            # The kernel takes it now (or the transport buffers a little): no task hop.
            try:
                transport.write(data)
            except (ConnectionError, OSError, RuntimeError):
                self.abort("connection lost")
                return False
            return True
        if len(self._queue) >= self.server.queue_messages:
            self.server.stats.dropped_slow += 1
            self.abort(f"slow reader: {len(self._queue)} replies not read")
            return False
        self._queue.append(data)
        self._wake.set()
        return True

    # -- life

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(
            client=self.number, uid=self._peer.uid, pid=self._peer.pid
        )
        self._writer_task = asyncio.create_task(self._write_loop(), name=f"api-tx-{self.number}")
        try:
            await self._read_loop()
        except (ConnectionError, OSError):
            pass
        finally:
            await self._finish()

    async def _read_loop(self) -> None:
        server = self.server
        while not self.closed:
            try:
                line = await self.reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return  # EOF (a partial last line is not a request)
            except asyncio.LimitOverrunError:
                server.stats.oversized += 1
                self.send_encoded(
                    encode(
                        _error_reply(
                            None,
                            RpcError(
                                TOO_LARGE,
                                f"request line longer than {server.max_request_bytes} bytes; "
                                "the connection is closed",
                            ),
                        )
                    )
                )
                await self.close_after_flush()
                return
            if line.strip():
                await server.handle_line(self, line)
            # Let every other task (the session's among them) run between requests.
            await asyncio.sleep(0)

    async def _write_loop(self) -> None:
        timeout = self.server.send_timeout_s
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                chunks = []
                while self._queue:
                    chunks.append(self._queue.popleft())
                self.writer.write(b"".join(chunks))
                try:
                    async with asyncio.timeout(timeout):  # cancellable, unlike 3.11's wait_for
                        await self.writer.drain()
                except TimeoutError:
                    self.server.stats.dropped_slow += 1
                    self.abort(f"slow reader: nothing read for {timeout:g} s")
                    return
        except (ConnectionError, OSError):
            self.abort("connection lost")

    async def close_after_flush(self, timeout_s: float = 1.0) -> None:
        """Stop reading, send what is queued (bounded wait), then close."""
        self._closing = True
        self._wake.set()
        task = self._writer_task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
        self.abort(None)

    def abort(self, reason: str | None) -> None:
        if self._closed:
            return
        if reason:
            log.warning("api.client_dropped", reason=reason, client=self.number, uid=self._peer.uid)
        self._closing = True
        self._queue.clear()
        self._wake.set()
        transport = self.writer.transport
        if reason is not None:
            transport.abort()
        else:
            transport.close()
        self._run_cleanups()

    def _run_cleanups(self) -> None:
        self._closed = True
        cleanups, self._cleanups = self._cleanups, []
        for cb in cleanups:
            try:
                cb()
            except Exception:
                log.exception("api.cleanup_failed")

    async def _finish(self) -> None:
        if not self._closed:
            await self.close_after_flush()
        task = self._writer_task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await task
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            await self.writer.wait_closed()


def _error_reply(req_id: Any, err: RpcError) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": req_id, "error": err.as_dict()}


class JsonRpcServer:
    """JSON-RPC 2.0, one request or batch per line, on a Unix stream socket."""

    def __init__(
        self,
        registry: Registry,
        resolver: RoleResolver,
        path: Path,
        *,
        socket_mode: int = 0o666,
        max_request_bytes: int = 256 * 1024,
        max_clients: int = 256,
        max_clients_per_uid: int = 32,
        queue_messages: int = 256,
        send_timeout_s: float = 10.0,
        requests_per_tick: int = 8,
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.path = path
        self.socket_mode = socket_mode
        self.max_request_bytes = max_request_bytes
        self.max_clients = max_clients
        self.max_clients_per_uid = max_clients_per_uid
        self.queue_messages = queue_messages
        self.send_timeout_s = send_timeout_s
        self.budget = Budget(requests_per_tick)
        self.stats = ServerStats()
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._numbers = itertools.count(1)
        self._inode: tuple[int, int] | None = None
        self.stopping = False

    async def start(self) -> None:
        self._prepare_path()
        self._server = await asyncio.start_unix_server(
            self._accept,
            path=str(self.path),
            limit=self.max_request_bytes,
            backlog=max(128, 2 * self.max_clients),
        )
        os.chmod(self.path, self.socket_mode)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    def _prepare_path(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(
                f"{self.path} exists and is not a socket; remove it or set api.socket to "
                "another path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            os.unlink(self.path)  # stale: nobody listens any more
            return
        finally:
            probe.close()
        raise OSError(
            f"another pbmd is already serving on {self.path}; stop it first, or give this one "
            "another socket (api.socket or --socket)"
        )

    async def close(self, message: str = "pbmd is stopping") -> None:
        """Stop accepting, tell every client, flush briefly, close, remove the socket."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.notify("daemon.stopping", {"message": message})
        await asyncio.gather(
            *(c.close_after_flush(0.5) for c in list(self.connections)), return_exceptions=True
        )
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._remove_socket()

    def _remove_socket(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid, gid, groups = peer_credentials(writer.get_extra_info("socket"))
        except OSError:
            writer.transport.abort()
            return
        peer = self.resolver.peer(pid, uid, gid, groups)
        refusal = self._admission(peer)
        if refusal is not None:
            self.stats.rejected_connections += 1
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(encode(_error_reply(None, refusal)))
                writer.close()
            return
        conn = Connection(self, reader, writer, peer, next(self._numbers))
        self.connections.add(conn)
        self.stats.connections += 1
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    def _admission(self, peer: Peer) -> RpcError | None:
        """Who may connect now. Staff keep a quarter of the places for themselves, and a
        user other than root or the daemon's own holds at most `max_clients_per_uid`, so
        a reader opening connections in a loop cannot lock a clinician out."""
        if self.stopping:
            return RpcError(SHUTTING_DOWN, "pbmd is stopping; try again when it is back")
        total = len(self.connections)
        if total >= self.max_clients:
            return RpcError(
                OVERLOADED,
                f"too many clients ({self.max_clients}); close idle pbmctl watches or raise "
                "api.max_clients",
            )
        if not peer.sees_patients and total >= self.max_clients - max(1, self.max_clients // 4):
            return RpcError(
                OVERLOADED,
                "too many clients; the remaining places are kept for clinicians and technicians",
            )
        if peer.uid not in (0, self.resolver.daemon_uid):
            mine = sum(1 for c in self.connections if c.peer.uid == peer.uid)
            if mine >= self.max_clients_per_uid:
                return RpcError(
                    OVERLOADED,
                    f"user {peer.user} already has {mine} connections to pbmd (the limit); "
                    "close some",
                )
        return None

    # -- requests

    async def handle_line(self, conn: Connection, line: bytes) -> None:
        await self.budget.take()
        started = time.perf_counter()
        try:
            message = decode(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self.stats.parse_errors += 1
            conn.send_encoded(
                encode(
                    _error_reply(
                        None,
                        RpcError(
                            PARSE_ERROR,
                            "the line is not JSON; send one JSON-RPC 2.0 object per line "
                            '(e.g. {"jsonrpc": "2.0", "id": 1, "method": "status"})',
                        ),
                    )
                )
            )
            return
        if isinstance(message, list):
            if not message:
                conn.send_encoded(
                    encode(_error_reply(None, RpcError(INVALID_REQUEST, "empty batch")))
                )
                return
            if len(message) > MAX_BATCH:
                conn.send_encoded(
                    encode(
                        _error_reply(
                            None,
                            RpcError(
                                INVALID_REQUEST,
                                f"batch of {len(message)}; at most {MAX_BATCH} requests per batch",
                            ),
                        )
                    )
                )
                return
            replies = []
            for item in message:
                reply, heavy = await self._one(conn, item)
                if reply is not None:
                    replies.append(reply)
            if replies:
                conn.send_encoded(await asyncio.to_thread(encode, replies))
        else:
            reply, heavy = await self._one(conn, message)
            if reply is not None:
                data = await asyncio.to_thread(encode, reply) if heavy else encode(reply)
                conn.send_encoded(data)
        self.stats.latency_ms.append((time.perf_counter() - started) * 1000.0)

    async def _one(self, conn: Connection, message: Any) -> tuple[dict[str, Any] | None, bool]:
        self.stats.requests += 1
        if not isinstance(message, dict):
            self.stats.errors += 1
            return _error_reply(
                None, RpcError(INVALID_REQUEST, "a request is a JSON object")
            ), False
        has_id = "id" in message
        req_id = message.get("id")
        if has_id and (
            isinstance(req_id, bool) or not isinstance(req_id, str | int | float | type(None))
        ):
            self.stats.errors += 1
            return _error_reply(
                None, RpcError(INVALID_REQUEST, "id must be a string, a number or null")
            ), False
        if isinstance(req_id, str) and len(req_id) > 256:
            self.stats.errors += 1
            return _error_reply(None, RpcError(INVALID_REQUEST, "id longer than 256")), False
        method = message.get("method")
        problem = None
        if message.get("jsonrpc") != JSONRPC:
            problem = 'missing "jsonrpc": "2.0"'
        elif not isinstance(method, str):
            problem = '"method" must be a string'
        elif "params" in message and not isinstance(message["params"], dict | list):
            problem = '"params" must be an object'
        if problem is not None:
            self.stats.errors += 1
            return _error_reply(req_id, RpcError(INVALID_REQUEST, problem)), False
        assert isinstance(method, str)
        heavy = False
        try:
            if self.stopping and method != "status":
                raise RpcError(SHUTTING_DOWN, "pbmd is stopping; try again when it is back")
            result, ep = await self.registry.call(conn, method, message.get("params"))
            heavy = ep.heavy
        except RpcError as err:
            self.stats.errors += 1
            return (_error_reply(req_id, err) if has_id else None), False
        except Exception as exc:
            self.stats.errors += 1
            ref = f"{time.time():.0f}-{conn.number}"
            log.exception("api.handler_failed", method=method, ref=ref)
            internal = RpcError(
                INTERNAL_ERROR,
                f"internal error in {method} ({type(exc).__name__}); logged as {ref}. The "
                "request was not carried out; report it with the log.",
            )
            return (_error_reply(req_id, internal) if has_id else None), False
        if not has_id:
            return None, False
        return {"jsonrpc": JSONRPC, "id": req_id, "result": result}, heavy


# --------------------------------------------------------------------------- watching


@dataclass
class _Watch:
    caller: Caller
    session_id: str
    full: bool


class WatchHub:
    """Streams of one session's status and events to the clients that watch it.

    The engine calls `on_event` synchronously, sometimes from the telemetry
    reader, so it only queues; encoding and sending happen in the next loop
    turn, once per event for all watchers. Status snapshots are taken once per
    interval for everyone. A watch ends when its session has ended and its
    record is written (then `session.ended` is the last notification).
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._watches: list[_Watch] = []
        self._events: collections.deque[SessionEvent] = collections.deque(maxlen=10_000)
        self._flush_scheduled = False
        self._ticker: asyncio.Task[None] | None = None
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._sessions: dict[str, Session] = {}
        self.closed = False

    @property
    def count(self) -> int:
        return len(self._watches)

    def subscribe(self, caller: Caller, session: Session) -> None:
        watch = _Watch(caller, session.id, caller.peer.sees_patients)
        self._watches.append(watch)
        caller.on_close(lambda: self._remove(watch))
        self._sessions[session.id] = session
        if session.id not in self._followers:
            self._followers[session.id] = asyncio.create_task(
                self._follow(session), name=f"watch-{session.id[:8]}"
            )
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="watch-ticker")

    def _remove(self, watch: _Watch) -> None:
        with contextlib.suppress(ValueError):
            self._watches.remove(watch)

    def on_event(self, event: SessionEvent) -> None:
        if self.closed or not self._watches:
            return
        self._events.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._events:
            ev = self._events.popleft()
            targets = [w for w in self._watches if w.session_id == ev.session_id]
            if not targets:
                continue
            data = encode(
                notification(
                    "session.event", {"session_id": ev.session_id, "event": event_dict(ev)}
                )
            )
            for w in targets:
                w.caller.send_encoded(data)

    def _broadcast(self, session: Session, method: str, extra: Mapping[str, Any]) -> None:
        targets = [w for w in self._watches if w.session_id == session.id]
        if not targets:
            return
        status = session.status()
        encoded: dict[bool, bytes] = {}
        for w in targets:
            if w.full not in encoded:
                shown = status if w.full else redact_session(status)
                encoded[w.full] = encode(
                    notification(method, {"session_id": session.id, **extra, "status": shown})
                )
            w.caller.send_encoded(encoded[w.full])

    async def _tick(self) -> None:
        while self._watches and not self.closed:
            for sid in {w.session_id for w in self._watches}:
                session = self._sessions.get(sid)
                if session is not None and not session.state.final:
                    self._broadcast(session, "session.status", {})
            await asyncio.sleep(self.interval_s)  # snapshot cadence, not synchronisation

    async def _follow(self, session: Session) -> None:
        try:
            state = await session.wait()
            self._flush()
            self._broadcast(session, "session.ended", {"state": state.value})
            for w in [w for w in self._watches if w.session_id == session.id]:
                self._remove(w)
        finally:
            self._followers.pop(session.id, None)
            self._sessions.pop(session.id, None)

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Let watches of sessions that have ended deliver their `session.ended`."""
        followers = [t for sid, t in self._followers.items() if self._sessions[sid].state.final]
        if followers:
            await asyncio.wait(followers, timeout=timeout_s)

    async def close(self) -> None:
        self.closed = True
        tasks = [t for t in (self._ticker, *self._followers.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()


def event_dict(ev: SessionEvent) -> dict[str, Any]:
    return {
        "kind": ev.kind,
        "message": ev.message,
        "port": ev.port,
        "step": ev.step,
        "data": dict(ev.data),
        "utc": ev.utc,
    }


def redact_session(status: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A session status without who the patient is (for callers without a staff role)."""
    if status is None:
        return None
    out = dict(status)
    if out.get("patient_ref") is not None:
        out["patient_ref"] = None
        out["patient_ref_redacted"] = True
    return out


# --------------------------------------------------------------------------- params

PatientRef = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]
ProtocolId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
SessionId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
PortNumber = Annotated[int, Field(ge=1, le=8)]
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
    watch: bool = Field(default=False, description="Stream the session on this connection.")


class PortParams(Params):
    port: PortNumber


class OptionalPortParams(Params):
    port: PortNumber | None = None


class AbortParams(Params):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=200)] = "aborted by operator"


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


class CalibrationSetParams(Params):
    due: Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")] = Field(
        description="ISO date, e.g. 2025-06-30."
    )


class ServiceClearParams(Params):
    note: Annotated[str, StringConstraints(min_length=3, max_length=500, strip_whitespace=True)]


class ControllerParams(Params):
    controller: Annotated[str, StringConstraints(min_length=1, max_length=32)]


# --------------------------------------------------------------------------- endpoints


def _library_error(exc: LibraryError) -> RpcError:
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


def _current(service: Service, what: str) -> Session:
    s = service.engine.session
    if s is None or s.state.final:
        raise RpcError(
            NO_SESSION,
            f"no session is running, nothing to {what}; start one with pbmctl session start",
        )
    return s


@contextlib.contextmanager
def _refused_on_session_error() -> Iterator[None]:
    """A session that says no (wrong state, unknown port) is a refusal, with its reason."""
    try:
        yield
    except SessionError as exc:
        raise RpcError(REFUSED, str(exc)) from None


def build_registry(service: Service) -> Registry:
    """Every method of the control API, bound to the running service."""
    reg = Registry(service.roles.role_help)
    engine = service.engine
    hub = service.watch_hub

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

    # ---------------------------------------------------------------- protocols

    @reg.add("protocol.list", NoParams, ANYONE, "Installed protocols.")
    async def protocol_list(caller: Caller, p: NoParams) -> Any:
        try:
            entries = await asyncio.to_thread(service.library.list)
        except LibraryError as exc:
            raise _library_error(exc) from None
        return {"protocols": [e.as_dict() for e in entries]}

    @reg.add("protocol.show", ProtocolShowParams, ANYONE, "One installed protocol, step by step.")
    async def protocol_show(caller: Caller, p: ProtocolShowParams) -> Any:
        try:
            return await asyncio.to_thread(service.describe_protocol, p.id, p.source)
        except LibraryError as exc:
            raise _library_error(exc) from None

    @reg.add(
        "protocol.validate",
        ProtocolFileParams,
        ANYONE,
        "Check a protocol file (and signature) as install would, without installing it.",
    )
    async def protocol_validate(caller: Caller, p: ProtocolFileParams) -> Any:
        return await asyncio.to_thread(
            service.validate_protocol, p.content, p.signature, p.filename or "<upload>"
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
            raise _library_error(exc) from None
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
            raise _library_error(exc) from None
        log.info("protocol.removed", id=entry.id, version=entry.version, user=caller.peer.user)
        return {"removed": entry.as_dict()}

    # ---------------------------------------------------------------- sessions

    @reg.add("session.start", SessionStartParams, CLINICIAN, "Start a protocol for a patient.")
    async def session_start(caller: Caller, p: SessionStartParams) -> Any:
        try:
            engine.check_ready(tuple(p.ports) if p.ports else None)
        except StartRefused as exc:
            raise _refused(exc) from None
        try:
            loaded, entry = await asyncio.to_thread(service.load_protocol, p.protocol)
        except LibraryError as exc:
            raise _library_error(exc) from None
        protocol = loaded.protocol
        listed = {c.value for c in protocol.contraindications}
        answers = {c.value: v for c, v in p.contraindications.items()}
        missing = sorted(listed - set(answers))
        if missing:
            raise RpcError(
                REFUSED,
                f"answer every contraindication {protocol.id} lists before starting; "
                f"unanswered: {', '.join(missing)} (pbmctl: --contraindication NAME=no)",
                {
                    "missing": missing,
                    "descriptions": {m: Contraindication(m).description for m in missing},
                },
            )
        try:
            plan = await asyncio.to_thread(
                make_plan, protocol, engine.port_map.applicators(), service.library.limits
            )
        except PlanError as exc:
            raise RpcError(
                REFUSED,
                f"{protocol.id} cannot run on the connected applicators: {exc}",
                {"issues": [i.as_dict() for i in exc.errors]},
            ) from None
        request = SessionRequest(
            plan=plan,
            patient_ref=p.patient_ref,
            contraindications=answers,
            ports=tuple(p.ports) if p.ports else None,
            signing_key_id=entry.signed_by,
            protocol_title=protocol.title,
            operator=caller.peer.user,
            contraindicated_by_protocol=frozenset(listed),
        )
        # The session's tasks must not inherit this connection's log context (client,
        # uid, pid): they outlive it and log for the session.
        saved = dict(structlog.contextvars.get_contextvars())
        structlog.contextvars.clear_contextvars()
        try:
            session = await engine.start_session(request)
        except StartRefused as exc:
            raise _refused(exc) from None
        except SessionError as exc:
            raise RpcError(REFUSED, str(exc)) from None
        finally:
            structlog.contextvars.bind_contextvars(**saved)
        log.info(
            "session.started_by",
            session_id=session.id,
            protocol=protocol.id,
            user=caller.peer.user,
            ports=list(session.runners),
        )
        if p.watch:
            hub.subscribe(caller, session)
        return {"session_id": session.id, "status": session.status(), "watching": p.watch}

    @reg.add("session.watch", NoParams, ANYONE, "Stream the running session until it ends.")
    async def session_watch(caller: Caller, p: NoParams) -> Any:
        s = engine.session
        if s is None:
            return {"session_id": None, "status": None, "watching": False}
        shown = s.status() if caller.peer.sees_patients else redact_session(s.status())
        if s.state.final:
            return {"session_id": s.id, "status": shown, "watching": False}
        hub.subscribe(caller, s)
        return {"session_id": s.id, "status": shown, "watching": True}

    @reg.add("session.confirm", PortParams, CLINICIAN, "Confirm the placement on a gated port.")
    async def session_confirm(caller: Caller, p: PortParams) -> Any:
        s = _current(service, "confirm")
        with _refused_on_session_error():
            s.confirm(p.port)
        return {"confirmed": p.port}

    @reg.add("session.pause", OptionalPortParams, CLINICIAN, "Pause one port or all.")
    async def session_pause(caller: Caller, p: OptionalPortParams) -> Any:
        s = _current(service, "pause")
        with _refused_on_session_error():
            s.pause(p.port)
        return {"paused": p.port if p.port is not None else "all"}

    @reg.add("session.resume", OptionalPortParams, CLINICIAN, "Resume one port or all.")
    async def session_resume(caller: Caller, p: OptionalPortParams) -> Any:
        s = _current(service, "resume")
        with _refused_on_session_error():
            s.resume(p.port)
        return {"resumed": p.port if p.port is not None else "all"}

    @reg.add("session.abort", AbortParams, CLINICIAN, "Stop all emission and end the session.")
    async def session_abort(caller: Caller, p: AbortParams) -> Any:
        s = _current(service, "abort")
        with _refused_on_session_error():
            await s.abort(f"{p.reason} ({caller.peer.user})")
        return {"session_id": s.id, "state": s.state.value}

    # ---------------------------------------------------------------- records

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
        try:
            row = await service.store.get_session(p.session_id)
        except RecordsError as exc:
            raise RpcError(REFUSED, str(exc)) from None
        if row is None:
            raise RpcError(
                NOT_FOUND,
                f"no session {p.session_id!r} in the records; "
                "`pbmctl records list` shows the sessions",
            )
        return {"session": row}

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
        try:
            row = await service.store.get_session(p.session_id)
        except RecordsError as exc:
            raise RpcError(REFUSED, str(exc)) from None
        if row is None:
            raise RpcError(
                NOT_FOUND,
                f"no session {p.session_id!r} in the records; "
                "`pbmctl records list` shows the sessions",
            )

        def build() -> dict[str, Any]:
            report = build_report(row)
            out: dict[str, Any] = {"session_id": p.session_id}
            if p.format in ("json", "both"):
                out["report"] = report.to_dict()
            if p.format in ("text", "both"):
                out["text"] = render_text(report)
            return out

        return await asyncio.to_thread(build)

    # ---------------------------------------------------------------- technician

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
        return await service.clear_fault(p.controller, caller.peer.user)

    @reg.add(
        "service.clear",
        ServiceClearParams,
        TECHNICIAN,
        "Record that the system was serviced after a port stayed lit; sessions may start again.",
    )
    async def service_clear(caller: Caller, p: ServiceClearParams) -> Any:
        result = service.clear_service_required(caller.peer.user, p.note)
        await service.store.sync()
        return result

    return reg


def _refused(exc: StartRefused) -> RpcError:
    cause = exc.cause
    return RpcError(
        REFUSED,
        str(exc),
        {"cause": cause.name if cause else None, "code": cause.code if cause else None},
    )
