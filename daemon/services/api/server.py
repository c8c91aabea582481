"""The transport: newline-delimited JSON-RPC 2.0 on a Unix stream socket.

It shares the event loop that times dose stops, so it never holds it for long:
lines are bounded, JSON is parsed per request with a yield between requests,
all clients together get a bounded number of requests per loop turn (`Budget`),
replies go through a bounded per-client queue (a client that does not read is
dropped, never waited for) and large results are encoded in a worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from pbmd.daemon.services.api.registry import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    JSONRPC,
    OVERLOADED,
    PARSE_ERROR,
    SHUTTING_DOWN,
    TOO_LARGE,
    Registry,
    RpcError,
    decode,
    encode,
    notification,
)
from pbmd.daemon.services.api.roles import Peer, RoleResolver, peer_credentials

log = structlog.get_logger()

MAX_BATCH = 64


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
