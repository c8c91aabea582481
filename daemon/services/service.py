"""`pbmd run`: the daemon that wires controllers, records, protocols, the engine and the API.

Start order is the order of trust: the records store first (a treatment that
cannot be recorded must not run), then the protocol library, the controller
links (each must answer HELLO and send telemetry), the engine, which closes
any session a crash left open from the controllers' own counters, then the
control socket and the MQTT publisher; only then does systemd hear READY=1.

Stopping (SIGTERM, SIGINT, SIGQUIT, or an internal error at start) runs the
other way: STOPPING=1, a running session is interrupted (ALL_OFF first, the
session closed with its record), every controller gets ALL_OFF and DISARM, the
API says goodbye and removes its socket, the records are flushed and closed.

SIGHUP (`systemctl reload pbmd`) never stops anything: the configuration file
is checked again and what changed is logged and shown in the service status;
nothing of it is applied to a running daemon (a restart applies it), since
controllers, ports and limits cannot change under a session. SIGUSR1 and
SIGUSR2 are logged and ignored rather than left to kill the process.

systemd's STATUS= (`systemctl status pbmd`) follows the daemon: waiting for a
controller, ready or why not, the running session, how the last one ended (its
cause code), a lost controller.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import gc
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pbmd.daemon.core.controllers import PortMap, PortTarget
from pbmd.daemon.core.engine import CommandRefused, Engine, StartRefused
from pbmd.daemon.core.reconciliation import hold_for_counters
from pbmd.daemon.core.safety import AcknowledgementGate
from pbmd.daemon.core.session import EventKind, SessionEvent
from pbmd.daemon.core.status import snapshot
from pbmd.daemon.services import config as cfg
from pbmd.daemon.services import log as daemon_log
from pbmd.daemon.services import scheduling, state_dir
from pbmd.daemon.services.api import (
    JsonRpcServer,
    RoleResolver,
    WatchHub,
    build_registry,
    session_json,
)
from pbmd.daemon.services.api.status import port_json
from pbmd.daemon.services.controller_link import DEVICE_WAIT_EXTEND_S, ControllerLink
from pbmd.daemon.services.courses import CourseService, WallClock
from pbmd.daemon.services.errors import StartupError
from pbmd.daemon.services.loop_monitor import LoopMonitor
from pbmd.daemon.services.records import RecordsError, RecordStore
from pbmd.daemon.services.state_dir import Calibration, write_json_atomic
from pbmd.daemon.services.systemd import Notifier
from pbmd.drivers.client import ClientError
from pbmd.protocols.store import LibraryError, LibraryFault, ProtocolLibrary

if TYPE_CHECKING:
    from pbmd.daemon.services.clinic_db import Replicator

log = structlog.get_logger()

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # as argparse
EXIT_CONFIG = 78  # EX_CONFIG (sysexits.h): systemd does not restart-loop on it by default

VERSION = "0.1.0"
STOP_SESSION_TIMEOUT_S = 10.0

STATUS_REFRESH_S = 1.0
"""How often systemd's STATUS= is looked at again besides the events that change it."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
"""Each ends the daemon the clean way (emission off, records closed, socket removed)."""
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
"""Their default action would kill the daemon uncleanly; they mean nothing to pbmd."""

ConfigLoader = Callable[[], cfg.Config]
"""Reads the configuration again as `pbmd run` did (file and command-line overrides)."""


# --------------------------------------------------------------------------- service


class Service:
    """The running daemon (one per state directory)."""

    def __init__(
        self,
        config: cfg.Config,
        source: str,
        reload_config: ConfigLoader | None = None,
        *,
        clock: WallClock | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self._reload_config = reload_config
        self.config_changed: list[str] = []
        """Keys changed in the file since start (SIGHUP): a restart applies them."""
        self._status_sent = ""
        self._status_queued = False
        self._ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.state_dir = config.resolved_state_dir
        self.socket_path = config.socket_path
        self.device_id = config.resolved_device_id
        self.roles = RoleResolver(config.api.clinician_group, config.api.technician_group)
        self.notifier = Notifier()
        self.links = [ControllerLink(c) for c in config.controllers]
        self.watch_hub = WatchHub(config.api.watch_interval_s)
        self.loop_monitor = LoopMonitor()
        self.started_monotonic = time.monotonic()
        self.warnings: list[str] = []
        self._store: RecordStore | None = None
        self._library: ProtocolLibrary | None = None
        self._engine: Engine | None = None
        self.api: JsonRpcServer | None = None
        self.mqtt: Any = None
        self.clinic_db: Replicator | None = None
        self.calibration = Calibration(config.calibration.due, "configuration")
        self._lock_fd: int | None = None
        self._stop = asyncio.Event()
        self.stop_reason = ""
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconciled: list[str] = []
        self._clock = clock
        self._courses: CourseService | None = None

    # -- parts (set once started)

    @property
    def store(self) -> RecordStore:
        assert self._store is not None, "records store not open"
        return self._store

    @property
    def library(self) -> ProtocolLibrary:
        assert self._library is not None, "protocol library not open"
        return self._library

    @property
    def courses(self) -> CourseService:
        assert self._courses is not None, "records store not open"
        return self._courses

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "engine not started"
        return self._engine

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        cfg_ = self.config
        self._loop = asyncio.get_running_loop()
        for line in cfg_.development:
            self.warnings.append(line)
            log.warning("config.development", setting=line)
        self._lock_fd = state_dir.lock(self.state_dir)
        self.calibration = Calibration.load(self._calibration_file(), self.calibration)
        try:
            self._store = await RecordStore.open(
                cfg_.records_path,
                on_failure=self._records_failed,
                sync_interval_s=cfg_.records.sync_interval_s,
                min_free_bytes=cfg_.records.min_free_mb * 1024 * 1024,
            )
        except RecordsError as exc:
            raise StartupError(str(exc)) from exc
        log.info("records.opened", path=str(cfg_.records_path))
        self._courses = CourseService(
            self.store,
            lambda: self.library,
            lambda: self.engine,
            cfg_.courses,
            cfg_.limits.fluence_ceiling_j_cm2,
            self._clock,
        )
        await asyncio.to_thread(self._open_library)
        for link in self.links:
            # USB and serial controllers not there yet are waited for (controller_link.py)
            waiting = functools.partial(self._waiting_for_controller, link)
            if not await link.open_when_present(
                cfg_.engine.telemetry_hz, self._link_lost, waiting=waiting, stop=self._stop
            ):
                raise StartupError(f"stopped while waiting for controller {link.name}")
        port_map = self._port_map()
        self._engine = Engine(
            port_map,
            self.store,
            telemetry_hz=cfg_.engine.telemetry_hz,
            calibration_due=self.calibration.due,
        )
        self.engine.add_listener(self._on_session_event)
        self._load_service_required()
        self.engine.on_service_required = self._service_required_set
        self._load_acknowledgement()
        self.engine.acknowledgements.on_change = self._acknowledgement_changed
        try:
            self.reconciled = await self.engine.reconcile()
        except (ClientError, RecordsError) as exc:
            raise StartupError(f"reconciling unfinished sessions failed: {exc}") from exc
        if self.reconciled:
            log.warning("sessions.reconciled", sessions=self.reconciled)
        await self._start_api()
        await self._start_mqtt()
        if cfg_.clinic_db is not None and cfg_.clinic_db.enabled:
            # Imported only when configured: the PostgreSQL driver costs start-up time.
            from pbmd.daemon.services.clinic_db import Replicator

            self.clinic_db = Replicator(cfg_.clinic_db, self.store, self.device_id)
            await self.clinic_db.start()
            if self.mqtt is not None:
                self.mqtt.replication_status = self.clinic_db.status
        # Everything loaded so far lives as long as the daemon: take it out of the
        # collector's view, so that a full collection (which runs on the event loop,
        # between two telemetry samples) scans only what was made since, not the
        # whole heap of modules, models and the simulator (tens of ms otherwise).
        gc.collect()
        gc.freeze()
        self.loop_monitor.start()
        if self.notifier.watchdog_s:
            self._spawn(self._watchdog(self.notifier.watchdog_s / 2), "systemd-watchdog")
        self._status_sent = self._status_text()
        self.notifier.send("READY=1", f"STATUS={self._status_sent}")
        self._ready = True
        if self.notifier.enabled:
            self._spawn(self._refresh_status(STATUS_REFRESH_S), "systemd-status")
        log.info(
            "daemon.ready",
            socket=str(self.socket_path),
            state_dir=str(self.state_dir),
            config=self.source,
            controllers=[link.name for link in self.links],
            ports=list(port_map),
            pid=os.getpid(),
        )

    async def _start_api(self) -> None:
        """The control socket, serving the endpoint registry to the roles that may call."""
        missing = self.roles.missing_groups()
        if missing:
            text = (
                f"group(s) {', '.join(missing)} do not exist: only root and the daemon's user "
                "hold those roles (create them, e.g. with systemd-sysusers)"
            )
            self.warnings.append(text)
            log.warning("api.groups_missing", groups=missing)
        registry = build_registry(self)
        api = self.config.api
        self.api = JsonRpcServer(
            registry,
            self.roles,
            self.socket_path,
            socket_mode=int(api.socket_mode, 8),
            max_request_bytes=api.max_request_bytes,
            max_clients=api.max_clients,
            max_clients_per_uid=api.max_clients_per_uid,
            queue_messages=api.send_queue_messages,
            send_timeout_s=api.send_timeout_s,
            requests_per_tick=api.requests_per_tick,
        )
        try:
            await self.api.start()
        except OSError as exc:
            raise StartupError(f"control socket {self.socket_path}: {exc}") from exc

    def _open_library(self) -> None:
        c = self.config.protocols
        try:
            keys = cfg.check_trusted_keys(self.config)
        except Exception as exc:
            raise StartupError(f"trusted protocol keys: {exc}") from exc
        if c.trust_test_key:
            log.warning(
                "protocols.test_key_trusted",
                message="DEVELOPMENT CONFIGURATION: the shipped pbmd TEST protocol key is "
                "trusted. NOT FOR CLINICAL USE.",
            )
        if c.allow_unsigned:
            log.warning(
                "protocols.unsigned_allowed",
                message="DEVELOPMENT CONFIGURATION: unsigned protocol files are accepted. "
                "NOT FOR CLINICAL USE.",
            )
        try:
            self._library = ProtocolLibrary(
                self.config.protocols_dir,
                keys,
                allow_unsigned=c.allow_unsigned,
                limits=self.config.limits,
            )
        except OSError as exc:
            raise StartupError(
                f"protocol library {self.config.protocols_dir}: {exc}; make it writable for "
                "the user pbmd runs as"
            ) from exc
        if c.preload_shipped:
            self._preload_shipped()

    def _preload_shipped(self) -> None:
        from pbmd.protocols.library import protocol_files

        installed = []
        for path in protocol_files():
            try:
                entry = self.library.install(path)
                installed.append(f"{entry.id} v{entry.version}")
            except LibraryError as exc:
                if exc.fault is not LibraryFault.ROLLBACK:
                    log.error("protocols.preload_failed", file=path.name, error=str(exc))
        if installed:
            log.warning(
                "protocols.preloaded",
                protocols=installed,
                message="shipped TEST-signed protocols: NOT FOR CLINICAL USE",
            )

    def _port_map(self) -> PortMap:
        handles = {link.name: link.handle for link in self.links if link.handle is not None}
        targets = self.config.port_targets()
        if targets is None:
            only = next(iter(handles.values()))
            return PortMap.single(only)
        out: dict[int, PortTarget] = {}
        for logical, (name, device_port) in targets.items():
            handle = handles[name]
            if device_port > handle.info.port_count:
                raise StartupError(
                    f'ports.{logical} = "{name}:{device_port}": controller {name} has '
                    f"{handle.info.port_count} ports; correct the [ports] map"
                )
            out[logical] = PortTarget(logical, handle, device_port)
        return PortMap(out)

    async def _start_mqtt(self) -> None:
        raw = self.config.mqtt
        if raw is None:
            return
        if importlib.util.find_spec("pbmd.daemon.services.mqtt") is None:
            text = "an [mqtt] table is configured but this pbmd has no MQTT publisher"
            self.warnings.append(text)
            log.warning("mqtt.unavailable", message=text)
            return
        module = importlib.import_module("pbmd.daemon.services.mqtt")
        model = cfg.mqtt_config_model()
        if model is None:
            return
        mqtt_config = model.model_validate(raw)
        if not getattr(mqtt_config, "enabled", True):
            log.info("mqtt.disabled", message="[mqtt] enabled = false")
            return
        publisher = module.MqttPublisher(
            mqtt_config, store=self.store, engine=self.engine, device_id=self.device_id
        )
        try:
            await publisher.start()
        except Exception as exc:  # MQTT is never on the safety path: log, serve without it
            log.error("mqtt.start_failed", error=str(exc))
            self.warnings.append(f"MQTT publisher failed to start: {exc}")
            return
        self.mqtt = publisher  # the publisher logs mqtt.started itself

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval_s)  # keep-alive cadence

    # ------------------------------------------------------------------ events

    def _records_failed(self, exc: BaseException) -> None:
        log.critical("records.unavailable", error=str(exc))
        if self._engine is not None:
            self._engine.on_records_failure(exc)

    def _on_session_event(self, ev: SessionEvent) -> None:
        # Bind the session (and in a port's task the port and step) to the log context of
        # the task that reports it; the tasks it starts inherit the binding.
        task = asyncio.current_task()
        name = task.get_name() if task is not None else ""
        if (
            ev.kind is EventKind.STATE
            and ev.data.get("to") == "ready"
            and name.startswith("session-")
        ):
            daemon_log.bind(session_id=ev.session_id)
        elif ev.kind is EventKind.STEP_STARTED and name.startswith("port-"):
            daemon_log.bind(session_id=ev.session_id, port=ev.port, step=ev.step)
        elif ev.kind is EventKind.STEP_COMPLETED:
            # session_id, port and step come from the context bound above.
            log.info(
                "step.completed",
                energy_j=ev.data.get("energy_j"),
                controller_energy_j=ev.data.get("controller_energy_j"),
                prescribed_energy_j=ev.data.get("prescribed_energy_j"),
            )
        self.watch_hub.on_event(ev)
        if ev.kind in _STATUS_EVENTS:
            self.status_changed()

    def _waiting_for_controller(self, link: ControllerLink, reason: str, changed: bool) -> None:
        """Start-up waits for a USB or serial controller: say so (log, systemd status)."""
        if changed:
            log.warning(
                "controller.waiting", controller=link.name, link=link.config.link, reason=reason
            )
        self.notifier.send(
            f"STATUS=waiting for controller {link.name}: {reason}",
            f"EXTEND_TIMEOUT_USEC={int(DEVICE_WAIT_EXTEND_S * 1_000_000)}",
        )

    def _link_lost(self, link: ControllerLink, reason: str) -> None:
        if self._stopping:
            return
        link.lost = reason
        log.error("controller.link_lost", controller=link.name, reason=reason)
        self.status_changed()
        self._spawn(self._reconnect(link), f"reconnect-{link.name}")

    async def _reconnect(self, link: ControllerLink) -> None:
        """Reopen a lost link once no session runs; nothing emits until an operator starts."""
        delay_s = 1.0
        while not self._stopping:
            s = self._engine.session if self._engine is not None else None
            if s is not None and not s.closed:
                await s.wait()  # closed: its record written
                if self._engine is not None:  # provisional energy waits for the counters
                    hold_for_counters(s, self._engine.unreconciled)
            await link.close_client()
            try:
                await link.open(self.config.engine.telemetry_hz, self._link_lost)
            except StartupError as exc:
                log.warning(
                    "controller.reconnect_failed",
                    controller=link.name,
                    error=str(exc),
                    retry_s=delay_s,
                )
                await asyncio.sleep(delay_s)  # retry back-off
                delay_s = min(delay_s * 2, 30.0)
                continue
            if self._engine is not None:
                self._engine.port_map = self._port_map()
                if self._engine.unreconciled:
                    # Before anything else may start: a new session's ARM resets the counters.
                    await self._reconcile_after_reconnect()
            log.warning("controller.reconnected", controller=link.name)
            self.status_changed()
            return

    async def _reconcile_after_reconnect(self) -> None:
        """Sessions a restart left open, or a link loss left provisional, wait for their
        controller's counters; read them now."""
        try:
            closed = await self.engine.reconcile()
        except (ClientError, RecordsError) as exc:
            log.error("sessions.reconcile_failed", error=str(exc))
            return
        if closed:
            self.reconciled.extend(closed)
            log.warning("sessions.reconciled", sessions=closed)

    # ------------------------------------------------------------------ systemd status

    def status_changed(self) -> None:
        """Send STATUS= again if it now reads differently; from any thread, coalesced,
        and after the event being handled has finished (never on the safety path)."""
        loop = self._loop
        if not self.notifier.enabled or loop is None or self._status_queued or loop.is_closed():
            return
        self._status_queued = True
        try:
            loop.call_soon_threadsafe(self._send_status)
        except RuntimeError:  # the loop closed meanwhile
            self._status_queued = False

    async def _refresh_status(self, interval_s: float) -> None:
        """Readiness also changes without a session event (the first telemetry sample,
        a calibration date passing, a controller's interlock): look again now and then."""
        while True:
            await asyncio.sleep(interval_s)  # refresh cadence; sends only on a change
            self._send_status()

    def _send_status(self) -> None:
        self._status_queued = False
        if self._stopping or self._engine is None:
            return
        text = self._status_text()
        if text != self._status_sent:
            self._status_sent = text
            self.notifier.send(f"STATUS={text}")

    def _status_text(self) -> str:
        """One line for `systemctl status pbmd`: what runs, how it ended, what is wrong."""
        engine = self.engine
        parts: list[str] = []
        s = engine.session
        if s is not None and not s.state.final:
            parts.append(f"session {s.id[:8]} {s.state.value}")
        else:
            if s is not None:
                ended = f"last session {s.id[:8]} {s.state.value}"
                if s.cause_code is not None and s.state.value != "completed":
                    message = _first_sentence(s.cause_message or "")
                    if message.startswith(s.cause_code):
                        message = message[len(s.cause_code) :].lstrip(" :")
                    ended += f" ({s.cause_code}: {message})" if message else f" ({s.cause_code})"
                parts.append(ended)
            trip = engine.acknowledgements.awaiting
            if trip is not None:
                code = trip.cause.code
                parts.append(f"not ready: acknowledge {code} (pbmctl session acknowledge {code})")
            else:
                try:
                    engine.check_ready()
                    parts.append("ready for a session")
                except StartRefused as exc:
                    parts.append(f"not ready: {_first_sentence(str(exc))}")
        parts += [
            f"controller {link.name} lost: {_first_sentence(link.lost)}"
            for link in self.links
            if link.lost
        ]
        if self.config_changed:
            parts.append(
                f"configuration changed ({', '.join(self.config_changed)}): restart to apply"
            )
        return "; ".join(parts)

    # ------------------------------------------------------------------ reload (SIGHUP)

    def request_reload(self) -> None:
        """SIGHUP: check the configuration file again, off the loop; never a stop."""
        if self._stop.is_set():
            log.info("daemon.reload_ignored", reason="stopping")
            return
        self._spawn(self._reload(), "reload")

    async def _reload(self) -> None:
        # Before READY=1 (still starting, e.g. waiting for a controller) systemd hears
        # nothing of it: READY=1 at its end would announce a daemon that is not ready.
        ready = self._ready
        if ready:
            self.notifier.send("RELOADING=1")
        try:
            if self._reload_config is None:
                log.info("daemon.reloaded", config=self.source, changed=[], applied=[])
                return
            try:
                new = await asyncio.to_thread(self._reload_config)
            except cfg.ConfigError as exc:
                log.error(
                    "daemon.reload_refused",
                    config=self.source,
                    errors=[i.key for i in exc.issues],
                    detail=exc.render(),
                    running="the configuration pbmd started with",
                )
                return
            self.config_changed = config_differences(self.config, new)
            log.info(
                "daemon.reloaded",
                config=self.source,
                changed=self.config_changed,
                applied=[],
                restart_required=bool(self.config_changed),
            )
        finally:
            if ready and not self._stopping:
                # The status may now mention the pending change; READY=1 ends the reload.
                self._status_sent = self._status_text()
                self.notifier.send("READY=1", f"STATUS={self._status_sent}")

    # ------------------------------------------------------------------ run / stop

    def request_stop(self, reason: str) -> None:
        if self._stop.is_set():
            log.warning("daemon.already_stopping", signal=reason)
            return
        self.stop_reason = reason
        log.info("daemon.stop_requested", reason=reason)
        self._stop.set()

    async def wait_stop(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Emission off, session closed with its record, clients told, records flushed."""
        self._stopping = True
        self.notifier.send("STOPPING=1", f"STATUS=stopping ({self.stop_reason or 'requested'})")
        self._loop = None  # no STATUS= after STOPPING=1
        if self.api is not None:
            self.api.stopping = True
        engine = self._engine
        if engine is not None:
            s = engine.session
            if s is not None and not s.state.final:
                log.warning("session.interrupted_by_stop", session_id=s.id)
                try:
                    await asyncio.wait_for(
                        s.interrupt(f"pbmd stopping ({self.stop_reason or 'requested'})"),
                        STOP_SESSION_TIMEOUT_S,
                    )
                except Exception as exc:
                    log.error("session.stop_failed", session_id=s.id, error=repr(exc))
        for link in self.links:
            if link.client is not None and link.client.is_open:
                with contextlib.suppress(Exception):
                    await link.client.all_off(timeout_s=1.0)
                with contextlib.suppress(Exception):
                    await link.client.disarm()
        # Watchers hear how the session ended before the socket closes.
        await self.watch_hub.drain()
        if self.api is not None:
            await self.api.close(f"pbmd is stopping ({self.stop_reason or 'requested'})")
        await self.watch_hub.close()
        if self.mqtt is not None:
            try:
                await self.mqtt.close()
            except Exception as exc:
                log.error("mqtt.close_failed", error=str(exc))
        if self.clinic_db is not None:
            await self.clinic_db.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._engine is not None:
            await self._engine.close()
        await self.loop_monitor.close()
        for link in self.links:
            await link.close()
        if self._store is not None:
            try:
                await self._store.close()
            except RecordsError as exc:
                log.critical("records.close_failed", error=str(exc))
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.notifier.close()
        log.info("daemon.stopped", reason=self.stop_reason)

    # ------------------------------------------------------------------ views

    def status(self, *, full: bool) -> dict[str, Any]:
        engine = self.engine
        try:
            engine.check_ready()
            ready: dict[str, Any] = {"ok": True, "reason": None, "code": None}
        except StartRefused as exc:
            ready = {"ok": False, "reason": str(exc), "code": exc.cause.code if exc.cause else None}
        session = engine.session
        session_status = session_json(session.status() if session is not None else None, full=full)
        store = self.store
        stats = store.stats
        hw = snapshot(engine)
        api = self.api
        return {
            "daemon": {
                "version": VERSION,
                "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
                "config": self.source,
                "device_id": self.device_id,
                "state_dir": str(self.state_dir),
                "socket": str(self.socket_path),
                "development": list(self.config.development),
                "warnings": list(self.warnings),
                "stopping": self._stopping,
                "log_dropped": daemon_log.dropped(),
                "loop": self.loop_monitor.summary(),
            },
            "ready": ready,
            "service_required": engine.service_required,
            "unreconciled": dict(engine.unreconciled),
            "calibration": self.calibration_status(),
            "records": {
                "path": str(store.path),
                "healthy": store.healthy,
                "free_bytes": store.free_bytes,
                "held": stats.held,
                "written": stats.written,
            },
            "controllers": [link.status(hw.controller(link.name)) for link in self.links],
            "ports": [port_json(p) for p in hw.ports],
            "api": {
                "clients": len(api.connections) if api is not None else 0,
                "watchers": self.watch_hub.count,
                **(api.stats.as_dict() if api is not None else {}),
            },
            "mqtt": None if self.mqtt is None else {"enabled": True},
            "replication": None if self.clinic_db is None else self.clinic_db.status(),
            "session": session_status,
        }

    # -- calibration

    def _calibration_file(self) -> Path:
        return self.state_dir / "calibration.json"

    def calibration_status(self) -> dict[str, Any]:
        return self.calibration.status()

    def set_calibration_due(self, due: dt.date, user: str) -> None:
        """Persist first, then apply (worker thread; the engine reads one attribute)."""
        self.calibration = Calibration.save(self._calibration_file(), due, user)
        self.engine.calibration_due = due
        log.info("calibration.set", due=due.isoformat(), user=user)
        self.status_changed()

    # ------------------------------------------------------------- service latch

    def _service_required_file(self) -> Path:
        return self.state_dir / "service-required.json"

    def _load_service_required(self) -> None:
        """A port that stayed lit through ALL_OFF needs service, whatever restarts since."""
        path = self._service_required_file()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            cause = str(data["cause"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable is not cleared: the latch holds until a technician clears it.
            cause = f"{path} is unreadable ({exc}); the last recorded cause is unknown"
        self.engine.service_required = cause
        self.warnings.append(f"SERVICE REQUIRED (latched before this start): {cause}")
        log.critical("service.required", cause=cause, source=str(path))

    def _service_required_set(self, cause: str) -> None:
        """Persist the latch off the safety path (called after ALL_OFF and read-back)."""
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._spawn(asyncio.to_thread(self._write_service_required, cause, now), "service-latch")
        self.status_changed()

    def _write_service_required(self, cause: str, utc: str) -> None:
        path = self._service_required_file()
        try:
            write_json_atomic(path, {"cause": cause, "set_utc": utc})
        except OSError as exc:
            log.critical("service.required_not_persisted", path=str(path), error=str(exc))

    # ------------------------------------------------ trips awaiting acknowledgement

    def _acknowledgement_file(self) -> Path:
        return self.state_dir / "acknowledge-required.json"

    def _load_acknowledgement(self) -> None:
        """A trip that awaited acknowledgement still does after a restart."""
        path = self._acknowledgement_file()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            code, detail = str(data["code"]), str(data.get("detail", ""))
            port = data.get("port")
            session_id = data.get("session_id")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            code, detail, port, session_id = "unknown", f"{path} is unreadable ({exc})", None, None
        gate = self.engine.acknowledgements
        gate.restore(code, detail, port if isinstance(port, int) else None, session_id)
        log.warning("trip.awaits_acknowledgement", code=code, source=str(path))

    def _acknowledgement_changed(self, gate: AcknowledgementGate) -> None:
        trip = gate.awaiting
        data = None
        if trip is not None:
            data = {
                "code": trip.cause.code,
                "detail": trip.detail,
                "port": trip.port,
                "session_id": gate.session_id,
                "utc": trip.utc,
            }
        self._spawn(asyncio.to_thread(self._write_acknowledgement, data), "acknowledgement")
        self.status_changed()

    def _write_acknowledgement(self, data: dict[str, Any] | None) -> None:
        path = self._acknowledgement_file()
        try:
            if data is None:
                path.unlink(missing_ok=True)
            else:
                write_json_atomic(path, data)
        except OSError as exc:
            log.critical("trip.acknowledgement_not_persisted", path=str(path), error=str(exc))

    def clear_service_required(self, user: str, note: str) -> dict[str, Any]:
        """The engine clears the latch once its stored copy is gone (CommandRefused if not)."""

        def forget() -> None:
            try:
                self._service_required_file().unlink(missing_ok=True)
            except OSError as exc:
                raise CommandRefused(f"cannot clear the stored latch: {exc}") from None
            self.warnings[:] = [w for w in self.warnings if not w.startswith("SERVICE REQUIRED")]

        cause = self.engine.clear_service_required(user, note, forget)
        self.status_changed()
        return {"cleared": True, "cause": cause, "user": user, "note": note}


# --------------------------------------------------------------------------- entry point


_STATUS_EVENTS = frozenset(
    {
        EventKind.STATE,
        EventKind.TRIP,
        EventKind.SERVICE_REQUIRED,
        EventKind.LINK_LOST,
        EventKind.PORT_PAUSED,
        EventKind.RESUMED,
    }
)
"""Session events after which systemd's STATUS= may read differently."""


def config_differences(old: cfg.Config, new: cfg.Config) -> list[str]:
    """Keys (dotted, down to a section's keys) whose values differ between two configs."""
    a = old.model_dump(mode="json")
    b = new.model_dump(mode="json")
    changed: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            changed += [f"{key}.{k}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        else:
            changed.append(key)
    return changed


STATUS_SENTENCE_CHARS = 120
"""`systemctl status` shows one line: causes are cut to their first sentence, this long."""


def _first_sentence(text: str) -> str:
    head = text.split(". ", 1)[0].strip()
    if len(head) > STATUS_SENTENCE_CHARS:
        head = head[: STATUS_SENTENCE_CHARS - 1].rstrip() + "…"
    return head


def _signal_ignored(name: str) -> None:
    log.warning("daemon.signal_ignored", signal=name)


async def run_service(
    config: cfg.Config, source: str, reload_config: ConfigLoader | None = None
) -> int:
    """Run until a stop signal; every way out passes through Service.stop()."""
    service = Service(config, source, reload_config)
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, service.request_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, service.request_reload)
    for sig in IGNORED_SIGNALS:
        loop.add_signal_handler(sig, _signal_ignored, sig.name)
    try:
        try:
            await service.start()
        except StartupError as exc:
            log.error("daemon.start_failed", error=str(exc))
            print(f"pbmd: cannot start: {exc}", file=sys.stderr)
            await service.stop()
            return EXIT_FAILED
        except Exception as exc:
            # A fault of pbmd itself: still emission off, records closed, socket removed.
            log.critical("daemon.start_crashed", error=repr(exc), exc_info=True)
            print(f"pbmd: internal error at start: {exc!r}", file=sys.stderr)
            service.stop_reason = "internal error at start"
            await service.stop()
            return EXIT_FAILED
        await service.wait_stop()
        await service.stop()
        return EXIT_OK
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGHUP, *IGNORED_SIGNALS):
            loop.remove_signal_handler(sig)


def _cmd_run(args: argparse.Namespace) -> int:
    def load_config() -> cfg.Config:
        config, source = cfg.load(args.config)
        return cfg.with_overrides(
            config,
            source,
            state_dir=args.state_dir,
            socket_path=args.socket,
            sim_time_scale=args.sim_time_scale,
        )

    source = cfg.DEFAULT_SOURCE if args.config is None else str(args.config)
    try:
        config = load_config()
    except cfg.ConfigError as exc:
        print(f"pbmd: {exc.render()}", file=sys.stderr)
        return EXIT_CONFIG
    daemon_log.configure(
        args.log_level or config.logging.level, args.log_format or config.logging.format
    )
    scheduling.apply(args.realtime)
    try:
        return asyncio.run(run_service(config, source, load_config))
    finally:
        daemon_log.shutdown()


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "default":
        sys.stdout.write(cfg.DEFAULT_TOML)
        return 0
    if args.file is not None and args.config is not None and args.file != args.config:
        print(
            f"pbmd: config {args.config_command}: two files given ({args.file} and --config "
            f"{args.config}); give one, either as FILE or as --config FILE",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        config, source = cfg.load(args.file or args.config)
    except cfg.ConfigError as exc:
        print(f"pbmd: {exc.render()}", file=sys.stderr)
        return EXIT_CONFIG
    if args.config_command == "check":
        print(f"{source}: OK")
        for line in config.development:
            print(f"  development setting: {line}")
        return 0
    sys.stdout.write(f"# effective configuration from {source}\n" + cfg.render_toml(config))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pbmd run` and `pbmd config`."""
    run = subparsers.add_parser(
        "run",
        help="run the daemon in the foreground (systemd runs this)",
        description="Run pbmd in the foreground until SIGTERM or SIGINT. Without --config it "
        "runs the embedded development default: a simulated controller (a child process), state "
        "under the user's state directory. Exit status: 0 stopped cleanly, 1 could not start, "
        "78 configuration error.",
    )
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    run.add_argument("--state-dir", type=Path, metavar="DIR", help="override state_dir")
    run.add_argument("--socket", type=Path, metavar="PATH", help="override api.socket")
    run.add_argument(
        "--sim-time-scale",
        type=float,
        metavar="X",
        help="override the device clock speed-up of simulated controllers (1..120)",
    )
    run.add_argument(
        "--realtime",
        action="store_true",
        help="run under SCHED_FIFO (priority 10) when allowed (root or CAP_SYS_NICE); "
        "otherwise at the nice value it was started with. systemd/pbmd.service sets it itself",
    )
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--log-format", choices=("auto", "json", "console"))
    run.set_defaults(func=_cmd_run)

    conf = subparsers.add_parser("config", help="check or show the configuration")
    sub = conf.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    for name, text in (
        ("check", "check a configuration file and report every error"),
        ("show", "print the effective configuration (defaults filled in)"),
        ("default", "print the embedded default configuration"),
    ):
        p = sub.add_parser(name, help=text)
        if name != "default":
            p.add_argument(
                "file", nargs="?", type=Path, metavar="FILE", help="the configuration file"
            )
            p.add_argument(
                "--config",
                type=Path,
                metavar="FILE",
                help="the same, as `pbmd run` spells it; without either, the embedded default",
            )
        p.set_defaults(func=_cmd_config)
