"""The timeline of a protocol: which port does what when, and the critical path.

Phases run one after the other; within a phase every port starts at the
phase's start and runs its steps back to back; a phase ends when its longest
port ends. The critical path is the sum of the phases' lengths: the shortest
time the session can take with no waiting for an operator. The engine runs
the same rule (:mod:`pbmd.daemon.core.runner`), and the critical-path
benchmark compares a session's wall time with this figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

V1_PHASE_ID = "all"
V1_PHASE_TITLE = "every port at once (a version 1 file)"


@dataclass(frozen=True, slots=True)
class Item:
    """One step to place on the timeline."""

    port: int
    index: int
    phase: int
    duration_s: float
    what: str


@dataclass(frozen=True, slots=True)
class Slot:
    """A step placed: when it starts and ends if nobody waits."""

    item: Item
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class PhaseSlot:
    index: int
    id: str
    title: str
    start_s: float
    end_s: float
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Timeline:
    phases: tuple[PhaseSlot, ...]
    slots: tuple[Slot, ...]

    @property
    def critical_path_s(self) -> float:
        return self.phases[-1].end_s if self.phases else 0.0

    def lines(self) -> list[str]:
        """The timeline as a clinician reads it, one line per phase and per step."""
        out: list[str] = []
        for phase in self.phases:
            out.append(
                f"phase {phase.index + 1} {phase.id!r}: {_clock(phase.start_s)}–"
                f"{_clock(phase.end_s)}, ports {', '.join(map(str, phase.ports))}: {phase.title}"
            )
            for slot in self.slots:
                if slot.item.phase == phase.index:
                    out.append(
                        f"  {_clock(slot.start_s)}–{_clock(slot.end_s)}  port {slot.item.port}"
                        f"  step {slot.item.index + 1}: {slot.item.what}"
                    )
        return out


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600:d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def build(phases: Sequence[tuple[str, str]], items: Iterable[Item]) -> Timeline:
    """Place the items: phases in order, ports at once within a phase, steps in order."""
    ordered = sorted(items, key=lambda i: (i.phase, i.port, i.index))
    slots: list[Slot] = []
    phase_slots: list[PhaseSlot] = []
    start_s = 0.0
    for index, (phase_id, title) in enumerate(phases):
        ends: dict[int, float] = {}
        for item in (i for i in ordered if i.phase == index):
            begin = ends.get(item.port, start_s)
            ends[item.port] = begin + item.duration_s
            slots.append(Slot(item, begin, ends[item.port]))
        end_s = max(ends.values(), default=start_s)
        phase_slots.append(PhaseSlot(index, phase_id, title, start_s, end_s, tuple(sorted(ends))))
        start_s = end_s
    return Timeline(tuple(phase_slots), tuple(slots))
