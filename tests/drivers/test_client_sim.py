"""The client against the simulated controller over the real byte protocol,
on TCP, on a pty and over USB (the simulated pyusb backend): handshake,
arming, emission, counters, telemetry, the watchdog, and the faults a link
can have."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from pbm_link_script import WAIT_S, wait_until

from pbmd.drivers import codec
from pbmd.drivers.client import (
    ControllerClient,
    LinkClosed,
    NakReceived,
    ReplyTimeout,
    open_controller,
)
from pbmd.hw_sim import SimConfig, Simulator

TIME_SCALE = 60.0
TOKEN = 0x5E55_1011
POWER_UW = 500_000  # 500 mW on the 660 nm channel of a DUO pad


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(SimConfig(time_scale=TIME_SCALE, seed=7))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.close()


@pytest.fixture(params=["tcp", "pty", "usb"])
async def url(sim: Simulator, request: pytest.FixtureRequest) -> str:
    if request.param == "tcp":
        return await sim.listen_tcp("127.0.0.1", 0)
    if request.param == "usb":
        return await sim.listen_usb()
    return await sim.listen_pty()


@pytest.fixture
async def client(url: str) -> AsyncIterator[ControllerClient]:
    c = await open_controller(url, telemetry_hz=50)
    try:
        yield c
    finally:
        await c.close()


def emission(port: int = 1, *, max_duration_ms: int = 600_000) -> codec.EmitStart:
    return codec.EmitStart(
        port=port,
        wavelength_nm=660,
        mode=codec.EmitMode.CONTINUOUS,
        power_uw=POWER_UW,
        pulse_hz=0,
        duty_permille=1000,
        energy_budget_uj=10**12,
        max_duration_ms=max_duration_ms,
    )


async def next_telemetry(
    client: ControllerClient, condition: Callable[[codec.Telemetry], bool]
) -> codec.Telemetry:
    """The first telemetry sample for which ``condition(sample)`` holds."""
    with client.subscribe_telemetry() as sub:
        async with asyncio.timeout(WAIT_S):
            async for sample in sub:
                if condition(sample):
                    return sample
    raise AssertionError("telemetry ended")


async def arm_ready(client: ControllerClient) -> None:
    await client.arm(TOKEN)
    # 2000 ms of emission delay is 33 ms of wall time at 60×.
    await next_telemetry(client, lambda t: t.state == codec.ControllerState.ARMED_READY)


async def test_handshake(client: ControllerClient) -> None:
    info = client.info
    assert (info.protocol_version, info.port_count, info.watchdog_ms) == (1, 4, 250)
    assert sorted(client.ports) == [1, 2, 3, 4]
    for port in (1, 2, 3):
        assert client.ports[port].applicator_kind == codec.ApplicatorKind.PAD
        assert [c.wavelength_nm for c in client.ports[port].channels] == [660, 830]
    assert client.ports[4].applicator_kind == codec.ApplicatorKind.PROBE
    assert [c.wavelength_nm for c in client.ports[4].channels] == [905]
    assert client.heartbeat_running
    sample = await next_telemetry(client, lambda t: True)
    assert len(sample.ports) == 4
    assert (await client.ping()).device_time_us > 0


async def test_arm_emit_stop_and_counters(client: ControllerClient) -> None:
    events = client.subscribe_events()
    with pytest.raises(NakReceived) as caught:
        await client.emit_start(emission())
    assert caught.value.code is codec.NakError.NOT_ARMED

    await arm_ready(client)
    await client.emit_start(emission())
    sample = await next_telemetry(
        client, lambda t: t.ports[0].emitting and t.ports[0].delivered_uj > 0
    )
    assert sample.ports[0].wavelength_nm == 660
    with pytest.raises(NakReceived) as caught:
        await client.emit_start(emission())
    assert caught.value.code is codec.NakError.PORT_ALREADY_EMITTING

    stopped = await client.emit_stop(1)
    assert stopped.port == 1 and stopped.stop_reason == codec.StopReason.HOST_STOP
    assert stopped.delivered_uj > 0 and stopped.duration_ms > 0
    counters = await client.get_counters(1)
    assert counters.session_token == TOKEN and counters.emitting == 0
    assert counters.delivered_uj == stopped.delivered_uj
    assert counters.session_delivered_uj == stopped.delivered_uj
    assert counters.last_stop_reason == codec.StopReason.HOST_STOP

    async with asyncio.timeout(WAIT_S):
        async for event in events:
            if event.code == codec.EventCode.EMISSION_ENDED:
                break
    assert (event.port, event.value) == (1, codec.StopReason.HOST_STOP)
    events.close()

    await client.all_off()
    await client.disarm()
    sample = await next_telemetry(client, lambda t: t.state == codec.ControllerState.STANDBY)
    assert not any(p.emitting for p in sample.ports)


async def test_heartbeat_feeds_the_watchdog_for_a_second(client: ControllerClient) -> None:
    """1 s of wall time at 60× is a minute of device time; 250 ms of silence
    would latch fault 1. Telemetry over the whole second must show no fault."""
    await arm_ready(client)
    await client.emit_start(emission())
    loop = asyncio.get_running_loop()
    samples: list[codec.Telemetry] = []
    arrivals: list[float] = []
    with client.subscribe_telemetry(maxsize=256) as sub:
        start = loop.time()
        async with asyncio.timeout(1.0 + WAIT_S):
            async for sample in sub:
                samples.append(sample)
                arrivals.append(loop.time())
                if arrivals[-1] - start >= 1.0:
                    break
    assert len(samples) >= 40  # 50 Hz of wall time
    assert all(s.state == codec.ControllerState.ARMED_READY for s in samples)
    assert all(s.fault_code == codec.FaultCode.NONE for s in samples)
    assert all(s.ports[0].emitting for s in samples)
    device_s = (samples[-1].device_time_us - samples[0].device_time_us) / 1e6
    assert device_s == pytest.approx(TIME_SCALE * (arrivals[-1] - arrivals[0]), rel=0.2)
    stats = client.stats
    assert stats.heartbeat_failures == 0 and stats.reply_timeouts == 0
    assert stats.heartbeats_sent >= 18
    assert stats.rtt_ms.max_ms is not None and stats.rtt_ms.max_ms < 100
    stopped = await client.emit_stop(1)
    assert stopped.stop_reason == codec.StopReason.HOST_STOP


async def test_closing_stops_the_heartbeat_and_the_watchdog_acts(sim: Simulator, url: str) -> None:
    first = await open_controller(url, telemetry_hz=20)
    try:
        await arm_ready(first)
        await first.emit_start(emission())
    finally:
        await first.close()
    # With no heartbeat the controller latches the watchdog fault by itself.
    await wait_until(lambda: sim.snapshot()["state"] == codec.ControllerState.FAULT)

    second = await open_controller(url, telemetry_hz=20)
    try:
        sample = await next_telemetry(second, lambda t: True)
        assert sample.state == codec.ControllerState.FAULT
        assert sample.fault_code == codec.FaultCode.WATCHDOG
        counters = await second.get_counters(1)  # ICD §5: counters survive the host
        assert counters.last_stop_reason == codec.StopReason.WATCHDOG
        assert counters.delivered_uj > 0
        await second.clear_fault()
        sample = await next_telemetry(second, lambda t: t.state == codec.ControllerState.STANDBY)
    finally:
        await second.close()


async def test_dropped_link_is_reported(sim: Simulator, url: str) -> None:
    """TCP and USB: the connection closes (the device is gone), a link loss.
    A serial line cannot close: it goes silent, and what the host sees is
    heartbeat replies missing."""
    client = await open_controller(url, telemetry_hz=50)
    lost: list[LinkClosed] = []
    timeouts: list[ReplyTimeout] = []
    client.add_link_lost_listener(lost.append)
    client.add_reply_timeout_listener(timeouts.append)
    try:
        sim.faults.drop_link()
        if not url.startswith("/dev/"):
            await wait_until(lambda: bool(lost))
            assert not client.heartbeat_running
            with pytest.raises(LinkClosed):
                await client.ping()
        else:
            await wait_until(lambda: client.stats.heartbeat_failures >= 3)
            assert len(timeouts) >= 3 and lost == []
            assert all(isinstance(t.request, codec.Ping) for t in timeouts)
    finally:
        await client.close()
    # Reopening the line (or reconnecting) brings the controller back.
    again = await open_controller(url, telemetry_hz=50)
    try:
        assert (await again.ping()).device_time_us > 0
    finally:
        await again.close()


async def test_missing_and_late_replies(sim: Simulator, client: ControllerClient) -> None:
    sim.faults.drop_replies(True)
    with pytest.raises(ReplyTimeout):
        await client.get_counters(2)
    sim.faults.drop_replies(False)
    sim.faults.reply_delay(150)
    with pytest.raises(ReplyTimeout):
        await client.get_counters(2)
    await wait_until(lambda: client.stats.late_replies >= 1)
    sim.faults.reply_delay(0)
    assert (await client.get_counters(2)).port == 2


async def test_corrupted_frames_are_dropped_and_counted(
    sim: Simulator, client: ControllerClient
) -> None:
    sim.faults.corrupt_frames(0.3)
    before = client.stats.telemetry_rx
    await wait_until(lambda: client.stats.telemetry_rx >= before + 15)
    sim.faults.corrupt_frames(0.0)
    stats = client.stats
    assert stats.dropped_total > 0
    assert stats.unexpected_replies == 0
    assert (await client.ping()).device_time_us > 0
