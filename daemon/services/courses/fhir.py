"""A session or a course as an HL7 FHIR R4 bundle (JSON), for a clinic's record system.

Plain JSON, built here without a FHIR library (the tests validate every bundle
with fhir.resources' models). The patient is referred to by the clinic's
pseudonym only (a Patient with that identifier and, if given, the birth year);
each session is a Procedure carrying the device and, per step, the dose
parameters as delivered; each outcome is an Observation with its LOINC code:

- pain: 72514-3 "Pain severity - 0-10 verbal numeric rating [Score] - Reported";
- ODI: 97909-6 "Oswestry disability index score ODI" (the panel is 97908-8), a
  percentage (https://loinc.org/97909-6).

No SNOMED CT code is given for the procedure itself: none was verified for
photobiomodulation, so the procedure is named in text only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
LOINC_NRS_PAIN = ("72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported")
LOINC_ODI = ("97909-6", "Oswestry disability index score ODI")
PATIENT_SYSTEM = "urn:pbmd:clinic-patient-id"
SESSION_SYSTEM = "urn:pbmd:session-id"
COURSE_SYSTEM = "urn:pbmd:course-id"
STEP_EXTENSION = "urn:pbmd:fhir:StructureDefinition:pbm-step"
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

_STATUS = {
    "completed": "completed",
    "aborted": "stopped",
    "faulted": "stopped",
    "interrupted": "stopped",
    None: "in-progress",
}


def fhir_id(prefix: str, value: str) -> str:
    """A FHIR resource id for a local key: the key itself when it is a valid id,
    else a digest of it (ids allow only letters, digits, '-' and '.')."""
    candidate = f"{prefix}-{value}"
    if _FHIR_ID.match(candidate):
        return candidate
    return f"{prefix}-{hashlib.sha256(value.encode()).hexdigest()[:32]}"


def _fhir_time(utc: str | None) -> str | None:
    """Stored times have microseconds; FHIR allows any fraction, kept to milliseconds."""
    if not utc:
        return None
    return utc[:23] + "Z" if len(utc) > 24 else utc


def _quantity(value: float, unit: str, code: str | None = None) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": unit, "system": UCUM, "code": code or unit}


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:pbmd:{resource['resourceType']}/{resource['id']}",
        "resource": resource,
    }


def _ref(resource: Mapping[str, Any]) -> dict[str, Any]:
    return {"reference": f"urn:pbmd:{resource['resourceType']}/{resource['id']}"}


def patient_resource(patient_id: str, birth_year: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Patient",
        "id": fhir_id("patient", patient_id),
        "identifier": [{"system": PATIENT_SYSTEM, "value": patient_id}],
    }
    if birth_year is not None:
        out["birthDate"] = f"{int(birth_year):04d}"
    return out


def device_resource(session: Mapping[str, Any]) -> dict[str, Any]:
    serial = str(session.get("controller_serial") or "unknown")
    out: dict[str, Any] = {
        "resourceType": "Device",
        "id": fhir_id("device", serial),
        "serialNumber": serial,
        "deviceName": [
            {"name": "pbmd multi-port photobiomodulation controller", "type": "user-friendly-name"}
        ],
    }
    if session.get("controller_firmware"):
        out["version"] = [{"value": str(session["controller_firmware"])}]
    return out


def _step_extension(step: Mapping[str, Any]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"url": "site", "valueString": str(step.get("site_label") or step["site"])},
        {"url": "port", "valueInteger": int(step["port"])},
        {"url": "wavelength", "valueQuantity": _quantity(step["wavelength_nm"], "nm")},
        {"url": "mode", "valueString": str(step["mode"])},
        {"url": "power", "valueQuantity": _quantity(step["power_setpoint_mw"], "mW")},
        {"url": "beamArea", "valueQuantity": _quantity(step["area_cm2"], "cm2")},
    ]
    optional = (
        ("prescribedEnergy", "prescribed_energy_j", "J"),
        ("deliveredEnergy", "delivered_controller_j", "J"),
        ("deliveredFluence", "delivered_fluence_j_cm2", "J/cm2"),
        ("meanIrradiance", "mean_irradiance_mw_cm2", "mW/cm2"),
        ("emittingTime", "emitting_time_s", "s"),
    )
    for url, key, unit in optional:
        if step.get(key) is not None:
            parts.append({"url": url, "valueQuantity": _quantity(step[key], unit)})
    if step.get("pulse_hz"):
        parts.append({"url": "pulseFrequency", "valueQuantity": _quantity(step["pulse_hz"], "Hz")})
    parts.append({"url": "outcome", "valueString": str(step.get("outcome") or "not ended")})
    return {"url": STEP_EXTENSION, "extension": parts}


def procedure_resource(
    session: Mapping[str, Any],
    patient: Mapping[str, Any],
    device: Mapping[str, Any],
    course: Mapping[str, Any] | None,
    number: int | None,
) -> dict[str, Any]:
    text = "Photobiomodulation (low-level light therapy) session"
    if course is not None and number is not None:
        text += f", session {number} of {course['sessions_planned']} of a course"
    out: dict[str, Any] = {
        "resourceType": "Procedure",
        "id": fhir_id("session", str(session["id"])),
        "identifier": [{"system": SESSION_SYSTEM, "value": str(session["id"])}],
        "status": _STATUS.get(session.get("outcome"), "stopped"),
        "code": {"text": text},
        "subject": {**_ref(patient), "identifier": patient["identifier"][0]},
        "performedPeriod": {
            k: v
            for k, v in (
                ("start", _fhir_time(session.get("started_utc"))),
                ("end", _fhir_time(session.get("ended_utc"))),
            )
            if v
        },
        "usedReference": [_ref(device)],
        "bodySite": [
            {"text": label}
            for label in sorted({str(s.get("site_label") or s["site"]) for s in session["steps"]})
        ],
        "note": [
            {
                "text": f"protocol {session['protocol_id']} version {session['protocol_version']}"
                f" (sha256 {session['protocol_sha256'][:16]}…); outcome "
                f"{session.get('outcome') or 'not ended'}"
            }
        ],
        "extension": [_step_extension(s) for s in session["steps"]],
    }
    if course is not None:
        reason: dict[str, Any] = {"text": str(course["diagnosis"])}
        if course.get("diagnosis_code"):
            coding: dict[str, Any] = {"code": str(course["diagnosis_code"])}
            if course.get("diagnosis_system"):
                coding["system"] = str(course["diagnosis_system"])
            reason["coding"] = [coding]
        out["reasonCode"] = [reason]
    if session.get("operator"):
        out["performer"] = [{"actor": {"display": str(session["operator"])}}]
    return out


def observation_resources(
    outcome: Mapping[str, Any],
    patient: Mapping[str, Any],
    procedures: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One Observation per measure of an outcome (pain, ODI)."""
    out = []
    measures = (
        ("nrs", LOINC_NRS_PAIN, outcome.get("nrs_pain"), "{score}"),
        ("odi", LOINC_ODI, outcome.get("odi_percent"), "%"),
    )
    for key, (code, display), value, unit in measures:
        if value is None:
            continue
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": fhir_id(f"outcome-{key}", str(outcome["id"])),
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "survey",
                            "display": "Survey",
                        }
                    ]
                }
            ],
            "code": {
                "coding": [{"system": LOINC, "code": code, "display": display}],
                "text": display,
            },
            "subject": {**_ref(patient), "identifier": patient["identifier"][0]},
            "effectiveDateTime": _fhir_time(str(outcome["recorded_utc"])),
            "valueQuantity": _quantity(value, unit),
            "note": [
                {
                    "text": f"measured {outcome['timing']} session {outcome['visit_number']} "
                    "of the course"
                }
            ],
        }
        procedure = procedures.get(str(outcome.get("session_id")))
        if procedure is not None:
            obs["partOf"] = [_ref(procedure)]
        out.append(obs)
    return out


def bundle(
    patient_id: str,
    birth_year: int | None,
    sessions: Sequence[tuple[Mapping[str, Any], int | None]],
    course: Mapping[str, Any] | None,
    outcomes: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """A collection bundle: the patient, the devices, a Procedure per session (with its
    number in the course), an Observation per outcome measure."""
    patient = patient_resource(patient_id, birth_year)
    entries = [_entry(patient)]
    devices: dict[str, dict[str, Any]] = {}
    procedures: dict[str, dict[str, Any]] = {}
    for session, number in sessions:
        device = device_resource(session)
        devices.setdefault(device["id"], device)
        procedures[str(session["id"])] = procedure_resource(
            session, patient, devices[device["id"]], course, number
        )
    entries += [_entry(d) for d in devices.values()]
    entries += [_entry(p) for p in procedures.values()]
    for o in outcomes:
        entries += [_entry(obs) for obs in observation_resources(o, patient, procedures)]
    out: dict[str, Any] = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    if course is not None:
        out["identifier"] = {"system": COURSE_SYSTEM, "value": str(course["id"])}
    return out
