"""ICD §5/§5a arming: emission delay in device time, ARM rules, interlocks, ALL_OFF, DISARM."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import pytest

from . import pbmlink_peer as pl
from .harness import (
    INTERLOCK_INPUTS,
    PROBE_PORT,
    PROBE_PULSED,
    W660,
    W830,
    W905,
    Rig,
    new_token,
    set_interlock,
    stop_record,
)
from .pbmlink_peer import Ack, Nak, Telemetry

RigFactory = Callable[..., Awaitable[Rig]]
DELAY_US = 2_000_000


def _slack_us(scale: float) -> int:
    """Device time that a few ms of wall-clock jitter amount to at this scale."""
    return int(5_000 * scale) + 1_000


@pytest.mark.parametrize("scale", [1, 60])
async def test_emission_delay_is_2000_ms_of_device_time_with_nak_6_before(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale, telemetry_hz=200)
    peer = rig.peer
    before_us = (await peer.ping()).device_time_us
    arm = await peer.request(pl.ARM, struct.pack("<I", new_token()))
    assert arm.message == Ack()
    # Right after ARM (same write burst): refused with NAK 6.
    assert await peer.emit_start(1, W660, 100_000) == Nak(pl.NAK_EMISSION_DELAY)
    after_us = (await peer.ping()).device_time_us
    if rig.wall_s(1000) > 0.3:  # halfway through, when that is safely inside the delay
        mid = await peer.wait_telemetry(
            lambda t: t.device_time_us >= before_us + DELAY_US // 2, after=arm.index, timeout_s=3
        )
        assert mid.state == pl.DELAY
        assert await peer.emit_start(1, W660, 100_000) == Nak(pl.NAK_EMISSION_DELAY)
    ready = await peer.wait_for(
        lambda r: isinstance(r.message, Telemetry) and r.message.state == pl.READY,
        after=arm.index,
        timeout_s=rig.bound_s(2000),
        what="state 2",
    )
    assert isinstance(ready.message, Telemetry)
    in_delay = peer.telemetry(arm.index + 1, ready.index)
    assert in_delay, "no telemetry during the delay"
    assert all(t.state == pl.DELAY for t in in_delay), [t.state for t in in_delay]
    # Never early, in device time ...
    assert ready.message.device_time_us >= before_us + DELAY_US
    # ... and not late: the last sample still in state 1 was inside the delay.
    assert in_delay[-1].device_time_us <= after_us + DELAY_US + _slack_us(scale)
    # In wall time the delay is 2 s / scale.
    wall_s = ready.wall_s - arm.wall_s
    assert wall_s >= 2.0 / scale - 0.01
    assert wall_s <= 2.0 / scale + 0.1, f"state 2 after {wall_s:.3f} s of wall time"
    assert await peer.emit_start(1, W660, 100_000) == Ack()


async def test_arm_while_armed_restarts_nothing_and_a_new_token_is_acked(
    rig_factory: RigFactory,
) -> None:
    rig = await rig_factory(60, telemetry_hz=200)
    peer = rig.peer
    token = new_token()
    arm_us = (await peer.ping()).device_time_us
    first = await peer.request(pl.ARM, struct.pack("<I", token))
    assert first.message == Ack()
    first_upper_us = (await peer.ping()).device_time_us
    mid = await peer.wait_telemetry(
        lambda t: t.device_time_us >= arm_us + DELAY_US // 2, after=first.index
    )
    if mid.state != pl.DELAY:
        pytest.skip("the host was too slow to ARM again inside the delay")
    again = await peer.request(pl.ARM, struct.pack("<I", token))
    assert again.message == Ack()
    other = await peer.request(pl.ARM, struct.pack("<I", new_token()))
    assert other.message == Ack()
    ready = await peer.wait_telemetry(lambda t: t.state == pl.READY, after=first.index)
    later = peer.telemetry(first.index + 1)
    last_delay = [t for t in later if t.state == pl.DELAY][-1]
    assert last_delay.device_time_us <= first_upper_us + DELAY_US + _slack_us(60), (
        "a second ARM restarted the emission delay"
    )
    assert ready.device_time_us >= arm_us + DELAY_US
    # Armed and ready: ARM again is ACKed and stays in state 2.
    again_ready = await peer.request(pl.ARM, struct.pack("<I", new_token()))
    assert again_ready.message == Ack()
    t = await peer.wait_telemetry(after=again_ready.index)
    assert t.state == pl.READY
    assert await peer.emit_start(1, W660, 1000) == Ack()


@pytest.mark.parametrize(
    ("scale", "which"),
    [(1, "estop"), (60, "estop"), (60, "key"), (60, "remote")],
)
async def test_interlock_opening_stops_all_disarms_and_needs_a_manual_rearm(
    rig_factory: RigFactory, scale: int, which: str
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    token = new_token()
    await rig.arm_ready(token)
    await rig.start(1, W660, 300_000)
    await rig.start(2, W830, 300_000)
    await rig.start(PROBE_PORT, W905, 100_000, **PROBE_PULSED)
    bits_before = (await peer.wait_telemetry()).interlocks
    bit = INTERLOCK_INPUTS[which][3]
    assert bits_before & bit
    start = peer.mark()
    await set_interlock(rig, which, run=False)
    changed = await peer.wait_event(pl.EV_INTERLOCK_CHANGED, after=start)
    assert changed.port == 0
    assert changed.value == bits_before & ~bit, (
        f"INTERLOCK_CHANGED value {changed.value:#06b}, want {bits_before & ~bit:#06b}"
    )
    for port in (1, 2, PROBE_PORT):
        await peer.wait_event(pl.EV_EMISSION_ENDED, port=port, value=pl.SR_INTERLOCK, after=start)
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code, t.interlocks) == (pl.STANDBY, 0, bits_before & ~bit)
    assert not any(p.emitting for p in t.ports)
    assert peer.events(start, pl.EV_FAULT) == [], "an interlock latches no fault"
    for port in (1, 2, PROBE_PORT):
        await stop_record(rig, port, pl.SR_INTERLOCK)

    assert await peer.arm(token) == Nak(pl.NAK_INTERLOCK)
    assert await peer.emit_start(1, W660, 1000) == Nak(pl.NAK_INTERLOCK)

    closed = peer.mark()
    await set_interlock(rig, which, run=True)
    back = await peer.wait_event(pl.EV_INTERLOCK_CHANGED, after=closed)
    assert back.value == bits_before
    t = await peer.wait_telemetry()
    assert t.state == pl.STANDBY, "closing the interlock must not re-arm by itself"
    assert await peer.emit_start(1, W660, 1000) == Nak(pl.NAK_NOT_ARMED)
    arm = await peer.request(pl.ARM, struct.pack("<I", token))
    assert arm.message == Ack()
    assert (await peer.wait_telemetry(after=arm.index)).state in (pl.DELAY, pl.READY)


async def test_interlocks_value_carries_every_bit(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    await rig.arm_ready()
    start = rig.peer.mark()
    await rig.control.call("interlocks", bits=0b0101)  # remote interlock open
    changed = await rig.peer.wait_event(pl.EV_INTERLOCK_CHANGED, after=start)
    assert changed.value == 0b0101
    t = await rig.peer.wait_telemetry(lambda t: t.interlocks == 0b0101)
    assert t.state == pl.STANDBY


async def test_footswitch_is_information_only(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    bits = (await peer.wait_telemetry()).interlocks
    assert not bits & pl.IL_FOOTSWITCH, "footswitch released by default"
    await rig.start(1, W660, 100_000)  # emission does not need the footswitch
    start = peer.mark()
    await rig.control.call("footswitch", pressed=True)
    pressed = await peer.wait_event(pl.EV_INTERLOCK_CHANGED, after=start)
    assert pressed.value == bits | pl.IL_FOOTSWITCH
    start = peer.mark()
    await rig.control.call("footswitch", pressed=False)
    released = await peer.wait_event(pl.EV_INTERLOCK_CHANGED, after=start)
    assert released.value == bits
    t = await peer.wait_telemetry()
    assert t.state == pl.READY and t.port(1).emitting
    assert peer.events(0, pl.EV_EMISSION_ENDED) == []


async def test_interlock_opening_while_a_fault_is_latched_leaves_state_3(
    rig_factory: RigFactory,
) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(3, W660, 200_000)
    start = peer.mark()
    await rig.control.call("over_temperature", port=3)
    await peer.wait_event(pl.EV_FAULT, value=pl.FAULT_OVER_TEMPERATURE, after=start)
    start = peer.mark()
    await set_interlock(rig, "estop", run=False)
    await peer.wait_event(pl.EV_INTERLOCK_CHANGED, after=start)
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.FAULTED, pl.FAULT_OVER_TEMPERATURE)
    # Precedence 8 before 7.
    assert await peer.arm(new_token()) == Nak(pl.NAK_FAULT)
    assert await peer.emit_start(1, W660, 1000) == Nak(pl.NAK_FAULT)
    # The over-temperature is gone but the e-stop is still pressed: CLEAR_FAULT gets NAK 7.
    await rig.control.call("temperature", port=3, celsius=30.0)
    await peer.wait_telemetry(lambda t: t.port(3).temp_centi_c < 4000)
    assert await peer.clear_fault() == Nak(pl.NAK_INTERLOCK)
    await set_interlock(rig, "estop", run=True)
    await peer.wait_telemetry(lambda t: bool(t.interlocks & pl.IL_ESTOP))
    assert await peer.clear_fault() == Ack()
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.STANDBY, 0)


@pytest.mark.parametrize("scale", [1, 60])
async def test_all_off_stops_every_port_and_keeps_the_arming_state(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(1, W660, 300_000)
    await rig.start(3, W830, 300_000, mode=1, pulse_hz=100, duty_permille=500)
    await rig.start(PROBE_PORT, W905, 100_000, **PROBE_PULSED)
    start = peer.mark()
    off = await peer.request(pl.ALL_OFF)
    assert off.message == Ack()
    for port in (1, 3, PROBE_PORT):
        await peer.wait_event(pl.EV_EMISSION_ENDED, port=port, value=pl.SR_ALL_OFF, after=start)
    t = await peer.wait_telemetry(after=off.index)
    assert t.state == pl.READY, "ALL_OFF leaves the arming state as it is"
    assert not any(p.emitting for p in t.ports)
    for port in (1, 3, PROBE_PORT):
        await stop_record(rig, port, pl.SR_ALL_OFF)
    # Still armed and ready: no new emission delay.
    assert await peer.emit_start(1, W660, 1000) == Ack()


async def test_all_off_during_the_emission_delay_stays_armed(rig_factory: RigFactory) -> None:
    rig = await rig_factory(1)
    peer = rig.peer
    assert await peer.arm(new_token()) == Ack()
    off = await peer.request(pl.ALL_OFF)
    assert off.message == Ack()
    assert (await peer.wait_telemetry(after=off.index)).state == pl.DELAY


async def test_disarm_stops_every_port_with_reason_10(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(2, W660, 300_000)
    await rig.start(PROBE_PORT, W905, 100_000, **PROBE_PULSED)
    start = peer.mark()
    disarm = await peer.request(pl.DISARM)
    assert disarm.message == Ack()
    t = await peer.wait_telemetry(after=disarm.index)
    assert t.state == pl.STANDBY and not any(p.emitting for p in t.ports)
    for port in (2, PROBE_PORT):
        await peer.wait_event(pl.EV_EMISSION_ENDED, port=port, value=pl.SR_DISARM, after=start)
        await stop_record(rig, port, pl.SR_DISARM)
    assert await peer.emit_start(2, W660, 1000) == Nak(pl.NAK_NOT_ARMED)


async def test_disarm_during_the_delay_returns_to_standby(rig_factory: RigFactory) -> None:
    rig = await rig_factory(1)
    assert await rig.peer.arm(new_token()) == Ack()
    disarm = await rig.peer.request(pl.DISARM)
    assert disarm.message == Ack()
    assert (await rig.peer.wait_telemetry(after=disarm.index)).state == pl.STANDBY
