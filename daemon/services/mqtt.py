"""MQTT telemetry for dashboards (Grafana, Node-RED, Home Assistant, a fleet view).

MQTT is never on the safety path. The engine's session listener only sets a
flag; one sampler task reads ``engine.session.status()`` and the controllers'
latest telemetry at the live rate and hands the results to the publishing
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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import json
import math
import random
import re
import ssl
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pbmd.daemon.services.records import RecordsError, utc_text
from pbmd.drivers import codec

if TYPE_CHECKING:
    from pbmd.daemon.core.engine import Engine
    from pbmd.daemon.services.records import RecordStore

log = structlog.get_logger()

_TOPIC_LEVEL = re.compile(r"^[^/+#\x00]+$")
_TOPIC_PREFIX = re.compile(r"^[^+#\x00]+$")

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"

EVENT_BATCH = 64
"""Outbox rows read at a time."""
EVENT_WINDOW = 16
"""QoS 1 events in flight at once (paho's default in-flight limit is 20)."""
OUTBOX_POLL_S = 5.0
"""Re-read the outbox this often even without a commit notice (a safety net)."""
STATE_MIN_INTERVAL_S = 1.0
"""A ``state`` change of temperatures only is published at most this often."""


# --------------------------------------------------------------------------- configuration


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


# --------------------------------------------------------------------------- helpers


@dataclass(slots=True)
class MqttStats:
    """Counters of the publisher (a snapshot; see MqttPublisher.stats)."""

    connected: bool = False
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    live_published: int = 0
    live_dropped: int = 0
    events_published: int = 0
    events_marked: int = 0
    retained_published: int = 0
    discovery_published: int = 0
    last_error: str | None = None


class LiveBuffer:
    """Latest live samples waiting for the broker; the oldest is dropped when full.

    ``put`` never blocks (the sampler calls it); a slow broker only loses samples
    that a newer one has superseded anyway.
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        self._items: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self._woken = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, topic: str, payload: bytes) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append((topic, payload))
        self._ready.set()

    def clear(self) -> None:
        self._items.clear()
        self._ready.clear()
        self._woken = False

    def wake(self) -> None:
        """Make the next (or a waiting) ``get`` return, None if nothing is buffered."""
        self._woken = True
        self._ready.set()

    async def get(self) -> tuple[str, bytes] | None:
        """The oldest sample, waiting for one; None when woken with nothing buffered."""
        if not self._items and not self._woken:
            self._ready.clear()
            await self._ready.wait()
        self._woken = False
        return self._items.popleft() if self._items else None


def _props(packet_type: int, **values: Any) -> Properties:
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def _clean(value: Any) -> Any:
    """JSON-safe: floats to 6 significant digits, non-finite floats to null."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def encode(payload: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON, compact, keys in a stable order."""
    return json.dumps(
        _clean(payload), ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def _utc(value: float | None) -> str | None:
    return None if value is None else utc_text(value)


def _lower_name(enum_cls: type[Any], code: int) -> str:
    return codec.describe(enum_cls, code).lower()


def _interlocks(bits: int) -> dict[str, bool]:
    return {
        "key_on": bool(bits & codec.Interlock.KEY),
        "remote_closed": bool(bits & codec.Interlock.REMOTE),
        "estop_released": bool(bits & codec.Interlock.ESTOP_RELEASED),
        "footswitch_pressed": bool(bits & codec.Interlock.FOOTSWITCH),
    }


_DOSE_KEYS: tuple[str, ...] = (
    "step", "steps", "site", "label", "wavelength_nm", "mode", "pulse_hz", "setpoint_mw",
    "power_mw", "irradiance_mw_cm2", "energy_j", "controller_energy_j", "fluence_j_cm2",
    "target_kind", "target_energy_j", "target_fluence_j_cm2", "target_time_s", "elapsed_s",
    "remaining_s", "fraction", "temperature_c", "contact",
)  # fmt: skip
_SESSION_PORT_KEYS: tuple[str, ...] = (
    "port", "state", "wait_reason", "step", "steps", "site", "label", "wavelength_nm",
)  # fmt: skip


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


class _Client(aiomqtt.Client):
    """aiomqtt's client, failing a connect at once when the link closes before CONNACK.

    aiomqtt ignores a disconnect that comes before the broker's CONNACK and lets
    the connect wait for its timeout; a broker that rejects the client during
    the TLS 1.3 handshake (no or a wrong client certificate) closes just then.
    """

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if not self._connected.done():
            error = aiomqtt.MqttError(
                f"connection closed before the broker accepted it: {reason_code}"
            )
            self._loop.call_soon_threadsafe(_fail_pending, self._connected, error)
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)


def _fail_pending(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


# --------------------------------------------------------------------------- the publisher


class MqttPublisher:
    """Publishes the engine's state, live dose and recorded events to one broker.

    ``await start()`` returns at once (it never waits for the broker);
    ``await close()`` publishes ``offline`` (retained), flushing pending events
    first, all within ``close_timeout_s``. Close it before the records store.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        store: RecordStore,
        engine: Engine,
        device_id: str,
    ) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.device_id = config.resolved_device_id(device_id)
        self.topic_prefix = config.resolved_prefix(self.device_id)
        self.client_id = config.client_id or f"pbmd-{self.device_id}"
        self.status_topic = f"{self.topic_prefix}/status"
        self.state_topic = f"{self.topic_prefix}/state"
        self.session_topic = f"{self.topic_prefix}/session"
        self.events_topic = f"{self.topic_prefix}/events"
        ha = config.homeassistant
        self.ha_status_topic = f"{ha.discovery_prefix}/status" if ha.enabled else None

        self._stats = MqttStats()
        self._live = LiveBuffer(max(8, 2 * max(len(engine.port_map), 1)))
        self._seq: collections.Counter[str] = collections.Counter()
        # Retained topics: latest payload and the ones not yet sent on this connection.
        self._retained: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._retained_ready = asyncio.Event()
        self._discovery: dict[str, bytes] = {}
        self._state_key: Any = None
        self._state_temperatures: Any = None
        self._state_at = -math.inf
        self._session_value: Any = None
        self._was_emitting: dict[int, tuple[str, Any]] = {}
        # Events: broker-acknowledged but not yet marked in the outbox.
        self._acked_seq = 0
        self._unmarked: list[str] = []
        self._outbox_kick = asyncio.Event()

        self._discovery_due = False

        self._closing = asyncio.Event()
        self._connected = False
        self._link_over = True
        """The current connection's tasks must end (set before they are cancelled)."""
        self._started = False
        self._closed = False
        self._run_task: asyncio.Task[None] | None = None
        self._sampler_task: asyncio.Task[None] | None = None
        self._sample_failures = 0
        self._failures_in_row = 0
        self._connection_listeners: list[Callable[[MqttStats], None]] = []
        self._version = "unknown"

    # ----------------------------------------------------------------- public

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def stats(self) -> MqttStats:
        return replace(self._stats, connected=self._connected, live_dropped=self._live.dropped)

    def add_connection_listener(self, listener: Callable[[MqttStats], None]) -> Callable[[], None]:
        """Call ``listener(stats)`` after every connect, disconnect and failed attempt
        (for status displays and tests); returns a function that removes it."""
        self._connection_listeners.append(listener)

        def remove() -> None:
            if listener in self._connection_listeners:
                self._connection_listeners.remove(listener)

        return remove

    def _notify_connection(self) -> None:
        stats = self.stats
        for listener in list(self._connection_listeners):
            try:
                listener(stats)
            except Exception:
                log.exception("mqtt.connection_listener_failed")

    def status(self) -> dict[str, Any]:
        """JSON-able view for the daemon's status command."""
        return {
            "enabled": self.config.enabled,
            "broker": f"{self.config.host}:{self.config.port}",
            "tls": self.config.tls is not None,
            "topic_prefix": self.topic_prefix,
            "client_id": self.client_id,
            **asdict(self.stats),
        }

    def dose_topic(self, port: int) -> str:
        return f"{self.topic_prefix}/port/{port}/dose"

    async def start(self) -> None:
        """Start the sampler and the connection task; returns without waiting for the broker."""
        if not self.config.enabled:
            log.info("mqtt.disabled")
            return
        if self._started:
            raise RuntimeError("MqttPublisher.start() called twice")
        self._started = True
        self._version = await asyncio.to_thread(_pbmd_version)
        self._discovery = self._discovery_configs()
        self.store.add_commit_listener(self._on_commit)
        self._snapshot(self._session_status(), force=True)
        self._sampler_task = asyncio.create_task(self._sample_loop(), name="mqtt-sampler")
        self._run_task = asyncio.create_task(self._run(), name="mqtt-connection")
        log.info(
            "mqtt.started",
            broker=f"{self.config.host}:{self.config.port}",
            prefix=self.topic_prefix,
            tls=self.config.tls is not None,
        )

    async def close(self) -> None:
        """Publish the final state and ``offline``, flush events, disconnect (bounded)."""
        if not self._started or self._closed:
            return
        self._closed = True
        sampler = self._sampler_task
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        with contextlib.suppress(Exception):
            self._snapshot(self._session_status(), force=False)
        self._closing.set()
        run = self._run_task
        if run is not None:
            done, _ = await asyncio.wait({run}, timeout=self.config.close_timeout_s)
            if not done:
                log.warning("mqtt.close_timeout", timeout_s=self.config.close_timeout_s)
                self._end_link()
                run.cancel()
                done, _ = await asyncio.wait({run}, timeout=self.config.connect_timeout_s)
            if done:
                with contextlib.suppress(asyncio.CancelledError):
                    await run
            else:
                log.error("mqtt.close_stuck", task=run.get_name())
        self._connected = False

    # ----------------------------------------------------------------- hooks (never block)

    def _on_commit(self, _written: int) -> None:
        """The records store committed: new events may be in the outbox."""
        if not self._closed:
            self._outbox_kick.set()

    # ----------------------------------------------------------------- sampling

    async def _sample_loop(self) -> None:
        """Sample the engine at the live rate. Nothing else: no engine callback wakes
        this task, so a burst of session events (a step ending on every port at
        once) never adds publisher work at the moment stops are being timed."""
        loop = asyncio.get_running_loop()
        period_s = 1.0 / self.config.live_rate_hz
        next_s = loop.time() + period_s
        while True:
            await asyncio.sleep(max(next_s - loop.time(), 0.0))  # the sampling cadence
            try:
                status = self._session_status()
                self._sample_dose(status)
                self._snapshot(status, force=False)
            except Exception:
                self._sample_failures += 1
                if self._sample_failures == 1:
                    log.exception("mqtt.sample_failed")
            next_s += period_s
            now_s = loop.time()
            if next_s < now_s:  # the loop was stalled: skip ticks, never burst
                next_s = now_s + period_s

    def _session_status(self) -> dict[str, Any] | None:
        session = self.engine.session
        return None if session is None else session.status()

    def _sample_dose(self, status: Mapping[str, Any] | None) -> None:
        if status is None:
            self._was_emitting.clear()
            return
        session_id = str(status["session_id"])
        emitting_now: dict[int, tuple[str, Any]] = {}
        for ps in status["ports"]:
            port = int(ps["port"])
            emitting = ps.get("state") == "emitting"
            # One closing sample when the step that was emitting is seen dark; a port
            # that already moved on to its next step has its figures in step_completed.
            final = not emitting and self._was_emitting.get(port) == (session_id, ps.get("step"))
            if emitting:
                emitting_now[port] = (session_id, ps.get("step"))
            if (emitting or final) and self._connected:
                topic = self.dose_topic(port)
                payload: dict[str, Any] = {
                    "ts": utc_text(),
                    "seq": self._next_seq(topic),
                    "session_id": session_id,
                    "port": port,
                    "emitting": emitting,
                }
                payload.update({k: ps.get(k) for k in _DOSE_KEYS})
                self._live.put(topic, encode(payload))
        self._was_emitting = emitting_now

    def _snapshot(self, status: Mapping[str, Any] | None, *, force: bool) -> None:
        """Queue ``state`` and ``session`` when they changed. The raw telemetry is
        compared first: the payload is only built when something moved."""
        now_s = asyncio.get_running_loop().time()
        key, temperatures = self._state_key_now()
        if (
            force
            or key != self._state_key
            or (
                temperatures != self._state_temperatures
                and now_s - self._state_at >= STATE_MIN_INTERVAL_S
            )
        ):
            self._state_key, self._state_temperatures, self._state_at = key, temperatures, now_s
            topic = self.state_topic
            state = self._state_payload()
            self._set_retained(topic, {"ts": utc_text(), "seq": self._next_seq(topic), **state})
        session = self._session_payload(status)
        if force or session != self._session_value:
            self._session_value = session
            topic = self.session_topic
            self._set_retained(topic, {"ts": utc_text(), "seq": self._next_seq(topic), **session})

    def _next_seq(self, topic: str) -> int:
        self._seq[topic] += 1
        return self._seq[topic]

    def _set_retained(self, topic: str, payload: Mapping[str, Any]) -> None:
        self._retained[topic] = encode(payload)
        self._dirty.add(topic)
        self._retained_ready.set()

    def _state_key_now(self) -> tuple[Any, Any]:
        """What ``state`` is made of, as cheap tuples: (everything but temperatures,
        temperatures to 0.1 °C)."""
        controllers = []
        for ctrl in self.engine.controllers:
            t = ctrl.telemetry
            raw = None if t is None else (t.state, t.interlocks, t.fault_code)
            controllers.append((ctrl.name, ctrl.client.is_open, raw))
        ports = []
        temperatures = []
        for port, target in self.engine.port_map.items():
            ctrl = target.controller
            info = ctrl.client.ports.get(target.device_port)
            sample = ctrl.sample(target.device_port)
            ports.append(
                (
                    port,
                    None if info is None else (info.applicator_kind, info.applicator_serial),
                    None if sample is None else sample.flags,
                )
            )
            temperatures.append(None if sample is None else round(sample.temp_centi_c / 10))
        key = (
            tuple(controllers),
            tuple(ports),
            self.engine.service_required,
            self.store.healthy,
        )
        return key, tuple(temperatures)

    def _state_payload(self) -> dict[str, Any]:
        """The controller/interlock/fault snapshot."""
        controllers: list[dict[str, Any]] = []
        for ctrl in self.engine.controllers:
            t = ctrl.telemetry
            entry: dict[str, Any] = {"name": ctrl.name, "connected": ctrl.client.is_open}
            with contextlib.suppress(Exception):
                entry["serial"] = ctrl.info.serial
                entry["firmware"] = ctrl.info.firmware
            if t is None:
                entry.update(state=None, interlocks=None, run_permitted=None, fault=None)
            else:
                run = codec.Interlock.run_state()
                entry.update(
                    state=_lower_name(codec.ControllerState, t.state),
                    interlocks=_interlocks(t.interlocks),
                    run_permitted=(t.interlocks & run) == run,
                    fault=_lower_name(codec.FaultCode, t.fault_code),
                    fault_code=t.fault_code,
                )
            controllers.append(entry)
        ports: list[dict[str, Any]] = []
        for port, target in self.engine.port_map.items():
            ctrl = target.controller
            entry = {"port": port, "controller": ctrl.name, "device_port": target.device_port}
            info = ctrl.client.ports.get(target.device_port)
            entry["applicator"] = (
                None
                if info is None or info.applicator_kind == codec.ApplicatorKind.NONE
                else {
                    "kind": _lower_name(codec.ApplicatorKind, info.applicator_kind),
                    "serial": info.applicator_serial,
                    "area_cm2": info.area_mm2 / 100.0,
                    "channels_nm": [c.wavelength_nm for c in info.channels],
                }
            )
            sample = ctrl.sample(target.device_port)
            if sample is None:
                entry.update(
                    applicator_present=None, emitting=None, contact=None, fault=None,
                    temperature_c=None,
                )  # fmt: skip
            else:
                entry.update(
                    applicator_present=sample.applicator_present,
                    emitting=sample.emitting,
                    contact=sample.contact,
                    fault=bool(sample.flags & codec.PortFlag.FAULT),
                    temperature_c=round(sample.temp_centi_c / 100.0, 1),
                )
            ports.append(entry)
        return {
            "controllers": controllers,
            "ports": ports,
            "service_required": self.engine.service_required,
            "records_healthy": self.store.healthy,
        }

    def _session_payload(self, st: Mapping[str, Any] | None) -> dict[str, Any]:
        if st is None:
            return {
                "session_id": None, "state": "idle", "protocol_id": None,
                "protocol_version": None, "plan_hash": None, "started_utc": None,
                "ended_utc": None, "cause_code": None, "cause_message": None, "trip": None,
                "ports": [],
            }  # fmt: skip
        # Never the patient reference: dashboards are not the clinical record.
        return {
            "session_id": st["session_id"],
            "state": st["state"],
            "protocol_id": st["protocol_id"],
            "protocol_version": st["protocol_version"],
            "plan_hash": st["plan_hash"],
            "started_utc": _utc(st["started_utc"]),
            "ended_utc": _utc(st["ended_utc"]),
            "cause_code": st["cause_code"],
            "cause_message": st["cause_message"],
            "trip": st["trip"],
            "ports": [{k: p.get(k) for k in _SESSION_PORT_KEYS} for p in st["ports"]],
        }

    # ----------------------------------------------------------------- Home Assistant

    def _discovery_configs(self) -> dict[str, bytes]:
        ha = self.config.homeassistant
        if not ha.enabled:
            return {}
        node = "pbmd_" + re.sub(r"[^A-Za-z0-9_-]", "_", self.device_id)
        sensors: list[_Sensor] = [
            _Sensor(
                "session_state", "Session state", self.session_topic, "{{ value_json.state }}",
                icon="mdi:clipboard-pulse-outline", attributes_topic=self.session_topic,
            ),
        ]  # fmt: skip
        for i, ctrl in enumerate(self.engine.controllers):
            suffix = "" if i == 0 else f" {ctrl.name}"
            sensors.append(
                _Sensor(
                    f"controller_{i}_state" if i else "controller_state",
                    f"Controller state{suffix}",
                    self.state_topic,
                    f"{{{{ value_json.controllers[{i}].state }}}}",
                    icon="mdi:chip",
                )
            )
        for port in self.engine.port_map:
            topic = self.dose_topic(port)
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
        device = {
            "identifiers": [node],
            "name": f"pbmd {self.device_id}",
            "manufacturer": "pbmd",
            "model": "Photobiomodulation system",
            "sw_version": self._version,
        }
        out: dict[str, bytes] = {}
        for s in sensors:
            config: dict[str, Any] = {
                "name": s.name,
                "unique_id": f"{node}_{s.key}",
                "state_topic": s.topic,
                "value_template": s.template,
                "availability_topic": self.status_topic,
                "payload_available": STATUS_ONLINE,
                "payload_not_available": STATUS_OFFLINE,
                "device": device,
                "origin": {"name": "pbmd", "sw_version": self._version},
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

    # ----------------------------------------------------------------- connection

    async def _run(self) -> None:
        attempt = 0
        while not self._closing.is_set():
            try:
                client = await self._make_client()
            except (OSError, ValueError, ssl.SSLError) as exc:
                self._note_failure(f"configuration: {exc}")
            else:
                connects = self._stats.connects
                try:
                    async with client:
                        attempt = 0
                        await self._serve(client)
                except aiomqtt.MqttError as exc:
                    if self._stats.connects > connects:
                        self._connected = False
                        self._stats.disconnects += 1
                        self._stats.last_error = str(exc)
                        log.warning("mqtt.disconnected", error=str(exc))
                        self._notify_connection()
                    else:
                        self._note_failure(str(exc))
                except Exception as exc:  # a bug here must not end telemetry for good
                    log.exception("mqtt.connection_failed")
                    self._note_failure(f"{type(exc).__name__}: {exc}")
                finally:
                    self._connected = False
                    await _reap(client)
            if self._closing.is_set():
                break
            delay_s = self._backoff_s(attempt)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._closing.wait()

    def _backoff_s(self, attempt: int) -> float:
        """Exponential backoff with jitter: uniform in [d/2, d], d doubling up to the max."""
        cfg = self.config
        ceiling = min(cfg.reconnect_max_s, cfg.reconnect_min_s * 2.0 ** min(attempt, 30))
        return random.uniform(ceiling / 2.0, ceiling)

    def _note_failure(self, error: str) -> None:
        self._stats.connect_failures += 1
        self._stats.last_error = error
        self._failures_in_row += 1
        level = log.warning if self._failures_in_row <= 3 else log.debug
        level("mqtt.connect_failed", error=error, failures_in_row=self._failures_in_row)
        self._notify_connection()

    async def _make_client(self) -> aiomqtt.Client:
        cfg = self.config
        password: str | None = None
        if cfg.password_file is not None:
            text = await asyncio.to_thread(cfg.password_file.read_text, encoding="utf-8")
            password = text.rstrip("\r\n")
        tls_params: aiomqtt.TLSParameters | None = None
        if cfg.tls is not None:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        will = aiomqtt.Will(
            self.status_topic,
            STATUS_OFFLINE,
            qos=1,
            retain=True,
            properties=_props(PacketTypes.WILLMESSAGE, UserProperty=("reason", "connection lost")),
        )
        client = _Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s,
            tls_params=tls_params,
            tls_insecure=cfg.tls.insecure if cfg.tls is not None and cfg.tls.insecure else None,
        )
        # A full event window plus live and retained publications is normal here.
        client.pending_calls_threshold = EVENT_WINDOW + 16
        return client

    async def _serve(self, client: aiomqtt.Client) -> None:
        """One connection: announce, then run the publishing tasks until it drops or we close."""
        self._connected = True
        self._stats.connects += 1
        self._failures_in_row = 0
        log.info("mqtt.connected", broker=f"{self.config.host}:{self.config.port}")
        self._notify_connection()
        await self._publish_status(client, STATUS_ONLINE, "connected")
        if self.ha_status_topic is not None:
            await client.subscribe(self.ha_status_topic, qos=1)
        self._dirty = set(self._retained)
        self._discovery_due = True
        self._retained_ready.set()
        self._live.clear()
        self._link_over = False
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._until_over(self._read(client)), name="mqtt-read"),
                    group.create_task(
                        self._until_over(self._send_retained(client)), name="mqtt-retained"
                    ),
                    group.create_task(self._until_over(self._send_live(client)), name="mqtt-live"),
                    group.create_task(
                        self._until_over(self._send_events(client)), name="mqtt-events"
                    ),
                ]
                await self._closing.wait()
                self._end_link()
                for task in tasks:
                    task.cancel()
        except BaseExceptionGroup as group_error:
            raise _first_mqtt_error(group_error) from None
        finally:
            self._end_link()
            self._connected = False
        await self._shutdown(client)

    async def _until_over(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one of a connection's tasks; when any of them ends, all of them end.

        Cancellation alone is not enough: on Python 3.11, asyncio.wait_for (which
        aiomqtt awaits acknowledgements with) can swallow a cancellation that races
        with the acknowledgement, so every loop also checks ``_link_over``.
        """
        try:
            await work
        finally:
            self._end_link()

    def _end_link(self) -> None:
        self._link_over = True
        self._retained_ready.set()
        self._live.wake()
        self._outbox_kick.set()

    async def _shutdown(self, client: aiomqtt.Client) -> None:
        """Clean shutdown: last retained values, pending events, then ``offline``."""
        budget_s = self.config.close_timeout_s * 0.6
        with contextlib.suppress(TimeoutError, RecordsError):
            async with asyncio.timeout(budget_s):
                await self._flush_retained(client)
                while await self._drain_events(client):
                    pass
        await self._publish_status(
            client, STATUS_OFFLINE, "shutdown", timeout_s=self.config.close_timeout_s * 0.3
        )

    async def _publish_status(
        self, client: aiomqtt.Client, status: str, reason: str, timeout_s: float | None = None
    ) -> None:
        props = _props(PacketTypes.PUBLISH, UserProperty=("reason", reason))
        await client.publish(
            self.status_topic, status, qos=1, retain=True, properties=props, timeout=timeout_s
        )

    async def _read(self, client: aiomqtt.Client) -> None:
        """Incoming messages (Home Assistant's birth message); ends when the link drops."""
        async for message in client.messages:
            if self._link_over:
                return
            if (
                self.ha_status_topic is not None
                and message.topic.matches(self.ha_status_topic)
                and not message.retain
                and message.payload == STATUS_ONLINE.encode()
            ):
                log.info("mqtt.homeassistant_online")
                self._discovery_due = True
                self._retained_ready.set()

    async def _send_retained(self, client: aiomqtt.Client) -> None:
        while not self._link_over:
            await self._retained_ready.wait()
            self._retained_ready.clear()
            if self._link_over:
                return
            await self._flush_retained(client)

    async def _flush_retained(self, client: aiomqtt.Client) -> None:
        props = _props(
            PacketTypes.PUBLISH, ContentType="application/json", PayloadFormatIndicator=1
        )
        if self._discovery_due:
            self._discovery_due = False
            for topic, payload in self._discovery.items():
                await client.publish(topic, payload, qos=1, retain=True, properties=props)
                self._stats.discovery_published += 1
        while self._dirty:
            topic = min(self._dirty)  # deterministic order: session before state
            self._dirty.discard(topic)
            await client.publish(topic, self._retained[topic], qos=1, retain=True, properties=props)
            self._stats.retained_published += 1

    async def _send_live(self, client: aiomqtt.Client) -> None:
        props = _props(
            PacketTypes.PUBLISH,
            MessageExpiryInterval=self.config.live_expiry_s,
            ContentType="application/json",
            PayloadFormatIndicator=1,
        )
        while not self._link_over:
            item = await self._live.get()
            if item is None or self._link_over:
                continue
            await client.publish(item[0], item[1], qos=0, properties=props)
            self._stats.live_published += 1

    # ----------------------------------------------------------------- events (the outbox)

    async def _send_events(self, client: aiomqtt.Client) -> None:
        while not self._link_over:
            self._outbox_kick.clear()
            try:
                published = await self._drain_events(client)
            except RecordsError as exc:
                log.warning("mqtt.outbox_unavailable", error=str(exc))
                published = 0
            if published or self._link_over:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OUTBOX_POLL_S):
                    await self._outbox_kick.wait()

    async def _drain_events(self, client: aiomqtt.Client) -> int:
        """Publish one batch of pending outbox events in order; returns how many."""
        await self._mark_acked()
        rows = [
            r
            for r in await self.store.outbox_pending(EVENT_BATCH)
            if int(r["outbox_seq"]) > self._acked_seq
        ]
        for start in range(0, len(rows), EVENT_WINDOW):
            await self._publish_window(client, rows[start : start + EVENT_WINDOW])
        await self._mark_acked()
        return len(rows)

    async def _publish_window(
        self, client: aiomqtt.Client, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Publish up to EVENT_WINDOW events at once (paho sends them in order); the
        acknowledged prefix is remembered even when the connection drops mid-window."""
        tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as group:
                for row in rows:
                    tasks.append(group.create_task(self._publish_event(client, row)))
        finally:
            for task, row in zip(tasks, rows, strict=False):
                if not task.done() or task.cancelled() or task.exception() is not None:
                    break
                self._acked_seq = int(row["outbox_seq"])
                self._unmarked.append(str(row["id"]))
                self._stats.events_published += 1

    async def _publish_event(self, client: aiomqtt.Client, row: Mapping[str, Any]) -> None:
        event_id = str(row["id"])
        payload = {
            "ts": row["utc"],
            "seq": int(row["outbox_seq"]),
            "id": event_id,
            "kind": row["kind"],
            "code": row["code"],
            "severity": row["severity"],
            "message": row["message"],
            "session_id": row["session_id"],
            "port": row["port"],
            "device_time_us": row["device_time_us"],
            "data": row["data"],
        }
        props = _props(
            PacketTypes.PUBLISH,
            ContentType="application/json",
            PayloadFormatIndicator=1,
            CorrelationData=event_id.encode("ascii"),
            UserProperty=("event_id", event_id),
        )
        await client.publish(self.events_topic, encode(payload), qos=1, properties=props)

    async def _mark_acked(self) -> None:
        if not self._unmarked:
            return
        ids = list(self._unmarked)
        await self.store.outbox_mark_published(ids)
        del self._unmarked[: len(ids)]
        self._stats.events_marked += len(ids)


def _first_mqtt_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The MqttError that ended a connection's tasks, else the group itself."""
    for exc in _leaves(group):
        if isinstance(exc, aiomqtt.MqttError):
            return exc
    return group


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


async def _reap(client: aiomqtt.Client) -> None:
    """aiomqtt cancels its keepalive task from the socket-close callback; wait for it so
    that nothing of a connection outlives it."""
    task: asyncio.Task[None] | None = getattr(client, "_misc_task", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _pbmd_version() -> str:
    try:
        return importlib.metadata.version("pbmd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__all__ = [
    "HomeAssistantConfig",
    "LiveBuffer",
    "MqttConfig",
    "MqttPublisher",
    "MqttStats",
    "MqttTls",
    "encode",
]
