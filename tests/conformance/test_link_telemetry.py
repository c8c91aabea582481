"""ICD §5a telemetry timing: rate_hz per wall-clock second, device clock × time scale."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from . import pbmlink_peer as pl
from .harness import Rig

RigFactory = Callable[..., Awaitable[Rig]]
WINDOW_S = 1.0


@pytest.mark.parametrize("rate_hz", [20, 200])
@pytest.mark.parametrize("scale", [1, 60])
async def test_telemetry_rate_is_per_wall_second_and_the_device_clock_runs_scaled(
    rig_factory: RigFactory, scale: int, rate_hz: int
) -> None:
    rig = await rig_factory(scale, telemetry_hz=rate_hz)
    peer = rig.peer
    await peer.wait_telemetry()
    sent0 = time.monotonic()
    pong0 = await peer.request(pl.PING)
    start = peer.mark()
    await asyncio.sleep(WINDOW_S)  # the wall-clock second under test
    end = peer.mark()
    sent1 = time.monotonic()
    pong1 = await peer.request(pl.PING)
    assert isinstance(pong0.message, pl.Pong) and isinstance(pong1.message, pl.Pong)

    frames = [r for r in peer.received[start:end] if isinstance(r.message, pl.Telemetry)]
    wall_s = ((sent1 + pong1.wall_s) - (sent0 + pong0.wall_s)) / 2
    expected = rate_hz * (frames[-1].wall_s - frames[0].wall_s) if len(frames) > 1 else 0
    assert abs(len(frames) - 1 - expected) <= max(2, 0.1 * expected), (
        f"{len(frames)} telemetry frames in {WINDOW_S} s at {rate_hz} Hz, time scale {scale}"
    )
    assert abs(len(frames) - rate_hz * WINDOW_S) <= max(3, 0.1 * rate_hz * WINDOW_S)

    device_s = (pong1.message.device_time_us - pong0.message.device_time_us) / 1e6
    assert abs(device_s / wall_s - scale) <= 0.03 * scale, (
        f"device clock ran {device_s:.3f} s in {wall_s:.3f} s of wall time"
    )
    first, last = frames[0], frames[-1]
    assert isinstance(first.message, pl.Telemetry) and isinstance(last.message, pl.Telemetry)
    sampled_s = (last.message.device_time_us - first.message.device_time_us) / 1e6
    assert abs(sampled_s / (last.wall_s - first.wall_s) - scale) <= 0.05 * scale
    times = [r.message.device_time_us for r in frames if isinstance(r.message, pl.Telemetry)]
    assert times == sorted(times) and len(set(times)) == len(times)
