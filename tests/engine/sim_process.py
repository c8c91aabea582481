"""`pbmd sim` in a subprocess, and its JSON-lines control channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


class SimProcess:
    """`pbmd sim --tcp 127.0.0.1:0 --control 127.0.0.1:0 ...`, stopped with SIGTERM."""

    def __init__(self, *args: str, time_scale: float = 60.0, seed: int = 1) -> None:
        self.args: Sequence[str] = (
            "--tcp",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--time-scale",
            str(time_scale),
            "--seed",
            str(seed),
            *args,
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.control_addr = ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> SimProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pbmd.daemon.cli",
            "sim",
            "--realtime",
            *self.args,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert self.proc.stdout is not None
            while True:
                line = (await asyncio.wait_for(self.proc.stdout.readline(), 20.0)).decode()
                if not line:
                    raise RuntimeError("pbmd sim exited before it was ready")
                word, _, rest = line.strip().partition(" ")
                if word == "link":
                    self.url = rest
                elif word == "control":
                    self.control_addr = rest
                elif word == "ready":
                    break
            host, _, port = self.control_addr.rpartition(":")
            self._reader, self._writer = await asyncio.open_connection(host, int(port))
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def control(self, op: str, **args: Any) -> Any:
        """One control-channel request; its result, or AssertionError with the error."""
        assert self._reader is not None and self._writer is not None
        self._writer.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
        await self._writer.drain()
        reply = json.loads(await asyncio.wait_for(self._reader.readline(), 5.0))
        assert reply["ok"], reply
        return reply["result"]

    async def snapshot(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.control("snapshot")
        return result

    async def command_log(self, since: int = 0) -> list[dict[str, Any]]:
        """The simulated controller's own log: every command it answered and every
        emission's end, in device time (entries numbered `since` and after)."""
        result: list[dict[str, Any]] = await self.control("command_log", since=since)
        return result

    async def until(
        self, condition: Callable[[dict[str, Any]], bool], timeout_s: float, poll_s: float = 0.01
    ) -> dict[str, Any]:
        """Poll the snapshot until `condition` holds; TimeoutError after `timeout_s`.

        The control channel has no notifications, so this polls a condition (the
        poll interval is resolution, the timeout the failure bound).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            snap = await self.snapshot()
            if condition(snap):
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout_s} s: {snap}")
            await asyncio.sleep(poll_s)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
