"""A disk that fills or fails: records are held in order and nothing is lost, the engine
is told on the event loop, new sessions are refused with a message that says what to
do, and everything held is written once the condition clears."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from pbmd.daemon.services.records import RecordStore, RecordsUnavailable

from . import synthetic as syn
from .conftest import writer_threads

TIMEOUT_S = 10.0


def events_on_disk(path: Path) -> list[tuple[str, str | None, str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [
            (str(k), None if c is None else str(c), str(m))
            for k, c, m in conn.execute(
                "SELECT e.kind, e.code, e.message FROM outbox o JOIN events e "
                "ON e.id = o.event_id ORDER BY o.seq"
            )
        ]
    finally:
        conn.close()


class FailureSpy:
    """on_failure: records the error and the thread it was called on."""

    def __init__(self) -> None:
        self.calls: list[tuple[BaseException, int]] = []
        self.event = asyncio.Event()

    def __call__(self, exc: BaseException) -> None:
        self.calls.append((exc, threading.get_ident()))
        self.event.set()


async def test_disk_full_holds_records_refuses_sessions_and_writes_all_after(
    db_path: Path,
) -> None:
    spy = FailureSpy()
    store = await RecordStore.open(
        db_path, on_failure=spy, sync_interval_s=3600.0, min_free_bytes=0
    )
    try:
        store.session_started(syn.session_start("s"))
        store.event("before", "written before the disk filled", session_id="s")
        await store.sync()
        store.check_ready()

        await store.debug_limit_pages(0)  # the database may not grow by one page
        for k in range(200):
            store.event("held", f"#{k}", session_id="s", data={"k": k, "pad": "x" * 200})
        with pytest.raises(RecordsUnavailable) as barrier:
            await store.sync()
        assert "is full" in str(barrier.value)

        # (b) the engine is told once, on the event loop's thread
        await asyncio.wait_for(spy.event.wait(), TIMEOUT_S)
        assert len(spy.calls) == 1
        exc, thread_id = spy.calls[0]
        assert thread_id == threading.get_ident()
        assert isinstance(exc, RecordsUnavailable) and isinstance(exc.__cause__, sqlite3.Error)
        assert not store.healthy

        # (c) new sessions are refused, saying what and how to fix it
        with pytest.raises(RecordsUnavailable) as ready:
            store.check_ready()
        message = str(ready.value)
        assert f"the disk holding {db_path} is full" in message
        assert f"Free disk space on the filesystem of {db_path.parent}" in message
        assert "held in memory" in message and "New sessions are refused" in message

        # (a) writes go on being accepted and held, in order; nothing reaches the disk
        for k in range(200, 300):
            store.event("held", f"#{k}", session_id="s", data={"k": k, "pad": "x" * 200})
        with pytest.raises(RecordsUnavailable):
            await store.sync()
        assert len(spy.calls) == 1  # one failure, one notification
        assert store.stats.held == 301  # 300 events + the records.failed event
        assert [k for k, _, _ in events_on_disk(db_path)] == ["before"]

        # the condition clears: retry() writes every held record, in order
        await store.debug_limit_pages(None)
        store.retry()
        await store.sync()
        assert store.healthy and store.stats.held == 0
        store.check_ready()
        on_disk = events_on_disk(db_path)
        assert [m for k, _, m in on_disk if k == "held"] == [f"#{k}" for k in range(300)]
        kinds = [(k, c) for k, c, _ in on_disk]
        assert kinds[0] == ("before", None)
        assert kinds[201] == ("records", "records.failed")  # where the failure happened
        assert kinds[-1] == ("records", "records.recovered")
        assert len(on_disk) == 1 + 300 + 2
    finally:
        await store.close()


async def test_the_next_periodic_commit_recovers_by_itself(db_path: Path) -> None:
    spy = FailureSpy()
    store = await RecordStore.open(
        db_path, on_failure=spy, sync_interval_s=0.05, min_free_bytes=0
    )
    try:
        await store.debug_limit_pages(0)
        for k in range(100):
            store.event("held", f"#{k}", data={"pad": "x" * 300})
        await asyncio.wait_for(spy.event.wait(), TIMEOUT_S)  # the writer's own tick failed
        assert not store.healthy

        written: list[int] = []
        committed = asyncio.Event()

        def on_commit(n: int) -> None:
            written.append(n)
            committed.set()

        store.add_commit_listener(on_commit)
        await store.debug_limit_pages(None)
        await asyncio.wait_for(committed.wait(), TIMEOUT_S)  # no retry(), no sync()
        assert store.healthy
        assert written == [102]  # 100 held + records.failed + records.recovered
        assert [m for k, _, m in events_on_disk(db_path) if k == "held"] == [
            f"#{k}" for k in range(100)
        ]
    finally:
        await store.close()


async def test_removed_directory_is_an_io_failure_until_it_is_restored(
    db_path: Path,
) -> None:
    spy = FailureSpy()
    store = await RecordStore.open(
        db_path, on_failure=spy, sync_interval_s=3600.0, min_free_bytes=0
    )
    try:
        store.event("before", "written")
        await store.sync()
        shutil.rmtree(db_path.parent)  # the open connection would write into a deleted file
        for k in range(20):
            store.event("held", f"#{k}")
        with pytest.raises(RecordsUnavailable, match="was removed while pbmd was running"):
            await store.sync()
        await asyncio.wait_for(spy.event.wait(), TIMEOUT_S)
        with pytest.raises(RecordsUnavailable) as ready:
            store.check_ready()
        assert str(db_path.parent) in str(ready.value) and "recreate" in str(ready.value)

        # retrying without recreate does not conjure up a fresh, empty records file
        store.retry()
        with pytest.raises(RecordsUnavailable, match="cannot be opened"):
            await store.sync()
        # a file where the directory belongs: even recreate fails (an I/O error)
        db_path.parent.write_text("not a directory")
        store.retry(recreate=True)
        with pytest.raises(RecordsUnavailable):
            await store.sync()
        assert not store.healthy and len(spy.calls) == 1

        db_path.parent.unlink()
        store.retry(recreate=True)
        await store.sync()
        assert store.healthy
        store.check_ready()
        on_disk = events_on_disk(db_path)
        assert [m for k, _, m in on_disk if k == "held"] == [f"#{k}" for k in range(20)]
        assert on_disk[-1][1] == "records.recovered"
    finally:
        await store.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
async def test_read_only_directory_is_refused_at_open(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        with pytest.raises(RecordsUnavailable) as info:
            await RecordStore.open(directory / "records.sqlite3")
        assert str(directory) in str(info.value)
    finally:
        directory.chmod(0o755)


async def test_low_free_space_refuses_new_sessions_but_keeps_writing(db_path: Path) -> None:
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=2**62)
    try:
        with pytest.raises(RecordsUnavailable) as info:
            store.check_ready()
        assert "free on the filesystem of" in str(info.value)
        assert str(db_path.parent) in str(info.value) and "Free disk space" in str(info.value)
        assert store.free_bytes is not None and store.free_bytes > 0
        store.event("still", "recorded")  # a running session is not tripped by this
        await store.sync()
        assert store.healthy
    finally:
        await store.close()


async def test_close_while_failing_reports_the_records_it_could_not_keep(
    db_path: Path,
) -> None:
    store = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    await store.debug_limit_pages(0)
    for k in range(50):
        store.event("held", f"#{k}", data={"pad": "x" * 300})
    with pytest.raises(RecordsUnavailable, match=r"51 record\(s\) could not be written"):
        await store.close()
    assert not writer_threads()
