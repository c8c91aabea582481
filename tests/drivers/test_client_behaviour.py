"""The client's behaviour around the bytes: NAKs, deadlines, link loss, the
heartbeat, subscriptions, write ordering and closing."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import AsyncIterator

import pytest
from pbm_link_script import (
    STRICT_LINK,
    WAIT_S,
    ScriptedLink,
    frames_of,
    pong_responder,
    wait_until,
)

from pbmd.drivers import codec
from pbmd.drivers.client import (
    ControllerClient,
    LinkClosed,
    NakReceived,
    Overflow,
    ReplyTimeout,
    SubscriptionOverflow,
)


@pytest.fixture
async def link() -> ScriptedLink:
    return ScriptedLink()


@pytest.fixture
async def client(link: ScriptedLink) -> AsyncIterator[ControllerClient]:
    c = ControllerClient(link)
    c.start()
    yield c
    await c.close()


def reply_to(link: ScriptedLink, msg: codec.Message) -> codec.Frame:
    """Answer the last write with ``msg`` (same seq) and return the request frame."""
    (request,) = frames_of(link.writes[-1])
    link.feed(codec.encode_frame(msg, request.seq))
    return request


# --- NAKs -------------------------------------------------------------------


@pytest.mark.parametrize("error", list(codec.NakError))
async def test_every_nak_code_maps_to_its_meaning(
    link: ScriptedLink, client: ControllerClient, error: codec.NakError
) -> None:
    command = codec.EmitStart(2, 830, 1, 100_000, 1000, 500, 1_000_000, 10_000)
    task = asyncio.create_task(client.emit_start(command))
    await link.wait_writes(1)
    request = reply_to(link, codec.Nak(error.value))
    with pytest.raises(NakReceived) as caught:
        await task
    nak = caught.value
    assert nak.code is error and nak.error is error
    assert nak.meaning == error.meaning
    assert nak.request == command and nak.seq == request.seq
    assert error.name in str(nak) and "EmitStart" in str(nak)
    assert client.stats.naks == 1


async def test_unknown_nak_code_is_kept_raw(link: ScriptedLink, client: ControllerClient) -> None:
    task = asyncio.create_task(client.clear_fault())
    await link.wait_writes(1)
    reply_to(link, codec.Nak(99))
    with pytest.raises(NakReceived) as caught:
        await task
    assert caught.value.code == 99 and caught.value.error is None
    assert "unknown NAK error 99" in caught.value.meaning


async def test_a_nak_does_not_disturb_other_requests(
    link: ScriptedLink, client: ControllerClient
) -> None:
    refused = asyncio.create_task(client.arm(7))
    answered = asyncio.create_task(client.ping())
    await link.wait_writes(2)
    arm, ping = (frames_of(w)[0] for w in link.writes)
    link.feed(
        codec.encode_frame(codec.Pong(42), ping.seq) + codec.encode_frame(codec.Nak(7), arm.seq)
    )
    assert (await answered).device_time_us == 42
    with pytest.raises(NakReceived):
        await refused


# --- deadlines ----------------------------------------------------------------


async def test_default_deadline_is_the_icd_limit(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    loop = asyncio.get_running_loop()
    try:
        start = loop.time()
        with pytest.raises(ReplyTimeout) as caught:
            await client.get_port(3)
        elapsed_s = loop.time() - start
    finally:
        await client.close()
    assert caught.value.timeout_s == pytest.approx(0.100)
    assert 0.095 <= elapsed_s < WAIT_S
    assert "no reply to GetPort" in str(caught.value) and "100 ms" in str(caught.value)
    assert isinstance(caught.value, TimeoutError)
    assert client.pending_count == 0


async def test_deadline_is_configurable_per_client_and_per_request(link: ScriptedLink) -> None:
    # One send per request and the first miss a link fault, so each miss is one timeout.
    client = ControllerClient(link, reply_timeout_s=0.02, **STRICT_LINK)
    try:
        with pytest.raises(ReplyTimeout) as caught:
            await client.ping()
        assert caught.value.timeout_s == pytest.approx(0.02)
        with pytest.raises(ReplyTimeout) as caught:
            await client.request(codec.Ping(), timeout_s=0.01)
        assert caught.value.timeout_s == pytest.approx(0.01)
    finally:
        await client.close()
    assert client.stats.reply_timeouts == 2


async def test_cancelled_request_frees_its_seq_and_its_reply_counts_as_late(
    link: ScriptedLink, client: ControllerClient
) -> None:
    task = asyncio.create_task(client.ping())
    await link.wait_writes(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.pending_count == 0
    reply_to(link, codec.Pong(1))
    await wait_until(lambda: client.stats.late_replies == 1)


async def test_seq_wraps_at_16_bits_and_skips_seqs_still_pending(link: ScriptedLink) -> None:
    client = ControllerClient(link, first_seq=0xFFFF)
    try:
        held = asyncio.create_task(client.request(codec.Ping(), timeout_s=WAIT_S))
        wrapped = asyncio.create_task(client.ping())
        await link.wait_writes(2)
        assert [frames_of(w)[0].seq for w in link.writes] == [0xFFFF, 0x0000]
        reply_to(link, codec.Pong(0))
        await wrapped

        # Once the counter comes round again, 0xFFFF is still waiting: skip it.
        client._pending._next_seq = 0xFFFF  # stands for 65535 requests later
        third = asyncio.create_task(client.ping())
        await link.wait_writes(3)
        assert frames_of(link.writes[2])[0].seq == 0x0000
        reply_to(link, codec.Pong(0))
        await third
        link.feed(codec.encode_frame(codec.Pong(9), 0xFFFF))
        assert await held == codec.Pong(9)
    finally:
        await client.close()


async def test_out_of_range_values_fail_before_anything_is_sent(
    link: ScriptedLink, client: ControllerClient
) -> None:
    with pytest.raises(codec.FieldRangeError):
        await client.get_counters(256)
    with pytest.raises(ValueError, match="non-zero"):
        await client.arm(0)
    with pytest.raises(TypeError, match="not a host request"):
        await client.request(codec.Ack())
    assert link.writes == [] and client.pending_count == 0


# --- link loss ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["eof", "read_error"])
async def test_link_loss_fails_pending_and_notifies_once(link: ScriptedLink, how: str) -> None:
    client = ControllerClient(link)
    lost: list[LinkClosed] = []
    client.add_link_lost_listener(lost.append)
    telemetry = client.subscribe_telemetry()
    try:
        client.start_heartbeat()
        pending = asyncio.create_task(client.request(codec.GetCounters(1), timeout_s=WAIT_S))
        await wait_until(lambda: client.pending_count >= 2)
        if how == "eof":
            link.feed_eof()
        else:
            link.feed_error(OSError(5, "Input/output error"))
        with pytest.raises(LinkClosed) as caught:
            await pending
        assert "end of stream" in str(caught.value) or "Input/output error" in str(caught.value)
        await wait_until(lambda: link.closed)
        assert len(lost) == 1 and lost[0].reason == caught.value.reason
        assert not client.is_open and client.link_lost
        assert not client.heartbeat_running
        writes_after_loss = len(link.writes)
        with pytest.raises(LinkClosed):
            await client.ping()
        with pytest.raises(LinkClosed):
            await anext(telemetry)
        with pytest.raises(LinkClosed):
            client.start_heartbeat()
        assert len(link.writes) == writes_after_loss
    finally:
        await client.close()
    assert len(lost) == 1  # close() after a loss does not notify again


async def test_write_failure_is_a_link_loss(link: ScriptedLink, client: ControllerClient) -> None:
    lost: list[LinkClosed] = []
    client.add_link_lost_listener(lost.append)
    link.write_error = BrokenPipeError(32, "Broken pipe")
    with pytest.raises(LinkClosed, match="write failed"):
        await client.all_off()
    assert len(lost) == 1 and not client.is_open


async def test_listener_exception_is_contained(
    link: ScriptedLink, client: ControllerClient
) -> None:
    def broken(_: codec.Telemetry | codec.Event | LinkClosed) -> None:
        raise RuntimeError("a dashboard bug")

    got: list[codec.Event] = []
    client.add_telemetry_listener(broken)
    client.add_event_listener(broken)
    client.add_event_listener(got.append)
    client.add_link_lost_listener(broken)
    tel = codec.Telemetry(1, 0, 7, 0, ())
    ev = codec.Event(2, 0, codec.EventCode.INTERLOCK_CHANGED, 7)
    link.feed(codec.encode_frame(tel, 1) + codec.encode_frame(ev, 2))
    await wait_until(lambda: len(got) == 1)
    ping = asyncio.create_task(client.ping())  # the reader is still alive
    await link.wait_writes(1)
    reply_to(link, codec.Pong(3))
    await ping
    link.feed_eof()
    await wait_until(lambda: not client.is_open)
    assert client.stats.listener_errors == 3


async def test_removed_listener_is_not_called(link: ScriptedLink, client: ControllerClient) -> None:
    first: list[codec.Event] = []
    second: list[codec.Event] = []
    remove = client.add_event_listener(first.append)
    client.add_event_listener(second.append)
    remove()
    link.feed(codec.encode_frame(codec.Event(1, 0, 2, 7), 1))
    await wait_until(lambda: len(second) == 1)
    assert first == []


# --- heartbeat ----------------------------------------------------------------


async def test_heartbeat_pings_every_50_ms(link: ScriptedLink) -> None:
    link.responder = pong_responder
    client = ControllerClient(link)
    try:
        client.start_heartbeat()
        await link.wait_writes(21, timeout_s=5.0)
    finally:
        await client.close()
    pings = [
        t
        for w, t in zip(link.writes, link.write_times, strict=True)
        if frames_of(w)[0].msg_type == codec.Ping.TYPE
    ]
    gaps_s = [b - a for a, b in itertools.pairwise(pings)]
    window_s = pings[20] - pings[0]
    # 20 intervals of 50 ms; the schedule is absolute, so jitter does not accumulate.
    assert 0.95 <= window_s <= 1.15, window_s
    assert statistics.median(gaps_s[:20]) == pytest.approx(0.050, abs=0.01)
    assert max(gaps_s[:20]) <= 0.100, gaps_s  # ICD §5: ≤ 100 ms keeps the watchdog fed
    stats = client.stats
    assert stats.heartbeats_sent >= 21 and stats.heartbeat_failures == 0
    assert stats.rtt_ms.count >= 20 and stats.rtt_ms.max_ms is not None
    assert stats.rtt_ms.p50_ms is not None and stats.rtt_ms.p99_ms is not None
    assert stats.rtt_ms.p50_ms <= stats.rtt_ms.p99_ms <= stats.rtt_ms.max_ms


async def test_heartbeat_stops_on_close(link: ScriptedLink) -> None:
    link.responder = pong_responder
    client = ControllerClient(link)
    client.start_heartbeat()
    await link.wait_writes(3)
    await client.close()
    assert not client.heartbeat_running
    count = len(link.writes)
    # The heartbeat task has finished, so nothing can write any more.
    assert client._heartbeat_task is not None and client._heartbeat_task.done()
    assert len(link.writes) == count


async def test_heartbeat_keeps_going_without_replies_and_reports_them(link: ScriptedLink) -> None:
    client = ControllerClient(link, reply_timeout_s=0.03, heartbeat_interval_s=0.02)
    timeouts: list[ReplyTimeout] = []
    client.add_reply_timeout_listener(timeouts.append)
    try:
        client.start_heartbeat()
        await wait_until(lambda: len(timeouts) >= 3)
        await link.wait_writes(5)
    finally:
        await client.close()
    assert client.stats.heartbeat_failures >= 3
    assert all(isinstance(t.request, codec.Ping) for t in timeouts)


async def test_heartbeat_interval_must_feed_the_watchdog(link: ScriptedLink) -> None:
    with pytest.raises(ValueError, match="watchdog"):
        ControllerClient(link, heartbeat_interval_s=0.25)


# --- write path -----------------------------------------------------------------


async def test_all_off_jumps_the_write_queue(link: ScriptedLink, client: ControllerClient) -> None:
    link.hold_writes = asyncio.Event()
    first = asyncio.create_task(client.get_counters(1))
    await asyncio.wait_for(link.write_entered.wait(), WAIT_S)  # GET_COUNTERS is on the wire
    queued = asyncio.create_task(client.emit_stop(2))
    await wait_until(lambda: client.pending_count == 2)
    safety = asyncio.create_task(client.all_off())
    await wait_until(lambda: client.pending_count == 3)
    link.hold_writes.set()
    await link.wait_writes(3)
    order = [frames_of(w)[0].msg_type for w in link.writes]
    assert order == [codec.GetCounters.TYPE, codec.AllOff.TYPE, codec.EmitStop.TYPE]
    for w in link.writes:
        (request,) = frames_of(w)
        reply: codec.Message = {
            codec.GetCounters.TYPE: codec.Counters(1, 0, 0, 0, 0, 0, 0),
            codec.AllOff.TYPE: codec.Ack(),
            codec.EmitStop.TYPE: codec.Stopped(2, 0, 0, 0),
        }[request.msg_type]
        link.feed(codec.encode_frame(reply, request.seq))
    await asyncio.gather(first, queued, safety)


async def test_concurrent_requests_never_interleave_frames(
    link: ScriptedLink, client: ControllerClient
) -> None:
    link.yield_inside_write = True
    link.responder = pong_responder
    results = await asyncio.gather(*(client.ping() for _ in range(50)))
    assert len(results) == 50
    assert link.max_writers_inside == 1
    seqs = [frames_of(w)[0].seq for w in link.writes]
    assert len(set(seqs)) == 50


# --- subscriptions ----------------------------------------------------------------


def telemetry(n: int) -> bytes:
    return codec.encode_frame(codec.Telemetry(n, 2, 7, 0, ()), n)


async def test_telemetry_subscription_drops_oldest_and_counts(
    link: ScriptedLink, client: ControllerClient
) -> None:
    with client.subscribe_telemetry(maxsize=3) as sub:
        # Nobody reads while five arrive, with a reply in the same chunk: the
        # reader must neither block nor lose the reply.
        ping = asyncio.create_task(client.ping())
        await link.wait_writes(1)
        (request,) = frames_of(link.writes[0])
        link.feed(
            b"".join(telemetry(n) for n in range(1, 6))
            + codec.encode_frame(codec.Pong(1), request.seq)
        )
        await ping
        assert len(sub) == 3
        got = [(await anext(sub)).device_time_us for _ in range(3)]
    assert got == [3, 4, 5]
    assert sub.dropped == 2 and client.stats.telemetry_dropped == 2
    assert sub.ended


async def test_event_subscription_is_lossless_or_fails_loudly(
    link: ScriptedLink, client: ControllerClient
) -> None:
    sub = client.subscribe_events(maxsize=2)
    drop_sub = client.subscribe_events(maxsize=2, overflow=Overflow.DROP_OLDEST)
    events = [codec.Event(n, 1, codec.EventCode.EMISSION_ENDED, 1) for n in range(3)]
    link.feed(b"".join(codec.encode_frame(e, i) for i, e in enumerate(events)))
    await wait_until(lambda: client.stats.events_rx == 3)
    assert [await anext(sub), await anext(sub)] == events[:2]
    with pytest.raises(SubscriptionOverflow):
        await anext(sub)
    assert [await anext(drop_sub), await anext(drop_sub)] == events[1:]
    assert client.stats.events_dropped == 2


async def test_subscription_iterates_until_close(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    client.start()
    sub = client.subscribe_telemetry()
    got: list[int] = []

    async def consume() -> None:
        async for t in sub:
            got.append(t.device_time_us)

    consumer = asyncio.create_task(consume())
    link.feed(telemetry(1), telemetry(2))
    await wait_until(lambda: len(got) == 2)
    await client.close()
    await asyncio.wait_for(consumer, WAIT_S)  # ends cleanly, no exception
    assert got == [1, 2]
    late = client.subscribe_telemetry()
    with pytest.raises(StopAsyncIteration):
        await anext(late)


async def test_subscription_sizes_are_checked(client: ControllerClient) -> None:
    with pytest.raises(ValueError):
        client.subscribe_telemetry(maxsize=0)


# --- close ------------------------------------------------------------------------


async def test_close_is_idempotent_and_fails_pending(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    lost: list[LinkClosed] = []
    client.add_link_lost_listener(lost.append)
    client.start_heartbeat()
    pending = asyncio.create_task(client.request(codec.GetCounters(1), timeout_s=WAIT_S))
    await wait_until(lambda: client.pending_count >= 1)
    await asyncio.gather(client.close(), client.close())
    await client.close()
    with pytest.raises(LinkClosed, match="client closed"):
        await pending
    with pytest.raises(LinkClosed):
        await client.hello()
    assert link.closed and lost == [] and not client.link_lost
    assert all(t.done() for t in (client._reader_task, client._heartbeat_task) if t)


async def test_close_without_start(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    await client.close()
    assert link.closed


async def test_async_context_manager(link: ScriptedLink) -> None:
    link.responder = pong_responder
    async with ControllerClient(link) as client:
        assert (await client.ping()).device_time_us == 1_000
    assert link.closed and not client.is_open


async def test_info_before_hello_is_an_error(client: ControllerClient) -> None:
    with pytest.raises(RuntimeError, match="HELLO"):
        _ = client.info


async def test_a_reader_bug_fails_the_link_loudly(
    link: ScriptedLink, client: ControllerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(frame: codec.Frame) -> None:
        raise AssertionError("bug")

    lost: list[LinkClosed] = []
    client.add_link_lost_listener(lost.append)
    monkeypatch.setattr(client, "_dispatch", explode)
    link.feed(telemetry(1))
    await wait_until(lambda: bool(lost))
    assert "reader failed" in lost[0].reason


async def test_a_request_cancelled_in_the_write_queue_is_never_sent(
    link: ScriptedLink, client: ControllerClient
) -> None:
    link.hold_writes = asyncio.Event()
    link.responder = pong_responder
    first = asyncio.create_task(client.ping())
    await asyncio.wait_for(link.write_entered.wait(), WAIT_S)
    queued = asyncio.create_task(client.emit_stop(1))
    await wait_until(lambda: client.pending_count == 2)
    queued.cancel()
    link.hold_writes.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await queued
    await client.ping()  # the gate is free again
    assert [frames_of(w)[0].msg_type for w in link.writes] == [codec.Ping.TYPE] * 2


async def test_write_gate_passes_on_a_grant_its_waiter_no_longer_wants() -> None:
    from pbmd.drivers.write_gate import WriteGate as _WriteGate

    gate = _WriteGate()
    await gate.acquire(urgent=False)
    waiter = asyncio.create_task(gate.acquire(urgent=False))
    await wait_until(lambda: len(gate._normal) == 1)
    gate.release()  # granted to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(gate.acquire(urgent=True), WAIT_S)  # not stuck
    gate.release()
