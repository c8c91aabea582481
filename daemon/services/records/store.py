"""The records store: the core's `RecordSink` over SQLite, and its life cycle and health.

Write calls only queue (see `writer` for the thread that commits); ``await
sync()`` is the durability barrier; reads come from `RecordReads`.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future as ThreadFuture
from dataclasses import replace
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

import structlog

from pbmd.daemon.core.recording import (
    EmissionStarted,
    Event,
    PortReconciled,
    Record,
    RecordSink,
    RecordsUnavailable,
    UtcTime,
)
from pbmd.daemon.services.records.reads import RecordReads
from pbmd.daemon.services.records.rows import Write, outbox_published, write_of
from pbmd.daemon.services.records.schema import utc_text
from pbmd.daemon.services.records.writer import (
    Barrier,
    Call,
    Close,
    Health,
    Item,
    Retry,
    StoreStats,
    Writer,
)
from pbmd.drivers.listeners import Listeners

log = structlog.get_logger()

DEFAULT_SYNC_INTERVAL_S = 1.0
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024
DEFAULT_BUSY_TIMEOUT_S = 5.0

FailureCallback = Callable[[BaseException], None]
T = TypeVar("T")


class StoreOptions(TypedDict, total=False):
    """How `RecordStore.open` may be tuned (each has a default)."""

    on_failure: FailureCallback | None
    """Called on the event loop when records can no longer be written."""
    sync_interval_s: float
    """The longest a record waits for its commit (DEFAULT_SYNC_INTERVAL_S)."""
    min_free_bytes: int
    """Below this much free space new sessions are refused (DEFAULT_MIN_FREE_BYTES)."""
    busy_timeout_s: float
    """How long a connection waits for a lock (DEFAULT_BUSY_TIMEOUT_S)."""
    integrity_check: bool
    """Run ``PRAGMA quick_check`` when opening (default True)."""


class RecordStore(RecordReads, RecordSink):
    """The treatment records. Open with ``await RecordStore.open(path, ...)``.

    Writes (``write(record)`` and the keyword calls `RecordSink` builds from the
    records) are synchronous and only enqueue; call them from the event loop
    thread. ``await sync()`` is the durability barrier. Reads are async.
    """

    def __init__(self, path: str | os.PathLike[str], **options: Unpack[StoreOptions]) -> None:
        sync_interval_s = options.get("sync_interval_s", DEFAULT_SYNC_INTERVAL_S)
        if sync_interval_s <= 0:
            raise ValueError("sync_interval_s must be > 0")
        self.path = Path(path).expanduser().absolute()
        self.on_failure = options.get("on_failure")
        self.sync_interval_s = float(sync_interval_s)
        self.min_free_bytes = int(options.get("min_free_bytes", DEFAULT_MIN_FREE_BYTES))
        self._busy_timeout_s = options.get("busy_timeout_s", DEFAULT_BUSY_TIMEOUT_S)
        self._integrity_check = options.get("integrity_check", True)
        # Writes only append here (atomic, no thread wake-up); control items also
        # kick the writer awake. One deque keeps writes and barriers in call order.
        self._items: collections.deque[Item] = collections.deque()
        self._kick = threading.Event()
        self._health = Health()
        self._health_lock = threading.Lock()
        self._stats = StoreStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._writer: Writer | None = None
        self._closed = False
        self._close_future: asyncio.Future[None] | None = None
        self._emission_seq_iter: Iterator[int] = itertools.count(1)
        self._commit_listeners: Listeners[int] = Listeners("records commit", log=log)

    # ----------------------------------------------------------------- life cycle

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], **options: Unpack[StoreOptions]
    ) -> RecordStore:
        """Open (creating the directory and schema if needed) and start the writer thread.

        Raises RecordsCorrupt for a file that is not a usable records database
        and RecordsUnavailable when it cannot be opened at all.
        """
        store = cls(path, **options)
        await store._start()
        return store

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        opened: ThreadFuture[int] = ThreadFuture()
        self._writer = Writer(self, opened)
        self._thread = threading.Thread(
            target=self._writer.run, name=f"pbmd-records-writer:{self.path.name}", daemon=True
        )
        self._thread.start()
        try:
            next_seq = await asyncio.wrap_future(opened)
        except BaseException:
            # Failed, or cancelled while opening: make sure the thread ends either way.
            self._closed = True
            self._control(Close(None))
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        self._emission_seq_iter = itertools.count(next_seq)
        atexit.register(self._close_at_exit)

    async def close(self) -> None:
        """Write everything pending, checkpoint, and join the writer thread.

        Raises RecordsUnavailable if records could still not be written; they
        are then dumped to the log (the last place left to keep them).
        """
        if self._thread is None:
            return
        if self._close_future is None:
            self._closed = True
            assert self._loop is not None
            self._close_future = self._loop.create_future()
            self._control(Close(self._close_future))
        try:
            await asyncio.shield(self._close_future)
        finally:
            thread = self._thread
            if thread is not None:
                await asyncio.to_thread(thread.join)
                self._thread = None
                atexit.unregister(self._close_at_exit)

    async def __aenter__(self) -> RecordStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _close_at_exit(self) -> None:
        """Interpreter exit without close(): still write what is pending."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._closed = True
        self._control(Close(None))
        thread.join(timeout=10.0)

    # ----------------------------------------------------------------- health

    @property
    def healthy(self) -> bool:
        with self._health_lock:
            return self._health.healthy

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the writer's counters."""
        s = self._stats
        return StoreStats(
            s.enqueued, s.written, s.commits, s.failed_commits, s.rejected, s.coalesced, s.held
        )

    @property
    def free_bytes(self) -> int | None:
        """Free space on the records filesystem as last measured by the writer."""
        with self._health_lock:
            return self._health.free_bytes

    def check_ready(self) -> None:
        """Refuse a new session (RecordsUnavailable) if its records could not be kept.

        Never touches the disk: the writer thread measures free space at least
        every ``sync_interval_s``.
        """
        if self._closed or self._thread is None:
            raise RecordsUnavailable(
                f"The records store {self.path} is closed; treatment records cannot be "
                "written. Restart pbmd."
            )
        with self._health_lock:
            health = replace(self._health)
        if not health.healthy:
            raise RecordsUnavailable(self._failure_message(health))
        free = health.free_bytes
        if free is not None and free < self.min_free_bytes:
            raise RecordsUnavailable(
                f"Only {free / 1e6:.1f} MB are free on the filesystem of {self.path.parent}, "
                f"below the configured minimum of {self.min_free_bytes / 1e6:.1f} MB for "
                f"treatment records. Free disk space there before starting a session."
            )

    def _failure_message(self, health: Health) -> str:
        held = self._stats.held
        return (
            f"Treatment records cannot be written: {health.what}. {health.fix} "
            f"{held} record(s) are held in memory and will be written as soon as a write "
            f"succeeds (retried automatically every {self.sync_interval_s:g} s). "
            "New sessions are refused until then."
        )

    # ----------------------------------------------------------------- writes (enqueue only)

    def _put(self, item: Write) -> None:
        if self._closed:
            raise RecordsUnavailable(
                f"The records store {self.path} is closed; record {item.label!r} was not kept."
            )
        self._stats.enqueued += 1
        self._items.append(item)

    def _control(self, item: Item) -> None:
        self._items.append(item)
        self._kick.set()

    def write(self, record: Record) -> int | str | None:
        """Queue one record (O(1), no I/O on the caller's thread).

        Answers an `EmissionStarted` or `PortReconciled` with the number of the
        emission row it makes (unique in the database, increasing in start order),
        an `Event` with its id, anything else with None.
        """
        if isinstance(record, EmissionStarted | PortReconciled):
            seq = next(self._emission_seq_iter)
            self._put(write_of(record, seq))
            return seq
        self._put(write_of(record))
        return record.event_id if isinstance(record, Event) else None

    async def outbox_mark_published(self, event_ids: Sequence[str], utc: UtcTime = None) -> None:
        """Mark events as published; returns once that is durable."""
        if event_ids:
            self._put(outbox_published(list(event_ids), utc_text(utc)))
        await self.sync()

    # ----------------------------------------------------------------- barrier, retry

    async def sync(self) -> None:
        """Resolve when everything enqueued before this call is committed to disk.

        Raises RecordsUnavailable if that commit failed (the records stay held).
        """
        if self._closed:
            raise RecordsUnavailable(f"The records store {self.path} is closed.")
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._control(Barrier(future))
        await future

    def retry(self, *, recreate: bool = False) -> None:
        """Try to write the held records now (after the operator fixed the disk).

        With ``recreate`` a missing records directory or file is created anew
        (with the schema); otherwise only the existing file is reopened.
        """
        if not self._closed:
            self._control(Retry(recreate))

    async def debug_limit_pages(self, extra_pages: int | None) -> int:
        """Test hook: cap the database at its current size + ``extra_pages`` pages
        (``PRAGMA max_page_count``), a deterministic full disk; None lifts the cap.
        Returns the cap in force."""

        def apply(conn: sqlite3.Connection) -> int:
            if extra_pages is None:
                row = conn.execute("PRAGMA max_page_count = 4294967294").fetchone()
            else:
                pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
                row = conn.execute(f"PRAGMA max_page_count = {pages + int(extra_pages)}").fetchone()
            return int(row[0])

        return int(await self._call(apply))

    async def transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer's connection in one transaction with foreign keys
        enforced, after everything queued before it is committed: the rows the clinic
        writes itself (patients, courses, outcomes), which must refer to committed
        sessions and must say at once when they are refused. Returns fn's result;
        fn's exception rolls the transaction back and is raised here."""
        await self.sync()

        def run(conn: sqlite3.Connection) -> T:
            conn.execute("PRAGMA foreign_keys = ON")
            factory, conn.row_factory = conn.row_factory, sqlite3.Row
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                conn.row_factory = factory
            conn.execute("COMMIT")
            return result

        result = await self._call(run)
        self._notify_commit(1)
        return result

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on a read-only connection in a worker thread, on one snapshot."""
        return await self._read(fn)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RecordsUnavailable(f"The records store {self.path} is closed.")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._control(Call(fn, future))
        result: T = await future
        return result

    # ----------------------------------------------------------------- loop-side callbacks

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the event loop; silently skipped once the loop is gone."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    @staticmethod
    def _resolve(future: asyncio.Future[Any], error: BaseException | None, result: Any) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def add_commit_listener(self, listener: Callable[[int], None]) -> Callable[[], None]:
        """Call ``listener(records_written)`` on the event loop after every commit
        (status displays, metrics, tests that wait for the periodic commit);
        returns a remover."""
        return self._commit_listeners.add(listener)

    def _notify_commit(self, written: int) -> None:
        self._commit_listeners(written)

    def _notify_failure(self, error: BaseException) -> None:
        callback = self.on_failure
        if callback is None:
            return
        try:
            callback(error)
        except Exception:
            log.exception("records.on_failure_callback_failed")
