"""Every trip cause of the safety supervisor, injected through hw_sim's fault API.

Each test starts a session with a pad (port 1) and the 905 nm probe (port 4)
emitting, breaks something the way hardware breaks, and checks: ALL_OFF on the
wire within the stated bound of the fault becoming observable (or, without a
link, the controller's watchdog), the session FAULTED with the cause's own code
in the record, and nothing resuming by itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import pytest
from engine_rig import Rig, is_msg, pad_step, probe_step, protocol
from trip_checks import (
    REACTION_BOUND_S,
    STALE_BOUND_S,
    WATCHDOG_BOUND_S,
    expect_stays_dark,
    expect_trip,
)

from pbmd.daemon.core.engine import StartRefused
from pbmd.daemon.core.recording import Record, StepEnded
from pbmd.daemon.core.session import SessionState
from pbmd.daemon.core.status import snapshot
from pbmd.drivers import codec
from pbmd.protocols.limits import Limits

R = codec.StopReason

# 25 minutes of device time on the pad, 80 s on the probe: still emitting when a
# fault is injected, whatever the scheduling.
LONG = protocol(
    {
        1: [pad_step(fluence=6.0, max_time_s=1800)],
        4: [probe_step(energy_j=4.0, max_time_s=96)],
    }
)


async def _running(rig: Rig) -> None:
    """Start LONG and wait until both ports emit."""
    p, loaded = rig.plan(LONG)
    await rig.start(p, loaded)
    await rig.emitting(1)
    await rig.emitting(4)
    await rig.next_samples(3)  # a few full samples of both emissions


INJECTED = [
    ("key", lambda f: f.key(False), "E301", {R.INTERLOCK}),
    ("remote", lambda f: f.remote(False), "E302", {R.INTERLOCK}),
    ("estop", lambda f: f.estop(True), "E303", {R.INTERLOCK}),
    ("over_temperature", lambda f: f.over_temperature(1), "E401", {R.OVER_TEMPERATURE}),
    ("overpower", lambda f: f.power_factor(1, 1.5), "E401", {R.OVERPOWER}),
    ("photodiode_fault", lambda f: f.latch_fault(4, 1), "E401", {R.DISARM}),
    ("unplug", lambda f: f.unplug(1), "E402", {R.APPLICATOR_REMOVED, R.ALL_OFF}),
]


@pytest.mark.parametrize(
    ("inject", "code", "reasons"),
    [pytest.param(fn, code, reasons, id=name) for name, fn, code, reasons in INJECTED],
)
async def test_injected_fault_trips(tmp_path: Path, inject, code: str, reasons: set[int]) -> None:  # type: ignore[no-untyped-def]
    """Faults the controller reports at once (an EVENT in the same instant): the
    controller stops by itself, the host sends ALL_OFF within the bound anyway."""
    async with Rig(tmp_path) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        t0 = time.monotonic()
        inject(rig.sim.faults)
        await expect_trip(rig, session, code, observed_at=t0, stop_reasons=reasons | {R.ALL_OFF})
        await expect_stays_dark(rig)


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        pytest.param(lambda f: f.photodiode_gain(1, 0.7), "E104", id="photodiode_gain_low"),
        pytest.param(lambda f: f.photodiode_gain(1, 1.15), None, id="photodiode_gain_in_band"),
        pytest.param(lambda f: f.power_factor(1, 0.7), "E104", id="power_factor_low"),
    ],
)
async def test_power_deviation(tmp_path: Path, fault, code: str | None) -> None:  # type: ignore[no-untyped-def]
    """Measured power off the setpoint by more than 20 % (gain error or a weak
    emitter) trips E104; 15 % off does not (the band is ±20 %)."""
    async with Rig(tmp_path) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        t0 = time.monotonic()
        fault(rig.sim.faults)
        if code is None:
            await rig.next_samples(15)
            assert session.supervisor.tripped is None
            await session.abort("test done")
            return
        # Observable: the first sample at the host whose power is off by > 20 %.
        observed, _ = await rig.host_telemetry.wait(
            lambda t: abs(t.ports[0].measured_power_uw / 720_000 - 1) > 0.2, 2.0, after=t0
        )
        await expect_trip(rig, session, code, observed_at=observed, stop_reasons={R.ALL_OFF})
        await expect_stays_dark(rig)


async def test_telemetry_stall(tmp_path: Path) -> None:
    """Telemetry older than 5 sample periods (100 ms at 50 Hz) is a link fault: E201."""
    async with Rig(tmp_path) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        t0 = time.monotonic()
        rig.sim.faults.telemetry_stall(True)
        await rig.rx.wait(is_msg(codec.AllOff), 2.0, after=t0)
        last = max(stamp for stamp, _ in rig.host_telemetry.items)
        deadline = last + 5 / rig.telemetry_hz
        result = await expect_trip(
            rig,
            session,
            "E201",
            observed_at=deadline,
            bound_s=STALE_BOUND_S,
            stop_reasons={R.ALL_OFF},
        )
        assert result.all_off_at is not None and result.all_off_at >= deadline
        rig.sim.faults.telemetry_stall(False)
        await expect_stays_dark(rig)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(lambda f: f.drop_replies(True), id="drop_replies"),
        pytest.param(lambda f: f.reply_delay(150), id="reply_delay"),
    ],
)
async def test_reply_past_deadline(tmp_path: Path, fault) -> None:  # type: ignore[no-untyped-def]
    """A reply later than 100 ms (heartbeat PINGs included) is a link fault: E202.
    The controller still executes requests, so the ALL_OFF stops it."""
    async with Rig(tmp_path) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        t0 = time.monotonic()
        fault(rig.sim.faults)
        observed, _ = await rig.reply_timeouts.wait(lambda e: True, 2.0, after=t0)
        await expect_trip(rig, session, "E202", observed_at=observed, stop_reasons={R.ALL_OFF})
        rig.sim.faults.clear()
        await expect_stays_dark(rig)


async def test_link_lost_watchdog_stops(tmp_path: Path) -> None:
    """The link cut: nothing can be sent, so the session trips E203 and the
    controller's own watchdog stops every port within its 250 ms (wall)."""
    async with Rig(tmp_path) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        t0 = time.monotonic()
        rig.sim.faults.drop_link()
        stamp, _ = await rig.device_events.wait(
            lambda e: e.code == codec.EventCode.WATCHDOG_EXPIRED, 2.0, after=t0
        )
        assert stamp - t0 <= WATCHDOG_BOUND_S
        print(
            f"\nE203: the controller's watchdog stopped emission "
            f"{(stamp - t0) * 1000:.1f} ms after the cut"
        )
        await expect_trip(
            rig, session, "E203", observed_at=t0, all_off_expected=False, stop_reasons={R.WATCHDOG}
        )
        snap = rig.snapshot()
        assert snap["fault"] == codec.FaultCode.WATCHDOG
        assert rig.rx.find(is_msg(codec.EmitStart), after=t0) is None
        await expect_stays_dark(rig)
        assert session.supervisor.service_required is False


async def test_stuck_emitter_escalates_to_service(tmp_path: Path) -> None:
    """A port that stays lit after EMIT_STOP. The simulated firmware sees light on a
    stopped port as overpower and latches fault 2 first (E401); the supervisor's
    read-back still sees light: ALL_OFF → ALL_OFF → DISARM, still lit → service
    required (E501 is the session's cause), and no new session starts."""
    async with Rig(tmp_path) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        rig.sim.faults.stuck_on(4)
        t0 = time.monotonic()
        session.pause(4)  # EMIT_STOP: the controller stops the port, the light stays
        state = await asyncio.wait_for(session.wait(), 10.0)
        assert state is SessionState.FAULTED
        trip = session.supervisor.tripped
        assert trip is not None and trip.cause.code in ("E401", "E501"), trip
        first_off = await rig.all_off_at(t0)
        assert first_off - t0 <= REACTION_BOUND_S + 0.1  # EMIT_STOP, its reply, the light seen
        print(f"\nstuck: first ALL_OFF {(first_off - t0) * 1000:.1f} ms after the pause")
        kinds = [type(m).__name__ for stamp, m in rig.rx.items if stamp >= t0]
        sequence = [k for k in kinds if k in ("AllOff", "Disarm")]
        assert sequence[:3] == ["AllOff", "AllOff", "Disarm"], sequence
        assert rig.rx.find(is_msg(codec.EmitStart), after=t0) is None
        assert session.supervisor.service_required
        assert "service required" in session.supervisor.escalation[-1]
        assert rig.engine.service_required is not None
        assert session.cause_code == "E501"
        record = await rig.records(session.id)
        assert record["outcome"] == "faulted"
        assert record["stop_cause_code"] == "E501"
        events = {e["kind"]: e for e in record["events"]}
        assert events["trip"]["code"] == trip.cause.code
        assert events["trip"]["data"]["service_required"] is True
        assert events["service_required"]["code"] == "E501"
        snap = rig.snapshot()
        assert snap["ports"][3]["light_on"]  # the hardware fault is still there
        assert not any(p["emitting"] for p in snap["ports"])
        p, loaded = rig.plan(LONG)
        with pytest.raises(StartRefused, match="service"):
            await rig.start(p, loaded)
        # Between sessions the idle watch knows this light: no ALL_OFF storm, no new record.
        closed_at = time.monotonic()
        await rig.next_samples(10)
        await rig.engine.idle_watch.settled()
        assert rig.rx.find(is_msg(codec.AllOff), after=closed_at) is None
        await rig.store.sync()
        assert not [e for e in await rig.store.outbox_pending() if e["kind"] == "idle_emission"]


# ---------------------------------------------------------------- ceilings


async def test_power_ceiling(tmp_path: Path) -> None:
    """A pad at its channel's full 1.8 W whose photodiode reads 10 % high: 1.98 W is
    above the applicator's reported maximum (+5 %), in the ±20 % band and below the
    controller's overpower (120 %): only the host's power ceiling trips, E103."""
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(
            protocol({1: [pad_step(irradiance=10.0, fluence=6.0, max_time_s=720)]})
        )
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        await rig.next_samples(3)
        t0 = time.monotonic()
        rig.sim.faults.photodiode_gain(1, 1.1)
        observed, _ = await rig.host_telemetry.wait(
            lambda t: t.ports[0].measured_power_uw > 1_890_000, 2.0, after=t0
        )
        await expect_trip(rig, session, "E103", observed_at=observed, stop_reasons={R.ALL_OFF})
        await expect_stays_dark(rig)


async def test_irradiance_ceiling(tmp_path: Path) -> None:
    """A site ceiling of 4.2 mW/cm² at 660 nm (configured limits) over a 4.0 mW/cm² step; the
    photodiode reads 10 % high: 4.4 mW/cm² measured trips E102."""
    async with Rig(tmp_path) as rig:
        limits = Limits(irradiance_ceiling_by_wavelength_mw_cm2={660: 4.2})
        p, loaded = rig.plan(LONG, limits)
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        await rig.next_samples(3)
        t0 = time.monotonic()
        rig.sim.faults.photodiode_gain(1, 1.1)
        observed, _ = await rig.host_telemetry.wait(
            lambda t: t.ports[0].measured_power_uw / 180_000 > 4.2, 2.0, after=t0
        )
        await expect_trip(rig, session, "E102", observed_at=observed, stop_reasons={R.ALL_OFF})
        await expect_stays_dark(rig)


async def test_fluence_ceiling(tmp_path: Path) -> None:
    """A time-target step planned at 0.495 J/cm² under a 0.5 J/cm² ceiling, on a pad
    whose output is 10 % high: the site's fluence would pass the ceiling before the
    time is up. The host trips E101 at the instant it predicts the ceiling is
    reached (before the controller's +5 % energy budget), so the delivered
    fluence ends at the ceiling."""
    async with Rig(tmp_path) as rig:
        limits = Limits(fluence_ceiling_j_cm2=0.5)
        step_text = pad_step(irradiance=8.0, time_s=61.875, max_time_s=80)
        p, loaded = rig.plan(protocol({1: [step_text]}), limits)
        session = await rig.start(p, loaded)
        rig.sim.faults.power_factor(1, 1.1)
        await rig.emitting(1)
        state = await asyncio.wait_for(session.wait(), 10.0)
        trip = session.supervisor.tripped
        assert trip is not None, state
        result = await expect_trip(
            rig, session, "E101", observed_at=trip.monotonic_s, stop_reasons={R.ALL_OFF}
        )
        (step_row,) = result.record["steps"]
        fluence = step_row["delivered_controller_j"] / 180.0
        assert 0.49 <= fluence <= 0.5 * 1.005, fluence
        await expect_stays_dark(rig)


async def test_controller_energy_budget_is_a_backup_stop(tmp_path: Path) -> None:
    """A time-target step on a pad 10 % bright: the controller's energy budget
    (planned energy +5 %) ends the emission before the time is up. A backup channel
    stopping first is a fault of the primary one: E404."""
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(protocol({1: [pad_step(irradiance=4.0, time_s=60.0, max_time_s=80)]}))
        session = await rig.start(p, loaded)
        rig.sim.faults.power_factor(1, 1.1)
        await rig.emitting(1)
        stamp, _ = await rig.device_events.wait(
            lambda e: e.code == codec.EventCode.EMISSION_ENDED and e.value == R.ENERGY_BUDGET, 5.0
        )
        await expect_trip(rig, session, "E404", observed_at=stamp, stop_reasons={R.ENERGY_BUDGET})
        await expect_stays_dark(rig)


async def test_dose_channels_disagree(tmp_path: Path) -> None:
    """Host vs controller delivered energy apart by more than 2 %: E105.

    The simulator's `integrator_gain` fault makes the controller's own integral
    count 0.9 × its photodiode while telemetry's measured power stays true (a
    drifting firmware integrator); the engine sees it over the real byte protocol.
    """
    async with Rig(tmp_path) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        gain = 0.9
        t0 = time.monotonic()
        rig.sim.faults.integrator_gain(1, gain)
        d0_uj = rig.snapshot()["ports"][0]["delivered_uj"]
        limits = session.limits

        def apart(t: codec.Telemetry) -> bool:
            """The first sample whose channels are apart by the trip threshold (less a
            tenth, so that the sample the engine acts on is never before it)."""
            ctrl_uj = t.ports[0].delivered_uj
            host_uj = d0_uj + (ctrl_uj - d0_uj) / gain
            allowed = max(
                limits.dose_disagreement_fraction * ctrl_uj, limits.dose_disagreement_floor_uj
            )
            return host_uj - ctrl_uj > 0.9 * allowed

        observed, _ = await rig.host_telemetry.wait(apart, 5.0, after=t0)
        result = await expect_trip(
            rig,
            session,
            "E105",
            observed_at=observed,
            # The threshold itself may fall on the next sample.
            bound_s=REACTION_BOUND_S + 1 / rig.telemetry_hz,
            stop_reasons={R.ALL_OFF},
        )
        assert result.record["events"]  # the trip is in the record
        await expect_stays_dark(rig)


# ---------------------------------------------------------------- plan, calibration, records


TWO_STEPS = protocol({1: [pad_step(fluence=0.06), pad_step(nm=830, fluence=6.0, max_time_s=1800)]})


async def test_plan_changed_after_start(tmp_path: Path) -> None:
    """The confirmed plan object is edited while the session runs: the check before
    the next emission trips E601; nothing of the edited plan reaches the wire."""
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(TWO_STEPS)
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        second = p.ports[0].emissions[1]
        object.__setattr__(second, "power_uw", 1_700_000)
        observed, _ = await rig.wait_event(lambda e: e.kind == "step_completed", 5.0)
        result = await expect_trip(
            rig, session, "E601", observed_at=observed, stop_reasons={R.HOST_STOP, R.ALL_OFF}
        )
        starts = [m for _, m in rig.rx.items if isinstance(m, codec.EmitStart)]
        assert len(starts) == 1 and starts[0].power_uw == 720_000
        steps = {s["step_index"]: s for s in result.record["steps"]}
        assert steps[0]["outcome"] == "completed"
        assert steps[1]["power_setpoint_mw"] == 720.0  # the record describes the confirmed plan
        await expect_stays_dark(rig)


async def test_plan_changed_before_start_is_refused(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(TWO_STEPS)
        object.__setattr__(p.ports[0].emissions[0], "power_uw", 1_700_000)
        with pytest.raises(StartRefused) as refused:
            await rig.start(p, loaded)
        assert refused.value.cause is not None and refused.value.cause.code == "E601"
        assert rig.rx.find(is_msg(codec.Arm)) is None
        await rig.store.sync()
        events = await _store_events(rig)
        assert [(e["kind"], e["code"]) for e in events] == [("start_refused", "E601")]


async def _store_events(rig: Rig) -> list[dict[str, object]]:
    import sqlite3

    await rig.store.sync()
    conn = sqlite3.connect(rig.store.path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY seq")]
    finally:
        conn.close()


async def test_calibration_overdue_refuses_start(tmp_path: Path) -> None:
    """Calibration due yesterday: the session is refused, the cause is recorded as an
    event with E602, and the controller is never armed."""
    today = dt.date(2025, 3, 10)
    async with Rig(
        tmp_path, calibration_due=today - dt.timedelta(days=1), today=lambda: today
    ) as rig:
        p, loaded = rig.plan(LONG)
        with pytest.raises(StartRefused, match="E602 calibration was due on 2025-03-09") as refused:
            await rig.start(p, loaded)
        assert refused.value.cause is not None and refused.value.cause.code == "E602"
        assert rig.rx.find(is_msg(codec.Arm)) is None
        events = await _store_events(rig)
        assert [(e["kind"], e["code"], e["severity"]) for e in events] == [
            ("start_refused", "E602", "warning")
        ]


async def test_calibration_falls_due_during_a_session(tmp_path: Path) -> None:
    """The due date passes while a session runs (midnight): the next emission is not
    started; the session trips E602 at the step boundary."""
    days = [dt.date(2025, 3, 10)]
    async with Rig(tmp_path, calibration_due=days[0], today=lambda: days[0]) as rig:
        p, loaded = rig.plan(TWO_STEPS)
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        days[0] += dt.timedelta(days=1)
        observed, _ = await rig.wait_event(lambda e: e.kind == "step_completed", 5.0)
        await expect_trip(
            rig, session, "E602", observed_at=observed, stop_reasons={R.HOST_STOP, R.ALL_OFF}
        )
        assert len([m for _, m in rig.rx.items if isinstance(m, codec.EmitStart)]) == 1


async def test_records_disk_full_trips_and_refuses(tmp_path: Path) -> None:
    """The records disk fills mid-session (SQLite page cap): the writer's failure trips
    the session E701, a new session is refused, and once the disk has room again
    the held records are written: the faulted session is complete on disk."""
    async with Rig(tmp_path, sync_interval_s=0.05) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        await rig.store.debug_limit_pages(0)
        for _ in range(8):  # the disk fills: the next records need pages there are none of
            rig.store.event("filler", "x" * 4000)
        observed, _ = await rig.records_failures.wait(lambda e: True, 10.0)
        state = await asyncio.wait_for(session.wait(), 10.0)
        assert state is SessionState.FAULTED and session.cause_code == "E701"
        found = rig.rx.find(is_msg(codec.AllOff), after=observed)
        assert found is not None and found[0] - observed <= REACTION_BOUND_S
        print(f"\nE701: ALL_OFF received {(found[0] - observed) * 1000:.2f} ms after the failure")
        await expect_stays_dark(rig)
        p, loaded = rig.plan(LONG)
        with pytest.raises(StartRefused, match="E701") as refused:
            await rig.start(p, loaded)
        assert refused.value.cause is not None and refused.value.cause.name == "RECORDS_FAILED"
        assert len([m for _, m in rig.rx.items if isinstance(m, codec.Arm)]) == 1
        # The operator frees space: the held records go to disk.
        await rig.store.debug_limit_pages(None)
        rig.store.retry()
        record = await rig.records(session.id)
        assert record["outcome"] == "faulted" and record["stop_cause_code"] == "E701"
        assert all(em["ended_utc"] is not None for em in record["emissions"])
        kinds = [e["kind"] for e in await _store_events(rig)]
        assert "start_refused" in kinds and "trip" in kinds


async def test_internal_error_still_ends_emission(tmp_path: Path) -> None:
    """A bug in the engine (here: the recorder raising at a step boundary) must still
    end with ALL_OFF: E901."""
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(TWO_STEPS)
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        real = rig.store.write

        def broken(record: Record) -> int | str | None:
            if isinstance(record, StepEnded):
                raise RuntimeError("simulated bug")
            return real(record)

        rig.store.write = broken  # type: ignore[method-assign]
        t0 = time.monotonic()
        state = await asyncio.wait_for(session.wait(), 10.0)
        rig.store.write = real  # type: ignore[method-assign]
        assert state is SessionState.FAULTED
        trip = session.supervisor.tripped
        assert trip is not None and trip.cause.code == "E901" and "simulated bug" in trip.detail
        found = rig.rx.find(is_msg(codec.AllOff), after=t0)
        assert found is not None and found[0] - trip.monotonic_s <= REACTION_BOUND_S
        print(
            f"\nE901: ALL_OFF received {(found[0] - trip.monotonic_s) * 1000:.2f} ms after the trip"
        )
        await expect_stays_dark(rig)


# ---------------------------------------------------------------- between sessions


async def _rogue_emission(rig: Rig, port: int = 1) -> float:
    """Light with no session: something other than a session starts an emission
    (a second host, a firmware bug). Returns when it was seen on the wire."""
    rig.client.release_emission()  # the engine keeps EMIT_START inhibited between sessions
    await rig.client.arm(0xBAD)
    armed_us = (await rig.handle.next_sample(2.0)).device_time_us
    delay_us = rig.client.info.emission_delay_ms * 1000
    while (await rig.handle.next_sample(2.0)).device_time_us < armed_us + delay_us:
        pass  # the emission delay runs in device time
    await rig.client.emit_start(codec.EmitStart(port, 660, 0, 500_000, 0, 1000, 10**9, 600_000))
    while port not in rig.handle.lit_ports():
        await rig.handle.next_sample(2.0)
    return time.monotonic()


async def test_emission_with_no_session_is_switched_off_and_recorded(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        t0 = await _rogue_emission(rig)
        off_at = await rig.all_off_at(t0 - 1.0)
        print(f"\nidle emission: ALL_OFF {(off_at - t0) * 1000:.1f} ms after it was seen")
        # Confirmed over idle_lit_samples samples in a row (the first is the one seen).
        confirm_s = (rig.engine.limits.idle_lit_samples - 1) / rig.telemetry_hz
        assert off_at - t0 <= confirm_s + REACTION_BOUND_S
        await rig.engine.idle_watch.settled()
        assert not rig.handle.lit_ports()
        assert rig.client.emission_inhibited  # nothing starts again by itself
        assert rig.engine.service_required is None
        await rig.store.sync()
        events = [e for e in await rig.store.outbox_pending() if e["kind"] == "idle_emission"]
        assert len(events) == 1
        assert events[0]["code"] == "E502" and events[0]["data"]["ports"] == [1]
        assert events[0]["data"]["escalation"] == ["ALL_OFF", "dark"]
        # A session can still start: the emission was stopped and read back dark.
        rig.engine.check_ready()


async def test_stuck_light_with_no_session_latches_service(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.sim.faults.stuck_on(1)
        t0 = await _rogue_emission(rig)
        await rig.all_off_at(t0 - 1.0)
        await rig.engine.idle_watch.settled()
        kinds = [type(m).__name__ for stamp, m in rig.rx.items if stamp >= t0]
        assert [k for k in kinds if k in ("AllOff", "Disarm")] == ["AllOff", "Disarm"]
        assert rig.engine.service_required is not None
        assert rig.engine.service_required.startswith("E501")
        await rig.store.sync()
        events = [e for e in await rig.store.outbox_pending() if e["kind"] == "idle_emission"]
        assert events[0]["code"] == "E501" and events[0]["severity"] == "critical"
        assert events[0]["data"]["escalation"] == ["ALL_OFF", "DISARM", "still lit"]
        with pytest.raises(StartRefused, match="service"):
            rig.engine.check_ready()


async def test_stale_telemetry_is_not_shown_as_present(tmp_path: Path) -> None:
    """After a telemetry stall trip the status shows the ports stale (not the last
    sample's emitting 721 mW) and a start is refused with the link's cause, not
    E501; once fresh telemetry arrives, status is present again."""
    async with Rig(tmp_path) as rig:
        await _running(rig)
        session = rig.session
        assert session is not None
        rig.sim.faults.telemetry_stall(True)
        assert await asyncio.wait_for(session.wait(), 10.0) is SessionState.FAULTED
        assert session.cause_code == "E201"
        hw = snapshot(rig.engine)
        (ctrl,) = hw.controllers
        assert ctrl.stale and ctrl.state is not None and ctrl.state.startswith("unknown (stale ")
        for port in hw.ports:
            assert port.telemetry_stale and port.reading is None
            assert port.freshness.age_s is not None and port.freshness.age_s > 0.1
        p, loaded = rig.plan(LONG)
        with pytest.raises(StartRefused, match="link lost/stale") as refused:
            await rig.start(p, loaded)
        assert refused.value.cause is not None and refused.value.cause.code == "E201"
        assert "emit while no session runs" not in str(refused.value)

        rig.sim.faults.telemetry_stall(False)
        await rig.next_samples(3)
        hw = snapshot(rig.engine)
        assert not hw.controllers[0].stale and hw.controllers[0].state == "standby"
        for port in hw.ports:
            assert not port.telemetry_stale and port.reading is not None
            assert not port.reading.emitting
