"""A mosquitto with a WebSockets listener, users and an ACL, as a clinic would run it.

Started by the test on free loopback ports (the machine's shared broker has no
WebSockets listener): one MQTT listener for the daemons and one WebSockets
listener for the page. The dashboard user may only read ``pbm/v1/#``; each
workstation may write only its own topics (dashboard/mosquitto/ ships the same
rules for a clinic).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mqtt.broker import MOSQUITTO, free_port, make_password_file

DASHBOARD_USER = "dashboard"
DASHBOARD_PASSWORD = "dashboard-read-only"


def acl_text(workstations: Sequence[str]) -> str:
    """The dashboard reads everything pbmd publishes; a workstation writes its own."""
    lines = [f"user {DASHBOARD_USER}", "topic read pbm/v1/#", ""]
    for ws in workstations:
        lines += [
            f"user {ws}",
            f"topic write pbm/v1/{ws}/#",
            f"topic write homeassistant/sensor/pbmd_{ws}/#",
            "topic read homeassistant/status",
            "",
        ]
    return "\n".join(lines)


def workstation_password(ws: str) -> str:
    return f"secret-{ws}"


class WsBroker:
    """mosquitto -c <generated conf>; restartable on the same two ports."""

    def __init__(self, directory: Path, workstations: Sequence[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.ws_port = free_port()
        users = {DASHBOARD_USER: DASHBOARD_PASSWORD}
        users |= {ws: workstation_password(ws) for ws in workstations}
        self.password_file = make_password_file(directory / "passwd", users)
        self.acl_file = directory / "acl"
        self.acl_file.write_text(acl_text(workstations), encoding="utf-8")
        self.config_path = directory / "mosquitto.conf"
        self.log: list[str] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    def _config(self) -> str:
        lines = [
            # mosquitto 2.0 will not start with a WebSockets listener alone.
            f"listener {self.port} 127.0.0.1",
            f"listener {self.ws_port} 127.0.0.1",
            "protocol websockets",
            "allow_anonymous false",
            f"password_file {self.password_file}",
            f"acl_file {self.acl_file}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp false",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> None:
        self.config_path.write_text(self._config(), encoding="utf-8")
        mark = len(self.log)
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._read, args=(self._proc,), daemon=True).start()
        self.wait_log(r"mosquitto version \S+ running", timeout_s=timeout_s, start=mark)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            with self._cond:
                self.log.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_log(self, pattern: str, *, timeout_s: float = 10.0, start: int = 0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        i = start
        with self._cond:
            while True:
                for line in self.log[i:]:
                    if rx.search(line):
                        return line
                i = len(self.log)
                if self._proc is not None and self._proc.poll() is not None:
                    raise AssertionError("mosquitto exited:\n" + "\n".join(self.log))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"mosquitto never logged {pattern!r}")
                self._cond.wait(left)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def mqtt_table(broker: WsBroker, ws: str, directory: Path) -> str:
    """The daemon's [mqtt] table for workstation ``ws`` on this broker."""
    secret = directory / f"{ws}.mqtt-password"
    secret.write_text(workstation_password(ws) + "\n", encoding="utf-8")
    return f"""
[mqtt]
host = "127.0.0.1"
port = {broker.port}
device_id = "{ws}"
username = "{ws}"
password_file = "{secret}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
"""
