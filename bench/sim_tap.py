"""A simulated controller for the benchmarks, in its own process, that reports what
reaches it.

Usage: sim_tap.py TIME_SCALE SEED. Prints ``link <url>``, then one line per event,
``<kind> <monotonic s> <what>``:

- ``rx <t> <Message>``: a host request the controller received and acted on
  (``rx <t> AllOff``: ALL_OFF on the wire);
- ``tx <t> Event<code>``: an EVENT frame the controller sent;
- ``inject <t> <op>``: a fault injected (read as JSON lines on stdin,
  ``{"op": ..., "args": {...}}``, the simulator's fault API);
- ``counters <t> <json>``: the link's counters (frames sent, corrupted each way,
  dropped), in answer to the line ``{"op": "link_counters"}`` on stdin.

time.monotonic is CLOCK_MONOTONIC: the parent's stamps are on the same clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from pbmd.drivers import codec
from pbmd.hw_sim import SimConfig, Simulator


async def main(time_scale: float, seed: int) -> None:
    logging.basicConfig(level=logging.ERROR)
    out = sys.stdout
    async with Simulator(SimConfig(time_scale=time_scale, seed=seed)) as sim:
        ctl = sim.controller
        handle_frame = ctl.handle_frame

        def tapped(frame: codec.Frame) -> None:
            t = time.monotonic()
            handle_frame(frame)
            if frame.msg_type != codec.Ping.TYPE:
                name = type(frame.message()).__name__
                out.write(f"rx {t:.6f} {name}\n")
                out.flush()

        ctl.handle_frame = tapped  # type: ignore[method-assign]
        send = sim._send

        def tapped_send(msg: codec.Message, seq: int, kind: str) -> None:
            t = time.monotonic()
            send(msg, seq, kind)
            if isinstance(msg, codec.Event):
                out.write(f"tx {t:.6f} Event{msg.code}\n")
                out.flush()

        sim._send = tapped_send  # type: ignore[method-assign]
        url = await sim.listen_tcp("127.0.0.1", 0)
        out.write(f"link {url}\n")
        out.flush()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                return
            request = json.loads(line)
            t = time.monotonic()
            if request["op"] == "link_counters":
                counters = json.dumps(sim.snapshot()["link"], separators=(",", ":"))
                out.write(f"counters {t:.6f} {counters}\n")
                out.flush()
                continue
            getattr(sim.faults, request["op"])(**request.get("args", {}))
            out.write(f"inject {t:.6f} {request['op']}\n")
            out.flush()


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]), int(sys.argv[2])))
