"""Child process of the crash tests: owns a store, writes a stream of records, syncs
once, reports it, and keeps writing until it is killed (SIGKILL from the parent) or
ends itself with os._exit (no close, no flush) in the middle of the stream."""

from __future__ import annotations

import asyncio
import os
import sys
import time

# run as a script: its own directory is on sys.path
from synthetic import PAD_660, emit_request, session_start  # type: ignore[import-not-found]

from pbmd.daemon.services.records import RecordStore

SYNCED = 2000


async def main(path: str, how: str) -> None:
    store = await RecordStore.open(path, sync_interval_s=0.02, min_free_bytes=0)
    commits = 0

    def on_commit(_: int) -> None:
        nonlocal commits
        commits += 1

    store.add_commit_listener(on_commit)
    store.session_started(session_start("crash"))
    seq = store.emission_started("crash", 0, emit_request(PAD_660), device_time_us=0)
    n = 0

    def write() -> None:
        nonlocal n
        store.event("stream", f"record {n}", session_id="crash", data={"n": n})
        store.emission_progress(seq, host_energy_uj=n + 1, controller_energy_uj=n + 1)
        n += 1

    while n < SYNCED:
        write()
    await store.sync()
    print(f"synced {SYNCED}", flush=True)
    commits_at_sync = commits
    deadline = time.monotonic() + 60.0  # never outlive a parent that failed to kill us
    while time.monotonic() < deadline:
        for _ in range(50):
            write()
        await asyncio.sleep(0.001)
        if how == "os_exit" and commits >= commits_at_sync + 3:
            os._exit(3)  # records enqueued after the last commit are in flight
    os._exit(4)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
