"""The fault campaign's simulated controller, in a process of its own, logging what the
controller itself did: the campaign checks its invariants against this log, not
against what the host believes.

Usage: controller_log.py TIME_SCALE SEED. Serves PBM-Link on TCP (one host at a time:
the campaign's in-process engine or a `pbmd run` it starts) and writes JSON lines
on stdout, each flushed, with ``t`` the system-wide monotonic clock (the same clock
as the campaign's, CLOCK_MONOTONIC):

- ``{"k": "link", "url": ...}`` once, first;
- ``{"k": "rx", "t", "m"}``: a host request the controller acted on (PING and the
  telemetry-rate request are left out);
- ``{"k": "start", "t", "port", "token", "budget_uj", "max_ms", "power_uw"}``: an
  emission began (EMIT_START accepted);
- ``{"k": "end", "t", "port", "token", "reason", "uj", "budget_uj"}``: an emission
  ended, with the controller's own delivered energy and stop reason;
- ``{"k": "reply", "id", "t", "ok", "result" | "error"}``: the answer to one line of
  stdin, ``{"id": N, "op": OP, "args": {...}}``, where OP is a fault-injection op
  (``pbmd.hw_sim.faults.FaultInjector.OPS``), ``snapshot`` or ``mark`` (a barrier:
  every line before its reply has been written).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from pbmd.drivers import codec
from pbmd.hw_sim import SimConfig, Simulator
from pbmd.hw_sim.controller import PortSlot
from pbmd.hw_sim.faults import FaultInjector

_QUIET = {codec.Ping.TYPE, codec.SetTelemetry.TYPE, codec.GetPort.TYPE}


def _write(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _tap(sim: Simulator) -> None:
    """Log every request acted on, every emission start and every emission end."""
    ctl = sim.controller
    handle_frame = ctl.handle_frame
    emit_start = ctl._emit_start
    stop = ctl._stop

    def tapped_frame(frame: codec.Frame) -> None:
        t = time.monotonic()
        handle_frame(frame)
        if frame.msg_type not in _QUIET:
            _write({"k": "rx", "t": t, "m": type(frame.message()).__name__})

    def tapped_start(m: codec.EmitStart) -> codec.Message:
        reply = emit_start(m)
        if isinstance(reply, codec.Ack):
            _write(
                {
                    "k": "start",
                    "t": time.monotonic(),
                    "port": m.port,
                    "token": ctl.session_token,
                    "budget_uj": m.energy_budget_uj,
                    "max_ms": m.max_duration_ms,
                    "power_uw": m.power_uw,
                }
            )
        return reply

    def tapped_stop(slot: PortSlot, reason: codec.StopReason) -> None:
        running = slot.phys.emission
        stop(slot, reason)
        em = slot.phys.last
        if running is not None and em is running:
            _write(
                {
                    "k": "end",
                    "t": time.monotonic(),
                    "port": slot.number,
                    "token": ctl.session_token,
                    "reason": int(reason),
                    "uj": max(0, round(em.energy_uj)),
                    "budget_uj": em.energy_budget_uj,
                }
            )

    ctl.handle_frame = tapped_frame  # type: ignore[method-assign]
    ctl._emit_start = tapped_start  # type: ignore[method-assign]
    ctl._stop = tapped_stop  # type: ignore[method-assign]


def _answer(sim: Simulator, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    args = request.get("args") or {}
    if op == "mark":
        return {"ok": True, "result": None}
    if op == "snapshot":
        return {"ok": True, "result": sim.snapshot()}
    if op not in FaultInjector.OPS:
        return {"ok": False, "error": f"unknown op {op!r}"}
    try:
        return {"ok": True, "result": getattr(sim.faults, op)(**args)}
    except (TypeError, ValueError) as exc:
        return {"ok": False, "error": f"{op}: {exc}"}


async def main(time_scale: float, seed: int) -> None:
    logging.basicConfig(level=logging.CRITICAL)
    async with Simulator(SimConfig(time_scale=time_scale, seed=seed)) as sim:
        _tap(sim)
        _write({"k": "link", "url": await sim.listen_tcp("127.0.0.1", 0)})
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            request = json.loads(line)
            reply = _answer(sim, request)
            _write({"k": "reply", "id": request.get("id"), "t": time.monotonic(), **reply})


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]), int(sys.argv[2])))
