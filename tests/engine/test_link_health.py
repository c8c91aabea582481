"""Link health judged on the link (ICD §6): the host's own stall and one lost frame
are not link faults. Over the real byte protocol against hw_sim."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from engine_rig import Rig, is_msg, pad_step, protocol
from test_operator import ACCURACY_TIME_SCALE, starts, within

from pbmd.daemon.core.session import SessionState
from pbmd.drivers import codec

PAD = protocol({1: [pad_step(fluence=0.12, max_time_s=60)]})
PRESCRIBED_J = 0.12 * 180


async def _completed(rig: Rig) -> float:
    """The session completes without a trip; the step's controller energy (J)."""
    session = rig.session
    assert session is not None
    _, done = await rig.wait_event(lambda e: e.kind == "step_completed", 30.0)
    assert await asyncio.wait_for(session.wait(), 30.0) is SessionState.COMPLETED
    assert session.supervisor.tripped is None, session.supervisor.tripped
    energy = float(done.data["controller_energy_j"])
    assert within(energy, PRESCRIBED_J), done.data
    return energy


async def test_stalled_host_is_not_a_link_fault(tmp_path: Path) -> None:
    """The core's own loop blocked for 150 ms mid-emission (a busy host): no trip,
    and the dose is delivered within the usual tolerance."""
    async with Rig(tmp_path, time_scale=ACCURACY_TIME_SCALE) as rig:
        p, loaded = rig.plan(PAD)
        await rig.start(p, loaded)
        await rig.emitting(1)
        await rig.next_samples(5)
        stalled: list[float] = []

        def stall(t: codec.Telemetry, host_s: float) -> None:
            if not stalled:
                stalled.append(time.monotonic())
                time.sleep(0.150)  # the host itself, blocked: on purpose

        remove = rig.handle.add_sample_listener(stall)
        try:
            await rig.next_samples(3)
            assert stalled
            await _completed(rig)
        finally:
            remove()
        record = await rig.records(rig.session.id if rig.session else "")
        assert record["outcome"] == "completed"


async def test_emit_start_reply_lost_once(tmp_path: Path) -> None:
    """EMIT_START's ACK lost (the request was executed): the host learns from the
    controller that the port emits, sends nothing again and the dose is right."""
    async with Rig(tmp_path, time_scale=ACCURACY_TIME_SCALE) as rig:
        p, loaded = rig.plan(PAD)
        await rig.start(p, loaded)
        await rig.rx.wait(is_msg(codec.Arm), 5.0)
        await rig.tx.wait(lambda m: m[0] == "reply" and isinstance(m[1], codec.Ack), 2.0)
        rig.sim.faults.drop_next_replies(1, "Ack")
        await _completed(rig)
        assert rig.sim.tx_dropped["drop_replies"] == 1
        assert len(starts(rig)) == 1  # never sent again: it had been executed


async def test_emit_start_request_lost_once(tmp_path: Path) -> None:
    """EMIT_START lost on its way (the controller never saw it): the host learns
    that the port is not emitting and sends one fresh EMIT_START."""
    async with Rig(tmp_path, time_scale=ACCURACY_TIME_SCALE) as rig:
        ctl = rig.sim.controller
        handle_frame = ctl.handle_frame
        lost: list[codec.Frame] = []

        def lose_first_start(frame: codec.Frame) -> None:
            if frame.msg_type == codec.EmitStart.TYPE and not lost:
                lost.append(frame)
                return
            handle_frame(frame)

        ctl.handle_frame = lose_first_start  # type: ignore[method-assign]
        p, loaded = rig.plan(PAD)
        await rig.start(p, loaded)
        await _completed(rig)
        assert len(lost) == 1
        assert len(starts(rig)) == 1  # the second one, the only one the controller saw


async def test_arm_reply_lost_once(tmp_path: Path) -> None:
    """ARM's ACK lost (the ARM took effect): the counters carry the session's token,
    so the host carries on without arming again."""
    async with Rig(tmp_path, time_scale=ACCURACY_TIME_SCALE) as rig:
        p, loaded = rig.plan(PAD)
        rig.sim.faults.drop_next_replies(1, "Ack")  # the next ACK answers the ARM
        await rig.start(p, loaded)
        await _completed(rig)
        assert rig.sim.tx_dropped["drop_replies"] == 1
        assert len([m for _, m in rig.rx.items if isinstance(m, codec.Arm)]) == 1
