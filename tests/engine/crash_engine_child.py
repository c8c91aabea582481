"""Child process of the crash test: an engine that runs a session against `pbmd sim`
and is killed (SIGKILL) by the parent in the middle of an emission.

Prints ``emitting <session_id>`` once both ports emit and the session's start is
on disk, then ``progress`` after each records commit, and runs until killed.
Usage: crash_engine_child.py LINK_URL RECORDS_PATH
"""

from __future__ import annotations

import asyncio
import logging
import sys

import structlog

# run as a script: its own directory is on sys.path
from engine_rig import pad_step, probe_step, protocol  # type: ignore[import-not-found]

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.engine import Engine, SessionRequest
from pbmd.daemon.core.session import SessionEvent
from pbmd.daemon.services.records import RecordStore
from pbmd.drivers.client import open_controller
from pbmd.protocols.loader import parse_protocol
from pbmd.protocols.plan import plan

PROTOCOL = protocol(
    {
        1: [pad_step(fluence=6.0, max_time_s=1800)],
        4: [probe_step(power_mw=10.0, energy_j=4.0, max_time_s=480)],
    },
    protocol_id="crash-test",
)


async def main(url: str, path: str) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    client = await open_controller(url, telemetry_hz=50)
    handle = ControllerHandle("main", client)
    store = await RecordStore.open(path, sync_interval_s=0.2, min_free_bytes=0)
    engine = Engine(PortMap.single(handle), store, telemetry_hz=50)
    emitting: set[int] = set()
    ready = asyncio.Event()

    def on_event(ev: SessionEvent) -> None:
        session = engine.session
        if ev.kind == "port_waiting" and "confirm placement" in ev.message:
            assert session is not None and ev.port is not None
            asyncio.get_running_loop().call_soon(session.confirm, ev.port)
        if ev.kind == "emission_started" and ev.port is not None:
            emitting.add(ev.port)
            if emitting == {1, 4}:
                ready.set()

    engine.add_listener(on_event)
    store.add_commit_listener(lambda n: print("progress", n, flush=True))
    loaded = parse_protocol(PROTOCOL)
    await handle.next_sample(2.0)
    session = await engine.start_session(
        SessionRequest(
            plan=plan(loaded.protocol, engine.port_map.applicators()),
            patient_ref="P-CRASH",
            contraindications={},
            contraindicated_by_protocol=frozenset(
                c.value for c in loaded.protocol.contraindications
            ),
        )
    )
    await ready.wait()
    await store.sync()
    print("emitting", session.id, flush=True)
    await session.wait()  # never: the parent kills this process first


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
