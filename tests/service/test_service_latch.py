"""E501 (a port still lit after ALL_OFF and DISARM) latches "service required": no
session starts, across a restart too, until a technician records the service done."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from .conftest import DaemonFactory
from .harness import (
    SHORT_SCREENING,
    RawClient,
    confirm_first_placements,
    pbmctl,
    pbmctl_json,
    write_protocol,
)


def sim_op(address: tuple[str, int], op: str, **args: Any) -> Any:
    """One request on the simulator's fault-injection channel (JSON lines)."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"], reply
    return reply["result"]


def test_stuck_port_latches_service_required_until_a_technician_clears_it(
    make_daemon: DaemonFactory, workdir: Path
) -> None:
    d = make_daemon().start()
    path = write_protocol(workdir)
    pbmctl_json(d.socket_path, "protocol", "install", str(path))
    with RawClient(d.socket_path) as c:
        c.call(
            "session.start",
            {
                "protocol": "service-short",
                "patient_ref": "STUCK-1",
                "ports": [1],
                "contraindications": SHORT_SCREENING,
                "watch": True,
            },
        )
        confirm_first_placements(c, (1,))
        d.wait_log(
            lambda r: r.event == "session.event" and r.data.get("kind") == "emission_started"
        )
        sim_op(d.sim_control, "stuck_on", port=1)
        c.call("session.pause", {"port": 1})  # EMIT_STOP: the light stays on
        ended = c.next_notification("session.ended")["params"]
        assert ended["state"] == "faulted"
        assert ended["status"]["cause_code"] == "E501"
        st = c.call("status")
        assert st["service_required"].startswith("E501")
    assert d.stop() == 0
    latch = json.loads((d.state_dir / "service-required.json").read_text())
    assert latch["cause"].startswith("E501")

    # A restart (the hardware fault gone with the old simulator) still refuses.
    d2 = make_daemon().start()
    st = pbmctl_json(d2.socket_path, "status")
    assert st["service_required"] == latch["cause"]
    assert any("SERVICE REQUIRED" in w for w in st["daemon"]["warnings"])
    refused = pbmctl(
        d2.socket_path,
        "--json",
        "session",
        "start",
        "service-short",
        "--patient",
        "STUCK-2",
        "--ports",
        "1",
        "--contraindication",
        "cancer=no",
        "--contraindication",
        "pregnancy=no",
    )
    assert refused.returncode != 0
    assert "needs service" in refused.stdout + refused.stderr

    # Clearing needs a note of what was done; root is a technician.
    no_note = pbmctl(d2.socket_path, "service", "clear", "--note", "")
    assert no_note.returncode != 0
    cleared = pbmctl_json(d2.socket_path, "service", "clear", "--note", "replaced port 1 driver")
    assert cleared["cleared"] is True and cleared["cause"] == latch["cause"]
    assert not (d2.state_dir / "service-required.json").exists()
    st = pbmctl_json(d2.socket_path, "status")
    assert st["service_required"] is None
    again = pbmctl(d2.socket_path, "service", "clear", "--note", "twice")
    assert again.returncode != 0 and "nothing to clear" in again.stdout + again.stderr
    assert d2.stop() == 0
