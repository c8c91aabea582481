"""The calendar clock the course rules read: injected, so that days pass on demand.

The daemon reads the system's UTC time. A test, or a walk-through of a course
on the simulator, gives the service a clock of its own and moves it forward by
the days between visits; the device clock and the safety timing never read it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class WallClock(Protocol):
    def now(self) -> datetime:
        """The current time, aware, UTC."""
        ...


class SystemClock:
    """The system's calendar time."""

    def now(self) -> datetime:
        return datetime.now(UTC)
