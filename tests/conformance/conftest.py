"""Fixtures of the PBM-Link conformance suite: simulator processes, peers, control clients.

Every peer speaks to the simulator over TCP and, a second time, over the USB link:
the simulator as a device on a simulated USB bus, opened through pyusb by the
driver's USB link, with a loopback relay so that the independent peer keeps its
own byte stream (see ``UsbRelay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from pbmd.drivers import usb as usb_link
from pbmd.drivers.transport import Link, open_link
from pbmd.hw_sim.usb_backend import SimulatedUsbBackend, SimulatedUsbDevice

from .harness import (
    Baseline,
    ControlClient,
    Rig,
    SimPool,
    SimProcess,
    handshake,
    reset_to_baseline,
    take_baseline,
)
from .pbmlink_peer import PbmLinkPeer

SimFactory = Callable[..., SimProcess]
RigFactory = Callable[..., Awaitable[Rig]]
PeerFactory = Callable[..., Awaitable[PbmLinkPeer]]


def _stop_all(sims: list[SimProcess]) -> None:
    for sim in sims:
        sim.stop()


@pytest.fixture(scope="session")
def sim_pool() -> Iterator[SimPool]:
    pool = SimPool()
    yield pool
    pool.close()


@pytest.fixture
def sim_factory(sim_pool: SimPool) -> Iterator[SimFactory]:
    """Fresh `pbmd sim` processes; each is SIGTERMed and reaped at teardown."""
    sims: list[SimProcess] = []

    def factory(time_scale: float = 60.0, *extra: str) -> SimProcess:
        sim = sim_pool.take(float(time_scale), *extra)
        sims.append(sim)
        return sim

    yield factory
    _stop_all(sims)


@pytest.fixture(scope="module", params=[1, 60], ids=lambda s: f"x{s}")
def shared_sim(request: pytest.FixtureRequest, sim_pool: SimPool) -> Iterator[SimProcess]:
    """One simulator per module and time scale, for tests that change no state."""
    sim = sim_pool.take(float(request.param))
    yield sim
    sim.stop()


_buses = itertools.count(1)


class UsbRelay:
    """A loopback TCP port whose bytes travel over a USB link to the simulator.

    Each relay has a simulated bus of its own with one device on it (VID:PID
    1209:0001) that reaches the simulator's TCP port; the driver's USB link
    opens it with pyusb, and the relay copies bytes between its one TCP client
    (the peer) and that link, both ways, until either side ends.
    """

    def __init__(self, sim: SimProcess) -> None:
        self.bus = f"conformance-{next(_buses)}"
        self.backend = SimulatedUsbBackend()
        self.device = self.backend.attach(
            SimulatedUsbDevice(f"socket://{sim.link_host}:{sim.link_port}", "PBM-SIM-0001")
        )
        self.server: asyncio.Server | None = None
        self.link: Link | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        usb_link.register_backend(self.bus, self.backend)
        self.link = await open_link(f"usb://1209:0001?backend={self.bus}")
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = self.link
        assert link is not None
        up = asyncio.create_task(self._to_device(reader, link))
        down = asyncio.create_task(self._to_peer(link, writer))
        self.tasks |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    @staticmethod
    async def _to_device(reader: asyncio.StreamReader, link: Link) -> None:
        while chunk := await reader.read(65536):
            await link.write(chunk)

    @staticmethod
    async def _to_peer(link: Link, writer: asyncio.StreamWriter) -> None:
        while chunk := await link.read():
            writer.write(chunk)
            await writer.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.link is not None:
            await self.link.close()
        if self.server is not None:
            await self.server.wait_closed()
        usb_link.unregister_backend(self.bus)


@pytest.fixture(params=["tcp", "usb"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[PeerFactory]:
    """Opens peers on a simulator's link, TCP or USB; closes them and checks what they saw."""
    peers: list[PbmLinkPeer] = []
    relays: list[UsbRelay] = []

    async def factory(sim: SimProcess, *, heartbeat: bool = True) -> PbmLinkPeer:
        host, port = sim.link_host, sim.link_port
        if request.param == "usb":
            relay = UsbRelay(sim)
            relays.append(relay)
            host, port = await relay.start()
        peer = await PbmLinkPeer.connect(host, port, heartbeat=heartbeat)
        peers.append(peer)
        return peer

    yield factory
    for peer in peers:
        await peer.close()
    for relay in relays:
        await relay.close()
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


@dataclass
class ModuleSim:
    sim: SimProcess
    baseline: Baseline


@pytest.fixture(scope="module")
def module_sims() -> Iterator[dict[float, ModuleSim]]:
    """One reusable simulator per time scale for the tests of a module."""
    sims: dict[float, ModuleSim] = {}
    yield sims
    for entry in sims.values():
        entry.sim.stop()


@pytest.fixture
async def rig_factory(
    sim_pool: SimPool,
    sim_factory: SimFactory,
    module_sims: dict[float, ModuleSim],
    connect: PeerFactory,
    control: Callable[[SimProcess], Awaitable[ControlClient]],
) -> RigFactory:
    """A simulator in its start-up state, with a handshaken peer and a control client.

    `fresh=True` (or extra command-line arguments) starts a new process for the test;
    otherwise the module's simulator for that time scale is reset to its start-up
    baseline (and replaced by a new process if that does not bring it back).
    Counters are the one thing a reset cannot undo: tests use their own session tokens.
    """

    async def factory(
        time_scale: float = 60.0, *extra: str, telemetry_hz: int = 100, fresh: bool = False
    ) -> Rig:
        scale = float(time_scale)
        if fresh or extra:
            sim = sim_factory(scale, *extra)
        else:
            entry = module_sims.get(scale)
            if entry is not None:
                problem = await reset_to_baseline(
                    await connect(entry.sim), await control(entry.sim), entry.baseline
                )
                if problem:
                    warnings.warn(f"replacing a simulator left unclean: {problem}", stacklevel=1)
                    entry.sim.stop()
                    entry = None
            if entry is None:
                sim = sim_pool.take(scale)
                first = await connect(sim)
                _info, ports = await handshake(first)
                entry = module_sims[scale] = ModuleSim(sim, await take_baseline(first, ports))
            sim = entry.sim
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
