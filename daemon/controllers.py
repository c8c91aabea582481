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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import structlog

from pbmd.daemon.dose import DeviceClock
from pbmd.drivers import codec
from pbmd.drivers.client import ControllerClient

log = structlog.get_logger()

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
        self._sample_listeners: list[SampleListener] = []
        self._next_sample: asyncio.Future[codec.Telemetry] | None = None
        self._unsubscribe = [
            client.add_telemetry_listener(self._on_telemetry),
            client.add_pong_listener(
                lambda p: self.clock.observe_pong(p[0], p[1], p[2].device_time_us)
            ),
        ]
        self.stop_lead_s = 0.0
        """Learned lateness of host stops (wall s), subtracted from the next stop time."""

    def detach(self) -> None:
        for undo in self._unsubscribe:
            undo()
        self._unsubscribe.clear()

    @property
    def info(self) -> codec.Info:
        return self.client.info

    def learn_stop_lateness(self, late_s: float) -> None:
        """Fold one measured stop lateness into the lead (bounded, slow to move)."""
        self.stop_lead_s = min(max(self.stop_lead_s + 0.3 * late_s, -0.005), 0.02)

    def add_sample_listener(self, listener: SampleListener) -> Callable[[], None]:
        self._sample_listeners.append(listener)

        def remove() -> None:
            if listener in self._sample_listeners:
                self._sample_listeners.remove(listener)

        return remove

    def _on_telemetry(self, t: codec.Telemetry) -> None:
        now = time.monotonic()
        self.clock.observe(now, t.device_time_us)
        self.telemetry = t
        self.telemetry_host_s = now
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

    async def next_sample(self, timeout_s: float) -> codec.Telemetry:
        """The next TELEMETRY to arrive; TimeoutError if none within `timeout_s`.

        Frames arrive in the order the controller sent them, so a sample that
        arrives after a reply was produced after that reply: it shows the
        state the request left behind.
        """
        if self._next_sample is None or self._next_sample.done():
            self._next_sample = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(asyncio.shield(self._next_sample), timeout_s)

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

    async def wait_dark(self, timeout_s: float) -> bool:
        """Read back that no port emits: next telemetry, else GET_COUNTERS per port."""
        try:
            t = await self.next_sample(timeout_s)
            return not any(p.emitting for p in t.ports)
        except TimeoutError:
            pass
        # Telemetry is not arriving: ask each port directly.
        for port in range(1, self.info.port_count + 1):
            counters = await self.client.get_counters(port)
            if counters.emitting:
                return False
        return True


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
