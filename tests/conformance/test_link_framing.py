"""ICD §2 framing as the controller must treat it: reassembly, silent drops, seq echo."""

from __future__ import annotations

import itertools
import statistics
import struct
import time

import pytest

from . import pbmlink_peer as pl
from .harness import Rig
from .pbmlink_peer import Nak, Pong


async def _sentinel_ping(rig: Rig) -> pl.Received:
    """A PING after the frames under test: replies come in order, so once its PONG is
    here every reply to what was sent before it is here too."""
    rec = await rig.peer.request(pl.PING)
    assert isinstance(rec.message, Pong), f"PING answered {rec.message}"
    return rec


@pytest.mark.parametrize("seq", [0, 1, 0x00FF, 0x7FFF, 0x8000, 0xFFFF])
async def test_reply_echoes_the_request_seq(shared_rig: Rig, seq: int) -> None:
    rec = await shared_rig.peer.request(pl.PING, seq=seq)
    assert rec.frame.msg_type == pl.PONG
    assert rec.frame.seq == seq


async def test_empty_frames_are_skipped(shared_rig: Rig) -> None:
    peer = shared_rig.peer
    await peer.send_raw(b"\x00\x00\x00")
    seq = peer.new_seq()
    await peer.send_raw(b"\x00\x00" + pl.frame_bytes(pl.build_body(pl.PING, seq)))
    await peer.wait_for(lambda r: r.frame.seq == seq and r.frame.msg_type == pl.PONG)


async def test_a_frame_split_into_single_bytes_is_reassembled(shared_rig: Rig) -> None:
    peer = shared_rig.peer
    seq = peer.new_seq()
    wire = pl.frame_bytes(pl.build_body(pl.GET_PORT, seq, b"\x01"))
    for i in range(len(wire)):
        await peer.send_raw(wire[i : i + 1])
    rec = await peer.wait_for(lambda r: r.frame.seq == seq and r.frame.msg_type in pl.REPLY_TYPES)
    assert isinstance(rec.message, pl.PortInfo) and rec.message.port == 1


async def test_several_frames_in_one_write_are_all_answered_in_order(shared_rig: Rig) -> None:
    peer = shared_rig.peer
    seqs = [peer.new_seq() for _ in range(8)]
    await peer.send_raw(b"".join(pl.frame_bytes(pl.build_body(pl.PING, s)) for s in seqs))
    last = await peer.wait_for(lambda r: r.frame.seq == seqs[-1] and r.frame.msg_type == pl.PONG)
    replies = [
        r
        for r in peer.received[: last.index + 1]
        if r.frame.msg_type in pl.REPLY_TYPES and r.frame.seq in seqs
    ]
    assert [r.frame.seq for r in replies] == seqs
    assert all(r.frame.msg_type == pl.PONG for r in replies)


def _with_crc(head_and_payload: bytes) -> bytes:
    return head_and_payload + struct.pack("<H", pl.crc16_ccitt_false(head_and_payload))


def _bad_bodies(seq: int) -> dict[str, bytes]:
    good = pl.build_body(pl.PING, seq)
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    return {
        "bad crc": bytes(flipped),
        "crc byte order swapped": good[:-2] + good[-2:][::-1],
        "version 0": pl.build_body(pl.PING, seq, version=0),
        "version 2": pl.build_body(pl.PING, seq, version=2),
        # A known type: if it were not dropped it would be answered (NAK 10).
        "body of 513 bytes": pl.build_body(pl.PING, seq, bytes(505)),
        "length field larger than payload": _with_crc(pl.HEADER.pack(1, pl.PING, seq, 4)),
        "length field smaller than payload": _with_crc(
            pl.HEADER.pack(1, pl.PING, seq, 0) + b"\x01"
        ),
        "get_port length 0 with one byte": _with_crc(
            pl.HEADER.pack(1, pl.GET_PORT, seq, 0) + b"\x01"
        ),
        "shorter than a header": b"\x01\x02",
        "header without crc": pl.HEADER.pack(1, pl.PING, seq, 0),
    }


@pytest.mark.parametrize("case", list(_bad_bodies(0)))
async def test_invalid_frames_are_dropped_silently_and_the_link_still_works(
    shared_rig: Rig, case: str
) -> None:
    peer = shared_rig.peer
    bad_seq = 0xBEEF
    dropped_before = await _dropped_count(shared_rig)
    await peer.send_raw(pl.frame_bytes(_bad_bodies(bad_seq)[case]))
    sentinel = await _sentinel_ping(shared_rig)
    answered = [
        r.message
        for r in peer.received[: sentinel.index]
        if r.frame.seq == bad_seq and r.frame.msg_type in pl.REPLY_TYPES
    ]
    assert answered == [], f"{case}: ICD §2 says drop silently, controller answered {answered}"
    if dropped_before is not None:  # "the receiver counts it"
        assert await _dropped_count(shared_rig) == dropped_before + 1


async def _dropped_count(rig: Rig) -> int | None:
    """Frames the simulator dropped, from its control-channel snapshot (if it reports them)."""
    link = (await rig.control.call("snapshot")).get("link", {})
    total = link.get("rx_dropped_total")
    return int(total) if isinstance(total, int) else None


@pytest.mark.parametrize(
    "wire",
    [
        b"\x05\x01\x02\x00",  # COBS block runs past the delimiter
        b"\xff" * 40 + b"\x00",  # garbage without a valid block structure
        bytes(range(1, 200)) + b"\x00",  # line noise
        b"\x02\x01\x01\x00",  # decodes to a 2-byte body
        b"\x00" * 5,
        b"\x55" * 5000 + b"\x00",  # far longer than any frame may be
    ],
    ids=["cobs-overrun", "ff-run", "noise", "tiny-body", "zeros", "5000-bytes"],
)
async def test_garbage_is_dropped_and_the_link_still_works(shared_rig: Rig, wire: bytes) -> None:
    peer = shared_rig.peer
    before = peer.mark()
    await peer.send_raw(wire)
    sentinel = await _sentinel_ping(shared_rig)
    replies = [
        r.message
        for r in peer.received[before : sentinel.index]
        if r.frame.msg_type in pl.REPLY_TYPES and not peer.is_heartbeat(r.frame.seq)
    ]
    assert replies == [], f"garbage was answered: {replies}"


async def test_a_payload_of_504_bytes_is_a_frame_and_gets_nak_10(shared_rig: Rig) -> None:
    # 6 + 504 + 2 = 512: the largest body; a PING must have no payload, hence NAK 10.
    rec = await shared_rig.peer.request(pl.PING, bytes(504))
    assert rec.message == Nak(pl.NAK_BAD_PARAMETER)


@pytest.mark.parametrize("msg_type", [0x00, 0x0C, 0x0F, 0x10, 0x42, 0x7F, 0xFF])
async def test_unknown_type_gets_nak_11(shared_rig: Rig, msg_type: int) -> None:
    for payload in (b"", b"\x01\x02\x03"):
        rec = await shared_rig.peer.request(msg_type, payload)
        assert rec.message == Nak(pl.NAK_UNKNOWN_TYPE), f"type 0x{msg_type:02X}: {rec.message}"


@pytest.mark.parametrize("msg_type", [pl.ACK, pl.INFO, pl.TELEMETRY, pl.EVENT, pl.NAK])
async def test_controller_to_host_types_sent_to_the_controller_get_nak_11(
    shared_rig: Rig, msg_type: int
) -> None:
    """They are not requests the controller knows (ICD §3 lists the request types)."""
    rec = await shared_rig.peer.request(msg_type)
    assert rec.message == Nak(pl.NAK_UNKNOWN_TYPE)


async def test_device_initiated_frames_carry_a_running_counter(shared_rig: Rig) -> None:
    peer = shared_rig.peer
    start = peer.mark()
    await peer.wait_for(
        lambda r: len(peer.telemetry(start, r.index + 1)) >= 20, after=start, what="20 telemetry"
    )
    seqs = [r.frame.seq for r in peer.received[start:] if r.frame.msg_type in pl.DEVICE_INITIATED]
    steps = [(b - a) & 0xFFFF for a, b in itertools.pairwise(seqs)]
    assert all(1 <= s < 0x8000 for s in steps), f"device seq does not run forward: {seqs}"


async def test_replies_arrive_within_20_ms(shared_rig: Rig) -> None:
    rtts_ms: list[float] = []
    for _ in range(30):
        t0 = time.monotonic()
        rec = await shared_rig.peer.request(pl.PING)
        rtts_ms.append((rec.wall_s - t0) * 1000)
    assert statistics.median(rtts_ms) < 20, f"PING round trips (ms): {sorted(rtts_ms)}"
    assert max(rtts_ms) < 100, f"PING round trips (ms): {sorted(rtts_ms)}"


async def test_every_request_got_exactly_one_reply(shared_rig: Rig) -> None:
    peer = shared_rig.peer
    seqs = [await peer.send(pl.GET_COUNTERS, bytes([p])) for p in (1, 2, 3, 4)]
    sentinel = await _sentinel_ping(shared_rig)
    for s in seqs:
        got = [r for r in peer.received[: sentinel.index] if r.frame.seq == s and r.frame.msg_type
               in pl.REPLY_TYPES]  # fmt: skip
        assert len(got) == 1, f"seq {s}: {len(got)} replies"
