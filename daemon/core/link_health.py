"""Link health as the session judges it (ICD §6): the link's faults, not the host's.

Two duties live here, both about telling a failing controller or link apart
from the host's own lateness or one lost frame:

- :func:`learn_emit_start` and :func:`learn_arm`: an EMIT_START or ARM whose
  reply never came (:class:`~pbmd.drivers.client.OutcomeUnknown`) may have been
  executed or not. It is never sent again blindly: the controller is asked
  (GET_COUNTERS, a repeatable request that the ordered link delivers after the
  unanswered one) and the caller carries on, asks once more, or trips with
  the cause.
- :class:`StalenessWatch`: telemetry older than the limit is a link fault
  (E201), judged after reading what is waiting in the receive buffer. A host
  that itself overslept the deadline and heard nothing at all meanwhile gives
  the link one sample period from when it could listen again: the
  controller's 250 ms watchdog and its energy budget bound what that costs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from pbmd.daemon.core.controllers import ControllerHandle
from pbmd.daemon.core.rules import TELEMETRY_STALE, TelemetryAge
from pbmd.daemon.core.safety import SafetyLimits
from pbmd.drivers import codec
from pbmd.drivers.client import ClientError, EmissionInhibited, LinkClosed

log = structlog.get_logger()


@dataclass(frozen=True)
class Learned:
    """What the controller said about a request whose reply was lost."""

    executed: bool
    """True: the request took effect (carry on as if the ACK had come)."""
    duration_ms: int = 0
    """For EMIT_START: how long the port has been emitting when asked."""


class OutcomeNotLearned(Exception):
    """The controller could not be asked either: the state is unknown (a link fault)."""

    def __init__(self, error: ClientError) -> None:
        super().__init__(str(error))
        self.link_lost = isinstance(error, LinkClosed)


async def _counters(ctrl: ControllerHandle, device_port: int) -> codec.Counters:
    try:
        return await ctrl.client.get_counters(device_port)
    except EmissionInhibited:
        raise
    except ClientError as exc:
        raise OutcomeNotLearned(exc) from exc


async def learn_emit_start(ctrl: ControllerHandle, device_port: int) -> Learned:
    """Did an unanswered EMIT_START start emission on `device_port`? (GET_COUNTERS)"""
    counters = await _counters(ctrl, device_port)
    return Learned(bool(counters.emitting), counters.duration_ms)


async def learn_arm(ctrl: ControllerHandle, token: int) -> Learned:
    """Did an unanswered ARM take effect? The counters carry the session token ARM set."""
    counters = await _counters(ctrl, 1)
    return Learned(counters.session_token == token)


class StalenessWatch:
    """Telemetry older than N sample periods is a link fault (ICD §6), judged on the link.

    Before it judges, the watch lets every client read what already sits in
    its receive buffer (``drain``): frames that came while the host was busy
    were in time. When the watch itself woke more than one sample period late
    (the host stalled over the deadline) and no frame of any type has been
    read since, the link gets one sample period from the moment the host could
    listen again before telemetry counts as stale.
    """

    def __init__(
        self,
        controllers: Sequence[ControllerHandle],
        limits: SafetyLimits,
        period_s: float,
        trip: Callable[[str], None],
    ) -> None:
        self._controllers = list(controllers)
        self._limits = limits
        self._period_s = period_s
        self._trip = trip
        self.host_stalls = 0
        """Times the watch forgave the host's own stall (a figure for tests and logs)."""

    def _age(self, now: float, began: float) -> float:
        return now - min(max(c.telemetry_host_s or now, began) for c in self._controllers)

    def _silent_since(self, now: float, stalled_s: float) -> bool:
        """No frame of any type was read while the host was stalled."""
        for c in self._controllers:
            silence = c.client.link_silence_s()
            if silence is not None and silence < stalled_s:
                return False
        return True

    async def run(self) -> None:
        limit_s = self._limits.stale_telemetry_periods * self._period_s
        # Counted from when watching began at the earliest: a pause before it (the
        # session's start-up collection) is not the controller's silence.
        began = time.monotonic()
        wake_at = began
        grace_until = 0.0
        while True:
            now = time.monotonic()
            late_s = now - wake_at
            if self._age(now, began) > limit_s:
                for c in self._controllers:
                    await c.client.drain()
                now = time.monotonic()
                age = self._age(now, began)
                if age > limit_s and late_s > self._period_s and self._silent_since(now, late_s):
                    self.host_stalls += 1
                    grace_until = now + self._period_s
                    log.warning("telemetry.host_stalled", late_ms=round(late_s * 1000, 1))
                detail = TELEMETRY_STALE.check(TelemetryAge(age, self._period_s), self._limits)
                if detail is not None and now >= grace_until:
                    silences = [c.client.link_silence_s() for c in self._controllers]
                    heard = [s for s in silences if s is not None]
                    if heard:
                        detail += f"; last frame of any type {max(heard) * 1000:.0f} ms ago"
                    self._trip(detail)
                    return
            age = self._age(now, began)
            sleep_s = max(limit_s - age, 0.001) + 0.001
            if now < grace_until:
                sleep_s = min(sleep_s, grace_until - now + 0.001)
            wake_at = now + sleep_s
            await asyncio.sleep(sleep_s)
