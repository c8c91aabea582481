"""A publishing daemon in a child process, for the last-will test (it gets SIGKILLed).

Runs hw_sim, the real Engine and RecordStore and the MQTT publisher, starts a
long session and prints ``treating`` once the session runs; then waits to be
killed. Run as ``python -m mqtt.child_publisher`` from the tests directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import structlog

from pbmd.daemon.services.mqtt import MqttConfig, MqttPublisher

from .rig import Rig, protocol_text


async def main(port: int, directory: Path, device_id: str) -> None:
    rig = await Rig.open(directory, time_scale=10.0, own_process=False)
    config = MqttConfig(
        host="127.0.0.1", port=port, device_id=device_id, reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )  # fmt: skip
    pub = MqttPublisher(config, store=rig.store, engine=rig.engine, device_id="unused")
    await pub.start()
    await rig.start_session(protocol_text({1: (5.0,)}))
    print("treating", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--device-id", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.dir, args.device_id))
    sys.exit(0)
