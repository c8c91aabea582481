"""What pbmd keeps in its state directory: the lock and the calibration date.

The lock makes this daemon the only one using the directory; files are
written atomically, so a reader sees the old one or the new one, never half.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbmd.daemon.services.errors import StartupError


def lock(state_dir: Path) -> int:
    """Create the directory if needed and hold its lock (the pid written in it)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        path = state_dir / "pbmd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise StartupError(
            f"state directory {state_dir}: {exc.strerror or exc}; create it writable "
            "for the user pbmd runs as, or set state_dir (or --state-dir)"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(
            f"another pbmd (pid {other}) is using the state directory {state_dir}; "
            "stop it first, or give this one another state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


@dataclass
class Calibration:
    """The calibration due date and where it was set (configuration or the API)."""

    due: dt.date | None
    source: str
    set_by: str | None = None
    set_utc: str | None = None

    @classmethod
    def load(cls, path: Path, default: Calibration) -> Calibration:
        """The date set through the API, else `default`; unreadable stops the start."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                dt.date.fromisoformat(data["due"]),
                f"set through the API ({path})",
                data.get("set_by"),
                data.get("set_utc"),
            )
        except FileNotFoundError:
            return default
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StartupError(
                f"{path} is unreadable ({exc}); set the date again with `pbmctl calibration set "
                "DATE` after removing the file, or restore it"
            ) from exc

    @classmethod
    def save(cls, path: Path, due: dt.date, user: str) -> Calibration:
        """Persist a new due date set by `user`; the value to apply once it is stored."""
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_json_atomic(path, {"due": due.isoformat(), "set_by": user, "set_utc": now})
        return cls(due, f"set through the API ({path})", user, now)

    def status(self) -> dict[str, Any]:
        today = dt.date.today()
        return {
            "due": self.due.isoformat() if self.due else None,
            "overdue": bool(self.due and today > self.due),
            "source": self.source,
            "set_by": self.set_by,
            "set_utc": self.set_utc,
        }
