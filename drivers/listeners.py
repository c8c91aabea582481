"""A typed list of callbacks: the one way pbmd keeps listeners.

``add()`` returns the undo (a remover), so a subscriber never needs to keep
the callback around to unsubscribe; calling the listeners never lets one
listener's exception reach the caller or stop the others: it is logged and
counted. Callbacks run synchronously in the caller, so they must not block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import structlog

T = TypeVar("T")

_log = structlog.get_logger()


class Listeners(Generic[T]):
    """Callbacks taking one ``T``; ``kind`` names them in logs."""

    __slots__ = ("_callbacks", "_log", "_on_error", "errors", "kind")

    def __init__(
        self,
        kind: str,
        *,
        log: Any = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.errors = 0
        """Exceptions raised by listeners so far (each one logged)."""
        self._callbacks: list[Callable[[T], None]] = []
        self._log = log if log is not None else _log
        self._on_error = on_error

    def add(self, callback: Callable[[T], None]) -> Callable[[], None]:
        """Register ``callback``; the returned function removes it (idempotent)."""
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    def __len__(self) -> int:
        return len(self._callbacks)

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def __call__(self, arg: T) -> None:
        """Call every listener with ``arg``; one that raises is logged and skipped.

        Iterates over a copy, so a listener may remove itself (or add another).
        """
        for callback in tuple(self._callbacks):
            try:
                callback(arg)
            except Exception:
                self.errors += 1
                if self._on_error is not None:
                    self._on_error()
                self._log.exception("listener.failed", kind=self.kind, listener=repr(callback))
