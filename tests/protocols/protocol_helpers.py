"""Shared material of the protocol tests: the ICD's applicators and edits of a protocol.

The small valid protocol (BASE) and minisign signing are the whole suite's:
fixtures.protocols and fixtures.signing.
"""

from __future__ import annotations

from pbmd.drivers import codec

C = codec.ChannelMode.CONTINUOUS
P = codec.ChannelMode.PULSED


def icd_applicators() -> dict[int, codec.PortInfo]:
    """hw_sim's default wiring, written out from ICD appendix A (not from hw_sim)."""

    def pad(port: int) -> codec.PortInfo:
        return codec.PortInfo(
            port,
            codec.ApplicatorKind.PAD,
            f"DUO-{port}",
            18_000,  # 180 cm²
            (
                codec.Channel(660, 1_800_000, int(C | P), 0),  # 180 × 10 mW
                codec.Channel(830, 2_700_000, int(C | P), 0),  # 180 × 15 mW
            ),
        )

    probe_905 = codec.PortInfo(
        4,
        codec.ApplicatorKind.PROBE,
        "S905-1",
        50,  # 0.5 cm²
        (codec.Channel(905, 200_000, int(P), 100_000),),  # 4 × 25 W peak, 200 mW average
    )
    return {1: pad(1), 2: pad(2), 3: pad(3), 4: probe_905}


def probe_830(port: int = 4) -> codec.PortInfo:
    return codec.PortInfo(
        port,
        codec.ApplicatorKind.PROBE,
        "L830-1",
        50,
        (codec.Channel(830, 100_000, int(C | P), 0),),
    )


def sim_applicators() -> dict[int, codec.PortInfo]:
    """The same, from the simulator's own catalog (what PORT_INFO will carry)."""
    from pbmd.hw_sim import APPLICATORS, default_ports

    out: dict[int, codec.PortInfo] = {}
    for port, name in default_ports().items():
        assert name is not None
        model = APPLICATORS[name]
        out[port] = codec.PortInfo(
            port,
            model.kind,
            f"{model.serial_prefix}-{port}",
            model.area_mm2,
            tuple(c.wire() for c in model.channels),
        )
    return out


def edit(text: str, old: str, new: str, count: int = 1) -> str:
    """Replace `old` (which must occur) by `new`: a precise, checked edit of BASE."""
    assert old in text, f"{old!r} not in the text"
    return text.replace(old, new, count)


def line_with(text: str, fragment: str, start: int = 1) -> int:
    """1-based number of the first line at or after `start` that contains `fragment`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if number >= start and fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not found")
