"""Home Assistant MQTT discovery: one retained sensor config per value a dashboard shows.

The configs are built once at start (they depend on the controllers and ports
only) and re-published on every connect and whenever Home Assistant comes online.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pbmd.daemon.services.mqtt.config import HomeAssistantConfig
from pbmd.daemon.services.mqtt.link import STATUS_OFFLINE, STATUS_ONLINE
from pbmd.daemon.services.mqtt.payloads import encode


@dataclass(frozen=True, slots=True)
class Topics:
    """The publisher's topics under its prefix."""

    prefix: str
    status: str
    state: str
    session: str
    events: str

    @classmethod
    def under(cls, prefix: str) -> Topics:
        return cls(
            prefix, *(f"{prefix}/{name}" for name in ("status", "state", "session", "events"))
        )

    def dose(self, port: int) -> str:
        return f"{self.prefix}/port/{port}/dose"


@dataclass(frozen=True, slots=True)
class _Sensor:
    key: str
    name: str
    topic: str
    template: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    precision: int | None = None
    icon: str | None = None
    attributes_topic: str | None = None


def discovery_configs(
    ha: HomeAssistantConfig,
    *,
    device_id: str,
    topics: Topics,
    controllers: Iterable[str],
    ports: Iterable[int],
    version: str,
) -> dict[str, bytes]:
    """Discovery topic → encoded config; empty when discovery is off."""
    if not ha.enabled:
        return {}
    node = "pbmd_" + re.sub(r"[^A-Za-z0-9_-]", "_", device_id)
    device = {
        "identifiers": [node],
        "name": f"pbmd {device_id}",
        "manufacturer": "pbmd",
        "model": "Photobiomodulation system",
        "sw_version": version,
    }
    out: dict[str, bytes] = {}
    for s in _sensors(topics, controllers, ports):
        config: dict[str, Any] = {
            "name": s.name,
            "unique_id": f"{node}_{s.key}",
            "state_topic": s.topic,
            "value_template": s.template,
            "availability_topic": topics.status,
            "payload_available": STATUS_ONLINE,
            "payload_not_available": STATUS_OFFLINE,
            "device": device,
            "origin": {"name": "pbmd", "sw_version": version},
        }
        optional = {
            "unit_of_measurement": s.unit,
            "device_class": s.device_class,
            "state_class": s.state_class,
            "suggested_display_precision": s.precision,
            "icon": s.icon,
            "json_attributes_topic": s.attributes_topic,
        }
        config.update({k: v for k, v in optional.items() if v is not None})
        out[f"{ha.discovery_prefix}/sensor/{node}/{s.key}/config"] = encode(config)
    return out


def _sensors(topics: Topics, controllers: Iterable[str], ports: Iterable[int]) -> list[_Sensor]:
    """The session state, each controller's state, and four dose figures per port."""
    sensors: list[_Sensor] = [
        _Sensor(
            "session_state", "Session state", topics.session, "{{ value_json.state }}",
            icon="mdi:clipboard-pulse-outline", attributes_topic=topics.session,
        ),
    ]  # fmt: skip
    for i, name in enumerate(controllers):
        suffix = "" if i == 0 else f" {name}"
        sensors.append(
            _Sensor(
                f"controller_{i}_state" if i else "controller_state",
                f"Controller state{suffix}",
                topics.state,
                f"{{{{ value_json.controllers[{i}].state }}}}",
                icon="mdi:chip",
            )
        )
    for port in ports:
        topic = topics.dose(port)
        sensors += [
            _Sensor(
                f"port{port}_irradiance", f"Port {port} irradiance", topic,
                "{{ value_json.irradiance_mw_cm2 }}", "mW/cm²", None, "measurement", 1,
                "mdi:white-balance-sunny",
            ),
            _Sensor(
                f"port{port}_fluence", f"Port {port} fluence", topic,
                "{{ value_json.fluence_j_cm2 }}", "J/cm²", None, "measurement", 3,
                "mdi:sun-wireless",
            ),
            _Sensor(
                f"port{port}_energy", f"Port {port} energy", topic,
                "{{ value_json.energy_j }}", "J", None, "measurement", 2, "mdi:flash",
            ),
            _Sensor(
                f"port{port}_remaining", f"Port {port} remaining time", topic,
                "{{ value_json.remaining_s }}", "s", "duration", "measurement", 0,
                "mdi:timer-sand",
            ),
        ]  # fmt: skip
    return sensors
