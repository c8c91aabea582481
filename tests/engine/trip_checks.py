"""What every trip test asserts: emission ended on the wire in time, the session
faulted with the right cause in the record, and nothing came back by itself."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from engine_rig import Rig, is_msg

from pbmd.daemon.core.session import Session, SessionState
from pbmd.drivers import codec

# Measured bounds (docs/performance.md): the host's reaction to the frame or the
# injection that made the fault observable, until ALL_OFF reached the controller.
# Typical figures are a few ms; the bounds leave room for a loaded 2-core CI box.
REACTION_BOUND_S = 0.060
"""Fault visible in a frame (event or telemetry) or injected → ALL_OFF received."""
STALE_BOUND_S = 0.060
"""Telemetry 5 periods old (the detection deadline) → ALL_OFF received."""
WATCHDOG_BOUND_S = 0.250 + 0.060
"""Link cut → the controller's own watchdog (250 ms wall) stopped every port."""


@dataclass
class TripResult:
    session: Session
    record: dict[str, Any]
    all_off_at: float | None
    latency_s: float | None


async def expect_trip(
    rig: Rig,
    session: Session,
    code: str,
    *,
    observed_at: float,
    bound_s: float = REACTION_BOUND_S,
    stop_reasons: set[int] | None = None,
    all_off_expected: bool = True,
) -> TripResult:
    """The session ends FAULTED with `code`; ALL_OFF reached the controller within
    `bound_s` of `observed_at`; every port is dark and stays dark; the record
    holds the cause, and every emission is closed with the controller's count."""
    state = await asyncio.wait_for(session.wait(), 10.0)
    trip = session.supervisor.tripped
    assert trip is not None, "the session did not trip"
    assert trip.cause.code == code, f"tripped with {trip.describe()}, expected {code}"
    assert state is SessionState.FAULTED
    assert session.cause_code == code
    all_off_at: float | None = None
    latency: float | None = None
    if all_off_expected:
        found = rig.rx.find(is_msg(codec.AllOff), after=observed_at)
        assert found is not None, "no ALL_OFF reached the controller"
        all_off_at = found[0]
        latency = all_off_at - observed_at
        # Shown with -s: the figures docs/performance.md quotes.
        print(f"\n{code}: ALL_OFF received {latency * 1000:.2f} ms after the fault was observable")
        assert latency <= bound_s, (
            f"ALL_OFF {latency * 1000:.1f} ms after the fault (bound {bound_s * 1000:.0f} ms)"
        )
        # Nothing started after it.
        assert rig.rx.find(is_msg(codec.EmitStart), after=all_off_at) is None
    snap = rig.snapshot()
    for p in snap["ports"]:
        assert not p["emitting"], f"port {p['port']} still emitting: {p}"
        if not p["faults"]["stuck_on"]:
            assert not p["light_on"], f"port {p['port']} still lit: {p}"
        if (
            stop_reasons is not None
            and p["port"] in session.runners
            and p["counters"]["last_stop_reason"]
        ):
            assert p["counters"]["last_stop_reason"] in stop_reasons, p
    record = await rig.records(session.id)
    assert record["outcome"] == "faulted"
    assert record["stop_cause_code"] == code
    trips = [e for e in record["events"] if e["kind"] == "trip"]
    assert trips and trips[0]["code"] == code, trips
    for em in record["emissions"]:
        assert em["ended_utc"] is not None, em
        assert em["controller_energy_uj"] is not None or not rig.client.is_open, em
    for st in record["steps"]:
        assert st["outcome"] in ("faulted", "completed", "skipped"), st
    return TripResult(session, record, all_off_at, latency)


async def expect_stays_dark(rig: Rig, samples: int = 10) -> None:
    """Later samples (a fifth of a second at 50 Hz) still show every port dark and the
    controller not armed: nothing resumed by itself."""
    if rig.client.is_open:
        t = await rig.next_samples(samples)
        assert not any(p.emitting for p in t.ports), t
        assert all(p.measured_power_uw == 0 for p in t.ports), t
        assert t.state != codec.ControllerState.ARMED_READY
    snap = rig.snapshot()
    assert not any(p["emitting"] for p in snap["ports"])
    assert rig.engine.session is not None and rig.engine.session.state.final
