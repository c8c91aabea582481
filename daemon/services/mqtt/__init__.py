"""MQTT telemetry for dashboards (Grafana, Node-RED, Home Assistant, a fleet view).

MQTT is never on the safety path. The engine's session listener only sets a
flag; one sampler task reads the core's typed status (``Session.status()`` and
``daemon.core.status.snapshot``, never the drivers) at the live rate and hands
the results to the publishing
tasks through bounded buffers. A slow or absent broker therefore cannot delay
a trip, a step or a record:

- live dose samples go into a small drop-oldest buffer (QoS 0, with a message
  expiry, so a late sample is never shown as current);
- retained topics (``status``, ``state``, ``session``, Home Assistant
  discovery) keep only their latest value and are re-published on every
  connect;
- events are never dropped: they are read from the records outbox (written in
  the same transaction as the event), published with QoS 1 in outbox order and
  marked published only after the broker acknowledged them, so an outage or a
  daemon restart replays them in order (a subscriber de-duplicates by ``id``).

The connection is retried with exponential backoff and jitter; the daemon
starts and treats with the broker down. See docs/mqtt.md for every topic.

Where each part lives:

- ``config``: the ``[mqtt]`` section (MqttConfig, MqttTls, HomeAssistantConfig);
- ``publisher``: MqttPublisher, its sampler, connection life cycle and outbox drain;
- ``state``: the ``state`` payload, the one place MQTT reads the controllers;
- ``payloads``: the ``session``, dose and event payloads and their JSON encoding;
- ``discovery``: the topic names and Home Assistant discovery configs;
- ``link``: one broker connection (client, last will, clean-up);
- ``buffers``: the publisher's counters and live-sample buffer.
"""

from pbmd.daemon.services.mqtt.buffers import LiveBuffer, MqttStats
from pbmd.daemon.services.mqtt.config import HomeAssistantConfig, MqttConfig, MqttTls
from pbmd.daemon.services.mqtt.link import _Client
from pbmd.daemon.services.mqtt.payloads import encode
from pbmd.daemon.services.mqtt.publisher import MqttPublisher

__all__ = [
    "HomeAssistantConfig",
    "LiveBuffer",
    "MqttConfig",
    "MqttPublisher",
    "MqttStats",
    "MqttTls",
    "_Client",
    "encode",
]
