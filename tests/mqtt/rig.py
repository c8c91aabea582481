"""The treatment side of the MQTT tests: hw_sim, the real driver, Engine and RecordStore.

The simulated controller runs in a process of its own (`pbmd sim --realtime`), as a
real controller has a processor of its own: a stall of the test's process is then
the host's lateness, met by the controller's own limits, not a pause of the device.

Protocols are generated small and synthetic (fixtures.protocols.mqtt_protocol,
here as `protocol_text`) so that a whole session runs in about a second at the
simulator's time scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fixtures.protocols import mqtt_protocol
from fixtures.sim_process import SimProcess
from fixtures.simulator import connect, start_simulator

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.engine import Engine, SessionRequest
from pbmd.daemon.core.session import Session
from pbmd.daemon.services.records import RecordStore
from pbmd.drivers import codec
from pbmd.drivers.client import ControllerClient, open_controller
from pbmd.hw_sim import SimConfig, Simulator
from pbmd.protocols.loader import parse_protocol
from pbmd.protocols.plan import Plan, plan

TELEMETRY_HZ = 50

protocol_text = mqtt_protocol


@dataclass
class Rig:
    """A simulated controller behind the real driver, an Engine and its records."""

    sim: SimProcess | Simulator
    client: ControllerClient
    handle: ControllerHandle
    engine: Engine
    store: RecordStore
    records_path: Path
    closed: bool = False

    @classmethod
    async def open(
        cls, directory: Path, *, time_scale: float, seed: int = 7, own_process: bool = True
    ) -> Rig:
        """``own_process=False`` keeps the simulator in this process: for a rig that is
        itself killed with SIGKILL, which would leave a simulator process behind."""
        sim: SimProcess | Simulator
        client: ControllerClient | None = None
        if own_process:
            sim = await SimProcess(time_scale=time_scale, seed=seed).start()
        else:
            sim = await start_simulator(SimConfig(time_scale=time_scale, seed=seed))
        store: RecordStore | None = None
        try:
            if isinstance(sim, SimProcess):
                client = await open_controller(sim.url, telemetry_hz=TELEMETRY_HZ)
            else:
                _, client = await connect(sim, telemetry_hz=TELEMETRY_HZ)
            handle = ControllerHandle("main", client)
            path = directory / "records.sqlite"
            store = await RecordStore.open(path)
            engine = Engine(PortMap.single(handle), store, telemetry_hz=TELEMETRY_HZ)
            store.on_failure = engine.on_records_failure
            await handle.next_sample(5.0)
        except BaseException:
            if store is not None:
                await store.close()
            if client is not None:
                await client.close()
            await _stop(sim)
            raise
        return cls(sim, client, handle, engine, store, path)

    def plan(self, text: str) -> Plan:
        loaded = parse_protocol(text)
        return plan(loaded.protocol, self.engine.port_map.applicators())

    async def start_session(self, text: str) -> Session:
        return await self.engine.start_session(
            SessionRequest(
                plan=self.plan(text),
                patient_ref="patient-0001",
                contraindications={"cancer": False, "pregnancy": False},
            )
        )

    async def device_time_passes(self, duration_s: float, timeout_s: float = 30.0) -> None:
        """Wait until the controller's clock has advanced ``duration_s`` (device time)."""
        t = self.handle.telemetry
        assert t is not None
        target_us = t.device_time_us + duration_s * 1e6
        reached = asyncio.Event()

        def on_sample(sample: codec.Telemetry, _host_s: float) -> None:
            if sample.device_time_us >= target_us:
                reached.set()

        remove = self.handle.add_sample_listener(on_sample)
        try:
            await asyncio.wait_for(reached.wait(), timeout_s)
        finally:
            remove()

    def outbox(self) -> list[tuple[int, str, str | None]]:
        """Every outbox row (seq, event id, published_utc), in order, read from the file."""
        conn = sqlite3.connect(f"{self.records_path.as_uri()}?mode=ro", uri=True)
        try:
            return [
                (int(seq), str(eid), pub)
                for seq, eid, pub in conn.execute(
                    "SELECT seq, event_id, published_utc FROM outbox ORDER BY seq"
                )
            ]
        finally:
            conn.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        session = self.engine.session
        if session is not None and not session.state.final:
            with contextlib.suppress(Exception):
                await session.abort("test teardown")
        await self.store.close()
        self.handle.detach()
        await self.client.close()
        await _stop(self.sim)


async def _stop(sim: SimProcess | Simulator) -> None:
    if isinstance(sim, SimProcess):
        await sim.stop()
    else:
        await sim.close()
