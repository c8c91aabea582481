"""The dose a course has put on each patch of skin, per wavelength, and its ceiling.

Each session's part comes from its record by the report's own rule
(`report_skin.skin`: a patch's fluence is the sum over every step whose light
reaches it, on the body-map regions of a version 2 protocol, on the sites of a
version 1 one); the course adds those up over its sessions. Before a session
starts, what its plan prescribes is added to what was delivered so far and
checked against the course ceiling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pbmd.daemon.services import report_skin
from pbmd.daemon.services.courses.model import Refusal
from pbmd.protocols.plan import Plan


@dataclass(frozen=True, slots=True)
class PatchDose:
    patch: str
    label: str
    wavelength_nm: int
    delivered_j_cm2: float
    sessions: int
    """How many of the course's sessions reached this patch at this wavelength."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "patch": self.patch,
            "label": self.label,
            "wavelength_nm": self.wavelength_nm,
            "delivered_j_cm2": round(self.delivered_j_cm2, 4),
            "sessions": self.sessions,
        }


def session_doses(session: Mapping[str, Any]) -> dict[tuple[str, int], tuple[str, float]]:
    """(patch, nm) -> (label, delivered fluence) of one recorded session."""
    out: dict[tuple[str, int], tuple[str, float]] = {}
    for patch in report_skin.skin(session):
        for dose in patch.by_wavelength:
            out[(patch.patch, dose.wavelength_nm)] = (
                patch.label,
                dose.fluence_delivered_j_cm2 or 0.0,
            )
    return out


def course_doses(sessions: Iterable[Mapping[str, Any]]) -> list[PatchDose]:
    """The course's cumulative fluence per patch and wavelength, largest first."""
    totals: dict[tuple[str, int], list[Any]] = {}
    for session in sessions:
        for key, (label, fluence) in session_doses(session).items():
            entry = totals.setdefault(key, [label, 0.0, 0])
            entry[1] += fluence
            entry[2] += 1
    return sorted(
        (PatchDose(p, str(e[0]), nm, float(e[1]), int(e[2])) for (p, nm), e in totals.items()),
        key=lambda d: (-d.delivered_j_cm2, d.patch, d.wavelength_nm),
    )


def planned_doses(plan: Plan) -> dict[tuple[str, int], float]:
    """(patch, nm) -> the fluence a session of this plan prescribes there."""
    out: dict[tuple[str, int], float] = {}
    for port in plan.ports:
        for e in port.emissions:
            for patch in e.patches or (e.site_id,):
                key = (patch, e.wavelength_nm)
                out[key] = out.get(key, 0.0) + e.expected_fluence_j_cm2
    return out


def ceiling_refusal(
    so_far: Iterable[PatchDose], planned: Mapping[tuple[str, int], float], ceiling_j_cm2: float
) -> Refusal | None:
    """A refusal when this session would take a patch past the course ceiling."""
    delivered = {(d.patch, d.wavelength_nm): d.delivered_j_cm2 for d in so_far}
    over = []
    for (patch, nm), add in sorted(planned.items()):
        total = delivered.get((patch, nm), 0.0) + add
        if total > ceiling_j_cm2 + 1e-9:
            over.append(f"{patch} at {nm} nm: {delivered.get((patch, nm), 0.0):.2f} + {add:.2f}")
    if not over:
        return None
    return Refusal(
        "course_ceiling",
        f"this session would take the course past its ceiling of {ceiling_j_cm2:g} J/cm² per "
        f"patch of skin and wavelength ({'; '.join(over)} J/cm²); the ceiling is "
        "[courses] course_fluence_ceiling_j_cm2 in the configuration",
        overridable=False,
    )
