"""Controllers as the engine sees them: a client plus what its telemetry says.

A :class:`ControllerHandle` follows one controller's telemetry (latest sample,
device-clock mapping, which ports emit) so that every decision reads back what
the device reports rather than trusting an ACK. A :class:`PortMap` maps the
daemon's logical ports 1..4 onto (controller, port) pairs (ICD §1: a system may
have several controllers).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import structlog

from pbmd.daemon.core.dose import DeviceClock
from pbmd.drivers import codec
from pbmd.drivers.client import ClientError, ControllerClient
from pbmd.protocols.limits import limit

log = structlog.get_logger()

CLOCK_SETTLE_S = 0.6
"""Telemetry and PONGs over this long give the device clock's rate (a simulator's
time scale) to well under 1 %; stops are not timed from a guessed rate."""

DARK_POWER_UW = int(limit("dark_power_uw"))
"""Measured power above this on a port the controller reports idle is light that
should not be there (a stuck emitter); from the limits registry."""

CLOCK_RATE_TOLERANCE = limit("clock_rate_tolerance")
"""The device clock's rate counts as measured once the mapping's rate agrees with
the one telemetry shows this closely (limits registry)."""

SampleListener = Callable[[codec.Telemetry, float], None]
"""Called with each TELEMETRY and the host monotonic time it arrived."""


class ControllerHandle:
    """One controller: its client, the last telemetry, and read-back helpers."""

    def __init__(self, name: str, client: ControllerClient) -> None:
        self.name = name
        self.client = client
        self.clock = DeviceClock()
        self.telemetry: codec.Telemetry | None = None
        self.telemetry_host_s: float | None = None
        self.telemetry_count = 0
        self._first_telemetry: tuple[float, int] | None = None
        self.interlocks: int | None = None
        """Latest interlock bits, from telemetry or an INTERLOCK_CHANGED event."""
        # Not a Listeners[T]: a sample listener takes two arguments (the sample and
        # the host time it arrived, stamped once for all of them), on the hot path.
        self._sample_listeners: list[SampleListener] = []
        self._next_sample: asyncio.Future[codec.Telemetry] | None = None
        self._unsubscribe = [
            client.add_telemetry_listener(self._on_telemetry),
            client.add_event_listener(self._on_event),
            client.add_pong_listener(
                lambda p: self.clock.observe_pong(p[0], p[1], p[2].device_time_us)
            ),
        ]
        self.stop_lead_s = 0.0
        """Learned lateness of host stops (wall s), subtracted from the next stop time."""
        self._lateness_s: deque[float] = deque(maxlen=9)
        self._port_reads: dict[int, asyncio.Task[None]] = {}
        self._unreadable: dict[int, str] = {}
        self.unplugged: set[int] = set()
        """Device ports whose applicator was removed while connected (APPLICATOR_CHANGED 0)
        and not plugged in again."""

    def detach(self) -> None:
        for undo in self._unsubscribe:
            undo()
        self._unsubscribe.clear()
        for task in self._port_reads.values():
            task.cancel()
        self._port_reads.clear()

    @property
    def info(self) -> codec.Info:
        return self.client.info

    def learn_stop_lateness(self, late_s: float) -> None:
        """Fold one measured stop lateness into the lead.

        `late_s` is how late the last stop landed with the current lead; the lead
        that would have made it exact is lead + late. Lateness is skewed: the
        systematic part (sending, the link) is always there, scheduling delays
        on a loaded host only ever add to it and cannot be predicted. So the
        lower quartile of the recent ones is used: a burst of delayed stops
        does not move the next stops early. Bounded to ±5 ms."""
        self._lateness_s.append(self.stop_lead_s + late_s)
        ordered = sorted(self._lateness_s)
        lead = ordered[(len(ordered) - 1) // 4]
        self.stop_lead_s = min(max(lead, -0.005), 0.005)

    def add_sample_listener(self, listener: SampleListener) -> Callable[[], None]:
        self._sample_listeners.append(listener)

        def remove() -> None:
            if listener in self._sample_listeners:
                self._sample_listeners.remove(listener)

        return remove

    def _on_telemetry(self, t: codec.Telemetry) -> None:
        now = time.monotonic()
        first = self._first_telemetry
        if first is None or t.device_time_us < first[1]:
            self._first_telemetry = (now, t.device_time_us)
        self.clock.observe(now, t.device_time_us)
        self.telemetry = t
        self.telemetry_host_s = now
        self.interlocks = t.interlocks
        self.telemetry_count += 1
        for listener in list(self._sample_listeners):
            try:
                listener(t, now)
            except Exception:
                # A listener's bug must not stop the others (the supervisor among them).
                log.exception("telemetry.listener_failed", controller=self.name)
        fut = self._next_sample
        if fut is not None and not fut.done():
            fut.set_result(t)
        self._next_sample = None

    @property
    def clock_settled(self) -> bool:
        """The device clock's rate has been measured (not assumed): the mapping's
        rate agrees within CLOCK_RATE_TOLERANCE with the one telemetry shows over
        CLOCK_SETTLE_S."""
        first = self._first_telemetry
        last = self.telemetry
        if first is None or last is None or self.telemetry_host_s is None:
            return False
        span_s = self.telemetry_host_s - first[0]
        if span_s < CLOCK_SETTLE_S:
            return False
        rate = (last.device_time_us - first[1]) / 1e6 / span_s
        return rate > 0 and abs(self.clock.ratio / rate - 1.0) < CLOCK_RATE_TOLERANCE

    async def wait_clock_settled(self, timeout_s: float) -> None:
        """Return once `clock_settled`; TimeoutError if telemetry does not come."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.clock_settled:
            await self.next_sample(max(deadline - loop.time(), 0.0))

    def _on_event(self, ev: codec.Event) -> None:
        # Registered before any session's listener, so a session reading
        # `interlocks` while handling the same event sees the new bits.
        if ev.code == codec.EventCode.INTERLOCK_CHANGED:
            self.interlocks = ev.value
        elif ev.code == codec.EventCode.APPLICATOR_CHANGED:
            self._reread_port(ev.port, removed=ev.value == 0)

    # -- applicators (ICD §6: GET_PORT again after every APPLICATOR_CHANGED)

    def _reread_port(self, port: int, *, removed: bool) -> None:
        """The applicator on `port` changed: read its PORT_INFO again (the client keeps
        it in ``client.ports``, which status, readiness, plans and records read)."""
        if removed:
            self.unplugged.add(port)
        else:
            self.unplugged.discard(port)
        old = self._port_reads.pop(port, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(
            self._read_port(port), name=f"port-info-{self.name}-{port}"
        )
        self._port_reads[port] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._port_reads.get(port) is t:
                del self._port_reads[port]

        task.add_done_callback(done)

    async def _read_port(self, port: int) -> None:
        try:
            info = await self.client.get_port(port)
        except ClientError as exc:
            self._unreadable[port] = str(exc)
            log.error(
                "applicator.port_info_failed", controller=self.name, port=port, error=str(exc)
            )
            return
        self._unreadable.pop(port, None)
        log.info(
            "applicator.changed",
            controller=self.name,
            port=port,
            kind=codec.describe(codec.ApplicatorKind, info.applicator_kind),
            serial=info.applicator_serial,
        )

    def applicator_problem(self, port: int) -> str | None:
        """Why what is known of `port`'s applicator cannot be trusted now, or None."""
        if port in self._port_reads:
            return "its applicator changed and its PORT_INFO is being read again"
        if port in self._unreadable:
            return (
                f"its applicator changed and its PORT_INFO could not be read "
                f"({self._unreadable[port]})"
            )
        if port in self.unplugged:
            return "its applicator was unplugged; plug it in again"
        return None

    async def applicators_read(self) -> None:
        """Wait until every PORT_INFO asked for after an APPLICATOR_CHANGED has come."""
        while self._port_reads:
            await asyncio.gather(*self._port_reads.values(), return_exceptions=True)

    async def next_sample(self, timeout_s: float) -> codec.Telemetry:
        """The next TELEMETRY to arrive; TimeoutError if none within `timeout_s`.

        Frames arrive in the order the controller sent them, so a sample that
        arrives after a reply was produced after that reply: it shows the
        state the request left behind.
        """
        if self._next_sample is None or self._next_sample.done():
            self._next_sample = asyncio.get_running_loop().create_future()
        # asyncio.timeout, not wait_for: in Python 3.11 wait_for can drop a
        # cancellation that arrives as the sample does, and a session's work is
        # stopped by cancelling it.
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(self._next_sample)

    async def sample_until(
        self, timeout_s: float, settled: Callable[[codec.Telemetry], bool]
    ) -> codec.Telemetry | None:
        """Read samples until one is `settled` or `timeout_s` has passed: that sample,
        else the last one read, None if none arrived. The read-backs after a stop
        (every port dark, one port dark) are this loop with their own test."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last: codec.Telemetry | None = None
        while (left := deadline - loop.time()) > 0:
            try:
                last = await self.next_sample(left)
            except TimeoutError:
                break
            if settled(last):
                break
        return last

    def emitting_ports(self) -> set[int]:
        t = self.telemetry
        if t is None:
            return set()
        return {i + 1 for i, p in enumerate(t.ports) if p.emitting}

    def sample(self, port: int) -> codec.PortSample | None:
        t = self.telemetry
        if t is None or not 1 <= port <= len(t.ports):
            return None
        return t.ports[port - 1]

    # -- the supervisor's view (safety.ControllerPort)

    async def all_off(self) -> None:
        await self.client.all_off()

    async def disarm(self) -> None:
        await self.client.disarm()

    def lit_ports(self, dark_power_uw: int = DARK_POWER_UW) -> set[int]:
        """Ports the latest sample shows emitting or with light on the photodiode."""
        t = self.telemetry
        if t is None:
            return set()
        return {i + 1 for i, p in enumerate(t.ports) if port_lit(p, dark_power_uw)}

    async def wait_dark(self, timeout_s: float, dark_power_uw: int = DARK_POWER_UW) -> bool | None:
        """Read back that every port is dark: True, False (still lit), None (cannot tell).

        Dark means the controller reports no port emitting *and* no photodiode
        sees light: a stuck emitter keeps shining after the controller has
        marked its port stopped (ICD §5a: measured power is the photodiode's).
        A sample's power is the mean over its interval, so the first sample
        after a stop may still carry the tail of the light; samples are read
        until one is dark or `timeout_s` has passed. Without telemetry the
        controller is asked port by port (COUNTERS shows emission, not light);
        without a link nothing can be read back (None).
        """

        def dark(t: codec.Telemetry) -> bool:
            return not any(port_lit(p, dark_power_uw) for p in t.ports)

        last = await self.sample_until(timeout_s, dark)
        if last is not None:
            return dark(last)
        if not self.client.is_open:
            return None
        try:
            for port in range(1, self.info.port_count + 1):
                counters = await self.client.get_counters(port)
                if counters.emitting:
                    return False
        except ClientError:
            return None
        return True


_EMITTING = int(codec.PortFlag.EMITTING)


def port_lit(sample: codec.PortSample, dark_power_uw: int = DARK_POWER_UW) -> bool:
    """The controller reports the port emitting, or its photodiode sees light."""
    # Plain int arithmetic: this runs for every port of every sample.
    return bool(sample.flags & _EMITTING) or sample.measured_power_uw > dark_power_uw


@dataclass(frozen=True)
class PortTarget:
    """Where a logical port's light comes from."""

    logical_port: int
    controller: ControllerHandle
    device_port: int

    @property
    def applicator(self) -> codec.PortInfo:
        return self.controller.client.ports[self.device_port]


class PortMap(Mapping[int, PortTarget]):
    """Logical ports 1..n → (controller, device port)."""

    def __init__(self, targets: Mapping[int, PortTarget]) -> None:
        self._targets = dict(sorted(targets.items()))

    @classmethod
    def single(cls, controller: ControllerHandle) -> PortMap:
        """Every port of one controller, numbered as the controller numbers them."""
        return cls(
            {p: PortTarget(p, controller, p) for p in range(1, controller.info.port_count + 1)}
        )

    def __getitem__(self, port: int) -> PortTarget:
        return self._targets[port]

    def __iter__(self) -> Iterator[int]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def controllers(self) -> list[ControllerHandle]:
        seen: dict[str, ControllerHandle] = {}
        for t in self._targets.values():
            seen.setdefault(t.controller.name, t.controller)
        return list(seen.values())

    def applicators(self) -> dict[int, codec.PortInfo]:
        """PORT_INFO of every logical port, renumbered to the logical port."""
        out: dict[int, codec.PortInfo] = {}
        for port, t in self._targets.items():
            info = t.applicator
            out[port] = codec.PortInfo(
                port, info.applicator_kind, info.applicator_serial, info.area_mm2, info.channels
            )
        return out
