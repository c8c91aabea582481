"""`pbmd run` with an [mqtt] table: the service's publisher seen end to end.

The daemon is the real process (the service tests' harness); a session runs
through the control socket while a subscriber to ``pbm/v1/#`` watches.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.harness import (
    SHORT_SCREENING,
    Daemon,
    RawClient,
    pbmctl_json,
    run_session_confirming,
    toml_config,
    write_protocol,
)

from .broker import Mosquitto
from .subscriber import Subscriber

PREFIX = "pbm/v1/ws-e2e"


async def test_daemon_publishes_a_whole_session(
    broker: Mosquitto, subscriber: Subscriber, workdir: Path
) -> None:
    mqtt = f"""
[mqtt]
host = "127.0.0.1"
port = {broker.port}
device_id = "ws-e2e"
reconnect_max_s = 1.0
"""
    config = workdir / "pbmd.toml"
    config.write_text(
        toml_config(workdir / "state", workdir / "control.sock", extra=mqtt), encoding="utf-8"
    )
    # SCHED_FIFO as pbmd.service runs it: at x30 a probe point's +5 % energy budget is
    # 67 ms of wall time, and a daemon left to a busy machine once stopped late (E404).
    daemon = Daemon(config, workdir / "control.sock", workdir / "state", extra_args=("--realtime",))
    await asyncio.to_thread(daemon.start)
    try:
        await subscriber.wait_for(
            lambda m: m.topic == f"{PREFIX}/status" and m.text == "online", what="online"
        )
        await subscriber.wait_for(lambda m: m.topic == f"{PREFIX}/state", what="state")
        await subscriber.wait_for(
            lambda m: m.topic.startswith("homeassistant/sensor/pbmd_ws-e2e/"), what="discovery"
        )
        path = write_protocol(workdir)
        await asyncio.to_thread(pbmctl_json, daemon.socket_path, "protocol", "install", str(path))

        def run() -> tuple[str, str, list[str]]:
            with RawClient(daemon.socket_path) as client:
                session_id, state = run_session_confirming(
                    client, "service-short", "MQTT-1", SHORT_SCREENING
                )
                record = client.call("records.show", {"session_id": session_id})["session"]
            return session_id, state, [str(e["id"]) for e in record["events"]]

        session_id, state, event_ids = await asyncio.to_thread(run)
        assert state == "completed"
        await subscriber.wait_for(
            lambda m: (
                m.topic == f"{PREFIX}/session"
                and m.json()["session_id"] == session_id
                and m.json()["state"] == "completed"
            ),
            what="session completed",
        )
        for port in (1, 2, 4):
            await subscriber.wait_for(
                lambda m, p=port: m.topic == f"{PREFIX}/port/{p}/dose",  # type: ignore[misc]
                what=f"dose on port {port}",
            )

        def session_events() -> list[str]:
            return [
                m.json()["id"]
                for m in subscriber.on(f"{PREFIX}/events")
                if m.json()["session_id"] == session_id
            ]

        await subscriber.wait_until(
            lambda: set(session_events()) >= set(event_ids), what="every session event"
        )
        assert list(dict.fromkeys(session_events())) == event_ids
        mark = len(subscriber.messages)
    finally:
        rc = await asyncio.to_thread(daemon.stop)
        daemon.kill()
    assert rc == 0
    offline = await subscriber.wait_for(
        lambda m: m.topic == f"{PREFIX}/status", start=mark, what="offline at shutdown"
    )
    assert offline.text == "offline" and offline.prop("reason") == "shutdown"
