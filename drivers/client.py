"""Typed async client of one PBM-Link controller (ICD §3, §4, §6).

One reader task turns the byte stream into frames and dispatches them:
replies complete the request with the same seq, telemetry and events go to
listeners and subscriptions. The reader never waits on anybody: listeners are
plain callbacks, subscriptions have bounded queues that drop (and count)
rather than block, so a slow dashboard can never delay a reply or the loss of
the link from being noticed.

Every request has a deadline (ICD §6: 20 ms nominal, 100 ms limit); a late
reply is counted and ignored, never matched to a newer request. A heartbeat
PING every 50 ms keeps the controller's watchdog fed while the link is
healthy, and stops the moment the link is lost or closed, so the controller's
own watchdog (ICD §5) then stops any emission by itself.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Generic, Self, TypeVar

import structlog

from pbmd.drivers.codec import (
    PROTOCOL_VERSION,
    Ack,
    AllOff,
    Arm,
    ClearFault,
    CodecError,
    Counters,
    Disarm,
    DropReason,
    EmitStart,
    EmitStop,
    Event,
    Frame,
    GetCounters,
    GetPort,
    Hello,
    Info,
    Message,
    Nak,
    NakError,
    Ping,
    Pong,
    PortInfo,
    SetTelemetry,
    Stopped,
    StreamDecoder,
    Telemetry,
    encode_frame,
)
from pbmd.drivers.transport import Link, open_link

log = structlog.get_logger()

DEFAULT_REPLY_TIMEOUT_S: Final = 0.100
"""ICD §6: replies come within 20 ms nominally; 100 ms without one is a link fault."""

DEFAULT_HEARTBEAT_INTERVAL_S: Final = 0.050
MAX_HEARTBEAT_INTERVAL_S: Final = 0.100
"""ICD §5: a PING at least every 100 ms keeps the 250 ms watchdog fed."""

HANDSHAKE_ATTEMPTS: Final = 3
"""Tries per handshake request. Nothing emits before SET_TELEMETRY is answered
(the session arms later), so a reply that misses its deadline while the link
opens (a serial adapter waking, a host busy starting up) is asked again rather
than failing the connection; once the handshake is done, a miss is a link fault."""

MAX_PORT_COUNT: Final = 8
SEQ_MODULUS: Final = 0x10000
RTT_WINDOW: Final = 1000
"""Round trips kept for the percentiles (20 s of heartbeats)."""

ABANDONED_SEQ_MEMORY: Final = 256
"""Seqs of timed-out or cancelled requests that are remembered (and not
reused) so that their late replies are recognised as late."""

REPLY_TYPES: Final[dict[type[Message], type[Message]]] = {
    Hello: Info,
    Ping: Pong,
    GetPort: PortInfo,
    SetTelemetry: Ack,
    Arm: Ack,
    Disarm: Ack,
    EmitStart: Ack,
    EmitStop: Stopped,
    AllOff: Ack,
    ClearFault: Ack,
    GetCounters: Counters,
}
"""ICD §3: the one reply type (besides NAK) that each request may get."""

_REPLY_TYPE_CODES: Final = frozenset(cls.TYPE for cls in REPLY_TYPES.values()) | {Nak.TYPE}
_PORT_REQUESTS: Final = (GetPort, EmitStop, GetCounters)

T = TypeVar("T")
R = TypeVar("R", bound=Message)
A = TypeVar("A")


# --------------------------------------------------------------------------
# Errors


class ClientError(Exception):
    """A request to the controller did not succeed."""


class LinkClosed(ClientError, ConnectionError):
    """The link is gone (lost, or closed by the host); nothing more can be sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ReplyTimeout(ClientError, TimeoutError):
    """No reply by the deadline: a link fault by ICD §6."""

    def __init__(self, request: Message, seq: int, timeout_s: float) -> None:
        super().__init__(request, seq, timeout_s)
        self.request = request
        self.seq = seq
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return (
            f"no reply to {type(self.request).__name__} (seq {self.seq}) "
            f"within {self.timeout_s * 1000:.0f} ms"
        )


class NakReceived(ClientError):
    """The controller refused a request; ``code`` is the ICD §4 NAK error."""

    def __init__(self, code: int, request: Message, seq: int) -> None:
        super().__init__(code, request, seq)
        try:
            self.code: NakError | int = NakError(code)
        except ValueError:
            self.code = code
        self.request = request
        self.seq = seq

    @property
    def error(self) -> NakError | None:
        """The code as a NakError, or None for a code this version does not know."""
        return self.code if isinstance(self.code, NakError) else None

    @property
    def meaning(self) -> str:
        if isinstance(self.code, NakError):
            return self.code.meaning
        return f"unknown NAK error {self.code}"

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, NakError) else "?"
        request = type(self.request).__name__
        return f"{request} refused: NAK {int(self.code)} {name} ({self.meaning})"


class UnexpectedReply(ClientError):
    """A reply with the request's seq that is not a valid answer to it."""

    def __init__(self, request: Message, reply: Message | None, detail: str) -> None:
        super().__init__(request, reply, detail)
        self.request = request
        self.reply = reply
        self.detail = detail

    def __str__(self) -> str:
        return f"bad reply to {type(self.request).__name__}: {self.detail}"


class ProtocolMismatch(ClientError):
    """The controller does not speak PBM-Link v1 (ICD §6: refuse it)."""

    def __init__(self, detail: str, info: Info | None = None) -> None:
        super().__init__(detail)
        self.info = info


class EmissionInhibited(ClientError):
    """EMIT_START refused on the host side: emission is inhibited (a trip latched)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"emission inhibited: {reason}")
        self.reason = reason


class SubscriptionOverflow(ClientError):
    """A lossless subscription fell behind and lost items; resynchronise."""


# --------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """Request → reply times over the rolling window, in milliseconds."""

    count: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of the link's health counters."""

    frames_rx: int
    frames_tx: int
    bytes_rx: int
    bytes_tx: int
    dropped: dict[str, int]
    """Frames the decoder dropped, by reason (codec.DropReason values)."""
    crc_errors: int
    empty_frames: int
    unknown_types: int
    bad_payloads: int
    unmatched_replies: int
    late_replies: int
    unexpected_replies: int
    reply_timeouts: int
    naks: int
    telemetry_rx: int
    events_rx: int
    telemetry_dropped: int
    events_dropped: int
    listener_errors: int
    heartbeats_sent: int
    heartbeat_failures: int
    rtt_ms: RoundTrip

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(slots=True)
class _Tally:
    frames_tx: int = 0
    bytes_rx: int = 0
    bytes_tx: int = 0
    unknown_types: int = 0
    bad_payloads: int = 0
    unmatched_replies: int = 0
    late_replies: int = 0
    unexpected_replies: int = 0
    reply_timeouts: int = 0
    naks: int = 0
    telemetry_rx: int = 0
    events_rx: int = 0
    telemetry_dropped: int = 0
    events_dropped: int = 0
    listener_errors: int = 0
    heartbeats_sent: int = 0
    heartbeat_failures: int = 0


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --------------------------------------------------------------------------
# Subscriptions


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


# --------------------------------------------------------------------------
# Write serialisation


class _WriteGate:
    """One frame on the wire at a time; urgent frames (ALL_OFF) jump the queue.

    A frame being written is never interrupted (that would garble two frames),
    but an urgent frame is the next one out, ahead of any queued request.
    """

    def __init__(self) -> None:
        self._busy = False
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()

    async def acquire(self, urgent: bool) -> None:
        if not self._busy:
            self._busy = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._normal).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        for queue in (self._urgent, self._normal):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._busy = False


# --------------------------------------------------------------------------
# The client


@dataclass(slots=True)
class _Pending:
    request: Message
    seq: int
    future: asyncio.Future[Message]
    timeout_s: float
    sent_at: float | None = None
    timer: asyncio.TimerHandle | None = None


TelemetryListener = Callable[[Telemetry], None]
EventListener = Callable[[Event], None]
LinkLostListener = Callable[[LinkClosed], None]
ReplyTimeoutListener = Callable[[ReplyTimeout], None]
PongListener = Callable[[tuple[float, float, Pong]], None]


@dataclass(slots=True)
class _Listeners:
    telemetry: list[TelemetryListener] = field(default_factory=list)
    events: list[EventListener] = field(default_factory=list)
    link_lost: list[LinkLostListener] = field(default_factory=list)
    reply_timeout: list[ReplyTimeoutListener] = field(default_factory=list)
    pong: list[PongListener] = field(default_factory=list)


class ControllerClient:
    """Requests, replies, telemetry and events of one controller over one Link.

    The reader starts with :meth:`start` (or the first request); the heartbeat
    with :meth:`start_heartbeat` (``handshake`` does it once ICD §6's opening
    sequence is done). :meth:`close` is idempotent and leaves no task behind.
    """

    def __init__(
        self,
        link: Link,
        *,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        rtt_window: int = RTT_WINDOW,
        first_seq: int = 1,
    ) -> None:
        if not reply_timeout_s > 0:
            raise ValueError(f"reply_timeout_s={reply_timeout_s} must be positive")
        if not 0 < heartbeat_interval_s <= MAX_HEARTBEAT_INTERVAL_S:
            raise ValueError(
                f"heartbeat_interval_s={heartbeat_interval_s} must be in "
                f"(0, {MAX_HEARTBEAT_INTERVAL_S}] to keep the watchdog fed"
            )
        if not 0 <= first_seq < SEQ_MODULUS:
            raise ValueError(f"first_seq={first_seq} does not fit u16")
        self._link = link
        self._log = log.bind(link=link.url)
        self.reply_timeout_s = reply_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._decoder = StreamDecoder()
        self._pending: dict[int, _Pending] = {}
        self._abandoned: OrderedDict[int, None] = OrderedDict()
        self._next_seq = first_seq
        self._gate = _WriteGate()
        self._reader_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._teardown_task: asyncio.Task[None] | None = None
        self._down: LinkClosed | None = None
        self._lost = False
        self._listeners = _Listeners()
        self._telemetry_subs: list[Subscription[Telemetry]] = []
        self._event_subs: list[Subscription[Event]] = []
        self._rtts_ms: deque[float] = deque(maxlen=rtt_window)
        self._rtt_cache: RoundTrip | None = None
        self._tally = _Tally()
        self._info: Info | None = None
        self._inhibit: str | None = None
        self.ports: dict[int, PortInfo] = {}
        """The last PORT_INFO of each port (filled by get_port / the handshake)."""
        self.last_telemetry_monotonic: float | None = None
        """Event-loop time of the last TELEMETRY, for the host's staleness check."""

    # ---- properties

    @property
    def link(self) -> Link:
        return self._link

    @property
    def url(self) -> str:
        return self._link.url

    @property
    def info(self) -> Info:
        """The controller's INFO from the last HELLO."""
        if self._info is None:
            raise RuntimeError("no HELLO answered yet: call handshake() or hello() first")
        return self._info

    @property
    def is_open(self) -> bool:
        """True until the link is lost or the client is closed."""
        return self._down is None

    @property
    def link_lost(self) -> bool:
        return self._lost

    @property
    def heartbeat_running(self) -> bool:
        return self._heartbeat_task is not None and not self._heartbeat_task.done()

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def stats(self) -> LinkStats:
        t = self._tally
        d = self._decoder.stats
        return LinkStats(
            frames_rx=d.frames,
            frames_tx=t.frames_tx,
            bytes_rx=t.bytes_rx,
            bytes_tx=t.bytes_tx,
            dropped=dict(d.dropped),
            crc_errors=d.dropped[DropReason.CRC.value],
            empty_frames=d.empty,
            unknown_types=t.unknown_types,
            bad_payloads=t.bad_payloads,
            unmatched_replies=t.unmatched_replies,
            late_replies=t.late_replies,
            unexpected_replies=t.unexpected_replies,
            reply_timeouts=t.reply_timeouts,
            naks=t.naks,
            telemetry_rx=t.telemetry_rx,
            events_rx=t.events_rx,
            telemetry_dropped=t.telemetry_dropped,
            events_dropped=t.events_dropped,
            listener_errors=t.listener_errors,
            heartbeats_sent=t.heartbeats_sent,
            heartbeat_failures=t.heartbeat_failures,
            rtt_ms=self.round_trip,
        )

    @property
    def round_trip(self) -> RoundTrip:
        """Round-trip percentiles, recomputed only after a new reply."""
        if self._rtt_cache is None:
            ordered = sorted(self._rtts_ms)
            self._rtt_cache = RoundTrip(
                count=len(ordered),
                p50_ms=_percentile(ordered, 0.50) if ordered else None,
                p99_ms=_percentile(ordered, 0.99) if ordered else None,
                max_ms=ordered[-1] if ordered else None,
            )
        return self._rtt_cache

    # ---- lifecycle

    def start(self) -> None:
        """Start the reader task (idempotent; needs a running event loop)."""
        if self._reader_task is None and self._down is None:
            self._reader_task = asyncio.get_running_loop().create_task(
                self._read_loop(), name=f"pbm-reader {self.url}"
            )

    def start_heartbeat(self) -> None:
        """Start PINGing every heartbeat_interval_s (idempotent)."""
        if self._down is not None:
            raise self._closed_error()
        self.start()
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(), name=f"pbm-heartbeat {self.url}"
            )

    async def close(self) -> None:
        """Stop the heartbeat and the reader and close the link (idempotent).

        Pending requests fail with LinkClosed; subscriptions end. Closing does
        not tell the controller anything: if it is armed, its watchdog will
        stop emission (ICD §5). Send ALL_OFF or DISARM first if that is meant.
        """
        if self._down is None:
            self._down = LinkClosed(f"{self.url}: client closed")
            self._fail_pending(self._down.reason)
            self._end_subscriptions(None)
            self._log.debug("client closing")
        if self._teardown_task is None:
            self._teardown_task = asyncio.get_running_loop().create_task(
                self._teardown(), name=f"pbm-teardown {self.url}"
            )
        await asyncio.shield(self._teardown_task)

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _teardown(self) -> None:
        tasks = [t for t in (self._heartbeat_task, self._reader_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._link.close()
        except Exception as exc:
            self._log.warning("link close failed", error=str(exc))

    def _closed_error(self) -> LinkClosed:
        reason = self._down.reason if self._down is not None else f"{self.url}: client closed"
        return LinkClosed(reason)

    def _lose(self, reason: str) -> None:
        """The link failed: fail everything waiting on it and tell the listeners."""
        if self._down is not None:
            return
        reason = f"{self.url}: {reason}"
        self._down = LinkClosed(reason)
        self._lost = True
        self._log.warning("link lost", reason=reason, pending=len(self._pending))
        self._fail_pending(reason)
        self._end_subscriptions(reason)
        for callback in tuple(self._listeners.link_lost):
            self._call_listener(callback, LinkClosed(reason), "link_lost")
        self._teardown_task = asyncio.get_running_loop().create_task(
            self._teardown(), name=f"pbm-teardown {self.url}"
        )

    def _fail_pending(self, reason: str) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for p in pending:
            if p.timer is not None:
                p.timer.cancel()
            if not p.future.done():
                p.future.set_exception(LinkClosed(reason))

    def _end_subscriptions(self, reason: str | None) -> None:
        for telemetry_sub in tuple(self._telemetry_subs):
            telemetry_sub._end(LinkClosed(reason) if reason is not None else None)
        for event_sub in tuple(self._event_subs):
            event_sub._end(LinkClosed(reason) if reason is not None else None)

    # ---- listeners and subscriptions

    def add_telemetry_listener(self, callback: TelemetryListener) -> Callable[[], None]:
        """Call ``callback`` with every TELEMETRY, in the reader; returns a remover.

        Callbacks must not block; an exception is logged and counted.
        """
        return _add(self._listeners.telemetry, callback)

    def add_event_listener(self, callback: EventListener) -> Callable[[], None]:
        return _add(self._listeners.events, callback)

    def add_link_lost_listener(self, callback: LinkLostListener) -> Callable[[], None]:
        """Called once if the link fails (EOF or I/O error), not on close()."""
        return _add(self._listeners.link_lost, callback)

    def add_pong_listener(self, callback: PongListener) -> Callable[[], None]:
        """Called with (sent_s, received_s, Pong) for every PING answered, heartbeats
        included, in event-loop time: what a host needs to map the device clock."""
        return _add(self._listeners.pong, callback)

    def add_reply_timeout_listener(self, callback: ReplyTimeoutListener) -> Callable[[], None]:
        """Called for every missed reply deadline, heartbeats included (ICD §6 link fault)."""
        return _add(self._listeners.reply_timeout, callback)

    def subscribe_telemetry(
        self, maxsize: int = 64, overflow: Overflow = Overflow.DROP_OLDEST
    ) -> Subscription[Telemetry]:
        def dropped(n: int) -> None:
            self._tally.telemetry_dropped += n

        sub: Subscription[Telemetry] = Subscription(
            "telemetry", maxsize, overflow, dropped, _remover(self._telemetry_subs)
        )
        return self._attach(sub, self._telemetry_subs)

    def subscribe_events(
        self, maxsize: int = 1024, overflow: Overflow = Overflow.FAIL
    ) -> Subscription[Event]:
        """Events are lossless by default: overflow ends the subscription loudly."""

        def dropped(n: int) -> None:
            self._tally.events_dropped += n

        sub: Subscription[Event] = Subscription(
            "event", maxsize, overflow, dropped, _remover(self._event_subs)
        )
        return self._attach(sub, self._event_subs)

    def _attach(self, sub: Subscription[T], subs: list[Subscription[T]]) -> Subscription[T]:
        if self._down is not None:
            sub._end(self._closed_error() if self._lost else None)
        else:
            subs.append(sub)
        return sub

    def _call_listener(self, callback: Callable[[T], None], arg: T, kind: str) -> None:
        try:
            callback(arg)
        except Exception:
            self._tally.listener_errors += 1
            self._log.exception("listener failed", kind=kind, listener=repr(callback))

    # ---- requests

    async def request(
        self, msg: Message, *, timeout_s: float | None = None, urgent: bool = False
    ) -> Message:
        """Send one request and return its reply (never a NAK: that raises).

        Raises NakReceived, ReplyTimeout, UnexpectedReply or LinkClosed.
        """
        future = await self._submit(msg, timeout_s, urgent)
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(future)
            raise

    async def _submit(
        self, msg: Message, timeout_s: float | None, urgent: bool
    ) -> asyncio.Future[Message]:
        """Put a request on the wire; the future completes with its reply."""
        if type(msg) not in REPLY_TYPES:
            raise TypeError(f"{type(msg).__name__} is not a host request")
        if self._down is not None:
            raise self._closed_error()
        self.start()
        loop = asyncio.get_running_loop()
        seq = self._allocate_seq()
        frame = encode_frame(msg, seq)  # a value out of range fails here, before any state
        pending = _Pending(msg, seq, loop.create_future(), timeout_s or self.reply_timeout_s)
        self._pending[seq] = pending
        try:
            await self._gate.acquire(urgent)
            try:
                if self._down is not None:
                    raise self._closed_error()
                if self._inhibit is not None and isinstance(msg, EmitStart):
                    # Checked at the moment of writing: an EMIT_START that queued
                    # behind an urgent ALL_OFF never follows it onto the wire.
                    raise EmissionInhibited(self._inhibit)
                pending.sent_at = loop.time()
                await self._link.write(frame)
            except OSError as exc:
                self._lose(f"write failed: {exc}")
                raise self._closed_error() from exc
            finally:
                self._gate.release()
        except BaseException:
            self._abandon(pending.future)
            raise
        self._tally.frames_tx += 1
        self._tally.bytes_tx += len(frame)
        if not pending.future.done():
            pending.timer = loop.call_at(
                pending.sent_at + pending.timeout_s, self._expire, seq, pending.future
            )
        return pending.future

    def _allocate_seq(self) -> int:
        """The next 16-bit seq that no pending or recently abandoned request holds."""
        for _ in range(SEQ_MODULUS):
            seq = self._next_seq
            self._next_seq = (seq + 1) % SEQ_MODULUS
            if seq not in self._pending and seq not in self._abandoned:
                return seq
        raise RuntimeError("all 65536 seqs are in use")

    def _remember_abandoned(self, seq: int) -> None:
        self._abandoned[seq] = None
        while len(self._abandoned) > ABANDONED_SEQ_MEMORY:
            self._abandoned.popitem(last=False)

    def _abandon(self, future: asyncio.Future[Message]) -> None:
        """Forget a request the caller gave up on; a reply to it will count as late."""
        for seq, p in list(self._pending.items()):
            if p.future is future:
                del self._pending[seq]
                if p.timer is not None:
                    p.timer.cancel()
                self._remember_abandoned(seq)
        if future.done() and not future.cancelled():
            future.exception()  # retrieved: the caller is already raising
        else:
            future.cancel()

    def _expire(self, seq: int, future: asyncio.Future[Message]) -> None:
        p = self._pending.get(seq)
        if p is None or p.future is not future or future.done():
            return
        del self._pending[seq]
        self._remember_abandoned(seq)
        self._tally.reply_timeouts += 1
        error = ReplyTimeout(p.request, seq, p.timeout_s)
        self._log.warning("reply timeout", request=type(p.request).__name__, seq=seq)
        future.set_exception(error)
        for callback in tuple(self._listeners.reply_timeout):
            self._call_listener(callback, error, "reply_timeout")

    async def _call(
        self,
        msg: Message,
        reply_cls: type[R],
        *,
        urgent: bool = False,
        timeout_s: float | None = None,
    ) -> R:
        reply = await self.request(msg, urgent=urgent, timeout_s=timeout_s)
        if not isinstance(reply, reply_cls):  # request() already checked; this narrows
            raise UnexpectedReply(msg, reply, f"expected {reply_cls.__name__}")
        return reply

    # ---- typed requests (ICD §3)

    async def hello(self) -> Info:
        info = await self._call(Hello(), Info)
        self._info = info
        return info

    async def ping(self) -> Pong:
        return await self._call(Ping(), Pong)

    async def get_port(self, port: int) -> PortInfo:
        info = await self._call(GetPort(port), PortInfo)
        self.ports[port] = info
        return info

    async def set_telemetry(self, rate_hz: int) -> None:
        await self._call(SetTelemetry(rate_hz), Ack)

    async def arm(self, session_token: int) -> None:
        if session_token == 0:
            raise ValueError("session_token must be non-zero (ICD §3)")
        await self._call(Arm(session_token), Ack)

    async def disarm(self) -> None:
        await self._call(Disarm(), Ack)

    async def emit_start(self, command: EmitStart) -> None:
        """ACK means emission has begun (ICD §3). Raises EmissionInhibited while inhibited."""
        if self._inhibit is not None:
            raise EmissionInhibited(self._inhibit)
        await self._call(command, Ack)

    def inhibit_emission(self, reason: str = "safety trip latched") -> None:
        """Refuse every EMIT_START from now on, including any already queued.

        Synchronous, so a safety trip can call it before it awaits anything.
        """
        self._inhibit = reason

    def release_emission(self) -> None:
        """Allow EMIT_START again (a person starting a new session does this)."""
        self._inhibit = None

    @property
    def emission_inhibited(self) -> str | None:
        return self._inhibit

    async def emit_stop(self, port: int) -> Stopped:
        return await self._call(EmitStop(port), Stopped)

    async def all_off(self, *, timeout_s: float | None = None) -> None:
        """The safety path: goes out ahead of every queued request."""
        await self._call(AllOff(), Ack, urgent=True, timeout_s=timeout_s)

    async def clear_fault(self) -> None:
        await self._call(ClearFault(), Ack)

    async def get_counters(self, port: int) -> Counters:
        return await self._call(GetCounters(port), Counters)

    async def handshake(self, telemetry_hz: int, *, heartbeat: bool = True) -> Info:
        """ICD §6's opening: HELLO, GET_PORT for each port, SET_TELEMETRY; then heartbeat.

        Raises ProtocolMismatch for a controller that is not PBM-Link v1.
        """
        version_drops = self._decoder.stats.dropped[DropReason.VERSION.value]

        def other_version_seen() -> bool:
            return self._decoder.stats.dropped[DropReason.VERSION.value] > version_drops

        try:
            info = await self._retrying(self.hello, give_up=other_version_seen)
        except ReplyTimeout as exc:
            if other_version_seen():
                raise ProtocolMismatch(
                    "the controller answers with frames of another protocol version"
                ) from exc
            raise
        except UnexpectedReply as exc:
            raise ProtocolMismatch(f"INFO is not PBM-Link v1: {exc.detail}") from exc
        if info.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"controller speaks protocol version {info.protocol_version}, "
                f"this host only {PROTOCOL_VERSION}",
                info,
            )
        if not 1 <= info.port_count <= MAX_PORT_COUNT:
            raise ProtocolMismatch(
                f"controller reports {info.port_count} ports, outside 1..{MAX_PORT_COUNT}", info
            )
        if not 0 <= telemetry_hz <= info.max_telemetry_hz:
            raise ValueError(
                f"telemetry_hz={telemetry_hz} outside 0..{info.max_telemetry_hz} "
                "(the controller's max_telemetry_hz)"
            )
        self.ports = {}
        for port in range(1, info.port_count + 1):
            await self._retrying(functools.partial(self.get_port, port))
        await self._retrying(lambda: self.set_telemetry(telemetry_hz))
        if heartbeat:
            self.start_heartbeat()
        self._log.info(
            "controller ready",
            serial=info.serial,
            firmware=info.firmware,
            port_count=info.port_count,
            telemetry_hz=telemetry_hz,
        )
        return info

    async def _retrying(
        self,
        request: Callable[[], Awaitable[A]],
        *,
        give_up: Callable[[], bool] = lambda: False,
    ) -> A:
        """Run an idempotent handshake request, asking again after a missed deadline."""
        for attempt in range(1, HANDSHAKE_ATTEMPTS + 1):
            try:
                return await request()
            except ReplyTimeout as exc:
                if attempt == HANDSHAKE_ATTEMPTS or give_up():
                    raise
                self._log.warning(
                    "handshake reply late, asking again",
                    request=type(exc.request).__name__,
                    attempt=attempt,
                )
        raise AssertionError("unreachable")

    # ---- tasks

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while self._down is None:
            try:
                future = await self._submit(Ping(), None, urgent=False)
            except LinkClosed:
                return
            except Exception as exc:
                # Without a heartbeat the controller's watchdog will stop
                # everything within 250 ms: say so now rather than then.
                self._log.exception("heartbeat failed")
                self._lose(f"heartbeat failed: {exc!r}")
                return
            self._tally.heartbeats_sent += 1
            future.add_done_callback(self._heartbeat_done)
            # A fixed schedule, not "sleep after each ping", so the cadence
            # does not drift; after a stall it restarts rather than bursts.
            next_at += self.heartbeat_interval_s
            now = loop.time()
            if next_at < now:
                next_at = now
            await asyncio.sleep(next_at - now)

    def _heartbeat_done(self, future: asyncio.Future[Message]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is None or isinstance(error, LinkClosed):
            return
        self._tally.heartbeat_failures += 1
        self._log.warning("heartbeat failed", error=str(error))

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._link.read()
            except OSError as exc:
                self._lose(f"read failed: {exc}")
                return
            except Exception as exc:
                self._log.exception("link read raised")
                self._lose(f"read failed: {exc!r}")
                return
            if not data:
                self._lose("end of stream")
                return
            self._tally.bytes_rx += len(data)
            try:
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
            except Exception as exc:
                # A bug here would otherwise kill the reader silently and every
                # later reply would time out; failing the link is loud and safe.
                self._log.exception("reader failed")
                self._lose(f"reader failed: {exc!r}")
                return

    def _dispatch(self, frame: Frame) -> None:
        if frame.msg_type in (Telemetry.TYPE, Event.TYPE):
            try:
                msg = frame.message()
            except CodecError as exc:
                self._tally.bad_payloads += 1
                self._log.warning("malformed device frame", type=frame.msg_type, error=str(exc))
                return
            if isinstance(msg, Telemetry):
                self._on_telemetry(msg)
            elif isinstance(msg, Event):
                self._on_event(msg)
        elif frame.msg_type in _REPLY_TYPE_CODES:
            self._on_reply(frame)
        else:
            self._tally.unknown_types += 1
            self._log.warning("unknown frame type from controller", type=f"0x{frame.msg_type:02X}")

    def _on_telemetry(self, msg: Telemetry) -> None:
        self._tally.telemetry_rx += 1
        self.last_telemetry_monotonic = asyncio.get_running_loop().time()
        for callback in tuple(self._listeners.telemetry):
            self._call_listener(callback, msg, "telemetry")
        for sub in tuple(self._telemetry_subs):
            sub.offer(msg)

    def _on_event(self, msg: Event) -> None:
        self._tally.events_rx += 1
        for callback in tuple(self._listeners.events):
            self._call_listener(callback, msg, "event")
        for sub in tuple(self._event_subs):
            sub.offer(msg)

    def _on_reply(self, frame: Frame) -> None:
        p = self._pending.pop(frame.seq, None)
        if p is None or p.future.done():
            if frame.seq in self._abandoned or p is not None:
                self._abandoned.pop(frame.seq, None)
                self._tally.late_replies += 1
                self._log.info("late reply ignored", seq=frame.seq, type=f"0x{frame.msg_type:02X}")
            else:
                self._tally.unmatched_replies += 1
                self._log.warning(
                    "reply to no request", seq=frame.seq, type=f"0x{frame.msg_type:02X}"
                )
            return
        if p.timer is not None:
            p.timer.cancel()
        if p.sent_at is not None:
            self._rtts_ms.append((asyncio.get_running_loop().time() - p.sent_at) * 1000.0)
            self._rtt_cache = None
        try:
            reply = frame.message()
        except CodecError as exc:
            self._tally.bad_payloads += 1
            self._tally.unexpected_replies += 1
            p.future.set_exception(UnexpectedReply(p.request, None, f"malformed reply: {exc}"))
            return
        if isinstance(reply, Nak):
            self._tally.naks += 1
            p.future.set_exception(NakReceived(reply.error, p.request, p.seq))
            return
        expected = REPLY_TYPES[type(p.request)]
        if type(reply) is not expected:
            self._tally.unexpected_replies += 1
            p.future.set_exception(
                UnexpectedReply(
                    p.request, reply, f"got {type(reply).__name__}, expected {expected.__name__}"
                )
            )
            return
        if isinstance(p.request, _PORT_REQUESTS) and getattr(reply, "port", None) != p.request.port:
            self._tally.unexpected_replies += 1
            p.future.set_exception(
                UnexpectedReply(
                    p.request,
                    reply,
                    f"{type(reply).__name__} for port {getattr(reply, 'port', None)}, "
                    f"asked for port {p.request.port}",
                )
            )
            return
        p.future.set_result(reply)
        if isinstance(reply, Pong) and p.sent_at is not None:
            received = asyncio.get_running_loop().time()
            for callback in list(self._listeners.pong):
                self._call_listener(callback, (p.sent_at, received, reply), "pong")


def _add(listeners: list[T], callback: T) -> Callable[[], None]:
    listeners.append(callback)

    def remove() -> None:
        if callback in listeners:
            listeners.remove(callback)

    return remove


def _remover(subs: list[Subscription[T]]) -> Callable[[Subscription[T]], None]:
    def remove(sub: Subscription[T]) -> None:
        if sub in subs:
            subs.remove(sub)

    return remove


async def open_controller(
    url: str,
    telemetry_hz: int = 50,
    *,
    reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
) -> ControllerClient:
    """Open the link, run ICD §6's handshake and start the heartbeat.

    On any failure the link is closed again before the error propagates.
    """
    link = await open_link(url)
    client = ControllerClient(
        link, reply_timeout_s=reply_timeout_s, heartbeat_interval_s=heartbeat_interval_s
    )
    try:
        client.start()
        await client.handshake(telemetry_hz)
    except BaseException:
        await client.close()
        raise
    return client
