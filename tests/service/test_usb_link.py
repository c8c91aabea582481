"""pbmd with a USB controller: the embedded simulator over the simulated USB bus
(transport = "usb"), a link loss and the reconnection, the controller unplugged
mid-emission and replugged (provisional energy, then the controller's counters),
and the start-up wait for a USB controller that is not plugged in."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

from pbmd.daemon.services import config as cfg
from pbmd.daemon.services.service import Service
from pbmd.drivers import codec
from pbmd.hw_sim.usb_backend import SimulatedUsbDevice

from .conftest import DaemonFactory
from .harness import (
    SHORT_SCREENING,
    SHORT_STEPS,
    RawClient,
    run_session_confirming,
    toml_config,
    write_protocol,
)
from .test_provisional_energy import check_final, port_rows
from .test_service_latch import sim_op


def test_simulator_over_usb_runs_a_session_and_reconnects(
    make_daemon: DaemonFactory, workdir: Path
) -> None:
    d = make_daemon(
        sim_extra='transport = "usb"\nserial = "PBM-USB-0007"\n',
        protocols="allow_unsigned = true\n",
    ).start()
    path = write_protocol(workdir)
    with RawClient(d.socket_path) as c:
        c.call("protocol.install", {"content": path.read_text()})
        ctrl = c.call("status")["controllers"][0]
        assert ctrl["url"] == "usb://1209:0001/PBM-USB-0007?backend=sim"
        assert ctrl["connected"] and ctrl["serial"] == "PBM-USB-0007"
        # The device goes away under the daemon (the link drops): a lost link, then
        # the service's reconnection reopens it; nothing starts by itself.
        sim_op(d.sim_control, "drop_link")
        lost = d.wait_log(lambda r: r.event == "controller.link_lost")
        assert "the device is gone" in str(lost.data["reason"])
        d.wait_log(lambda r: r.event == "controller.reconnected", timeout_s=60)
        session_id, state = run_session_confirming(c, "service-short", "USB-1", SHORT_SCREENING)
        assert state == "completed"
        record = c.call("records.show", {"session_id": session_id})["session"]
        assert len(record["steps"]) == SHORT_STEPS
    assert d.stop() == 0


def test_absent_usb_controller_is_waited_for(make_daemon: DaemonFactory) -> None:
    """No restart loop: the daemon says what it waits for, and keeps looking."""
    link = "usb://1209:0001/PBM-ABSENT"
    d = make_daemon(controllers_toml=f'\n[[controllers]]\nname = "main"\nlink = "{link}"\n')
    d.start(wait_ready=False)
    first = d.wait_log(lambda r: r.event == "controller.waiting")
    assert first.data["controller"] == "main" and first.data["link"] == link
    assert "no USB device 1209:0001 serial PBM-ABSENT is attached" in str(first.data["reason"])
    assert d.proc is not None and d.proc.poll() is None
    assert not d.socket_path.exists()
    assert d.stop() == 1
    assert "stopped while waiting for controller main" in d.output()


class _InProcess:
    """What check_final needs of a daemon and of its simulator, for a Service run in
    this process (its simulated USB device is on this process's bus, so the test
    can unplug it, which it cannot do to a daemon's)."""

    def __init__(self, socket_path: Path, control: str) -> None:
        self.socket_path = socket_path
        host, _, port = control.rpartition(":")
        self.control = (host, int(port))


def _poll(fn: Any, what: str, timeout_s: float = 60.0) -> Any:
    """A reading once it gives something (the service runs on the test's event loop,
    the client in a worker thread)."""
    deadline = time.monotonic() + timeout_s
    while not (value := fn()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)
    return value


def _unplug_then_replug(d: _InProcess, device: SimulatedUsbDevice, workdir: Path) -> None:
    with RawClient(d.socket_path) as c:
        c.call("protocol.install", {"content": write_protocol(workdir).read_text()})
        started = c.call(
            "session.start",
            {
                "protocol": "service-short",
                "patient_ref": "USB-UNPLUG",
                "contraindications": SHORT_SCREENING,
                "watch": True,
            },
        )
        session_id = str(started["session_id"])
        # Port 2's pad step needs no placement prompt: unplug once it has delivered energy.
        while True:
            msg = c.next_notification()
            if msg["method"] != "session.status":
                continue
            ports = {p["port"]: p for p in msg["params"]["status"].get("ports") or []}
            if (ports.get(2) or {}).get("controller_energy_j", 0) > 1.0:
                break
        device.unplug()
        ended = c.next_notification("session.ended")
        assert ended["params"]["state"] == "faulted"
        assert ended["params"]["status"]["cause_code"] == "E203"

        def closed() -> Any:
            record, rows = port_rows(c, session_id, 2)
            return record["ended_utc"] is not None and rows

        rows = _poll(closed, "closed record")
        assert [e["controller_energy_source"] for e in rows] == ["provisional"]
        lower_bound = int(rows[0]["controller_energy_uj"])
        assert "provisional" in _poll(
            lambda: c.call("status")["unreconciled"].get(session_id), "unreconciled session"
        )
        report = c.call("report.get", {"session_id": session_id, "format": "both"})
        assert report["report"]["controller_channel_final"] is False
        assert "PROVISIONAL" in report["text"]
        # The controller stopped the port itself: its watchdog, nothing reached it.
        snap = sim_op(d.control, "snapshot")["ports"][1]
        assert snap["port"] == 2 and not snap["emitting"]
        assert snap["counters"]["last_stop_reason"] == codec.StopReason.WATCHDOG
        assert snap["delivered_uj"] >= lower_bound
        assert not c.call("status")["controllers"][0]["connected"]  # still unplugged

        device.plug()
        _poll(lambda: c.call("status")["controllers"][0]["connected"], "reconnection")
        _poll(lambda: session_id not in c.call("status")["unreconciled"], "reconciliation")
        check_final(d, c, d, session_id)  # type: ignore[arg-type]
        _, rows = port_rows(c, session_id, 2)
        assert rows[0]["stop_reason"] == "watchdog"  # GET_COUNTERS' last stop reason


async def test_usb_unplug_mid_emission_provisional_then_reconciled_on_replug(
    workdir: Path,
) -> None:
    """Issue 15's acceptance: unplugged mid-emission, E203, the controller's watchdog
    stops the emission, the record is provisional; replugged, the service reconnects,
    reads GET_COUNTERS and the record holds the controller's figure, final."""
    home = workdir / "usb"
    home.mkdir()
    path = home / "pbmd.toml"
    sock = home / "control.sock"
    path.write_text(
        toml_config(
            home / "state",
            sock,
            sim_extra='transport = "usb"\nserial = "PBM-USB-0015"\n',
            protocols="allow_unsigned = true\n",
        ),
        encoding="utf-8",
    )
    config, source = cfg.load(path)
    service = Service(config, source)
    try:
        await service.start()
        (link,) = service.links
        assert link.sim is not None and link.sim.usb_device is not None
        assert link.control_address is not None
        d = _InProcess(sock, link.control_address)
        await asyncio.to_thread(_unplug_then_replug, d, link.sim.usb_device, workdir)
    finally:
        await service.stop()
        gc.unfreeze()  # the service froze the heap at start, as a daemon does for life
