"""Fixtures: simulators and hosts that are closed however a test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pbmd.hw_sim import SimConfig, Simulator

from .host import PtyHost, TcpHost, TestHost


@dataclass
class Rig:
    sim: Simulator
    url: str
    host: TcpHost


@dataclass
class Lab:
    """Opens simulators and hosts for one test and closes all of them afterwards."""

    sims: list[Simulator] = field(default_factory=list)
    hosts: list[TestHost] = field(default_factory=list)

    async def sim(self, time_scale: float = 60.0, **config: Any) -> Simulator:
        sim = Simulator(SimConfig(time_scale=time_scale, **config))
        self.sims.append(sim)
        await sim.start()
        return sim

    async def tcp(self, url: str) -> TcpHost:
        host = await TcpHost.connect(url)
        self.hosts.append(host)
        return host

    def pty(self, path: str) -> PtyHost:
        host = PtyHost(path)
        self.hosts.append(host)
        return host

    async def rig(
        self,
        time_scale: float = 60.0,
        *,
        telemetry_hz: int = 100,
        heartbeat: bool = True,
        armed: bool = False,
        **config: Any,
    ) -> Rig:
        """A simulator on TCP with a handshaken host (heartbeat on, optionally armed)."""
        sim = await self.sim(time_scale, **config)
        url = await sim.listen_tcp("127.0.0.1", 0)
        host = await self.tcp(url)
        await host.handshake(telemetry_hz)
        if heartbeat:
            host.heartbeat()
        if armed:
            await host.arm_ready()
        return Rig(sim, url, host)

    async def close(self) -> None:
        for host in self.hosts:
            await host.close()
        for sim in self.sims:
            await sim.close()


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        await lab.close()
