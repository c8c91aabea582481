"""The course use cases: patients, courses, outcomes, and a session started inside a
course, checked against the course's plan before the engine is asked.

The engine knows only sessions; this wraps its start path (`Engine.start_protocol`)
from the outside: the course's checks run first, the patient's skin type and
screening answers go into the engine's own start command, and the session's
place in the course is written once the engine has started it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from pbmd.daemon.core.engine import Engine, StartCommand
from pbmd.daemon.core.session import Session
from pbmd.daemon.services.config import CoursesConfig
from pbmd.daemon.services.courses import book, dose, rules
from pbmd.daemon.services.courses.clock import SystemClock, WallClock
from pbmd.daemon.services.courses.model import (
    CoursePlan,
    Invalid,
    Refusal,
    Refused,
    Timing,
    check_birth_year,
    check_nrs,
    check_odi,
    check_patient_id,
    check_plan,
    check_screening,
    check_skin_type,
    check_timing,
    odi_from_sections,
)
from pbmd.daemon.services.records import RecordStore
from pbmd.daemon.services.records.schema import utc_text
from pbmd.protocols.store import ProtocolLibrary

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class OutcomeInput:
    """An outcome as entered: pain NRS and/or ODI (a total or the ten sections)."""

    timing: str
    nrs_pain: int | None = None
    odi_percent: float | None = None
    odi_sections: Sequence[int | None] | None = None
    note: str | None = None


class CourseService:
    """Patients, courses and outcomes over the records store."""

    def __init__(
        self,
        store: RecordStore,
        library: Callable[[], ProtocolLibrary],
        engine: Callable[[], Engine],
        config: CoursesConfig,
        session_fluence_ceiling_j_cm2: float,
        clock: WallClock | None = None,
    ) -> None:
        self.store = store
        self._library = library
        self._engine = engine
        self.config = config
        self.session_ceiling_j_cm2 = session_fluence_ceiling_j_cm2
        self.clock: WallClock = clock or SystemClock()

    def _now(self) -> tuple[Any, str]:
        now = self.clock.now()
        return now, utc_text(now)

    # ------------------------------------------------------------ patients

    async def add_patient(
        self,
        patient_id: str,
        *,
        birth_year: int | None = None,
        skin_type: str | None = None,
        notes: str | None = None,
        screening: Mapping[str, bool] | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        now, utc = self._now()
        pid = check_patient_id(patient_id)
        year = check_birth_year(birth_year, now)
        skin = check_skin_type(skin_type)
        answers = check_screening(screening or {})

        def write(conn: sqlite3.Connection) -> dict[str, Any]:
            book.insert_patient(
                conn,
                pid,
                birth_year=year,
                skin_type=skin,
                notes=notes,
                screening=answers,
                utc=utc,
                user=user,
            )
            return book.require_patient(conn, pid)

        return await self.store.transact(write)

    async def update_patient(
        self,
        patient_id: str,
        *,
        skin_type: str | None = None,
        screening: Mapping[str, bool] | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        _, utc = self._now()
        skin = check_skin_type(skin_type)
        answers = check_screening(screening or {})

        def write(conn: sqlite3.Connection) -> dict[str, Any]:
            book.update_patient(
                conn, patient_id, skin_type=skin, screening=answers, utc=utc, user=user
            )
            return book.require_patient(conn, patient_id)

        return await self.store.transact(write)

    async def patient(self, patient_id: str) -> dict[str, Any]:
        return await self.store.read(lambda conn: book.require_patient(conn, patient_id))

    async def patients(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        return await self.store.read(lambda conn: book.list_patients(conn, limit, offset))

    # ------------------------------------------------------------ courses

    async def start_course(
        self,
        patient_id: str,
        *,
        diagnosis: str,
        protocol_id: str,
        plan: CoursePlan,
        diagnosis_code: str | None = None,
        diagnosis_system: str | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Open a course for a registered patient on an installed protocol (its version
        now is the course's)."""
        _, utc = self._now()
        check_plan(plan)
        text = diagnosis.strip()
        if not text:
            raise Invalid("give the diagnosis in words (--diagnosis); a code is optional")
        installed = await asyncio.to_thread(self._library().show, protocol_id)

        def write(conn: sqlite3.Connection) -> dict[str, Any]:
            course_id = book.insert_course(
                conn,
                patient_id=patient_id,
                diagnosis=text,
                diagnosis_code=diagnosis_code,
                diagnosis_system=diagnosis_system,
                protocol_id=protocol_id,
                protocol_version=installed.version,
                plan=plan,
                utc=utc,
                user=user,
            )
            return book.require_course(conn, course_id)

        course = await self.store.transact(write)
        log.info("course.started", course_id=course["id"], protocol=protocol_id, user=user)
        return course

    async def course(self, course_id: str) -> dict[str, Any]:
        return await self.store.read(lambda conn: book.require_course(conn, course_id))

    async def close_course(self, course_id: str, reason: str, user: str | None) -> dict[str, Any]:
        _, utc = self._now()
        if not reason.strip():
            raise Invalid("say why the course is closed (--reason), e.g. 'course complete'")

        def write(conn: sqlite3.Connection) -> dict[str, Any]:
            book.close_course(conn, course_id, reason.strip(), utc, user)
            return book.require_course(conn, course_id)

        return await self.store.transact(write)

    async def record_outcome(
        self, course_id: str, entry: OutcomeInput, user: str | None
    ) -> dict[str, Any]:
        _, utc = self._now()
        timing: Timing = check_timing(entry.timing)
        nrs = check_nrs(entry.nrs_pain)
        sections = list(entry.odi_sections) if entry.odi_sections is not None else None
        if sections is not None and entry.odi_percent is not None:
            raise Invalid("give the ODI as its ten sections or as a total, not both")
        odi = odi_from_sections(sections) if sections is not None else None
        odi = check_odi(entry.odi_percent) if odi is None else odi
        if nrs is None and odi is None:
            raise Invalid("give a pain NRS (0–10) and/or an ODI (0–100 % or its ten sections)")

        def write(conn: sqlite3.Connection) -> dict[str, Any]:
            return book.insert_outcome(
                conn,
                course_id=course_id,
                timing=timing,
                nrs_pain=nrs,
                odi_percent=odi,
                odi_sections=sections,
                note=entry.note,
                utc=utc,
                user=user,
            )

        return await self.store.transact(write)

    # ------------------------------------------------------------ sessions

    async def start_session(
        self,
        course_id: str,
        *,
        contraindications: Mapping[str, bool] | None = None,
        override_reason: str | None = None,
        ports: tuple[int, ...] | None = None,
        operator: str | None = None,
    ) -> tuple[Session, dict[str, Any]]:
        """Start the course's next session, or Refused saying why not. Overridable
        refusals pass with a written reason, which is recorded with the visit."""
        now, utc = self._now()
        given = check_screening(contraindications or {})
        reason = (override_reason or "").strip() or None
        course = await self.course(course_id)
        patient = await self.patient(course["patient_id"])
        library, engine = self._library(), self._engine()
        loaded = await asyncio.to_thread(library.load, course["protocol_id"])
        protocol = loaded.protocol
        refusals = rules.plan_refusals(course, now, protocol.version)
        listed = {c.value for c in protocol.contraindications}
        answers, screening = rules.screening_refusal(
            listed, patient["screening"], given, now, self.config.screening_max_age_days
        )
        if screening is not None:
            refusals.append(screening)
        plan = await asyncio.to_thread(
            engine.plan_for, protocol, library.limits, patient["skin_type"]
        )
        so_far = dose.course_doses(await self._sessions(course))
        ceiling = self.course_ceiling_j_cm2(course)
        over = dose.ceiling_refusal(so_far, dose.planned_doses(plan), ceiling)
        if over is not None:
            refusals.append(over)
        overridden = self._check_refusals(course_id, refusals, reason)
        if given:
            await self.update_patient(course["patient_id"], screening=given, user=operator)
        command = StartCommand(
            protocol_id=course["protocol_id"],
            patient_ref=course["patient_id"],
            contraindications=answers,
            ports=ports,
            operator=operator,
            skin_type=patient["skin_type"],
        )
        session = await engine.start_protocol(library, command)
        number = len(course["visits"]) + 1
        if await _recorded(session):

            def write(conn: sqlite3.Connection) -> None:
                book.insert_visit(
                    conn, course_id, number, session.id, utc, overridden, reason, operator
                )
                if "protocol_changed" in overridden:
                    # Reviewed and accepted: the course goes on with the version installed.
                    book.set_protocol_version(conn, course_id, protocol.version)

            await self.store.transact(write)
        if overridden:
            self.store.event(
                "course_override",
                f"session {number} of course {course_id} started over: {', '.join(overridden)} "
                f"({reason}, {operator})",
                session_id=session.id,
                severity="warning",
                data={"course_id": course_id, "overridden": overridden, "reason": reason},
            )
        log.info(
            "course.session_started",
            course_id=course_id,
            number=number,
            session_id=session.id,
            overridden=overridden,
        )
        return session, {
            "course_id": course_id,
            "number": number,
            "of": int(course["sessions_planned"]),
            "overridden": overridden,
        }

    def _check_refusals(
        self, course_id: str, refusals: Sequence[Refusal], reason: str | None
    ) -> list[str]:
        """The codes a written reason overrides, or Refused."""
        if not refusals:
            return []
        hard = [r for r in refusals if not r.overridable]
        if hard or reason is None:
            log.warning(
                "course.session_refused", course_id=course_id, refusals=[r.code for r in refusals]
            )
            raise Refused(refusals)
        return [r.code for r in refusals]

    def course_ceiling_j_cm2(self, course: Mapping[str, Any]) -> float:
        configured = self.config.course_fluence_ceiling_j_cm2
        if configured is not None:
            return configured
        return self.session_ceiling_j_cm2 * int(course["sessions_planned"])

    async def _sessions(self, course: Mapping[str, Any]) -> list[dict[str, Any]]:
        out = []
        for visit in course["visits"]:
            s = await self.store.get_session(str(visit["session_id"]))
            if s is not None:
                out.append(s)
        return out

    # ------------------------------------------------------------ reading a course

    async def summary(self, course_id: str) -> dict[str, Any]:
        """The course so far as data: plan, visits with each session's dose, outcomes,
        the cumulative dose per patch and wavelength against the ceiling."""
        course = await self.course(course_id)
        sessions = {s["id"]: s for s in await self._sessions(course)}
        return build_summary(course, sessions, self.course_ceiling_j_cm2(course))

    async def session_context(self, session_id: str) -> dict[str, Any] | None:
        """Where a session stands in its course (None: not in one), for its report."""
        found = await self.store.read(lambda conn: book.course_of_session(conn, session_id))
        if found is None:
            return None
        summary = await self.summary(found[0])
        summary["session_number"] = found[1]
        return summary


RECORD_WAIT_S = 60.0
"""The longest a course waits for its new session's record (the engine writes it once
the controller's clock has settled, well within a second)."""


async def _recorded(session: Session) -> bool:
    """Wait until the engine has recorded the session (its visit refers to that row);
    False if it ended before that (nothing was given: no visit)."""
    ready = asyncio.Event()

    def check(_event: object = None) -> None:
        if session.started_utc is not None or session.state.final:
            ready.set()

    remove = session.add_listener(check)
    try:
        check()
        async with asyncio.timeout(RECORD_WAIT_S):
            await ready.wait()
    finally:
        remove()
    return session.started_utc is not None


def build_summary(
    course: Mapping[str, Any], sessions: Mapping[str, Mapping[str, Any]], ceiling_j_cm2: float
) -> dict[str, Any]:
    visits = []
    for v in course["visits"]:
        s = sessions.get(str(v["session_id"]), {})
        steps = s.get("steps") or []
        delivered = [t.get("delivered_controller_j") for t in steps]
        visits.append(
            {
                "number": v["number"],
                "session_id": v["session_id"],
                "visit_utc": v["visit_utc"],
                "session_outcome": s.get("outcome"),
                "protocol_version": s.get("protocol_version"),
                "delivered_energy_j": round(sum(float(d or 0.0) for d in delivered), 3),
                "prescribed_energy_j": round(
                    sum(float(t.get("prescribed_energy_j") or 0.0) for t in steps), 3
                ),
                "overridden": v["overridden"],
                "override_reason": v["override_reason"],
                "override_by": v["override_by"],
            }
        )
    doses = dose.course_doses(
        sessions[str(v["session_id"])] for v in course["visits"] if str(v["session_id"]) in sessions
    )
    plan = {
        "sessions": course["sessions_planned"],
        "min_interval_days": course["min_interval_days"],
        "sessions_per_week": course["sessions_per_week"],
        "reassess_after": course["reassess_after"],
    }
    keys = (
        "id",
        "patient_id",
        "diagnosis",
        "diagnosis_code",
        "diagnosis_system",
        "protocol_id",
        "protocol_version",
        "state",
        "opened_utc",
        "opened_by",
        "closed_utc",
        "closed_by",
        "close_reason",
    )
    return {
        "course": {k: course[k] for k in keys},
        "plan": plan,
        "sessions_given": len(visits),
        "visits": visits,
        "outcomes": list(course["outcomes"]),
        "cumulative_dose": [d.as_dict() for d in doses],
        "course_ceiling_j_cm2": ceiling_j_cm2,
        "measured_only": "Measurements as recorded; they say nothing of what caused a change.",
    }
