"""ICD §5/§5a counters: session sums per token, and counters surviving a host reconnect."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from . import pbmlink_peer as pl
from .harness import W660, W830, Rig, handshake, new_token, set_interlock, stop_record
from .pbmlink_peer import Ack, Counters, PbmLinkPeer, Stopped

RigFactory = Callable[..., Awaitable[Rig]]
PeerFactory = Callable[..., Awaitable[PbmLinkPeer]]


async def _counters(peer: PbmLinkPeer, port: int) -> Counters:
    c = await peer.get_counters(port)
    assert isinstance(c, Counters), f"GET_COUNTERS {port} answered {c}"
    assert c.port == port
    return c


async def _emit_and_stop(rig: Rig, port: int, wavelength_nm: int, power_uw: int) -> Stopped:
    await rig.start(port, wavelength_nm, power_uw)
    await rig.peer.wait_telemetry(lambda t: t.port(port).delivered_uj > 0)
    running = await _counters(rig.peer, port)
    assert running.emitting == 1 and running.delivered_uj > 0
    stopped = await rig.peer.emit_stop(port)
    assert isinstance(stopped, Stopped) and stopped.delivered_uj > 0
    return stopped


@pytest.mark.parametrize("scale", [1, 60])
async def test_session_sums_follow_the_token(rig_factory: RigFactory, scale: int) -> None:
    rig = await rig_factory(scale, fresh=True)  # never armed: token 0
    peer = rig.peer
    t1, t2 = new_token(), new_token()
    assert await _counters(peer, 1) == Counters(1, 0, 0, 0, 0, 0, 0)
    assert await peer.arm(t1) == Ack()
    c = await _counters(peer, 1)
    assert (c.session_token, c.emitting, c.last_stop_reason, c.session_delivered_uj) == (
        t1,
        0,
        0,
        0,
    )
    await rig.arm_ready(t1)

    # A running emission is in the counters, and in the session sum.
    await rig.start(1, W660, 500_000)
    await peer.wait_telemetry(lambda t: t.port(1).delivered_uj > 0)
    c = await _counters(peer, 1)
    assert (c.session_token, c.emitting, c.last_stop_reason) == (t1, 1, 0)
    assert c.delivered_uj > 0
    assert c.session_delivered_uj >= c.delivered_uj
    s1 = await peer.emit_stop(1)
    assert isinstance(s1, Stopped)
    c = await _counters(peer, 1)
    assert (c.emitting, c.delivered_uj, c.duration_ms, c.last_stop_reason) == (
        0, s1.delivered_uj, s1.duration_ms, pl.SR_HOST_STOP,
    )  # fmt: skip
    assert c.session_delivered_uj == s1.delivered_uj

    # DISARM, then ARM with the same token: the sum continues.
    assert await peer.disarm() == Ack()
    await rig.arm_ready(t1)
    s2 = await _emit_and_stop(rig, 1, W830, 300_000)
    c = await _counters(peer, 1)
    assert c.session_token == t1
    assert c.session_delivered_uj == s1.delivered_uj + s2.delivered_uj

    # A new token while armed: ACKed, no new delay, the sum starts at zero.
    arm = await peer.request(pl.ARM, t2.to_bytes(4, "little"))
    assert arm.message == Ack()
    assert (await peer.wait_telemetry(after=arm.index)).state == pl.READY
    c = await _counters(peer, 1)
    assert (c.session_token, c.session_delivered_uj) == (t2, 0)
    assert (c.delivered_uj, c.last_stop_reason) == (s2.delivered_uj, pl.SR_HOST_STOP), (
        "delivered_uj is still the last emission's"
    )
    s3 = await _emit_and_stop(rig, 1, W660, 200_000)
    assert (await _counters(peer, 1)).session_delivered_uj == s3.delivered_uj
    other = await _counters(peer, 2)
    assert (other.session_token, other.session_delivered_uj, other.last_stop_reason) == (t2, 0, 0)


async def test_same_token_after_an_interlock_continues_the_sum(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    peer = rig.peer
    t1 = new_token()
    await rig.arm_ready(t1)
    s1 = await _emit_and_stop(rig, 2, W660, 400_000)
    await rig.start(2, W660, 400_000)
    await peer.wait_telemetry(lambda t: t.port(2).delivered_uj > 0)
    start = peer.mark()
    await set_interlock(rig, "remote", run=False)
    await peer.wait_event(pl.EV_EMISSION_ENDED, port=2, value=pl.SR_INTERLOCK, after=start)
    s2 = await stop_record(rig, 2, pl.SR_INTERLOCK)
    await set_interlock(rig, "remote", run=True)
    await peer.wait_telemetry(lambda t: bool(t.interlocks & pl.IL_REMOTE))
    await rig.arm_ready(t1)
    c = await _counters(peer, 2)
    assert c.session_token == t1
    assert c.session_delivered_uj == s1.delivered_uj + s2.delivered_uj


@pytest.mark.parametrize("scale", [1, 60])
async def test_counters_survive_a_host_reconnect(
    rig_factory: RigFactory, connect: PeerFactory, scale: int
) -> None:
    rig = await rig_factory(scale)
    first = rig.peer
    t1 = new_token()
    await rig.arm_ready(t1)
    await rig.start(1, W660, 400_000)
    await first.wait_telemetry(lambda t: t.port(1).delivered_uj > 0)

    # A new connection replaces the old one; state and counters carry over.
    second = await connect(rig.sim)
    await handshake(second)
    await asyncio.wait_for(first.eof.wait(), 2.0)  # the old connection is closed
    c = await _counters(second, 1)
    assert (c.session_token, c.emitting) == (t1, 1) and c.delivered_uj > 0
    t = await second.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.READY, 0) and t.port(1).emitting

    # The control channel drops the link; a quick reconnect finds the emission running.
    await rig.control.call("drop_link")
    await asyncio.wait_for(second.eof.wait(), 2.0)
    third = await connect(rig.sim)
    await handshake(third)
    c2 = await _counters(third, 1)
    assert (c2.session_token, c2.emitting) == (t1, 1) and c2.delivered_uj > c.delivered_uj

    # The host is gone for longer than the watchdog: the controller stops the emission,
    # and the next host learns from COUNTERS what was delivered while it was away.
    await third.close()
    await asyncio.sleep(0.5)  # the absence under test (2 × watchdog_ms)
    fourth = await connect(rig.sim)
    await handshake(fourth)
    c3 = await _counters(fourth, 1)
    assert (c3.session_token, c3.emitting, c3.last_stop_reason) == (t1, 0, pl.SR_WATCHDOG)
    assert c3.delivered_uj >= c2.delivered_uj
    assert c3.session_delivered_uj == c3.delivered_uj
    t = await fourth.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.FAULTED, pl.FAULT_WATCHDOG)
    assert t.port(1).delivered_uj == c3.delivered_uj
    assert await fourth.emit_stop(1) == Stopped(1, c3.delivered_uj, c3.duration_ms, pl.SR_WATCHDOG)
