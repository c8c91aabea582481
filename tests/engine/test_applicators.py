"""Applicators plugged, unplugged and swapped between sessions (ICD §6: GET_PORT again
after every APPLICATOR_CHANGED): what the engine knows, refuses and records follows
the applicator actually plugged in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from engine_rig import Rig, is_msg, pad_step, probe_step, protocol

from pbmd.daemon.core.engine import NotRunnable, StartRefused
from pbmd.daemon.core.session import SessionState
from pbmd.drivers import codec
from pbmd.protocols.limits import DEFAULT_LIMITS
from pbmd.protocols.loader import parse_protocol

PAD = protocol({1: [pad_step(fluence=0.04, max_time_s=60)]})
PROBE_905 = protocol({4: [probe_step(energy_j=0.2)]})
PROBE_830 = protocol(
    {4: [probe_step(nm=830, power_mw=50.0, energy_j=0.2, pulse_hz=10, duty_permille=500)]},
    applicators={4: "probe_830"},
)


async def _until(rig: Rig, cond: Callable[[], bool]) -> None:
    """Let telemetry flow until `cond` holds (bounded), then until PORT_INFO is read."""
    for _ in range(100):
        if cond():
            break
        await rig.next_samples(1)
    assert cond()
    await rig.handle.applicators_read()


def _kind(rig: Rig, port: int) -> int:
    return rig.port_map[port].applicator.applicator_kind


def _arms(rig: Rig) -> int:
    return len([m for _, m in rig.rx.items if isinstance(m, codec.Arm)])


async def test_unplug_then_replug(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        p, loaded = rig.plan(PAD)
        rig.sim.faults.unplug(1)
        await _until(rig, lambda: _kind(rig, 1) == codec.ApplicatorKind.NONE)
        assert rig.port_map.applicators()[1].applicator_serial == ""
        with pytest.raises(StartRefused, match="port 1: its applicator was unplugged"):
            rig.engine.check_ready()
        arms = _arms(rig)
        with pytest.raises(StartRefused, match="port 1") as refused:
            await rig.start(p, loaded)
        assert refused.value.cause is not None and refused.value.cause.code == "E402"
        assert _arms(rig) == arms  # refused before ARM

        rig.sim.faults.plug(1, "duo_pad")
        await _until(rig, lambda: _kind(rig, 1) == codec.ApplicatorKind.PAD)
        rig.engine.check_ready()
        p, loaded = rig.plan(PAD)  # the pad plugged in now
        session = await rig.start(p, loaded)
        assert await asyncio.wait_for(session.wait(), 30.0) is SessionState.COMPLETED


async def test_swap_905_probe_for_830(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        old_serial = rig.port_map[4].applicator.applicator_serial
        p905, loaded905 = rig.plan(PROBE_905)
        rig.sim.faults.unplug(4)
        rig.sim.faults.plug(4, "probe_830")
        await _until(
            rig,
            lambda: (
                4 not in rig.handle.unplugged
                and [c.wavelength_nm for c in rig.port_map[4].applicator.channels] == [830]
            ),
        )
        info = rig.port_map[4].applicator
        assert info.applicator_kind == codec.ApplicatorKind.PROBE
        assert info.applicator_serial != old_serial
        rig.engine.check_ready()

        # A plan made for the 905 probe: refused before ARM, naming the port.
        arms = _arms(rig)
        with pytest.raises(StartRefused, match="port 4") as refused:
            await rig.start(p905, loaded905)
        assert old_serial in str(refused.value) and info.applicator_serial in str(refused.value)
        assert _arms(rig) == arms
        # And a 905 nm protocol cannot even be planned for the 830 probe.
        with pytest.raises(NotRunnable):
            rig.engine.plan_for(parse_protocol(PROBE_905).protocol, DEFAULT_LIMITS)

        p830, loaded830 = rig.plan(PROBE_830)
        session = await rig.start(p830, loaded830)
        assert await asyncio.wait_for(session.wait(), 30.0) is SessionState.COMPLETED
        record = await rig.records(session.id)
        (port,) = [x for x in record["ports"] if x["port"] == 4]
        assert port["applicator_serial"] == info.applicator_serial
        assert rig.rx.find(is_msg(codec.EmitStart)) is not None
