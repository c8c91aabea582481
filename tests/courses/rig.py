"""The course tests' rig: a daemon service in this process (so that the test holds its
calendar clock), the embedded simulator over the real byte protocol, and a blocking
JSON-RPC client on the real control socket, run in a worker thread."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fixtures.protocols import header, pad_step, port, site
from service.harness import RawClient, toml_config, write_protocol

from pbmd.daemon.services import config as cfg
from pbmd.daemon.services.service import Service

COURSE_SCREENING = {"cancer": False, "pregnancy": False}
STEP_FLUENCE_J_CM2 = 1.0


def course_protocol(version: int = 1) -> str:
    """Two pads on the lower back at once, 660 nm on the left and 830 nm on the right,
    1 J/cm² each at 10 mW/cm² (100 s of device time, 3.3 s at ×30, as the service
    tests' pads): a short stand-in of the chronic lumbar course's pad part."""
    text = (
        header(
            "course-lumbar",
            "Course test protocol (pads, lumbar)",
            contraindications=tuple(COURSE_SCREENING),
            sessions=12,
            interval_days=2,
        )
        + site("back", "Left lumbar paraspinal muscles", "lumbar", 180.0)
        + site("back-right", "Right lumbar paraspinal muscles", "lumbar", 180.0)
        + port(1, "pad", [pad_step(site="back", nm=660, irradiance=10.0, fluence=1.0)])
        + port(2, "pad", [pad_step(site="back-right", nm=830, irradiance=10.0, fluence=1.0)])
    )
    return text.replace("\nversion = 1\n", f"\nversion = {version}\n", 1)


class ManualClock:
    """The calendar the course rules read; the test moves it between visits."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> None:
        with self._lock:
            self._now += timedelta(**delta)


@dataclass
class Home:
    config: Path
    socket: Path
    state: Path
    protocols: Path


def make_home(base: Path, courses_toml: str = "", extra: str = "") -> Home:
    home = base / "course"
    home.mkdir(exist_ok=True)
    protocols = base / "protocol-files"
    protocols.mkdir(exist_ok=True)
    write_protocol(protocols, course_protocol(1), "course-v1.toml")
    write_protocol(protocols, course_protocol(2), "course-v2.toml")
    sock = home / "control.sock"
    config = home / "pbmd.toml"
    config.write_text(
        toml_config(
            home / "state",
            sock,
            time_scale=30.0,
            extra=f"[courses]\n{courses_toml}\n{extra}",
        ),
        encoding="utf-8",
    )
    return Home(config, sock, home / "state", protocols)


def install(client: RawClient, path: Path) -> Any:
    return client.call(
        "protocol.install",
        {
            "content": path.read_text(encoding="utf-8"),
            "filename": path.name,
            "signature": Path(str(path) + ".minisig").read_text(encoding="utf-8"),
        },
    )


def error_of(client: RawClient, method: str, params: dict[str, Any]) -> dict[str, Any]:
    reply = client.request(method, params)
    assert "error" in reply, f"{method} {params} was accepted: {reply}"
    return dict(reply["error"])


def run_course_session(client: RawClient, params: dict[str, Any]) -> tuple[str, str, Any]:
    """Start a course's session watching it, until it ends: (session id, state, place)."""
    result = client.call("course.session_start", {**params, "watch": True})
    session_id = str(result["session_id"])
    while True:
        msg = client.next_notification()
        if msg["method"] == "session.ended":
            p = msg["params"]
            state = str(p["state"])
            if state != "completed":
                status = p.get("status") or {}
                state += f" ({status.get('cause_code')}: {status.get('cause_message')})"
            return session_id, state, result["course"]


async def run_service(home: Home, clock: ManualClock, scenario: Callable[[], Any]) -> Any:
    """Start the service in this process on `home`'s configuration with `clock`, run the
    blocking `scenario` in a worker thread, stop the service."""
    config, source = cfg.load(home.config)
    service = Service(config, source, clock=clock)
    try:
        await service.start()
        return await asyncio.to_thread(scenario)
    finally:
        await service.stop()
        gc.unfreeze()  # the service froze the heap at start, as a daemon does for life
