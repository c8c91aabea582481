"""The engine killed mid-emission: the controller's watchdog stops the light, and an
engine started afterwards closes the session from the controller's counters,
with no dose lost from the record and none emitted twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from fixtures.sim_process import SimProcess

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.engine import Engine, StartRefused
from pbmd.daemon.services.records import RecordStore
from pbmd.drivers import codec
from pbmd.drivers.client import open_controller

CHILD = Path(__file__).with_name("crash_engine_child.py")
WATCHDOG_BOUND_S = 0.25 + 0.1
"""ICD §5: 250 ms (wall) without a host frame; plus the snapshot poll and process exit."""


async def test_engine_killed_mid_emission_is_reconciled(tmp_path: Path) -> None:
    db = tmp_path / "records.sqlite3"
    async with SimProcess(time_scale=60.0) as sim:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CHILD),
            sim.url,
            str(db),
            stdout=asyncio.subprocess.PIPE,
            # the child imports the shared fixtures (tests/fixtures), as pytest does
            env={**os.environ, "PYTHONPATH": str(CHILD.parent.parent)},
        )
        try:
            assert child.stdout is not None
            session_id = ""
            commits_after = 0
            while commits_after < 3:  # a few commits of a running dose, then the crash
                line = (await asyncio.wait_for(child.stdout.readline(), 20.0)).decode().split()
                assert line, "the engine child exited early"
                if line[0] == "emitting":
                    session_id = line[1]
                elif line[0] == "progress" and session_id:
                    commits_after += 1
            running = await sim.snapshot()
            assert running["ports"][0]["emitting"] and running["ports"][3]["emitting"]
            child.send_signal(signal.SIGKILL)
            await child.wait()
            t_kill = time.monotonic()
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()

        # The controller's own watchdog stops every port.
        snap = await sim.until(
            lambda s: (
                s["fault"] == codec.FaultCode.WATCHDOG
                and not any(p["emitting"] or p["light_on"] for p in s["ports"])
            ),
            2.0,
        )
        assert time.monotonic() - t_kill <= WATCHDOG_BOUND_S
        counted = {}
        for port in (1, 4):
            p = snap["ports"][port - 1]
            assert p["counters"]["last_stop_reason"] == codec.StopReason.WATCHDOG
            assert p["counters"]["session_delivered_uj"] == p["delivered_uj"] > 0
            counted[port] = p["delivered_uj"]

        store = await RecordStore.open(db, min_free_bytes=0)
        client = await open_controller(sim.url, telemetry_hz=50)
        handle = ControllerHandle("main", client)
        try:
            before = await store.get_session(session_id)
            assert before is not None and before["ended_utc"] is None
            recorded = {e["port"]: e["controller_energy_uj"] or 0 for e in before["emissions"]}
            # The record lags the light by up to a commit interval: the counters hold the rest.
            assert all(recorded[p] < counted[p] for p in (1, 4)), (recorded, counted)

            engine = Engine(PortMap.single(handle), store, telemetry_hz=50)
            assert await engine.reconcile() == [session_id]
            after = await store.get_session(session_id)
            assert after is not None
            assert after["outcome"] == "interrupted" and after["stop_cause_code"] == "E902"
            for port in (1, 4):
                rows = [e for e in after["emissions"] if e["port"] == port]
                assert sum(e["controller_energy_uj"] for e in rows) == counted[port]
                (host_row,) = [e for e in rows if e["origin"] == "host"]
                assert host_row["controller_energy_source"] == "counters"
                assert host_row["controller_energy_uj"] == counted[port]
                assert host_row["stop_reason"] == "watchdog"
                (step,) = [s for s in after["steps"] if s["port"] == port]
                assert step["delivered_controller_j"] == pytest.approx(counted[port] / 1e6)
                assert step["outcome"] == "interrupted"
            assert any(e["kind"] == "reconciled" for e in after["events"])

            # Nothing was emitted again, and nothing will be until a person acts:
            # the watchdog fault stays latched and a new session is refused.
            await handle.next_sample(2.0)
            later = await sim.snapshot()
            for port in (1, 4):
                p = later["ports"][port - 1]
                assert not p["emitting"]
                assert p["counters"]["session_delivered_uj"] == counted[port]
            assert later["state_name"] == "fault"
            with pytest.raises(StartRefused, match="latched fault"):
                engine.check_ready()
            assert await engine.reconcile() == []  # already closed
        finally:
            await store.close()
            handle.detach()
            await client.close()
