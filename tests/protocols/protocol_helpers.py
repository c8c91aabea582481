"""Shared material of the protocol tests: applicators, a small valid protocol, minisign."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pbmd.drivers import codec

MINISIGN = shutil.which("minisign") or "/usr/bin/minisign"
TESTS_DIR = Path(__file__).resolve().parents[1]
TEST_SECRET_KEY = TESTS_DIR / "keys" / "test-protocol-signing.key"

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


# A small valid protocol: one pad step on port 1, one probe point on port 4.
# Bad-file tests edit it one rule at a time.
BASE = """\
schema_version = 1
id = "test-base"
version = 1
title = "Base protocol for tests"
indication = "Tests only."
contraindications = ["cancer", "pregnancy"]
cautions = ["Eyewear."]

[course]
sessions = 10
interval_days = 2

[[evidence]]
ref = "walt-2010"
relevance = "Dose figures."

[sites.back]
label = "Left lumbar paraspinal muscles"
region = "lumbar"
area_covered_cm2 = 180.0

[sites.point]
label = "L4-5 left"
region = "lumbar"
area_covered_cm2 = 0.5

[ports.1.applicator]
kind = "pad"
channels_nm = [660, 830]
beam_area_cm2 = 180.0

[[ports.1.steps]]
site = "back"
wavelength_nm = 660
mode = "continuous"
technique = "contact"
irradiance_mw_cm2 = 10.0
fluence_j_cm2 = 6.0
max_time_s = 720

[ports.4.applicator]
kind = "probe"
channels_nm = [905]
beam_area_cm2 = 0.5

[[ports.4.steps]]
site = "point"
wavelength_nm = 905
mode = "pulsed"
technique = "contact"
power_mw = 50.0
pulse_hz = 5000
duty_permille = 1
energy_j = 4.0
max_time_s = 96
gating = { confirm_placement = true, skin_contact = true }
"""


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


def run_minisign(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MINISIGN, *args], check=True, capture_output=True, text=True, timeout=30)


def make_keypair(directory: Path, name: str = "key") -> tuple[Path, Path]:
    """A fresh passwordless minisign key pair: (public, secret)."""
    public, secret = directory / f"{name}.pub", directory / f"{name}.key"
    run_minisign("-G", "-W", "-f", "-p", str(public), "-s", str(secret))
    return public, secret


def sign(
    path: Path,
    secret: Path = TEST_SECRET_KEY,
    *,
    legacy: bool = False,
    trusted_comment: str = "pbmd test signature",
) -> Path:
    """Sign `path` with the real minisign binary; returns the .minisig path."""
    args = ["-S", "-s", str(secret), "-m", str(path), "-t", trusted_comment]
    if legacy:
        args.insert(1, "-l")
    run_minisign(*args)
    return Path(str(path) + ".minisig")
