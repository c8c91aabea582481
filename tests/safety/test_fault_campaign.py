"""The fault campaign, short: 20 sessions with a fixed seed (bench/fault_campaign.py,
whose full run is in docs/safety/fault-campaign.md), and its invariant checks shown
to catch what they are for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import fault_campaign as fc  # noqa: E402

SEED = 12


def test_short_fault_campaign() -> None:
    """20 sessions (4 of them in `pbmd run`: SIGKILL and restart, disk full or a broker
    outage) with random faults: no invariant is violated, and the run says how to
    reproduce itself."""
    argv = [sys.executable, str(ROOT / "bench" / "fault_campaign.py")]
    args = ["--sessions", "20", "--seed", str(SEED), "--daemon-every", "5"]
    res = subprocess.run(
        argv + args, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ)
    )
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-4000:]
    assert f"--sessions 20 --seed {SEED} --time-scale 60 --daemon-every 5" in out
    summary = next(line for line in out.splitlines() if line.startswith("| 20 | 16 | 4 |"))
    assert summary.split("|")[6].strip() == "0", summary  # invariant violations
    kinds = {*fc.ENGINE_KINDS, *fc.DAEMON_KINDS}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()]
    injected = [int(row[1]) for row in rows if len(row) == 2 and row[0] in kinds]
    assert len(injected) == len(kinds)
    assert sum(injected) >= 20, out[-3000:]


def _log(lines: list[dict[str, object]], stopped: bool = True) -> fc.SessionLog:
    return fc.SessionLog(token=7, lines=lines, stop_s=10.0, stopped=stopped)


START = {"k": "start", "t": 9.0, "port": 1, "token": 7, "budget_uj": 1050, "max_ms": 10}
END = {"k": "end", "t": 10.01, "port": 1, "token": 7, "reason": 9, "uj": 900, "budget_uj": 1050}


def test_the_emission_checks_catch_what_they_are_for() -> None:
    budgets = {1: [1050]}
    assert fc.check_emissions(_log([START, END]), budgets) == []
    late_start = {**START, "t": 10.5}
    assert (
        "began on port 1" in fc.check_emissions(_log([late_start, {**END, "t": 10.6}]), budgets)[0]
    )
    assert "never ended" in fc.check_emissions(_log([START]), budgets)[0]
    assert "over its budget" in fc.check_emissions(_log([START, {**END, "uj": 1051}]), budgets)[0]
    assert "above the plan" in fc.check_emissions(_log([START, END]), {1: [1000]})[0]
    late_end = {**END, "t": 11.5}
    assert "ended 1.500 s after the stop" in fc.check_emissions(_log([START, late_end]), budgets)[0]


def test_the_record_checks_catch_what_they_are_for() -> None:
    record = {
        "ended_utc": "x",
        "outcome": "faulted",
        "stop_cause_code": "E303",
        "stop_cause_message": "E303 The emergency stop was pressed.",
        "steps": [{"port": 1, "step_index": 0, "outcome": "faulted"}],
        "emissions": [
            {
                "port": 1,
                "seq": 1,
                "ended_utc": "x",
                "controller_energy_source": "stopped",
                "controller_energy_uj": 900,
            }
        ],
    }
    log = _log([START, END])
    assert fc.check_record(record, log, (7, {1: 900})) == []
    assert fc.check_record(record, log, (7, {1: 901})) == [
        "port 1: recorded 900 µJ, controller counter 901 µJ"
    ]
    provisional = {
        **record,
        "emissions": [{**record["emissions"][0], "controller_energy_source": "provisional"}],
    }
    assert "provisional" in fc.check_record(provisional, log, (7, {1: 900}))[0]
    no_cause = {**record, "stop_cause_code": None}
    assert "without a registered cause" in fc.check_record(no_cause, log, (7, {1: 900}))[0]
    assert fc.check_quiet([{"k": "rx", "t": 11.0, "m": "Arm"}], "after") == ["ARM after"]
