"""Treatment records: SQLite in WAL mode, written by one thread, never on the event loop.

A treatment that cannot be recorded must not run, and a record must survive a
crash of the daemon. Both are easy to get wrong from asyncio: one `commit()` on
the loop thread can stall it for the length of an fsync (tens of milliseconds on
a healthy disk, seconds on a failing one), and that loop also runs the dose
integrator and the safety supervisor. So:

- every write here is a plain synchronous call that only puts a record on a
  queue (O(1), no I/O on the loop thread); the records are the core's typed
  records (`pbmd.daemon.core.recording`), written with ``store.write(record)``
  or the keyword call of the same name (``store.event(...)``);
- one writer thread owns the only write connection and commits what is pending
  in batches, at least every ``sync_interval_s`` while anything is pending and
  at once on :meth:`RecordStore.sync`, the barrier the engine awaits at each
  step boundary; ``PRAGMA synchronous=FULL`` makes a WAL commit durable;
- reads open their own connections in worker threads (`asyncio.to_thread`);
- when the disk fails or fills, nothing is dropped: the records that could not
  be committed stay in memory, in order, and are retried; the store turns
  unhealthy, tells the engine on the event loop (``on_failure``) so that it can
  trip a running session, and :meth:`RecordStore.check_ready` refuses new
  sessions with a message that says what is wrong and how to fix it.

Times are stored as fixed-width ISO 8601 UTC text (``2024-05-01T10:00:00.000000Z``)
so that they sort as text; arguments named ``*_utc``/``utc`` take an aware
`datetime` or POSIX seconds, and default to now.

The parts: `store` (the store, its life cycle and health), `writer` (the writer
thread), `rows` (how each record becomes rows), `schema` (the tables), `reads`
(sessions, outbox, exports), `changes` (the change log replicas read).
"""

from pbmd.daemon.core.recording import (
    RecordsError,
    RecordsUnavailable,
    SessionPort,
    SessionStart,
    StepStart,
)
from pbmd.daemon.services.records.reads import ExportFormat
from pbmd.daemon.services.records.schema import SCHEMA_VERSION, RecordsCorrupt, utc_text
from pbmd.daemon.services.records.store import (
    DEFAULT_BUSY_TIMEOUT_S,
    DEFAULT_MIN_FREE_BYTES,
    DEFAULT_SYNC_INTERVAL_S,
    RecordStore,
    StoreOptions,
)
from pbmd.daemon.services.records.writer import StoreStats

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_S",
    "DEFAULT_MIN_FREE_BYTES",
    "DEFAULT_SYNC_INTERVAL_S",
    "SCHEMA_VERSION",
    "ExportFormat",
    "RecordStore",
    "RecordsCorrupt",
    "RecordsError",
    "RecordsUnavailable",
    "SessionPort",
    "SessionStart",
    "StepStart",
    "StoreOptions",
    "StoreStats",
    "utc_text",
]
