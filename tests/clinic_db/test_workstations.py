"""Workstations (`pbmd run` with their embedded simulators) and the clinic database:
two treat at once and both replicate; an outage mid-session and a restart lose and
duplicate nothing, and the session's dose is unaffected; clinic-wide reads through
pbmctl; bad settings are reported and the daemon still treats."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.protocols import SHORT_SCREENING
from service.conftest import DaemonFactory
from service.conftest import make_daemon as make_daemon  # the service tests' fixture
from service.harness import (
    Daemon,
    RawClient,
    pbmctl,
    pbmctl_json,
    run_session_confirming,
    running,
    step_errors,
    write_protocol,
)

from pbmd.daemon.cli import main as pbmd_main

from .conftest import ClinicServer, assert_same

PATIENT = "PAT-CLINIC-7"


def clinic_toml(url: str, workstation: str, extra: str = "") -> str:
    return (
        f'\n[clinic_db]\nurl = "{url}"\nworkstation_id = "{workstation}"\n'
        f"retry_s = 0.3\nconnect_timeout_s = 2.0\n{extra}"
    )


def replication(daemon: Daemon) -> dict[str, Any]:
    with RawClient(daemon.socket_path) as client:
        status = client.call("status")
    assert status["ready"]["ok"], status["ready"]
    return dict(status["replication"])


def wait_replication(
    daemon: Daemon, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
) -> dict[str, Any]:
    """The daemon's replication status once ``predicate`` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = replication(daemon)
        if predicate(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)  # polling the daemon's status, not waiting for time to pass


def last_change(daemon: Daemon) -> int:
    conn = sqlite3.connect(f"file:{daemon.state_dir / 'records.sqlite'}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
    finally:
        conn.close()


def wait_replicated(server: ClinicServer, daemon: Daemon, workstation: str) -> None:
    """Everything the workstation committed is on the server, row for row."""
    wait_replication(daemon, lambda st: (st["high_water"] or 0) >= last_change(daemon))
    assert_same(server, workstation, daemon.state_dir / "records.sqlite")


def install(daemon: Daemon, workdir: Path) -> None:
    pbmctl_json(daemon.socket_path, "protocol", "install", str(workdir / "short.toml"))


def treat(daemon: Daemon, patient: str = PATIENT) -> tuple[str, dict[str, Any]]:
    """One session of the short protocol to its end: (id, the local record)."""
    with RawClient(daemon.socket_path) as client:
        session_id, state = run_session_confirming(
            client, "service-short", patient, SHORT_SCREENING
        )
        assert state == "completed"
        record = client.call("records.show", {"session_id": session_id})["session"]
    assert max(abs(e) for e in step_errors(record)) < 0.03
    return session_id, record


def test_two_workstations_treat_at_once_and_read_each_other_through_the_clinic(
    make_daemon: DaemonFactory, workdir: Path, clinic_server: ClinicServer
) -> None:
    write_protocol(workdir)
    daemons = {
        ws: make_daemon(ws, time_scale=60.0, extra=clinic_toml(clinic_server.url, ws)).start()
        for ws in ("room-1", "room-2")
    }
    for d in daemons.values():
        install(d, workdir)
    done: dict[str, tuple[str, dict[str, Any]]] = {}
    threads = [
        threading.Thread(target=lambda ws=ws, d=d: done.__setitem__(ws, treat(d)))
        for ws, d in daemons.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert done.keys() == daemons.keys()
    for ws, d in daemons.items():
        wait_replicated(clinic_server, d, ws)
    one, two = daemons["room-1"], daemons["room-2"]
    sid_two, local_two = done["room-2"]
    # Room 1 finds the patient's sessions of both rooms, and room 2's record in full.
    listed = pbmctl_json(one.socket_path, "records", "list", "--clinic", "--patient", PATIENT)
    assert {(s["id"], s["workstation_id"]) for s in listed["sessions"]} == {
        (done[ws][0], ws) for ws in daemons
    }
    human = pbmctl(one.socket_path, "records", "list", "--clinic", "--patient", PATIENT)
    assert human.returncode == 0 and "(room-2)" in human.stdout and "(room-1)" in human.stdout
    shown = pbmctl_json(one.socket_path, "records", "show", "--clinic", sid_two)["session"]
    assert shown.pop("workstation_id") == "room-2"
    assert shown == local_two
    report = pbmctl(one.socket_path, "report", "--clinic", sid_two)
    assert report.returncode == 0, report.stderr
    assert "COMPLETED" in report.stdout
    exported = pbmctl_json(two.socket_path, "records", "export", "--clinic", "--patient", PATIENT)
    doc = json.loads(exported["content"])
    assert doc["clinic"] is True and len(doc["sessions"]) == 2
    # Without --clinic a workstation reads only its own records.
    local = pbmctl(one.socket_path, "records", "show", sid_two)
    assert local.returncode != 0 and "no session" in local.stderr


def test_an_outage_mid_session_and_a_restart_lose_and_duplicate_nothing(
    make_daemon: DaemonFactory, workdir: Path, clinic_server: ClinicServer
) -> None:
    write_protocol(workdir)
    toml = clinic_toml(clinic_server.url, "room-1", "batch_rows = 5\n")
    daemon = make_daemon("room-1", time_scale=60.0, extra=toml).start()
    install(daemon, workdir)
    wait_replication(daemon, lambda st: st["state"] == "replicating")
    result: list[tuple[str, dict[str, Any]]] = []
    thread = threading.Thread(target=lambda: result.append(treat(daemon)))
    thread.start()
    # The server goes away after the first step: the session goes on unaffected
    # (treat() checks that each step's dose is within tolerance).
    daemon.wait_log(lambda r: r.event == "step.completed", timeout_s=60)
    clinic_server.outage()
    thread.join(timeout=180)
    assert result, "the session did not end"
    st = wait_replication(
        daemon,
        lambda st: st["state"] == "stopped" and "not currently accepting" in (st["reason"] or ""),
    )
    assert st["behind_rows"] > 0 and st["behind_s"] is not None
    assert daemon.wait_log(lambda r: r.event == "clinic_db.stopped").priority == 4
    # The daemon restarts with its backlog; the server comes back; it resumes.
    assert daemon.stop() == 0
    clinic_server.restore()
    with running(Daemon(daemon.config_path, daemon.socket_path, daemon.state_dir)) as again:
        wait_replicated(clinic_server, again, "room-1")
    ((count,),) = clinic_server.query("SELECT COUNT(*) FROM record_rows")
    local = sqlite3.connect(daemon.state_dir / "records.sqlite")
    try:
        (changes,) = local.execute("SELECT COUNT(*) FROM changes").fetchone()
    finally:
        local.close()
    assert count == changes


def test_bad_settings_are_reported_and_the_daemon_still_treats(
    make_daemon: DaemonFactory, workdir: Path, clinic_server: ClinicServer
) -> None:
    write_protocol(workdir)
    clinic_server.execute(
        "CREATE TABLE pbmd_schema (version integer PRIMARY KEY, applied_at timestamptz, "
        "pbmd_version text); INSERT INTO pbmd_schema VALUES (99, now(), 'future')"
    )
    newer = make_daemon(
        "newer", time_scale=60.0, extra=clinic_toml(clinic_server.url, "room-1")
    ).start()
    no_role = make_daemon(
        "no-role",
        extra=clinic_toml("postgresql://pbmd_no_such_role@127.0.0.1:5432/postgres", "room-2"),
    ).start()
    st = wait_replication(no_role, lambda st: st["state"] == "stopped")
    assert 'role "pbmd_no_such_role" does not exist' in st["reason"]
    st = wait_replication(newer, lambda st: st["state"] == "stopped")
    assert "newer than this pbmd knows" in st["reason"] and "upgrade pbmd" in st["reason"]
    install(newer, workdir)
    treat(newer)
    assert clinic_server.query("SELECT to_regclass('record_rows') IS NULL") == [(True,)]


def test_pbmd_clinic_db_migrate_and_check(
    workdir: Path, clinic_server: ClinicServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = workdir / "pbmd.toml"
    config.write_text(
        '[[controllers]]\nname = "sim"\nlink = "sim"\n' + clinic_toml(clinic_server.url, "room-1"),
        encoding="utf-8",
    )

    def run(*args: str, path: Path = config) -> tuple[int, str, str]:
        code = pbmd_main([*args, "--config", str(path)])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = run("clinic-db", "check")
    assert code == 1 and "pbmd clinic-db migrate" in err
    code, out, _ = run("clinic-db", "migrate")
    assert code == 0 and "migrated to version 2" in out
    assert "already at version 2" in run("clinic-db", "migrate")[1]
    assert run("clinic-db", "check")[0] == 0
    clinic_server.execute("INSERT INTO pbmd_schema VALUES (3, now(), 'future')")
    code, _, err = run("clinic-db", "migrate")
    assert code == 1 and "newer than this pbmd knows" in err
    bad = workdir / "bad.toml"
    bad.write_text(
        '[[controllers]]\nname = "sim"\nlink = "sim"\n[clinic_db]\n'
        'url = "postgresql://pbmd:secret@db/pbm"\npassword_file = "/etc/pbmd/db-password"\n',
        encoding="utf-8",
    )
    code, _, err = run("config", "check", path=bad)
    assert code == 78 and "the URL carries a password in clear" in err
