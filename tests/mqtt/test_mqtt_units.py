"""Configuration, the live buffer, backoff and payload encoding (no broker needed)."""

from __future__ import annotations

import asyncio
import json
import tomllib
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest

from pbmd.daemon.core.status import (
    ControllerStatus,
    Freshness,
    Hardware,
    Interlocks,
    PortReading,
    PortStatus,
)
from pbmd.daemon.services.mqtt import LiveBuffer, MqttConfig, MqttPublisher, encode
from pbmd.daemon.services.mqtt.state import state_key, state_payload


def _publisher(**fields: Any) -> MqttPublisher:
    stub: Any = SimpleNamespace(port_map={}, controllers=[], add_listener=lambda cb: None)
    return MqttPublisher(MqttConfig(**fields), store=stub, engine=stub, device_id="ws-07")


def test_config_defaults_and_prefix() -> None:
    cfg = MqttConfig()
    assert cfg.enabled and cfg.port == 1883 and cfg.live_rate_hz == 10.0
    assert cfg.homeassistant.enabled and cfg.homeassistant.discovery_prefix == "homeassistant"
    assert cfg.resolved_prefix(cfg.resolved_device_id("ws-07")) == "pbm/v1/ws-07"
    override = MqttConfig(device_id="clinic-3", topic_prefix="site/a/pbm")
    assert override.resolved_device_id("ws-07") == "clinic-3"
    assert override.resolved_prefix("clinic-3") == "site/a/pbm"
    pub = _publisher(device_id="clinic-3")
    assert pub.topic_prefix == "pbm/v1/clinic-3" and pub.client_id == "pbmd-clinic-3"
    assert pub.dose_topic(2) == "pbm/v1/clinic-3/port/2/dose"


def test_config_from_a_toml_table() -> None:
    raw = tomllib.loads(
        """
        host = "broker.clinic.lan"
        port = 8883
        username = "pbmd"
        password_file = "/etc/pbmd/mqtt.password"
        live_rate_hz = 5
        [tls]
        ca_file = "/etc/pbmd/ca.pem"
        cert_file = "/etc/pbmd/client.pem"
        key_file = "/etc/pbmd/client.key"
        [homeassistant]
        enabled = false
        """
    )
    cfg = MqttConfig.model_validate(raw)
    assert cfg.tls is not None and str(cfg.tls.key_file) == "/etc/pbmd/client.key"
    assert not cfg.tls.insecure and not cfg.homeassistant.enabled


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hostname": "x"}, "Extra inputs"),
        ({"device_id": "a/b"}, "one MQTT topic level"),
        ({"device_id": "+"}, "one MQTT topic level"),
        ({"topic_prefix": "/pbm"}, "leading or trailing"),
        ({"topic_prefix": "pbm/#"}, "without wildcards"),
        ({"topic_prefix": "pbm//x"}, "empty topic level"),
        ({"tls": {"cert_file": "c.pem"}}, "both cert_file and key_file"),
        ({"tls": {"verify": False}}, "Extra inputs"),
        ({"reconnect_min_s": 10, "reconnect_max_s": 1}, "must not exceed"),
        ({"password_file": "p"}, "needs a username"),
        ({"live_rate_hz": 0}, "greater than 0"),
        ({"port": 70000}, "less than or equal"),
        ({"homeassistant": {"discovery_prefix": "ha/"}}, "leading or trailing"),
    ],
)
def test_config_refusals(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        MqttConfig.model_validate(fields)


def test_config_is_frozen() -> None:
    cfg = MqttConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.port = 1884


async def test_live_buffer_drops_oldest() -> None:
    buf = LiveBuffer(3)
    for i in range(5):
        buf.put("t", bytes([i]))
    assert len(buf) == 3 and buf.dropped == 2
    assert [await buf.get() for _ in range(3)] == [("t", b"\x02"), ("t", b"\x03"), ("t", b"\x04")]
    waiter = asyncio.create_task(buf.get())  # waits on the empty buffer
    buf.put("t", b"\x05")
    assert await asyncio.wait_for(waiter, 1) == ("t", b"\x05")
    buf.wake()  # a sender told to stop gets None instead of waiting
    assert await asyncio.wait_for(buf.get(), 1) is None
    buf.put("t", b"\x06")
    assert await asyncio.wait_for(buf.get(), 1) == ("t", b"\x06")


def test_backoff_grows_with_jitter_to_the_ceiling() -> None:
    pub = _publisher(reconnect_min_s=0.5, reconnect_max_s=8.0)
    for attempt, ceiling in enumerate((0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0)):
        delays = {pub._backoff_s(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(delays) > 1  # jittered
    assert pub._backoff_s(10_000) <= 8.0


def test_encode_is_json_with_units_and_no_nan() -> None:
    text = encode(
        {"irradiance_mw_cm2": 10.123456789, "limit": float("inf"), "unit": "mW/cm²", "n": [1.0]}
    ).decode("utf-8")
    assert json.loads(text) == {
        "irradiance_mw_cm2": 10.1235, "limit": None, "unit": "mW/cm²", "n": [1.0],
    }  # fmt: skip
    assert "²" in text


async def test_disabled_publisher_does_nothing() -> None:
    pub = _publisher(enabled=False)
    await pub.start()
    await pub.close()
    assert not pub.connected and pub.stats.connects == 0


def test_no_discovery_when_home_assistant_is_off() -> None:
    pub = _publisher(homeassistant={"enabled": False})
    assert pub.ha_status_topic is None
    assert pub._discovery_configs() == {}


def test_state_payload_shows_stale_telemetry_as_unknown() -> None:
    """``state`` carries the control API's interlock names; a controller whose last
    sample is older than the staleness limit reads ``unknown`` and its ports' readings
    null, and the change of freshness alone republishes ``state``."""
    engine: Any = SimpleNamespace(service_required=None)
    store: Any = SimpleNamespace(healthy=True)

    def hardware(age_s: float) -> Hardware:
        fresh = Freshness(age_s, 0.1)
        ctrl = ControllerStatus(
            name="main", connected=True, serial="PBM-1", firmware="1.0", freshness=fresh,
            reported_state="armed_ready", fault_code=0,
            interlocks=Interlocks(key=True, remote=True, estop_released=True, footswitch=True),
            device_time_s=1.0,
        )  # fmt: skip
        reading = PortReading(
            applicator_present=True, emitting=True, power_mw=721.0, contact=False,
            fault=False, temperature_c=25.04, flags=0x03,
        )  # fmt: skip
        port = PortStatus(
            port=1, controller="main", device_port=1, applicator_known=True, applicator=None,
            reading=None if fresh.stale else reading, freshness=fresh,
        )  # fmt: skip
        return Hardware((ctrl,), (port,))

    fresh, stale = hardware(0.02), hardware(2.5)
    state = state_payload(fresh, engine, store)
    (ctrl,) = state["controllers"]
    assert ctrl["state"] == "armed_ready" and ctrl["run_permitted"] is True
    assert ctrl["interlocks"] == {
        "key": True, "remote": True, "estop_released": True, "footswitch": True,
    }  # fmt: skip
    assert state["ports"][0]["emitting"] is True and state["ports"][0]["temperature_c"] == 25.0
    state = state_payload(stale, engine, store)
    (ctrl,) = state["controllers"]
    assert ctrl["state"] == "unknown" and ctrl["telemetry_stale"] is True
    assert ctrl["telemetry_age_s"] == 2.5
    assert ctrl["interlocks"] is None and ctrl["run_permitted"] is None and ctrl["fault"] is None
    (port,) = state["ports"]
    assert port["telemetry_stale"] is True
    assert port["emitting"] is None and port["temperature_c"] is None
    assert state_key(fresh, engine, store)[0] != state_key(stale, engine, store)[0]
