"""After a trip whose cause may still be present and that the controller does not
latch, no session starts until an operator acknowledges that cause by its code."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from engine_rig import Rig, is_msg, pad_step, protocol

from pbmd.daemon.core.engine import CommandRefused, StartRefused
from pbmd.daemon.core.safety import ACKNOWLEDGE_BEFORE_RESTART, TripCause
from pbmd.daemon.core.session import SessionState
from pbmd.drivers import codec

LONG = protocol({1: [pad_step(fluence=6.0, max_time_s=1800)]})
SHORT = protocol({1: [pad_step(fluence=0.04, max_time_s=60)]})


def _events(path: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY seq")]
    finally:
        conn.close()


def test_the_list_is_data_next_to_the_registry() -> None:
    codes = {c.code for c in ACKNOWLEDGE_BEFORE_RESTART}
    assert {"E104", "E105", "E201", "E202", "E203"} <= codes
    # Latched by the controller, or read again at every start: gated elsewhere.
    assert TripCause.CONTROLLER_FAULT not in ACKNOWLEDGE_BEFORE_RESTART
    assert TripCause.STUCK_EMISSION not in ACKNOWLEDGE_BEFORE_RESTART


async def test_power_deviation_needs_acknowledgement(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(LONG)
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        await rig.next_samples(3)
        rig.sim.faults.power_factor(1, 0.7)
        assert await asyncio.wait_for(session.wait(), 10.0) is SessionState.FAULTED
        assert session.cause_code == "E104"
        rig.sim.faults.clear()

        # Refused before anything goes on the wire, naming the cause and the command.
        arms = len([m for _, m in rig.rx.items if isinstance(m, codec.Arm)])
        short, short_loaded = rig.plan(SHORT)
        with pytest.raises(StartRefused) as refused:
            await rig.start(short, short_loaded)
        message = str(refused.value)
        assert refused.value.cause is TripCause.POWER_DEVIATION
        assert "E104" in message and "pbmctl session acknowledge E104" in message
        assert len([m for _, m in rig.rx.items if isinstance(m, codec.Arm)]) == arms

        # The wrong code does not open the gate.
        with pytest.raises(CommandRefused, match="E104"):
            rig.engine.acknowledge("E105", "alice", "checked")
        with pytest.raises(StartRefused):
            await rig.start(short, short_loaded)

        done = rig.engine.acknowledge("E104", "alice", "applicator cleaned and recalibrated")
        assert done.user == "alice" and done.session_id == session.id
        with pytest.raises(CommandRefused, match="nothing to acknowledge"):
            rig.engine.acknowledge("E104", "alice", "again")

        second = await rig.start(short, short_loaded)
        assert await asyncio.wait_for(second.wait(), 30.0) is SessionState.COMPLETED
        assert rig.rx.find(is_msg(codec.EmitStart)) is not None

        await rig.store.sync()
        (ack,) = [e for e in _events(rig.store.path) if e["kind"] == "trip_acknowledged"]
        assert ack["code"] == "E104"
        assert ack["session_id"] == session.id
        data = json.loads(str(ack["data_json"]))
        assert data["user"] == "alice"
        assert data["note"] == "applicator cleaned and recalibrated"
        assert ack["utc"]


async def test_an_operator_abort_needs_no_acknowledgement(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(LONG)
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        await session.abort("test")
        assert rig.engine.acknowledgements.awaiting is None
        rig.engine.check_ready()


def test_the_document_says_which_causes_need_acknowledgement() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "stop-causes.md"
    marked = {
        cells[0]
        for line in doc.read_text(encoding="utf-8").splitlines()
        if line.startswith("| E") and line.count("|") == 6
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
        if cells[3] == "yes"
    }
    assert marked == {c.code for c in ACKNOWLEDGE_BEFORE_RESTART}
