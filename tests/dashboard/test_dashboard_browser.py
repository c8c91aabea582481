"""The clinic dashboard in a real browser (headless Debian chromium, playwright-core)
against a real mosquitto with a WebSockets listener and two `pbmd run` workstations.

The page lists both workstations, a port's progress moves, a paused port reads
paused, an emergency stop injected through the simulator's control channel shows
as a trip with its cause within a second, and the page comes back by itself
after the broker restarts. Screenshots go to test-artifacts/dashboard/.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from service.harness import (
    PBMD,
    SHORT_SCREENING,
    RawClient,
    pbmctl_json,
    run_session_confirming,
    write_protocol,
)
from service.test_service_latch import sim_op

from .broker import DASHBOARD_PASSWORD, DASHBOARD_USER
from .browser import CHROMIUM, DIST, NODE, Browser
from .conftest import Workstations

if NODE is None:
    pytest.skip("node is not installed: the dashboard is not built", allow_module_level=True)
if not (DIST / "app.js").exists():
    raise RuntimeError(f"{DIST} is not built: run `make setup` (npm ci && npm run build)")
if not CHROMIUM.exists():
    raise RuntimeError(f"{CHROMIUM} not found: run `make system-deps` (chromium, chromium-driver)")

A, B = "ws-a", "ws-b"


def card(ws: str, port: int | None = None) -> str:
    """JS: the workstation's section, or one of its port cards."""
    q = f"document.querySelector('[data-device=\"{ws}\"]')"
    return q if port is None else f"{q}?.querySelector('[data-port=\"{port}\"]')"


def port_state(ws: str, port: int) -> str:
    return f"{card(ws, port)}?.querySelector('.port-state')?.dataset.value"


def progress(ws: str, port: int) -> str:
    return f"parseInt({card(ws, port)}?.querySelector('[data-field=progress]')?.textContent)"


def conn_state() -> str:
    return "document.getElementById('conn').dataset.state"


def write_page(ws_url: str, workdir: Path) -> Path:
    """`pbmd dashboard --out`: the page as a clinic gets it, with the read-only user."""
    secret = workdir / "dashboard.password"
    secret.write_text(DASHBOARD_PASSWORD + "\n", encoding="utf-8")
    out = workdir / "page"
    argv = [*PBMD, "dashboard", "--out", str(out), "--broker", ws_url]
    argv += ["--username", DASHBOARD_USER, "--password-file", str(secret)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return out / "index.html"


class Session(threading.Thread):
    """One session through the control socket, placements confirmed as they come."""

    def __init__(self, socket_path: Path, ports: list[int], patient: str) -> None:
        super().__init__(daemon=True)
        self.socket_path, self.ports, self.patient = socket_path, ports, patient
        self.result: tuple[str, str] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with RawClient(self.socket_path, timeout_s=90) as client:
                self.result = run_session_confirming(
                    client, "service-short", self.patient, SHORT_SCREENING, ports=self.ports
                )
        except BaseException as exc:
            self.error = exc

    def outcome(self, timeout_s: float = 30.0) -> str:
        self.join(timeout_s)
        assert not self.is_alive(), f"session on {self.socket_path} did not end"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result[1]


def test_dashboard_in_chromium(start_broker, workstations: Workstations, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    broker = start_broker([A, B])
    daemons = workstations(broker, [A, B], time_scale=5.0)  # light on two cores
    protocol = write_protocol(workdir)
    for d in daemons.values():
        pbmctl_json(d.socket_path, "protocol", "install", str(protocol))

    browser = Browser()
    try:
        browser.call("open", url=write_page(broker.ws_url, workdir).as_uri())
        browser.wait(f"{conn_state()} === 'connected'")
        for ws in (A, B):  # every workstation listed, from its retained topics
            browser.wait(f"{card(ws)}?.querySelector('.status')?.dataset.value === 'online'")
            browser.wait(f"{card(ws)}?.querySelector('.session')?.dataset.value === 'no session'")

        sessions = {A: Session(daemons[A].socket_path, [1], "DASH-A"),
                    B: Session(daemons[B].socket_path, [2], "DASH-B")}  # fmt: skip
        for s in sessions.values():
            s.start()

        # Progress moves: two readings of B's port 2, the second further on.
        first = browser.wait(f"{progress(B, 2)} > 0 && {progress(B, 2)}", timeout_s=20)
        browser.wait(f"{progress(B, 2)} >= {first + 5}", timeout_s=10)
        browser.wait(f"{card(B, 2)}.querySelector('polyline.dose') !== null")

        # A paused port reads paused.
        browser.wait(f"{port_state(A, 1)} === 'emitting'", timeout_s=20)
        with RawClient(daemons[A].socket_path) as client:
            client.call("session.pause", {"port": 1})
        browser.wait(f"{port_state(A, 1)} === 'paused'", timeout_s=5)
        browser.screenshot("1-running-and-paused.png")

        # A trip (emergency stop pressed on B's controller) shows with its cause within 1 s.
        injected = time.monotonic()
        sim_op(daemons[B].sim_control, "estop", pressed=True)
        browser.wait(f"{card(B)}.querySelector('.trip').textContent.includes('E303')", 5)
        shown_after_s = time.monotonic() - injected
        assert shown_after_s < 1.0, f"the trip took {shown_after_s:.2f} s to show"
        assert "E303" in sessions[B].outcome()
        alert = browser.eval("document.getElementById('alerts').textContent")
        assert B in alert and "E303" in alert
        assert browser.eval("document.getElementById('alerts').getAttribute('role')") == "alert"
        assert alert.count("E303") == 1, alert  # announced once, not per message
        browser.wait(f"{card(B)}.querySelector('[data-kind=trip]') !== null")
        browser.screenshot("2-trip.png")

        # The broker restarts (losing its retained topics): the page reconnects by
        # itself and shows what the daemons re-publish.
        broker.stop()
        browser.wait(f"{conn_state()} === 'reconnecting'", timeout_s=10)
        browser.wait(f"{card(A)}.querySelector('.status').dataset.value === 'not known'")
        browser.screenshot("3-broker-down.png")
        broker.start()
        browser.wait(f"{conn_state()} === 'connected'", timeout_s=15)
        browser.wait(f"{card(A)}.querySelector('.status').dataset.value === 'online'")
        browser.wait(f"{port_state(A, 1)} === 'paused'")
        paused_at = browser.eval(progress(A, 1))
        with RawClient(daemons[A].socket_path) as client:
            client.call("session.resume", {"port": 1})
            browser.wait(f"{port_state(A, 1)} === 'emitting'", timeout_s=10)
            browser.wait(f"{progress(A, 1)} > {paused_at}", timeout_s=10)  # live again
            browser.screenshot("4-after-broker-restart.png")
            client.call("session.abort", {"reason": "dashboard test done"})
        assert sessions[A].outcome().startswith("aborted")
        browser.wait(f"{card(A)}.querySelector('.session').dataset.value === 'aborted'")

        # Keyboard: arrow keys move between port cards, each named by its heading.
        browser.eval(f"{card(A, 1)}.focus()")
        focused = browser.call("press", key="ArrowRight")
        assert focused == f"ws-{B}-p2-h", focused
        labels = browser.eval(
            "[...document.querySelectorAll('.port')].map(p => "
            "document.getElementById(p.getAttribute('aria-labelledby')).textContent)"
        )
        assert labels == ["Port 1■ Stopped", "Port 2■ Stopped"], labels
        bars = browser.eval(
            "[...document.querySelectorAll('[role=progressbar]')].map(b => b.getAttribute("
            "'aria-valuetext'))"
        )
        assert len(bars) == 2 and all(b.endswith("of the step's dose") for b in bars), bars
        browser.screenshot("5-final.png")
    finally:
        browser.close()
