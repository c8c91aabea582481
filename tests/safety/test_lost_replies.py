"""Lost replies on a link that stays up: the record still holds every emission, and
its energy becomes the controller's before the next session's ARM resets the counters.

Both were found by the fault campaign (bench/fault_campaign.py): with replies
dropped, an emission whose EMIT_START reply never came was missing from the
record although the controller had delivered it, and an emission left with
provisional energy stayed provisional, since only a lost link led to reading the
counters again.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from engine_rig import Rig, pad_step, protocol

from pbmd.daemon.core.session import SessionState
from pbmd.drivers import codec

LONG = protocol({1: [pad_step(fluence=6.0, max_time_s=1800)]})
"""25 minutes of device time: still emitting whatever the scheduling."""


def _port_emissions(record: dict[str, Any], port: int) -> list[dict[str, Any]]:
    return [em for em in record["emissions"] if em["port"] == port]


async def _faulted_with_replies_dropped(rig: Rig, at_emit_start: bool) -> str:
    """Run LONG and drop every reply from the controller from its EMIT_START on (the
    request executed, its ACK lost) or once it emits; the session trips E202 (nothing
    answers while telemetry flows). Returns the session id."""
    ctl = rig.sim.controller
    handle_frame = ctl.handle_frame
    faults = rig.sim.faults

    def drop_from_emit_start(frame: codec.Frame) -> None:
        if frame.msg_type == codec.EmitStart.TYPE:
            faults.link.drop_replies = True
        handle_frame(frame)

    if at_emit_start:
        ctl.handle_frame = drop_from_emit_start  # type: ignore[method-assign]
    p, loaded = rig.plan(LONG)
    session = await rig.start(p, loaded)
    if not at_emit_start:
        await rig.emitting(1)
        await rig.next_samples(3)
        faults.drop_replies(True)
    state = await asyncio.wait_for(session.wait(), 10.0)
    assert state is SessionState.FAULTED and session.cause_code == "E202", session.cause_message
    ctl.handle_frame = handle_frame  # type: ignore[method-assign]
    faults.drop_replies(False)
    return session.id


async def _next_start_settles(rig: Rig, session_id: str) -> dict[str, Any]:
    """Acknowledge the trip, read the controller's counter of port 1, start the next
    session (its start settles the previous record) and abort it; the record."""
    counter_uj = rig.snapshot()["ports"][0]["counters"]["session_delivered_uj"]
    assert counter_uj > 0  # the controller did emit
    rig.engine.acknowledge("E202", "tester", "link checked")
    p, loaded = rig.plan(LONG)
    nxt = await rig.start(p, loaded)
    record = await rig.records(session_id)
    await nxt.abort("test done")
    await nxt.wait()
    [em] = _port_emissions(record, 1)
    assert em["controller_energy_source"] == "counters"
    assert em["controller_energy_uj"] == counter_uj
    return record


async def test_an_emission_whose_start_reply_was_lost_is_recorded(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        session_id = await _faulted_with_replies_dropped(rig, at_emit_start=True)
        record = await rig.records(session_id)
        [em] = _port_emissions(record, 1)  # before the fix: no emission at all
        assert em["controller_energy_source"] == "provisional"
        assert em["ended_utc"] is not None
        await _next_start_settles(rig, session_id)


async def test_provisional_energy_is_settled_before_the_next_start(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        session_id = await _faulted_with_replies_dropped(rig, at_emit_start=False)
        record = await rig.records(session_id)
        [em] = _port_emissions(record, 1)
        assert em["controller_energy_source"] == "provisional"
        assert not rig.engine.unreconciled  # the link stayed up: no reconnection reads them
        await _next_start_settles(rig, session_id)


async def test_a_session_stopped_before_its_record_began_is_recorded(tmp_path: Path) -> None:
    """A session that stops before its record began (aborted at once here; in the
    campaign, telemetry stalled while a freshly connected clock was settling) still
    has its record with its cause: the operator saw it start and stop."""
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(LONG)
        session = await rig.start(p, loaded)
        await session.abort("changed my mind")
        assert await session.wait() is SessionState.ABORTED
        record = await rig.records(session.id)
        assert record["outcome"] == "aborted" and record["stop_cause_code"] == "A001"
        assert record["emissions"] == []


async def test_a_controller_left_armed_is_disarmed_before_the_next_arm(tmp_path: Path) -> None:
    """A session whose DISARM was lost leaves the controller armed (found by the
    campaign: replies dropped, then the link cut). The next session disarms it
    first, so that its own ARM runs the whole emission delay (ICD §5a: an ARM while
    armed restarts nothing)."""
    async with Rig(tmp_path) as rig:
        ctl = rig.sim.controller
        await rig.handle.wait_clock_settled(10.0)  # the session need not wait for it
        await rig.client.arm(0xBAD)  # left armed, as by a lost DISARM
        while (await rig.handle.next_sample(2.0)).state == codec.ControllerState.STANDBY:
            pass
        left_armed_at_s = ctl.arm_t
        p, loaded = rig.plan(LONG)
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        assert ctl.arm_t > left_armed_at_s  # a fresh delay: armed from standby again
        armed_s = ctl.arm_t
        assert ctl.slot(1).phys.emission.t_start_s - armed_s >= 2.0  # the whole delay
        await session.abort("test done")
        await session.wait()
