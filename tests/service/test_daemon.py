"""pbmd run as a real process, driven by pbmctl and raw socket clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
from pathlib import Path

import pytest

from pbmd.protocols import library

from .conftest import DaemonFactory
from .harness import (
    SCREENING_CHRONIC,
    SHORT_SCREENING,
    SHORT_STEPS,
    Daemon,
    RawClient,
    confirm_first_placements,
    pbmctl,
    pbmctl_json,
    run_session_confirming,
    screening_args,
    step_errors,
    write_protocol,
)


def test_status_and_shipped_library(daemon: Daemon) -> None:
    st = pbmctl_json(daemon.socket_path, "status")
    assert st["daemon"]["config"] == str(daemon.config_path)
    assert st["ready"]["ok"] is True
    assert [p["port"] for p in st["ports"]] == [1, 2, 3, 4]
    assert st["ports"][3]["applicator"]["kind"] == "probe"
    assert st["controllers"][0]["simulated"] is True
    assert st["controllers"][0]["time_scale"] == 30.0
    assert st["caller"]["roles"] == ["clinician", "reader", "technician"]  # root
    assert any("NOT FOR CLINICAL USE" in w for w in st["daemon"]["development"])
    listed = pbmctl_json(daemon.socket_path, "protocol", "list")["protocols"]
    assert "lumbar-chronic-nonspecific" in {p["id"] for p in listed}
    shown = pbmctl_json(daemon.socket_path, "protocol", "show", "lumbar-chronic-nonspecific")
    assert shown["runnable"]["ok"] is True
    assert {c["name"] for c in shown["contraindications"]} == set(SCREENING_CHRONIC)
    # the plan view: the timeline (which port does what when) and the sources
    proto = shown["protocol"]
    assert proto["phases"] and proto["phases"][-1]["end_s"] == proto["session_time_s"]
    assert {slot["port"] for slot in proto["timeline"]} == {1, 2, 3, 4}
    assert {e["ref"] for e in proto["evidence"]} >= {"walt-2010"}
    view = pbmctl(daemon.socket_path, "protocol", "show", "lumbar-chronic-nonspecific")
    assert view.returncode == 0
    assert "timeline" in view.stdout and "sources" in view.stdout
    assert "port 4 step 1:" in view.stdout
    human = pbmctl(daemon.socket_path, "status")
    assert human.returncode == 0
    assert "ready for a session: yes" in human.stdout


def test_session_end_to_end_through_pbmctl_json(
    make_daemon: DaemonFactory, workdir: Path
) -> None:
    """What a script does with `pbmctl --json`: install, start with --auto-confirm and
    follow to the end, read the record and the report. (The four-port lumbar session
    runs end to end through `pbmd demo` in test_demo.py.)"""
    daemon = make_daemon(time_scale=60.0).start()
    path = write_protocol(workdir)
    pbmctl_json(daemon.socket_path, "protocol", "install", str(path))
    res = pbmctl(
        daemon.socket_path,
        "--json",
        "session",
        "start",
        "service-short",
        "--patient",
        "E2E-1",
        *screening_args(SHORT_SCREENING),
        "--auto-confirm",
        timeout_s=180,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines[-1]["state"] == "completed"
    session_id = lines[-1]["session_id"]
    assert any("confirmed automatically" in str(x.get("pbmctl", "")) for x in lines)
    kinds = {x["params"]["event"]["kind"] for x in lines if x.get("method") == "session.event"}
    assert {"step_started", "step_completed", "port_waiting", "confirmed"} <= kinds
    record = pbmctl_json(daemon.socket_path, "records", "show", session_id)["session"]
    assert record["outcome"] == "completed"
    assert record["operator"] == "root"
    assert len(record["steps"]) == SHORT_STEPS
    assert max(abs(e) for e in step_errors(record)) < 0.02
    report = pbmctl(daemon.socket_path, "report", session_id)
    assert report.returncode == 0
    assert "PHOTOBIOMODULATION TREATMENT REPORT" in report.stdout
    assert "COMPLETED" in report.stdout
    listed = pbmctl_json(daemon.socket_path, "records", "list")["sessions"]
    assert listed[0]["id"] == session_id


@pytest.mark.parametrize("transport", ["tcp", "pty"])
def test_session_over_raw_socket_with_watch(
    make_daemon: DaemonFactory, workdir: Path, transport: str
) -> None:
    daemon = make_daemon(sim_extra=f'transport = "{transport}"\n').start()
    path = write_protocol(workdir)
    installed = pbmctl_json(daemon.socket_path, "protocol", "install", str(path))
    assert installed["installed"]["signed_by"] == "42E43555FA8591F9"
    with RawClient(daemon.socket_path) as client:
        session_id, state = run_session_confirming(
            client, "service-short", "RAW-1", SHORT_SCREENING
        )
        assert state == "completed"
        record = client.call("records.show", {"session_id": session_id})["session"]
    assert len(record["steps"]) == SHORT_STEPS
    assert max(abs(e) for e in step_errors(record)) < 0.03
    assert record["signing_key_id"] == "42E43555FA8591F9"


def test_step_context_is_bound_in_logs(daemon: Daemon, workdir: Path) -> None:
    write_protocol(workdir)
    pbmctl_json(daemon.socket_path, "protocol", "install", str(workdir / "short.toml"))
    with RawClient(daemon.socket_path) as client:
        session_id, _ = run_session_confirming(client, "service-short", "LOG-1", SHORT_SCREENING)
    rec = daemon.wait_log(lambda r: r.event == "step.completed" and r.data.get("port") == 4)
    # Bound by the service in the port's task (the call itself passes neither).
    assert rec.data["session_id"] == session_id
    assert rec.data["step"] in (0, 1)
    assert "client" not in rec.data  # not the API connection that started the session
    assert rec.priority == 6
    warning = daemon.wait_log(lambda r: r.event == "config.development")
    assert warning.priority == 4
    # Not the journal's stream (a pipe): every line is plain JSON, as `jq` needs.
    assert daemon.lines and all(json.loads(line)["event"] for line in daemon.lines)


def test_sigterm_during_session_closes_it_with_its_record(make_daemon: DaemonFactory) -> None:
    d = make_daemon(time_scale=20.0).start()
    with RawClient(d.socket_path) as client:
        result = client.call(
            "session.start",
            {
                "protocol": "lumbar-chronic-nonspecific",
                "patient_ref": "STOP-1",
                "contraindications": SCREENING_CHRONIC,
                "watch": True,
            },
        )
        confirm_first_placements(client, (1, 2, 3))  # the pads: the probe may be a later phase
        d.wait_log(
            lambda r: r.event == "session.event" and r.data.get("kind") == "emission_started"
        )
        assert d.stop(signal.SIGTERM) == 0
        # The watcher heard how it ended, then the goodbye.
        methods = []
        try:
            while True:
                methods.append(client.next_notification()["method"])
        except (EOFError, OSError):
            pass
        assert "session.ended" in methods and "daemon.stopping" in methods
    assert not d.socket_path.exists(), "the control socket is removed"
    db = sqlite3.connect(d.state_dir / "records.sqlite")
    outcome, code, cause, ended = db.execute(
        "SELECT outcome, stop_cause_code, stop_cause_message, ended_utc FROM sessions "
        "WHERE id = ?",
        (result["session_id"],),
    ).fetchone()
    # Nobody chose to end this treatment: it is interrupted, not aborted.
    assert outcome == "interrupted" and code == "I001" and ended is not None
    assert "pbmd stopping (SIGTERM)" in cause
    step_outcomes = {
        row[0]
        for row in db.execute(
            "SELECT outcome FROM steps WHERE session_id = ? AND outcome NOT IN "
            "('completed', 'skipped')",
            (result["session_id"],),
        )
    }
    assert step_outcomes == {"interrupted"}
    open_emissions = db.execute(
        "SELECT COUNT(*) FROM emissions WHERE ended_utc IS NULL"
    ).fetchone()[0]
    assert open_emissions == 0
    db.close()
    # A restart finds nothing to reconcile: the stop closed everything.
    d2 = make_daemon(time_scale=20.0).start()
    assert not any(r.event == "sessions.reconciled" for r in d2.records)
    assert d2.stop() == 0


def test_sigint_stops_cleanly_and_second_daemon_is_refused(make_daemon: DaemonFactory) -> None:
    d = make_daemon().start()
    twin = make_daemon()  # same state directory and socket
    twin.start(wait_ready=False)
    assert twin.wait_exit() == 1
    assert "another pbmd" in twin.output()
    assert d.stop(signal.SIGINT) == 0
    assert not d.socket_path.exists()


def test_sd_notify_ready_watchdog_stopping(make_daemon: DaemonFactory, workdir: Path) -> None:
    path = workdir / "notify.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    sink.settimeout(30)
    try:
        d = make_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}).start()
        seen: list[str] = []
        while not any("WATCHDOG=1" in m for m in seen):
            seen.append(sink.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in seen)
        assert d.stop() == 0
        while not any("STOPPING=1" in m for m in seen):
            seen.append(sink.recv(4096).decode())
    finally:
        sink.close()


def test_pbmctl_exit_codes(daemon: Daemon, workdir: Path) -> None:
    gone = pbmctl(workdir / "nobody.sock", "status")
    assert gone.returncode == 3
    assert "pbmd run" in gone.stderr
    unknown = pbmctl(daemon.socket_path, "session", "start", "no-such-protocol", "--patient", "X")
    assert unknown.returncode == 1
    assert "not installed" in unknown.stderr
    no_session = pbmctl(daemon.socket_path, "--json", "session", "abort")
    assert no_session.returncode == 1
    assert json.loads(no_session.stdout)["error"]["code"] == -32004
    usage = pbmctl(daemon.socket_path, "session", "start")
    assert usage.returncode == 2
    unanswered = pbmctl(
        daemon.socket_path, "session", "start", "lumbar-chronic-nonspecific", "--patient", "X"
    )
    assert unanswered.returncode == 1
    assert "--contraindication" in unanswered.stderr
    watch = pbmctl(daemon.socket_path, "session", "watch")
    assert watch.returncode == 1 and "no session" in watch.stderr


def test_abort_ends_watch_with_exit_4(daemon: Daemon) -> None:
    with RawClient(daemon.socket_path) as client:
        client.call(
            "session.start",
            {
                "protocol": "lumbar-chronic-nonspecific",
                "patient_ref": "ABORT-1",
                "contraindications": SCREENING_CHRONIC,
            },
        )
    import subprocess

    from .harness import PBMCTL

    watcher = subprocess.Popen(
        [*PBMCTL, "--socket", str(daemon.socket_path), "--json", "session", "watch"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())
        assert first["status"]["state"] in ("ready", "armed", "running", "idle")
        aborted = pbmctl_json(daemon.socket_path, "session", "abort", "--reason", "test")
        assert aborted["state"] == "aborted"
        out, _ = watcher.communicate(timeout=60)
        assert watcher.returncode == 4
        assert json.loads(out.splitlines()[-1])["state"] == "aborted"
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_protocol_install_remove_rollback_and_bad_signature(daemon: Daemon, workdir: Path) -> None:
    path = write_protocol(workdir)
    sock = daemon.socket_path
    checked = pbmctl_json(sock, "protocol", "check", str(path))
    assert checked["valid"] and checked["installable"]
    pbmctl_json(sock, "protocol", "install", str(path))
    again = pbmctl(sock, "protocol", "install", str(path))
    assert again.returncode == 1 and "not above" in again.stderr
    tampered = workdir / "tampered.toml"
    tampered.write_text(path.read_text().replace("version = 1", "version = 2"))
    (workdir / "tampered.toml.minisig").write_bytes(Path(str(path) + ".minisig").read_bytes())
    bad = pbmctl(sock, "--json", "protocol", "install", str(tampered))
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["data"]["fault"] == "bad-signature"
    unsigned = workdir / "unsigned.toml"
    unsigned.write_text(path.read_text())
    refused = pbmctl(sock, "protocol", "install", str(unsigned))
    assert refused.returncode == 1 and "no signature" in refused.stderr
    removed = pbmctl_json(sock, "protocol", "remove", "service-short")
    assert removed["removed"]["version"] == 1
    assert pbmctl(sock, "protocol", "show", "service-short").returncode == 1


def test_records_export_and_calibration(daemon: Daemon, workdir: Path) -> None:
    sock = daemon.socket_path
    write_protocol(workdir)
    pbmctl_json(sock, "protocol", "install", str(workdir / "short.toml"))
    with RawClient(sock) as client:
        session_id, _ = run_session_confirming(client, "service-short", "EXP-1", SHORT_SCREENING)
    out = workdir / "records.csv"
    res = pbmctl_json(sock, "records", "export", "--format", "csv", "--output", str(out))
    assert res["bytes"] > 0
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + SHORT_STEPS and session_id in rows[1]
    doc = json.loads(pbmctl(sock, "records", "export", "--format", "json").stdout)
    assert doc["sessions"][0]["id"] == session_id
    # Calibration overdue: sessions are refused, with the code and the fix.
    assert pbmctl_json(sock, "calibration", "set", "2000-01-01")["overdue"] is True
    refused = pbmctl(
        sock,
        "session",
        "start",
        "service-short",
        "--patient",
        "X",
        *screening_args(SHORT_SCREENING),
    )
    assert refused.returncode == 1 and "E602" in refused.stderr
    assert pbmctl_json(sock, "calibration", "set", "2999-01-01")["overdue"] is False
    assert json.loads((daemon.state_dir / "calibration.json").read_text())["due"] == "2999-01-01"


def test_config_errors_stop_the_daemon_with_exit_78(workdir: Path) -> None:
    import subprocess

    from .harness import PBMD

    bad = workdir / "bad.toml"
    bad.write_text(
        '[[controllers]]\nname = "x"\nlink = "usb://12g9:0001"\n[api]\nmax_clients = 0\n'
    )
    res = subprocess.run(
        [*PBMD, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 78
    assert str(bad) in res.stderr
    assert "controllers[1].link" in res.stderr and "api.max_clients" in res.stderr
    assert "fix:" in res.stderr
    check = subprocess.run(
        [*PBMD, "config", "check", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 78 and "2 configuration errors" in check.stderr


def test_embedded_default_runs_under_the_user_state_dir(workdir: Path) -> None:
    """No --config: the embedded default, state under $XDG_STATE_HOME/pbmd."""
    from .harness import PBMD

    env = {
        **os.environ,
        "XDG_STATE_HOME": str(workdir / "xdg"),
        "XDG_RUNTIME_DIR": str(workdir / "run"),
        "HOME": str(workdir),
    }
    env.pop("RUNTIME_DIRECTORY", None)
    env.pop("STATE_DIRECTORY", None)
    d = Daemon(
        Path("-"),
        workdir / "run" / "pbmd" / "control.sock",
        workdir / "xdg" / "pbmd",
        env=env,
        argv=[*PBMD, "run", "--sim-time-scale", "60"],
    )
    try:
        ready = d.start().wait_log(lambda r: r.event == "daemon.ready")
        assert ready.data["socket"] == str(d.socket_path)
        assert ready.data["state_dir"] == str(d.state_dir)
        assert (d.state_dir / "records.sqlite").exists()
        st = pbmctl_json(d.socket_path, "status")
        assert st["daemon"]["config"] == "<embedded default>"
        listed = pbmctl_json(d.socket_path, "protocol", "list")["protocols"]
        assert {p["id"] for p in listed} == {p.stem for p in library.protocol_files()}
        assert len(listed) == 8
        assert d.stop() == 0
    finally:
        d.kill()
