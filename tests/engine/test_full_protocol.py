"""The shipped chronic-lumbar protocol against `pbmd sim` in a subprocess: pads on ports
1–3, then the probe on port 4 (about 37 minutes of device time at ×60), every step within
±0.5 %, and the phases as the controller itself saw them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from fixtures.sim_process import SimProcess
from fixtures.simulator import usb_device

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.engine import Engine, SessionRequest
from pbmd.daemon.core.session import SessionEvent, SessionState
from pbmd.daemon.services.records import RecordStore
from pbmd.drivers.client import open_controller
from pbmd.protocols.loader import load_protocol
from pbmd.protocols.plan import plan

LIBRARY = Path(__file__).resolve().parents[2] / "protocols" / "library"
TIME_SCALE = 60.0
TOLERANCE = 0.005


@pytest.mark.slow
@pytest.mark.parametrize("link", ["tcp", "usb"])
async def test_chronic_lumbar_protocol_end_to_end(tmp_path: Path, link: str) -> None:
    """Over TCP, and over USB: usb://1209:0001/PBM-SIM-0001 on the simulated bus."""
    loaded = load_protocol(LIBRARY / "lumbar-chronic-nonspecific.toml")
    device_s = loaded.session_time_s
    assert 30 * 60 <= device_s <= 60 * 60
    async with SimProcess(time_scale=TIME_SCALE) as sim, contextlib.AsyncExitStack() as stack:
        url = sim.url if link == "tcp" else stack.enter_context(usb_device(sim.url))
        client = await open_controller(url, telemetry_hz=50)
        handle = ControllerHandle("main", client)
        store = await RecordStore.open(tmp_path / "records.sqlite3", min_free_bytes=0)
        try:
            port_map = PortMap.single(handle)
            engine = Engine(port_map, store, telemetry_hz=50)
            events: list[tuple[float, SessionEvent]] = []

            def on_event(ev: SessionEvent) -> None:
                events.append((time.monotonic(), ev))
                if ev.kind == "port_waiting" and "confirm placement" in ev.message:
                    # The operator confirms each placement when prompted.
                    session = engine.session
                    assert session is not None and ev.port is not None
                    asyncio.get_running_loop().call_soon(session.confirm, ev.port)

            engine.add_listener(on_event)
            the_plan = plan(loaded.protocol, port_map.applicators())
            await handle.next_sample(2.0)
            t0 = time.monotonic()
            session = await engine.start_session(
                SessionRequest(
                    plan=the_plan,
                    patient_ref="P-LUMBAR",
                    contraindications={c.value: False for c in loaded.protocol.contraindications},
                    signing_key_id="pbmd TEST key",
                    operator="tester",
                    contraindicated_by_protocol=frozenset(
                        c.value for c in loaded.protocol.contraindications
                    ),
                )
            )
            state = await asyncio.wait_for(session.wait(), device_s / TIME_SCALE + 30.0)
            wall_s = time.monotonic() - t0
            assert state is SessionState.COMPLETED, session.cause_message
            assert session.supervisor.tripped is None
            assert wall_s < device_s / TIME_SCALE + 10.0, wall_s

            # Every gated step waited for its confirmation before it emitted.
            for e in the_plan.ports:
                for pe in e.emissions:
                    if not pe.gating.confirm_placement:
                        continue
                    waits = [
                        t
                        for t, ev in events
                        if ev.kind == "port_waiting"
                        and ev.port == e.port
                        and ev.step == pe.step_index
                        and "confirm placement" in ev.message
                    ]
                    started = [
                        t
                        for t, ev in events
                        if ev.kind == "emission_started"
                        and ev.port == e.port
                        and ev.step == pe.step_index
                    ]
                    assert waits and started and waits[0] < started[0], (e.port, pe.step_index)

            await store.sync()
            record = await store.get_session(session.id)
            assert record is not None and record["outcome"] == "completed"
            steps = record["steps"]
            assert len(steps) == sum(len(p.emissions) for p in the_plan.ports) == 10
            lines = []
            for s in sorted(steps, key=lambda s: (s["port"], s["step_index"])):
                prescribed = s["prescribed_energy_j"]
                ctrl_err = s["delivered_controller_j"] / prescribed - 1
                host_err = s["delivered_host_j"] / prescribed - 1
                lines.append(
                    f"port {s['port']} step {s['step_index']} {s['wavelength_nm']} nm "
                    f"{prescribed:8.3f} J  controller {ctrl_err * 100:+.3f} %  "
                    f"host {host_err * 100:+.3f} %"
                )
                assert s["outcome"] == "completed"
                assert abs(ctrl_err) <= TOLERANCE, lines[-1]
                assert abs(host_err) <= TOLERANCE, lines[-1]
            print(f"\nchronic lumbar, x{TIME_SCALE:g}: {wall_s:.1f} s wall")
            print("\n".join(lines))
            pads_end_us, probe_start_us = probe_after_pads(
                await sim.command_log(), pad_ports=(1, 2, 3), probe_port=4
            )
            print(
                f"command log: last pad emission ended {pads_end_us / 1e6:.3f} s, "
                f"port 4's first EMIT_START {probe_start_us / 1e6:.3f} s (device time)"
            )
            snap = await sim.snapshot()
            assert not any(p["emitting"] or p["light_on"] for p in snap["ports"])
            assert snap["state_name"] == "standby"
        finally:
            await store.close()
            handle.detach()
            await client.close()


def probe_after_pads(
    log: list[dict[str, Any]], pad_ports: tuple[int, ...], probe_port: int
) -> tuple[int, int]:
    """From the controller's own command log: the probe port's first accepted EMIT_START
    comes after the last pad emission ended, and every pad emission started did end.
    Returns both instants (device µs)."""
    started = [
        e
        for e in log
        if e["kind"] == "request" and e["request"] == "EmitStart" and e["reply"] == "Ack"
    ]
    ended = [e for e in log if e["kind"] == "emission_ended"]
    pad_starts = [e for e in started if e["port"] in pad_ports]
    pad_ends = [e for e in ended if e["port"] in pad_ports]
    probe_starts = [e for e in started if e["port"] == probe_port]
    assert len(pad_starts) == len(pad_ends) == 2 * len(pad_ports), (pad_starts, pad_ends)
    assert probe_starts, "the probe never started"
    last_pad_end = max(e["device_time_us"] for e in pad_ends)
    first_probe = min(e["device_time_us"] for e in probe_starts)
    assert first_probe > last_pad_end, (
        f"port {probe_port} started at {first_probe / 1e6:.3f} s of device time, "
        f"before the last pad emission ended at {last_pad_end / 1e6:.3f} s"
    )
    # and the log's order agrees with its clock
    assert max(e["i"] for e in pad_ends) < min(e["i"] for e in probe_starts)
    return last_pad_end, first_probe
