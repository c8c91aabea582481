"""The daemon's log as an operator reads it off the journal: plain JSON lines
(`jq` reads every one), each event a dotted name with its details as fields."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

from .conftest import DaemonFactory
from .harness import pbmctl_json, write_protocol

EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")


def _closed_port() -> int:
    """A local port nobody listens on: the publisher starts and keeps retrying."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_log_lines_are_json_with_dotted_event_names(
    make_daemon: DaemonFactory, workdir: Path
) -> None:
    mqtt = f'[mqtt]\nhost = "127.0.0.1"\nport = {_closed_port()}\ndevice_id = "ws-log"\n'
    d = make_daemon(extra=mqtt).start()
    pbmctl_json(d.socket_path, "protocol", "install", str(write_protocol(workdir)))
    installed = d.wait_log(
        lambda r: r.event == "protocol.installed" and r.data["protocol_id"] == "service-short"
    )
    assert installed.data["protocol_id"] == "service-short"
    assert installed.data["signed_by"] == "42E43555FA8591F9"
    assert d.stop() == 0
    lines = [line.decode() for line in d.lines]
    # The daemon's stdout is a pipe here, not the journal: no `<6>` prefixes.
    records = [json.loads(line) for line in lines]
    if shutil.which("jq") is not None:
        jq = subprocess.run(
            ["jq", "-r", ".event"], input="".join(lines), capture_output=True, text=True
        )
        assert jq.returncode == 0, jq.stderr
        assert jq.stdout.split() == [r["event"] for r in records]
    odd = sorted({r["event"] for r in records if not EVENT_NAME.match(r["event"])})
    assert odd == [], f"events that are not dotted names: {odd}"
    events = [r["event"] for r in records]
    assert events.count("mqtt.started") == 1
    (ready,) = [r for r in records if r["event"] == "controller.ready"]
    assert ready["port_count"] == 4 and ready["serial"]


def test_stdlib_records_keep_their_fields(make_daemon: DaemonFactory) -> None:
    """The protocol library logs through the standard library: its fields survive."""
    d = make_daemon(protocols="trust_test_key = true\nallow_unsigned = true\n").start()
    unsigned = d.wait_log(lambda r: r.event == "protocols.unsigned_accepted")
    assert unsigned.data["level"] == "warning" and unsigned.data["directory"]
    assert "UNSIGNED" in unsigned.data["warning"]
    assert d.stop() == 0
