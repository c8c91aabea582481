"""The live rate holds with four ports emitting at once (pads 1-3 and the probe)."""

from __future__ import annotations

import functools

from pbmd.daemon.core.session import SessionState

from .broker import Mosquitto
from .conftest import PublisherFactory, RigFactory
from .rig import protocol_text
from .subscriber import Received, Subscriber

PREFIX = "pbm/v1/ws-01"
WINDOW = 21  # messages per port: 20 intervals, 2 s at 10 Hz


async def test_live_rate_with_four_ports(
    broker: Mosquitto,
    subscriber: Subscriber,
    make_rig: RigFactory,
    make_publisher: PublisherFactory,
) -> None:
    rig = await make_rig(time_scale=30.0)
    pub = await make_publisher(rig, broker.port, live_rate_hz=10.0)
    await subscriber.wait_for(lambda m: m.topic == f"{PREFIX}/status", what="status")
    # About 100 s of device time per port (over 3 s wall at 30x).
    session = await rig.start_session(
        protocol_text({1: (1.2,), 2: (1.2,), 3: (1.2,)}, probe_energy_j=4.8)
    )
    await subscriber.wait_for(
        lambda m: (
            m.topic == f"{PREFIX}/session"
            and any("confirm placement" in (p["wait_reason"] or "") for p in m.json()["ports"])
        ),
        what="confirm prompt",
    )
    session.confirm(4)

    def emitting(port: int, m: Received) -> bool:
        return m.topic == f"{PREFIX}/port/{port}/dose" and m.json()["emitting"]

    # The window opens once all four ports emit.
    for port in (1, 2, 3, 4):
        await subscriber.wait_for(functools.partial(emitting, port), what=f"port {port} emitting")
    mark = len(subscriber.messages)

    def window(port: int) -> list[Received]:
        return [m for m in subscriber.messages[mark:] if emitting(port, m)]

    await subscriber.wait_until(
        lambda: all(len(window(p)) >= WINDOW for p in (1, 2, 3, 4)),
        timeout_s=10.0,
        what=f"{WINDOW} samples on every port",
    )
    assert session.state is SessionState.RUNNING
    rates: dict[int, float] = {}
    for port in (1, 2, 3, 4):
        msgs = window(port)[:WINDOW]
        span_s = msgs[-1].arrived_s - msgs[0].arrived_s
        rates[port] = (len(msgs) - 1) / span_s
        seqs = [m.json()["seq"] for m in msgs]
        assert seqs == list(range(seqs[0], seqs[0] + WINDOW)), "a live sample was dropped"
    print(
        "\nlive rate, messages/s per port: " + ", ".join(f"{p}: {r:.2f}" for p, r in rates.items())
    )
    for port, rate in rates.items():
        assert 8.5 <= rate <= 11.5, (port, rate)
    assert pub.stats.live_dropped == 0
    await session.abort("test done")
    assert await session.wait() == SessionState.ABORTED
