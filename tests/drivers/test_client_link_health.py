"""Link health over a window (ICD §6), against exact bytes.

One lost frame is not a link fault: a repeatable request is asked again with a
new seq, EMIT_START and ARM are never sent twice (the caller learns that their
outcome is unknown), and the link is faulted only when several requests in a
row go unanswered or one request's retry budget is spent. A reply that sat in
the host's receive buffer before its deadline is in time even if the host's
event loop was stalled past the deadline.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pbm_link_script import ScriptedLink, frames_of, wait_until
from test_client_transcript import (
    ACK_S5,
    EMIT_START_S5,
    GET_COUNTERS_1_S7,
    PING_S11,
    PONG_S11,
)

from pbmd.drivers import codec
from pbmd.drivers.client import (
    CONSECUTIVE_LOSS_LIMIT,
    REPLY_ATTEMPTS,
    ControllerClient,
    OutcomeUnknown,
    ReplyTimeout,
)
from pbmd.drivers.transport import TcpLink

H = bytes.fromhex

GET_COUNTERS_1_S8 = H("04010b080201040131af00")
PING_S12 = H("0401020c010103014000")
PING_S13 = H("0401020d010103b53600")
ARM_C0FFEE_S4 = H("04010504020404eeffc003fb0f00")


def test_the_literals_are_what_the_icd_says() -> None:
    assert codec.encode_frame(codec.GetCounters(1), 8) == GET_COUNTERS_1_S8
    assert codec.encode_frame(codec.Ping(), 12) == PING_S12
    assert codec.encode_frame(codec.Ping(), 13) == PING_S13
    assert codec.encode_frame(codec.Arm(0xC0FFEE), 4) == ARM_C0FFEE_S4


def test_the_limits_are_the_documented_ones() -> None:
    assert (REPLY_ATTEMPTS, CONSECUTIVE_LOSS_LIMIT) == (3, 3)


@pytest.fixture
async def link() -> ScriptedLink:
    return ScriptedLink()


async def test_a_missed_reply_to_a_repeatable_request_is_asked_again_with_a_new_seq(
    link: ScriptedLink,
) -> None:
    client = ControllerClient(link, first_seq=7, reply_timeout_s=0.03)
    faults: list[ReplyTimeout] = []
    client.add_reply_timeout_listener(faults.append)
    try:
        task = asyncio.create_task(client.get_counters(1))
        await link.expect(GET_COUNTERS_1_S7)
        # No reply to seq 7: after its deadline the same request goes out as seq 8.
        await link.expect(GET_COUNTERS_1_S8)
        counters = codec.encode_frame(
            codec.Counters(1, 0xC0FFEE, 0, 27_000_000, 1000, 1, 27_000_000), 8
        )
        link.feed(counters)
        reply = await task
        assert (reply.port, reply.delivered_uj) == (1, 27_000_000)
        # The lost reply to seq 7 turning up now is late, never taken for another.
        link.feed(codec.encode_frame(codec.Counters(1, 0, 0, 0, 0, 0, 0), 7))
        await wait_until(lambda: client.stats.late_replies == 1)
    finally:
        await client.close()
    assert link.writes == [GET_COUNTERS_1_S7, GET_COUNTERS_1_S8]
    assert faults == []
    stats = client.stats
    assert (stats.reply_timeouts, stats.link_faults) == (1, 0)
    assert client.losses_in_a_row == 0 and not client.link_faulted


async def test_the_link_is_faulted_after_the_consecutive_loss_limit(link: ScriptedLink) -> None:
    """Three misses in a row fault the link even when the request may be sent five times."""
    client = ControllerClient(link, first_seq=11, reply_timeout_s=0.02, reply_attempts=5)
    faults: list[ReplyTimeout] = []
    client.add_reply_timeout_listener(faults.append)
    try:
        with pytest.raises(ReplyTimeout) as caught:
            await client.ping()
        assert not isinstance(caught.value, OutcomeUnknown)
        assert caught.value.seq == 13
        assert faults == [caught.value]
        assert client.link_faulted
    finally:
        await client.close()
    assert link.writes == [PING_S11, PING_S12, PING_S13]
    assert (client.stats.reply_timeouts, client.stats.link_faults) == (3, 1)


async def test_the_retry_budget_of_one_request_is_a_link_fault(link: ScriptedLink) -> None:
    """Heartbeat replies in between reset the count, but one request asked three
    times without an answer still faults the link."""
    client = ControllerClient(link, first_seq=11, reply_timeout_s=0.03)
    faults: list[ReplyTimeout] = []
    client.add_reply_timeout_listener(faults.append)
    try:
        task = asyncio.create_task(client.ping())
        await link.expect(PING_S11)
        for _ in range(2):
            # An answered request of someone else (seq 12, then 14) between the attempts.
            other = asyncio.create_task(client.get_counters(1))
            (frame,) = frames_of(await link.next_write())
            assert frame.msg_type == codec.GetCounters.TYPE
            link.feed(codec.encode_frame(codec.Counters(1, 0, 0, 0, 0, 0, 0), frame.seq))
            await other
            assert client.losses_in_a_row == 0
            (again,) = frames_of(await link.next_write())
            assert again.msg_type == codec.Ping.TYPE
        with pytest.raises(ReplyTimeout) as caught:
            await task
        assert caught.value.seq == 15
        assert faults == [caught.value]
    finally:
        await client.close()
    pings = [f.seq for w in link.writes for f in frames_of(w) if f.msg_type == codec.Ping.TYPE]
    assert pings == [11, 13, 15]


@pytest.mark.parametrize(
    ("send", "wire"),
    [
        pytest.param(
            lambda c: c.emit_start(frames_of(EMIT_START_S5)[0].message()),
            EMIT_START_S5,
            id="EMIT_START",
        ),
        pytest.param(lambda c: c.arm(0xC0FFEE), ARM_C0FFEE_S4, id="ARM"),
    ],
)
async def test_emit_start_and_arm_are_never_sent_again(link: ScriptedLink, send, wire) -> None:  # type: ignore[no-untyped-def]
    seq = frames_of(wire)[0].seq
    client = ControllerClient(link, first_seq=seq, reply_timeout_s=0.02)
    faults: list[ReplyTimeout] = []
    client.add_reply_timeout_listener(faults.append)
    try:
        with pytest.raises(OutcomeUnknown) as caught:
            await send(client)
        assert isinstance(caught.value, ReplyTimeout)  # old callers: still a link fault
        assert caught.value.seq == seq and "outcome unknown" in str(caught.value)
        assert faults == []  # one lost frame is not a link fault
        assert not client.link_faulted
        # Its ACK turning up late is counted as late and answers nothing else.
        link.feed(ACK_S5 if seq == 5 else codec.encode_frame(codec.Ack(), seq))
        await wait_until(lambda: client.stats.late_replies == 1)
    finally:
        await client.close()
    assert link.writes == [wire]


# --- the host's own lateness is not the link's --------------------------------


async def test_a_reply_waiting_in_the_buffer_before_the_deadline_is_in_time() -> None:
    """The loop is blocked on purpose for 150 ms, past the 100 ms deadline, with
    the PONG already in the socket's receive buffer: it counts as in time."""
    host_sock, controller = socket.socketpair()
    controller.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=host_sock)
    client = ControllerClient(TcpLink("socket://pair", reader, writer), first_seq=11)
    faults: list[ReplyTimeout] = []
    client.add_reply_timeout_listener(faults.append)
    loop = asyncio.get_running_loop()
    try:
        task = asyncio.create_task(client.ping())
        assert await loop.sock_recv(controller, 64) == PING_S11
        sent_at = loop.time()
        controller.sendall(PONG_S11)  # in the host's receive buffer from now on
        time.sleep(0.15)  # noqa: ASYNC251 - the event loop stalls past the deadline on purpose
        assert loop.time() - sent_at > client.reply_timeout_s
        pong = await task
        assert pong.device_time_us == 123456789
    finally:
        await client.close()
        controller.close()
    assert faults == []
    assert (client.stats.reply_timeouts, client.stats.late_replies) == (0, 0)


async def test_link_silence_is_measured_from_the_last_valid_frame(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    client.start()
    try:
        assert client.link_silence_s() is None and client.last_frame_monotonic is None
        before = asyncio.get_running_loop().time()
        link.feed(H("04019108020e0480841e0101010104010301010103a28200"))  # an EVENT
        await wait_until(lambda: client.last_frame_monotonic is not None)
        assert client.last_frame_monotonic is not None
        assert client.last_frame_monotonic >= before
        silence = client.link_silence_s()
        assert silence is not None and 0 <= silence < 1.0
        last = client.last_frame_monotonic
        link.feed(b"\x13\x37\xff\xfe\x00")  # garbage is not a frame
        await client.drain()
        assert client.last_frame_monotonic == last
    finally:
        await client.close()
