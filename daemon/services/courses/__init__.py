"""Patients, treatment courses and outcomes, kept in the records database.

A lumbar treatment is a course of sessions, not one: `service.CourseService`
ties a pseudonymous patient (`model`), a diagnosis, a protocol and a plan
(`rules`: interval, sessions a week, reassessment, completion) to the sessions
the engine runs, adds up the dose each patch of skin received over the course
(`dose`), keeps the outcome measures (pain NRS, ODI), and renders the course as
data, a plot (`plot`), an HL7 FHIR R4 bundle (`fhir`) and a printable PDF
(`pdf`). Calendar time comes from an injected clock (`clock`).
"""

from pbmd.daemon.services.courses.clock import SystemClock, WallClock
from pbmd.daemon.services.courses.model import (
    CourseError,
    CoursePlan,
    Invalid,
    NotFound,
    Refusal,
    Refused,
)
from pbmd.daemon.services.courses.service import CourseService, OutcomeInput

__all__ = [
    "CourseError",
    "CoursePlan",
    "CourseService",
    "Invalid",
    "NotFound",
    "OutcomeInput",
    "Refusal",
    "Refused",
    "SystemClock",
    "WallClock",
]
