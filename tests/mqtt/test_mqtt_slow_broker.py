"""A broker that stops taking live samples: the oldest are dropped, the session and
the events do not notice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pbmd.daemon.core.session import SessionState
from pbmd.daemon.services import mqtt

from .broker import Mosquitto
from .conftest import PublisherFactory, RigFactory
from .rig import protocol_text
from .subscriber import Subscriber

PREFIX = "pbm/v1/ws-01"


async def test_stalled_live_publishing_drops_oldest_and_spares_the_session(
    broker: Mosquitto,
    subscriber: Subscriber,
    make_rig: RigFactory,
    make_publisher: PublisherFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # QoS 0 publications (the live samples) hang until released, as they would on a
    # connection whose socket buffer the broker no longer drains.
    release = asyncio.Event()
    stalled = asyncio.Event()
    held: list[str] = []
    original = mqtt._Client.publish

    async def publish(self: Any, topic: str, *args: Any, **kwargs: Any) -> None:
        if "/dose" in topic and not release.is_set():
            held.append(topic)
            stalled.set()
            await release.wait()
        await original(self, topic, *args, **kwargs)

    monkeypatch.setattr(mqtt._Client, "publish", publish)
    rig = await make_rig(time_scale=30.0)
    pub = await make_publisher(rig, broker.port)
    await subscriber.wait_for(lambda m: m.topic == f"{PREFIX}/status", what="online")
    session = await rig.start_session(protocol_text({1: (0.4, 0.4), 2: (0.4,), 3: (0.4,)}))
    await asyncio.wait_for(stalled.wait(), 10)
    assert await session.wait() == SessionState.COMPLETED
    record = await rig.store.get_session(session.id)
    assert record is not None
    for step in record["steps"]:
        assert step["outcome"] == "completed"
        assert abs(step["delivered_host_j"] / step["prescribed_energy_j"] - 1) < 0.02
    # Events went on meanwhile: every one arrived while the live samples were stuck.
    wanted = [eid for _, eid, _ in rig.outbox()]
    await subscriber.wait_until(
        lambda: [m.json()["id"] for m in subscriber.on(f"{PREFIX}/events")] == wanted,
        what="every event while live publishing is stalled",
    )
    assert pub.stats.live_dropped > 0
    release.set()
    # Port 1 emits last: its closing sample is the last one the sampler makes, so once
    # it arrived (FIFO) every sample was either published or dropped.
    closing = await subscriber.wait_for(
        lambda m: (
            m.topic == f"{PREFIX}/port/1/dose"
            and not m.json()["emitting"]
            and m.json()["step"] == 1
        ),
        what="port 1's closing sample after the release",
    )
    assert closing.json()["seq"] == pub._seq[closing.topic]
    produced = received = 0
    for port in (1, 2, 3):
        topic = f"{PREFIX}/port/{port}/dose"
        seqs = [m.json()["seq"] for m in subscriber.on(topic)]
        tail = seqs[1:] if topic == held[0] else seqs
        if tail:  # the newest samples of the port, without a gap: the oldest were dropped
            assert tail == list(range(tail[-1] - len(tail) + 1, tail[-1] + 1)), (topic, seqs)
        produced += pub._seq[topic]  # the samples the sampler made for this topic
        received += len(seqs)
    assert produced == received + pub.stats.live_dropped
    assert len(held) == 1
