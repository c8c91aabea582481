"""ICD §5/§5a per-emission guarantees: energy budget, max duration, EMIT_STOP, overpower,
over-temperature, applicator removed, skin contact lost, measured power."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Awaitable, Callable

import pytest

from . import pbmlink_peer as pl
from .harness import (
    PAD_660_MAX_UW,
    PAD_PORTS,
    PROBE_905_MAX_UW,
    PROBE_PORT,
    PROBE_PULSED,
    W660,
    W830,
    W905,
    ControlError,
    Rig,
    stop_record,
)
from .pbmlink_peer import Ack, Nak, PortInfo, Stopped, Telemetry

RigFactory = Callable[..., Awaitable[Rig]]
HUGE_BUDGET_UJ = 10**12


def _slack_us(scale: float) -> int:
    return int(5_000 * scale) + 1_000


async def _samples(rig: Rig, count: int, after: int | None = None) -> list[Telemetry]:
    """The next `count` telemetry frames."""
    peer = rig.peer
    start = peer.mark() if after is None else after
    await peer.wait_for(
        lambda r: len(peer.telemetry(start, r.index + 1)) >= count,
        after=start,
        what=f"{count} telemetry frames",
    )
    return peer.telemetry(start)[:count]


@pytest.mark.parametrize("scale", [1, 60])
async def test_energy_budget_stops_the_emission_at_the_budget(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    await rig.arm_ready()
    power_uw = 1_000_000
    planned_ms = 400 * scale  # 0.4 s of wall time at every scale
    budget_uj = power_uw * planned_ms // 1000
    start = peer.mark()
    await rig.start(1, W660, power_uw, energy_budget_uj=budget_uj, max_duration_ms=10 * planned_ms)
    ended = await peer.wait_event(
        pl.EV_EMISSION_ENDED, port=1, after=start, timeout_s=rig.bound_s(2 * planned_ms)
    )
    assert ended.value == pl.SR_ENERGY_BUDGET
    stopped = await stop_record(rig, 1, pl.SR_ENERGY_BUDGET)
    # "stops ... when its own delivered energy reaches this": at the budget, not well past it.
    assert budget_uj <= stopped.delivered_uj <= budget_uj * 1.001, (
        f"delivered {stopped.delivered_uj} µJ for a budget of {budget_uj} µJ"
    )
    # Duration in device time: ~budget / power (a little longer if the source droops).
    assert 0.97 * planned_ms <= stopped.duration_ms <= 1.15 * planned_ms, stopped
    assert peer.events(start, pl.EV_FAULT) == []

    # delivered_uj is held after the end ...
    held = await _samples(rig, 5)
    assert all(t.port(1).delivered_uj == stopped.delivered_uj for t in held), [
        t.port(1).delivered_uj for t in held
    ]
    assert all(not t.port(1).emitting and t.port(1).wavelength_nm == 0 for t in held)
    # ... until the next EMIT_START on that port.
    ack = await peer.request(pl.EMIT_START, pl.pack_emit_start(1, W830, 5_000))
    assert ack.message == Ack()
    t = await peer.wait_telemetry(after=ack.index)
    assert t.port(1).emitting and t.port(1).wavelength_nm == W830
    assert t.port(1).delivered_uj < stopped.delivered_uj // 10


@pytest.mark.parametrize("scale", [1, 60])
async def test_max_duration_stops_the_emission_after_that_much_device_time(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    await rig.arm_ready()
    power_uw = 500_000
    max_ms = 400 * scale
    start = peer.mark()
    before_us = (await peer.ping()).device_time_us
    await rig.start(2, W830, power_uw, energy_budget_uj=HUGE_BUDGET_UJ, max_duration_ms=max_ms)
    after_us = (await peer.ping()).device_time_us
    ended = await peer.wait_event(
        pl.EV_EMISSION_ENDED, port=2, after=start, timeout_s=rig.bound_s(2 * max_ms)
    )
    assert ended.value == pl.SR_MAX_DURATION
    stopped = await stop_record(rig, 2, pl.SR_MAX_DURATION)
    assert max_ms <= stopped.duration_ms <= max_ms * 1.001 + 1, (
        f"duration {stopped.duration_ms} ms for max_duration_ms {max_ms}"
    )
    expected_uj = power_uw * max_ms / 1000
    assert 0.9 * expected_uj <= stopped.delivered_uj <= 1.05 * expected_uj, stopped
    # The event's device time and the duration field tell the same story: the emission
    # began between the two PONGs and ended at the event.
    assert ended.device_time_us - after_us <= stopped.duration_ms * 1000 + 1000
    assert stopped.duration_ms * 1000 <= ended.device_time_us - before_us + 1000
    emitting = [t for t in peer.telemetry(start) if t.port(2).emitting]
    assert emitting, "no telemetry sample during the emission"
    measured = [t.port(2).measured_power_uw for t in emitting[1:]]
    if measured:
        assert abs(statistics.median(measured) - power_uw) <= 0.05 * power_uw, measured


async def test_emit_stop_is_idempotent(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60, fresh=True)  # port 2 has never emitted
    peer = rig.peer
    await rig.arm_ready()
    power_uw = 400_000
    await rig.start(1, W660, power_uw)
    await peer.wait_telemetry(lambda t: t.port(1).delivered_uj > 0)
    start = peer.mark()
    first = await peer.emit_stop(1)
    assert isinstance(first, Stopped)
    assert first.port == 1 and first.stop_reason == pl.SR_HOST_STOP
    assert first.delivered_uj > 0 and first.duration_ms > 0
    assert abs(first.delivered_uj - power_uw * first.duration_ms / 1000) <= 0.1 * first.delivered_uj
    await peer.wait_event(pl.EV_EMISSION_ENDED, port=1, value=pl.SR_HOST_STOP, after=start)
    assert await peer.emit_stop(1) == first
    assert await peer.emit_stop(1) == first
    await stop_record(rig, 1, pl.SR_HOST_STOP)
    await _samples(rig, 3)
    ended = peer.events(start, pl.EV_EMISSION_ENDED)
    assert len(ended) == 1, f"one emission ended, EMISSION_ENDED sent {len(ended)} times"
    # A port that never emitted, on an armed controller: all zero, no event.
    assert await peer.emit_stop(2) == Stopped(2, 0, 0, 0)
    await _samples(rig, 2)
    assert [e.port for e in peer.events(start, pl.EV_EMISSION_ENDED)] == [1]


@pytest.mark.parametrize("scale", [1, 60])
async def test_overpower_stops_every_port_and_latches_fault_2(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(1, W660, 1_000_000)
    await rig.start(2, W830, 500_000)
    start = peer.mark()
    before_inject_us = (await peer.ping()).device_time_us
    await rig.control.call("power_factor", port=1, factor=1.5)
    after_inject_us = (await peer.ping()).device_time_us
    fault = await peer.wait_event(pl.EV_FAULT, value=pl.FAULT_OVERPOWER, after=start)
    assert fault.port == 1, "FAULT carries the faulting port"
    # Above 120 % *for 20 ms* (device time) before it trips.
    assert fault.device_time_us >= before_inject_us + 19_000
    assert fault.device_time_us <= after_inject_us + 20_000 + _slack_us(scale)
    for port in (1, 2):
        await peer.wait_event(pl.EV_EMISSION_ENDED, port=port, value=pl.SR_OVERPOWER, after=start)
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.FAULTED, pl.FAULT_OVERPOWER)
    assert not any(p.emitting for p in t.ports)
    for port in (1, 2):
        await stop_record(rig, port, pl.SR_OVERPOWER)
    assert await peer.emit_start(3, W660, 1000) == Nak(pl.NAK_FAULT)
    await rig.control.call("power_factor", port=1, factor=1.0)
    assert await peer.clear_fault() == Ack()
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.STANDBY, 0)


async def test_power_below_120_percent_does_not_trip(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    power_uw = 1_000_000
    await rig.start(1, W660, power_uw)
    await rig.control.call("power_factor", port=1, factor=1.1)
    start = peer.mark()
    t0 = (await peer.ping()).device_time_us
    await peer.wait_telemetry(lambda t: t.device_time_us >= t0 + 3_000_000)
    samples = [t for t in peer.telemetry(start) if t.port(1).emitting]
    assert peer.events(start, pl.EV_FAULT) == []
    assert peer.events(start, pl.EV_EMISSION_ENDED) == []
    measured = statistics.median(t.port(1).measured_power_uw for t in samples[1:])
    assert 1.05 * power_uw <= measured <= 1.15 * power_uw, "monitor photodiode reads true power"


@pytest.mark.parametrize("scale", [1, 60])
async def test_over_temperature_stops_every_port_and_latches_fault_3(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(3, W830, 500_000)
    await rig.start(1, W660, 200_000)
    start = peer.mark()
    await rig.control.call("over_temperature", port=3)
    fault = await peer.wait_event(pl.EV_FAULT, value=pl.FAULT_OVER_TEMPERATURE, after=start)
    assert fault.port == 3
    for port in (1, 3):
        await peer.wait_event(
            pl.EV_EMISSION_ENDED, port=port, value=pl.SR_OVER_TEMPERATURE, after=start
        )
    await peer.wait_telemetry(
        lambda t: t.port(3).temp_centi_c > 4100, after=start, what="port 3 above 41.0 °C"
    )
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.FAULTED, pl.FAULT_OVER_TEMPERATURE)
    for port in (1, 3):
        await stop_record(rig, port, pl.SR_OVER_TEMPERATURE)
    # CLEAR_FAULT is refused while the cause is present.
    await rig.control.call("temperature", port=3, celsius=45.0)
    await peer.wait_telemetry(lambda t: t.port(3).temp_centi_c > 4100)
    assert await peer.clear_fault() == Nak(pl.NAK_FAULT)
    await rig.control.call("temperature", port=3, celsius=30.0)
    await peer.wait_telemetry(lambda t: t.port(3).temp_centi_c < 4000)
    assert await peer.clear_fault() == Ack()
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.STANDBY, 0)


@pytest.mark.parametrize("scale", [1, 60])
async def test_removing_an_applicator_stops_only_that_port(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(1, W660, 200_000)
    await rig.start(2, W830, 200_000)
    start = peer.mark()
    await rig.control.call("unplug", port=2)
    changed = await peer.wait_event(pl.EV_APPLICATOR_CHANGED, port=2, after=start)
    assert changed.value == 0, "APPLICATOR_CHANGED carries the new kind, 0 = removed"
    await peer.wait_event(pl.EV_EMISSION_ENDED, port=2, value=pl.SR_APPLICATOR_REMOVED, after=start)
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.READY, 0)
    assert t.port(1).emitting, "only that port stops"
    assert not t.port(2).flags & (pl.FLAG_PRESENT | pl.FLAG_EMITTING)
    await stop_record(rig, 2, pl.SR_APPLICATOR_REMOVED)
    empty = await peer.get_port(2)
    assert isinstance(empty, PortInfo)
    assert (empty.port, empty.applicator_kind, empty.channels) == (2, 0, ())
    assert await peer.emit_start(2, W830, 1000) == Nak(pl.NAK_NO_APPLICATOR)
    assert peer.events(start, pl.EV_FAULT) == []

    start = peer.mark()
    await rig.control.call("plug", port=2, applicator="probe_830")
    plugged = await peer.wait_event(pl.EV_APPLICATOR_CHANGED, port=2, after=start)
    assert plugged.value == 2
    probe = await peer.get_port(2)
    assert isinstance(probe, PortInfo)
    assert probe.applicator_kind == 2
    assert [c.wavelength_nm for c in probe.channels] == [W830]
    t = await peer.wait_telemetry()
    assert t.port(2).flags & pl.FLAG_PRESENT and t.port(1).emitting
    assert [e.port for e in peer.events(0, pl.EV_EMISSION_ENDED)] == [2]


@pytest.mark.parametrize("scale", [1, 60])
async def test_losing_skin_contact_stops_only_that_port(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(PROBE_PORT, W905, 100_000, **PROBE_PULSED)
    await rig.start(1, W660, 200_000)
    assert (await peer.wait_telemetry()).port(PROBE_PORT).flags & pl.FLAG_CONTACT
    start = peer.mark()
    await rig.control.call("contact", port=PROBE_PORT, on=False)
    lost = await peer.wait_event(pl.EV_CONTACT_CHANGED, port=PROBE_PORT, after=start)
    assert lost.value == 0
    await peer.wait_event(
        pl.EV_EMISSION_ENDED, port=PROBE_PORT, value=pl.SR_CONTACT_LOST, after=start
    )
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.READY, 0)
    assert t.port(1).emitting
    assert not t.port(PROBE_PORT).flags & (pl.FLAG_CONTACT | pl.FLAG_EMITTING)
    await stop_record(rig, PROBE_PORT, pl.SR_CONTACT_LOST)
    assert await peer.emit_start(PROBE_PORT, W905, 100_000, **PROBE_PULSED) == Nak(
        pl.NAK_NO_CONTACT
    )
    start = peer.mark()
    await rig.control.call("contact", port=PROBE_PORT, on=True)
    back = await peer.wait_event(pl.EV_CONTACT_CHANGED, port=PROBE_PORT, after=start)
    assert back.value == 1
    assert (await peer.wait_telemetry()).port(PROBE_PORT).flags & pl.FLAG_CONTACT
    await rig.start(PROBE_PORT, W905, 100_000, **PROBE_PULSED)
    assert peer.events(0, pl.EV_FAULT) == []


async def test_pads_never_report_skin_contact(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    start = peer.mark()
    await rig.arm_ready()
    await rig.start(1, W660, 200_000)
    for port in PAD_PORTS:
        with contextlib.suppress(ControlError):  # refusing is fine: a pad has no sensor
            await rig.control.call("contact", port=port, on=True)
    await _samples(rig, 10)
    frames = peer.telemetry(start)
    assert all(not t.port(p).flags & pl.FLAG_CONTACT for t in frames for p in PAD_PORTS)


async def test_ack_means_emission_has_begun_and_measured_power_is_the_setpoint(
    rig_factory: RigFactory,
) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    cases = [
        (1, W660, 900_000, {}),
        (2, W660, 600_000, {"mode": 1, "pulse_hz": 1000, "duty_permille": 500}),
        (3, W830, 0, {}),  # a setpoint of 0 is allowed
        (PROBE_PORT, W905, PROBE_905_MAX_UW, PROBE_PULSED),
    ]
    for port, wavelength, power_uw, kw in cases:
        ack = await peer.request(
            pl.EMIT_START, pl.pack_emit_start(port, wavelength, power_uw, **kw)
        )
        assert ack.message == Ack(), f"port {port}: {ack.message}"
        t = await peer.wait_telemetry(after=ack.index)
        assert t.port(port).emitting, f"port {port} not emitting in the first sample after ACK"
        assert t.port(port).wavelength_nm == wavelength
    start = peer.mark()
    samples = await _samples(rig, 10, after=start)
    for port, _wavelength, power_uw, _kw in cases:
        # Mean power, also for pulsed emissions (ICD §5a).
        measured = statistics.median(t.port(port).measured_power_uw for t in samples)
        assert abs(measured - power_uw) <= 0.05 * power_uw + 100, (
            f"port {port}: measured {measured} µW for a setpoint of {power_uw} µW"
        )
    delivered = [t.port(1).delivered_uj for t in samples]
    assert delivered == sorted(delivered) and delivered[-1] > delivered[0]
    assert all(not t.port(p).flags & pl.FLAG_PORT_FAULT for t in samples for p in range(1, 5))


async def test_power_at_the_channel_maximum_is_accepted(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    await rig.arm_ready()
    assert await rig.peer.emit_start(1, W660, PAD_660_MAX_UW + 1) == Nak(pl.NAK_POWER)
    assert await rig.peer.emit_start(1, W660, PAD_660_MAX_UW) == Ack()


@pytest.mark.parametrize("fault_code", [4, 5], ids=["photodiode", "internal"])
async def test_photodiode_and_internal_faults_stop_every_port_with_reason_10(
    rig_factory: RigFactory, fault_code: int
) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(1, W660, 200_000)
    await rig.start(PROBE_PORT, W905, 100_000, **PROBE_PULSED)
    start = peer.mark()
    try:
        await rig.control.call("latch_fault", code=fault_code, port=1)
    except ControlError as exc:
        pytest.skip(f"the simulator cannot inject this fault: {exc}")
    fault = await peer.wait_event(pl.EV_FAULT, value=fault_code, after=start)
    assert fault.port in (0, 1)
    for port in (1, PROBE_PORT):
        await peer.wait_event(pl.EV_EMISSION_ENDED, port=port, value=pl.SR_DISARM, after=start)
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.FAULTED, fault_code)
    for port in (1, PROBE_PORT):
        await stop_record(rig, port, pl.SR_DISARM)
