"""State machine of ICD §5a: arming, emission delay, refusal precedence, stops, counters."""

from __future__ import annotations

import pytest

from pbmd.drivers import codec
from pbmd.drivers.codec import ControllerState, EventCode, NakError, StopReason

from .conftest import Lab, Rig
from .host import emit, probe_pulse


async def test_arm_delay_ready_disarm(lab: Lab) -> None:
    rig = await lab.rig(time_scale=60)
    host = rig.host
    t = await host.wait_telemetry()
    assert t.state == ControllerState.STANDBY
    assert await host.nak(emit(1, 660, 1000)) == NakError.NOT_ARMED
    before = await host.device_us()
    await host.ack(codec.Arm(5))
    after = await host.device_us()
    assert await host.nak(emit(1, 660, 1000)) == NakError.EMISSION_DELAY_ACTIVE
    mark = host.mark()
    ready = await host.wait_telemetry(lambda t: t.state == ControllerState.ARMED_READY)
    last_delay = [t for t in host.telemetry(mark) if t.state == ControllerState.ARMED_DELAY]
    assert ready.device_time_us >= before + 2_000_000
    assert all(t.device_time_us < after + 2_000_000 for t in last_delay)
    await host.ack(emit(1, 660, 1000))
    await host.ack(codec.Disarm())
    await host.wait_state(ControllerState.STANDBY)
    assert await host.nak(emit(2, 660, 1000)) == NakError.NOT_ARMED


async def test_emission_delay_is_device_time_at_time_scale_1(lab: Lab) -> None:
    rig = await lab.rig(time_scale=1, emission_delay_ms=300)
    host = rig.host
    before = await host.device_us()
    await host.ack(codec.Arm(5))
    assert await host.nak(emit(1, 660, 1000)) == NakError.EMISSION_DELAY_ACTIVE
    ready = await host.wait_telemetry(lambda t: t.state == ControllerState.ARMED_READY)
    assert ready.device_time_us >= before + 300_000
    assert ready.device_time_us < before + 300_000 + 200_000


async def test_arm_refusals_and_precedence(lab: Lab) -> None:
    rig = await lab.rig()
    host, faults = rig.host, rig.sim.faults
    assert await host.nak(codec.Arm(0)) == NakError.BAD_PARAMETER
    faults.key(False)
    assert await host.nak(codec.Arm(1)) == NakError.INTERLOCK_OPEN
    assert await host.nak(codec.Arm(0)) == NakError.INTERLOCK_OPEN
    faults.latch_fault(5)
    assert await host.nak(codec.Arm(1)) == NakError.FAULT_LATCHED  # 8 before 7
    assert await host.nak(codec.ClearFault()) == NakError.INTERLOCK_OPEN
    faults.key(True)
    await host.ack(codec.ClearFault())
    await host.ack(codec.Arm(1))


async def test_arm_while_armed_restarts_nothing(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    await host.ack(codec.Arm(0x1234))
    await host.ack(codec.Arm(0x9999))  # another token: ACK, no new delay
    await host.ack(emit(1, 660, 1000))
    t = await host.wait_telemetry()
    assert t.state == ControllerState.ARMED_READY


async def test_disarm_stops_every_port_and_is_accepted_in_fault(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    await host.ack(emit(1, 660, 100_000))
    await host.ack(probe_pulse())
    mark = host.mark()
    await host.ack(codec.Disarm())
    for port in (1, 4):
        await host.wait_event(EventCode.EMISSION_ENDED, port=port, value=10, after=mark)
    stopped = await host.expect(codec.EmitStop(1), codec.Stopped)
    assert stopped.stop_reason == StopReason.DISARM
    rig.sim.faults.latch_fault(4)
    await host.ack(codec.Disarm())
    t = await host.wait_telemetry()
    assert t.state == ControllerState.FAULT and t.fault_code == 4


async def _situation(rig: Rig, fails: set[int]) -> codec.EmitStart:
    """Make the conditions in ``fails`` false and return an EMIT_START that meets all others."""
    host, faults = rig.host, rig.sim.faults
    port, wavelength, power = 1, 660, 100_000
    budget, mode, pulse_hz, duty = 10**9, 0, 0, 1000
    if 10 in fails:
        budget = 0
    if 12 in fails:
        port, wavelength, power, mode, pulse_hz, duty = 4, 905, 100_000, 1, 10_000, 2
        faults.contact(4, False)
    if 4 in fails:
        power = 1_800_001 if port == 1 else 200_001
    if 9 in fails:
        await host.ack(
            emit(port, wavelength, 1000, mode=mode, pulse_hz=pulse_hz, duty_permille=duty)
        )
    if 3 in fails:
        wavelength = 905 if port == 1 else 660
    if 2 in fails:
        faults.unplug(port)
    if 1 in fails:
        port = 7
    if 6 in fails:
        await host.ack(codec.Disarm())
        await host.ack(codec.Arm(1))
    if 5 in fails:
        await host.ack(codec.Disarm())
    if 7 in fails:
        faults.remote(False)
    if 8 in fails:
        faults.latch_fault(5)
    return emit(
        port, wavelength, power, mode=mode, pulse_hz=pulse_hz, duty_permille=duty,
        energy_budget_uj=budget,
    )  # fmt: skip


ORDER = [8, 7, 5, 6, 1, 2, 3, 9, 4, 10, 12]
CASES = [
    {8, 7, 5, 1},
    {7, 5, 2},
    {5, 1, 10},
    {6, 2, 4},
    {1, 10},
    {2, 3, 4},
    {3, 4, 10},
    {9, 4, 10},
    {4, 10, 12},
    {10, 12},
    {12},
    {8},
    {7},
    {9},
]


@pytest.mark.parametrize("fails", CASES, ids=lambda f: "+".join(map(str, sorted(f))))
async def test_emit_start_refusal_precedence(lab: Lab, fails: set[int]) -> None:
    rig = await lab.rig(armed=True)
    msg = await _situation(rig, fails)
    expected = next(code for code in ORDER if code in fails)
    assert await rig.host.nak(msg) == expected


@pytest.mark.parametrize(
    "msg",
    [
        emit(1, 660, 1000, energy_budget_uj=0),
        emit(1, 660, 1000, max_duration_ms=0),
        emit(1, 660, 1000, mode=2),
        emit(1, 660, 1000, mode=1, pulse_hz=0, duty_permille=500),
        emit(1, 660, 1000, mode=1, pulse_hz=100, duty_permille=0),
        emit(1, 660, 1000, mode=1, pulse_hz=100, duty_permille=1001),
        emit(1, 660, 1000, mode=1, pulse_hz=5001, duty_permille=500),
        emit(4, 905, 1000),  # continuous on a pulsed-only channel
        emit(4, 905, 1000, mode=1, pulse_hz=10_001, duty_permille=2),
    ],
    ids=[
        "zero-budget", "zero-duration", "mode-2", "pulse-0", "duty-0", "duty-1001",
        "pad-above-5kHz", "cw-on-905", "905-above-10kHz",
    ],
)  # fmt: skip
async def test_nak_10_bad_parameters(lab: Lab, msg: codec.EmitStart) -> None:
    rig = await lab.rig(armed=True)
    assert await rig.host.nak(msg) == NakError.BAD_PARAMETER


async def test_limits_that_are_accepted(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    await host.ack(emit(1, 660, 0))  # a zero setpoint is allowed
    await host.ack(emit(2, 830, 2_700_000))  # exactly the channel maximum
    await host.ack(emit(3, 660, 1_800_000, mode=1, pulse_hz=5000, duty_permille=500))
    await host.ack(probe_pulse(200_000))
    t = await host.wait_telemetry(lambda t: all(p.emitting for p in t.ports))
    assert [p.wavelength_nm for p in t.ports] == [660, 830, 660, 905]


async def test_all_off_stops_every_port_and_keeps_arming(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    await host.ack(emit(1, 830, 500_000))
    await host.ack(emit(2, 660, 500_000))
    mark = host.mark()
    await host.ack(codec.AllOff())
    for port in (1, 2):
        await host.wait_event(EventCode.EMISSION_ENDED, port=port, value=9, after=mark)
    assert len(host.events(mark, EventCode.EMISSION_ENDED)) == 2
    t = await host.wait_telemetry()
    assert t.state == ControllerState.ARMED_READY
    assert not any(p.emitting for p in t.ports)
    await host.ack(emit(1, 830, 500_000))  # still armed: no new ARM, no delay
    await host.ack(codec.AllOff())
    await host.ack(codec.AllOff())  # idle: accepted all the same


async def test_emit_stop_is_idempotent_and_quiet_on_an_idle_port(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    assert await host.expect(codec.EmitStop(2), codec.Stopped) == codec.Stopped(2, 0, 0, 0)
    await host.ack(emit(2, 660, 1_000_000))
    await host.wait_telemetry(lambda t: t.ports[1].delivered_uj > 100_000)
    mark = host.mark()
    first = await host.expect(codec.EmitStop(2), codec.Stopped)
    assert first.stop_reason == StopReason.HOST_STOP and first.delivered_uj > 100_000
    await host.wait_event(EventCode.EMISSION_ENDED, port=2, value=1, after=mark)
    again = await host.expect(codec.EmitStop(2), codec.Stopped)
    assert again == first
    await host.ping_through(0.05)
    assert len(host.events(mark, EventCode.EMISSION_ENDED)) == 1
    assert await host.expect(codec.EmitStop(3), codec.Stopped) == codec.Stopped(3, 0, 0, 0)


async def test_telemetry_holds_the_last_emission_until_the_next_start(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    await host.ack(emit(1, 830, 2_000_000))
    await host.wait_telemetry(lambda t: t.ports[0].delivered_uj > 1_000_000)
    stopped = await host.expect(codec.EmitStop(1), codec.Stopped)
    t = await host.wait_telemetry()
    assert t.ports[0].delivered_uj == stopped.delivered_uj
    assert t.ports[0].wavelength_nm == 0 and not t.ports[0].emitting
    assert t.ports[0].measured_power_uw < 2_000_000
    t = await host.wait_telemetry(lambda t: t.ports[0].measured_power_uw == 0)
    assert t.ports[0].delivered_uj == stopped.delivered_uj
    await host.ack(emit(1, 830, 1000))
    t = await host.wait_telemetry()
    assert t.ports[0].delivered_uj < stopped.delivered_uj


async def test_counters_before_arm_and_session_sums_per_token(lab: Lab) -> None:
    rig = await lab.rig()
    host = rig.host
    assert await host.expect(codec.GetCounters(1), codec.Counters) == codec.Counters(
        1, 0, 0, 0, 0, 0, 0
    )
    await host.arm_ready(token=111)
    stops: list[codec.Stopped] = []
    for _ in range(2):
        await host.ack(emit(1, 660, 1_000_000))
        running = await host.expect(codec.GetCounters(1), codec.Counters)
        assert running.emitting == 1 and running.session_token == 111
        assert running.session_delivered_uj == sum(s.delivered_uj for s in stops) + (
            running.delivered_uj
        )
        await host.wait_telemetry(lambda t: t.ports[0].delivered_uj > 200_000)
        stops.append(await host.expect(codec.EmitStop(1), codec.Stopped))
    c = await host.expect(codec.GetCounters(1), codec.Counters)
    assert c.session_delivered_uj == stops[0].delivered_uj + stops[1].delivered_uj
    assert (c.delivered_uj, c.duration_ms, c.last_stop_reason) == (
        stops[1].delivered_uj, stops[1].duration_ms, StopReason.HOST_STOP,
    )  # fmt: skip
    assert c.emitting == 0
    await host.ack(codec.Disarm())
    await host.arm_ready(token=111)  # same token: the sum continues
    c = await host.expect(codec.GetCounters(1), codec.Counters)
    assert c.session_delivered_uj == stops[0].delivered_uj + stops[1].delivered_uj
    await host.ack(codec.Arm(222))  # new token while armed: the sum restarts
    c = await host.expect(codec.GetCounters(1), codec.Counters)
    assert (c.session_token, c.session_delivered_uj) == (222, 0)
    assert c.delivered_uj == stops[1].delivered_uj  # the last emission is still reported
    other = await host.expect(codec.GetCounters(2), codec.Counters)
    assert other == codec.Counters(2, 222, 0, 0, 0, 0, 0)


async def test_counters_survive_a_host_crash_and_a_new_connection_replaces_the_old(
    lab: Lab,
) -> None:
    rig = await lab.rig(armed=True)
    host = rig.host
    await host.ack(emit(1, 830, 2_000_000, energy_budget_uj=1_000_000))
    await host.wait_event(EventCode.EMISSION_ENDED, port=1, value=StopReason.ENERGY_BUDGET)
    await host.ack(emit(2, 660, 1_000_000))
    second = await lab.tcp(rig.url)  # a restarted host connects; the old link is closed
    second.heartbeat()
    await host.eof.wait()
    info = await second.expect(codec.Hello(), codec.Info)
    assert info.port_count == 4
    await second.ack(codec.SetTelemetry(100))
    t = await second.wait_telemetry()
    assert t.state == ControllerState.ARMED_READY and t.ports[1].emitting  # state carried over
    c1 = await second.expect(codec.GetCounters(1), codec.Counters)
    assert (c1.delivered_uj, c1.last_stop_reason, c1.session_token) == (1_000_000, 2, 0x1234)
    c2 = await second.expect(codec.GetCounters(2), codec.Counters)
    assert c2.emitting == 1 and c2.delivered_uj > 0
    assert rig.sim.snapshot()["link"]["connections"] == 2
