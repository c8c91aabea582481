"""A link lost while an emission ran: its controller energy is recorded as provisional
(the last sample, a lower bound) until the controller's counters replace it; and a
records database of the previous schema opens, migrated."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pbmd.daemon.core.reconciliation import GAVE_UP, reconcile_sessions
from pbmd.daemon.services.records import RecordStore
from pbmd.daemon.services.records.records_courses import COURSE_TABLES
from pbmd.daemon.services.records.schema import SCHEMA, SCHEMA_VERSION, SKIN_TYPE_COLUMN
from pbmd.daemon.services.report import build_report, render_text
from pbmd.drivers import codec

from . import synthetic as syn

TOKEN = 0xC0FFEE  # synthetic.session_start's session token


def write_cut(store: RecordStore, session_id: str) -> int:
    """Port 1 completed 660 nm (720.2 J), then the link was cut during 830 nm: the last
    sample said 299.5 J. The probe on port 4 completed. Returns the cut emission's seq."""
    store.session_started(syn.session_start(session_id))
    syn.run_step(store, session_id, syn.PAD_660, syn.T0_S + 10, host_j=720.0, ctrl_j=720.2)
    syn.run_step(store, session_id, syn.PROBE_905, syn.T0_S + 10, host_j=4.0, ctrl_j=4.001)
    store.step_started(syn.step_start(session_id, syn.PAD_830, syn.T0_S + 420))
    seq = store.emission_started(session_id, 1, syn.emit_request(syn.PAD_830), device_time_us=0)
    store.emission_progress(seq, host_energy_uj=300e6, controller_energy_uj=299.5e6)
    store.emission_ended(
        seq,
        host_stop_cause="E203 link lost",
        host_energy_uj=300e6,
        controller_energy_uj=299.5e6,
        provisional=True,
    )
    store.step_ended(
        session_id, 1, 1, outcome="faulted", stop_cause_code="E203", delivered_controller_j=299.5
    )
    store.session_ended(session_id, outcome="faulted", stop_cause_code="E203")
    return seq


class FakeClient:
    """GET_COUNTERS as a controller answers it; records what was asked."""

    def __init__(self, counters: dict[int, codec.Counters]) -> None:
        self.counters = counters
        self.asked: list[int] = []

    async def get_counters(self, device_port: int) -> codec.Counters:
        self.asked.append(device_port)
        return self.counters[device_port]

    async def all_off(self) -> None:
        raise AssertionError("nothing emits here")


def port_map(client: FakeClient) -> Any:
    ctrl = SimpleNamespace(client=client)
    return {p: SimpleNamespace(controller=ctrl, device_port=p) for p in client.counters}


def counters(port: int, delivered_uj: int, session_uj: int, token: int = TOKEN) -> codec.Counters:
    return codec.Counters(
        port=port,
        session_token=token,
        emitting=0,
        delivered_uj=delivered_uj,
        duration_ms=117_000,
        last_stop_reason=int(codec.StopReason.WATCHDOG),
        session_delivered_uj=session_uj,
    )


async def test_provisional_energy_is_marked_then_replaced_by_the_counters(
    store: RecordStore,
) -> None:
    seq = write_cut(store, "cut")
    await store.sync()

    s = await store.get_session("cut")
    assert s is not None
    em = {e["seq"]: e for e in s["emissions"]}[seq]
    assert em["controller_energy_source"] == "provisional"
    assert em["controller_energy_uj"] == 299_500_000 and em["duration_ms"] is None
    assert [r["id"] for r in await store.sessions_to_reconcile()] == ["cut"]
    assert await store.unfinished_sessions() == []  # closed: only its dose waits
    report = build_report(s)
    step = next(t for t in report.steps if (t.port, t.step_index) == (1, 1))
    assert step.controller_channel_final is False
    assert step.emissions[-1].controller_energy_final is False
    assert report.controller_channel_final is False
    text = render_text(report)
    assert "provisional (lower bound)" in text and "PROVISIONAL" in text

    # The link is back: port 1 counted 720.2 J + 318.2 J since ARM, the last emission
    # 318.2 J (the watchdog stopped it); port 4 its 4.001 J.
    client = FakeClient(
        {1: counters(1, 318_200_000, 1_038_400_000), 4: counters(4, 4_001_000, 4_001_000)}
    )
    unreconciled: dict[str, str] = {"cut": "waiting"}
    assert await reconcile_sessions(store, port_map(client), unreconciled) == ["cut"]
    assert unreconciled == {} and sorted(client.asked) == [1, 4]

    s = await store.get_session("cut")
    assert s is not None
    em = {e["seq"]: e for e in s["emissions"]}[seq]
    assert em["controller_energy_source"] == "counters"
    assert em["controller_energy_uj"] == 318_200_000 and em["duration_ms"] == 117_000
    # Nothing lost, nothing twice: each port's rows add up to its session total.
    for port, total in ((1, 1_038_400_000), (4, 4_001_000)):
        rows = [e for e in s["emissions"] if e["port"] == port]
        assert sum(e["controller_energy_uj"] for e in rows) == total
        assert all(e["origin"] == "host" for e in rows)
    steps = {(t["port"], t["step_index"]): t for t in s["steps"]}
    assert abs(steps[(1, 1)]["delivered_controller_j"] - 318.2) < 1e-9
    assert steps[(1, 1)]["emitting_time_s"] == 117.0
    assert steps[(1, 1)]["outcome"] == "faulted" and s["outcome"] == "faulted"
    assert abs(steps[(1, 0)]["delivered_controller_j"] - 720.2) < 1e-9
    assert [e["kind"] for e in s["events"]] == ["reconciled"]
    report = build_report(s)
    assert report.controller_channel_final is True
    assert all(t.controller_channel_final for t in report.steps)
    assert "PROVISIONAL" not in render_text(report)
    assert await store.sessions_to_reconcile() == []
    # Settled once: a later reconnection asks nothing.
    assert await reconcile_sessions(store, port_map(client), {}) == []


async def test_an_emission_that_never_started_gets_nothing_from_the_counters(
    store: RecordStore,
) -> None:
    """The link died between EMIT_START and its execution: the controller's last emission
    on the port is the previous one, already recorded; it is not counted twice."""
    seq = write_cut(store, "cut")
    await store.sync()
    client = FakeClient(
        {1: counters(1, 720_200_000, 720_200_000), 4: counters(4, 4_001_000, 4_001_000)}
    )
    assert await reconcile_sessions(store, port_map(client), {}) == ["cut"]
    s = await store.get_session("cut")
    assert s is not None
    em = {e["seq"]: e for e in s["emissions"]}[seq]
    assert em["controller_energy_source"] == "counters" and em["controller_energy_uj"] == 0
    assert sum(e["controller_energy_uj"] for e in s["emissions"] if e["port"] == 1) == 720_200_000


async def test_counters_of_another_session_leave_the_figure_provisional_said_once(
    store: RecordStore,
) -> None:
    seq = write_cut(store, "cut")
    await store.sync()
    client = FakeClient({1: counters(1, 5, 5, token=1), 4: counters(4, 5, 5, token=1)})
    assert await reconcile_sessions(store, port_map(client), {}) == ["cut"]
    s = await store.get_session("cut")
    assert s is not None
    em = {e["seq"]: e for e in s["emissions"]}[seq]
    assert em["controller_energy_source"] == "provisional"
    assert em["controller_energy_uj"] == 299_500_000
    assert [e["kind"] for e in s["events"]] == [GAVE_UP]
    assert build_report(s).controller_channel_final is False
    assert await store.sessions_to_reconcile() == []


def _version_1(db: Path) -> None:
    """A records file as pbmd wrote it at schema version 1 (no 'provisional' source)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    for statement in SCHEMA:
        if statement in COURSE_TABLES:  # version 5
            continue
        conn.execute(
            statement.replace(
                "'stopped', 'provisional', 'counters'", "'stopped', 'counters'"
            ).replace(",\n        " + SKIN_TYPE_COLUMN, "")
        )
    conn.execute(
        "INSERT INTO emissions (seq, session_id, port, started_utc, controller_energy_uj, "
        "controller_energy_source) VALUES (7, 'old', 1, '2024-05-01T10:00:00.000000Z', 5, "
        "'stopped')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    try:
        conn.execute("UPDATE emissions SET controller_energy_source = 'provisional' WHERE seq = 7")
        raise AssertionError("a version 1 file refuses the new source")
    except sqlite3.IntegrityError:
        conn.rollback()
    conn.close()


async def test_a_version_1_database_opens_migrated(db_path: Path) -> None:
    _version_1(db_path)
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    try:
        conn = sqlite3.connect(db_path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        # 3 -> 4: the skin type column, empty for the sessions recorded before it
        assert "skin_type" in {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
        assert conn.execute(
            "SELECT seq, controller_energy_uj, controller_energy_source FROM emissions"
        ).fetchall() == [(7, 5, "stopped")]
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "emissions_session" in indexes
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        seq = write_cut(store, "cut")
        await store.sync()
        assert seq > 7  # new rows follow the old ones
        s = await store.get_session("cut")
        assert s is not None
        assert {e["seq"]: e for e in s["emissions"]}[seq]["controller_energy_source"] == (
            "provisional"
        )
    finally:
        await store.close()
    # Opened again: already at the current version, nothing migrates twice.
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    await store.close()
