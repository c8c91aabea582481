"""Home Assistant MQTT discovery: one retained sensor config per value a dashboard shows.

The configs are built once at start (they depend on the controllers and ports
only) and re-published on every connect and whenever Home Assistant comes online.
The topics published are remembered in a small file beside the records
(`DiscoveryMemory`), so that a config this pbmd no longer publishes (a port or a
controller removed, the device id changed) is cleared with an empty retained
payload, as Home Assistant's MQTT discovery documents for removing an entity.

Checked against Home Assistant's sensor schema (homeassistant/components/sensor):
- a port's delivered energy and fluence are running totals of the current step, back
  to 0 when the next step starts: ``state_class: total_increasing``, whose documented
  semantics read a decrease as a new cycle (a reset), so no ``last_reset`` is needed;
- energy in J has ``device_class: energy`` (J is one of its units from Home Assistant
  2024.10, which added J and kJ; older versions only log that the unit is unexpected),
  and ``energy`` requires ``total`` or ``total_increasing``; fluence (J/cm²) has no
  device class in Home Assistant, so none is claimed;
- the session's and each controller's state are ``device_class: enum`` with their
  ``options``; a controller's state is ``entity_category: diagnostic``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbmd.daemon.core.steps import SessionState
from pbmd.daemon.services.mqtt.config import HomeAssistantConfig
from pbmd.daemon.services.mqtt.link import STATUS_OFFLINE, STATUS_ONLINE
from pbmd.daemon.services.mqtt.payloads import encode
from pbmd.drivers import codec

SESSION_STATES: tuple[str, ...] = tuple(s.value for s in SessionState)
"""The session sensor's options (``idle`` when no session ran since pbmd started)."""
CONTROLLER_STATES: tuple[str, ...] = (
    *(s.name.lower() for s in codec.ControllerState),
    "unknown",
    "disconnected",
)
"""A controller's reported state; ``unknown`` while its telemetry is stale,
``disconnected`` while its link is down."""


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
    options: tuple[str, ...] | None = None
    entity_category: str | None = None


@dataclass(frozen=True, slots=True)
class ControllerIdentity:
    """What the device card shows of a controller (from its INFO)."""

    name: str
    serial: str | None = None
    firmware: str | None = None


def discovery_configs(
    ha: HomeAssistantConfig,
    *,
    device_id: str,
    topics: Topics,
    controllers: Sequence[ControllerIdentity],
    ports: Iterable[int],
    version: str,
) -> dict[str, bytes]:
    """Discovery topic → encoded config; empty when discovery is off."""
    if not ha.enabled:
        return {}
    node = "pbmd_" + re.sub(r"[^A-Za-z0-9_-]", "_", device_id)
    device: dict[str, Any] = {
        "identifiers": [node],
        "name": f"pbmd {device_id}",
        "manufacturer": "pbmd",
        "model": "Photobiomodulation system",
        "sw_version": version,
    }
    serials = [c.serial for c in controllers if c.serial]
    if serials:
        device["serial_number"] = ", ".join(serials)  # the controller(s): the hardware
    firmware = [f"{c.name} firmware {c.firmware}" for c in controllers if c.firmware]
    if firmware:
        device["hw_version"] = ", ".join(firmware)
    out: dict[str, bytes] = {}
    for s in _sensors(topics, [c.name for c in controllers], ports):
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
            "options": list(s.options) if s.options is not None else None,
            "entity_category": s.entity_category,
        }
        config.update({k: v for k, v in optional.items() if v is not None})
        out[f"{ha.discovery_prefix}/sensor/{node}/{s.key}/config"] = encode(config)
    return out


class DiscoveryMemory:
    """The discovery topics published last time, kept in a file, so that the ones no
    longer published can be cleared (an empty retained payload removes the entity)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> set[str]:
        """The topics of the last run; none if the file is missing or unreadable."""
        try:
            topics = json.loads(self.path.read_text(encoding="utf-8"))["topics"]
        except (OSError, ValueError, KeyError, TypeError):
            return set()
        return {t for t in topics if isinstance(t, str)} if isinstance(topics, list) else set()

    def save(self, topics: Iterable[str]) -> None:
        """Replace the file atomically (readers see the old list or the new one)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"topics": sorted(topics)}) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def _sensors(topics: Topics, controllers: Sequence[str], ports: Iterable[int]) -> list[_Sensor]:
    """The session state, each controller's state, and four dose figures per port."""
    sensors: list[_Sensor] = [
        _Sensor(
            "session_state", "Session state", topics.session, "{{ value_json.state }}",
            icon="mdi:clipboard-pulse-outline", attributes_topic=topics.session,
            device_class="enum", options=SESSION_STATES,
        ),
    ]  # fmt: skip
    for i, name in enumerate(controllers):
        suffix = "" if i == 0 else f" {name}"
        c = f"value_json.controllers[{i}]"
        sensors.append(
            _Sensor(
                f"controller_{i}_state" if i else "controller_state",
                f"Controller state{suffix}",
                topics.state,
                f"{{{{ {c}.state if {c}.state is not none else "
                f"('unknown' if {c}.connected else 'disconnected') }}}}",
                icon="mdi:chip",
                device_class="enum",
                options=CONTROLLER_STATES,
                entity_category="diagnostic",
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
                "{{ value_json.fluence_j_cm2 }}", "J/cm²", None, "total_increasing", 3,
                "mdi:sun-wireless",
            ),
            _Sensor(
                f"port{port}_energy", f"Port {port} energy", topic,
                "{{ value_json.energy_j }}", "J", "energy", "total_increasing", 2, "mdi:flash",
            ),
            _Sensor(
                f"port{port}_remaining", f"Port {port} remaining time", topic,
                "{{ value_json.remaining_s }}", "s", "duration", "measurement", 0,
                "mdi:timer-sand",
            ),
        ]  # fmt: skip
    return sensors
