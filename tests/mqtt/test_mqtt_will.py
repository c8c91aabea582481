"""The last will: a daemon killed mid-treatment is shown ``offline`` by the broker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from .broker import Mosquitto
from .subscriber import Subscriber

TESTS_DIR = Path(__file__).resolve().parents[1]
PREFIX = "pbm/v1/child-01"


async def test_last_will_offline_after_sigkill(
    broker: Mosquitto, subscriber: Subscriber, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mqtt.child_publisher", "--port", str(broker.port),
        "--dir", str(tmp_path), "--device-id", "child-01",
        cwd=TESTS_DIR, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        online = await subscriber.wait_for(
            lambda m: m.topic == f"{PREFIX}/status" and m.text == "online",
            timeout_s=30.0,
            what="child online",
        )
        assert online.prop("reason") == "connected"
        # Killed while the pad emits, as a dashboard sees it.
        await subscriber.wait_for(
            lambda m: m.topic == f"{PREFIX}/port/1/dose" and m.json()["emitting"],
            timeout_s=30.0,
            what="child's dose while emitting",
        )
        mark = len(subscriber.messages)
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
        offline = await subscriber.wait_for(
            lambda m: m.topic == f"{PREFIX}/status",
            start=mark,
            what="the last will",
        )
        assert offline.text == "offline"
        assert offline.prop("reason") == "connection lost"  # the will, not a shutdown
        assert offline.qos == 1
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    # Retained: a dashboard that connects later still sees it offline.
    late = Subscriber(broker.port, topics=(f"{PREFIX}/status",))
    await late.connect()
    try:
        retained = await late.wait_for(lambda m: True, what="retained status")
        assert retained.retain and retained.text == "offline"
    finally:
        await late.disconnect()
