"""Sessions over the USB link (ICD §2a) on the simulated bus: the dose within
tolerance, and a controller unplugged mid-emission.

The whole dose-accuracy and trip suites also run over USB with
``PBMD_TEST_LINK=usb pytest tests/engine/test_dose.py tests/engine/test_trips.py``
(the engine rig takes its default link from there); the full lumbar protocol
over USB is in test_full_protocol.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from engine_rig import Rig, is_msg, pad_step, probe_step, protocol
from trip_checks import WATCHDOG_BOUND_S, expect_stays_dark, expect_trip

from pbmd.daemon.core.session import SessionState
from pbmd.drivers import codec
from pbmd.drivers.client import open_controller

R = codec.StopReason
TIME_SCALE = 5.0  # short steps; see test_links_and_report.py for why ×5
SHORT = protocol(
    {
        1: [pad_step(fluence=0.1, max_time_s=40)],
        4: [probe_step(power_mw=20.0, energy_j=0.4)],
    }
)
LONG = protocol({1: [pad_step(fluence=6.0, max_time_s=1800)]})


async def test_session_over_usb_is_within_tolerance(tmp_path: Path) -> None:
    async with Rig(tmp_path, link="usb", time_scale=TIME_SCALE) as rig:
        assert rig.url == "usb://1209:0001/PBM-SIM-0001?backend=sim"
        p, loaded = rig.plan(SHORT)
        session = await rig.start(p, loaded)
        assert await asyncio.wait_for(session.wait(), 20.0) is SessionState.COMPLETED
        assert session.supervisor.tripped is None
        record = await rig.records(session.id)
        for step in record["steps"]:
            error = step["delivered_controller_j"] / step["prescribed_energy_j"] - 1
            assert abs(error) <= 0.005, (step["port"], step["step_index"], error)


async def test_unplug_mid_emission_trips_and_replug_is_a_new_link(tmp_path: Path) -> None:
    """The device vanishes: the host cannot send, the controller's watchdog stops the
    emission, the session trips E203. Replugged, the device enumerates anew; a new
    link finds the controller faulted, dark, with the watchdog stop in its counters."""
    async with Rig(tmp_path, link="usb") as rig:
        (device,) = rig.sim.usb_devices
        p, loaded = rig.plan(LONG)
        session = await rig.start(p, loaded)
        await rig.emitting(1)
        await rig.next_samples(3)
        t0 = time.monotonic()
        device.unplug()
        stamp, _ = await rig.device_events.wait(
            lambda e: e.code == codec.EventCode.WATCHDOG_EXPIRED, 2.0, after=t0
        )
        assert stamp - t0 <= WATCHDOG_BOUND_S
        await expect_trip(
            rig, session, "E203", observed_at=t0, all_off_expected=False, stop_reasons={R.WATCHDOG}
        )
        assert not rig.client.is_open
        assert rig.snapshot()["fault"] == codec.FaultCode.WATCHDOG
        assert rig.rx.find(is_msg(codec.EmitStart), after=t0) is None
        await expect_stays_dark(rig)

        device.plug()
        again = await open_controller(rig.url, telemetry_hz=20)
        try:
            counters = await again.get_counters(1)
            assert counters.last_stop_reason == R.WATCHDOG and counters.delivered_uj > 0
            with again.subscribe_telemetry() as sub:
                sample = await asyncio.wait_for(anext(aiter(sub)), 2.0)
            assert sample.state == codec.ControllerState.FAULT
            assert not any(port.emitting for port in sample.ports)
        finally:
            await again.close()
        assert rig.rx.find(is_msg(codec.EmitStart), after=t0) is None  # nothing resumed
