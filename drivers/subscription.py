"""Bounded, async-iterable queues of telemetry or events that never block the reader."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

from pbmd.drivers.errors import SubscriptionOverflow

T = TypeVar("T")


class Overflow(enum.Enum):
    """What a full subscription does with a new item (the reader never waits)."""

    DROP_OLDEST = "drop_oldest"
    """Discard the oldest queued item: right for telemetry, where the newest counts."""
    FAIL = "fail"
    """Stop accepting; the consumer gets SubscriptionOverflow after the queued items."""


class Subscription(Generic[T]):
    """A bounded, async-iterable queue of telemetry or events.

    Iteration ends when the subscription or the client is closed, and raises
    LinkClosed (after the queued items) when the link was lost.
    """

    def __init__(
        self,
        kind: str,
        maxsize: int,
        overflow: Overflow,
        on_drop: Callable[[int], None],
        on_close: Callable[[Subscription[T]], None],
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize={maxsize}: a subscription holds at least one item")
        self.kind = kind
        self.maxsize = maxsize
        self.overflow = overflow
        self.dropped = 0
        self._on_drop = on_drop
        self._on_close = on_close
        self._queue: deque[T] = deque()
        self._wakeup = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def ended(self) -> bool:
        return self._ended

    def offer(self, item: T) -> None:
        """Queue an item without ever waiting (called by the reader)."""
        if self._ended:
            return
        if len(self._queue) >= self.maxsize:
            self.dropped += 1
            self._on_drop(1)
            if self.overflow is Overflow.FAIL:
                self._end(
                    SubscriptionOverflow(
                        f"{self.kind} subscription overflowed its {self.maxsize} slots; "
                        "items after the queued ones were lost"
                    )
                )
                return
            self._queue.popleft()
        self._queue.append(item)
        self._wakeup.set()

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._wakeup.set()
        self._on_close(self)

    def close(self) -> None:
        """Unsubscribe; queued items are discarded."""
        self._queue.clear()
        self._end(None)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def remover(subs: list[Subscription[T]]) -> Callable[[Subscription[T]], None]:
    def remove(sub: Subscription[T]) -> None:
        if sub in subs:
            subs.remove(sub)

    return remove
