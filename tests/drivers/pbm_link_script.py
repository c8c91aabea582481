"""Test doubles for the driver: a scripted in-memory Link and condition waits.

ScriptedLink records every write the client makes (with its loop time) so a
test can assert the exact bytes, and lets the test feed exact reply bytes in
whatever chunks it likes. Nothing here sleeps to synchronise: waits are on
events, with a timeout that only bounds a failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pbmd.drivers import codec
from pbmd.drivers.transport import Link, LinkError

WAIT_S = 2.0
"""Failure bound for every wait in these tests (never reached when they pass)."""

STRICT_LINK = {"reply_attempts": 1, "consecutive_loss_limit": 1}
"""Client options under which one missed reply is a link fault at once (no
retry): for tests of what happens to a reply once its deadline has passed."""

Responder = Callable[[codec.Frame], list[bytes]]


class ScriptedLink(Link):
    """An in-memory Link: the test plays the controller byte for byte."""

    def __init__(self, url: str = "script://controller") -> None:
        self._url = url
        self._inbox: asyncio.Queue[bytes | OSError] = asyncio.Queue()
        self.writes: list[bytes] = []
        self.write_times: list[float] = []
        self._cursor = 0
        self._written = asyncio.Event()
        self.closed = False
        self.close_calls = 0
        self.write_error: OSError | None = None
        self.hold_writes: asyncio.Event | None = None
        """When set to an unset Event, every write waits for it (a stalled transport)."""
        self.write_entered = asyncio.Event()
        self.yield_inside_write = False
        """Give up the loop in the middle of each write, as a slow transport would."""
        self.writers_inside = 0
        self.max_writers_inside = 0
        self.responder: Responder | None = None
        """Called with each frame the client writes; returns bytes to feed back."""
        self._responder_decoder = codec.StreamDecoder()

    @property
    def url(self) -> str:
        return self._url

    # ---- the Link contract

    async def read(self) -> bytes:
        if self.closed:
            return b""
        item = await self._inbox.get()
        if isinstance(item, OSError):
            raise item
        return item

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise LinkError(f"{self._url}: link is closed")
        self.writers_inside += 1
        self.max_writers_inside = max(self.max_writers_inside, self.writers_inside)
        try:
            self.write_entered.set()
            if self.write_error is not None:
                raise self.write_error
            if self.hold_writes is not None:
                await self.hold_writes.wait()
            if self.yield_inside_write:
                await asyncio.sleep(0)
            self.writes.append(bytes(data))
            self.write_times.append(asyncio.get_running_loop().time())
            self._written.set()
        finally:
            self.writers_inside -= 1
        if self.responder is not None:
            for frame in self._responder_decoder.feed(data):
                for reply in self.responder(frame):
                    self.feed(reply)

    async def close(self) -> None:
        self.close_calls += 1
        if not self.closed:
            self.closed = True
            self._inbox.put_nowait(b"")

    # ---- the controller side

    def feed(self, *chunks: bytes) -> None:
        """Deliver bytes to the client, one read() per chunk."""
        for chunk in chunks:
            assert chunk, "an empty chunk would read as end of stream; use feed_eof()"
            self._inbox.put_nowait(chunk)

    def feed_eof(self) -> None:
        self._inbox.put_nowait(b"")

    def feed_error(self, error: OSError) -> None:
        self._inbox.put_nowait(error)

    async def next_write(self, timeout_s: float = WAIT_S) -> bytes:
        """The next write the test has not looked at yet."""
        async with asyncio.timeout(timeout_s):
            while self._cursor >= len(self.writes):
                self._written.clear()
                await self._written.wait()
        data = self.writes[self._cursor]
        self._cursor += 1
        return data

    async def expect(self, expected: bytes, timeout_s: float = WAIT_S) -> None:
        """Assert the client's next write is exactly ``expected``."""
        got = await self.next_write(timeout_s)
        assert got.hex() == expected.hex(), f"client wrote {got.hex()}, expected {expected.hex()}"

    async def wait_writes(self, count: int, timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.writes) < count:
                self._written.clear()
                await self._written.wait()


async def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll a condition (a counter, a flag) that has no event of its own.

    The timeout only bounds a failure; a passing test returns as soon as the
    condition holds.
    """
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - counters have no event to wait on
            await asyncio.sleep(0.001)


def frames_of(data: bytes) -> list[codec.Frame]:
    return codec.iter_frames([data])


def pong_responder(frame: codec.Frame) -> list[bytes]:
    """A controller that answers PING and nothing else."""
    if frame.msg_type == codec.Ping.TYPE:
        return [codec.encode_frame(codec.Pong(1_000), frame.seq)]
    return []
