"""pbmctl's rendering, without a daemon: the cause code once, the paused state whole,
and the rate of progress lines off a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from pbmd.daemon.clients import ctl_view as view
from pbmd.daemon.clients.ctl_follow import ProgressLines

TRIP = "E201 The controller stopped reporting measurements; emission stopped."


def _port(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "port": 1, "step": 0, "steps": 2, "site": "back", "label": "Left lumbar",
        "wavelength_nm": 660, "state": "emitting", "wait_reason": None, "fraction": 0.0,
        "fluence_j_cm2": 0.0, "target_fluence_j_cm2": 4.0, "remaining_s": 400.0,
    }  # fmt: skip
    base.update(fields)
    return base


def _screen(sv: view.SessionView, width: int = 100) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(sv.render())
    return out.getvalue()


def test_the_cause_code_is_printed_once() -> None:
    assert view.cause_text("E201", TRIP) == TRIP
    assert view.cause_text("A001", "aborted by operator") == "A001 aborted by operator"
    status = {"state": "faulted", "session_id": "e154c259-0000", "cause_code": "E201",
              "cause_message": TRIP, "ports": []}  # fmt: skip
    sv = view.SessionView(status, auto_confirm=False, interactive=False)
    assert "E201 E201" not in _screen(sv) and "E201 The controller" in _screen(sv)


def test_the_paused_state_is_shown_whole() -> None:
    reason = "paused by operator; confirm placement"
    status = {"state": "running", "ports": [_port(state="paused", wait_reason=reason)]}
    sv = view.SessionView(status, auto_confirm=False, interactive=True)
    assert "paused+confirm " in _screen(sv)


def test_progress_lines_on_changes_and_tenths_at_a_modest_rate() -> None:
    now = [0.0]
    lines = ProgressLines(clock=lambda: now[0])

    def at(t: float, **fields: object) -> list[str]:
        now[0] = t
        return lines.lines({"ports": [_port(**fields)]})

    assert len(at(0.0, fraction=0.01)) == 1  # first sight
    assert at(1.0, fraction=0.05) == []  # same tenth, same state
    assert at(2.0, fraction=0.15) == []  # a new tenth, but within 5 s of the last line
    (line,) = at(5.5, fraction=0.16)
    assert " port 1 step 1/2 660 nm emitting 16% 0.00/4.00 J/cm² 6:40 left" in line
    assert at(6.0, fraction=0.17) == []
    assert len(at(6.1, fraction=0.17, state="paused", wait_reason="paused by operator")) == 1
    assert len(at(6.2, fraction=1.0, state="done")) == 1  # a change prints at once
    assert " done 100% " in at(6.3, step=1, state="done")[0]
