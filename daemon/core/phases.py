"""The order of a session's phases: a port's step of phase k waits until every step
of the phases before it has ended, on every port.

Within a phase the ports run at once, each its steps in order (the runner);
nothing else orders them. A phase opens the moment the last step of the
phases before it ends (completed or skipped), in the same event-loop turn, so
the session's wall time stays on the schedule's critical path
(:mod:`pbmd.protocols.schedule`). Pause, abort and trips need nothing here:
a paused step has not ended, so later phases keep waiting; an abort or a trip
cancels the waiting runners with the rest of the session's work.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from pbmd.daemon.core.steps import StepOrder


class PhaseGate:
    """Counts each phase's unfinished steps and opens the next phase when they are done."""

    def __init__(
        self,
        steps: Mapping[int, Sequence[StepOrder]],
        on_open: Callable[[int, tuple[int, ...]], None] | None = None,
    ) -> None:
        self._left: Counter[int] = Counter(o.phase for port in steps.values() for o in port)
        self._ports: dict[int, tuple[int, ...]] = {
            phase: tuple(
                sorted(p for p, orders in steps.items() if any(o.phase == phase for o in orders))
            )
            for phase in self._left
        }
        self._open: dict[int, asyncio.Event] = {phase: asyncio.Event() for phase in self._left}
        self._on_open = on_open
        self._opened: set[int] = set()

    @property
    def phases(self) -> list[int]:
        return sorted(self._left)

    def ports_in(self, phase: int) -> tuple[int, ...]:
        return self._ports.get(phase, ())

    def is_open(self, phase: int) -> bool:
        return all(left == 0 for p, left in self._left.items() if p < phase)

    def blocking(self, phase: int) -> int | None:
        """The earliest phase before `phase` that still has steps to end, if any."""
        return next((p for p in sorted(self._left) if p < phase and self._left[p] > 0), None)

    def start(self) -> None:
        """The session runs: open every phase that has nothing before it."""
        self._update()

    async def wait(self, phase: int) -> None:
        if self.is_open(phase):
            return
        await self._open[phase].wait()

    def ended(self, order: StepOrder) -> None:
        """A step ended (completed or skipped): open the phases this frees."""
        self._left[order.phase] -= 1
        self._update()

    def _update(self) -> None:
        for phase in sorted(self._left):
            if phase in self._opened or not self.is_open(phase):
                continue
            self._opened.add(phase)
            self._open[phase].set()
            if self._on_open is not None:
                self._on_open(phase, self._ports[phase])
