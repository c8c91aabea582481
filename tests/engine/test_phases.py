"""Phases on the simulator: the probe's phase starts only when every pad emission has
ended, as the controller's own log of commands and events shows; a pause in the
first phase holds the next; an abort or a trip while a phase waits ends everything."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from engine_rig import Rig
from fixtures.protocols import pads_then_probe
from trip_checks import expect_stays_dark, expect_trip

from pbmd.daemon.core.session import PortState, SessionState
from pbmd.drivers import codec

PADS = (1, 2, 3)
PROBE = 4


def starts_on(rig: Rig, port: int) -> list[float]:
    """When the controller received each EMIT_START for `port`."""
    return [t for t, m in rig.rx.items if isinstance(m, codec.EmitStart) and m.port == port]


def ends_on(rig: Rig, ports: tuple[int, ...]) -> list[float]:
    """When the controller reported each emission on `ports` ended (its own events)."""
    return [
        t
        for t, ev in rig.device_events.items
        if ev.code == codec.EventCode.EMISSION_ENDED and ev.port in ports
    ]


async def test_probe_phase_starts_after_the_last_pad_emission_ended(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        the_plan, loaded = rig.plan(pads_then_probe())
        session = await rig.start(the_plan, loaded)
        state = await asyncio.wait_for(session.wait(), 30.0)
        assert state is SessionState.COMPLETED, session.cause_message
        pad_ends = ends_on(rig, PADS)
        probe_starts = starts_on(rig, PROBE)
        assert len(pad_ends) == 6 and len(probe_starts) == 2
        assert max(pad_ends) < min(probe_starts)
        # every pad started in the first phase, together
        assert all(starts_on(rig, p) and min(starts_on(rig, p)) < min(pad_ends) for p in PADS)
        phase_events = [e for _, e in rig.events.items if e.kind == "phase_started"]
        assert [e.data["phase"] for e in phase_events] == [0, 1]
        assert phase_events[1].data["ports"] == [PROBE]
        record = await rig.records(session.id)
        assert {s["outcome"] for s in record["steps"]} == {"completed"}


async def test_a_pause_in_the_first_phase_holds_the_next(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        the_plan, loaded = rig.plan(pads_then_probe())
        session = await rig.start(the_plan, loaded)
        await rig.emitting(1)
        session.pause(1)
        # ports 2 and 3 finish the first phase; port 1 stays paused
        for port in (2, 3):
            await rig.wait_event(
                lambda e, p=port: e.kind == "step_completed" and e.port == p and e.step == 1,
                30.0,
            )
        await rig.next_samples(5)
        probe = session.runners[PROBE]
        assert starts_on(rig, PROBE) == []
        assert probe.state is PortState.WAITING
        assert "phase 2 starts when phase 1 has ended" in probe.wait_reason
        assert session.runners[1].state is PortState.PAUSED
        resumed_at = time.monotonic()
        session.resume(1)
        state = await asyncio.wait_for(session.wait(), 30.0)
        assert state is SessionState.COMPLETED, session.cause_message
        assert resumed_at < max(ends_on(rig, PADS)) < min(starts_on(rig, PROBE))


async def test_abort_while_the_next_phase_waits_ends_the_session(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        the_plan, loaded = rig.plan(pads_then_probe())
        session = await rig.start(the_plan, loaded)
        await rig.emitting(1)
        await rig.next_samples(3)
        assert session.runners[PROBE].state is PortState.WAITING
        await session.abort("patient asked to stop")
        assert session.state is SessionState.ABORTED
        assert starts_on(rig, PROBE) == []
        record = await rig.records(session.id)
        assert record["outcome"] == "aborted"
        # the probe's steps never started: no step row, no emission
        assert not [s for s in record["steps"] if s["port"] == PROBE]
        await expect_stays_dark(rig)


async def test_a_trip_in_the_first_phase_ends_the_session_before_the_probe(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        the_plan, loaded = rig.plan(pads_then_probe())
        session = await rig.start(the_plan, loaded)
        await rig.emitting(1)
        await rig.next_samples(3)
        t0 = time.monotonic()
        rig.sim.faults.over_temperature(1)
        await expect_trip(rig, session, "E401", observed_at=t0)
        assert starts_on(rig, PROBE) == []
        await expect_stays_dark(rig)
