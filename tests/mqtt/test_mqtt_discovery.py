"""Home Assistant discovery as Home Assistant's sensor schema wants it, against a real
mosquitto: energy and fluence as running totals, enum states with their options, a
diagnostic controller state, the hardware on the device card, and configs a previous
run published but this one does not cleared with an empty retained payload."""

from __future__ import annotations

import json

from pbmd.daemon.services.mqtt.discovery import CONTROLLER_STATES, SESSION_STATES

from .broker import Mosquitto
from .conftest import PublisherFactory, RigFactory
from .subscriber import Subscriber

SENSORS = {"session_state", "controller_state"} | {
    f"port{p}_{k}" for p in (1, 2, 3, 4) for k in ("irradiance", "fluence", "energy", "remaining")
}


def _configs(subscriber: Subscriber, node: str) -> dict[str, dict[str, object]]:
    """The latest config per sensor of ``node`` (an empty payload: removed)."""
    out: dict[str, dict[str, object]] = {}
    for m in subscriber.messages:
        parts = m.topic.split("/")
        if m.topic.startswith(f"homeassistant/sensor/{node}/") and len(parts) == 5:
            out[parts[3]] = m.json() if m.payload else {}
    return out


async def test_discovery_schema_and_stale_configs_cleared(
    broker: Mosquitto,
    subscriber: Subscriber,
    make_rig: RigFactory,
    make_publisher: PublisherFactory,
) -> None:
    rig = await make_rig()
    old = await make_publisher(rig, broker.port, device_id="ws-old")
    await subscriber.wait_until(
        lambda: set(_configs(subscriber, "pbmd_ws-old")) >= SENSORS, what="every config"
    )
    configs = _configs(subscriber, "pbmd_ws-old")
    energy = configs["port1_energy"]
    assert (energy["device_class"], energy["state_class"], energy["unit_of_measurement"]) == (
        "energy", "total_increasing", "J",
    )  # fmt: skip
    fluence = configs["port1_fluence"]
    assert fluence["state_class"] == "total_increasing" and "device_class" not in fluence
    assert configs["port1_irradiance"]["state_class"] == "measurement"
    session = configs["session_state"]
    assert session["device_class"] == "enum" and session["options"] == list(SESSION_STATES)
    assert {"idle", "running", "completed", "faulted"} <= set(SESSION_STATES)
    controller = configs["controller_state"]
    assert controller["device_class"] == "enum"
    assert controller["options"] == list(CONTROLLER_STATES)
    assert controller["entity_category"] == "diagnostic"
    for enum_sensor in (session, controller):
        assert "state_class" not in enum_sensor and "unit_of_measurement" not in enum_sensor
    device = energy["device"]
    assert isinstance(device, dict)
    info = rig.handle.info
    assert device["serial_number"] == info.serial
    assert device["hw_version"] == f"main firmware {info.firmware}"

    # The state the template reads is one of the options (the session's too).
    state = await subscriber.wait_for(lambda m: m.topic == "pbm/v1/ws-old/state", what="state")
    assert state.json()["controllers"][0]["state"] in CONTROLLER_STATES
    idle = await subscriber.wait_for(lambda m: m.topic == "pbm/v1/ws-old/session", what="idle")
    assert idle.json()["state"] in SESSION_STATES

    # The device id changes: the next run clears every config of the old one.
    await old.close()
    mark = len(subscriber.messages)
    await make_publisher(rig, broker.port, device_id="ws-new")
    await subscriber.wait_until(
        lambda: set(_configs(subscriber, "pbmd_ws-new")) >= SENSORS, what="the new configs"
    )
    await subscriber.wait_until(
        lambda: all(c == {} for c in _configs(subscriber, "pbmd_ws-old").values()),
        what="the old configs cleared",
    )
    cleared = [
        m
        for m in subscriber.messages[mark:]
        if m.topic.startswith("homeassistant/sensor/pbmd_ws-old/")
    ]
    assert {m.topic.split("/")[3] for m in cleared} == SENSORS
    assert all(m.payload == b"" for m in cleared)
    memory = json.loads(rig.records_path.with_name("mqtt-discovery.json").read_text())
    assert all("/pbmd_ws-new/" in t for t in memory["topics"]) and len(memory["topics"]) == 18

    # A subscriber that comes later sees only the new device's configs retained.
    late = Subscriber(broker.port)
    await late.connect()
    try:
        await late.wait_until(
            lambda: set(_configs(late, "pbmd_ws-new")) >= SENSORS, what="retained new configs"
        )
        assert _configs(late, "pbmd_ws-old") == {}
    finally:
        await late.disconnect()
