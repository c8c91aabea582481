"""sd_notify(3) for the daemon: READY, STATUS, STOPPING and the watchdog keep-alive."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger()


class Notifier:
    """sd_notify(3) without libsystemd: one datagram per message to $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.address: str | None = None
        self._sock: socket.socket | None = None
        raw = os.environ.get("NOTIFY_SOCKET")
        if raw:
            self.address = "\0" + raw[1:] if raw.startswith("@") else raw
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_s: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                sock.connect(self.address)
                self._sock = sock
            self._sock.send("\n".join(lines).encode("utf-8"))
            return True
        except OSError as exc:
            log.warning("systemd.notify_failed", error=str(exc), message=lines[0])
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
