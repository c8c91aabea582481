"""Property: however the byte stream is cut into reads, and in whatever order
the replies come, the client hands every request its own reply and delivers
the same telemetry and events, and counts the same noise."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from pbm_link_script import ScriptedLink

from pbmd.drivers import codec
from pbmd.drivers.client import ControllerClient, NakReceived

REQUESTS: list[tuple[codec.Message, codec.Message]] = [
    (codec.Ping(), codec.Pong(0xDEAD_BEEF_0000)),
    (codec.GetCounters(2), codec.Counters(2, 77, 1, 5_000_000, 12_000, 0, 9_000_000)),
    (codec.EmitStop(1), codec.Stopped(1, 1_234_567, 8_000, 1)),
    (codec.Arm(5), codec.Nak(codec.NakError.INTERLOCK_OPEN)),
    (codec.Hello(), codec.Info(1, 4, 200, 250, 2000, "PBM-0042", "1.2.3")),
    (
        codec.GetPort(4),
        codec.PortInfo(4, 2, "P905-7", 50, (codec.Channel(905, 200_000, 2, 100_000),)),
    ),
]
NOISE: list[bytes] = [
    codec.encode_frame(codec.Telemetry(10, 2, 7, 0, (codec.PortSample(3, 660, 5, 6, 3100),)), 900),
    codec.encode_frame(codec.Event(11, 1, codec.EventCode.CONTACT_CHANGED, 0), 901),
    b"\x55\xaa\x01\x00",  # garbage up to a delimiter
    codec.encode_frame(codec.Ack(), 3)[:-3] + b"\x77\x77\x00",  # bad CRC
    b"\x00",  # empty frame
]


async def run(order: list[int], cuts: list[int]) -> tuple[list[object], ControllerClient]:
    link = ScriptedLink()
    client = ControllerClient(link, reply_timeout_s=5.0)
    try:
        tasks = [asyncio.create_task(client.request(req)) for req, _ in REQUESTS]
        await link.wait_writes(len(REQUESTS))
        seqs = [codec.iter_frames([w])[0].seq for w in link.writes]
        parts: list[bytes] = []
        for i in order:
            parts.append(codec.encode_frame(REQUESTS[i][1], seqs[i]))
            parts.append(NOISE[i % len(NOISE)])
        stream = b"".join(parts)
        bounds = [0, *sorted({c % len(stream) for c in cuts} - {0}), len(stream)]
        link.feed(*(stream[a:b] for a, b in itertools.pairwise(bounds)))
        results: list[object] = []
        for task in tasks:
            try:
                results.append(await task)
            except NakReceived as nak:
                results.append(("nak", int(nak.code)))
    finally:
        await client.close()
    return results, client


EXPECTED: list[object] = [
    reply if not isinstance(reply, codec.Nak) else ("nak", reply.error) for _, reply in REQUESTS
]


@settings(max_examples=150, deadline=None)
@given(
    order=st.permutations(range(len(REQUESTS))),
    cuts=st.lists(st.integers(min_value=1, max_value=10_000), max_size=60),
)
def test_any_chunking_and_order_gives_the_same_replies(order: list[int], cuts: list[int]) -> None:
    results, client = asyncio.run(run(order, cuts))
    assert results == EXPECTED
    stats = client.stats
    noise = [NOISE[i % len(NOISE)] for i in order]
    assert stats.telemetry_rx == sum(n == NOISE[0] for n in noise)
    assert stats.events_rx == sum(n == NOISE[1] for n in noise)
    assert stats.crc_errors == sum(n == NOISE[3] for n in noise)
    assert stats.dropped["cobs"] == sum(n == NOISE[2] for n in noise)
    assert stats.empty_frames == sum(n == NOISE[4] for n in noise)
    assert stats.frames_rx == len(REQUESTS) + stats.telemetry_rx + stats.events_rx
    assert (stats.unmatched_replies, stats.late_replies, stats.unexpected_replies) == (0, 0, 0)
