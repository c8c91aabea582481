"""The campaign's side of bench/campaign/controller_log.py: the simulated controller in a
child process, its log read by a thread, fault-injection requests written to its stdin.

Blocking and thread-safe, so that the in-process engine (asyncio, which only ever
writes requests from its loop) and the `pbmd run` sessions (plain threads) use it
alike.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTROLLER_LOG = HERE / "controller_log.py"


class SimError(RuntimeError):
    """The simulator refused a request, or its process ended."""


class SimChild:
    """One simulated controller process; ``lines`` is its log, in order."""

    def __init__(self, time_scale: float, seed: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CONTROLLER_LOG), str(time_scale), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline() or b'{"k": "eof"}')
        if first.get("k") != "link":
            raise SimError(f"the simulator did not start: {first}")
        self.url = str(first["url"])
        self.lines: list[dict[str, Any]] = []
        self._replies: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = json.loads(raw)
            with self._cond:
                if line.get("k") == "reply":
                    self._replies[int(line["id"])] = line
                else:
                    self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def send(self, op: str, **args: Any) -> int:
        """Write one request without waiting for its answer; returns its id."""
        assert self.proc.stdin is not None
        request_id = next(self._ids)
        data = json.dumps({"id": request_id, "op": op, "args": args}).encode() + b"\n"
        with self._write_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        return request_id

    def reply(self, request_id: int, timeout_s: float = 10.0) -> Any:
        """The answer to request `request_id`; SimError if it was refused."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while request_id not in self._replies:
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise SimError(f"no answer to request {request_id} (simulator gone?)")
                self._cond.wait(left)
            answer = self._replies.pop(request_id)
        if not answer.get("ok"):
            raise SimError(str(answer.get("error")))
        return answer.get("result")

    def call(self, op: str, **args: Any) -> Any:
        return self.reply(self.send(op, **args))

    def mark(self) -> int:
        """A barrier: every line the simulator wrote before it is in ``lines``; returns
        their count."""
        self.call("mark")
        with self._cond:
            return len(self.lines)

    def counters(self) -> tuple[int, dict[int, int]]:
        """The controller's session token and, per port, its session_delivered_uj."""
        snap = self.call("snapshot")
        return int(snap["session_token"]), {
            int(p["port"]): int(p["counters"]["session_delivered_uj"]) for p in snap["ports"]
        }

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5.0)
