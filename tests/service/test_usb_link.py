"""pbmd with a USB controller: the embedded simulator over the simulated USB bus
(transport = "usb"), a link loss and the reconnection, and the start-up wait for
a USB controller that is not plugged in."""

from __future__ import annotations

from pathlib import Path

from .conftest import DaemonFactory
from .harness import SHORT_SCREENING, SHORT_STEPS, RawClient, run_session_confirming, write_protocol
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
