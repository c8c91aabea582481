"""The publisher: samples the engine, keeps the retained topics, drains the outbox.

See the package's docstring for why nothing here can delay the safety path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import ssl
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes

from pbmd.daemon.core.status import SessionStatus, snapshot
from pbmd.daemon.core.steps import PortState
from pbmd.daemon.services.mqtt.buffers import LiveBuffer, MqttStats
from pbmd.daemon.services.mqtt.config import MqttConfig
from pbmd.daemon.services.mqtt.discovery import (
    ControllerIdentity,
    DiscoveryMemory,
    Topics,
    discovery_configs,
)
from pbmd.daemon.services.mqtt.link import (
    STATUS_OFFLINE,
    STATUS_ONLINE,
    _first_mqtt_error,
    _props,
    _reap,
    make_client,
    pbmd_version,
)
from pbmd.daemon.services.mqtt.payloads import (
    dose_payload,
    encode,
    event_payload,
    session_payload,
)
from pbmd.daemon.services.mqtt.state import state_key, state_payload
from pbmd.daemon.services.records import RecordsError, utc_text
from pbmd.drivers.listeners import Listeners

if TYPE_CHECKING:
    from pbmd.daemon.core.controllers import ControllerHandle
    from pbmd.daemon.core.engine import Engine
    from pbmd.daemon.services.records import RecordStore

log = structlog.get_logger()

EVENT_BATCH = 64
"""Outbox rows read at a time."""
EVENT_WINDOW = 16
"""QoS 1 events in flight at once (paho's default in-flight limit is 20)."""
OUTBOX_POLL_S = 5.0
"""Re-read the outbox this often even without a commit notice (a safety net)."""
STATE_MIN_INTERVAL_S = 1.0
"""A ``state`` change of temperatures only is published at most this often."""


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
        self.patient_key = _patient_key(config)
        self.replication_status: Callable[[], Mapping[str, Any]] | None = None
        """The clinic database replicator's status (the ``replication`` object of
        ``state``); set by the service when ``[clinic_db]`` is configured."""
        self.device_id = config.resolved_device_id(device_id)
        self.topic_prefix = config.resolved_prefix(self.device_id)
        self.client_id = config.client_id or f"pbmd-{self.device_id}"
        self.topics = Topics.under(self.topic_prefix)
        self.status_topic = self.topics.status
        self.state_topic = self.topics.state
        self.session_topic = self.topics.session
        self.events_topic = self.topics.events
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
        self._discovery_memory: DiscoveryMemory | None = None
        """The discovery topics published last time, in a file beside the records."""
        self._stale_discovery: set[str] = set()
        """Discovery topics published by an earlier run and not by this one: cleared."""
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
        self._connection_listeners: Listeners[MqttStats] = Listeners("mqtt connection", log=log)
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
        return self._connection_listeners.add(listener)

    def _notify_connection(self) -> None:
        self._connection_listeners(self.stats)

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
        return self.topics.dose(port)

    async def start(self) -> None:
        """Start the sampler and the connection task; returns without waiting for the broker."""
        if not self.config.enabled:
            log.info("mqtt.disabled")
            return
        if self._started:
            raise RuntimeError("MqttPublisher.start() called twice")
        self._started = True
        self._version = await asyncio.to_thread(pbmd_version)
        self._discovery = self._discovery_configs()
        self._discovery_memory = DiscoveryMemory(self.store.path.with_name("mqtt-discovery.json"))
        previous = await asyncio.to_thread(self._discovery_memory.load)
        self._stale_discovery = previous - set(self._discovery)
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

    def _session_status(self) -> SessionStatus | None:
        session = self.engine.session
        return None if session is None else session.status()

    def _sample_dose(self, status: SessionStatus | None) -> None:
        if status is None:
            self._was_emitting.clear()
            return
        session_id = status.session_id
        emitting_now: dict[int, tuple[str, Any]] = {}
        for ps in status.ports:
            port = ps.port
            emitting = ps.state is PortState.EMITTING
            step = None if ps.step is None else ps.step.step
            # One closing sample when the step that was emitting is seen dark; a port
            # that already moved on to its next step has its figures in step_completed.
            final = not emitting and self._was_emitting.get(port) == (session_id, step)
            if emitting:
                emitting_now[port] = (session_id, step)
            if (emitting or final) and self._connected:
                topic = self.dose_topic(port)
                payload = dose_payload(
                    ps, session_id=session_id, port=port, emitting=emitting,
                    seq=self._next_seq(topic),
                )  # fmt: skip
                self._live.put(topic, encode(payload))
        self._was_emitting = emitting_now

    def _snapshot(self, status: SessionStatus | None, *, force: bool) -> None:
        """Queue ``state`` and ``session`` when they changed. The raw telemetry is
        compared first: the payload is only built when something moved."""
        now_s = asyncio.get_running_loop().time()
        hw = snapshot(self.engine)
        key, temperatures = state_key(hw, self.engine, self.store)
        replication = None if self.replication_status is None else self.replication_status()
        if replication is not None:
            caught_up = replication.get("behind_rows") == 0
            key = (key, replication.get("state"), replication.get("reason"), caught_up)
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
            state = state_payload(hw, self.engine, self.store)
            if replication is not None:
                state["replication"] = dict(replication)
            self._set_retained(topic, {"ts": utc_text(), "seq": self._next_seq(topic), **state})
        session = session_payload(status, self.patient_key)
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

    # ----------------------------------------------------------------- Home Assistant

    def _discovery_configs(self) -> dict[str, bytes]:
        return discovery_configs(
            self.config.homeassistant,
            device_id=self.device_id,
            topics=self.topics,
            controllers=[_identity(ctrl) for ctrl in self.engine.controllers],
            ports=list(self.engine.port_map),
            version=self._version,
        )

    async def _publish_discovery(self, client: aiomqtt.Client, props: Any) -> None:
        """Clear what an earlier run published and this one does not (an empty retained
        payload), remember this run's configs for the next run, then publish them (so a
        run that stops half-way still leaves the next one the list to clear)."""
        for topic in sorted(self._stale_discovery):
            await client.publish(topic, b"", qos=1, retain=True)
            self._stats.discovery_published += 1
        if self._stale_discovery:
            log.info("mqtt.discovery_cleared", topics=sorted(self._stale_discovery))
            self._stale_discovery = set()
        if self._discovery_memory is not None:
            try:
                await asyncio.to_thread(self._discovery_memory.save, self._discovery)
            except OSError as exc:  # only the next run's clean-up is at stake
                log.warning("mqtt.discovery_not_remembered", error=str(exc))
        for topic, payload in self._discovery.items():
            await client.publish(topic, payload, qos=1, retain=True, properties=props)
            self._stats.discovery_published += 1

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
        return await make_client(
            self.config,
            status_topic=self.status_topic,
            client_id=self.client_id,
            # A full event window plus live and retained publications is normal here.
            pending_calls_threshold=EVENT_WINDOW + 16,
        )

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
            await self._publish_discovery(client, props)
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
        props = _props(
            PacketTypes.PUBLISH,
            ContentType="application/json",
            PayloadFormatIndicator=1,
            CorrelationData=event_id.encode("ascii"),
            UserProperty=("event_id", event_id),
        )
        await client.publish(
            self.events_topic, encode(event_payload(row, self.patient_key)), qos=1, properties=props
        )

    async def _mark_acked(self) -> None:
        if not self._unmarked:
            return
        ids = list(self._unmarked)
        await self.store.outbox_mark_published(ids)
        del self._unmarked[: len(ids)]
        self._stats.events_marked += len(ids)


def _identity(ctrl: ControllerHandle) -> ControllerIdentity:
    """A controller's name, and its serial and firmware once it has said them (INFO)."""
    try:
        info = ctrl.info
    except Exception:  # not connected yet: the card shows the name only
        return ControllerIdentity(ctrl.name)
    return ControllerIdentity(ctrl.name, info.serial or None, info.firmware or None)


def _patient_key(config: MqttConfig) -> bytes | None:
    """The clinic's key of hashed patient identifiers; None publishes none. A key that
    cannot be read publishes none either (logged): identifiers are never sent in clear."""
    if config.patient_ids != "hash" or config.patient_hash_key_file is None:
        return None
    try:
        key = config.patient_hash_key_file.read_bytes().strip()
    except OSError as exc:
        log.error(
            "mqtt.patient_key_unreadable",
            path=str(config.patient_hash_key_file),
            error=str(exc),
            effect="patient identifiers omitted",
        )
        return None
    if len(key) < 16:
        log.error(
            "mqtt.patient_key_too_short",
            path=str(config.patient_hash_key_file),
            effect="patient identifiers omitted",
        )
        return None
    return key
