"""Typed async client of one PBM-Link controller (ICD §3, §4, §6).

One reader task turns the byte stream into frames and dispatches them:
replies complete the request with the same seq, telemetry and events go to
listeners and subscriptions. The reader never waits on anybody: listeners are
plain callbacks, subscriptions have bounded queues that drop (and count)
rather than block, so a slow dashboard can never delay a reply or the loss of
the link from being noticed.

Every request has a deadline (ICD §6: 20 ms nominal, 100 ms limit), judged
after reading what waits in the receive buffer; a late reply is counted and
ignored, never matched to a newer request. One missed reply is not a link
fault: a repeatable request is asked again, EMIT_START/ARM raise
OutcomeUnknown; ReplyTimeout (a link fault) comes after CONSECUTIVE_LOSS_LIMIT
misses in a row or a spent retry budget. A heartbeat PING every 50 ms keeps
the watchdog fed, and stops the moment the link is lost or closed (ICD §5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, Self, TypeVar

import structlog

from pbmd.drivers.codec import (
    Ack,
    AllOff,
    Arm,
    ClearFault,
    CodecError,
    Counters,
    Disarm,
    EmitStart,
    EmitStop,
    Event,
    Frame,
    GetCounters,
    GetPort,
    Hello,
    Info,
    Message,
    Ping,
    Pong,
    PortInfo,
    SetTelemetry,
    Stopped,
    StreamDecoder,
    Telemetry,
    encode_frame,
)
from pbmd.drivers.errors import (
    ClientError,
    EmissionInhibited,
    LinkClosed,
    NakReceived,
    OutcomeUnknown,
    ProtocolMismatch,
    ReplyMissed,
    ReplyTimeout,
    SubscriptionOverflow,
    UnexpectedReply,
)
from pbmd.drivers.handshake import open_session
from pbmd.drivers.in_flight import SEQ_MODULUS, InFlight, Pending
from pbmd.drivers.lifecycle import AsyncClosing
from pbmd.drivers.link_stats import LinkStats, LinkTally, RoundTrip, RoundTrips
from pbmd.drivers.listeners import Listeners
from pbmd.drivers.replies import (
    OUTCOME_UNKNOWN_REQUESTS,
    REPEATABLE_REQUESTS,
    REPLY_TYPE_CODES,
    REPLY_TYPES,
    check_reply,
)
from pbmd.drivers.subscription import Overflow, Subscription, remover
from pbmd.drivers.transport import Link, open_link
from pbmd.drivers.write_gate import WriteGate

__all__ = [
    "CONSECUTIVE_LOSS_LIMIT",
    "DEFAULT_REPLY_TIMEOUT_S",
    "DRAIN_LOOP_PASSES",
    "REPLY_ATTEMPTS",
    "REPLY_TYPES",
    "ClientError",
    "ControllerClient",
    "EmissionInhibited",
    "LinkClosed",
    "LinkStats",
    "NakReceived",
    "OutcomeUnknown",
    "Overflow",
    "ProtocolMismatch",
    "ReplyTimeout",
    "RoundTrip",
    "Subscription",
    "SubscriptionOverflow",
    "UnexpectedReply",
    "open_controller",
]
# Errors, statistics, subscriptions and reply rules live in their own modules.

log = structlog.get_logger()

DEFAULT_REPLY_TIMEOUT_S: Final = 0.100
"""ICD §6: replies come within 20 ms nominally; 100 ms without one is a link fault."""

DEFAULT_HEARTBEAT_INTERVAL_S: Final = 0.050
MAX_HEARTBEAT_INTERVAL_S: Final = 0.100
"""ICD §5: a PING at least every 100 ms keeps the 250 ms watchdog fed."""

REPLY_ATTEMPTS: Final = 3
"""Sends per repeatable request (the first and two more, each with a new seq):
its retry budget. ICD §6: a frame with a bad CRC is dropped silently, so on a
noisy line a reply can go missing while the link is healthy; with one frame in
a hundred lost each way, three misses of one request come once in ~10⁵ requests,
a real fault (a cut, a dead controller) misses every one and is seen within
REPLY_ATTEMPTS × reply_timeout_s."""

CONSECUTIVE_LOSS_LIMIT: Final = 3
"""Missed replies in a row, heartbeats included, that make a link fault (ICD §6:
"several requests in a row go unanswered"). Any reply in time resets the count;
a late reply does not, so a controller that always answers late still faults.
With the 50 ms heartbeat, a link that stops answering faults about
(CONSECUTIVE_LOSS_LIMIT - 1) × 50 ms + reply_timeout_s after its first miss."""

DRAIN_LOOP_PASSES: Final = 3
"""Event-loop passes a missed deadline waits before it is judged (ICD §6: a
frame already in the receive buffer before the deadline counts as in time).
After a stall, asyncio runs due timers in the same pass as the I/O callbacks
that read the socket, before the reader task has parsed those bytes; three
passes let the selector read what is waiting (pass 1), the reader task parse
it (pass 2) and the judgement see the outcome (pass 3). They cost
microseconds, not a wait."""

HEDGE_MIN_S: Final = 0.005
HEDGE_MAX_S: Final = 0.020
"""ICD §6's nominal reply time: an EMIT_STOP unanswered for longer is sent again."""
HEDGE_RTT_FACTOR: Final = 4
"""An EMIT_STOP is sent again once its reply is this many median round trips late
(within HEDGE_MIN_S..HEDGE_MAX_S): on a noisy line a lost EMIT_STOP frame would
otherwise be resent only after the 100 ms reply deadline, and the light stays on
meanwhile (measured: pad steps 0.5–1.95 % over at 1 % corruption; see
docs/performance.md). EMIT_STOP is idempotent (ICD §5a), so a second one is harmless."""

RTT_WINDOW: Final = 1000
"""Round trips kept for the percentiles (20 s of heartbeats)."""

T = TypeVar("T")
R = TypeVar("R", bound=Message)
A = TypeVar("A")


TelemetryListener = Callable[[Telemetry], None]
EventListener = Callable[[Event], None]
LinkLostListener = Callable[[LinkClosed], None]
ReplyTimeoutListener = Callable[[ReplyTimeout], None]
PongListener = Callable[[tuple[float, float, Pong]], None]


class ControllerClient(AsyncClosing):
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
        reply_attempts: int = REPLY_ATTEMPTS,
        consecutive_loss_limit: int = CONSECUTIVE_LOSS_LIMIT,
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
        if reply_attempts < 1 or consecutive_loss_limit < 1:
            raise ValueError("reply_attempts and consecutive_loss_limit must be at least 1")
        self._link = link
        self._log = log.bind(link=link.url)
        self.reply_timeout_s = reply_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.reply_attempts = reply_attempts
        self.consecutive_loss_limit = consecutive_loss_limit
        self._losses_in_a_row = 0
        self._decoder = StreamDecoder()
        self._pending = InFlight(first_seq)
        self._gate = WriteGate()
        self._reader_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._teardown_task: asyncio.Task[None] | None = None
        self._down: LinkClosed | None = None
        self._lost = False
        self._telemetry_listeners: Listeners[Telemetry] = self._new_listeners("telemetry")
        self._event_listeners: Listeners[Event] = self._new_listeners("event")
        self._link_lost_listeners: Listeners[LinkClosed] = self._new_listeners("link_lost")
        self._reply_timeout_listeners: Listeners[ReplyTimeout] = self._new_listeners(
            "reply_timeout"
        )
        self._pong_listeners: Listeners[tuple[float, float, Pong]] = self._new_listeners("pong")
        self._telemetry_subs: list[Subscription[Telemetry]] = []
        self._event_subs: list[Subscription[Event]] = []
        self._rtts = RoundTrips(rtt_window)
        self._tally = LinkTally()
        self._info: Info | None = None
        self._inhibit: str | None = None
        self.ports: dict[int, PortInfo] = {}
        """The last PORT_INFO of each port (filled by get_port / the handshake)."""
        self.last_telemetry_monotonic: float | None = None
        """Event-loop time of the last TELEMETRY, for the host's staleness check."""
        self.last_frame_monotonic: float | None = None
        """Event-loop time at which the last valid frame of any type (CRC good:
        telemetry, event or reply, late ones included) was read. ICD §6 judges
        the link on the controller's silence, not on one frame type: see
        :meth:`link_silence_s`."""

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
    def losses_in_a_row(self) -> int:
        """Replies missed since the last one that came in time."""
        return self._losses_in_a_row

    @property
    def link_faulted(self) -> bool:
        """True while the consecutive-loss limit is reached (until a reply comes in time)."""
        return self._losses_in_a_row >= self.consecutive_loss_limit

    def link_silence_s(self) -> float | None:
        """Seconds since the last valid frame of any type; None before the first.

        Cheap (one subtraction). To judge silence on the link rather than on
        the host's own scheduling, ``await drain()`` first after a wait that may
        have overslept: frames that were waiting are then counted.
        """
        if self.last_frame_monotonic is None:
            return None
        return asyncio.get_running_loop().time() - self.last_frame_monotonic

    async def drain(self) -> None:
        """Let the reader parse what already sits in the receive buffer.

        Takes DRAIN_LOOP_PASSES passes of the event loop (no waiting): after a
        stalled loop, the frames that arrived meanwhile have then been read and
        dispatched, so ``last_frame_monotonic`` and telemetry are up to date.
        """
        for _ in range(DRAIN_LOOP_PASSES):
            await asyncio.sleep(0)

    @property
    def stats(self) -> LinkStats:
        return self._tally.snapshot(self._decoder.stats, self.round_trip)

    @property
    def round_trip(self) -> RoundTrip:
        """Round-trip percentiles, recomputed only after a new reply."""
        return self._rtts.summary()

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
            self._log.debug("link.closing")
        if self._teardown_task is None:
            self._teardown_task = asyncio.get_running_loop().create_task(
                self._teardown(), name=f"pbm-teardown {self.url}"
            )
        await asyncio.shield(self._teardown_task)

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def _teardown(self) -> None:
        tasks = [t for t in (self._heartbeat_task, self._reader_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._link.close()
        except Exception as exc:
            self._log.warning("link.close_failed", error=str(exc))

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
        self._log.warning("link.lost", reason=reason, pending=len(self._pending))
        self._fail_pending(reason)
        self._end_subscriptions(reason)
        self._link_lost_listeners(LinkClosed(reason))
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
        return self._telemetry_listeners.add(callback)

    def add_event_listener(self, callback: EventListener) -> Callable[[], None]:
        return self._event_listeners.add(callback)

    def add_link_lost_listener(self, callback: LinkLostListener) -> Callable[[], None]:
        """Called once if the link fails (EOF or I/O error), not on close()."""
        return self._link_lost_listeners.add(callback)

    def add_pong_listener(self, callback: PongListener) -> Callable[[], None]:
        """Called with (sent_s, received_s, Pong) for every PING answered, heartbeats
        included, in event-loop time: what a host needs to map the device clock."""
        return self._pong_listeners.add(callback)

    def add_reply_timeout_listener(self, callback: ReplyTimeoutListener) -> Callable[[], None]:
        """Called for every missed reply deadline, heartbeats included (ICD §6 link fault)."""
        return self._reply_timeout_listeners.add(callback)

    def subscribe_telemetry(
        self, maxsize: int = 64, overflow: Overflow = Overflow.DROP_OLDEST
    ) -> Subscription[Telemetry]:
        def dropped(n: int) -> None:
            self._tally.telemetry_dropped += n

        sub: Subscription[Telemetry] = Subscription(
            "telemetry", maxsize, overflow, dropped, remover(self._telemetry_subs)
        )
        return self._attach(sub, self._telemetry_subs)

    def subscribe_events(
        self, maxsize: int = 1024, overflow: Overflow = Overflow.FAIL
    ) -> Subscription[Event]:
        """Events are lossless by default: overflow ends the subscription loudly."""

        def dropped(n: int) -> None:
            self._tally.events_dropped += n

        sub: Subscription[Event] = Subscription(
            "event", maxsize, overflow, dropped, remover(self._event_subs)
        )
        return self._attach(sub, self._event_subs)

    def _attach(self, sub: Subscription[T], subs: list[Subscription[T]]) -> Subscription[T]:
        if self._down is not None:
            sub._end(self._closed_error() if self._lost else None)
        else:
            subs.append(sub)
        return sub

    def _new_listeners(self, kind: str) -> Listeners[T]:
        def counted() -> None:
            self._tally.listener_errors += 1

        return Listeners(kind, log=self._log, on_error=counted)

    # ---- requests

    async def request(
        self,
        msg: Message,
        *,
        timeout_s: float | None = None,
        urgent: bool = False,
        give_up: Callable[[], bool] | None = None,
        hedge: bool = False,
    ) -> Message:
        """Send one request and return its reply (never a NAK: that raises).

        A missed reply to a repeatable request (replies.REPEATABLE_REQUESTS) is
        asked again with a new seq, up to ``reply_attempts`` sends, unless the
        link is faulted or ``give_up()`` says to stop. Raises NakReceived,
        UnexpectedReply, LinkClosed, OutcomeUnknown (EMIT_START or ARM
        unanswered, not sent again) or ReplyTimeout (the link is faulted). With
        ``hedge`` (idempotent requests only), a reply slower than hedge_after_s()
        sends the request again at once and the first good reply wins.
        """
        attempts = self.reply_attempts if isinstance(msg, REPEATABLE_REQUESTS) else 1
        for attempt in range(1, attempts + 1):
            futures = [await self._submit(msg, timeout_s, urgent)]
            try:
                if hedge:
                    await asyncio.wait(futures, timeout=self.hedge_after_s())
                    if not futures[0].done():
                        await self.drain()  # a reply already received was in time
                    if not futures[0].done():
                        self._tally.hedged_requests += 1
                        self._log.info("link.request_hedged", request=type(msg).__name__)
                        futures.append(await self._submit(msg, timeout_s, urgent))
                return await self._first_reply(futures)
            except ReplyMissed as missed:
                if attempt < attempts and not (give_up is not None and give_up()):
                    self._log.info(
                        "link.reply_missing_resent",
                        request=type(msg).__name__,
                        seq=missed.seq,
                        attempt=attempt,
                    )
                    continue
                if isinstance(msg, OUTCOME_UNKNOWN_REQUESTS):
                    raise OutcomeUnknown(msg, missed.seq, missed.timeout_s) from None
                # The retry budget is spent: a link fault even if replies to
                # other requests (heartbeats) came in between.
                raise self._link_fault(msg, missed.seq, missed.timeout_s) from None
            except BaseException:  # cancelled, or the hedge copy could not be sent
                for future in futures:
                    self._abandon(future)
                raise
        raise AssertionError("unreachable")

    async def _first_reply(self, futures: list[asyncio.Future[Message]]) -> Message:
        """The first good reply among copies of one request (the rest are abandoned);
        if none succeeds, the first copy's error."""
        try:
            waiting = set(futures)
            while waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    if future.exception() is None:
                        return future.result()
            return futures[0].result()
        finally:
            for future in futures[1:]:
                self._abandon(future)
            if not futures[0].done():
                self._abandon(futures[0])

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
        seq = self._pending.new_seq()
        frame = encode_frame(msg, seq)  # a value out of range fails here, before any state
        pending = Pending(msg, seq, loop.create_future(), timeout_s or self.reply_timeout_s)
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

    def _abandon(self, future: asyncio.Future[Message]) -> None:
        """Forget a request the caller gave up on; a reply to it will count as late."""
        for seq, p in list(self._pending.items()):
            if p.future is future:
                del self._pending[seq]
                if p.timer is not None:
                    p.timer.cancel()
                self._pending.remember_abandoned(seq)
        if future.done() and not future.cancelled():
            future.exception()  # retrieved: the caller is already raising
        else:
            future.cancel()

    def _expire(
        self, seq: int, future: asyncio.Future[Message], passes_left: int = DRAIN_LOOP_PASSES
    ) -> None:
        """The deadline passed: read what is waiting (DRAIN_LOOP_PASSES), then judge."""
        p = self._pending.get(seq)
        if p is None or p.future is not future or future.done():
            return
        if passes_left > 0:
            asyncio.get_running_loop().call_soon(self._expire, seq, future, passes_left - 1)
            return
        del self._pending[seq]
        self._pending.remember_abandoned(seq)
        self._tally.reply_timeouts += 1
        self._losses_in_a_row += 1
        self._log.warning(
            "link.reply_missing",
            request=type(p.request).__name__,
            seq=seq,
            in_a_row=self._losses_in_a_row,
        )
        if self.link_faulted:
            future.set_exception(self._link_fault(p.request, seq, p.timeout_s))
        else:
            future.set_exception(ReplyMissed(p.request, seq, p.timeout_s))

    def _link_fault(self, request: Message, seq: int, timeout_s: float) -> ReplyTimeout:
        """Declare the link faulty (ICD §6): tell the reply-timeout listeners."""
        error = ReplyTimeout(request, seq, timeout_s)
        self._tally.link_faults += 1
        self._log.warning("link.fault_replies_missing", request=type(request).__name__, seq=seq)
        self._reply_timeout_listeners(error)
        return error

    async def _call(
        self,
        msg: Message,
        reply_cls: type[R],
        *,
        urgent: bool = False,
        timeout_s: float | None = None,
        give_up: Callable[[], bool] | None = None,
        hedge: bool = False,
    ) -> R:
        reply = await self.request(
            msg, urgent=urgent, timeout_s=timeout_s, give_up=give_up, hedge=hedge
        )
        if not isinstance(reply, reply_cls):  # request() already checked; this narrows
            raise UnexpectedReply(msg, reply, f"expected {reply_cls.__name__}")
        return reply

    # ---- typed requests (ICD §3)

    async def hello(self, *, give_up: Callable[[], bool] | None = None) -> Info:
        info = await self._call(Hello(), Info, give_up=give_up)
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
        """Stop one port; hedged (HEDGE_RTT_FACTOR): a slow reply sends it again."""
        return await self._call(EmitStop(port), Stopped, hedge=True)

    def hedge_after_s(self) -> float:
        """How long an EMIT_STOP's reply may take before it is sent again."""
        p50_ms = self.round_trip.p50_ms
        guess_s = HEDGE_MIN_S if p50_ms is None else p50_ms * HEDGE_RTT_FACTOR / 1000.0
        return min(max(guess_s, HEDGE_MIN_S), HEDGE_MAX_S, self.reply_timeout_s / 2)

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
        info = await open_session(self, telemetry_hz)
        if heartbeat:
            self.start_heartbeat()
        return info

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
                self._log.exception("link.heartbeat_failed")
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
        if error is None or isinstance(error, (LinkClosed, ReplyMissed)):
            return  # a single miss is judged by the loss count, not here
        self._tally.heartbeat_failures += 1
        self._log.warning("link.heartbeat_failed", error=str(error))

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._link.read()
            except OSError as exc:
                self._lose(f"read failed: {exc}")
                return
            except Exception as exc:
                self._log.exception("link.read_failed")
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
                self._log.exception("link.reader_failed")
                self._lose(f"reader failed: {exc!r}")
                return

    def _dispatch(self, frame: Frame) -> None:
        self.last_frame_monotonic = asyncio.get_running_loop().time()
        if frame.msg_type in (Telemetry.TYPE, Event.TYPE):
            try:
                msg = frame.message()
            except CodecError as exc:
                self._tally.bad_payloads += 1
                self._log.warning("link.frame_malformed", type=frame.msg_type, error=str(exc))
                return
            if isinstance(msg, Telemetry):
                self._on_telemetry(msg)
            elif isinstance(msg, Event):
                self._on_event(msg)
        elif frame.msg_type in REPLY_TYPE_CODES:
            self._on_reply(frame)
        else:
            self._tally.unknown_types += 1
            self._log.warning("link.frame_type_unknown", type=f"0x{frame.msg_type:02X}")

    def _on_telemetry(self, msg: Telemetry) -> None:
        self._tally.telemetry_rx += 1
        self.last_telemetry_monotonic = asyncio.get_running_loop().time()
        self._telemetry_listeners(msg)
        for sub in tuple(self._telemetry_subs):
            sub.offer(msg)

    def _on_event(self, msg: Event) -> None:
        self._tally.events_rx += 1
        self._event_listeners(msg)
        for sub in tuple(self._event_subs):
            sub.offer(msg)

    def _on_reply(self, frame: Frame) -> None:
        p = self._pending.pop(frame.seq, None)
        if p is None or p.future.done():
            if self._pending.forget_abandoned(frame.seq) or p is not None:
                self._tally.late_replies += 1
                self._log.info("link.reply_late", seq=frame.seq, type=f"0x{frame.msg_type:02X}")
            else:
                self._tally.unmatched_replies += 1
                self._log.warning(
                    "link.reply_unmatched", seq=frame.seq, type=f"0x{frame.msg_type:02X}"
                )
            return
        if p.timer is not None:
            p.timer.cancel()
        if p.sent_at is not None:
            self._rtts.add((asyncio.get_running_loop().time() - p.sent_at) * 1000.0)
        self._losses_in_a_row = 0  # an answer in time: the link is working
        reply = check_reply(p.request, p.seq, frame)
        if isinstance(reply, ClientError):
            self._tally.naks += isinstance(reply, NakReceived)
            self._tally.unexpected_replies += isinstance(reply, UnexpectedReply)
            self._tally.bad_payloads += isinstance(reply, UnexpectedReply) and reply.reply is None
            p.future.set_exception(reply)
            return
        p.future.set_result(reply)
        if isinstance(reply, Pong) and p.sent_at is not None:
            received = asyncio.get_running_loop().time()
            self._pong_listeners((p.sent_at, received, reply))


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
