"""Dose the daemon could not see end, taken from the controllers' own counters.

Two things leave a record waiting for GET_COUNTERS (ICD §6): a crash or stop of
the daemon during a session (the session is left open, its running emission
unfinished), and a link lost while an emission ran (the session is closed, the
emission's controller energy is the last telemetry sample: ``provisional``, a
lower bound). Both are settled here, the same way, from a restart or a
reconnection: each waiting emission gets the controller's figure for it, the
port's session total covers dose no emission row holds, and the figures are
final from then on.

A session whose counters cannot be read (its controller is not connected) is
listed in ``unreconciled``; new sessions are refused until it is settled,
because a new session's ARM would reset the counters that hold its dose.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from pbmd.daemon.core.controllers import PortMap
from pbmd.daemon.core.recording import RecordSink, StoreRecorder
from pbmd.daemon.core.safety import EndCause
from pbmd.drivers import codec
from pbmd.drivers.client import ClientError

if TYPE_CHECKING:
    from pbmd.daemon.core.session import Session

log = structlog.get_logger()

PROVISIONAL_WAITING = (
    "the energy of an emission cut by a link loss is provisional (a lower bound) until "
    "the controller's counters are read; reconnect the controller"
)
"""Why a session closed with a provisional emission waits (``unreconciled``)."""

GAVE_UP = "reconcile_impossible"
"""The event of a session whose counters were reset before they could be read: its
provisional energy stays a lower bound, and it is not asked for again."""


def hold_for_counters(session: Session, unreconciled: dict[str, str]) -> None:
    """A session a link loss ended with provisional energy waits for its controller's
    counters: listed in ``unreconciled`` (no new session's ARM resets them) until
    `reconcile_sessions` reads them on reconnection."""
    recorder = session.recorder
    if isinstance(recorder, StoreRecorder) and recorder.provisional:
        unreconciled[session.id] = PROVISIONAL_WAITING


async def reconcile_sessions(
    store: RecordSink,
    port_map: PortMap,
    unreconciled: dict[str, str],
    *,
    own: str | None = None,
) -> list[str]:
    """Settle every session whose dose waits for the counters; the ids settled.

    Nothing is emitted: a port found emitting for a session nobody runs is
    switched off. ``own`` is the engine's current session: the session closes its
    own record, so only its provisional figures are settled here, once it has.
    """
    settled: list[str] = []
    for row in await store.sessions_to_reconcile():
        session_id = str(row["id"])
        if session_id == own and row.get("ended_utc") is None:
            continue  # still running, or its end not on disk yet
        readings = await _read_counters(port_map, unreconciled, session_id, row)
        if readings is None:
            continue
        matched = _take_counters(store, session_id, row, readings)
        if row.get("ended_utc") is None:
            _close_interrupted(store, session_id, readings, bool(matched))
        else:
            waiting = {int(em["port"]) for em in row.get("emissions", []) if _waiting(em)}
            _settle_provisional(store, session_id, readings, waiting <= matched)
        unreconciled.pop(session_id, None)
        settled.append(session_id)
    if settled:
        await store.sync()
    return settled


async def _read_counters(
    port_map: PortMap, unreconciled: dict[str, str], session_id: str, row: Mapping[str, Any]
) -> dict[int, codec.Counters] | None:
    """The counters of each of the session's ports; None (and unreconciled) on failure."""
    readings: dict[int, codec.Counters] = {}
    for port in _ports_of(row):
        if port not in port_map:
            continue
        target = port_map[port]
        try:
            counters = await target.controller.client.get_counters(target.device_port)
            if counters.emitting:
                # Nothing may emit for a session nobody is running.
                await target.controller.client.all_off()
        except ClientError as exc:
            unreconciled[session_id] = f"port {port}: {exc}"
            log.error("reconcile.counters_failed", session_id=session_id, port=port, error=str(exc))
            return None
        readings[port] = counters
    return readings


def _waiting(em: Mapping[str, Any]) -> bool:
    """An emission whose controller energy is not the controller's final figure yet."""
    return em.get("ended_utc") is None or em.get("controller_energy_source") == "provisional"


def _take_counters(
    store: RecordSink,
    session_id: str,
    row: Mapping[str, Any],
    readings: Mapping[int, codec.Counters],
) -> set[int]:
    """Give each waiting emission the controller's figure and each port its session
    total; the ports whose counters belong to this session."""
    token = row.get("session_token")
    matched: set[int] = set()
    emissions: list[Mapping[str, Any]] = list(row.get("emissions", []))
    for port, counters in readings.items():
        if token is None or counters.session_token != int(token):
            continue
        matched.add(port)
        on_port = [em for em in emissions if em.get("port") == port]
        held = {int(em["seq"]): int(em.get("controller_energy_uj") or 0) for em in on_port}
        for em in filter(_waiting, on_port):
            seq = int(em["seq"])
            # The port's session total less what its other emissions hold, and never
            # more than the controller's last emission: dose is counted once, and an
            # emission whose EMIT_START never ran gets nothing.
            others = sum(held.values()) - held[seq]
            held[seq] = min(counters.delivered_uj, max(counters.session_delivered_uj - others, 0))
            store.reconcile_emission(
                seq,
                controller_energy_uj=held[seq],
                duration_ms=counters.duration_ms,
                stop_reason=counters.last_stop_reason,
            )
        store.reconcile_port(
            session_id, port, controller_session_delivered_uj=counters.session_delivered_uj
        )
    return matched


def _counters_data(readings: Mapping[int, codec.Counters]) -> dict[str, Any]:
    return {
        str(p): {
            "session_delivered_uj": c.session_delivered_uj,
            "delivered_uj": c.delivered_uj,
            "last_stop_reason": c.last_stop_reason,
            "session_token": c.session_token,
        }
        for p, c in readings.items()
    }


def _close_interrupted(
    store: RecordSink, session_id: str, readings: Mapping[int, codec.Counters], matched: bool
) -> None:
    """A session a restart left open: closed as interrupted with the counted dose."""
    store.event(
        "reconciled",
        "session closed as interrupted after a restart; "
        + (
            "delivered dose taken from the controller's counters"
            if matched
            else "the controller holds no counters of this session (another session "
            "or a power cycle reset them): the dose recorded before the restart stands"
        ),
        code=EndCause.RESTART_RECONCILED.code,
        session_id=session_id,
        severity="warning",
        data=_counters_data(readings),
    )
    store.session_ended(
        session_id,
        outcome="interrupted",
        stop_cause_code=EndCause.RESTART_RECONCILED.code,
        stop_cause_message="daemon stopped during the session; "
        + ("dose reconciled from controller counters" if matched else "no counters"),
    )


def _settle_provisional(
    store: RecordSink, session_id: str, readings: Mapping[int, codec.Counters], matched: bool
) -> None:
    """A session closed after a link loss: its provisional energy is final now, or
    (counters reset meanwhile) stays a lower bound, said once (`GAVE_UP`)."""
    store.event(
        "reconciled" if matched else GAVE_UP,
        "provisional controller energy replaced by the controller's counters (GET_COUNTERS "
        "after the link came back)"
        if matched
        else "the controller holds no counters of this session (another session or a power "
        "cycle reset them): the controller energy stays provisional (a lower bound)",
        session_id=session_id,
        severity="info" if matched else "warning",
        data=_counters_data(readings),
    )


def _ports_of(row: Mapping[str, Any]) -> list[int]:
    ports = row.get("ports")
    if isinstance(ports, str):
        ports = json.loads(ports)
    out: list[int] = []
    for p in ports or []:
        out.append(int(p["port"]) if isinstance(p, Mapping) else int(p))
    return out
