"""A broker outage mid-session: zero events lost, dose delivery unaffected.

mosquitto is stopped while the pads emit and kept down for 30 s (measured on
the controller's clock at ×30: 900 s of device time, so the session runs on
through it), then restarted on the same port. The publisher
reaches the broker through a gate that the test opens only once its own
subscriber is back, so that everything the publisher replays has a listener.
"""

from __future__ import annotations

import time

from pbmd.daemon.core.session import SessionState

from .broker import Gate, Mosquitto
from .conftest import PublisherFactory, RigFactory
from .rig import protocol_text
from .subscriber import Subscriber

PREFIX = "pbm/v1/ws-01"
TIME_SCALE = 30.0
OUTAGE_WALL_S = 30.0
OUTAGE_DEVICE_S = OUTAGE_WALL_S * TIME_SCALE


async def test_broker_outage_mid_session_loses_no_event(
    broker: Mosquitto,
    subscriber: Subscriber,
    make_rig: RigFactory,
    make_publisher: PublisherFactory,
) -> None:
    gate = Gate(broker.port)
    await gate.open()
    try:
        rig = await make_rig(time_scale=TIME_SCALE)
        pub = await make_publisher(rig, gate.port)
        await subscriber.wait_for(
            lambda m: m.topic == f"{PREFIX}/status" and m.text == "online", what="online"
        )
        # Pads on ports 1-3, two steps of 7 J/cm² (700 s of device time each, 47 s of
        # wall time in all): the outage begins in the first and ends in the second.
        session = await rig.start_session(protocol_text({p: (7.0, 7.0) for p in (1, 2, 3)}))

        # Mid-way through the first step (as a dashboard sees it), the broker dies.
        await subscriber.wait_for(
            lambda m: m.topic == f"{PREFIX}/port/1/dose" and m.json()["fluence_j_cm2"] >= 0.3,
            what="port 1 at 0.3 J/cm²",
        )
        published_before = sum(1 for _, _, published in rig.outbox() if published)
        down_wall_s = time.monotonic()
        await gate.shut()
        await broker.stop()
        await subscriber.disconnect()
        await rig.device_time_passes(OUTAGE_DEVICE_S, timeout_s=OUTAGE_WALL_S * 3)
        held = rig.outbox()
        held_during_outage = [eid for _, eid, published in held if published is None]
        assert not pub.connected
        assert session.state is SessionState.RUNNING

        # Back: the subscriber first, then the publisher's way in.
        await broker.start()
        mark = len(subscriber.messages)
        await subscriber.connect()
        await gate.open()
        up_wall_s = time.monotonic()
        assert await session.wait() == SessionState.COMPLETED

        outbox = rig.outbox()
        wanted = [eid for _, eid, _ in outbox]
        await subscriber.wait_until(
            lambda: {m.json()["id"] for m in subscriber.on(f"{PREFIX}/events")} >= set(wanted),
            timeout_s=20.0,
            what="every outbox event after the outage",
        )
        first_arrival: dict[str, float] = {}
        for m in subscriber.on(f"{PREFIX}/events"):
            first_arrival.setdefault(m.json()["id"], m.arrived_s)
        replayed_wall_s = max(first_arrival[eid] for eid in held_during_outage) - up_wall_s
        received = [m.json()["id"] for m in subscriber.on(f"{PREFIX}/events")]
        deduplicated = list(dict.fromkeys(received))
        assert deduplicated == wanted  # every event exactly once, in order
        duplicates = len(received) - len(deduplicated)

        # The retained topics are back on the restarted broker (it kept nothing).
        status_again = await subscriber.wait_for(
            lambda m: m.topic == f"{PREFIX}/status", start=mark, what="status re-published"
        )
        assert status_again.text == "online"
        for topic in ("state", "session"):
            await subscriber.wait_for(
                lambda m, t=topic: m.topic == f"{PREFIX}/{t}",  # type: ignore[misc]
                start=mark,
                what=f"{topic} re-published",
            )
        final = await subscriber.wait_for(
            lambda m: m.topic == f"{PREFIX}/session" and m.json()["state"] == "completed",
            start=mark,
            what="session completed",
        )
        assert final.json()["session_id"] == session.id

        # Dose delivery did not notice: every step completed within tolerance.
        record = await rig.store.get_session(session.id)
        assert record is not None
        errors = []
        for step in record["steps"]:
            assert step["outcome"] == "completed", step
            error = (step["delivered_host_j"] - step["prescribed_energy_j"]) / step[
                "prescribed_energy_j"
            ]
            errors.append(error)
            assert abs(error) < 0.02, step
            ctrl = step["delivered_controller_j"]
            assert abs(ctrl - step["prescribed_energy_j"]) / step["prescribed_energy_j"] < 0.03

        await pub.close()
        assert all(published for _, _, published in rig.outbox())
        stats = pub.stats
        assert stats.disconnects >= 1 and stats.connects >= 2
        print(
            f"\noutage: {OUTAGE_DEVICE_S:.0f} s device time "
            f"({up_wall_s - down_wall_s:.2f} s wall); events before {published_before}, "
            f"recorded during the outage {len(held_during_outage)}, total {len(wanted)}; "
            f"replayed {replayed_wall_s:.2f} s after the broker was reachable again; "
            f"duplicates {duplicates}; step dose errors "
            f"{min(errors) * 100:+.2f}..{max(errors) * 100:+.2f} %; "
            f"connects {stats.connects}, failed attempts {stats.connect_failures}"
        )
        assert len(held_during_outage) >= 5  # the step change happened while down
    finally:
        await gate.shut()
