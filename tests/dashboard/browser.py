"""The page in headless Debian chromium, driven through dashboard/tools/browser.mjs.

One JSON request per line to the node process (playwright-core with
executablePath /usr/bin/chromium), one reply per line; every wait is the
browser's own (`waitForFunction`) with a timeout as the failure bound.
"""

from __future__ import annotations

import itertools
import json
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboard"
DIST = DASHBOARD / "dist"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
NODE = shutil.which("node")


class Browser:
    def __init__(self, timeout_s: float = 60.0) -> None:
        assert NODE is not None
        self.proc = subprocess.Popen(
            [NODE, str(DASHBOARD / "tools" / "browser.mjs")],
            cwd=DASHBOARD,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._ids = itertools.count(1)
        hello = self._read(timeout_s)
        assert hello.get("ready"), hello

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            ready, _, _ = select.select(
                [self.proc.stdout], [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise AssertionError(f"browser driver silent for {timeout_s} s")
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(f"browser driver exited:\n{err}")
            if line.startswith(b"{"):
                reply: dict[str, Any] = json.loads(line)
                return reply

    def call(self, op: str, timeout_s: float = 30.0, **args: Any) -> Any:
        assert self.proc.stdin is not None
        req_id = next(self._ids)
        self.proc.stdin.write(json.dumps({"id": req_id, "op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._read(timeout_s)
        assert reply.get("id") == req_id, reply
        if not reply["ok"]:
            raise AssertionError(f"{op} failed: {reply['error']}\nconsole: {reply.get('console')}")
        return reply["result"]

    def wait(self, js: str, timeout_s: float = 10.0) -> Any:
        """Wait until the expression is truthy in the page; its value."""
        return self.call("wait", timeout_s=timeout_s + 5, js=js, timeout_ms=int(timeout_s * 1000))

    def eval(self, js: str) -> Any:
        return self.call("eval", js=js)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.call("screenshot", path=str(path))
        return path

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(b'{"op": "close"}\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
