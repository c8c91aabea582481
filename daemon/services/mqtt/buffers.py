"""What the publisher's tasks share: its counters and the live-sample buffer."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass


@dataclass(slots=True)
class MqttStats:
    """Counters of the publisher (a snapshot; see MqttPublisher.stats)."""

    connected: bool = False
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    live_published: int = 0
    live_dropped: int = 0
    events_published: int = 0
    events_marked: int = 0
    retained_published: int = 0
    discovery_published: int = 0
    last_error: str | None = None


class LiveBuffer:
    """Latest live samples waiting for the broker; the oldest is dropped when full.

    ``put`` never blocks (the sampler calls it); a slow broker only loses samples
    that a newer one has superseded anyway.
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        self._items: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self._woken = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, topic: str, payload: bytes) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append((topic, payload))
        self._ready.set()

    def clear(self) -> None:
        self._items.clear()
        self._ready.clear()
        self._woken = False

    def wake(self) -> None:
        """Make the next (or a waiting) ``get`` return, None if nothing is buffered."""
        self._woken = True
        self._ready.set()

    async def get(self) -> tuple[str, bytes] | None:
        """The oldest sample, waiting for one; None when woken with nothing buffered."""
        if not self._items and not self._woken:
            self._ready.clear()
            await self._ready.wait()
        self._woken = False
        return self._items.popleft() if self._items else None
