"""The daemon as a real process, pbmctl as a real process, and raw socket clients.

`Daemon` starts `pbmd run --config FILE`, keeps every line it logs (JSON; with a
journald priority prefix only when stdout is the journal's, never here) and lets
a test wait for a line, never for a while.
`RawClient` speaks JSON-RPC 2.0 over the Unix socket with blocking I/O and a
timeout as the failure bound.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixtures import signing
from fixtures.protocols import SHORT_PROTOCOL as SHORT_PROTOCOL
from fixtures.protocols import SHORT_SCREENING as SHORT_SCREENING
from fixtures.protocols import SHORT_STEPS as SHORT_STEPS
from fixtures.signing import TEST_SECRET_KEY

PBMD = [sys.executable, "-m", "pbmd.daemon.cli"]
PBMCTL = [sys.executable, "-m", "pbmd.daemon.clients.pbmctl"]
TIMEOUT_S = 30.0

SCREENING_CHRONIC = {
    "cancer": False,
    "pregnancy": False,
    "recent-radiotherapy": False,
    "bleeding-disorder": False,
    "deep-vein-thrombosis": False,
    "photosensitivity": False,
    "reduced-sensation": False,
}


def sign(path: Path, secret: Path = TEST_SECRET_KEY) -> Path:
    """Sign with the real minisign (the TEST key); returns FILE.minisig."""
    return signing.sign(path, secret, trusted_comment="pbmd service test")


def write_protocol(directory: Path, text: str = SHORT_PROTOCOL, name: str = "short.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    sign(path)
    return path


def toml_config(
    state_dir: Path,
    socket_path: Path,
    *,
    time_scale: float = 30.0,
    clinician_group: str = "pbm-clinician",
    technician_group: str = "pbm-technician",
    extra: str = "",
    api_extra: str = "",
    sim_extra: str = "",
    protocols: str = "trust_test_key = true\npreload_shipped = true\n",
    controllers_toml: str | None = None,
) -> str:
    controllers = (
        controllers_toml
        or f"""
[[controllers]]
name = "sim"
link = "sim"

[controllers.sim]
time_scale = {time_scale}
seed = 7
control = "127.0.0.1:0"
{sim_extra}"""
    )
    return f"""\
state_dir = "{state_dir}"
{controllers}
[api]
socket = "{socket_path}"
clinician_group = "{clinician_group}"
technician_group = "{technician_group}"
{api_extra}
[protocols]
{protocols}
[logging]
level = "info"
format = "json"
{extra}"""


DEPLOYED_NICE: int | None = -10 if os.geteuid() == 0 else None
"""systemd/pbmd.service runs pbmd at Nice=-10; the daemons of these tests run as
deployed, so that the test runner's own load (two workers, brokers, simulators)
does not stand in for a clinic workstation's."""

_PRIORITY = re.compile(rb"^(?:<(\d)>)?(\{.*\})\s*$")
_LEVEL_PRIORITY = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "info": 6, "debug": 7}


@dataclass
class LogRecord:
    priority: int
    data: dict[str, Any]

    @property
    def event(self) -> str:
        return str(self.data.get("event", ""))


@dataclass
class Daemon:
    """`pbmd run --config FILE` as a child process."""

    config_path: Path
    socket_path: Path
    state_dir: Path
    env: Mapping[str, str] | None = None
    extra_args: Sequence[str] = ()
    argv: Sequence[str] | None = None
    """The whole command line instead of `pbmd run --config FILE`."""
    nice: int | None = DEPLOYED_NICE
    """Run at this nice value, as systemd/pbmd.service does (Nice=-10)."""
    proc: subprocess.Popen[bytes] | None = None
    lines: list[bytes] = field(default_factory=list)
    records: list[LogRecord] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _threads: list[threading.Thread] = field(default_factory=list)
    _eof: bool = False

    def start(self, *, wait_ready: bool = True) -> Daemon:
        env = {**os.environ, **(self.env or {})}
        argv = list(
            self.argv or [*PBMD, "run", "--config", str(self.config_path), *self.extra_args]
        )
        if self.nice is not None and self.nice != os.nice(0):
            # `nice -n` adds to the caller's own value: ask for the difference.
            argv = ["nice", "-n", str(self.nice - os.nice(0)), *argv]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for target, stream in (
            (self._read_stdout, self.proc.stdout),
            (self._read_stderr, self.proc.stderr),
        ):
            t = threading.Thread(target=target, args=(stream,), daemon=True)
            t.start()
            self._threads.append(t)
        if wait_ready:
            self.wait_log(lambda r: r.event == "daemon.ready", what="daemon.ready")
        return self

    def _read_stdout(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            with self._cond:
                self.lines.append(line)
                m = _PRIORITY.match(line)
                if m is not None:
                    with contextlib.suppress(ValueError):
                        data = json.loads(m.group(2))
                        level = _LEVEL_PRIORITY.get(str(data.get("level")), 6)
                        prefix = int(m.group(1)) if m.group(1) else level
                        self.records.append(LogRecord(prefix, data))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_stderr(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            with self._cond:
                self.stderr.append(line)
                self._cond.notify_all()

    def wait_log(
        self, predicate: Callable[[LogRecord], bool], timeout_s: float = TIMEOUT_S, what: str = ""
    ) -> LogRecord:
        """The first logged record that satisfies `predicate` (waits for it)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            index = 0
            while True:
                while index < len(self.records):
                    record = self.records[index]
                    index += 1
                    if predicate(record):
                        return record
                if self._eof:
                    raise AssertionError(
                        f"pbmd exited before logging {what or 'the expected record'}:\n"
                        + self.output()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what or 'expected record'} within {timeout_s} s")
                self._cond.wait(left)

    def output(self) -> str:
        with self._cond:
            return (b"".join(self.lines[-40:]) + b"".join(self.stderr)).decode(errors="replace")

    @property
    def sim_control(self) -> tuple[str, int]:
        rec = self.wait_log(lambda r: r.event == "controller.simulated", what="sim")
        host, _, port = str(rec.data["control"]).rpartition(":")
        return host, int(port)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = TIMEOUT_S) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"pbmd did not stop within {timeout_s} s:\n{self.output()}"
            ) from None
        for t in self._threads:
            t.join(10)
        return rc

    def wait_exit(self, timeout_s: float = TIMEOUT_S) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout_s)
        for t in self._threads:
            t.join(10)
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for t in self._threads:
            t.join(10)


class RawClient:
    """JSON-RPC 2.0 over the Unix socket, blocking, one line per message."""

    def __init__(self, path: Path, timeout_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))  # blocking: waits for a place in the backlog
                break
            except BlockingIOError:
                # Linux refuses at once when the backlog is full: try again (bounded).
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
        self.sock.settimeout(timeout_s)
        self._buf = b""
        self._ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self) -> Any:
        """The next line, decoded; EOFError when the daemon closed the connection."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("connection closed by pbmd")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def reply_to(self, req_id: Any) -> dict[str, Any]:
        """Read until the reply with this id (notifications are kept aside)."""
        while True:
            msg = self.read_message()
            if isinstance(msg, dict) and "method" in msg and "id" not in msg:
                self.notifications.append(msg)
                continue
            if isinstance(msg, dict) and msg.get("id") == req_id:
                return msg
            raise AssertionError(f"unexpected message while waiting for {req_id!r}: {msg!r}")

    def request(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        req_id = next(self._ids)
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            msg["params"] = dict(params)
        self.send_raw(json.dumps(msg).encode() + b"\n")
        return self.reply_to(req_id)

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        reply = self.request(method, params)
        assert "error" not in reply, f"{method} failed: {reply['error']}"
        return reply["result"]

    def next_notification(self, method: str | None = None) -> dict[str, Any]:
        while True:
            msg = self.notifications.pop(0) if self.notifications else self.read_message()
            if method is None or msg.get("method") == method:
                return dict(msg)


def pbmctl(
    socket_path: Path, *args: str, timeout_s: float = 120.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PBMCTL, "--socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )


def pbmctl_json(socket_path: Path, *args: str, timeout_s: float = 120.0) -> Any:
    res = pbmctl(socket_path, "--json", *args, timeout_s=timeout_s)
    assert res.returncode == 0, (
        f"pbmctl {' '.join(args)}: {res.returncode}\n{res.stdout}{res.stderr}"
    )
    return json.loads(res.stdout)


def screening_args(answers: Mapping[str, bool]) -> list[str]:
    out: list[str] = []
    for name, present in answers.items():
        out += ["--contraindication", f"{name}={'yes' if present else 'no'}"]
    return out


def run_session_confirming(
    client: RawClient,
    protocol: str,
    patient: str,
    contraindications: Mapping[str, bool],
    ports: Sequence[int] | None = None,
) -> tuple[str, str]:
    """Start with watch=true on this connection, confirm every placement prompt as it
    comes, return (session id, final state) at session.ended; a state other than
    completed comes with its cause code and message."""
    params: dict[str, Any] = {
        "protocol": protocol,
        "patient_ref": patient,
        "contraindications": dict(contraindications),
        "watch": True,
    }
    if ports is not None:
        params["ports"] = list(ports)
    result = client.call("session.start", params)
    session_id = str(result["session_id"])
    confirmed: set[tuple[int, int]] = set()
    status = result["status"]
    while True:
        for p in status.get("ports") or []:
            key = (int(p["port"]), int(p["step"]) if p.get("step") is not None else -1)
            if (
                p.get("state") == "gated"
                and "confirm placement" in (p.get("wait_reason") or "")
                and key not in confirmed
            ):
                confirmed.add(key)
                reply = client.request("session.confirm", {"port": key[0]})
                assert "error" not in reply or reply["error"]["code"] == -32002, reply
        msg = client.next_notification()
        params_ = msg.get("params") or {}
        if msg["method"] == "session.ended":
            state = str(params_["state"])
            if state != "completed":
                # Say why, so that a failing `state == "completed"` shows the cause.
                ended = params_.get("status") or {}
                state += f" ({ended.get('cause_code')}: {ended.get('cause_message')})"
            return session_id, state
        if msg["method"] == "session.status":
            status = params_["status"]
        elif msg["method"] == "session.event":
            ev = params_["event"]
            key = (int(ev.get("port") or 0), int(ev["step"]) if ev.get("step") is not None else -1)
            if (
                ev["kind"] == "port_waiting"
                and "confirm placement" in ev["message"]
                and key not in confirmed
            ):
                confirmed.add(key)
                reply = client.request("session.confirm", {"port": key[0]})
                assert "error" not in reply or reply["error"]["code"] == -32002, reply


def confirm_first_placements(client: RawClient, ports: Sequence[int]) -> None:
    """On a watching connection: confirm each port's first placement prompt as it comes."""
    left = set(ports)
    while left:
        msg = client.next_notification("session.event")
        ev = msg["params"]["event"]
        waiting = ev["kind"] == "port_waiting" and "confirm placement" in ev["message"]
        if waiting and ev["port"] in left:
            left.discard(ev["port"])
            client.call("session.confirm", {"port": ev["port"]})


def step_errors(record: Mapping[str, Any]) -> list[float]:
    """Relative error of each completed step, controller channel, vs the prescription."""
    out = []
    for s in record["steps"]:
        assert s["outcome"] == "completed", s
        delivered = s["delivered_controller_j"]
        prescribed = s["prescribed_energy_j"]
        out.append((delivered - prescribed) / prescribed)
    return out


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    daemon.start()
    try:
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
        daemon.kill()


def in_child(
    uid: int, gid: int, groups: Sequence[int], fn: Callable[[], Any], timeout_s: float = 120.0
) -> Any:
    """Run `fn()` in a forked child that has dropped to uid/gid/groups; its JSON result.

    A fork rather than a new interpreter: the other uid cannot read root's Python
    installation, so the child uses the modules the parent already loaded.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            out = json.dumps({"ok": fn()}).encode()
        except BaseException as exc:
            out = json.dumps({"error": repr(exc)}).encode()
        try:
            view = memoryview(out)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout_s
    import select

    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([r], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"child did not finish within {timeout_s} s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    if "error" in result:
        raise AssertionError(f"child failed: {result['error']}")
    return result["ok"]


def pbmctl_in_child(
    uid: int, gid: int, groups: Sequence[int], argv: Sequence[str]
) -> tuple[int, str]:
    """pbmctl's main() as another user (forked; see `in_child`): exit status and output."""
    from pbmd.daemon.clients import pbmctl as ctl

    def run() -> Any:
        out_r, out_w = os.pipe()
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.close(out_w)
        os.set_blocking(out_r, False)
        # pytest replaced sys.stdout/stderr with its capture objects: write to the fds.
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        try:
            code = ctl.main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        sys.stdout.flush()
        sys.stderr.flush()
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(out_r, 1 << 16):
                data += chunk
        return [code, data.decode(errors="replace")]

    code, text = in_child(uid, gid, groups, run)
    return int(code), str(text)
