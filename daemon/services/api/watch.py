"""Streams of the running session to the clients that watch it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pbmd.daemon.core.session import Session, SessionEvent
from pbmd.daemon.core.status import RunnerStatus, SessionStatus
from pbmd.daemon.services.api.registry import Caller, encode, notification

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
                shown = session_json(status, full=w.full)
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
        "kind": ev.kind.value,
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


def session_json(status: SessionStatus | None, *, full: bool = True) -> dict[str, Any] | None:
    """A session's status as the API shows it (``status``, ``session.*``); without
    the patient reference unless ``full``."""
    if status is None:
        return None
    out = {
        "session_id": status.session_id,
        "state": status.state.value,
        "protocol_id": status.protocol_id,
        "protocol_version": status.protocol_version,
        "plan_hash": status.plan_hash,
        "patient_ref": status.patient_ref,
        "started_utc": status.started_utc,
        "ended_utc": status.ended_utc,
        "cause_code": status.cause_code,
        "cause_message": status.cause_message,
        "trip": status.trip,
        "service_required": status.service_required,
        "ports": [runner_json(r) for r in status.ports],
    }
    return out if full else redact_session(out)


def runner_json(r: RunnerStatus) -> dict[str, Any]:
    """One port of a session: its state and, once it began, its current step's fields."""
    out: dict[str, Any] = {"port": r.port, "state": r.state.value, "wait_reason": r.wait_reason}
    if r.step is not None:
        out.update(asdict(r.step))
    return out
