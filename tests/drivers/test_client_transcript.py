"""The client against exact bytes (ICD §2–4): every request it writes and every
reply it is fed is spelled out in hex, so these tests pin the wire format
independently of the codec that produced it.
"""

from __future__ import annotations

import asyncio

import pytest
from pbm_link_script import STRICT_LINK, ScriptedLink, frames_of, wait_until

from pbmd.drivers import codec
from pbmd.drivers.client import (
    ControllerClient,
    NakReceived,
    ProtocolMismatch,
    ReplyTimeout,
    UnexpectedReply,
)

H = bytes.fromhex

# Host → controller, seq in the name.
HELLO_1 = H("04010101010103559700")
GET_PORT_1_S2 = H("0401030202010401dde400")
SET_TELEMETRY_50_S3 = H("04010403020202320354f700")
ARM_C0FFEE_S4 = H("04010504020404eeffc003fb0f00")
EMIT_START_S5 = H("04010705021a040194020420a1070101010107e80380c3c90101010103e8fd0103d42400")
EMIT_STOP_1_S6 = H("040108060201040179ae00")
GET_COUNTERS_1_S7 = H("04010b0702010401c8ca00")
ALL_OFF_S8 = H("040109080101030f6600")
DISARM_S9 = H("04010609010103427500")
CLEAR_FAULT_S10 = H("04010a0a010103b56500")
PING_S11 = H("0401020b0101032c1100")

# Controller → host.
INFO_1 = H(
    "040181010224040101c802fa0fd00750424d2d53494d2d3030303101010106312e302e30010101010101031a4000"
)
PORT_INFO_1_S2 = H(
    "0401830202290d010144554f2d30303030303101035046010702940240771b020301010106"
    "3e03e03229020301010103b5cf00"
)
ACK_S3 = H("04018003010103bcf200")
ACK_S4 = H("0401800401010391a300")
ACK_S5 = H("0401800501010325d500")
STOPPED_S6 = H("04018806020e0601c0fc9b0101010103f0d2010401e0bf00")
COUNTERS_S7 = H("04018b07021b0501eeffc00105c0fc9b0101010103f0d2010601c0fc9b0101010103c90300")
ACK_S8 = H("04018008010103a3ec00")
ACK_S9 = H("04018009010103179a00")
ACK_S10 = H("0401800a010103cb0100")
PONG_S11 = H("0401820b02080515cd5b0701010103e68400")
NAK_5_S4 = H("0401fe040201040523b600")
TELEMETRY_DEV_S7 = H(
    "04019007021d0440420f010101010102070102010101010101010101010101010105c409f76700"
)
EVENT_DEV_S8 = H("04019108020e0480841e0101010104010301010103a28200")

GARBAGE = b"\x13\x37\xff\xfe\x00"  # not COBS of anything valid, then a delimiter
BAD_CRC_ACK_S3 = ACK_S3[:-3] + bytes([ACK_S3[-3] ^ 0x01]) + ACK_S3[-2:]


def test_frames_are_what_the_icd_says() -> None:
    """The literals above are ICD frames (checked with the codec once, here)."""
    assert codec.encode_frame(codec.Hello(), 1) == HELLO_1
    assert codec.encode_frame(codec.Ping(), 11) == PING_S11
    assert codec.iter_frames([BAD_CRC_ACK_S3]) == []
    assert codec.encode_frame(codec.Pong(123456789), 11) == PONG_S11


@pytest.fixture
async def link() -> ScriptedLink:
    return ScriptedLink()


async def test_handshake_transcript_with_split_replies_and_noise(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    seen: list[codec.Telemetry] = []
    client.add_telemetry_listener(seen.append)
    try:
        task = asyncio.create_task(client.handshake(telemetry_hz=50, heartbeat=False))

        await link.expect(HELLO_1)
        # INFO split at awkward places: inside the COBS code, the serial, the CRC.
        link.feed(INFO_1[:1], INFO_1[1:9], INFO_1[9:30], INFO_1[30:-2], INFO_1[-2:])

        await link.expect(GET_PORT_1_S2)
        # Garbage and a bad-CRC frame ahead of the reply, all in one chunk.
        link.feed(GARBAGE + BAD_CRC_ACK_S3 + PORT_INFO_1_S2)

        await link.expect(SET_TELEMETRY_50_S3)
        # The ACK and the first telemetry frame arrive in one read.
        link.feed(ACK_S3 + TELEMETRY_DEV_S7)

        info = await task
        await wait_until(lambda: len(seen) == 1)
    finally:
        await client.close()

    assert info == codec.Info(1, 1, 200, 250, 2000, "PBM-SIM-0001", "1.0.0")
    assert client.info is info
    assert list(client.ports) == [1]
    port = client.ports[1]
    assert (port.applicator_kind, port.applicator_serial, port.area_mm2) == (1, "DUO-000001", 18000)
    assert [c.wavelength_nm for c in port.channels] == [660, 830]
    assert seen[0].device_time_us == 1_000_000 and seen[0].ports[0].temp_centi_c == 2500
    stats = client.stats
    assert stats.frames_tx == 3
    assert stats.frames_rx == 4
    assert stats.crc_errors == 1
    assert stats.dropped["cobs"] == 1
    assert stats.telemetry_rx == 1
    assert stats.unmatched_replies == 0
    assert stats.rtt_ms.count == 3


async def test_session_transcript(link: ScriptedLink) -> None:
    client = ControllerClient(link, first_seq=4)
    try:
        task = asyncio.create_task(client.arm(0xC0FFEE))
        await link.expect(ARM_C0FFEE_S4)
        link.feed(ACK_S4)
        await task

        start = codec.EmitStart(1, 660, 0, 500_000, 0, 1000, 30_000_000, 65_000)
        task = asyncio.create_task(client.emit_start(start))
        await link.expect(EMIT_START_S5)
        link.feed(ACK_S5)
        await task

        stopped_task = asyncio.create_task(client.emit_stop(1))
        await link.expect(EMIT_STOP_1_S6)
        link.feed(EVENT_DEV_S8 + STOPPED_S6)  # an event may precede the reply
        stopped = await stopped_task
        assert stopped == codec.Stopped(1, 27_000_000, 54_000, 1)

        counters_task = asyncio.create_task(client.get_counters(1))
        await link.expect(GET_COUNTERS_1_S7)
        link.feed(COUNTERS_S7)
        counters = await counters_task
        assert counters == codec.Counters(1, 0xC0FFEE, 0, 27_000_000, 54_000, 1, 27_000_000)

        task = asyncio.create_task(client.all_off())
        await link.expect(ALL_OFF_S8)
        link.feed(ACK_S8)
        await task

        task = asyncio.create_task(client.disarm())
        await link.expect(DISARM_S9)
        link.feed(ACK_S9)
        await task

        task = asyncio.create_task(client.clear_fault())
        await link.expect(CLEAR_FAULT_S10)
        link.feed(ACK_S10)
        await task

        pong_task = asyncio.create_task(client.ping())
        await link.expect(PING_S11)
        link.feed(PONG_S11)
        assert (await pong_task).device_time_us == 123456789
    finally:
        await client.close()
    assert client.stats.events_rx == 1


async def test_nak_in_transcript(link: ScriptedLink) -> None:
    client = ControllerClient(link, first_seq=4)
    try:
        task = asyncio.create_task(client.arm(0xC0FFEE))
        await link.expect(ARM_C0FFEE_S4)
        link.feed(NAK_5_S4)
        with pytest.raises(NakReceived) as caught:
            await task
    finally:
        await client.close()
    assert caught.value.code is codec.NakError.NOT_ARMED
    assert caught.value.request == codec.Arm(0xC0FFEE)


async def test_out_of_order_replies_in_one_chunk(link: ScriptedLink) -> None:
    client = ControllerClient(link, first_seq=6)
    try:
        stop = asyncio.create_task(client.emit_stop(1))
        counters = asyncio.create_task(client.get_counters(1))
        await link.expect(EMIT_STOP_1_S6)
        await link.expect(GET_COUNTERS_1_S7)
        # Replies in the opposite order, with telemetry between them, in one read.
        link.feed(COUNTERS_S7 + TELEMETRY_DEV_S7 + STOPPED_S6)
        assert (await counters).session_token == 0xC0FFEE
        assert (await stop).delivered_uj == 27_000_000
    finally:
        await client.close()


async def test_late_reply_after_timeout_is_counted_and_ignored(link: ScriptedLink) -> None:
    client = ControllerClient(link, first_seq=11, reply_timeout_s=0.02, **STRICT_LINK)
    timeouts: list[ReplyTimeout] = []
    client.add_reply_timeout_listener(timeouts.append)
    try:
        with pytest.raises(ReplyTimeout) as caught:
            await client.ping()
        assert caught.value.seq == 11 and isinstance(caught.value.request, codec.Ping)
        assert timeouts == [caught.value]
        await link.expect(PING_S11)

        # The next request must not reuse seq 11, so the late PONG cannot answer it.
        task = asyncio.create_task(client.ping())
        second = codec.iter_frames([await link.next_write()])[0]
        assert second.seq == 12 and second.msg_type == codec.Ping.TYPE
        link.feed(PONG_S11)  # late reply to seq 11
        await wait_until(lambda: client.stats.late_replies == 1)
        assert not task.done()
        link.feed(codec.encode_frame(codec.Pong(5), 12))
        assert (await task).device_time_us == 5
    finally:
        await client.close()
    stats = client.stats
    assert (stats.reply_timeouts, stats.late_replies, stats.unmatched_replies) == (1, 1, 0)


async def test_reply_to_no_request_is_counted(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    client.start()
    try:
        link.feed(ACK_S8 + TELEMETRY_DEV_S7)
        await wait_until(lambda: client.stats.telemetry_rx == 1)
    finally:
        await client.close()
    assert client.stats.unmatched_replies == 1


async def test_reply_of_the_wrong_type_raises(link: ScriptedLink) -> None:
    client = ControllerClient(link, first_seq=11)
    try:
        task = asyncio.create_task(client.ping())
        await link.expect(PING_S11)
        link.feed(codec.encode_frame(codec.Ack(), 11))
        with pytest.raises(UnexpectedReply, match="got Ack, expected Pong"):
            await task
    finally:
        await client.close()
    assert client.stats.unexpected_replies == 1


async def test_reply_for_another_port_raises(link: ScriptedLink) -> None:
    client = ControllerClient(link, first_seq=7)
    try:
        task = asyncio.create_task(client.get_counters(1))
        await link.expect(GET_COUNTERS_1_S7)
        link.feed(codec.encode_frame(codec.Counters(2, 0, 0, 0, 0, 0, 0), 7))
        with pytest.raises(UnexpectedReply, match="port 2, asked for port 1"):
            await task
    finally:
        await client.close()


async def test_malformed_reply_payload_raises(link: ScriptedLink) -> None:
    client = ControllerClient(link, first_seq=11)
    try:
        task = asyncio.create_task(client.ping())
        await link.expect(PING_S11)
        body = codec.encode_body(codec.Pong.TYPE, 11, b"\x01\x02\x03")  # PONG needs 8 bytes
        link.feed(codec.cobs_encode(body) + b"\x00")
        with pytest.raises(UnexpectedReply, match="malformed"):
            await task
    finally:
        await client.close()
    assert client.stats.bad_payloads == 1


async def test_unknown_and_wrong_direction_types_are_counted(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    client.start()
    try:
        unknown = codec.cobs_encode(codec.encode_body(0x42, 1, b"")) + b"\x00"
        host_type = codec.encode_frame(codec.Hello(), 2)  # a device never sends HELLO
        short_body = codec.encode_body(codec.Telemetry.TYPE, 3, b"\x00")
        bad_telemetry = codec.cobs_encode(short_body) + b"\x00"
        link.feed(unknown + host_type + bad_telemetry + EVENT_DEV_S8)
        await wait_until(lambda: client.stats.events_rx == 1)
    finally:
        await client.close()
    stats = client.stats
    assert (stats.unknown_types, stats.bad_payloads) == (2, 1)


async def test_a_late_handshake_reply_is_asked_again(link: ScriptedLink) -> None:
    """Nothing emits during the handshake, so a missed deadline there is retried."""
    client = ControllerClient(link, reply_timeout_s=0.03)
    try:
        task = asyncio.create_task(client.handshake(telemetry_hz=50, heartbeat=False))
        await link.expect(HELLO_1)
        # No answer to seq 1: the client asks again with seq 2 after its deadline.
        await link.wait_writes(2)
        (again,) = frames_of(link.writes[1])
        assert (again.message(), again.seq) == (codec.Hello(), 2)
        link.feed(codec.encode_frame(codec.Info(1, 1, 200, 250, 2000, "S", "1.0"), 2))
        await link.wait_writes(3)
        (get_port,) = frames_of(link.writes[2])
        assert get_port.message() == codec.GetPort(1)
        (port_info,) = frames_of(PORT_INFO_1_S2)
        link.feed(codec.encode_frame(port_info.message(), get_port.seq))
        await link.wait_writes(4)
        (set_telemetry,) = frames_of(link.writes[3])
        link.feed(codec.encode_frame(codec.Ack(), set_telemetry.seq))
        info = await task
    finally:
        await client.close()
    assert info.serial == "S" and list(client.ports) == [1]
    assert client.stats.reply_timeouts == 1


async def test_the_handshake_gives_up_after_three_missed_deadlines(link: ScriptedLink) -> None:
    client = ControllerClient(link, reply_timeout_s=0.02)
    try:
        with pytest.raises(ReplyTimeout, match="Hello"):
            await client.handshake(telemetry_hz=50, heartbeat=False)
    finally:
        await client.close()
    sent = [f for w in link.writes for f in frames_of(w)]
    assert [(f.message(), f.seq) for f in sent] == [(codec.Hello(), seq) for seq in (1, 2, 3)]
    assert client.stats.reply_timeouts == 3


async def test_protocol_version_2_is_refused(link: ScriptedLink) -> None:
    client = ControllerClient(link)
    try:
        task = asyncio.create_task(client.handshake(50, heartbeat=False))
        await link.expect(HELLO_1)
        link.feed(codec.encode_frame(codec.Info(2, 4, 200, 250, 2000, "X", "2.0"), 1))
        with pytest.raises(ProtocolMismatch, match="protocol version 2") as caught:
            await task
        assert caught.value.info is not None and caught.value.info.protocol_version == 2
        assert link.writes == [HELLO_1]  # nothing else was sent to it
    finally:
        await client.close()


async def test_frames_of_another_version_are_reported_as_mismatch(link: ScriptedLink) -> None:
    client = ControllerClient(link, reply_timeout_s=0.03)
    try:
        task = asyncio.create_task(client.handshake(50, heartbeat=False))
        await link.expect(HELLO_1)
        body = bytearray(codec.encode_body(codec.Info.TYPE, 1, b"\x02" + bytes(35)))
        body[0] = 2  # header version 2, CRC recomputed
        body[-2:] = codec.CRC.pack(codec.crc16_ccitt_false(bytes(body[:-2])))
        link.feed(codec.cobs_encode(bytes(body)) + b"\x00")
        with pytest.raises(ProtocolMismatch, match="another protocol version"):
            await task
    finally:
        await client.close()


async def test_telemetry_rate_above_the_controller_maximum_is_refused_locally(
    link: ScriptedLink,
) -> None:
    client = ControllerClient(link)
    try:
        task = asyncio.create_task(client.handshake(500, heartbeat=False))
        await link.expect(HELLO_1)
        link.feed(INFO_1)
        with pytest.raises(ValueError, match="max_telemetry_hz"):
            await task
    finally:
        await client.close()


async def test_a_lost_emit_stop_is_sent_again_before_the_reply_deadline(
    link: ScriptedLink,
) -> None:
    """A noisy line loses the EMIT_STOP frame: the client sends it again with a new
    seq after hedge_after_s(), long before the 100 ms reply deadline, and takes the
    first reply; the reply to the lost copy, if it ever comes, counts as late."""
    client = ControllerClient(link, first_seq=6)
    try:
        assert client.hedge_after_s() < client.reply_timeout_s / 2
        stop = asyncio.create_task(client.emit_stop(1))
        await link.expect(EMIT_STOP_1_S6)  # lost on the way: never answered
        await link.expect(codec.encode_frame(codec.EmitStop(1), 7))  # the same, new seq
        link.feed(codec.encode_frame(codec.Stopped(1, 27_000_000, 54_000, 1), 7))
        assert (await stop).delivered_uj == 27_000_000
        link.feed(STOPPED_S6)  # the first copy's reply after all
        await wait_until(lambda: client.stats.late_replies == 1)
    finally:
        await client.close()
    stats = client.stats
    assert (stats.hedged_requests, stats.reply_timeouts, stats.unmatched_replies) == (1, 0, 0)


async def test_the_first_reply_to_either_copy_of_a_hedged_emit_stop_wins(
    link: ScriptedLink,
) -> None:
    """Only the reply to the first copy was slow: it answers the call, and the second
    copy's reply is late, not a reply to no request."""
    client = ControllerClient(link, first_seq=6)
    try:
        stop = asyncio.create_task(client.emit_stop(1))
        await link.expect(EMIT_STOP_1_S6)
        await link.expect(codec.encode_frame(codec.EmitStop(1), 7))
        link.feed(STOPPED_S6)
        assert (await stop) == codec.Stopped(1, 27_000_000, 54_000, 1)
        link.feed(codec.encode_frame(codec.Stopped(1, 27_000_000, 54_000, 1), 7))
        await wait_until(lambda: client.stats.late_replies == 1)
    finally:
        await client.close()
    assert client.stats.unmatched_replies == 0
