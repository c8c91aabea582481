"""A whole session seen over MQTT: every topic and payload, end to end.

The real Engine runs a synthetic protocol against hw_sim through the real
driver; the publisher talks to a real mosquitto; a subscriber to ``pbm/v1/#``
and ``homeassistant/#`` checks what a dashboard would see.
"""

from __future__ import annotations

import re

from pbmd.daemon.core.safety import SafetyLimits
from pbmd.daemon.core.session import SessionState

from .broker import Mosquitto
from .conftest import PublisherFactory, RigFactory
from .subscriber import Received, Subscriber

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
PREFIX = "pbm/v1/ws-01"
DOSE_BACKSTOP_FRACTION = SafetyLimits().energy_budget_fraction
DOSE_KEYS = {
    "ts", "seq", "session_id", "port", "emitting", "step", "steps", "site", "label",
    "wavelength_nm", "mode", "pulse_hz", "setpoint_mw", "power_mw", "irradiance_mw_cm2",
    "energy_j", "controller_energy_j", "fluence_j_cm2", "target_kind", "target_energy_j",
    "target_fluence_j_cm2", "target_time_s", "elapsed_s", "remaining_s", "fraction",
    "temperature_c", "contact",
}  # fmt: skip


def _topic(suffix: str) -> str:
    return f"{PREFIX}/{suffix}"


async def test_whole_session_topics_and_payloads(
    broker: Mosquitto,
    subscriber: Subscriber,
    make_rig: RigFactory,
    make_publisher: PublisherFactory,
) -> None:
    rig = await make_rig(time_scale=30.0)
    pub = await make_publisher(rig, broker.port)
    online = await subscriber.wait_for(
        lambda m: m.topic == _topic("status") and m.text == "online", what="status online"
    )
    assert online.prop("reason") == "connected"
    idle = await subscriber.wait_for(lambda m: m.topic == _topic("session"), what="session")
    assert idle.json()["state"] == "idle"
    assert idle.json()["session_id"] is None

    # Retained controller snapshot: decoded interlocks and per-port applicators.
    state = (await subscriber.wait_for(lambda m: m.topic == _topic("state"), what="state")).json()
    assert ISO_UTC.match(state["ts"])
    ctrl = state["controllers"][0]
    assert ctrl["name"] == "main" and ctrl["connected"] is True
    assert ctrl["state"] == "standby" and ctrl["fault"] == "none"
    assert ctrl["interlocks"] == {
        "key": True, "remote": True, "estop_released": True,
        "footswitch": ctrl["interlocks"]["footswitch"],
    }  # fmt: skip
    assert ctrl["run_permitted"] is True
    ports = {p["port"]: p for p in state["ports"]}
    assert sorted(ports) == [1, 2, 3, 4]
    assert ports[1]["applicator"]["kind"] == "pad"
    assert ports[1]["applicator"]["area_cm2"] == 180.0
    assert ports[4]["applicator"]["kind"] == "probe"
    assert ports[4]["applicator"]["channels_nm"] == [905]
    assert all(p["emitting"] is False for p in ports.values())
    assert isinstance(ports[1]["temperature_c"], float)

    # Home Assistant discovery: retained configs, availability on …/status.
    irr = await subscriber.wait_for(
        lambda m: m.topic == "homeassistant/sensor/pbmd_ws-01/port1_irradiance/config",
        what="discovery config",
    )
    cfg = irr.json()
    assert cfg["state_topic"] == _topic("port/1/dose")
    assert cfg["availability_topic"] == _topic("status")
    assert cfg["unit_of_measurement"] == "mW/cm²"
    assert cfg["value_template"] == "{{ value_json.irradiance_mw_cm2 }}"
    assert cfg["unique_id"] == "pbmd_ws-01_port1_irradiance"
    discovery_topics = {
        m.topic for m in subscriber.messages if m.topic.startswith("homeassistant/")
    }
    expected = {"session_state", "controller_state"} | {
        f"port{p}_{k}"
        for p in (1, 2, 3, 4)
        for k in ("irradiance", "fluence", "energy", "remaining")
    }
    await subscriber.wait_until(
        lambda: {m.topic.split("/")[3] for m in subscriber.messages
                 if m.topic.startswith("homeassistant/sensor/")} >= expected,
        what="every discovery config",
    )  # fmt: skip
    discovery_topics = {
        m.topic for m in subscriber.messages if m.topic.startswith("homeassistant/sensor/")
    }

    # The session: pads on 1-3 (two steps each), a gated probe point on port 4.
    text = _protocol()
    mark = len(subscriber.messages)
    session = await rig.start_session(text)

    # The prompt reaches the dashboard; the operator confirms the probe placement.
    prompt = await subscriber.wait_for(
        lambda m: (
            m.topic == _topic("session")
            and any("confirm placement" in (p["wait_reason"] or "") for p in m.json()["ports"])
        ),
        start=mark,
        what="confirm-placement prompt",
    )
    assert prompt.json()["session_id"] == session.id
    session.confirm(4)
    assert await session.wait() == SessionState.COMPLETED

    final = await subscriber.wait_for(
        lambda m: m.topic == _topic("session") and m.json()["state"] == "completed",
        start=mark,
        what="session completed",
    )
    summary = final.json()
    assert summary["session_id"] == session.id
    assert summary["protocol_id"] == "mqtt-test"
    assert summary["ended_utc"] is not None and ISO_UTC.match(summary["ended_utc"])
    assert "patient_ref" not in summary and "patient-0001" not in final.text
    states = [m.json()["state"] for m in subscriber.messages[mark:] if m.topic == _topic("session")]
    # Sampled at the live rate: a state shorter than a sample period may be skipped
    # (armed lasts 33 ms at 60x), never reordered; every transition is an event.
    order = ["idle", "ready", "armed", "running", "completed"]
    assert [order.index(x) for x in states] == sorted(order.index(x) for x in states), states
    assert "running" in states and states[-1] == "completed"
    seqs = [m.json()["seq"] for m in subscriber.messages if m.topic == _topic("session")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # Every outbox event exactly once, in order, with its id three ways.
    outbox = rig.outbox()
    await subscriber.wait_until(
        lambda: (
            {m.json()["id"] for m in subscriber.on(_topic("events"))}
            >= {eid for _, eid, _ in outbox}
        ),
        what="every outbox event",
    )
    events = subscriber.on(_topic("events"))
    assert [m.json()["id"] for m in events] == [eid for _, eid, _ in outbox]
    assert [m.json()["seq"] for m in events] == [seq for seq, _, _ in outbox]
    for m in events:
        body = m.json()
        assert m.qos == 1
        assert m.prop("event_id") == body["id"]
        assert m.correlation_data == body["id"].encode()
        assert ISO_UTC.match(body["ts"])
        assert body["session_id"] == session.id
    transitions = [m.json()["data"]["to"] for m in events if m.json()["kind"] == "state"]
    assert transitions == ["ready", "armed", "running", "completed"]
    kinds = [m.json()["kind"] for m in events]
    for kind in ("state", "step_started", "emission_started", "step_completed"):
        assert kind in kinds
    assert kinds.count("step_completed") == 7

    # Live dose on every port, ~10 Hz while emitting, ending with the final figures.
    for port in (1, 2, 3, 4):
        await subscriber.wait_for(
            lambda m, port=port: (
                m.topic == _topic(f"port/{port}/dose")  # type: ignore[misc]
                and not m.json()["emitting"]
                and m.json()["step"] == (0 if port == 4 else 1)
            ),
            start=mark,
            what=f"closing dose sample on port {port}",
        )
    for port, target in ((1, 0.4), (2, 0.4), (3, 0.4)):
        doses = [m.json() for m in subscriber.on(_topic(f"port/{port}/dose"))]
        assert doses, f"no dose on port {port}"
        assert set(doses[0]) == DOSE_KEYS
        assert [d["seq"] for d in doses] == list(
            range(doses[0]["seq"], doses[0]["seq"] + len(doses))
        )
        assert {d["step"] for d in doses} == {0, 1}
        assert {d["wavelength_nm"] for d in doses} == {660, 830}
        # A closing sample once the port is seen dark (the step's exact figures are
        # in its step_completed event).
        closing = [d for d in doses if not d["emitting"]]
        assert 1 <= len(closing) <= 2
        assert all(d["fluence_j_cm2"] > 0.9 * target for d in closing)
        last = doses[-1]
        assert last["emitting"] is False and last["step"] == 1
        # What is published is the delivered figure, whatever it is: dose accuracy is
        # the engine tests' (at ×30 a stop 40 ms late on a loaded machine is 3 %);
        # here it must lie within the controller's +5 % budget of the target.
        assert abs(last["fluence_j_cm2"] - target) / target < DOSE_BACKSTOP_FRACTION
        assert last["target_fluence_j_cm2"] == target
        assert last["target_energy_j"] == target * 180.0
        completed = [
            m.json()["data"] for m in events
            if m.json()["kind"] == "step_completed" and m.json()["port"] == port
        ]  # fmt: skip
        assert len(completed) == 2
        for data in completed:
            assert abs(data["fluence_j_cm2"] - target) / target < DOSE_BACKSTOP_FRACTION
        first = [d for d in doses if d["step"] == 0 and d["emitting"]]
        assert [d["fluence_j_cm2"] for d in first] == sorted(d["fluence_j_cm2"] for d in first)
        # 10 mW/cm² while light is measured (the edges of an emission may read dark).
        lit = sorted(d["irradiance_mw_cm2"] for d in first)
        assert 9.0 < lit[len(lit) // 2] < 11.0
    probe = [m for m in subscriber.on(_topic("port/4/dose"))]
    assert probe and probe[-1].json()["emitting"] is False
    assert abs(probe[-1].json()["energy_j"] - 2.0) / 2.0 < 0.03
    for m in subscriber.on(_topic("port/1/dose")):
        assert m.qos == 0 and not m.retain
        assert m.expiry_s is not None and 0 < m.expiry_s <= 2

    # Home Assistant comes back online: discovery is published again.
    mark = len(subscriber.messages)
    await _publish(broker, "homeassistant/status", "online")
    await subscriber.wait_until(
        lambda: {m.topic for m in subscriber.messages[mark:]} >= discovery_topics,
        what="discovery re-published",
    )

    # Clean shutdown: "offline" retained, marked as a shutdown (not the last will).
    await pub.close()
    offline = await subscriber.wait_for(
        lambda m: m.topic == _topic("status") and m.text == "offline", what="offline"
    )
    assert offline.prop("reason") == "shutdown"
    assert pub.stats.live_dropped == 0
    assert all(pub_ is not None for _, _, pub_ in rig.outbox())


def _protocol() -> str:
    from .rig import protocol_text

    return protocol_text({1: (0.4, 0.4), 2: (0.4, 0.4), 3: (0.4, 0.4)}, probe_energy_j=2.0)


async def _publish(broker: Mosquitto, topic: str, payload: str) -> None:
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.publish(topic, payload, qos=1)


_ = Received
