"""Fixtures of the records tests: a store in a temporary directory, and a check
that no writer thread outlives its test."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pbmd.daemon.services.records import RecordStore


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pbmd-records-writer")]


@pytest.fixture(autouse=True)
def no_leaked_writer_threads() -> Iterator[None]:
    before = set(writer_threads())
    yield
    leaked = [t for t in writer_threads() if t not in before]
    assert not leaked, f"records writer thread(s) left running: {leaked}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "records" / "records.sqlite3"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[RecordStore]:
    """A store that commits only on sync() (an hour's interval), so tests decide."""
    s = await RecordStore.open(db_path, sync_interval_s=3600.0, min_free_bytes=0)
    try:
        yield s
    finally:
        await s.close()
