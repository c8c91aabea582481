"""pbmctl's side of the control socket: a small asyncio JSON-RPC 2.0 client.

Replies are matched to requests by id; notifications (a watched session's
status and events) go to a queue, so one connection can watch a session and
send confirmations at the same time. Errors carry the exit status pbmctl
returns for them (docs/api.md lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SESSION_FAILED = 4
EXIT_NOT_AUTHORISED = 5
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (for a watched session: it completed)",
    EXIT_REFUSED: "the daemon refused or could not do it (invalid, not found, not ready)",
    EXIT_USAGE: "wrong command line",
    EXIT_UNREACHABLE: "the daemon is not running or the connection was lost",
    EXIT_SESSION_FAILED: "the watched session ended aborted, faulted or interrupted",
    EXIT_NOT_AUTHORISED: "your user lacks the role the command needs",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); a running session is not affected",
}

# Error codes of the API (pbmd.daemon.services.api) that pbmctl maps to exit statuses.
NOT_AUTHORISED = -32001
OVERLOADED = -32006
SHUTTING_DOWN = -32007

MAX_REPLY_BYTES = 256 * 1024 * 1024


class CtlError(Exception):
    """Something pbmctl reports and exits with: a message, what to do, an exit status."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_dict(self) -> dict[str, Any]:
        return {"message": self.message, "exit_code": self.exit_code}


class DaemonUnreachable(CtlError):
    exit_code = EXIT_UNREACHABLE


class RemoteError(CtlError):
    """A JSON-RPC error reply."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data
        if code == NOT_AUTHORISED:
            self.exit_code = EXIT_NOT_AUTHORISED
        elif code in (OVERLOADED, SHUTTING_DOWN):
            self.exit_code = EXIT_UNREACHABLE

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        out["exit_code"] = self.exit_code
        return out


def find_socket(explicit: Path | None, config_file: Path | None) -> Path:
    """The daemon's socket: --socket, $PBMD_SOCKET, the configuration, the usual places."""
    from pbmd.daemon.services import config as cfg

    if explicit is not None:
        return explicit
    env = os.environ.get("PBMD_SOCKET")
    if env:
        return Path(env)
    tried: list[Path] = []
    config_path = config_file or (
        Path(os.environ["PBMD_CONFIG"]) if os.environ.get("PBMD_CONFIG") else None
    )
    if config_path is None and os.access(cfg.SYSTEM_CONFIG, os.R_OK):
        config_path = cfg.SYSTEM_CONFIG
    if config_path is not None:
        try:
            config, _ = cfg.load(config_path)
            return config.socket_path
        except cfg.ConfigError as exc:
            if config_file is not None:
                raise CtlError(f"cannot use --config: {exc.render()}") from None
    for candidate in cfg.client_socket_candidates():
        tried.append(candidate)
        if candidate.exists():
            return candidate
    raise DaemonUnreachable(
        "pbmd is not running (no control socket at "
        + ", ".join(str(p) for p in tried)
        + "); start it with `pbmd run`, or give --socket PATH"
    )


class Client:
    """One connection to pbmd."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.notifications: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._read(), name="pbmctl-reader")
        self.closed_reason: str | None = None
        self.timeout_s = 60.0

    @classmethod
    async def connect(cls, path: Path, timeout_s: float = 5.0) -> Client:
        try:
            reader, writer = await asyncio.wait_for(cls._open(path), timeout_s)
        except FileNotFoundError:
            raise DaemonUnreachable(
                f"pbmd is not running (no socket {path}); start it with `pbmd run`, or give "
                "--socket PATH"
            ) from None
        except ConnectionRefusedError:
            raise DaemonUnreachable(
                f"nothing listens on {path} (pbmd stopped without removing it?); start pbmd"
            ) from None
        except PermissionError:
            raise DaemonUnreachable(
                f"no permission to connect to {path}; ask an administrator to check the "
                "socket's permissions (api.socket_mode) and its directory"
            ) from None
        except (TimeoutError, OSError) as exc:
            raise DaemonUnreachable(f"cannot connect to {path}: {exc}") from None
        return cls(reader, writer)

    @staticmethod
    async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect; a full listen backlog (EAGAIN) is retried until the caller's timeout."""
        delay_s = 0.005
        while True:
            try:
                return await asyncio.open_unix_connection(str(path), limit=MAX_REPLY_BYTES)
            except BlockingIOError:
                await asyncio.sleep(delay_s)  # back-off while the daemon accepts others
                delay_s = min(delay_s * 2, 0.2)

    async def _read(self) -> None:
        reason = "pbmd closed the connection"
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    reason = "pbmd sent something that is not JSON"
                    break
                self._dispatch(msg)
        except (ConnectionError, OSError, ValueError) as exc:
            reason = f"connection to pbmd lost ({exc})"
        finally:
            self.closed_reason = reason
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(DaemonUnreachable(reason))
            self._pending.clear()
            self.notifications.put_nowait(None)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, list):
            for m in msg:
                self._dispatch(m)
            return
        if not isinstance(msg, dict):
            return
        if "method" in msg and "id" not in msg:
            self.notifications.put_nowait(msg)
            return
        req_id = msg.get("id")
        if req_id is None and "error" in msg:
            err = msg["error"]
            exc = RemoteError(int(err.get("code", 0)), str(err.get("message")), err.get("data"))
            for waiting in self._pending.values():
                if not waiting.done():
                    waiting.set_exception(exc)
            self._pending.clear()
            return
        fut = (
            self._pending.pop(req_id)
            if isinstance(req_id, int) and req_id in self._pending
            else None
        )
        if fut is None or fut.done():
            return
        if "error" in msg:
            err = msg["error"]
            fut.set_exception(
                RemoteError(int(err.get("code", 0)), str(err.get("message")), err.get("data"))
            )
        else:
            fut.set_result(msg.get("result"))

    async def call(
        self, method: str, params: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else max(timeout_s, self.timeout_s)
        if self.closed_reason is not None:
            raise DaemonUnreachable(self.closed_reason)
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        request = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params:
            request["params"] = dict(params)
        try:
            self._writer.write(json.dumps(request).encode("utf-8") + b"\n")
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._pending.pop(req_id, None)
            raise DaemonUnreachable(f"connection to pbmd lost ({exc})") from None
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            self._pending.pop(req_id, None)
            raise DaemonUnreachable(
                f"pbmd did not answer {method} within {timeout_s:g} s"
            ) from None

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            self._writer.close()
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def parse_ports(text: str) -> list[int]:
    """ "1,2" or "1-4" or "1,3-4" → [1, 2] …"""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a port list such as 1,2 or 1-4")
        first, last = int(lo), int(hi) if sep else int(lo)
        if not 1 <= first <= last <= 8:
            raise ValueError(f"{text!r}: ports are 1..8")
        out.extend(range(first, last + 1))
    if not out:
        raise ValueError("no ports given")
    return sorted(set(out))


def parse_answers(items: Sequence[str]) -> dict[str, bool]:
    """["cancer=no", "pregnancy=yes"] → {"cancer": False, "pregnancy": True}."""
    out: dict[str, bool] = {}
    for item in items:
        name, sep, value = item.partition("=")
        answer = value.strip().lower()
        if not sep or answer not in ("yes", "no", "y", "n", "true", "false"):
            raise ValueError(f"{item!r}: write NAME=yes or NAME=no, e.g. pregnancy=no")
        out[name.strip()] = answer in ("yes", "y", "true")
    return out
