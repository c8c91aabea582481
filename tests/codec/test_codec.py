"""PBM-Link codec: framing, CRC, every message, and what happens to bad bytes."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbmd.drivers import codec
from pbmd.drivers.codec import (
    Channel,
    DropReason,
    FieldRangeError,
    Frame,
    PayloadLengthError,
    PortInfo,
    PortSample,
    StreamDecoder,
    Telemetry,
    UnknownMessageType,
    cobs_decode,
    cobs_encode,
    crc16_ccitt_false,
    encode_body,
    encode_frame,
)

# --- reference vectors ------------------------------------------------------


def test_crc_check_value() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        # Cheshire & Baker's examples, as published.
        (b"\x00", b"\x01\x01"),
        (b"\x00\x00", b"\x01\x01\x01"),
        (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
        (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
        (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
        (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
        (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
        (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
        (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    ],
)
def test_cobs_reference_vectors(raw: bytes, encoded: bytes) -> None:
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


def test_hello_frame_bytes() -> None:
    # body 01 01 34 12 00 00 | crc 0x2AFA little-endian; COBS blocks [01 01 34 12] [] [FA 2A].
    assert crc16_ccitt_false(bytes([1, 1, 0x34, 0x12, 0, 0])) == 0x2AFA
    assert encode_frame(codec.Hello(), 0x1234) == bytes.fromhex("05 01 01 34 12 01 03 fa 2a 00")


# --- every message round-trips -------------------------------------------------

_INT_STRATEGY = {
    "u8": st.integers(0, 0xFF),
    "u16": st.integers(0, 0xFFFF),
    "u32": st.integers(0, 0xFFFF_FFFF),
    "u64": st.integers(0, 0xFFFF_FFFF_FFFF_FFFF),
    "i16": st.integers(-0x8000, 0x7FFF),
}


def _field_strategy(kind: str) -> st.SearchStrategy[Any]:
    if kind in _INT_STRATEGY:
        return _INT_STRATEGY[kind]
    width = int(kind[5:-1])
    return st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=width)


def _record_strategy(cls: Any) -> st.SearchStrategy[Any]:
    return st.builds(cls, *[_field_strategy(k) for _, k in cls.FIELDS])


def _message_strategy(cls: type[codec.Message]) -> st.SearchStrategy[codec.Message]:
    if cls is PortInfo:
        return st.builds(
            PortInfo,
            _INT_STRATEGY["u8"],
            _INT_STRATEGY["u8"],
            _field_strategy("char[12]"),
            _INT_STRATEGY["u32"],
            st.lists(_record_strategy(Channel), max_size=8).map(tuple),
        )
    if cls is Telemetry:
        return st.builds(
            Telemetry,
            _INT_STRATEGY["u64"],
            _INT_STRATEGY["u8"],
            _INT_STRATEGY["u8"],
            _INT_STRATEGY["u16"],
            st.lists(_record_strategy(PortSample), max_size=8).map(tuple),
        )
    return st.builds(cls, *[_field_strategy(k) for _, k in cls.FIELDS])


ALL_MESSAGES = codec.HOST_MESSAGES + codec.DEVICE_MESSAGES


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data(), seq=st.integers(0, 0xFFFF))
def test_every_message_round_trips(cls: type[codec.Message], data: st.DataObject, seq: int) -> None:
    msg = data.draw(_message_strategy(cls))
    wire = encode_frame(msg, seq)
    assert wire.endswith(b"\x00") and wire.count(0) == 1
    frames = StreamDecoder().feed(wire)
    assert frames == [Frame(cls.TYPE, seq, msg.pack_payload())]
    assert frames[0].message() == msg


def test_message_types_match_icd() -> None:
    expected = {
        "Hello": 0x01, "Ping": 0x02, "GetPort": 0x03, "SetTelemetry": 0x04, "Arm": 0x05,
        "Disarm": 0x06, "EmitStart": 0x07, "EmitStop": 0x08, "AllOff": 0x09,
        "ClearFault": 0x0A, "GetCounters": 0x0B, "Ack": 0x80, "Info": 0x81, "Pong": 0x82,
        "PortInfo": 0x83, "Stopped": 0x88, "Counters": 0x8B, "Telemetry": 0x90,
        "Event": 0x91, "Nak": 0xFE,
    }  # fmt: skip
    assert {c.__name__: c.TYPE for c in ALL_MESSAGES} == expected


@pytest.mark.parametrize(
    ("msg", "size"),
    [
        (codec.EmitStart(1, 660, 0, 1, 0, 1000, 1, 1), 26),
        (codec.Info(1, 4, 200, 250, 2000, "S", "F"), 36),
        (codec.Stopped(1, 2, 3, 4), 14),
        (codec.Counters(1, 2, 0, 3, 4, 5, 6), 27),
        (codec.Event(1, 0, 2, 7), 14),
        (codec.Pong(5), 8),
        (PortInfo(1, 1, "X", 100, (Channel(660, 1, 1, 0), Channel(830, 1, 3, 0))), 19 + 22),
        (Telemetry(1, 0, 7, 0, (PortSample(1, 0, 0, 0, 2500),) * 4), 12 + 4 * 17),
    ],
)
def test_payload_sizes_match_icd(msg: codec.Message, size: int) -> None:
    assert len(msg.pack_payload()) == size


# --- values that do not fit are errors, never truncated ---------------------------


def _int_fields(cls: type[codec.Message]) -> list[tuple[str, str]]:
    return [(n, k) for n, k in cls.FIELDS if k in codec._INTS and n != "channel_count"]


def _sample(cls: type[codec.Message]) -> codec.Message:
    if cls is PortInfo:
        return PortInfo(1, 1, "", 0, ())
    if cls is Telemetry:
        return Telemetry(0, 0, 0, 0, ())
    return cls(**{n: (0 if k in codec._INTS else "") for n, k in cls.FIELDS})


@pytest.mark.parametrize(
    ("cls", "name", "kind"),
    [(c, n, k) for c in ALL_MESSAGES for n, k in _int_fields(c)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_out_of_range_field_is_refused(cls: type[codec.Message], name: str, kind: str) -> None:
    _, low, high = codec._INTS[kind]
    base = _sample(cls)
    for bad in (high + 1, low - 1):
        with pytest.raises(FieldRangeError, match=name):
            dataclasses.replace(base, **{name: bad}).pack_payload()
    with pytest.raises(FieldRangeError):
        dataclasses.replace(base, **{name: 1.5}).pack_payload()


def test_strings_that_do_not_fit_are_refused() -> None:
    with pytest.raises(FieldRangeError, match="serial"):
        codec.Info(1, 4, 200, 250, 2000, "X" * 17, "fw").pack_payload()
    with pytest.raises(FieldRangeError, match="ASCII"):
        codec.Info(1, 4, 200, 250, 2000, "café", "fw").pack_payload()
    with pytest.raises(FieldRangeError, match=r"channels\[0\]"):
        PortInfo(1, 1, "P", 5, (Channel(70000, 1, 1, 0),)).pack_payload()
    with pytest.raises(FieldRangeError, match=r"ports\[0\]"):
        Telemetry(0, 0, 0, 0, (PortSample(0, 0, -1, 0, 0),)).pack_payload()


def test_oversized_payload_and_seq_are_refused() -> None:
    with pytest.raises(FieldRangeError):
        encode_body(0x90, 1, bytes(505))
    with pytest.raises(FieldRangeError):
        encode_body(0x01, 0x10000, b"")
    assert len(encode_body(0x90, 1, bytes(504))) == 512


# --- parsing refusals -----------------------------------------------------------


def test_unknown_type_and_wrong_length() -> None:
    with pytest.raises(UnknownMessageType) as info:
        Frame(0x42, 1, b"").message()
    assert info.value.msg_type == 0x42
    with pytest.raises(PayloadLengthError):
        Frame(codec.EmitStop.TYPE, 1, b"").message()
    with pytest.raises(PayloadLengthError):
        Frame(codec.EmitStop.TYPE, 1, b"\x01\x02").message()
    with pytest.raises(PayloadLengthError):
        Frame(
            PortInfo.TYPE, 1, PortInfo(1, 1, "", 0, (Channel(1, 1, 1, 0),)).pack_payload()[:-1]
        ).message()
    with pytest.raises(PayloadLengthError):
        Frame(Telemetry.TYPE, 1, bytes(12 + 16)).message()


# --- the stream decoder -----------------------------------------------------------


def _body(msg_type: int = 0x02, seq: int = 1, payload: bytes = b"") -> bytes:
    return encode_body(msg_type, seq, payload)


def _wire(body: bytes) -> bytes:
    return cobs_encode(body) + b"\x00"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_body()[:-1] + bytes([_body()[-1] ^ 0x01]), DropReason.CRC),
        (b"\x02" + _body()[1:], DropReason.CRC),  # version changed without fixing CRC
        (b"\x01\x02\x01", DropReason.SHORT),
    ],
)
def test_bad_bodies_are_counted(body: bytes, reason: DropReason) -> None:
    dec = StreamDecoder()
    assert dec.feed(_wire(body)) == []
    assert dec.stats.dropped[reason.value] == 1


def test_wrong_version_and_length_with_valid_crc_are_dropped() -> None:
    head = struct.pack("<BBHH", 2, 0x02, 1, 0)
    v2 = head + struct.pack("<H", crc16_ccitt_false(head))
    head = struct.pack("<BBHH", 1, 0x03, 1, 5)  # says 5 bytes, carries 1
    bad_len = head + b"\x01"
    bad_len += struct.pack("<H", crc16_ccitt_false(bad_len))
    dec = StreamDecoder()
    assert dec.feed(_wire(v2) + _wire(bad_len) + encode_frame(codec.Ping(), 9)) == [
        Frame(0x02, 9, b"")
    ]
    assert dec.stats.dropped["version"] == 1
    assert dec.stats.dropped["length"] == 1


def test_oversized_run_is_dropped_with_bounded_memory() -> None:
    dec = StreamDecoder()
    garbage = b"\x01" * 100_000
    assert dec.feed(garbage) == []
    assert len(dec._buf) <= codec.MAX_ENCODED_BYTES
    assert dec.feed(b"\x00" + encode_frame(codec.Ping(), 3)) == [Frame(0x02, 3, b"")]
    assert dec.stats.dropped["oversize"] == 1


def test_oversized_body_under_cobs_limit_is_dropped() -> None:
    head = struct.pack("<BBHH", 1, 0x90, 1, 505)
    body = head + bytes(505)
    body += struct.pack("<H", crc16_ccitt_false(body))
    dec = StreamDecoder()
    assert dec.feed(_wire(body)) == []
    assert dec.stats.dropped_total == 1


def test_empty_frames_are_skipped() -> None:
    dec = StreamDecoder()
    assert dec.feed(b"\x00\x00" + encode_frame(codec.Ping(), 1) + b"\x00") == [Frame(2, 1, b"")]
    assert dec.stats.empty == 3
    assert dec.stats.dropped_total == 0


@settings(max_examples=200, deadline=None)
@given(
    seqs=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20),
    cuts=st.lists(st.integers(0, 2000), max_size=30),
)
def test_arbitrary_chunking_reassembles(seqs: list[int], cuts: list[int]) -> None:
    msgs = [codec.Counters(i % 9, s, 1, s * 1000, s, 1, s * 7) for i, s in enumerate(seqs)]
    stream = b"".join(encode_frame(m, s) for m, s in zip(msgs, seqs, strict=True))
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    dec = StreamDecoder()
    out = [f for c in chunks for f in dec.feed(c)]
    assert [f.message() for f in out] == msgs
    assert [f.seq for f in out] == seqs


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(max_size=64),
    index=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_any_corrupted_body_byte_is_rejected(payload: bytes, index: int, flip: int) -> None:
    body = bytearray(_body(0x91, 5, payload))
    body[index % len(body)] ^= flip
    dec = StreamDecoder()
    assert dec.feed(_wire(bytes(body))) == []
    assert dec.stats.dropped_total == 1


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=600), seq=st.integers(0, 0xFFFF))
def test_garbage_never_crashes_and_good_frames_survive(garbage: bytes, seq: int) -> None:
    dec = StreamDecoder()
    dec.feed(garbage)  # whatever it yields, it must not raise
    good = encode_frame(codec.Pong(seq), seq)
    out = dec.feed(b"\x00" + good + garbage + b"\x00" + good)
    assert [f for f in out if f == Frame(0x82, seq, struct.pack("<Q", seq))][-2:] == [
        Frame(0x82, seq, struct.pack("<Q", seq))
    ] * 2
    for frame in out:  # anything else that decodes must at least be a checked frame
        assert isinstance(frame, Frame)


@given(raw=st.binary(max_size=2000))
def test_cobs_round_trip(raw: bytes) -> None:
    enc = cobs_encode(raw)
    assert 0 not in enc
    assert cobs_decode(enc) == raw
    assert len(enc) <= len(raw) + len(raw) // 254 + 1


def test_malformed_cobs_is_an_error() -> None:
    with pytest.raises(codec.CodecError):
        cobs_decode(b"\x05\x01")
    with pytest.raises(codec.CodecError):
        cobs_decode(b"\x03\x01\x00")


def test_describe_tolerates_unknown_codes() -> None:
    assert codec.describe(codec.StopReason, 2) == "ENERGY_BUDGET"
    assert codec.describe(codec.StopReason, 200) == "StopReason(200)"
    assert codec.Nak(4).meaning == "power setpoint above the channel maximum"
    assert "unknown" in codec.Nak(99).meaning
    assert all(e.meaning for e in codec.NakError)
