"""MQTT's retained ``state`` carries the replication object: how far behind, and why stopped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from mqtt.broker import Mosquitto
from mqtt.conftest import broker as broker  # the MQTT tests' fixtures
from mqtt.conftest import subscriber as subscriber
from mqtt.subscriber import Subscriber
from service.harness import Daemon, toml_config

from .conftest import ClinicServer


async def test_state_says_why_replication_is_stopped(
    broker: Mosquitto, subscriber: Subscriber, workdir: Path, clinic_server: ClinicServer
) -> None:
    url = f"postgresql://pbmd_no_such_role@127.0.0.1:5432/{clinic_server.name}"
    extra = f"""
[mqtt]
host = "127.0.0.1"
port = {broker.port}
device_id = "ws-clinic"
reconnect_max_s = 1.0

[clinic_db]
url = "{url}"
retry_s = 0.3
"""
    config = workdir / "pbmd.toml"
    config.write_text(
        toml_config(workdir / "state", workdir / "control.sock", extra=extra), encoding="utf-8"
    )
    daemon = Daemon(config, workdir / "control.sock", workdir / "state")
    await asyncio.to_thread(daemon.start)
    try:

        def stopped(m: object) -> bool:
            if getattr(m, "topic", "") != "pbm/v1/ws-clinic/state":
                return False
            replication = json.loads(getattr(m, "text", "{}")).get("replication") or {}
            return replication.get("state") == "stopped"

        msg = await subscriber.wait_for(stopped, what="state with replication stopped")
        payload = json.loads(msg.text)
        replication = payload["replication"]
        assert 'role "pbmd_no_such_role" does not exist' in replication["reason"]
        assert replication["server"].endswith(clinic_server.name)
        assert "records_healthy" in payload and "controllers" in payload
    finally:
        await asyncio.to_thread(daemon.stop)
        daemon.kill()
