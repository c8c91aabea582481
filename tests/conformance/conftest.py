"""Fixtures of the PBM-Link conformance suite: simulator processes, peers, control clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from .harness import ControlClient, Rig, SimProcess, handshake, start_sim
from .pbmlink_peer import PbmLinkPeer

SimFactory = Callable[..., SimProcess]
RigFactory = Callable[..., Awaitable[Rig]]
PeerFactory = Callable[..., Awaitable[PbmLinkPeer]]


def _stop_all(sims: list[SimProcess]) -> None:
    for sim in sims:
        sim.stop()


@pytest.fixture
def sim_factory() -> Iterator[SimFactory]:
    """Starts `pbmd sim` processes; each is SIGTERMed and reaped at teardown."""
    sims: list[SimProcess] = []

    def factory(time_scale: float = 60.0, *extra: str) -> SimProcess:
        sim = start_sim(time_scale, *extra)
        sims.append(sim)
        return sim

    yield factory
    _stop_all(sims)


@pytest.fixture(scope="module", params=[1, 60], ids=lambda s: f"x{s}")
def shared_sim(request: pytest.FixtureRequest) -> Iterator[SimProcess]:
    """One simulator per module and time scale, for tests that change no state."""
    sim = start_sim(float(request.param))
    yield sim
    sim.stop()


@pytest.fixture
async def connect() -> AsyncIterator[PeerFactory]:
    """Opens peers on a simulator's link; closes them and checks what they saw."""
    peers: list[PbmLinkPeer] = []

    async def factory(sim: SimProcess, *, heartbeat: bool = True) -> PbmLinkPeer:
        peer = await PbmLinkPeer.connect(sim.link_host, sim.link_port, heartbeat=heartbeat)
        peers.append(peer)
        return peer

    yield factory
    for peer in peers:
        await peer.close()
    violations = [v for peer in peers for v in peer.violations]
    if violations:
        pytest.fail("controller frames that break ICD §2/§4:\n" + "\n".join(violations[:20]))


@pytest.fixture
async def control() -> AsyncIterator[Callable[[SimProcess], Awaitable[ControlClient]]]:
    clients: list[ControlClient] = []

    async def factory(sim: SimProcess) -> ControlClient:
        client = await ControlClient.connect(sim.control_host, sim.control_port)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def rig_factory(
    sim_factory: SimFactory,
    connect: PeerFactory,
    control: Callable[[SimProcess], Awaitable[ControlClient]],
) -> RigFactory:
    """A fresh simulator (state matters) with a handshaken peer and a control client."""

    async def factory(time_scale: float = 60.0, *extra: str, telemetry_hz: int = 100) -> Rig:
        sim = sim_factory(time_scale, *extra)
        peer = await connect(sim)
        info, ports = await handshake(peer, telemetry_hz)
        return Rig(sim, peer, await control(sim), info, ports)

    return factory


@pytest.fixture
async def shared_rig(
    shared_sim: SimProcess,
    connect: PeerFactory,
    control: Callable[[SimProcess], Awaitable[ControlClient]],
) -> Rig:
    peer = await connect(shared_sim)
    info, ports = await handshake(peer)
    return Rig(shared_sim, peer, await control(shared_sim), info, ports)
