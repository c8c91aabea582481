"""The records writer: one thread that owns the only write connection.

Records reach it through the store's queue; it commits what is pending in
batches, at least every ``sync_interval_s`` while anything is pending and at
once on a barrier (`RecordStore.sync`). When the disk fails or fills nothing is
dropped: the records that could not be committed stay here, in order, and are
retried; the store turns unhealthy and the engine hears of it on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pbmd.daemon.core.recording import Event, RecordsError, RecordsUnavailable, Severity
from pbmd.daemon.services.records.changes import ensure_change_log
from pbmd.daemon.services.records.rows import Write, write_of
from pbmd.daemon.services.records.schema import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    RecordsCorrupt,
    utc_text,
)

if TYPE_CHECKING:
    from pbmd.daemon.services.records.store import RecordStore

log = structlog.get_logger()


@dataclass(slots=True)
class StoreStats:
    """Counters of the writer, for status and tests (a snapshot; see RecordStore.stats)."""

    enqueued: int = 0
    written: int = 0
    commits: int = 0
    failed_commits: int = 0
    rejected: int = 0
    coalesced: int = 0
    held: int = 0


@dataclass(slots=True)
class Barrier:
    future: asyncio.Future[None]


@dataclass(slots=True)
class Retry:
    recreate: bool


@dataclass(slots=True)
class Close:
    future: asyncio.Future[None] | None


@dataclass(slots=True)
class Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


Item = Write | Barrier | Retry | Close | Call

# A record the database refuses on its own (a bug), as opposed to a disk that refuses all.
_BAD_RECORD_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
    OverflowError,
    TypeError,
    ValueError,
)


class _FileGone(OSError):
    """The database file was removed or replaced under the open connection."""


@dataclass(slots=True)
class Health:
    healthy: bool = True
    what: str = ""
    fix: str = ""
    since_utc: str | None = None
    free_bytes: int | None = None
    error: BaseException | None = None


def describe_failure(exc: BaseException, path: Path) -> tuple[str, str, bool]:
    """(what went wrong, how to fix it, whether to reopen the connection)."""
    directory = path.parent
    name = str(getattr(exc, "sqlite_errorname", ""))
    text = str(exc)
    if isinstance(exc, _FileGone):
        return (
            f"{text}",
            f"Restore the records directory {directory} (or the file) from backup, or "
            f"recreate it writable by the pbmd user and retry with recreate.",
            True,
        )
    if name == "SQLITE_FULL" or "disk is full" in text:
        return (
            f"the disk holding {path} is full ({text})",
            f"Free disk space on the filesystem of {directory}.",
            False,
        )
    if name.startswith("SQLITE_IOERR") or isinstance(exc, OSError):
        return (
            f"an I/O error occurred writing {path} ({text})",
            f"Check the disk holding {directory} (kernel log: dmesg), its mount and free space.",
            True,
        )
    if name.startswith("SQLITE_READONLY"):
        return (
            f"{path} is read-only ({text})",
            f"Make {directory} and the files in it writable by the pbmd user and check "
            f"that the filesystem is not mounted read-only.",
            True,
        )
    if name == "SQLITE_CANTOPEN":
        return (
            f"{path} cannot be opened ({text})",
            f"Check that {directory} exists and is writable by the pbmd user.",
            True,
        )
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return (
            f"another process holds the write lock on {path} ({text})",
            "Only one pbmd may use a records directory; stop the other process.",
            False,
        )
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return (
            f"{path} is damaged ({text})",
            "Stop pbmd, move the file aside for investigation and restore it from backup.",
            True,
        )
    return (
        f"writing {path} failed ({type(exc).__name__}: {text})",
        f"Check the disk holding {directory} and the pbmd log.",
        True,
    )


# --------------------------------------------------------------------------- the writer thread


@dataclass(slots=True)
class Pending:
    """Records not yet committed, in enqueue order (held across failures)."""

    writes: list[Write] = field(default_factory=list)
    progress_index: dict[int, int] = field(default_factory=dict)

    def add(self, w: Write, stats: StoreStats) -> None:
        if w.coalesce_key is not None:
            i = self.progress_index.get(w.coalesce_key)
            if i is not None:
                self.writes[i] = w
                stats.coalesced += 1
                return
            self.progress_index[w.coalesce_key] = len(self.writes)
        elif w.label == "emission_ended":
            # a later progress update must not jump ahead of the end it follows
            params = w.statements[0][1]
            if isinstance(params, tuple):  # (..., the emission's seq)
                self.progress_index.pop(int(params[-1]), None)
        self.writes.append(w)

    def clear(self) -> None:
        self.writes.clear()
        self.progress_index.clear()


class Writer:
    """Owns the write connection; runs in its own thread; talks to the loop by posting."""

    def __init__(self, store: RecordStore, opened: ThreadFuture[int]) -> None:
        self.store = store
        self.path = store.path
        self.opened = opened
        self.conn: sqlite3.Connection | None = None
        self.file_id: tuple[int, int] | None = None
        self.default_max_pages: int | None = None
        self.pending = Pending()
        self.next_retry_mono_s = 0.0
        self.next_tick_mono_s = time.monotonic() + store.sync_interval_s
        self.last_free_mono_s = 0.0
        self.failed_at_utc: str | None = None
        self.recreate = False

    # ------------------------------------------------------------- connection

    def connect(self, *, create: bool, first: bool) -> None:
        path = self.path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        uri = path.as_uri() + ("?mode=rwc" if create else "?mode=rw")
        conn = sqlite3.connect(
            uri,
            uri=True,
            isolation_level=None,
            timeout=self.store._busy_timeout_s,
            check_same_thread=True,
        )
        try:
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise RecordsUnavailable(
                    f"{path} cannot be put in WAL mode (journal_mode is {mode}); keep the records "
                    "on a local filesystem."
                )
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=OFF")  # a migration rebuilds tables
            self._ensure_schema(conn)
            ensure_change_log(conn)
            conn.execute("PRAGMA foreign_keys=ON")  # every write from here is checked
            if first and self.store._integrity_check:
                result = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
                if result != ["ok"]:
                    raise RecordsCorrupt(
                        f"{path} failed the integrity check ({'; '.join(result[:3])}). Stop "
                        "pbmd, move the file aside for investigation and restore it from "
                        "backup (or start with an empty records directory)."
                    )
            self.default_max_pages = int(conn.execute("PRAGMA max_page_count").fetchone()[0])
            st = os.stat(path)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.file_id = (st.st_dev, st.st_ino)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        path = self.path
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        if app_id not in (0, APPLICATION_ID):
            raise RecordsCorrupt(
                f"{path} is an SQLite database of another application (application_id "
                f"{app_id:#x}), not pbmd records. Point pbmd at another records directory."
            )
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise RecordsCorrupt(
                f"{path} has records schema version {version}, newer than this pbmd "
                f"understands ({SCHEMA_VERSION}). Upgrade pbmd or point it at another "
                "records directory."
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:
                others = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
                if others:
                    raise RecordsCorrupt(
                        f"{path} is an SQLite database but not a pbmd records database. "
                        "Point pbmd at another records directory or move the file aside."
                    )
                for statement in SCHEMA:
                    conn.execute(statement)
                version = SCHEMA_VERSION
            while version < SCHEMA_VERSION:
                # An older pbmd's records: brought up to date, never refused.
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
            _report_orphans(conn, path)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def drop_connection(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        self.conn = None
        self.file_id = None

    def check_file(self) -> None:
        """The open connection would keep writing into a deleted file; refuse that."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError as exc:
            where = self.path.parent if not self.path.parent.exists() else self.path
            raise _FileGone(
                f"the records {'directory' if where != self.path else 'file'} {where} was "
                "removed while pbmd was running"
            ) from exc
        if (st.st_dev, st.st_ino) != self.file_id:
            raise _FileGone(f"the records file {self.path} was replaced while pbmd was running")

    # ------------------------------------------------------------- thread body

    def run(self) -> None:
        try:
            self.connect(create=True, first=True)
            assert self.conn is not None
            next_seq = int(
                self.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM emissions").fetchone()[0]
            )
            self.refresh_free_space(time.monotonic())
        except BaseException as exc:
            self.drop_connection()
            self.opened.set_exception(self._open_error(exc))
            return
        self.opened.set_result(next_seq)
        while True:
            try:
                if self.step():
                    return
            except Exception as exc:  # never let the writer die: fail loudly, keep records
                log.exception("records.writer_error")
                self.failed(exc)

    def _open_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, RecordsError):
            return exc
        name = str(getattr(exc, "sqlite_errorname", ""))
        # Undecodable schema text and generic DatabaseErrors come from damaged pages too.
        if (
            name in ("SQLITE_NOTADB", "SQLITE_CORRUPT")
            or isinstance(exc, UnicodeDecodeError)
            or type(exc) is sqlite3.DatabaseError
        ):
            err: RecordsError = RecordsCorrupt(
                f"{self.path} is not a usable pbmd records database ({exc}). Move it aside "
                "(keep it for investigation) and start pbmd again to create a new one, or "
                "restore it from backup."
            )
        else:
            what, fix, _ = describe_failure(exc, self.path)
            err = RecordsUnavailable(f"Treatment records cannot be opened: {what}. {fix}")
        err.__cause__ = exc
        return err

    def step(self) -> bool:
        """One turn: sleep until the next tick or a kick, take everything queued, commit
        if due. Ticks come every ``sync_interval_s``, so no record waits longer than
        that; writes never wake the thread, which keeps a burst from ping-ponging the
        GIL between the loop and the writer. Returns True when the store is closed."""
        store = self.store
        interval = store.sync_interval_s
        healthy = store._health.healthy
        deadline = self.next_tick_mono_s if healthy else self.next_retry_mono_s
        store._kick.wait(max(0.0, deadline - time.monotonic()))
        store._kick.clear()
        items: list[Item] = []
        while True:
            try:
                items.append(store._items.popleft())
            except IndexError:
                break

        now = time.monotonic()
        barriers: list[Barrier] = []
        close: Close | None = None
        force = False
        for item in items:
            if isinstance(item, Write):
                self.pending.add(item, store._stats)
            elif isinstance(item, Barrier):
                barriers.append(item)
                force = True
            elif isinstance(item, Retry):
                self.recreate = self.recreate or item.recreate
                force = True
            elif isinstance(item, Close):
                close = item
                force = True
            else:
                self.run_call(item)
        store._stats.held = len(self.pending.writes)

        error: BaseException | None = None
        tick = now >= deadline
        if tick and healthy:
            self.next_tick_mono_s = now + interval
        due = force or tick
        if due and (self.pending.writes or not store._health.healthy):
            error = self.commit()
        for b in barriers:
            store._post(store._resolve, b.future, self.barrier_error(error), None)
        if now - self.last_free_mono_s >= interval:
            self.refresh_free_space(now)
        if close is not None:
            self.finish(close, error)
            return True
        return False

    def barrier_error(self, error: BaseException | None) -> BaseException | None:
        if error is None and self.store._health.healthy:
            return None
        with self.store._health_lock:
            health = replace(self.store._health)
        exc = RecordsUnavailable(self.store._failure_message(health))
        exc.__cause__ = error or health.error
        return exc

    def run_call(self, item: Call) -> None:
        try:
            if self.conn is None:
                raise RecordsUnavailable(f"{self.path} is not open (records are failing)")
            result = item.fn(self.conn)
        except Exception as exc:
            self.store._post(self.store._resolve, item.future, exc, None)
        else:
            self.store._post(self.store._resolve, item.future, None, result)

    # ------------------------------------------------------------- committing

    def commit(self) -> BaseException | None:
        """Commit every pending record in one transaction; on failure keep them all."""
        store = self.store
        writes = list(self.pending.writes)
        recovering = not store._health.healthy
        if recovering:
            writes.append(self._records_event("records.recovered", "info", self._recovery_text()))
        try:
            if self.conn is None:
                create = self.recreate
                self.connect(create=create, first=False)
            self.check_file()
            assert self.conn is not None
            try:
                rejected = self.apply(self.conn, writes, isolate=False)
            except _BAD_RECORD_ERRORS:
                rejected = self.apply(self.conn, writes, isolate=True)
        except Exception as exc:
            store._stats.failed_commits += 1
            self.failed(exc)
            return exc
        self.recreate = False
        for w in rejected:
            store._stats.rejected += 1
            log.error("records.rejected", label=w.label, statements=repr(w.statements))
        store._stats.commits += 1
        store._stats.written += len(writes) - len(rejected)
        self.pending.clear()
        store._stats.held = 0
        if recovering:
            # Healthy before anyone hears of the commit: a listener that checks the
            # store on a commit must not find it still failed.
            with store._health_lock:
                store._health.healthy = True
                store._health.error = None
                store._health.since_utc = None
            log.warning("records.recovered", path=str(self.path), written=len(writes))
            self.failed_at_utc = None
        store._post(store._notify_commit, len(writes) - len(rejected))
        return None

    def apply(
        self, conn: sqlite3.Connection, writes: Sequence[Write], *, isolate: bool
    ) -> list[Write]:
        """Run the writes in one transaction. With ``isolate`` a record the database
        refuses (a bug, not the disk) is left out and returned instead of failing all."""
        rejected: list[Write] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for w in writes:
                if isolate:
                    conn.execute("SAVEPOINT record")
                try:
                    for sql, params in w.statements:
                        conn.execute(sql, params)
                except _BAD_RECORD_ERRORS:
                    if not isolate:
                        raise
                    conn.execute("ROLLBACK TO record")
                    conn.execute("RELEASE record")
                    rejected.append(w)
                    continue
                if isolate:
                    conn.execute("RELEASE record")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return rejected

    def failed(self, exc: BaseException) -> None:
        """Keep the records, turn unhealthy, tell the engine once per failure."""
        store = self.store
        what, fix, reopen = describe_failure(exc, self.path)
        if reopen:
            self.drop_connection()
        self.next_retry_mono_s = time.monotonic() + store.sync_interval_s
        with store._health_lock:
            was_healthy = store._health.healthy
            store._health.healthy = False
            store._health.what = what
            store._health.fix = fix
            store._health.error = exc
            if was_healthy:
                store._health.since_utc = utc_text()
        if not was_healthy:
            store._stats.held = len(self.pending.writes)
            return
        self.failed_at_utc = utc_text()
        log.error(
            "records.failed", path=str(self.path), error=str(exc), held=len(self.pending.writes)
        )
        self.pending.add(
            self._records_event("records.failed", "critical", f"{what}. {fix}"), store._stats
        )
        store._stats.held = len(self.pending.writes)
        with store._health_lock:
            health = replace(store._health)
        error = RecordsUnavailable(store._failure_message(health))
        error.__cause__ = exc
        store._post(store._notify_failure, error)

    def _recovery_text(self) -> str:
        return (
            f"Treatment records are written again; {len(self.pending.writes)} held record(s) "
            f"written (unavailable since {self.failed_at_utc})."
        )

    def _records_event(self, code: str, severity: Severity, message: str) -> Write:
        """The store's own event: records failed, or are written again."""
        data = {"path": str(self.path)}
        return write_of(Event("records", message, code=code, severity=severity, data=data))

    def refresh_free_space(self, now_s: float) -> None:
        self.last_free_mono_s = now_s
        try:
            free: int | None = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = None
        with self.store._health_lock:
            self.store._health.free_bytes = free

    def finish(self, close: Close, error: BaseException | None) -> None:
        store = self.store
        lost = len(self.pending.writes)
        if lost:
            for w in self.pending.writes:
                log.error("records.lost_on_close", label=w.label, statements=repr(w.statements))
        elif self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.drop_connection()
        if close.future is None:
            return
        err: BaseException | None = None
        if lost:
            err = RecordsUnavailable(
                f"Closing the records store {self.path}: {lost} record(s) could not be written "
                "and were dumped to the log (records.lost_on_close)."
            )
            err.__cause__ = error or store._health.error
        store._post(store._resolve, close.future, err, None)


def _report_orphans(conn: sqlite3.Connection, path: Path) -> None:
    """Rows of an older database whose session is not in it are kept as they are (a
    record is never dropped) and logged; enforcement applies to what is written next."""
    orphans: dict[str, int] = {}
    for table, *_ in conn.execute("PRAGMA foreign_key_check").fetchall():
        orphans[str(table)] = orphans.get(str(table), 0) + 1
    if orphans:
        log.warning("records.orphan_rows_kept", path=str(path), rows=orphans)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
