"""The daemon treats with the broker down; its events wait in the outbox and are
published, in order, by the next daemon run once a broker is there."""

from __future__ import annotations

import time
from pathlib import Path

from pbmd.daemon.core.session import SessionState

from .broker import Mosquitto, free_port
from .conftest import PublisherFactory, RigFactory, wait_stats
from .rig import protocol_text
from .subscriber import Subscriber

PREFIX = "pbm/v1/ws-01"


async def test_treats_with_broker_down_and_replays_after_restart(
    tmp_path: Path, make_rig: RigFactory, make_publisher: PublisherFactory
) -> None:
    port = free_port()  # nothing listens here yet
    first = await make_rig(time_scale=30.0, name="daemon")
    pub = await make_publisher(first, port)
    await wait_stats(pub, lambda s: s.connect_failures >= 1)
    session = await first.start_session(protocol_text({1: (0.3,), 2: (0.3,), 3: (0.3,)}))
    assert await session.wait() == SessionState.COMPLETED
    record = await first.store.get_session(session.id)
    assert record is not None
    for step in record["steps"]:
        assert step["outcome"] == "completed"
        assert abs(step["delivered_host_j"] / step["prescribed_energy_j"] - 1) < 0.02
    held = first.outbox()
    assert held and all(published is None for _, _, published in held)
    started = time.monotonic()
    await pub.close()  # nothing to flush to: returns at once, not after close_timeout_s
    assert time.monotonic() - started < pub.config.close_timeout_s
    assert not pub.stats.connects
    await first.close()  # the daemon stops

    broker = Mosquitto(tmp_path / "broker", port)
    await broker.start()
    sub = Subscriber(broker.port)
    try:
        await sub.connect()
        second = await make_rig(time_scale=30.0, name="daemon")  # same records file
        pub = await make_publisher(second, broker.port)
        await sub.wait_until(
            lambda: (
                {m.json()["id"] for m in sub.on(f"{PREFIX}/events")} >= {eid for _, eid, _ in held}
            ),
            what="the held events",
        )
        received = [m.json()["id"] for m in sub.on(f"{PREFIX}/events")]
        assert received == [eid for _, eid, _ in held]  # in order, each once
        await pub.close()
        assert all(published for _, _, published in second.outbox())
    finally:
        await sub.disconnect()
        await broker.stop()
