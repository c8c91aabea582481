"""Where pbmd keeps its state and its control socket, as the environment says.

Resolved here once, for the daemon and for pbmctl alike: systemd's directories
first, the system paths for the pbmd user, else the user's XDG directories.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

SYSTEM_USER = "pbmd"
SYSTEM_STATE_DIR = Path("/var/lib/pbmd")
SYSTEM_SOCKET = Path("/run/pbmd/control.sock")
SYSTEM_CONFIG = Path("/etc/pbmd/pbmd.toml")
SOCKET_NAME = "control.sock"
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes with the terminating NUL


def _running_as_system_user() -> bool:
    try:
        return pwd.getpwuid(os.getuid()).pw_name == SYSTEM_USER
    except KeyError:
        return False


def default_state_dir() -> Path:
    """$STATE_DIRECTORY (systemd), /var/lib/pbmd for the pbmd user, else the XDG state dir."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    if _running_as_system_user():
        return SYSTEM_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "pbmd"


def default_socket_path(state_dir: Path) -> Path:
    """$RUNTIME_DIRECTORY/control.sock, $XDG_RUNTIME_DIR/pbmd/control.sock, or the state dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "pbmd" / SOCKET_NAME
    return state_dir / SOCKET_NAME


def client_socket_candidates() -> list[Path]:
    """Where pbmctl looks for the daemon, in order, when no socket is given."""
    out: list[Path] = []
    env = os.environ.get("PBMD_SOCKET")
    if env:
        out.append(Path(env))
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        out.append(Path(runtime.split(":")[0]) / SOCKET_NAME)
    out.append(SYSTEM_SOCKET)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        out.append(Path(xdg) / "pbmd" / SOCKET_NAME)
    out.append(default_state_dir() / SOCKET_NAME)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]
