"""systemd/pbmd.service's sandbox: its exposure score, and pbmd running a session
under it.

systemd-analyze rates the unit file itself (--offline). Running pbmd under the
unit needs systemd as PID 1 for `systemd-run`; where it is not (a container,
CI), unit_sandbox.py applies what systemd would at exec that does not need it
(scheduling, capabilities, no_new_privs and every seccomp filter the unit
asks for) and the daemon runs a whole session under that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import unit_sandbox
from .harness import (
    PBMD,
    SHORT_SCREENING,
    SHORT_STEPS,
    Daemon,
    RawClient,
    pbmctl_json,
    run_session_confirming,
    toml_config,
    write_protocol,
)

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "pbmd.service"
EXPOSURE_MAX = 2.0
SANDBOX = [sys.executable, str(Path(unit_sandbox.__file__)), str(UNIT), "--"]

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt install systemd)",
)
needs_sandbox = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or unit_sandbox.libseccomp() is None,
    reason="the sandbox needs systemd-analyze (the system call groups) and libseccomp",
)


@needs_analyze
def test_unit_exposure_score() -> None:
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for pbmd\.service: (\d+\.\d+) (\w+)", res.stdout)
    assert found is not None, res.stdout + res.stderr
    score = float(found.group(1))
    print(f"\nsystemd-analyze security --offline=true pbmd.service: {score} {found.group(2)}")
    assert score <= EXPOSURE_MAX, res.stdout


def test_unit_keeps_what_the_daemon_needs() -> None:
    """SCHED_FIFO stays (RestrictRealtime only refuses the process asking itself),
    and the settings that would break pbmd stay off, each said why in the unit."""
    settings = unit_sandbox.unit_settings(UNIT)
    assert settings["CPUSchedulingPolicy"] == ["fifo"]
    assert settings["RestrictRealtime"] == ["yes"]
    for off in ("PrivateUsers", "IPAddressDeny", "SupplementaryGroups", "LogsDirectory"):
        assert off not in settings, off
    text = UNIT.read_text()
    assert "PrivateUsers=yes would" in text and "IPAddressDeny=any would" in text
    assert "network-online.target" not in "".join(settings.get("After", []))


def test_only_the_controller_is_given_to_group_pbmd() -> None:
    """No dialout (every serial port): the udev rule grants group pbmd the controller's
    own devices, and tags them for systemd so that a device unit can order pbmd."""
    systemd_dir = UNIT.parent
    assert "dialout" not in (systemd_dir / "pbmd.sysusers.conf").read_text()
    rules = [
        line
        for line in (systemd_dir / "60-pbm-controller.rules").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(rules) == 2
    for rule in rules:
        assert 'GROUP="pbmd"' in rule and 'MODE="0660"' in rule and 'TAG+="systemd"' in rule


PROBE = """
import ctypes, errno, json, mmap, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def outcome(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def call(rc):
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "af_packet": outcome(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
    "af_inet": outcome(lambda: socket.socket(socket.AF_INET).close()),
    "af_netlink": outcome(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15).close()),
    "mmap_wx": outcome(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)),
    "fifo": outcome(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))),
    "unshare": outcome(lambda: call(libc.unshare(0x00020000))),
    "sethostname": outcome(lambda: call(libc.sethostname(b"x", 1))),
    "policy": os.sched_getscheduler(0),
    "umask": os.umask(0),
    **{k: status[k].strip() for k in ("NoNewPrivs", "Seccomp", "CapEff", "CapBnd")},
}))
"""


@needs_sandbox
def test_the_sandbox_refuses_what_the_unit_forbids() -> None:
    """The launcher is checked before pbmd is judged by it: each restriction bites."""
    res = subprocess.run(
        [*SANDBOX, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen["af_packet"] == "EAFNOSUPPORT"  # RestrictAddressFamilies
    assert seen["af_inet"] == seen["af_netlink"] == "ok"
    assert seen["mmap_wx"] == "EPERM"  # MemoryDenyWriteExecute
    assert seen["fifo"] == "EPERM"  # RestrictRealtime (and ~@resources)
    assert seen["unshare"] == "EPERM"  # RestrictNamespaces
    assert seen["sethostname"] == "EPERM"  # ProtectHostname
    assert seen["umask"] == 0o027
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2"
    assert int(seen["CapEff"], 16) == 0 and int(seen["CapBnd"], 16) == 0
    if os.geteuid() == 0:  # systemd sets SCHED_FIFO before the filters: it stays
        assert seen["policy"] == os.SCHED_FIFO


@needs_sandbox
def test_pbmd_runs_a_session_under_the_unit_sandbox(workdir: Path) -> None:
    state, sock = workdir / "state", workdir / "control.sock"
    config = workdir / "pbmd.toml"
    config.write_text(toml_config(state, sock, time_scale=60.0), encoding="utf-8")
    d = Daemon(
        config,
        sock,
        state,
        argv=[*SANDBOX, *PBMD, "run", "--config", str(config)],
        nice=None,  # the unit's SCHED_FIFO, applied by the sandbox, makes Nice= moot
    )
    try:
        d.start()
        assert d.proc is not None
        status = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines()
        )
        assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
        assert int(status["CapEff"], 16) == 0
        scheduling = d.wait_log(lambda r: r.event == "daemon.scheduling").data
        if os.geteuid() == 0:
            assert scheduling["policy"] == "fifo" and scheduling["rt_priority"] == 10
        pbmctl_json(sock, "protocol", "install", str(write_protocol(workdir)))
        with RawClient(sock) as c:
            session_id, outcome = run_session_confirming(
                c, "service-short", "SANDBOX-1", SHORT_SCREENING
            )
            record = c.call("records.show", {"session_id": session_id})["session"]
        assert outcome == "completed"
        assert len(record["steps"]) == SHORT_STEPS
        refused = [r.data for r in d.records if "Operation not permitted" in json.dumps(r.data)]
        assert refused == []
        assert d.stop() == 0
        assert not sock.exists()
    finally:
        d.kill()
