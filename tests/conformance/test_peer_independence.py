"""The peer is only a second opinion if it shares nothing with pbmd: check that, and its basics."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from . import pbmlink_peer as peer
from .harness import SimProcess

PEER_PATH = Path(peer.__file__)


def test_peer_imports_only_the_standard_library() -> None:
    tree = ast.parse(PEER_PATH.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the peer must not import sibling modules"
            assert node.module is not None
            imported.add(node.module.split(".")[0])
    outside = sorted(m for m in imported if m not in sys.stdlib_module_names and m != "__future__")
    assert outside == [], f"pbmlink_peer.py imports non-stdlib modules: {outside}"


def test_loading_the_peer_loads_nothing_of_pbmd() -> None:
    """Load it by path in a fresh interpreter and look at sys.modules."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pbmlink_peer', {str(PEER_PATH)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['pbmlink_peer'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'pbmd' or m.startswith('pbmd.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "", f"loading the peer imported {out.stdout.strip()}"


def test_crc_check_value() -> None:
    # ICD §2: the check value of ASCII "123456789" is 0x29B1.
    assert peer.crc16_ccitt_false(b"123456789") == 0x29B1
    assert peer.crc16_ccitt_false(b"") == 0xFFFF


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        # Cheshire & Baker's examples.
        (b"\x00", b"\x01\x01"),
        (b"\x00\x00", b"\x01\x01\x01"),
        (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
        (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
        (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
        (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
        (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255)) + b"\x01"),
    ],
)
def test_cobs_reference_vectors(raw: bytes, encoded: bytes) -> None:
    assert peer.cobs_encode(raw) == encoded
    assert peer.cobs_decode(encoded) == raw


def test_cobs_round_trip_of_every_length() -> None:
    for n in range(0, 700, 7):
        data = bytes((i * 37) % 256 for i in range(n))
        enc = peer.cobs_encode(data)
        assert 0 not in enc
        assert peer.cobs_decode(enc) == data


def test_frame_layout_is_little_endian_header_payload_crc() -> None:
    body = peer.build_body(peer.GET_PORT, 0x1234, b"\x02")
    assert body[:6] == bytes([1, 0x03, 0x34, 0x12, 0x01, 0x00])
    assert body[6:7] == b"\x02"
    assert int.from_bytes(body[7:], "little") == peer.crc16_ccitt_false(body[:7])
    assert peer.parse_body(body) == peer.Frame(peer.GET_PORT, 0x1234, b"\x02")


def test_emit_start_payload_is_26_bytes() -> None:
    assert len(peer.pack_emit_start(1, 660, 1000)) == 1 + 2 + 1 + 4 + 4 + 2 + 8 + 4


def test_splitter_reassembles_across_chunks_and_skips_empty_frames() -> None:
    wire = b"\x00" + peer.frame_bytes(peer.build_body(peer.PING, 7)) * 2
    splitter = peer.FrameSplitter()
    pieces = [splitter.feed(wire[i : i + 1]) for i in range(len(wire))]
    frames = [peer.parse_body(peer.cobs_decode(p)) for chunk in pieces for p in chunk]
    assert frames == [peer.Frame(peer.PING, 7, b"")] * 2
    assert splitter.empty_frames == 1


def test_pbmd_sim_exits_cleanly_on_sigterm(sim_factory: Callable[..., SimProcess]) -> None:
    sim = sim_factory(60.0)
    assert sim.stop() == 0, f"`pbmd sim` exit code {sim.exit_code}, stderr:\n{sim.stderr_text()}"
