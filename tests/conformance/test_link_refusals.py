"""ICD §3/§5a refusals: every NAK code of EMIT_START and ARM, and the precedence order
8, 7, 5, 6, 1, 2, 3, 9, 4, 10, 12 when several conditions fail at once.

Each scenario sets up one controller state and sends a table of requests; every
mismatch is listed, not only the first.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from . import pbmlink_peer as pl
from .harness import (
    PAD_660_MAX_UW,
    PAD_830_MAX_UW,
    PROBE_PORT,
    PROBE_PULSED,
    W660,
    W830,
    W905,
    Rig,
    new_token,
    set_interlock,
)
from .pbmlink_peer import Ack, Message, Nak, Telemetry

RigFactory = Callable[..., Awaitable[Rig]]

Case = tuple[str, int, bytes, Message]


def emit(port: int, wavelength_nm: int, power_uw: int = 1000, **kw: int) -> bytes:
    return pl.pack_emit_start(port, wavelength_nm, power_uw, **kw)


def _everything_wrong(port: int) -> bytes:
    """Bad wavelength, power above any maximum, zero budget and duration."""
    return emit(port, 1234, 10**9, energy_budget_uj=0, max_duration_ms=0)


async def _check(rig: Rig, cases: list[Case]) -> None:
    wrong: list[str] = []
    for what, msg_type, payload, expected in cases:
        got = await rig.peer.call(msg_type, payload)
        if got != expected:
            wrong.append(f"{what}: got {got}, ICD says {expected}")
    assert not wrong, "\n".join(wrong)


async def test_refusals_in_standby(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    await _check(
        rig,
        [
            ("not armed", pl.EMIT_START, emit(1, W660), Nak(pl.NAK_NOT_ARMED)),
            ("5 before 1", pl.EMIT_START, _everything_wrong(9), Nak(pl.NAK_NOT_ARMED)),
            ("5 before 1 (port 0)", pl.EMIT_START, _everything_wrong(0), Nak(pl.NAK_NOT_ARMED)),
        ],
    )  # fmt: skip


async def test_refusals_with_an_interlock_open(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    await set_interlock(rig, "estop", run=False)
    await rig.peer.wait_telemetry(lambda t: not t.interlocks & pl.IL_ESTOP)
    await _check(
        rig,
        [
            (
                "ARM with estop pressed",
                pl.ARM,
                struct.pack("<I", new_token()),
                Nak(pl.NAK_INTERLOCK),
            ),
            ("7 before 10 (token 0)", pl.ARM, struct.pack("<I", 0), Nak(pl.NAK_INTERLOCK)),
            ("7 before 5", pl.EMIT_START, emit(1, W660), Nak(pl.NAK_INTERLOCK)),
            ("7 before 5 and 1", pl.EMIT_START, _everything_wrong(9), Nak(pl.NAK_INTERLOCK)),
        ],
    )
    await set_interlock(rig, "estop", run=True)
    await rig.peer.wait_telemetry(lambda t: bool(t.interlocks & pl.IL_ESTOP))
    assert await rig.peer.arm(new_token()) == Ack()


async def test_refusals_with_a_fault_latched(rig_factory: RigFactory) -> None:
    rig = await rig_factory(60)
    await rig.arm_ready()
    await rig.start(3, W660, 100_000)
    start = rig.peer.mark()
    await rig.control.call("over_temperature", port=3)
    await rig.peer.wait_event(pl.EV_FAULT, value=pl.FAULT_OVER_TEMPERATURE, after=start)
    await rig.control.call("temperature", port=3, celsius=45.0)
    await set_interlock(rig, "key", run=False)
    await rig.peer.wait_telemetry(lambda t: not t.interlocks & pl.IL_KEY)
    await _check(
        rig,
        [
            ("8 before 7 (ARM)", pl.ARM, struct.pack("<I", new_token()), Nak(pl.NAK_FAULT)),
            ("8 before 7 and 10 (ARM token 0)", pl.ARM, struct.pack("<I", 0), Nak(pl.NAK_FAULT)),
            ("8 before 7 (EMIT_START)", pl.EMIT_START, emit(1, W660), Nak(pl.NAK_FAULT)),
            ("8 before everything", pl.EMIT_START, _everything_wrong(9), Nak(pl.NAK_FAULT)),
            ("CLEAR_FAULT, over-temperature still present", pl.CLEAR_FAULT, b"",
             Nak(pl.NAK_FAULT)),
        ],
    )  # fmt: skip


async def test_refusals_during_the_emission_delay(rig_factory: RigFactory) -> None:
    rig = await rig_factory(1)  # 2 s of wall time in state 1
    assert await rig.peer.arm(new_token()) == Ack()
    await _check(
        rig,
        [
            ("in the delay", pl.EMIT_START, emit(1, W660), Nak(pl.NAK_EMISSION_DELAY)),
            ("6 before 1", pl.EMIT_START, _everything_wrong(9), Nak(pl.NAK_EMISSION_DELAY)),
            ("6 before 3", pl.EMIT_START, emit(1, W905), Nak(pl.NAK_EMISSION_DELAY)),
            ("6 before 10", pl.EMIT_START, emit(1, W660, energy_budget_uj=0),
             Nak(pl.NAK_EMISSION_DELAY)),
        ],
    )  # fmt: skip
    assert (await rig.peer.wait_telemetry()).state == pl.DELAY


async def test_refusals_when_armed_and_ready(rig_factory: RigFactory) -> None:
    # Port 2 without applicator, port 1 emitting, the probe (port 4) out of contact.
    rig = await rig_factory(60, "--port", "2=none")
    peer = rig.peer
    assert (rig.ports[2].applicator_kind, rig.ports[2].channels) == (0, ())
    await rig.arm_ready()
    await rig.start(1, W660, 100_000)
    start = peer.mark()
    await rig.control.call("contact", port=PROBE_PORT, on=False)
    await peer.wait_event(pl.EV_CONTACT_CHANGED, port=PROBE_PORT, value=0, after=start)
    pulsed = PROBE_PULSED
    await _check(
        rig,
        [
            ("1: port 0", pl.EMIT_START, _everything_wrong(0), Nak(pl.NAK_BAD_PORT)),
            ("1: port 5", pl.EMIT_START, _everything_wrong(5), Nak(pl.NAK_BAD_PORT)),
            ("1: port 255", pl.EMIT_START, emit(255, W660), Nak(pl.NAK_BAD_PORT)),
            ("2: no applicator", pl.EMIT_START, emit(2, W660), Nak(pl.NAK_NO_APPLICATOR)),
            ("2 before 3, 4, 10", pl.EMIT_START, _everything_wrong(2), Nak(pl.NAK_NO_APPLICATOR)),
            ("3: 905 on a pad", pl.EMIT_START, emit(3, W905), Nak(pl.NAK_WAVELENGTH)),
            ("3: 660 on the 905 probe", pl.EMIT_START, emit(PROBE_PORT, W660, **pulsed),
             Nak(pl.NAK_WAVELENGTH)),
            ("3 before 9", pl.EMIT_START, emit(1, W905), Nak(pl.NAK_WAVELENGTH)),
            ("3 before 4, 10", pl.EMIT_START, _everything_wrong(3), Nak(pl.NAK_WAVELENGTH)),
            ("9: already emitting", pl.EMIT_START, emit(1, W660), Nak(pl.NAK_ALREADY_EMITTING)),
            ("9 before 4", pl.EMIT_START, emit(1, W660, 10**9), Nak(pl.NAK_ALREADY_EMITTING)),
            ("9 before 10", pl.EMIT_START, emit(1, W660, energy_budget_uj=0),
             Nak(pl.NAK_ALREADY_EMITTING)),
            ("4: 660 above max", pl.EMIT_START, emit(3, W660, PAD_660_MAX_UW + 1),
             Nak(pl.NAK_POWER)),
            ("4: 830 above max", pl.EMIT_START, emit(3, W830, PAD_830_MAX_UW + 1),
             Nak(pl.NAK_POWER)),
            ("4 before 10", pl.EMIT_START, emit(3, W660, 0xFFFFFFFF, energy_budget_uj=0,
             max_duration_ms=0), Nak(pl.NAK_POWER)),
            ("10: zero budget", pl.EMIT_START, emit(3, W660, energy_budget_uj=0),
             Nak(pl.NAK_BAD_PARAMETER)),
            ("10: zero max duration", pl.EMIT_START, emit(3, W660, max_duration_ms=0),
             Nak(pl.NAK_BAD_PARAMETER)),
            ("10: mode 2 does not exist", pl.EMIT_START, emit(3, W660, mode=2),
             Nak(pl.NAK_BAD_PARAMETER)),
            ("10: pulsed with pulse_hz 0", pl.EMIT_START,
             emit(3, W660, mode=1, pulse_hz=0, duty_permille=500), Nak(pl.NAK_BAD_PARAMETER)),
            ("10: pulsed with duty 0", pl.EMIT_START,
             emit(3, W660, mode=1, pulse_hz=100, duty_permille=0), Nak(pl.NAK_BAD_PARAMETER)),
            ("10: payload of 25 bytes", pl.EMIT_START, emit(3, W660)[:-1],
             Nak(pl.NAK_BAD_PARAMETER)),
            ("10: payload of 27 bytes", pl.EMIT_START, emit(3, W660) + b"\x00",
             Nak(pl.NAK_BAD_PARAMETER)),
            ("10 before 12: continuous on the pulsed-only probe", pl.EMIT_START,
             emit(PROBE_PORT, W905, 100_000), Nak(pl.NAK_BAD_PARAMETER)),
            ("10 before 12: zero budget", pl.EMIT_START,
             emit(PROBE_PORT, W905, 100_000, energy_budget_uj=0, **pulsed),
             Nak(pl.NAK_BAD_PARAMETER)),
            ("12: no skin contact", pl.EMIT_START, emit(PROBE_PORT, W905, 100_000, **pulsed),
             Nak(pl.NAK_NO_CONTACT)),
            ("4 before 12", pl.EMIT_START, emit(PROBE_PORT, W905, 300_000, **pulsed),
             Nak(pl.NAK_POWER)),
        ],
    )  # fmt: skip
    # None of the refusals changed anything: port 1 emits, nothing else does.
    t: Telemetry = await peer.wait_telemetry()
    assert (t.state, t.fault_code) == (pl.READY, 0)
    assert [p.emitting for p in t.ports] == [True, False, False, False]
    assert [e.port for e in peer.events(start, pl.EV_EMISSION_ENDED)] == []
    # Accepted at the limits: exactly the channel maximum, and a setpoint of 0.
    await rig.start(3, W660, PAD_660_MAX_UW)
    assert await peer.emit_stop(3) is not None
    await rig.start(3, W830, 0)
