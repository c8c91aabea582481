"""Who may do what with courses, as the kernel names the caller: clinicians start
courses and record outcomes; technicians read courses but see outcome measures only
where the configuration allows. Real groups (groupadd) and children at other uids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from service.conftest import DaemonFactory
from service.conftest import make_daemon as make_daemon  # the service tests' fixtures
from service.harness import RawClient, in_child, write_protocol
from service.test_roles import Accounts
from service.test_roles import accounts as accounts

from .rig import COURSE_SCREENING, course_protocol, install

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create groups")

NOT_AUTHORISED = -32001
TECHNICIAN_UID = 61013
CLINICIAN_UID = 61014


def _as(uid: int, gid: int, sock: Path, requests: list[tuple[str, dict[str, Any]]]) -> Any:
    def run() -> Any:
        out = []
        with RawClient(sock, timeout_s=30) as c:
            for method, params in requests:
                reply = c.request(method, params)
                out.append(reply["result"] if "result" in reply else reply["error"])
        return out

    return in_child(uid, gid, [gid], run)


@pytest.mark.parametrize("allowed", [False, True])
def test_technicians_see_outcomes_only_where_configured(
    make_daemon: DaemonFactory, accounts: Accounts, workdir: Path, allowed: bool
) -> None:
    daemon = make_daemon(
        f"roles-{allowed}",
        clinician_group=accounts.clinician_group,
        technician_group=accounts.technician_group,
        extra=f"[courses]\ntechnicians_see_outcomes = {str(allowed).lower()}\n",
    ).start()
    path = write_protocol(workdir, course_protocol(1), f"course-{allowed}.toml")
    with RawClient(daemon.socket_path) as root:
        install(root, path)
        root.call("patient.add", {"patient_id": "P-1", "contraindications": COURSE_SCREENING})
    clinician = _as(
        CLINICIAN_UID,
        accounts.clinician_gid,
        daemon.socket_path,
        [
            (
                "course.start",
                {
                    "patient_id": "P-1",
                    "diagnosis": "LBP",
                    "protocol": "course-lumbar",
                    "sessions": 4,
                },
            ),
        ],
    )
    course_id = clinician[0]["course"]["id"]
    (recorded,) = _as(
        CLINICIAN_UID,
        accounts.clinician_gid,
        daemon.socket_path,
        [("outcome.record", {"course_id": course_id, "nrs_pain": 6, "odi_percent": 40.0})],
    )
    assert recorded["outcome"]["nrs_pain"] == 6
    shown, report, refused, started = _as(
        TECHNICIAN_UID,
        accounts.technician_gid,
        daemon.socket_path,
        [
            ("course.show", {"course_id": course_id}),
            ("course.report", {"course_id": course_id, "format": "json"}),
            ("outcome.record", {"course_id": course_id, "nrs_pain": 1}),
            (
                "course.start",
                {"patient_id": "P-1", "diagnosis": "x", "protocol": "course-lumbar", "sessions": 4},
            ),
        ],
    )
    assert refused["code"] == NOT_AUTHORISED and started["code"] == NOT_AUTHORISED
    outcomes = [o["nrs_pain"] for o in shown["summary"]["outcomes"]]
    assert outcomes == ([6] if allowed else [])
    assert shown["summary"].get("outcomes_hidden", False) is not allowed
    assert report["series"]["nrs-before"] == ([[1, 6.0]] if allowed else [])
