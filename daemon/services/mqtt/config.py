"""The publisher's configuration: the ``[mqtt]`` section of the daemon's config.

The device id and the topic prefixes become MQTT topic levels, so they are
checked here, where a mistake is reported with the key that holds it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_TOPIC_LEVEL = re.compile(r"^[^/+#\x00]+$")
_TOPIC_PREFIX = re.compile(r"^[^+#\x00]+$")


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MqttTls(_Config):
    """TLS to the broker. With no CA file the system's trusted CAs verify the broker."""

    ca_file: Path | None = None
    cert_file: Path | None = Field(default=None, description="Client certificate (PEM).")
    key_file: Path | None = Field(default=None, description="Client certificate's key (PEM).")
    insecure: bool = Field(
        default=False,
        description="Skip the check that the broker's certificate names `host` "
        "(the chain is still verified). For test rigs only.",
    )

    @model_validator(mode="after")
    def _cert_and_key(self) -> MqttTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: set both cert_file and key_file for a client certificate")
        return self


class HomeAssistantConfig(_Config):
    """Home Assistant MQTT discovery."""

    enabled: bool = True
    discovery_prefix: str = "homeassistant"

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _check_prefix(value, "homeassistant.discovery_prefix")


class MqttConfig(_Config):
    """The publisher's configuration (the ``[mqtt]`` section of the daemon's config)."""

    enabled: bool = Field(
        default=True, description="An [mqtt] table turns the publisher on; false keeps it off."
    )
    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535, description="8883 is usual with TLS.")
    tls: MqttTls | None = None
    username: str | None = None
    password_file: Path | None = Field(
        default=None,
        description="File holding the password (one line); read at every connect, so a "
        "rotated password is picked up without a restart.",
    )
    client_id: str | None = Field(default=None, description='Default "pbmd-<device_id>".')
    device_id: str | None = Field(
        default=None, description="Overrides the device id the daemon passes in."
    )
    topic_prefix: str | None = Field(default=None, description='Default "pbm/v1/<device_id>".')
    live_rate_hz: float = Field(default=10.0, gt=0, le=50)
    live_expiry_s: int = Field(
        default=2, ge=1, le=3600, description="MQTT v5 message expiry of live dose samples."
    )
    keepalive_s: int = Field(default=30, ge=5, le=65535)
    connect_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Bound on a connect and on a QoS 1 ack."
    )
    reconnect_min_s: float = Field(default=0.5, gt=0, le=3600)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    close_timeout_s: float = Field(
        default=3.0, gt=0, le=60, description="Bound on the flush at shutdown."
    )
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    patient_ids: Literal["omit", "hash"] = Field(
        default="omit",
        description='Patient identifiers on MQTT: "omit" (none, the default) or "hash" (a '
        "keyed hash, HMAC-SHA256 with patient_hash_key_file, so that one dashboard can tell "
        "a patient's sessions apart without learning who it is).",
    )
    patient_hash_key_file: Path | None = Field(
        default=None,
        description='The clinic\'s secret key of patient_ids = "hash" (at least 16 bytes); '
        "without the key nobody can test a guessed identifier against the hash.",
    )

    @field_validator("device_id")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        return None if value is None else _check_level(value, "device_id")

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str | None) -> str | None:
        return None if value is None else _check_prefix(value, "topic_prefix")

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        if self.patient_ids == "hash" and self.patient_hash_key_file is None:
            raise ValueError(
                'patient_ids = "hash" needs patient_hash_key_file (a file holding the '
                'clinic\'s secret key); or set patient_ids = "omit"'
            )
        return self

    def resolved_device_id(self, default: str) -> str:
        return self.device_id or _check_level(default, "device_id")

    def resolved_prefix(self, device_id: str) -> str:
        return self.topic_prefix or f"pbm/v1/{device_id}"


def _check_level(value: str, what: str) -> str:
    if not _TOPIC_LEVEL.match(value):
        raise ValueError(f"{what} {value!r} must be one MQTT topic level: no '/', '+', '#'")
    return value


def _check_prefix(value: str, what: str) -> str:
    if not _TOPIC_PREFIX.match(value) or value.startswith("/") or value.endswith("/"):
        raise ValueError(
            f"{what} {value!r} must be a topic without wildcards ('+', '#') and without a "
            "leading or trailing '/'"
        )
    if "" in value.split("/"):
        raise ValueError(f"{what} {value!r} has an empty topic level ('//')")
    return value


__all__ = ["HomeAssistantConfig", "MqttConfig", "MqttTls"]
