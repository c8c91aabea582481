"""One emission's state, and the garbage-collector guards that keep stops on time.

An :class:`Emission` is one EMIT_START … STOPPED on one port. A cyclic GC pause
landing on a stop is dose: :data:`GC_HOLD` keeps the collector off while any stop
is imminent, and :data:`GC_QUIET` keeps it to what a running session allocates.
"""

from __future__ import annotations

import asyncio
import gc

from pbmd.drivers import codec


class Emission:
    """State of one EMIT_START … STOPPED on one port."""

    def __init__(
        self,
        number: int,
        request: codec.EmitStart,
        start_host_s: float,
        start_device_us: float,
        energy_before_uj: float,
    ) -> None:
        self.number = number
        self.request = request
        self.start_host_s = start_host_s
        self.start_device_us = start_device_us
        """Device time the emission began (estimated from the EMIT_START round trip)."""
        self.energy_before_uj = energy_before_uj
        self.samples = 0
        self.deviation_since_us: int | None = None
        self.stop_at_host_s: float | None = None
        self.stop_kind = "dose reached"
        self.stop_due = asyncio.Event()
        self.ended_by_device: int | None = None  # stop reason when the controller ended it
        self.ended = asyncio.Event()
        self.stop_requested = False
        self.seen_emitting = False
        self.acked = False
        self.tail_taken = False
        """The first sample showing the port stopped (its mean holds the end of the
        light) has been integrated; later samples belong to no emission."""
        self.timer: asyncio.TimerHandle | None = None
        self.last_progress_host_s = start_host_s
        self._gc_held = False

    def hold_gc(self) -> None:
        """The stop is imminent: no cyclic-GC pause until it has been sent."""
        if not self._gc_held:
            self._gc_held = True
            GC_HOLD.acquire()

    def release_gc(self) -> None:
        if self._gc_held:
            self._gc_held = False
            GC_HOLD.release()


class _GcHold:
    """Keeps Python's cyclic garbage collector from running while any stop is
    imminent (counted over every port). A full collection can pause the event
    loop for tens of milliseconds; landing on a stop, that is dose (at ×60
    simulation, seconds of it). Held from the moment a stop is scheduled (at most
    a few telemetry periods ahead) until its EMIT_STOP has been answered; the
    collector then runs at its next allocation threshold as usual."""

    def __init__(self) -> None:
        self._holders = 0
        self._reenable = False

    def acquire(self) -> None:
        if self._holders == 0:
            self._reenable = gc.isenabled()
            gc.disable()
        self._holders += 1

    def release(self) -> None:
        self._holders = max(self._holders - 1, 0)
        if self._holders == 0 and self._reenable:
            self._reenable = False
            gc.enable()


GC_HOLD = _GcHold()


class _GcQuiet:
    """While a session runs, the cyclic collector looks only at what the session
    allocates: everything older is collected once and frozen at its start (before
    arming), and unfrozen at its end. A full collection over a large heap (a
    long-running daemon, or a test process) would otherwise pause the event loop
    for longer than the telemetry staleness limit."""

    def __init__(self) -> None:
        self._sessions = 0

    def session_starting(self) -> None:
        if self._sessions == 0:
            gc.collect()
            gc.freeze()
        self._sessions += 1

    def session_ended(self) -> None:
        self._sessions = max(self._sessions - 1, 0)
        if self._sessions == 0:
            gc.unfreeze()


GC_QUIET = _GcQuiet()
