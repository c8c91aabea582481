"""Requests awaiting their reply, by seq, and the seqs recently given up on."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from pbmd.drivers.codec import Message

SEQ_MODULUS: Final = 0x10000

ABANDONED_SEQ_MEMORY: Final = 256
"""Seqs of timed-out or cancelled requests that are remembered (and not
reused) so that their late replies are recognised as late."""


@dataclass(slots=True)
class Pending:
    """One request on the wire: its seq, its deadline and the future of its reply."""

    request: Message
    seq: int
    future: asyncio.Future[Message]
    timeout_s: float
    sent_at: float | None = None
    timer: asyncio.TimerHandle | None = None


class InFlight(dict[int, Pending]):
    """Pending requests by seq; a seq is never reused while a reply to it may come."""

    def __init__(self, first_seq: int) -> None:
        super().__init__()
        self._next_seq = first_seq
        self._abandoned: OrderedDict[int, None] = OrderedDict()

    def new_seq(self) -> int:
        """The next 16-bit seq that no pending or recently abandoned request holds."""
        for _ in range(SEQ_MODULUS):
            seq = self._next_seq
            self._next_seq = (seq + 1) % SEQ_MODULUS
            if seq not in self and seq not in self._abandoned:
                return seq
        raise RuntimeError("all 65536 seqs are in use")

    def remember_abandoned(self, seq: int) -> None:
        """A request given up on (timed out, cancelled): its reply will be late."""
        self._abandoned[seq] = None
        while len(self._abandoned) > ABANDONED_SEQ_MEMORY:
            self._abandoned.popitem(last=False)

    def forget_abandoned(self, seq: int) -> bool:
        """True if ``seq`` was abandoned (its late reply has now come)."""
        return self._abandoned.pop(seq, 0) is None
