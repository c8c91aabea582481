"""What the controller guarantees by itself (ICD §5): watchdog, dose limits, interlocks, faults."""

from __future__ import annotations

import itertools
import math
import time

import pytest

from pbmd.drivers import codec
from pbmd.drivers.codec import ControllerState, EventCode, FaultCode, NakError, StopReason

from .conftest import Lab
from .host import emit, probe_pulse


@pytest.mark.parametrize("scale", [1, 60])
async def test_watchdog_expires_after_250_ms_of_wall_silence(lab: Lab, scale: int) -> None:
    rig = await lab.rig(time_scale=scale, heartbeat=False, emission_delay_ms=100)
    host = rig.host
    await host.ack(codec.Arm(9))
    await host.wait_state(ControllerState.ARMED_READY)
    await host.ack(emit(1, 660, 100_000))
    seq = host.send(codec.Ping())  # the last frame the controller hears
    await host.reply_to(seq)
    silent_from = time.monotonic()
    mark = host.mark()
    wd = await host.wait_event(EventCode.WATCHDOG_EXPIRED, after=mark)
    waited = time.monotonic() - silent_from
    assert 0.2 < waited < 0.6, f"watchdog after {waited:.3f} s wall at time scale {scale}"
    assert wd.value == 250 and wd.port == 0
    fault = await host.wait_event(EventCode.FAULT, after=mark)
    assert (fault.port, fault.value) == (0, FaultCode.WATCHDOG)
    ended = await host.wait_event(EventCode.EMISSION_ENDED, port=1, after=mark)
    assert ended.value == StopReason.WATCHDOG
    assert ended.device_time_us == wd.device_time_us
    t = await host.wait_telemetry()
    assert (t.state, t.fault_code) == (ControllerState.FAULT, FaultCode.WATCHDOG)
    await host.ack(codec.ClearFault())  # the cause is gone: the host talks again
    t = await host.wait_telemetry()
    assert t.state == ControllerState.STANDBY


async def test_its_own_stall_is_not_the_hosts_silence(lab: Lab) -> None:
    """The machine stops the process that runs both the simulator and a live host for
    400 ms: the host's heartbeat goes out as soon as it runs again, and the simulator,
    which was not running at the deadline either, waits for it (a real controller
    receives bytes as they arrive) instead of latching WATCHDOG."""
    rig = await lab.rig(time_scale=60, armed=True)
    host = rig.host
    await host.ack(emit(1, 660, 100_000))
    mark = host.mark()
    time.sleep(0.4)  # noqa: ASYNC251 - the stall under test: the process gets no CPU
    first = await host.wait_telemetry(after=mark)
    await host.wait_telemetry(lambda t: t.device_time_us > first.device_time_us + 0.5 * 60e6)
    assert host.events(mark, EventCode.WATCHDOG_EXPIRED) == []
    snap = rig.sim.snapshot()
    assert (snap["state_name"], snap["fault"]) == ("armed_ready", 0)
    assert snap["own_stalls_forgiven"] == 1


async def test_a_silent_host_still_trips_the_watchdog_after_the_simulators_stall(
    lab: Lab,
) -> None:
    """The same stall with a host that sends nothing after it: the watchdog waits once,
    LISTEN_AGAIN_S, then expires."""
    rig = await lab.rig(time_scale=60, heartbeat=False, emission_delay_ms=100)
    host = rig.host
    await host.ack(codec.Arm(9))
    await host.wait_state(ControllerState.ARMED_READY)
    await host.ack(emit(1, 660, 100_000))
    mark = host.mark()
    time.sleep(0.4)  # noqa: ASYNC251 - the same stall
    resumed = time.monotonic()
    await host.wait_event(EventCode.WATCHDOG_EXPIRED, after=mark)
    assert time.monotonic() - resumed < 0.6
    ended = await host.wait_event(EventCode.EMISSION_ENDED, port=1, after=mark)
    assert ended.value == StopReason.WATCHDOG
    assert rig.sim.snapshot()["own_stalls_forgiven"] == 1


async def test_no_watchdog_in_standby(lab: Lab) -> None:
    rig = await lab.rig(time_scale=60, heartbeat=False)
    host = rig.host
    mark = host.mark()
    first = await host.wait_telemetry(after=mark)
    await host.wait_telemetry(lambda t: t.device_time_us > first.device_time_us + 0.6 * 60e6)
    assert host.events(mark) == []
    t = await host.wait_telemetry()
    assert (t.state, t.fault_code) == (ControllerState.STANDBY, 0)


async def test_heartbeat_keeps_an_armed_controller_alive(lab: Lab) -> None:
    rig = await lab.rig(time_scale=60, armed=True)
    host = rig.host
    mark = host.mark()
    first = await host.wait_telemetry(after=mark)
    await host.wait_telemetry(lambda t: t.device_time_us > first.device_time_us + 0.8 * 60e6)
    assert host.events(mark, EventCode.WATCHDOG_EXPIRED) == []


@pytest.mark.parametrize(
    ("scale", "msg", "budget_uj"),
    [
        (120, emit(2, 830, 2_700_000), 60_000_000),
        (60, emit(1, 660, 1_000_000), 7_654_321),
        (120, probe_pulse(200_000), 4_000_000),
        (1, probe_pulse(100_000), 30_000),
    ],
    ids=["pad-830-x120", "pad-660-x60", "probe-905-x120", "probe-905-x1"],
)
async def test_energy_budget_stops_exactly_at_the_budget(
    lab: Lab, scale: int, msg: codec.EmitStart, budget_uj: int
) -> None:
    rig = await lab.rig(time_scale=scale, telemetry_hz=200, emission_delay_ms=100)
    host = rig.host
    await host.arm_ready()
    start = codec.EmitStart(**{**codec.message_fields(msg), "energy_budget_uj": budget_uj})
    mark = host.mark()
    await host.ack(start)
    ended = await host.wait_event(EventCode.EMISSION_ENDED, port=start.port, after=mark)
    assert ended.value == StopReason.ENERGY_BUDGET
    stopped = await host.expect(codec.EmitStop(start.port), codec.Stopped)
    assert stopped.stop_reason == StopReason.ENERGY_BUDGET
    assert abs(stopped.delivered_uj - budget_uj) <= budget_uj * 1e-6
    expected_ms = budget_uj / start.power_uw * 1000
    assert abs(stopped.duration_ms - expected_ms) < expected_ms * 0.03 + 2
    # a host integrating telemetry over device time agrees with the controller
    await host.wait_telemetry(lambda t: t.device_time_us > ended.device_time_us)
    frames = [t for t in host.telemetry(mark)]
    host_uj = sum(
        b.ports[start.port - 1].measured_power_uw * (b.device_time_us - a.device_time_us) / 1e6
        for a, b in itertools.pairwise(frames)
    )
    first_sample_uj = frames[0].ports[start.port - 1].delivered_uj  # before the first interval
    host_uj += first_sample_uj
    assert abs(host_uj - budget_uj) <= budget_uj * 1e-3, (host_uj, budget_uj)
    assert frames[-1].ports[start.port - 1].delivered_uj == stopped.delivered_uj


async def test_budget_stop_is_not_quantised_to_telemetry_ticks(lab: Lab) -> None:
    rig = await lab.rig(time_scale=120, telemetry_hz=1, armed=False, emission_delay_ms=0)
    host = rig.host
    await host.ack(codec.Arm(3))
    sent = time.monotonic()
    await host.ack(emit(1, 830, 2_000_000, energy_budget_uj=2_000_000))  # 1 s device
    ended = await host.wait_event(EventCode.EMISSION_ENDED, port=1)
    assert time.monotonic() - sent < 0.3  # 1/120 s wall plus scheduling, not a 1 s tick
    stopped = await host.expect(codec.EmitStop(1), codec.Stopped)
    assert stopped.delivered_uj == 2_000_000 and ended.value == StopReason.ENERGY_BUDGET


@pytest.mark.parametrize("scale", [1, 120])
async def test_max_duration_stops_exactly(lab: Lab, scale: int) -> None:
    rig = await lab.rig(time_scale=scale, emission_delay_ms=50)
    host = rig.host
    await host.arm_ready()
    duration_ms = 250 if scale == 1 else 30_000
    t0 = await host.device_us()
    await host.ack(emit(3, 660, 1_500_000, max_duration_ms=duration_ms))
    t1 = await host.device_us()
    ended = await host.wait_event(EventCode.EMISSION_ENDED, port=3)
    assert ended.value == StopReason.MAX_DURATION
    assert t0 + duration_ms * 1000 <= ended.device_time_us <= t1 + duration_ms * 1000
    stopped = await host.expect(codec.EmitStop(3), codec.Stopped)
    assert stopped.duration_ms == duration_ms
    expected_uj = 1_500_000 * duration_ms / 1000
    assert abs(stopped.delivered_uj - expected_uj) < expected_uj * 0.02


@pytest.mark.parametrize(("method", "bit"), [("key", 0x01), ("remote", 0x02), ("estop", 0x04)])
async def test_interlock_opening_stops_all_disarms_and_needs_manual_rearm(
    lab: Lab, method: str, bit: int
) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    await host.ack(emit(1, 830, 1_000_000))
    await host.ack(probe_pulse())
    mark = host.mark()
    if method == "estop":
        faults.estop(True)
    else:
        getattr(faults, method)(False)
    changed = await host.wait_event(EventCode.INTERLOCK_CHANGED, after=mark)
    assert changed.value == 0x07 & ~bit
    for port in (1, 4):
        await host.wait_event(EventCode.EMISSION_ENDED, port=port, value=4, after=mark)
    assert host.events(mark, EventCode.FAULT) == []
    t = await host.wait_telemetry()
    assert (t.state, t.interlocks, t.fault_code) == (ControllerState.STANDBY, 0x07 & ~bit, 0)
    assert await host.nak(codec.Arm(2)) == NakError.INTERLOCK_OPEN
    assert await host.nak(emit(2, 660, 1000)) == NakError.INTERLOCK_OPEN
    if method == "estop":
        faults.estop(False)
    else:
        getattr(faults, method)(True)
    await host.wait_event(EventCode.INTERLOCK_CHANGED, value=0x07, after=mark)
    t = await host.wait_telemetry()
    assert t.state == ControllerState.STANDBY  # never resumes by itself
    await host.arm_ready(2)


async def test_footswitch_is_information_only(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    await host.ack(emit(1, 660, 100_000))
    mark = host.mark()
    faults.footswitch(True)
    await host.wait_event(EventCode.INTERLOCK_CHANGED, value=0x0F, after=mark)
    faults.footswitch(False)
    await host.wait_event(EventCode.INTERLOCK_CHANGED, value=0x07, after=mark)
    t = await host.wait_telemetry()
    assert t.ports[0].emitting and t.state == ControllerState.ARMED_READY
    assert host.events(mark, EventCode.EMISSION_ENDED) == []


async def test_interlock_opening_while_faulted_keeps_state_3(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    faults.latch_fault(5)
    faults.estop(True)
    t = await host.wait_telemetry()
    assert (t.state, t.fault_code, t.interlocks) == (ControllerState.FAULT, 5, 0x03)


async def test_overpower_latches_fault_2_after_20_ms_device_time(lab: Lab) -> None:
    rig = await lab.rig(time_scale=60, armed=True)
    host, sim = rig.host, rig.sim
    await host.ack(emit(1, 830, 1_000_000))
    await host.ack(emit(2, 660, 500_000))
    await host.wait_telemetry(lambda t: t.ports[0].emitting and t.ports[1].emitting)
    mark = host.mark()
    before_us = sim.device_time_us
    sim.faults.power_factor(1, 1.3)
    after_us = sim.device_time_us
    fault = await host.wait_event(EventCode.FAULT, after=mark)
    assert (fault.port, fault.value) == (1, FaultCode.OVERPOWER)
    assert before_us + 20_000 <= fault.device_time_us <= after_us + 20_001
    for port in (1, 2):
        ended = await host.wait_event(EventCode.EMISSION_ENDED, port=port, after=mark)
        assert ended.value == StopReason.OVERPOWER
    t = await host.wait_telemetry()
    assert (t.state, t.fault_code) == (ControllerState.FAULT, FaultCode.OVERPOWER)
    assert t.ports[0].port_fault and not t.ports[1].port_fault
    assert await host.nak(emit(3, 660, 1000)) == NakError.FAULT_LATCHED
    assert await host.nak(codec.Arm(1)) == NakError.FAULT_LATCHED
    sim.faults.clear()
    await host.ack(codec.ClearFault())
    assert await host.nak(emit(3, 660, 1000)) == NakError.NOT_ARMED


async def test_power_within_120_percent_does_not_trip(lab: Lab) -> None:
    rig = await lab.rig(time_scale=120, armed=True)
    host = rig.host
    rig.sim.faults.power_factor(1, 1.12)
    await host.ack(emit(1, 830, 1_000_000))
    first = await host.wait_telemetry(lambda t: t.ports[0].emitting)
    t = await host.wait_telemetry(lambda t: t.device_time_us > first.device_time_us + 30e6)
    assert t.fault_code == 0 and t.ports[0].emitting
    assert 1_080_000 < t.ports[0].measured_power_uw < 1_140_000


async def test_photodiode_gain_changes_what_is_measured(lab: Lab) -> None:
    rig = await lab.rig(time_scale=60, armed=True)
    host, sim = rig.host, rig.sim
    sim.faults.photodiode_gain(1, 0.8)
    await host.ack(emit(1, 830, 1_000_000))
    first = await host.wait_telemetry(lambda t: t.ports[0].emitting)
    t = await host.wait_telemetry(lambda t: t.device_time_us > first.device_time_us + 5e6)
    assert 780_000 < t.ports[0].measured_power_uw < 820_000
    port = sim.snapshot()["ports"][0]
    assert port["true_delivered_uj"] > port["delivered_uj"] * 1.2
    mark = host.mark()
    sim.faults.photodiode_gain(1, 1.3)  # reads high: the controller sees overpower
    await host.wait_event(EventCode.FAULT, port=1, value=FaultCode.OVERPOWER, after=mark)


async def test_integrator_gain_makes_the_two_dose_channels_disagree(lab: Lab) -> None:
    """The controller's integral counts 0.9 × the photodiode; telemetry's power stays
    true, so a host integrating it sees 1/0.9 of what the controller reports, and the
    energy budget (on the controller's integral) ends the emission that much later."""
    rig = await lab.rig(time_scale=60, telemetry_hz=200, emission_delay_ms=100)
    host, sim = rig.host, rig.sim
    await host.arm_ready()
    sim.faults.integrator_gain(1, 0.9)
    assert sim.snapshot()["ports"][0]["faults"]["integrator_gain"] == 0.9
    budget_uj = 2_000_000
    mark = host.mark()
    await host.ack(emit(1, 830, 1_000_000, energy_budget_uj=budget_uj))
    ended = await host.wait_event(EventCode.EMISSION_ENDED, port=1, after=mark)
    assert ended.value == StopReason.ENERGY_BUDGET
    stopped = await host.expect(codec.EmitStop(1), codec.Stopped)
    assert abs(stopped.delivered_uj - budget_uj) <= budget_uj * 1e-6
    expected_ms = budget_uj / 0.9 / 1_000_000 * 1000  # 2.22 s of light at 1 W
    assert abs(stopped.duration_ms - expected_ms) < expected_ms * 0.03 + 2
    await host.wait_telemetry(lambda t: t.device_time_us > ended.device_time_us)
    frames = host.telemetry(mark)
    host_uj = frames[0].ports[0].delivered_uj / 0.9 + sum(
        b.ports[0].measured_power_uw * (b.device_time_us - a.device_time_us) / 1e6
        for a, b in itertools.pairwise(frames)
    )
    assert host_uj == pytest.approx(budget_uj / 0.9, rel=2e-3)
    sim.faults.clear()
    assert sim.snapshot()["ports"][0]["faults"]["integrator_gain"] == 1.0


async def test_over_temperature_latches_fault_3_until_it_cools(lab: Lab) -> None:
    rig = await lab.rig(time_scale=60, armed=True)
    host, sim = rig.host, rig.sim
    await host.ack(emit(3, 830, 500_000))
    await host.ack(emit(1, 660, 200_000))
    mark = host.mark()
    sim.faults.over_temperature(3)
    fault = await host.wait_event(EventCode.FAULT, after=mark)
    assert (fault.port, fault.value) == (3, FaultCode.OVER_TEMPERATURE)
    for port in (1, 3):
        await host.wait_event(EventCode.EMISSION_ENDED, port=port, value=7, after=mark)
    t = await host.wait_telemetry()
    assert t.ports[2].temp_centi_c > 4100 and t.ports[2].port_fault
    assert (t.state, t.fault_code) == (ControllerState.FAULT, FaultCode.OVER_TEMPERATURE)
    assert await host.nak(codec.ClearFault()) == NakError.FAULT_LATCHED
    sim.faults.temperature(3, 30.0)
    await host.ack(codec.ClearFault())
    await host.arm_ready()


async def test_thermal_model_crosses_41_c_and_trips_at_the_crossing(lab: Lab) -> None:
    rig = await lab.rig(time_scale=120, armed=True, ports={1: "probe_830"})
    host, sim = rig.host, rig.sim
    sim.faults.temperature(1, 40.0)
    sim.faults.power_factor(1, 2.0)  # twice the light really leaves the probe ...
    sim.faults.photodiode_gain(1, 0.5)  # ... and the monitor reads half: no overpower
    await host.ack(emit(1, 830, 250_000))
    fault = await host.wait_event(EventCode.FAULT, value=FaultCode.OVER_TEMPERATURE)
    ended = await host.wait_event(EventCode.EMISSION_ENDED, port=1)
    assert ended.value == StopReason.OVER_TEMPERATURE
    assert ended.device_time_us == fault.device_time_us
    snap = sim.snapshot()
    # 41.0 °C at the fault, cooling since then (τ 90 s towards 25 °C, light off)
    cooled_s = (snap["device_time_us"] - fault.device_time_us) / 1e6
    expected_c = 25.0 + 16.0 * math.exp(-cooled_s / 90.0)
    assert snap["ports"][0]["temp_c"] == pytest.approx(expected_c, abs=0.01)


async def test_contact_loss_stops_the_probe_only(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    await host.ack(probe_pulse())
    await host.ack(emit(1, 660, 100_000))
    t = await host.wait_telemetry(lambda t: t.ports[3].emitting)
    assert t.ports[3].contact and not t.ports[0].contact  # pads have no contact sensor
    mark = host.mark()
    faults.contact(4, False)
    await host.wait_event(EventCode.CONTACT_CHANGED, port=4, value=0, after=mark)
    await host.wait_event(EventCode.EMISSION_ENDED, port=4, value=11, after=mark)
    t = await host.wait_telemetry()
    assert t.state == ControllerState.ARMED_READY and t.ports[0].emitting
    assert not t.ports[3].contact
    assert await host.nak(probe_pulse()) == NakError.NO_SKIN_CONTACT
    faults.contact(4, True)
    await host.wait_event(EventCode.CONTACT_CHANGED, port=4, value=1, after=mark)
    await host.ack(probe_pulse())
    with pytest.raises(ValueError, match="no skin-contact sensor"):
        faults.contact(1, False)


async def test_unplug_and_plug(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    await host.ack(emit(2, 830, 1_000_000))
    mark = host.mark()
    faults.unplug(2)
    await host.wait_event(EventCode.APPLICATOR_CHANGED, port=2, value=0, after=mark)
    await host.wait_event(EventCode.EMISSION_ENDED, port=2, value=8, after=mark)
    assert (await host.expect(codec.GetPort(2), codec.PortInfo)).applicator_kind == 0
    assert await host.nak(emit(2, 830, 1000)) == NakError.NO_APPLICATOR
    t = await host.wait_telemetry()
    assert t.ports[1].flags == 0 and t.state == ControllerState.ARMED_READY
    faults.plug(2, "probe_830")
    await host.wait_event(EventCode.APPLICATOR_CHANGED, port=2, value=2, after=mark)
    info = await host.expect(codec.GetPort(2), codec.PortInfo)
    assert info.channels[0].wavelength_nm == 830 and info.area_mm2 == 50
    await host.ack(emit(2, 830, 100_000))


async def test_stuck_emitter_is_seen_and_latches_overpower(lab: Lab) -> None:
    rig = await lab.rig(time_scale=60, armed=True)
    host, sim = rig.host, rig.sim
    sim.faults.stuck_on(1)
    await host.ack(emit(1, 660, 1_000_000))
    await host.wait_telemetry(lambda t: t.ports[0].measured_power_uw > 900_000)
    mark = host.mark()
    await host.expect(codec.EmitStop(1), codec.Stopped)
    fault = await host.wait_event(EventCode.FAULT, after=mark)
    assert (fault.port, fault.value) == (1, FaultCode.OVERPOWER)
    t = await host.wait_telemetry(lambda t: t.ports[0].measured_power_uw > 900_000)
    assert not t.ports[0].emitting  # light, although the controller believes the port is off
    assert await host.nak(codec.ClearFault()) == NakError.FAULT_LATCHED
    sim.faults.stuck_on(1, False)
    await host.wait_telemetry(lambda t: t.ports[0].measured_power_uw == 0)
    await host.ack(codec.ClearFault())


@pytest.mark.parametrize(("code", "reason"), [(4, 10), (5, 10), (2, 6), (3, 7), (1, 5)])
async def test_latched_faults_stop_with_their_own_reason(lab: Lab, code: int, reason: int) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    await host.ack(emit(1, 660, 100_000))
    mark = host.mark()
    faults.latch_fault(code, port=0, persist=True)
    await host.wait_event(EventCode.FAULT, port=0, value=code, after=mark)
    await host.wait_event(EventCode.EMISSION_ENDED, port=1, value=reason, after=mark)
    assert await host.nak(codec.ClearFault()) == NakError.FAULT_LATCHED
    faults.clear()  # the cause goes away; the latch stays until CLEAR_FAULT
    t = await host.wait_telemetry()
    assert t.state == ControllerState.FAULT and t.fault_code == code
    await host.ack(codec.ClearFault())


async def test_interlock_bits_at_once(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    await host.ack(emit(1, 660, 100_000))
    mark = host.mark()
    faults.interlocks(0x0B)  # e-stop pressed, footswitch pressed
    await host.wait_event(EventCode.INTERLOCK_CHANGED, value=0x0B, after=mark)
    await host.wait_event(EventCode.EMISSION_ENDED, port=1, value=4, after=mark)
    t = await host.wait_telemetry()
    assert (t.state, t.interlocks) == (ControllerState.STANDBY, 0x0B)
    faults.interlocks(0x0F)
    await host.arm_ready()
    with pytest.raises(ValueError, match="interlock bits"):
        faults.interlocks(0x10)


async def test_session_sum_continues_after_an_interlock_with_the_same_token(lab: Lab) -> None:
    rig = await lab.rig(armed=True)
    host, faults = rig.host, rig.sim.faults
    await host.ack(emit(1, 660, 1_000_000))
    await host.wait_telemetry(lambda t: t.ports[0].delivered_uj > 100_000)
    faults.remote(False)
    ended = await host.wait_event(EventCode.EMISSION_ENDED, port=1, value=4)
    assert ended.port == 1
    first = await host.expect(codec.EmitStop(1), codec.Stopped)
    faults.remote(True)
    await host.arm_ready(0x1234)
    await host.ack(emit(1, 660, 1_000_000, energy_budget_uj=50_000))
    await host.wait_event(EventCode.EMISSION_ENDED, port=1, value=StopReason.ENERGY_BUDGET)
    c = await host.expect(codec.GetCounters(1), codec.Counters)
    assert c.session_delivered_uj == first.delivered_uj + 50_000
