"""ICD §5 watchdog: wall time, only while armed or emitting, fault 1, stop reason 5.

Silence is the behaviour under test here, so these tests do wait out wall-clock
intervals: by not sending, and measuring when the controller reacts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from . import pbmlink_peer as pl
from .harness import PROBE_PORT, PROBE_PULSED, W660, Rig, new_token, stop_record
from .pbmlink_peer import Ack, Nak, PeerTimeout

RigFactory = Callable[..., Awaitable[Rig]]
WATCHDOG_S = 0.250
# How late after 250 ms of silence the controller may react (its own polling, a busy host).
LATENESS_S = 0.150


async def _go_silent_and_wait_for_expiry(rig: Rig) -> tuple[pl.Event, float, int]:
    """Stop sending; return the WATCHDOG_EXPIRED event, the measured silence, and the
    index in the stream where the silence began."""
    peer = rig.peer
    start = peer.mark()
    peer.set_heartbeat(False)
    rec = await peer.wait_for(
        lambda r: isinstance(r.message, pl.Event) and r.message.code == pl.EV_WATCHDOG_EXPIRED,
        after=start,
        timeout_s=3.0,
        what="WATCHDOG_EXPIRED",
    )
    silence_s = rec.wall_s - peer.last_tx_s
    assert isinstance(rec.message, pl.Event)
    return rec.message, silence_s, start


@pytest.mark.parametrize("scale", [1, 60])
async def test_watchdog_stops_emission_latches_fault_1_and_reports_the_silence(
    rig_factory: RigFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(1, W660, 500_000)
    await rig.start(PROBE_PORT, 905, 100_000, **PROBE_PULSED)
    event, silence_s, at = await _go_silent_and_wait_for_expiry(rig)

    # Wall time at every time scale: not 250 ms of device time, not 250 ms × scale.
    assert WATCHDOG_S - 0.005 <= silence_s <= WATCHDOG_S + LATENESS_S, f"silence {silence_s:.3f} s"
    assert event.port == 0, "the watchdog is the controller's, port 0"
    # Value: the milliseconds of silence (wall time, like watchdog_ms).
    assert 250 <= event.value <= silence_s * 1000 + 20, (
        f"value {event.value} ms, silence {silence_s:.3f} s"
    )

    fault = await peer.wait_event(pl.EV_FAULT, value=pl.FAULT_WATCHDOG, after=at)
    assert fault.port == 0
    for port in (1, PROBE_PORT):
        await peer.wait_event(pl.EV_EMISSION_ENDED, port=port, value=pl.SR_WATCHDOG, after=at)

    peer.set_heartbeat(True)
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.FAULTED, pl.FAULT_WATCHDOG)
    assert not any(p.emitting for p in t.ports)
    for port in (1, PROBE_PORT):
        await stop_record(rig, port, pl.SR_WATCHDOG)

    # Latched: refused until CLEAR_FAULT, then ARM again from standby.
    assert await peer.emit_start(2, W660, 1000) == Nak(pl.NAK_FAULT)
    assert await peer.arm(new_token()) == Nak(pl.NAK_FAULT)
    assert await peer.disarm() == Ack()  # always accepted, but not a way out of state 3
    assert (await peer.wait_telemetry()).state == pl.FAULTED
    assert await peer.clear_fault() == Ack()
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.STANDBY, 0)
    assert await peer.arm(new_token()) == Ack()
    assert (await peer.wait_telemetry()).state in (pl.DELAY, pl.READY)


async def test_watchdog_runs_while_armed_without_emission(rig_factory: RigFactory) -> None:
    # Time scale 1: the silence falls inside the 2 s emission delay (state 1).
    rig = await rig_factory(1)
    assert await rig.peer.arm(new_token()) == Ack()
    assert (await rig.peer.wait_telemetry()).state == pl.DELAY
    _event, silence_s, at = await _go_silent_and_wait_for_expiry(rig)
    assert WATCHDOG_S - 0.005 <= silence_s <= WATCHDOG_S + LATENESS_S
    await rig.peer.wait_event(pl.EV_FAULT, value=pl.FAULT_WATCHDOG, after=at)
    assert rig.peer.events(0, pl.EV_EMISSION_ENDED) == [], "nothing was emitting"
    rig.peer.set_heartbeat(True)
    assert (await rig.peer.wait_telemetry()).fault_code == pl.FAULT_WATCHDOG


@pytest.mark.parametrize("scale", [1, 60])
async def test_silence_in_standby_latches_nothing(rig_factory: RigFactory, scale: int) -> None:
    rig = await rig_factory(scale)
    peer = rig.peer
    peer.set_heartbeat(False)
    start = peer.mark()
    await asyncio.sleep(2 * WATCHDOG_S + LATENESS_S)  # the silence under test
    silent_for_s = time.monotonic() - peer.last_tx_s
    await peer.request(pl.PING)
    assert silent_for_s >= 2 * WATCHDOG_S, f"the host was silent for only {silent_for_s:.3f} s"
    assert peer.events(start, pl.EV_WATCHDOG_EXPIRED) == []
    assert peer.events(start, pl.EV_FAULT) == []
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.STANDBY, 0)
    assert await peer.arm(new_token()) == Ack()


async def test_ping_every_100_ms_keeps_the_watchdog_fed(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    await rig.start(1, W660, 200_000)
    start = peer.mark()
    peer.set_heartbeat(True, interval_s=0.1)
    await asyncio.sleep(1.0)  # ten heartbeat periods: the behaviour under test
    assert peer.events(start, pl.EV_WATCHDOG_EXPIRED) == []
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.READY, 0) and t.port(1).emitting


async def test_invalid_frames_do_not_feed_the_watchdog(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    peer.set_heartbeat(False)
    await peer.request(pl.PING)
    last_valid_s = peer.last_tx_s
    start = peer.mark()
    bad = bytearray(pl.build_body(pl.PING, 0x4242))
    bad[-1] ^= 0xFF
    while True:  # a bad-CRC PING every 50 ms until the controller gives up on us
        await peer.send_raw(pl.frame_bytes(bytes(bad)))
        try:
            event = await peer.wait_event(pl.EV_WATCHDOG_EXPIRED, after=start, timeout_s=0.05)
        except PeerTimeout:
            assert peer.last_tx_s - last_valid_s < 2.0, "no WATCHDOG_EXPIRED within 2 s"
            continue
        break
    rec = next(r for r in peer.received[start:] if r.message == event)
    assert WATCHDOG_S - 0.005 <= rec.wall_s - last_valid_s <= WATCHDOG_S + LATENESS_S


async def test_any_valid_frame_feeds_the_watchdog(rig_factory: RigFactory) -> None:
    """Not only PING: a valid frame that is refused (unknown type, wrong length) feeds it too."""
    rig = await rig_factory(60)
    peer = rig.peer
    await rig.arm_ready()
    peer.set_heartbeat(False)
    start = peer.mark()
    began = peer.last_tx_s
    refused = [(0x42, b""), (pl.GET_COUNTERS, b"\x01\x02")]
    i = 0
    while peer.last_tx_s - began < 4 * WATCHDOG_S:  # a second of refused requests, 50 ms apart
        msg_type, payload = refused[i % 2]
        i += 1
        rec = await peer.request(msg_type, payload)
        assert isinstance(rec.message, Nak)
        await asyncio.sleep(0.05)
    assert peer.events(start, pl.EV_WATCHDOG_EXPIRED) == []
    t = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.READY, 0)
