"""Through the daemon: the acknowledgement gate after E104 (API and pbmctl), and
status and readiness that follow the applicator actually plugged in."""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbmd.daemon.services.api.status import STATUS_MAX_AGE_S

from .conftest import DaemonFactory
from .harness import (
    SHORT_SCREENING,
    Daemon,
    RawClient,
    confirm_first_placements,
    pbmctl,
    pbmctl_json,
    run_session_confirming,
    write_protocol,
)
from .test_service_latch import sim_op

START = (
    "session",
    "start",
    "service-short",
    "--patient",
    "ACK-2",
    "--ports",
    "1",
    "--contraindication",
    "cancer=no",
    "--contraindication",
    "pregnancy=no",
)


def trip_e104(d: Daemon, c: RawClient, patient: str) -> None:
    """A session on port 1 whose emitter loses 30 % of its power: E104."""
    c.call(
        "session.start",
        {
            "protocol": "service-short",
            "patient_ref": patient,
            "ports": [1],
            "contraindications": SHORT_SCREENING,
            "watch": True,
        },
    )
    confirm_first_placements(c, (1,))
    d.wait_log(lambda r: r.event == "session.event" and r.data.get("kind") == "emission_started")
    sim_op(d.sim_control, "power_factor", port=1, factor=0.7)
    ended = c.next_notification("session.ended")["params"]
    assert ended["status"]["cause_code"] == "E104"


def test_power_deviation_is_acknowledged_before_the_next_start(
    make_daemon: DaemonFactory, workdir: Path
) -> None:
    d = make_daemon().start()
    pbmctl_json(d.socket_path, "protocol", "install", str(write_protocol(workdir)))
    with RawClient(d.socket_path) as c:
        trip_e104(d, c, "ACK-1")
        sim_op(d.sim_control, "clear")

        st = c.call("status")
        assert st["ready"]["ok"] is False and st["ready"]["code"] == "E104"
        refused = pbmctl(d.socket_path, "--json", *START)
        assert refused.returncode != 0
        text = refused.stdout + refused.stderr
        assert "E104" in text and "pbmctl session acknowledge E104" in text

        wrong = pbmctl(d.socket_path, "--json", "session", "acknowledge", "E105")
        assert wrong.returncode != 0 and "E104" in wrong.stdout + wrong.stderr
        done = pbmctl_json(
            d.socket_path, "session", "acknowledge", "E104", "--note", "emitter replaced"
        )
        user = pwd.getpwuid(os.getuid()).pw_name
        assert done["acknowledged"] == "E104" and done["user"] == user
        assert c.call("status")["ready"]["ok"] is True

        _, state = run_session_confirming(c, "service-short", "ACK-3", SHORT_SCREENING, ports=(1,))
        assert state == "completed"
        faulted = c.call("records.list")["sessions"][1]
        assert done["session_id"] == faulted["id"]
        events = c.call("records.show", {"session_id": faulted["id"]})["session"]["events"]
        (ack,) = [e for e in events if e["kind"] == "trip_acknowledged"]
        assert ack["data"]["user"] == user and ack["data"]["note"] == "emitter replaced"
        assert ack["code"] == "E104" and ack["utc"]
    assert d.stop() == 0


def _status_after(
    d: Daemon, c: RawClient, port: int, kind: str, shows: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Status once pbmd has read the port's PORT_INFO again after APPLICATOR_CHANGED
    (each (port, kind) is read again once below) and `shows` holds: a status snapshot
    is shared for STATUS_MAX_AGE_S, so it is asked again (no sleeping) until it does."""
    d.wait_log(
        lambda r: (
            r.event == "applicator.changed"
            and r.data.get("port") == port
            and r.data.get("kind") == kind
        ),
        what=f"PORT_INFO of port {port} read again",
    )
    deadline = time.monotonic() + 20 * STATUS_MAX_AGE_S
    while True:
        st: dict[str, Any] = c.call("status")
        if shows(st) or time.monotonic() > deadline:
            return st


def test_status_follows_unplug_replug_and_swap(make_daemon: DaemonFactory) -> None:
    d = make_daemon().start()
    with RawClient(d.socket_path) as c:
        before = c.call("status")
        assert before["ready"]["ok"] is True
        old_probe = before["ports"][3]["applicator"]
        assert old_probe["channels_nm"] == [905]

        sim_op(d.sim_control, "unplug", port=1)
        st = _status_after(d, c, 1, "NONE", lambda s: s["ports"][0]["applicator"] is None)
        assert st["ports"][0]["applicator"] is None
        assert st["ready"]["ok"] is False and "port 1" in st["ready"]["reason"]

        sim_op(d.sim_control, "plug", port=1, applicator="duo_pad")
        st = _status_after(d, c, 1, "PAD", lambda s: s["ready"]["ok"])
        assert st["ready"]["ok"] is True and st["ports"][0]["applicator"]["kind"] == "pad"

        sim_op(d.sim_control, "unplug", port=4)
        sim_op(d.sim_control, "plug", port=4, applicator="probe_830")
        st = _status_after(
            d, c, 4, "PROBE", lambda s: s["ports"][3]["applicator"]["channels_nm"] == [830]
        )
        assert st["ready"]["ok"] is True
        probe = st["ports"][3]["applicator"]
        assert probe["channels_nm"] == [830] and probe["kind"] == "probe"
        assert probe["serial"] != old_probe["serial"]
    assert d.stop() == 0


def test_a_restart_does_not_acknowledge_the_trip(make_daemon: DaemonFactory, workdir: Path) -> None:
    """The gate is kept in the state directory: stopping and starting pbmd (or a
    crash and systemd's restart) leaves it held until an operator acknowledges."""
    d = make_daemon().start()
    pbmctl_json(d.socket_path, "protocol", "install", str(write_protocol(workdir)))
    with RawClient(d.socket_path) as c:
        trip_e104(d, c, "ACK-4")
    assert d.stop() == 0
    assert (d.state_dir / "acknowledge-required.json").exists()

    d = make_daemon().start()  # the same state directory; a new, healthy simulator
    d.wait_log(lambda r: r.event == "trip.awaits_acknowledgement" and r.data["code"] == "E104")
    st = pbmctl_json(d.socket_path, "status")
    assert st["ready"]["ok"] is False and st["ready"]["code"] == "E104"
    refused = pbmctl(d.socket_path, *START)
    assert refused.returncode != 0 and "pbmctl session acknowledge E104" in refused.stderr
    pbmctl_json(d.socket_path, "session", "acknowledge", "E104", "--note", "checked after restart")
    assert pbmctl_json(d.socket_path, "status")["ready"]["ok"] is True
    assert d.stop() == 0
    assert not (d.state_dir / "acknowledge-required.json").exists()
