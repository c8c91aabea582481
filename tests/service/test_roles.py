"""Roles from the kernel's view of the caller (SO_PEERCRED, SO_PEERGROUPS), with real
groups (groupadd), a real user (useradd) and children that drop to other uids."""

from __future__ import annotations

import grp
import io
import os
import pwd
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

import pytest

from pbmd.daemon.clients import pbmctl as ctl

from .conftest import DaemonFactory
from .harness import (
    SCREENING_CHRONIC,
    Daemon,
    RawClient,
    in_child,
    pbmctl_in_child,
)

NOT_AUTHORISED = -32001
NOT_FOUND = -32003
NO_SESSION = -32004

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create groups and users")


@dataclass(frozen=True)
class Accounts:
    clinician_group: str
    technician_group: str
    clinician_gid: int
    technician_gid: int
    technician_user: str
    technician_uid: int


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    tag = f"{os.getpid() % 100000}"
    clin, tech, user = f"pbmt-clin{tag}", f"pbmt-tech{tag}", f"pbmt-user{tag}"
    made_groups: list[str] = []
    made_user = False
    try:
        for name in (clin, tech):
            subprocess.run(["groupadd", name], check=True, capture_output=True, timeout=30)
            made_groups.append(name)
        subprocess.run(
            [
                "useradd",
                "--no-create-home",
                "--no-user-group",
                "--gid",
                tech,
                "--shell",
                "/usr/sbin/nologin",
                user,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        made_user = True
        yield Accounts(
            clin,
            tech,
            grp.getgrnam(clin).gr_gid,
            grp.getgrnam(tech).gr_gid,
            user,
            pwd.getpwnam(user).pw_uid,
        )
    finally:
        if made_user:
            subprocess.run(["userdel", user], capture_output=True, timeout=30)
        for name in made_groups:
            subprocess.run(["groupdel", name], capture_output=True, timeout=30)


@pytest.fixture
def daemon(make_daemon: DaemonFactory, accounts: Accounts) -> Daemon:
    return make_daemon(
        clinician_group=accounts.clinician_group, technician_group=accounts.technician_group
    ).start()


READER_UID = 61001
CLINICIAN_UID = 61002


def calls(sock: str, requests: list[tuple[str, dict[str, Any] | None]]) -> Any:
    """In the child: each request's reply (result or error code) on one connection."""

    def run() -> Any:
        from pathlib import Path

        out = []
        with RawClient(Path(sock), timeout_s=30) as c:
            for method, params in requests:
                reply = c.request(method, params)
                out.append(reply["result"] if "result" in reply else reply["error"])
        return out

    return run


def code(reply: Any) -> int | None:
    return reply.get("code") if isinstance(reply, dict) and "message" in reply else None


def test_reader_sees_status_but_nothing_clinical(daemon: Daemon, accounts: Accounts) -> None:
    with RawClient(daemon.socket_path) as root:
        root.call(
            "session.start",
            {
                "protocol": "lumbar-chronic-nonspecific",
                "patient_ref": "SECRET-7",
                "contraindications": SCREENING_CHRONIC,
            },
        )
        replies = in_child(
            READER_UID,
            READER_UID,
            [],
            calls(
                str(daemon.socket_path),
                [
                    ("status", None),
                    ("protocol.list", None),
                    ("session.watch", None),
                    ("session.start", {"protocol": "x", "patient_ref": "y"}),
                    ("session.abort", None),
                    ("records.list", None),
                    ("records.export", None),
                    ("report.get", {"session_id": "x"}),
                    ("protocol.install", {"content": "x"}),
                    ("calibration.set", {"due": "2030-01-01"}),
                ],
            ),
        )
        root.call("session.abort", {"reason": "test over"})
    status, listing, watch, start, abort, records, export, report, install, cal = replies
    assert status["caller"] == {
        "pid": status["caller"]["pid"],
        "uid": READER_UID,
        "gid": READER_UID,
        "user": f"uid {READER_UID}",
        "roles": ["reader"],
    }
    assert status["session"]["patient_ref"] is None and status["session"]["patient_ref_redacted"]
    assert listing["protocols"]
    assert watch["watching"] is True and watch["status"]["patient_ref"] is None
    for denied in (start, abort, records, export, report, install, cal):
        assert code(denied) == NOT_AUTHORISED, denied
    assert accounts.clinician_group in start["message"]
    assert accounts.technician_group in install["message"]
    assert "SECRET-7" not in str(replies)


def test_clinician_group_member(daemon: Daemon, accounts: Accounts) -> None:
    replies = in_child(
        CLINICIAN_UID,
        CLINICIAN_UID,
        [accounts.clinician_gid],
        calls(
            str(daemon.socket_path),
            [
                ("status", None),
                ("session.start", {"protocol": "no-such", "patient_ref": "P"}),
                ("session.pause", None),
                ("records.list", None),
                ("report.get", {"session_id": "nope"}),
                ("records.export", None),
                ("protocol.remove", {"id": "lumbar-acute"}),
                ("calibration.set", {"due": "2000-01-01"}),
                ("controller.clear_fault", {"controller": "sim"}),
            ],
        ),
    )
    status, start, pause, records, report, export, remove, cal, clear = replies
    assert status["caller"]["roles"] == ["clinician", "reader"]
    assert code(start) == NOT_FOUND  # authorised; the protocol does not exist
    assert code(pause) == NO_SESSION
    assert records["sessions"] == []
    assert code(report) == NOT_FOUND
    for denied in (export, remove, cal, clear):
        assert code(denied) == NOT_AUTHORISED, denied
    # The primary group counts as well as the supplementary ones.
    (primary,) = in_child(
        CLINICIAN_UID,
        accounts.clinician_gid,
        [],
        calls(str(daemon.socket_path), [("status", None)]),
    )
    assert "clinician" in primary["caller"]["roles"]


def test_technician_user_from_useradd(daemon: Daemon, accounts: Accounts) -> None:
    uid, gid = accounts.technician_uid, accounts.technician_gid
    replies = in_child(
        uid,
        gid,
        [gid],
        calls(
            str(daemon.socket_path),
            [
                ("status", None),
                ("records.export", {"format": "csv"}),
                ("protocol.remove", {"id": "no-such"}),
                ("calibration.get", None),
                ("session.start", {"protocol": "lumbar-acute", "patient_ref": "P"}),
                ("session.confirm", {"port": 1}),
            ],
        ),
    )
    status, export, remove, cal, start, confirm = replies
    assert status["caller"]["user"] == accounts.technician_user
    assert status["caller"]["roles"] == ["reader", "technician"]
    assert export["format"] == "csv"
    assert code(remove) == NOT_FOUND
    assert "due" in cal
    assert code(start) == NOT_AUTHORISED and code(confirm) == NOT_AUTHORISED


def _warm_pbmctl(sock: str) -> None:
    """Load every module pbmctl's paths need while root can still read them."""
    for argv in (
        ["--socket", sock, "--json", "status"],
        ["--socket", sock, "session", "abort"],
        ["--socket", sock, "status"],
    ):
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            ctl.main(argv)


def test_pbmctl_as_other_users(daemon: Daemon, accounts: Accounts) -> None:
    sock = str(daemon.socket_path)
    _warm_pbmctl(sock)
    rc, out = pbmctl_in_child(READER_UID, READER_UID, [], ["--socket", sock, "session", "abort"])
    assert rc == 5, out
    assert "clinician" in out and accounts.clinician_group in out
    rc, out = pbmctl_in_child(READER_UID, READER_UID, [], ["--socket", sock, "--json", "status"])
    assert rc == 0 and '"roles": [\n      "reader"\n    ]' in out
    rc, out = pbmctl_in_child(
        CLINICIAN_UID,
        CLINICIAN_UID,
        [accounts.clinician_gid],
        ["--socket", sock, "session", "abort"],
    )
    assert rc == 1 and "no session is running" in out


def test_per_user_connection_limit(make_daemon: DaemonFactory, accounts: Accounts) -> None:
    d = make_daemon(
        clinician_group=accounts.clinician_group,
        technician_group=accounts.technician_group,
        api_extra="max_clients_per_uid = 3\n",
    ).start()

    def run() -> Any:
        from pathlib import Path

        held = [RawClient(Path(str(d.socket_path)), timeout_s=30) for _ in range(3)]
        try:
            for c in held:
                c.call("calibration.get")
            with RawClient(Path(str(d.socket_path)), timeout_s=30) as fourth:
                return fourth.read_message()
        finally:
            for c in held:
                c.close()

    refused = in_child(READER_UID, READER_UID, [], run)
    assert refused["error"]["code"] == -32006
    assert "already has 3 connections" in refused["error"]["message"]
    with RawClient(d.socket_path) as root:  # root is not limited
        assert root.call("calibration.get") is not None
