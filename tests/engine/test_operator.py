"""What the operator and the patient do: pause and resume, probe contact, the
footswitch, contraindications, abort. Over the real byte protocol against hw_sim."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from engine_rig import Rig, is_msg, pad_step, probe_step, protocol
from trip_checks import REACTION_BOUND_S, expect_stays_dark

from pbmd.daemon.core.engine import StartRefused
from pbmd.daemon.core.session import PortState, SessionState
from pbmd.drivers import codec

TOLERANCE = 0.005
"""Every step's delivered dose (controller channel) within ±0.5 % (issue 4)."""

ACCURACY_TIME_SCALE = 10.0
"""Tests that assert TOLERANCE run the simulator in the engine's own event loop; at
×10 a 75 s pad step keeps 37 ms of wall time between on-time and 0.5 % late, which
a busy test machine does not take from it (at ×30 it had 12 ms)."""


def within(delivered_j: float, prescribed_j: float, tolerance: float = TOLERANCE) -> bool:
    return abs(delivered_j - prescribed_j) <= tolerance * prescribed_j


def starts(rig: Rig, after: float = float("-inf")) -> list[codec.EmitStart]:
    return [m for t, m in rig.rx.items if isinstance(m, codec.EmitStart) and t >= after]


async def test_pause_resume_delivers_only_the_rest(tmp_path: Path) -> None:
    """Pause stops emission and keeps the dose so far; the port stays paused until
    resumed; resume delivers only the remainder, with the controller's budget and
    max duration reduced by what was already delivered and emitted (the backup
    timer keeps its reading). Before + after = the prescription."""
    async with Rig(tmp_path, time_scale=ACCURACY_TIME_SCALE) as rig:
        p, loaded = rig.plan(protocol({1: [pad_step(fluence=0.3, max_time_s=100)]}))
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        await rig.next_samples(10)
        session.pause(1)
        _, _paused = await rig.wait_event(lambda e: e.kind == "port_paused", 2.0)
        _, ended = await rig.wait_event(lambda e: e.kind == "emission_ended", 2.0)
        assert ended.message == "paused by operator"
        before_j = ended.data["controller_energy_j"]
        first_ms = ended.data["duration_ms"]
        assert 0 < before_j < 54.0 * 0.9
        status = session.status().ports[0]
        assert status.state == PortState.PAUSED
        assert status.wait_reason == "paused by operator"
        assert status.step is not None
        assert status.step.elapsed_s == pytest.approx(first_ms / 1000)
        # Paused means paused: no emission until a person resumes.
        t = await rig.next_samples(10)
        assert not t.ports[0].emitting
        assert len(starts(rig)) == 1
        t_resume = time.monotonic()
        session.resume(1)
        _, done = await rig.wait_event(lambda e: e.kind == "step_completed", 10.0)
        assert await asyncio.wait_for(session.wait(), 30.0) is SessionState.COMPLETED
        assert session.supervisor.tripped is None  # not even while closing out
        first, second = starts(rig)
        assert starts(rig, t_resume) == [second]
        # The second emission's backstops cover only what is left.
        assert second.energy_budget_uj == pytest.approx(
            (54e6 - before_j * 1e6) + 0.05 * 54e6, rel=0.002
        )
        assert second.max_duration_ms == pytest.approx(first.max_duration_ms - first_ms, abs=2)
        total = done.data["controller_energy_j"]
        assert within(total, 54.0), total
        record = await rig.records(session.id)
        (step,) = record["steps"]
        assert step["outcome"] == "completed"
        ems = record["emissions"]
        assert [e["host_stop_cause"] for e in ems] == ["paused by operator", "dose reached"]
        assert sum(e["controller_energy_uj"] for e in ems) / 1e6 == pytest.approx(total, rel=1e-6)
        assert step["delivered_controller_j"] == pytest.approx(total, rel=1e-6)
        assert step["emitting_time_s"] == pytest.approx(sum(e["duration_ms"] for e in ems) / 1000)


async def test_probe_contact_loss_waits_for_reconfirmation(tmp_path: Path) -> None:
    """The probe leaves the skin: the controller stops the port; contact coming back is
    not enough, the port waits for the operator to confirm the placement again and
    then delivers only the rest of the point's dose."""
    async with Rig(tmp_path, time_scale=ACCURACY_TIME_SCALE / 2, auto_confirm=False) as rig:
        p, loaded = rig.plan(protocol({4: [probe_step(power_mw=20.0, energy_j=0.4)]}))
        session = await rig.start(p, loaded)
        await rig.wait_event(lambda e: e.kind == "port_waiting", 5.0)
        session.confirm(4)
        await rig.emitting(4)
        await rig.next_samples(5)
        t_lost = time.monotonic()
        rig.sim.faults.contact(4, on=False)
        _, ended = await rig.wait_event(lambda e: e.kind == "emission_ended", 2.0)
        assert ended.data["stop_reason"] == "CONTACT_LOST"
        _, waiting = await rig.wait_event(
            lambda e: e.kind == "port_waiting" and "skin contact" in e.message, 2.0, after=t_lost
        )
        assert "confirm placement" in waiting.message
        t_back = time.monotonic()
        rig.sim.faults.contact(4, on=True)
        _, waiting = await rig.wait_event(
            lambda e: e.kind == "port_waiting" and e.message == "confirm placement",
            2.0,
            after=t_back,
        )
        await rig.next_samples(10)
        assert starts(rig, t_lost) == []  # contact alone does not resume
        assert session.status().ports[0].state == PortState.GATED
        session.confirm(4)
        _, done = await rig.wait_event(lambda e: e.kind == "step_completed", 10.0)
        assert await asyncio.wait_for(session.wait(), 30.0) is SessionState.COMPLETED
        assert session.supervisor.tripped is None  # not even while closing out
        assert len(starts(rig)) == 2
        assert within(done.data["controller_energy_j"], 0.4), done.data
        record = await rig.records(session.id)
        ems = record["emissions"]
        assert [e["stop_reason"] for e in ems] == ["contact_lost", "host_stop"]


async def test_footswitch_gates_emission(tmp_path: Path) -> None:
    """A footswitch step emits only while the footswitch is held: releasing it stops
    the port, pressing it again resumes the rest."""
    async with Rig(tmp_path, time_scale=ACCURACY_TIME_SCALE) as rig:
        p, loaded = rig.plan(
            protocol({1: [pad_step(fluence=0.3, max_time_s=100, gating={"footswitch": True})]})
        )
        session = await rig.start(p, loaded)
        await rig.wait_event(
            lambda e: e.kind == "port_waiting" and e.message == "press the footswitch", 5.0
        )
        await rig.next_samples(5)
        assert starts(rig) == []
        rig.sim.faults.footswitch(pressed=True)
        await rig.emitting(1)
        await rig.next_samples(10)
        t_release = time.monotonic()
        rig.sim.faults.footswitch(pressed=False)
        _t_ended, ended = await rig.wait_event(lambda e: e.kind == "emission_ended", 2.0)
        assert ended.message == "footswitch released"
        stop, _ = await rig.rx.wait(is_msg(codec.EmitStop), 1.0, after=t_release)
        assert stop - t_release <= REACTION_BOUND_S  # the INTERLOCK_CHANGED event stops it
        await rig.next_samples(10)
        assert len(starts(rig)) == 1
        rig.sim.faults.footswitch(pressed=True)
        _, done = await rig.wait_event(lambda e: e.kind == "step_completed", 10.0)
        assert await asyncio.wait_for(session.wait(), 30.0) is SessionState.COMPLETED
        assert session.supervisor.tripped is None  # not even while closing out
        assert len(starts(rig)) == 2
        assert within(done.data["controller_energy_j"], 54.0), done.data


EPILEPSY = protocol(
    {
        1: [
            pad_step(
                mode="pulsed", pulse_hz=10, duty_permille=500, fluence=0.06, max_time_s=30
            ).replace('mode = "continuous"\n', ""),
            pad_step(nm=830),
        ]
    },
    contraindications=["cancer", "pregnancy", "epilepsy"],
)


async def test_epilepsy_blocks_low_frequency_pulsed_red(tmp_path: Path) -> None:
    """Epilepsy answered yes: the 10 Hz pulsed 660 nm step is skipped (recorded as such),
    the continuous 830 nm step is delivered."""
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(EPILEPSY)
        session = await rig.start(p, loaded, contraindications={"epilepsy": True})
        assert await asyncio.wait_for(session.wait(), 10.0) is SessionState.COMPLETED
        assert session.supervisor.tripped is None  # not even while closing out
        (start,) = starts(rig)
        assert start.wavelength_nm == 830 and start.mode == codec.EmitMode.CONTINUOUS
        _, skipped = await rig.wait_event(lambda e: e.kind == "step_skipped", 0.1)
        assert skipped.step == 0 and skipped.data["contraindications"] == ["epilepsy"]
        record = await rig.records(session.id)
        outcomes = [(s["step_index"], s["outcome"]) for s in record["steps"]]
        assert outcomes == [(0, "skipped"), (1, "completed")]
        assert record["contraindications"] == {"epilepsy": True}


async def test_epilepsy_answered_no_delivers_everything(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(EPILEPSY)
        session = await rig.start(p, loaded, contraindications={"epilepsy": False})
        assert await asyncio.wait_for(session.wait(), 10.0) is SessionState.COMPLETED
        assert session.supervisor.tripped is None  # not even while closing out
        assert [s.wavelength_nm for s in starts(rig)] == [660, 830]
        # Done ports show nothing left, whatever the last reading fell short by.
        ports = session.status().ports
        assert ports and all(
            p.state == "done" and p.step is not None and p.step.remaining_s == 0.0 for p in ports
        )


async def test_pregnancy_blocks_lumbar_steps(tmp_path: Path) -> None:
    """Pregnancy: lumbar steps are skipped, a knee point on the same session is delivered;
    a protocol that is lumbar only is refused at start (nothing would be delivered)."""
    mixed = protocol({1: [pad_step()], 4: [probe_step(site="knee")]})
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(mixed)
        session = await rig.start(p, loaded, contraindications={"pregnancy": True})
        assert await asyncio.wait_for(session.wait(), 10.0) is SessionState.COMPLETED
        assert session.supervisor.tripped is None  # not even while closing out
        assert [s.port for s in starts(rig)] == [4]
        record = await rig.records(session.id)
        assert {(s["port"], s["outcome"]) for s in record["steps"]} == {
            (1, "skipped"),
            (4, "completed"),
        }
        lumbar = protocol({1: [pad_step()], 4: [probe_step()]})
        p2, loaded2 = rig.plan(lumbar)
        with pytest.raises(StartRefused, match="pregnancy"):
            await rig.start(p2, loaded2, contraindications={"pregnancy": True})


async def test_protocol_contraindication_refuses(tmp_path: Path) -> None:
    """A contraindication the protocol lists for all of it (cancer) refuses the start."""
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(protocol({1: [pad_step()]}))
        with pytest.raises(StartRefused, match="contraindicated for this patient: cancer"):
            await rig.start(p, loaded, contraindications={"cancer": True})
        with pytest.raises(StartRefused, match="unknown contraindication"):
            await rig.start(p, loaded, contraindications={"gout": True})
        assert rig.rx.find(is_msg(codec.Arm)) is None


async def test_operator_abort(tmp_path: Path) -> None:
    """Abort: ALL_OFF at once (EMIT_START inhibited first), the session ends ABORTED with
    A001, the record closes every emission with what the controller counted, and
    nothing resumes."""
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(
            protocol({1: [pad_step(fluence=6.0, max_time_s=1800)], 4: [probe_step(energy_j=4.0)]})
        )
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        await rig.emitting(4)
        await rig.next_samples(3)
        t0 = time.monotonic()
        await session.abort("patient asked to stop")
        assert session.state is SessionState.ABORTED
        assert session.cause_code == "A001"
        off = await rig.all_off_at(t0)
        assert off - t0 <= REACTION_BOUND_S
        assert rig.client.emission_inhibited is not None
        snap = rig.snapshot()
        for port in (1, 4):
            assert (
                snap["ports"][port - 1]["counters"]["last_stop_reason"] == codec.StopReason.ALL_OFF
            )
        record = await rig.records(session.id)
        assert record["outcome"] == "aborted" and record["stop_cause_code"] == "A001"
        abort = [e for e in record["events"] if e["kind"] == "abort"]
        assert abort and abort[0]["code"] == "A001"
        for em in record["emissions"]:
            assert em["controller_energy_source"] in ("counters", "stopped"), em
            assert em["stop_reason"] == "all_off", em
            port = em["port"]
            assert em["controller_energy_uj"] == snap["ports"][port - 1]["delivered_uj"]
        assert {s["outcome"] for s in record["steps"]} == {"aborted"}
        await expect_stays_dark(rig)
        with pytest.raises(Exception, match="already aborted"):
            await session.abort()


async def test_abort_ends_the_session_even_when_a_cancellation_is_lost(tmp_path: Path) -> None:
    """Python 3.11's asyncio.wait_for can drop a cancellation that meets a result. An
    abort during arming whose cancellation is lost that way must still end the
    session, not leave it waiting at a placement gate (and the abort call with it)."""
    async with Rig(tmp_path, auto_confirm=False) as rig:
        lost: list[float] = []
        real = rig.handle.next_sample

        async def losing_one_cancel(timeout_s: float) -> codec.Telemetry:
            try:
                return await real(timeout_s)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost.append(time.monotonic())
                return await real(timeout_s)  # as if the sample had won the race

        rig.handle.next_sample = losing_one_cancel  # type: ignore[method-assign]
        p, loaded = rig.plan(protocol({1: [pad_step(gating={"confirm_placement": True})]}))
        session = await rig.start(p, loaded)
        await rig.wait_event(lambda e: e.kind == "state" and e.data.get("to") == "armed", 5.0)
        await asyncio.wait_for(session.abort("operator"), 5.0)
        assert lost, "the abort's cancellation did not meet the sample wait"
        assert session.state is SessionState.ABORTED and session.cause_code == "A001"
        assert not starts(rig)  # nothing was emitted
