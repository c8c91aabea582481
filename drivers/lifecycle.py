"""``async with`` for objects that own a connection and close it once.

The links, the controller client and the simulator all end the same way:
leaving the ``async with`` block closes them, whatever ended the block.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self


class AsyncClosing(abc.ABC):
    """``async with obj:`` returns ``obj`` and awaits ``obj.close()`` on exit.

    A subclass whose entry must start something overrides ``__aenter__``.
    """

    __slots__ = ()

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything; idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
