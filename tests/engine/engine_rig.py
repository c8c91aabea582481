"""The engine tests' rig: hw_sim in process over TCP, a real client, the engine, a store.

Everything runs over the real byte protocol. The rig also taps both ends of the
wire inside the simulator, with event-loop times (the loop clock is
time.monotonic, the same clock the supervisor stamps trips with):

- ``rig.rx``: every host frame the simulated controller received and acted on
  (ALL_OFF "on the wire" is an ALL_OFF here);
- ``rig.tx``: every frame the controller produced (telemetry, events, replies),
  and ``rig.device_events``: every EVENT the firmware raised, even with no host;
- ``rig.host_telemetry``: telemetry as it reached the host, stamped before the
  engine saw it.

Tests wait on these (and on session events) with timeouts as failure bounds,
never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from fixtures.protocols import pad_step as pad_step
from fixtures.protocols import probe_step as probe_step
from fixtures.protocols import protocol as protocol
from fixtures.simulator import DEFAULT_LINK, connect, start_simulator

from pbmd.daemon.core.controllers import ControllerHandle, PortMap
from pbmd.daemon.core.engine import Engine, SessionRequest
from pbmd.daemon.core.safety import SafetyLimits
from pbmd.daemon.core.session import Session, SessionEvent
from pbmd.daemon.services.records import RecordStore
from pbmd.drivers import codec
from pbmd.drivers.client import ControllerClient
from pbmd.hw_sim import SimConfig, Simulator
from pbmd.protocols.limits import DEFAULT_LIMITS, Limits
from pbmd.protocols.loader import LoadedProtocol, parse_protocol
from pbmd.protocols.plan import Plan, plan

T = TypeVar("T")


class Log(Generic[T]):
    """An append-only, time-stamped log that tests can wait on."""

    def __init__(self) -> None:
        self.items: list[tuple[float, T]] = []
        self._waiters: list[tuple[Callable[[T], bool], asyncio.Future[tuple[float, T]]]] = []

    def add(self, item: T, at: float | None = None) -> None:
        stamp = time.monotonic() if at is None else at
        self.items.append((stamp, item))
        for waiter in list(self._waiters):
            pred, fut = waiter
            if not fut.done() and pred(item):
                fut.set_result((stamp, item))
                self._waiters.remove(waiter)

    def find(
        self, pred: Callable[[T], bool], after: float = float("-inf")
    ) -> tuple[float, T] | None:
        for stamp, item in self.items:
            if stamp >= after and pred(item):
                return stamp, item
        return None

    async def wait(
        self, pred: Callable[[T], bool], timeout_s: float, after: float = float("-inf")
    ) -> tuple[float, T]:
        """The first item (at or after `after`) matching `pred`; TimeoutError if none comes."""
        found = self.find(pred, after)
        if found is not None:
            return found
        fut: asyncio.Future[tuple[float, T]] = asyncio.get_running_loop().create_future()
        waiter = (pred, fut)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


def is_msg(cls: type[codec.Message]) -> Callable[[Any], bool]:
    return lambda m: isinstance(m, cls)


@dataclass
class Rig:
    """A simulator, a client, a store and an engine; closed in reverse order."""

    tmp_path: Path
    time_scale: float = 30.0
    """×30, and default steps of 20–30 s of device time: a host stop that lands a
    few ms late on a loaded test machine is tens of ms of device time, and the
    controller's energy budget (prescription + 5 %) must stay the backstop, not
    the stop (E404), as it is at ×1 where 5 % of such a step is a second."""
    ports: Mapping[int, str | None] | None = None
    telemetry_hz: int = 50
    seed: int = 1
    limits: SafetyLimits | None = None
    calibration_due: Any = None
    today: Callable[[], Any] | None = None
    sync_interval_s: float = 1.0
    auto_confirm: bool = True
    link: str = DEFAULT_LINK
    """"tcp" (socket://), "pty" (the simulator's pseudo-terminal, opened like a serial port)
    or "usb" (the simulated USB bus); default "tcp", or $PBMD_TEST_LINK."""
    sim: Simulator = field(init=False)
    client: ControllerClient = field(init=False)
    handle: ControllerHandle = field(init=False)
    port_map: PortMap = field(init=False)
    store: RecordStore = field(init=False)
    engine: Engine = field(init=False)
    url: str = field(init=False)
    rx: Log[codec.Message] = field(init=False, default_factory=Log)
    tx: Log[tuple[str, codec.Message]] = field(init=False, default_factory=Log)
    device_events: Log[codec.Event] = field(init=False, default_factory=Log)
    host_telemetry: Log[codec.Telemetry] = field(init=False, default_factory=Log)
    events: Log[SessionEvent] = field(init=False, default_factory=Log)
    reply_timeouts: Log[Exception] = field(init=False, default_factory=Log)
    session: Session | None = field(init=False, default=None)
    records_failures: Log[BaseException] = field(init=False, default_factory=Log)

    async def __aenter__(self) -> Rig:
        ports = dict(self.ports) if self.ports is not None else None
        cfg = SimConfig(time_scale=self.time_scale, seed=self.seed)
        if ports is not None:
            cfg.ports = ports
        self.sim = await start_simulator(cfg)
        self._tap_simulator()
        try:
            self.url, self.client = await connect(
                self.sim, telemetry_hz=self.telemetry_hz, link=self.link
            )
            # Registered before the handle's: stamps a sample before the engine acts on it.
            self.client.add_telemetry_listener(self.host_telemetry.add)
            self.client.add_reply_timeout_listener(self.reply_timeouts.add)
            self.handle = ControllerHandle("main", self.client)
            self.port_map = PortMap.single(self.handle)
            self.store = await RecordStore.open(
                self.tmp_path / "records.sqlite3",
                sync_interval_s=self.sync_interval_s,
                min_free_bytes=0,
            )
            kw: dict[str, Any] = {}
            if self.today is not None:
                kw["today"] = self.today
            self.engine = Engine(
                self.port_map,
                self.store,
                limits=self.limits,
                telemetry_hz=self.telemetry_hz,
                calibration_due=self.calibration_due,
                **kw,
            )
            self.engine.add_listener(self._on_event)
            on_failure = self.store.on_failure
            assert on_failure is not None

            def failed(exc: BaseException) -> None:
                self.records_failures.add(exc)
                on_failure(exc)

            self.store.on_failure = failed
            await self.handle.next_sample(2.0)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        s = self.session
        if s is not None and not s.state.final:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.abort("test ended"), 5.0)
        if hasattr(self, "engine"):
            await self.engine.close()
        if hasattr(self, "store"):
            with contextlib.suppress(Exception):
                await self.store.close()
        if hasattr(self, "handle"):
            self.handle.detach()
        if hasattr(self, "client"):
            await self.client.close()
        await self.sim.close()
        # The engine holds the cyclic GC off around imminent stops and freezes the
        # heap during a session: nothing of that may outlive the sessions.
        assert gc.isenabled(), "the engine left the garbage collector disabled"
        assert gc.get_freeze_count() == 0, "the engine left the heap frozen"

    # ---------------------------------------------------------------- taps

    def _tap_simulator(self) -> None:
        ctl = self.sim.controller
        handle_frame = ctl.handle_frame
        rx = self.rx

        def tapped_handle(frame: codec.Frame) -> None:
            try:
                msg = frame.message()
            except codec.CodecError:
                msg = None
            if msg is not None:
                rx.add(msg)
            handle_frame(frame)

        ctl.handle_frame = tapped_handle  # type: ignore[method-assign]
        send = self.sim._send
        tx = self.tx

        def tapped_send(msg: codec.Message, seq: int, kind: str) -> None:
            tx.add((kind, msg))
            send(msg, seq, kind)

        self.sim._send = tapped_send  # type: ignore[method-assign]
        event = ctl._event
        dev_events = self.device_events

        def tapped_event(port: int, code: codec.EventCode, value: int) -> None:
            event(port, code, value)
            dev_events.add(ctl._events[-1])

        ctl._event = tapped_event  # type: ignore[method-assign]

    def _on_event(self, ev: SessionEvent) -> None:
        self.events.add(ev)
        if self.auto_confirm and ev.kind == "port_waiting" and "confirm placement" in ev.message:
            port = ev.port
            assert port is not None
            asyncio.get_running_loop().call_soon(self._confirm, port)

    def _confirm(self, port: int) -> None:
        s = self.session
        if s is not None and not s.state.final:
            with contextlib.suppress(Exception):
                s.confirm(port)

    # ------------------------------------------------------------ sessions

    def plan(self, text: str, limits: Limits = DEFAULT_LIMITS) -> tuple[Plan, LoadedProtocol]:
        loaded = parse_protocol(text, limits=limits)
        return plan(loaded.protocol, self.port_map.applicators(), limits), loaded

    async def start(
        self,
        the_plan: Plan,
        loaded: LoadedProtocol | None = None,
        *,
        contraindications: Mapping[str, bool] | None = None,
        ports: tuple[int, ...] | None = None,
    ) -> Session:
        request = SessionRequest(
            plan=the_plan,
            patient_ref="P-TEST",
            contraindications=dict(contraindications or {}),
            ports=ports,
            signing_key_id="TEST",
            operator="tester",
            contraindicated_by_protocol=frozenset(
                c.value for c in (loaded.protocol.contraindications if loaded else ())
            ),
        )
        self.session = await self.engine.start_session(request)
        return self.session

    async def wait_event(
        self, pred: Callable[[SessionEvent], bool], timeout_s: float, after: float = float("-inf")
    ) -> tuple[float, SessionEvent]:
        return await self.events.wait(pred, timeout_s, after)

    async def emitting(self, port: int, timeout_s: float = 5.0) -> float:
        """Wait until the current session started an emission on `port`; its host time."""
        assert self.session is not None
        sid = self.session.id
        stamp, _ = await self.wait_event(
            lambda e: e.kind == "emission_started" and e.port == port and e.session_id == sid,
            timeout_s,
        )
        return stamp

    async def all_off_at(self, after: float, timeout_s: float = 5.0) -> float:
        """Time the controller received the first ALL_OFF at or after `after`."""
        stamp, _ = await self.rx.wait(is_msg(codec.AllOff), timeout_s, after)
        return stamp

    async def records(self, session_id: str) -> dict[str, Any]:
        await self.store.sync()
        row = await self.store.get_session(session_id)
        assert row is not None
        return row

    def snapshot(self) -> dict[str, Any]:
        return self.sim.snapshot()

    async def next_samples(self, n: int, timeout_s: float = 2.0) -> codec.Telemetry:
        """Let `n` more telemetry samples arrive at the host; the last of them."""
        t = None
        for _ in range(n):
            t = await self.handle.next_sample(timeout_s)
        assert t is not None
        return t
