"""Fixtures of the MQTT tests: a real mosquitto, the treatment rig, a subscriber."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import structlog

from pbmd.daemon.services.mqtt import MqttConfig, MqttPublisher, MqttStats

from .broker import MOSQUITTO, Mosquitto
from .rig import Rig
from .subscriber import Subscriber

if not Path(MOSQUITTO).exists():  # `make test` installs it; say so rather than skip silently
    raise RuntimeError(f"mosquitto not found at {MOSQUITTO}: run `make system-deps`")


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Warnings and up only (reconnect attempts are expected here); restored after."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def subscriber(broker: Mosquitto) -> AsyncIterator[Subscriber]:
    s = Subscriber(broker.port)
    await s.connect()
    try:
        yield s
    finally:
        await s.disconnect()


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[RigFactory]:
    rigs: list[Rig] = []

    async def make(*, time_scale: float = 60.0, name: str = "rig", seed: int = 7) -> Rig:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        rig = await Rig.open(directory, time_scale=time_scale, seed=seed)
        rigs.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in reversed(rigs):
            await rig.close()


PublisherFactory = Callable[..., Awaitable[MqttPublisher]]


@pytest.fixture
async def make_publisher(make_rig: RigFactory) -> AsyncIterator[PublisherFactory]:
    """Start publishers; every one is closed (before its rig) at teardown."""
    publishers: list[MqttPublisher] = []

    async def make(
        rig: Rig, port: int, *, device_id: str = "ws-01", **overrides: object
    ) -> MqttPublisher:
        fields: dict[str, object] = {
            "enabled": True,
            "host": "127.0.0.1",
            "port": port,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "connect_timeout_s": 5.0,
        }
        fields.update(overrides)
        config = MqttConfig.model_validate(fields)
        pub = MqttPublisher(config, store=rig.store, engine=rig.engine, device_id=device_id)
        publishers.append(pub)
        await pub.start()
        return pub

    try:
        yield make
    finally:
        for pub in reversed(publishers):
            await pub.close()


async def wait_stats(
    pub: MqttPublisher, predicate: Callable[[MqttStats], bool], timeout_s: float = 10.0
) -> MqttStats:
    """Wait for a connect, disconnect or failed attempt after which ``predicate`` holds."""
    if predicate(pub.stats):
        return pub.stats
    seen: asyncio.Future[MqttStats] = asyncio.get_running_loop().create_future()

    def on_change(stats: MqttStats) -> None:
        if predicate(stats) and not seen.done():
            seen.set_result(stats)

    remove = pub.add_connection_listener(on_change)
    try:
        return await asyncio.wait_for(seen, timeout_s)
    finally:
        remove()
