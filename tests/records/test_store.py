"""The records store: round trips, WAL, the barrier, batching, reconciliation, outbox,
opening and closing."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sqlite3
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from pbmd.daemon.services.records import (
    SCHEMA_VERSION,
    RecordsCorrupt,
    RecordStore,
    RecordsUnavailable,
    utc_text,
)
from pbmd.drivers import codec

from . import synthetic as syn
from .conftest import writer_threads

TIMEOUT_S = 10.0


def raw(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read with a connection of the test's own, outside the store."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


def wal_bytes(path: Path) -> int | None:
    wal = f"{path}-wal"
    return os.path.getsize(wal) if os.path.exists(wal) else None


# ----------------------------------------------------------------------------- round trips


async def test_round_trip_of_a_whole_session(store: RecordStore) -> None:
    syn.write_completed(store, "s-1")
    await store.sync()

    s = await store.get_session("s-1")
    assert s is not None
    assert s["protocol_id"] == "chronic-lumbar" and s["protocol_version"] == 3
    assert s["protocol_sha256"] == "a" * 64 and s["plan_hash"] == "b" * 64
    assert s["plan_json"] == '{"ports":{"1":[],"4":[]}}'  # byte for byte: the hash's input
    assert s["signing_key_id"] == "RWTtestkey"
    assert s["contraindications"] == {"epilepsy": False, "pregnancy": False, "cancer": None}
    assert [p["port"] for p in s["ports"]] == [1, 4]
    assert s["ports"][0]["channels_nm"] == [660, 830]
    assert s["session_token"] == 0xC0FFEE and s["time_scale"] == 60.0
    assert s["started_utc"] == utc_text(syn.T0_S) and s["ended_utc"] == utc_text(syn.T0_S + 700)
    assert s["outcome"] == "completed" and s["state"] == "completed"

    steps = {(t["port"], t["step_index"]): t for t in s["steps"]}
    assert list(steps) == [(1, 0), (1, 1), (4, 0)]
    pad = steps[(1, 0)]
    assert pad["delivered_host_j"] == pytest.approx(720.36)
    assert pad["delivered_controller_j"] == pytest.approx(719.64)
    # derived from the controller channel over the beam area
    assert pad["delivered_fluence_j_cm2"] == pytest.approx(719.64 / 180.0)
    assert pad["emitting_time_s"] == pytest.approx(719.64 / 1.8, abs=1e-3)
    assert pad["mean_irradiance_mw_cm2"] == pytest.approx(10.0, rel=1e-4)
    assert pad["outcome"] == "completed"

    assert [e["seq"] for e in s["emissions"]] == sorted(e["seq"] for e in s["emissions"])
    probe = next(e for e in s["emissions"] if e["port"] == 4)
    assert probe["mode"] == "pulsed" and probe["pulse_hz"] == 10_000
    assert probe["energy_budget_uj"] == 4_200_000 and probe["max_duration_ms"] == 24_000
    assert probe["controller_energy_uj"] == 3_998_000 and probe["host_energy_uj"] == 4_002_000
    assert probe["controller_energy_source"] == "stopped"
    assert probe["stop_reason"] == "host_stop" and probe["stop_reason_code"] == 1
    assert probe["host_stop_cause"] == "dose reached"

    assert [e["message"] for e in s["events"]] == ["session running"]
    assert await store.get_session("nope") is None


async def test_list_sessions_newest_first_with_paging_and_since(store: RecordStore) -> None:
    for k in range(5):
        start = syn.session_start(f"s-{k}")
        store.session_started(replace(start, started_utc=syn.T0_S + 100 * k))
    await store.sync()
    ids = [s["id"] for s in await store.list_sessions()]
    assert ids == ["s-4", "s-3", "s-2", "s-1", "s-0"]
    assert [s["id"] for s in await store.list_sessions(limit=2, offset=1)] == ["s-3", "s-2"]
    since = await store.list_sessions(since_utc=syn.T0_S + 250)
    assert [s["id"] for s in since] == ["s-4", "s-3"]
    assert since[0]["steps"] == 0 and "plan_json" not in since[0]


async def test_export_json_and_csv(store: RecordStore) -> None:
    syn.write_completed(store, "s-1")
    syn.write_faulted(store, "s-2")
    await store.sync()

    doc = json.loads(await store.export("json"))
    assert doc["format"] == "pbmd-records" and doc["schema_version"] == SCHEMA_VERSION
    assert [s["id"] for s in doc["sessions"]] == ["s-1", "s-2"]
    assert len(doc["sessions"][1]["events"]) == 1

    rows = list(csv.DictReader(io.StringIO(await store.export("csv"))))
    assert len(rows) == 6  # one per step
    assert {r["session_id"] for r in rows} == {"s-1", "s-2"}
    faulted_830 = next(r for r in rows if r["session_id"] == "s-2" and r["wavelength_nm"] == "830")
    assert faulted_830["step_outcome"] == "faulted"
    assert faulted_830["step_stop_cause_code"] == "E105"
    assert faulted_830["pulse_hz"] == ""  # not recorded: empty, not zero

    one = json.loads(await store.export("json", session_ids=["s-2"]))
    assert [s["id"] for s in one["sessions"]] == ["s-2"]
    with pytest.raises(ValueError):
        await store.export("xml")  # type: ignore[arg-type]


async def test_step_totals_are_summed_from_emissions_when_not_given(store: RecordStore) -> None:
    store.session_started(syn.session_start("s"))
    store.step_started(syn.step_start("s", syn.PAD_660, syn.T0_S))
    for part_j in (300.0, 420.0):  # paused once: two emissions
        seq = store.emission_started("s", 0, syn.emit_request(syn.PAD_660))
        store.emission_ended(
            seq, host_stop_cause="paused" if part_j == 300.0 else "dose reached",
            host_energy_uj=part_j * 1e6 + 100, controller_energy_uj=part_j * 1e6,
            duration_ms=round(part_j / 1.8 * 1000), stop_reason=codec.StopReason.HOST_STOP,
        )
    store.step_ended("s", 1, 0, outcome="completed")
    await store.sync()
    s = await store.get_session("s")
    assert s is not None
    step = s["steps"][0]
    assert step["delivered_controller_j"] == pytest.approx(720.0)
    assert step["delivered_host_j"] == pytest.approx(720.0002)
    assert step["emitting_time_s"] == pytest.approx(400.0, abs=0.01)
    assert step["delivered_fluence_j_cm2"] == pytest.approx(4.0)
    assert step["mean_irradiance_mw_cm2"] == pytest.approx(10.0, rel=1e-4)


async def test_bad_arguments_fail_at_the_call_not_in_the_writer(store: RecordStore) -> None:
    with pytest.raises(ValueError):
        store.session_ended("s", outcome="finished")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.event("x", "y", severity="loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.event("x", "y", utc=datetime(2024, 1, 1))  # naive


async def test_a_record_the_database_refuses_does_not_block_the_others(
    store: RecordStore,
) -> None:
    store.session_started(syn.session_start("dup"))
    await store.sync()
    store.event("before", "kept")
    store.session_started(syn.session_start("dup"))  # primary key violation: a bug
    store.event("after", "kept too")
    await store.sync()
    assert store.healthy and store.stats.rejected == 1
    pending = await store.outbox_pending()
    assert [e["kind"] for e in pending] == ["before", "after"]


# ----------------------------------------------------------------------------- WAL, barrier


async def test_wal_mode_and_full_synchronous(store: RecordStore, db_path: Path) -> None:
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert wal_bytes(db_path) is not None
    # synchronous is per connection: ask the writer's own (2 = FULL)
    assert await store._call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_sync_is_the_barrier(store: RecordStore, db_path: Path) -> None:
    """Nothing is written before the barrier (the interval is an hour); all of it after."""
    store.session_started(syn.session_start("s"))
    ids = [store.event("tick", f"#{k}", session_id="s") for k in range(100)]
    assert await store.get_session("s") is None
    assert raw(db_path, "SELECT COUNT(*) FROM events") == [(0,)]
    await store.sync()
    assert raw(db_path, "SELECT id FROM events ORDER BY seq") == [(i,) for i in ids]
    assert store.stats.commits == 1 and store.stats.written == 101


async def test_commits_at_the_interval_without_a_barrier(db_path: Path) -> None:
    store = await RecordStore.open(db_path, sync_interval_s=0.05, min_free_bytes=0)
    try:
        committed = asyncio.Event()
        written: list[int] = []

        def on_commit(n: int) -> None:
            written.append(n)
            if sum(written) >= 1000:
                committed.set()

        store.add_commit_listener(on_commit)
        for k in range(1000):
            store.event("tick", f"#{k}")
        # no barrier: the writer's own ticks commit the burst, in batches
        await asyncio.wait_for(committed.wait(), TIMEOUT_S)
        assert sum(written) == 1000 and len(written) <= 10
        assert raw(db_path, "SELECT COUNT(*) FROM events") == [(1000,)]
    finally:
        await store.close()


async def test_progress_updates_of_an_emission_coalesce(store: RecordStore) -> None:
    store.session_started(syn.session_start("s"))
    seq = store.emission_started("s", 0, syn.emit_request(syn.PAD_660), device_time_us=0)
    for k in range(1, 1001):
        store.emission_progress(
            seq, host_energy_uj=k * 1000, controller_energy_uj=k * 999, device_time_us=k * 20_000
        )
    await store.sync()
    stats = store.stats
    assert stats.coalesced == 999 and stats.written == 3
    s = await store.get_session("s")
    assert s is not None
    em = s["emissions"][0]
    assert em["host_energy_uj"] == 1_000_000 and em["controller_energy_uj"] == 999_000
    assert em["controller_energy_source"] == "telemetry"
    assert em["progress_device_time_us"] == 20_000_000
    # a progress update never overwrites the end that follows it in the batch
    store.emission_progress(seq, host_energy_uj=5, controller_energy_uj=5)
    store.emission_ended(seq, host_stop_cause="dose reached", host_energy_uj=2e6,
                         controller_energy_uj=2e6, duration_ms=1000, stop_reason=1)
    store.emission_progress(seq, host_energy_uj=7, controller_energy_uj=7)
    await store.sync()
    s = await store.get_session("s")
    assert s is not None
    assert s["emissions"][0]["host_energy_uj"] == 2_000_000
    assert s["emissions"][0]["controller_energy_source"] == "stopped"


async def test_a_burst_of_writes_does_not_stall_the_event_loop(store: RecordStore) -> None:
    """10 000 records: enqueueing costs microseconds each, and the commit of the whole
    batch (on the writer thread) leaves the loop ticking."""
    store.session_started(syn.session_start("s"))
    seq = store.emission_started("s", 0, syn.emit_request(syn.PAD_660))
    gaps_s: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps_s.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    enqueue_s = 0.0
    for burst in range(100):
        t0 = time.perf_counter()
        for k in range(100):
            n = burst * 100 + k
            if k % 2:
                store.emission_progress(seq, host_energy_uj=n, controller_energy_uj=n)
            else:
                store.event("burst", f"record {n}", session_id="s", data={"n": n})
        enqueue_s += time.perf_counter() - t0
        await asyncio.sleep(0)
    t0 = time.perf_counter()
    await store.sync()
    commit_s = time.perf_counter() - t0
    await asyncio.sleep(0.01)
    stop.set()
    await tick

    per_write_us = enqueue_s / 10_000 * 1e6
    longest_ms = max(gaps_s) * 1e3
    print(f"enqueue {per_write_us:.1f} us/record, commit {commit_s * 1e3:.0f} ms, "
          f"longest loop stall {longest_ms:.1f} ms over {len(gaps_s)} ticks")
    # O(1) enqueueing. A commit on the loop thread would stall it for the whole commit
    # (hundreds of ms for 10 000 records on a busy CI box); here the loop keeps ticking.
    # The bound is loose because a machine saturated by other processes deschedules the
    # loop thread now and then whatever it runs (seen: ~15 ms alone, up to ~220 ms
    # with parallel test suites on 2 cores); the figure is printed for the record.
    assert per_write_us < 200
    assert longest_ms < 250
    assert store.stats.commits == 1
    s = await store.get_session("s")
    assert s is not None
    assert [e["data"]["n"] for e in s["events"]] == list(range(0, 10_000, 2))
    assert s["emissions"][0]["host_energy_uj"] == 9_999


# ----------------------------------------------------------------------------- crash, reconcile


async def test_unfinished_sessions_are_reconciled_and_closed_as_interrupted(
    db_path: Path,
) -> None:
    """The daemon died mid-session: port 1's 830 nm emission was running (its record has
    the last progress only), and the probe's emission on port 4 never made it to disk."""
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    syn.write_completed(store, "done")
    store.session_started(syn.session_start("s"))
    syn.run_step(store, "s", syn.PAD_660, syn.T0_S + 10, host_j=720.0, ctrl_j=720.2)
    store.step_started(syn.step_start("s", syn.PAD_830, syn.T0_S + 420))
    seq = store.emission_started("s", 1, syn.emit_request(syn.PAD_830), device_time_us=0)
    store.emission_progress(seq, host_energy_uj=300e6, controller_energy_uj=299.5e6,
                            device_time_us=111_000_000)
    store.step_started(syn.step_start("s", syn.PROBE_905, syn.T0_S + 10))
    await store.sync()
    await store.close()

    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    try:
        unfinished = await store.unfinished_sessions()
        assert [u["id"] for u in unfinished] == ["s"]
        row = unfinished[0]
        assert row["session_token"] == 0xC0FFEE
        open_emissions = [e for e in row["emissions"] if e["ended_utc"] is None]
        assert [e["seq"] for e in open_emissions] == [seq]

        # What GET_COUNTERS said after the restart:
        # port 1: this emission delivered 318.2 J in total (watchdog stopped it), and the
        # port delivered 720.2 + 318.2 J since ARM; port 4: 2.5 J nobody recorded.
        store.reconcile_emission(seq, controller_energy_uj=318_200_000, duration_ms=117_850,
                                 stop_reason=codec.StopReason.WATCHDOG)
        store.reconcile_port("s", 1, controller_session_delivered_uj=1_038_400_000,
                             step_index=1)
        store.reconcile_port("s", 4, controller_session_delivered_uj=2_500_000, step_index=0)
        store.session_ended("s", outcome="interrupted", stop_cause_code="E902",
                            stop_cause_message="daemon restarted during the session")
        await store.sync()

        assert await store.unfinished_sessions() == []
        s = await store.get_session("s")
        assert s is not None
        assert s["outcome"] == "interrupted" and s["stop_cause_code"] == "E902"
        steps = {(t["port"], t["step_index"]): t for t in s["steps"]}
        assert steps[(1, 0)]["outcome"] == "completed"  # closed before: untouched
        assert steps[(1, 1)]["outcome"] == "interrupted"
        assert steps[(1, 1)]["delivered_controller_j"] == pytest.approx(318.2)
        assert steps[(1, 1)]["delivered_host_j"] == pytest.approx(300.0)  # the host's last
        assert steps[(4, 0)]["delivered_controller_j"] == pytest.approx(2.5)
        assert steps[(4, 0)]["delivered_host_j"] is None  # the host never saw it
        em = {e["seq"]: e for e in s["emissions"]}
        assert em[seq]["controller_energy_source"] == "counters"
        assert em[seq]["stop_reason"] == "watchdog" and em[seq]["duration_ms"] == 117_850
        recovered = [e for e in s["emissions"] if e["origin"] == "counters"]
        assert len(recovered) == 1 and recovered[0]["port"] == 4
        assert recovered[0]["controller_energy_uj"] == 2_500_000
        # port 1 is fully accounted for: no extra row; nothing delivered is missing
        total_port1 = sum(e["controller_energy_uj"] for e in s["emissions"] if e["port"] == 1)
        assert total_port1 == 1_038_400_000
        # a completed session is never reported unfinished
        done = await store.get_session("done")
        assert done is not None and done["outcome"] == "completed"
    finally:
        await store.close()


CRASH_CHILD = Path(__file__).with_name("crash_child.py")


@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
async def test_killed_mid_stream_keeps_everything_synced(db_path: Path, how: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CRASH_CHILD), str(db_path), how,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    synced = -1
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)).decode()
            assert line, "child ended before reporting"
            if line.startswith("synced "):
                synced = int(line.split()[1])
                break
        if how == "sigkill":
            proc.kill()
        code = await asyncio.wait_for(proc.wait(), TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == (-9 if how == "sigkill" else 3)
    assert synced == 2000

    assert raw(db_path, "PRAGMA integrity_check") == [("ok",)]
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    try:
        s = await store.get_session("crash")
        assert s is not None
        numbers = [e["data"]["n"] for e in s["events"]]
        # everything synced is there, and what follows is a gap-free prefix of the stream
        assert numbers == list(range(len(numbers))) and len(numbers) >= synced
        em = s["emissions"][0]
        assert em["host_energy_uj"] >= synced and em["ended_utc"] is None
        assert [u["id"] for u in await store.unfinished_sessions()] == ["crash"]
        print(f"{how}: {synced} synced, {len(numbers)} on disk after the kill")
    finally:
        await store.close()


# ----------------------------------------------------------------------------- outbox


async def test_outbox_drains_in_order_and_marks_are_durable(
    store: RecordStore, db_path: Path
) -> None:
    store.session_started(syn.session_start("s"))  # a session's events need its record
    ids = []
    for k in range(10):
        ids.append(store.event("e", f"#{k}", session_id="s" if k % 2 else None))
        if k == 4:
            await store.sync()  # two commits: order still follows the calls
    await store.sync()
    pending = await store.outbox_pending(limit=4)
    assert [e["id"] for e in pending] == ids[:4]
    await store.outbox_mark_published([ids[1], ids[0]])
    assert raw(db_path, "SELECT COUNT(*) FROM outbox WHERE published_utc IS NOT NULL") == [(2,)]
    assert [e["id"] for e in await store.outbox_pending(limit=100)] == ids[2:]
    await store.outbox_mark_published(ids[2:])
    assert await store.outbox_pending() == []
    # every event went into the outbox in the same transaction
    assert raw(db_path, "SELECT COUNT(*) FROM outbox") == [(10,)]


# ----------------------------------------------------------------------------- open, close


async def test_opening_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "records.sqlite3"
    store = await RecordStore.open(path, min_free_bytes=0)
    try:
        assert path.exists()
        store.check_ready()
    finally:
        await store.close()


async def test_a_corrupt_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite3"
    path.write_bytes(b"this is not an SQLite database" * 200)
    with pytest.raises(RecordsCorrupt) as info:
        await RecordStore.open(path)
    assert str(path) in str(info.value) and "Move it aside" in str(info.value)
    assert not writer_threads()


async def test_a_damaged_page_fails_the_integrity_check(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite3"
    store = await RecordStore.open(path, min_free_bytes=0)
    syn.write_completed(store, "s")
    await store.close()
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    for offset in range(page_size + 8, len(data), 97):  # scribble over pages after the first
        data[offset] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecordsCorrupt) as info:
        await RecordStore.open(path)
    assert str(path) in str(info.value)


async def test_another_sqlite_database_or_a_newer_schema_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE photos (x)")
    conn.close()
    with pytest.raises(RecordsCorrupt, match="not a pbmd records database"):
        await RecordStore.open(other)
    newer = tmp_path / "newer.sqlite3"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RecordsCorrupt, match="newer"):
        await RecordStore.open(newer)


async def test_close_flushes_and_joins_and_refuses_later_writes(db_path: Path) -> None:
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    assert len(writer_threads()) == 1
    for k in range(50):
        store.event("e", f"#{k}")
    await store.close()
    assert not writer_threads()
    assert raw(db_path, "SELECT COUNT(*) FROM events") == [(50,)]
    assert not wal_bytes(db_path)  # checkpointed and truncated
    await store.close()  # idempotent
    with pytest.raises(RecordsUnavailable, match="closed"):
        store.event("e", "late")
    with pytest.raises(RecordsUnavailable, match="closed"):
        store.check_ready()
    with pytest.raises(RecordsUnavailable):
        await store.sync()
    # reads still work on a closed store (the file is still there)
    assert len(await store.outbox_pending(limit=100)) == 50


async def test_async_context_manager(db_path: Path) -> None:
    async with await RecordStore.open(db_path, min_free_bytes=0) as store:
        store.event("e", "x")
    assert store.closed and not writer_threads()
    assert raw(db_path, "SELECT COUNT(*) FROM events") == [(1,)]
