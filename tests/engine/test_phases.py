"""Phases on the simulator: the probe's phase starts only when every pad emission has
ended, as the controller's own log of commands and events shows; a pause in the
first phase holds the next; an abort or a trip while a phase waits ends everything."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from engine_rig import Rig
from fixtures.protocols import pads_then_probe
from trip_checks import expect_stays_dark, expect_trip

from pbmd.daemon.core.session import PortState, SessionState
from pbmd.daemon.services.report import build_report
from pbmd.drivers import codec
from pbmd.protocols.library import DIRECTORY as LIBRARY_DIR
from pbmd.protocols.loader import load_protocol, parse_protocol
from pbmd.protocols.plan import plan

TIME_SCALE = 10.0
"""As the operator tests that assert doses: a stop late by a loaded machine's few tens
of ms stays inside the controller's +5 % budget (80 s of device time is 8 s here)."""
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
    """And the record keeps the skin type; the report shows the phases as they ran and
    the fluence on each patch of skin from every step that reaches it."""
    async with Rig(tmp_path, time_scale=TIME_SCALE) as rig:
        loaded = parse_protocol(pads_then_probe())
        the_plan = plan(loaded.protocol, rig.port_map.applicators(), skin_type="IV")
        await rig.next_samples(2)  # the link is fresh when the start checks it
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
        assert record["skin_type"] == "IV"
        report = build_report(record)
        assert report.skin_type == "IV" and "Fitzpatrick IV" in report.to_text()
        assert [(p.id, p.ports, p.steps_completed) for p in report.phases] == [
            ("pads", (1, 2, 3), 6),
            ("probe", (4,), 2),
        ]
        pads, probe = report.phases
        assert pads.ended_utc is not None and probe.started_utc is not None
        assert pads.ended_utc <= probe.started_utc
        delivered = {
            (s["port"], s["step_index"]): s["delivered_fluence_j_cm2"] for s in record["steps"]
        }
        point = next(p for p in report.skin_patches if p.patch == "l4-l5-facet-left")
        # the left pad's 660 and 830 nm and the probe point: three steps on that skin
        assert point.steps == ("port 1 step 1", "port 1 step 2", "port 4 step 1")
        expected = delivered[(1, 0)] + delivered[(1, 1)] + delivered[(4, 0)]
        assert point.fluence_delivered_j_cm2 == pytest.approx(expected)
        assert point.ceiling_total_j_cm2 == 20.0
        right = next(p for p in report.skin_patches if p.patch == "lumbar-paraspinal-right")
        assert right.steps == ("port 2 step 1", "port 2 step 2")
        assert "Skin: cumulative fluence per patch" in report.to_text()


async def test_a_pause_in_the_first_phase_holds_the_next(tmp_path: Path) -> None:
    async with Rig(tmp_path, time_scale=TIME_SCALE) as rig:
        the_plan, loaded = rig.plan(pads_then_probe())
        await rig.next_samples(2)  # the link is fresh when the start checks it
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
    async with Rig(tmp_path, time_scale=TIME_SCALE) as rig:
        the_plan, loaded = rig.plan(pads_then_probe())
        await rig.next_samples(2)  # the link is fresh when the start checks it
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
    async with Rig(tmp_path, time_scale=TIME_SCALE) as rig:
        the_plan, loaded = rig.plan(pads_then_probe())
        await rig.next_samples(2)  # the link is fresh when the start checks it
        session = await rig.start(the_plan, loaded)
        await rig.emitting(1)
        await rig.next_samples(3)
        t0 = time.monotonic()
        rig.sim.faults.over_temperature(1)
        await expect_trip(rig, session, "E401", observed_at=t0)
        assert starts_on(rig, PROBE) == []
        await expect_stays_dark(rig)


CHRONIC = LIBRARY_DIR / "lumbar-chronic-nonspecific.toml"
CHRONIC_LOADED = load_protocol(CHRONIC)


@pytest.mark.slow
@pytest.mark.skipif(
    CHRONIC_LOADED.protocol.schema_version == 1,
    reason="the shipped chronic-lumbar file is still format version 1 (one phase)",
)
async def test_shipped_chronic_lumbar_probe_starts_after_the_pads(tmp_path: Path) -> None:
    """The shipped program on the simulator at x60: by the controller's own log of the
    commands it received and the events it sent, port 4's first EMIT_START comes after
    the last pad emission ended."""
    async with Rig(tmp_path, time_scale=60.0) as rig:
        the_plan = plan(CHRONIC_LOADED.protocol, rig.port_map.applicators(), skin_type="III")
        probe_phase = next(p for p in the_plan.phases if PROBE in p.ports)
        assert probe_phase.index > 0 and set(PADS).isdisjoint(probe_phase.ports)
        await rig.next_samples(2)  # the link is fresh when the start checks it
        session = await rig.start(
            the_plan,
            CHRONIC_LOADED,
            contraindications={c.value: False for c in CHRONIC_LOADED.protocol.contraindications},
        )
        device_s = the_plan.expected_duration_ms / 1000.0
        state = await asyncio.wait_for(session.wait(), device_s / 60.0 + 60.0)
        assert state is SessionState.COMPLETED, session.cause_message
        pads = tuple(p.port for p in the_plan.ports if p.port != PROBE)
        assert ends_on(rig, pads) and starts_on(rig, PROBE)
        assert max(ends_on(rig, pads)) < min(starts_on(rig, PROBE))
