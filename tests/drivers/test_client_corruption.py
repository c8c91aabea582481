"""The client on a noisy link (ICD §2, §6): the simulator corrupts a fraction of
the frames in each direction, their CRC fails and they are dropped. At 1 % the
link is healthy and nothing faults; at 20 % it is not, and the link faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pbmd.drivers.client import ControllerClient, ReplyTimeout, open_controller
from pbmd.drivers.transport import open_link
from pbmd.hw_sim import SimConfig, Simulator

REQUESTS = 2000
"""Requests in the 1 % run: two thousand frames each way. Telemetry and the
heartbeat are off there, so the simulator's seeded corruption falls on the same
frames in every run (about 20 each way), and the test cannot fail by chance."""

FAULT_BOUND_S = 20.0
"""Failure bound for the 20 % run (it faults in about a second)."""


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(SimConfig(time_scale=1.0, seed=11))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.close()


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[ControllerClient]:
    c = await open_controller(await sim.listen_tcp("127.0.0.1", 0), telemetry_hz=200)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def quiet_client(sim: Simulator) -> AsyncIterator[ControllerClient]:
    """No telemetry, no heartbeat: only the test's own requests on the wire."""
    c = ControllerClient(await open_link(await sim.listen_tcp("127.0.0.1", 0)))
    try:
        await c.handshake(telemetry_hz=0, heartbeat=False)
        yield c
    finally:
        await c.close()


async def test_one_percent_corruption_each_way_is_not_a_link_fault(
    sim: Simulator, quiet_client: ControllerClient
) -> None:
    client = quiet_client
    faults: list[ReplyTimeout] = []
    client.add_reply_timeout_listener(faults.append)
    sim.faults.corrupt_frames(0.01, "both")
    for i in range(REQUESTS):
        assert (await client.get_counters(1 + i % 4)).port == 1 + i % 4
    link = sim.snapshot()["link"]
    sim.faults.corrupt_frames(0.0, "both")
    stats = client.stats
    assert faults == [] and stats.link_faults == 0 and client.is_open
    assert stats.frames_rx + stats.crc_errors >= REQUESTS
    assert link["rx_frames"] + link["rx_dropped_total"] >= REQUESTS
    # Frames were lost both ways, and each one cost a retry, not the link.
    assert link["tx_corrupted"] > 0 and link["rx_corrupted"] > 0
    assert stats.crc_errors == link["tx_corrupted"]
    assert link["rx_dropped"]["crc"] == link["rx_corrupted"]
    assert stats.reply_timeouts > 0


async def test_twenty_percent_corruption_faults_the_link(
    sim: Simulator, client: ControllerClient
) -> None:
    faulted = asyncio.Event()
    client.add_reply_timeout_listener(lambda _e: faulted.set())
    sim.faults.corrupt_frames(0.2, "both")
    async with asyncio.timeout(FAULT_BOUND_S):
        await faulted.wait()
    assert client.stats.link_faults >= 1
