"""Health counters and round-trip times of one controller link."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

from pbmd.drivers.codec import DecoderStats, DropReason


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """Request → reply times over the rolling window, in milliseconds."""

    count: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of the link's health counters."""

    frames_rx: int
    frames_tx: int
    bytes_rx: int
    bytes_tx: int
    dropped: dict[str, int]
    """Frames the decoder dropped, by reason (codec.DropReason values)."""
    crc_errors: int
    empty_frames: int
    unknown_types: int
    bad_payloads: int
    unmatched_replies: int
    late_replies: int
    unexpected_replies: int
    reply_timeouts: int
    """Replies that missed their deadline (after reading what was waiting)."""
    link_faults: int
    """Times the link was judged faulty (ReplyTimeout raised, listeners told)."""
    naks: int
    telemetry_rx: int
    events_rx: int
    telemetry_dropped: int
    events_dropped: int
    listener_errors: int
    heartbeats_sent: int
    heartbeat_failures: int
    hedged_requests: int
    """EMIT_STOPs sent a second time because the first reply was slow (client.emit_stop)."""
    rtt_ms: RoundTrip

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(slots=True)
class LinkTally:
    """The client's running counters; :class:`LinkStats` is their snapshot."""

    frames_tx: int = 0
    bytes_rx: int = 0
    bytes_tx: int = 0
    unknown_types: int = 0
    bad_payloads: int = 0
    unmatched_replies: int = 0
    late_replies: int = 0
    unexpected_replies: int = 0
    reply_timeouts: int = 0
    link_faults: int = 0
    naks: int = 0
    telemetry_rx: int = 0
    events_rx: int = 0
    telemetry_dropped: int = 0
    events_dropped: int = 0
    listener_errors: int = 0
    heartbeats_sent: int = 0
    heartbeat_failures: int = 0
    hedged_requests: int = 0

    def snapshot(self, decoder: DecoderStats, rtt: RoundTrip) -> LinkStats:
        """These counters with the decoder's, as one frozen LinkStats."""
        return LinkStats(
            frames_rx=decoder.frames,
            dropped=dict(decoder.dropped),
            crc_errors=decoder.dropped[DropReason.CRC.value],
            empty_frames=decoder.empty,
            rtt_ms=rtt,
            **asdict(self),
        )


class RoundTrips:
    """The last ``window`` round trips; percentiles recomputed only after a new one."""

    def __init__(self, window: int) -> None:
        self._ms: deque[float] = deque(maxlen=window)
        self._summary: RoundTrip | None = None

    def add(self, ms: float) -> None:
        self._ms.append(ms)
        self._summary = None

    def summary(self) -> RoundTrip:
        if self._summary is None:
            ordered = sorted(self._ms)
            self._summary = RoundTrip(
                count=len(ordered),
                p50_ms=percentile(ordered, 0.50) if ordered else None,
                p99_ms=percentile(ordered, 0.99) if ordered else None,
                max_ms=ordered[-1] if ordered else None,
            )
        return self._summary


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
