"""Load generator: N clients on the control socket, each sending `status` at a fixed rate.

    python load_client.py SOCKET CLIENTS RATE_PER_CLIENT_HZ

Runs until its stdin closes (the test's stop signal), then prints one JSON line:
requests, errors, and reply latency percentiles in milliseconds. Run as a
separate process so that the load does not share the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def client(
    path: str, period_s: float, stop: asyncio.Event, lat: list[float], errors: list[str]
) -> None:
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
    except OSError as exc:
        errors.append(f"connect: {exc}")
        return
    request = b'{"jsonrpc": "2.0", "id": 1, "method": "status"}\n'
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            writer.write(request)
            line = await reader.readline()
            if not line:
                errors.append("closed by pbmd")
                return
            lat.append((time.perf_counter() - t0) * 1000.0)
            if b'"error"' in line[:200]:
                errors.append(line[:200].decode(errors="replace"))
            next_at += period_s
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the request rate, not synchronisation
            else:
                next_at = time.monotonic()
    finally:
        writer.close()


async def main() -> None:
    path, clients, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    lat: list[float] = []
    errors: list[str] = []
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(client(path, 1.0 / rate, stop, lat, errors)) for _ in range(clients)
    ]
    print(json.dumps({"started": clients}), flush=True)
    await stop.wait()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    lat.sort()

    def pct(q: float) -> float | None:
        return round(lat[min(int(q * len(lat)), len(lat) - 1)], 3) if lat else None

    print(
        json.dumps(
            {
                "requests": len(lat),
                "rate_per_s": round(len(lat) / elapsed, 1),
                "errors": errors[:5],
                "error_count": len(errors),
                "latency_ms_p50": pct(0.5),
                "latency_ms_p99": pct(0.99),
                "latency_ms_max": round(lat[-1], 3) if lat else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
