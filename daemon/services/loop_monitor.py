"""How late the event loop runs a timer: the figure API load must not move."""

from __future__ import annotations

import asyncio
import collections
import contextlib

import structlog

log = structlog.get_logger()


class LoopMonitor:
    """How late the event loop runs a timer: the figure API load must not move."""

    PERIOD_S = 0.05

    def __init__(self) -> None:
        self.lag_ms: collections.deque[float] = collections.deque(maxlen=1200)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-monitor")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.PERIOD_S
            await asyncio.sleep(self.PERIOD_S)
            self.lag_ms.append(max(0.0, (loop.time() - due) * 1000.0))

    def summary(self) -> dict[str, float | None]:
        lat = sorted(self.lag_ms)
        if not lat:
            return {"lag_ms_p50": None, "lag_ms_p99": None, "lag_ms_max": None}
        return {
            "lag_ms_p50": round(lat[len(lat) // 2], 3),
            "lag_ms_p99": round(lat[min(int(0.99 * len(lat)), len(lat) - 1)], 3),
            "lag_ms_max": round(lat[-1], 3),
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
