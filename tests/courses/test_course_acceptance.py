"""Issue 14's acceptance: a course of 12 sessions on the simulator, end to end.

The daemon's service runs in this process with a calendar clock the test holds
(the course rules read it; the device clock runs on the simulator at ×30), and
everything is asked over the real control socket, as pbmctl would. Days pass
between visits by moving that clock, never by sleeping.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.image
import pypdfium2
from fhir.resources.R4B.bundle import Bundle
from service.harness import RawClient, pbmctl

from pbmd.daemon.services.courses import dose

from .rig import (
    COURSE_SCREENING,
    STEP_FLUENCE_J_CM2,
    Home,
    ManualClock,
    error_of,
    install,
    make_home,
    run_course_session,
    run_service,
)

INVALID_PARAMS = -32602
REFUSED = -32002
NOT_FOUND = -32003
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
PATIENT = "P-0042"
NRS_BEFORE = [7, 7, 6, 6, 6, 5, 5, 5, 4, 4, 4, 3]
"""What the synthetic patient reports before each session: test data, not a result."""


def _svg_points(svg: bytes) -> dict[str, int]:
    """Markers drawn in each series' group, and the number of per-session bars."""
    root = ET.fromstring(svg)
    out: dict[str, int] = {}
    for g in root.iter("{http://www.w3.org/2000/svg}g"):
        gid = g.get("id") or ""
        if gid.startswith(("nrs-", "odi-")):
            out[gid] = sum(1 for _ in g.iter("{http://www.w3.org/2000/svg}use"))
        elif gid.startswith("dose-per-session-"):
            out["dose-per-session"] = out.get("dose-per-session", 0) + 1
    return out


def _pdf_text(data: bytes) -> tuple[str, tuple[int, int]]:
    """All pages' text, and the pixel size of page 1 rendered at 100 dpi."""
    pdf = pypdfium2.PdfDocument(data)
    try:
        text = ""
        for i in range(len(pdf)):
            page = pdf[i]
            text += page.get_textpage().get_text_range() + "\n"
        image = pdf[0].render(scale=100 / 72).to_pil()
        return text, image.size
    finally:
        pdf.close()


def _bad_input_changes_nothing(c: RawClient, course_id: str) -> None:
    before = c.call("course.show", {"course_id": course_id})["summary"]
    err = error_of(c, "outcome.record", {"course_id": course_id, "nrs_pain": 11})
    assert err["code"] == INVALID_PARAMS and "0 (no pain) to 10" in err["message"], err
    err = error_of(c, "outcome.record", {"course_id": course_id, "odi_percent": 120.0})
    assert err["code"] == INVALID_PARAMS and "0–100 %" in err["message"], err
    err = error_of(c, "outcome.record", {"course_id": "c-000000000000", "nrs_pain": 3})
    assert err["code"] == NOT_FOUND, err
    err = error_of(
        c,
        "course.start",
        {"patient_id": "P-9999", "diagnosis": "x", "protocol": "course-lumbar", "sessions": 12},
    )
    assert err["code"] == NOT_FOUND and "pbmctl patient add" in err["message"], err
    err = error_of(
        c,
        "course.start",
        {"patient_id": PATIENT, "diagnosis": "x", "protocol": "course-lumbar", "sessions": 0},
    )
    assert err["code"] == INVALID_PARAMS and "course of 0 sessions" in err["message"], err
    err = error_of(c, "course.session_start", {"course_id": "c-000000000000"})
    assert err["code"] == NOT_FOUND, err
    assert c.call("course.show", {"course_id": course_id})["summary"] == before
    patient = c.call("patient.show", {"patient_id": PATIENT})["patient"]
    assert [x["id"] for x in patient["courses"]] == [course_id]
    assert len(c.call("patient.list", {})["patients"]) == 1


def _scenario(home: Home, clock: ManualClock, out: dict[str, Any]) -> None:
    with RawClient(home.socket, timeout_s=120.0) as c:
        install(c, home.protocols / "course-v1.toml")
        c.call(
            "patient.add",
            {
                "patient_id": PATIENT,
                "birth_year": 1968,
                "skin_type": "III",
                "contraindications": COURSE_SCREENING,
            },
        )
        course = c.call(
            "course.start",
            {
                "patient_id": PATIENT,
                "diagnosis": "Chronic non-specific low back pain",
                "diagnosis_code": "M54.5",
                "diagnosis_system": "http://hl7.org/fhir/sid/icd-10",
                "protocol": "course-lumbar",
                "sessions": 12,
                "min_interval_days": 2,
                "reassess_after": 6,
            },
        )["course"]
        course_id = course["id"]
        out["course_id"] = course_id
        _bad_input_changes_nothing(c, course_id)

        sessions: list[str] = []
        for n in range(1, 13):
            c.call(
                "outcome.record",
                {
                    "course_id": course_id,
                    "timing": "before",
                    "nrs_pain": NRS_BEFORE[n - 1],
                    "odi_sections": [3, 3, 2, 2, 3, 2, 2, 1, 2, 2] if n == 1 else None,
                    "odi_percent": None if n == 1 else 44.0 - 2 * n,
                },
            )
            params: dict[str, Any] = {"course_id": course_id}
            if n == 2:
                # 70 s after the first: refused as too soon, then overridden with a reason.
                clock.advance(seconds=70)
                err = error_of(c, "course.session_start", params)
                assert err["code"] == REFUSED, err
                assert [r["code"] for r in err["data"]["refusals"]] == ["too_soon"], err
                assert "too soon" in err["message"]
                params["override_reason"] = "patient travels abroad tomorrow; agreed by Dr A"
            if n == 7:
                err = error_of(c, "course.session_start", params)
                assert [r["code"] for r in err["data"]["refusals"]] == ["reassessment_due"]
                c.call(
                    "outcome.record",
                    {
                        "course_id": course_id,
                        "timing": "reassessment",
                        "nrs_pain": 5,
                        "odi_percent": 32.0,
                        "note": "reassessed after session 6",
                    },
                )
            if n == 9:
                # The screening answers are 14 days old, over the 13 the site allows.
                err = error_of(c, "course.session_start", params)
                refusals = err["data"]["refusals"]
                assert [r["code"] for r in refusals] == ["screening_due"], err
                assert refusals[0]["overridable"] is False
                err = error_of(c, "course.session_start", {**params, "override_reason": "no"})
                assert err["code"] == REFUSED
                params["contraindications"] = COURSE_SCREENING
            if n == 10:
                install(c, home.protocols / "course-v2.toml")
                err = error_of(c, "course.session_start", params)
                assert [r["code"] for r in err["data"]["refusals"]] == ["protocol_changed"]
                params["override_reason"] = "v2 changes the evidence text only; reviewed"
            session_id, state, place = run_course_session(c, params)
            assert state == "completed", (n, state)
            assert place["number"] == n and place["of"] == 12
            sessions.append(session_id)
            c.call(
                "outcome.record",
                {"course_id": course_id, "timing": "after", "nrs_pain": NRS_BEFORE[n - 1] - 1},
            )
            if n != 1:
                clock.advance(days=2)

        err = error_of(c, "course.session_start", {"course_id": course_id})
        assert [r["code"] for r in err["data"]["refusals"]] == ["course_complete"], err
        out["sessions"] = sessions
        out["report5"] = c.call("report.get", {"session_id": sessions[4], "format": "text"})
        out["listed"] = c.call("records.list", {"patient_ref": PATIENT, "limit": 100})
        out["record5"] = c.call("records.show", {"session_id": sessions[4]})["session"]
        for fmt in ("json", "png", "svg", "plot-pdf", "pdf", "fhir"):
            out[fmt] = c.call("course.report", {"course_id": course_id, "format": fmt})
        out["session_fhir"] = c.call("session.export", {"session_id": sessions[4]})
        out["session_pdf"] = c.call("session.export", {"session_id": sessions[4], "format": "pdf"})
        c.call("course.close", {"course_id": course_id, "reason": "course complete; reassess"})
        out["closed"] = c.call("course.show", {"course_id": course_id})["summary"]
    code, text = pbmctl(home.socket, "course", "show", course_id).returncode, ""
    assert code == 0
    res = pbmctl(home.socket, "outcome", "record", course_id, "--nrs", "11")
    text = res.stderr
    assert res.returncode != 0 and "0 (no pain) to 10" in text, text
    png = home.state.parent / "course.png"
    res = pbmctl(home.socket, "course", "report", course_id, "--format", "png", "-o", str(png))
    assert res.returncode == 0, res.stderr
    out["pbmctl_png"] = png.read_bytes()


async def test_course_of_twelve_sessions_end_to_end(workdir: Path) -> None:
    home = make_home(workdir, "screening_max_age_days = 13")
    clock = ManualClock(START)
    out: dict[str, Any] = {}
    await run_service(home, clock, lambda: _scenario(home, clock, out))
    course_id = out["course_id"]

    # The report says where the session stands in its course.
    text = out["report5"]["text"]
    assert "Session 5 of 12 of course " + course_id in text, text
    assert out["report5"]["course"]["session_number"] == 5
    assert {s["id"] for s in out["listed"]["sessions"]} == set(out["sessions"])
    # A course's session runs with the patient's skin type and screening answers.
    record = out["record5"]
    assert record["patient_ref"] == PATIENT and record["skin_type"] == "III"
    assert record["contraindications"] == COURSE_SCREENING

    summary = out["json"]["summary"]
    assert summary["sessions_given"] == 12
    visits = summary["visits"]
    assert [v["number"] for v in visits] == list(range(1, 13))
    assert visits[1]["overridden"] == ["too_soon"]
    assert visits[1]["override_reason"].startswith("patient travels abroad")
    assert visits[9]["overridden"] == ["protocol_changed"]
    assert [v["protocol_version"] for v in visits] == [1] * 9 + [2] * 3
    assert all(not v["overridden"] for i, v in enumerate(visits) if i not in (1, 9))
    first_odi = summary["outcomes"][0]
    assert first_odi["odi_percent"] == 44.0  # 22 of 50 points
    assert first_odi["odi_sections"] == [3, 3, 2, 2, 3, 2, 2, 1, 2, 2]
    # Cumulative dose per patch of skin and wavelength: 12 × 1 J/cm² as delivered.
    doses = {(d["patch"], d["wavelength_nm"]): d for d in summary["cumulative_dose"]}
    assert set(doses) == {("back", 660), ("back-right", 830)}
    for d in doses.values():
        assert d["sessions"] == 12
        assert abs(d["delivered_j_cm2"] - 12 * STEP_FLUENCE_J_CM2) < 12 * STEP_FLUENCE_J_CM2 * 0.05
    assert summary["course_ceiling_j_cm2"] == 10.0 * 12
    patch_doses = [
        dose.PatchDose(k[0], "", k[1], v["delivered_j_cm2"], 12) for k, v in doses.items()
    ]
    over = dose.ceiling_refusal(patch_doses, {("back", 660): 1.0}, ceiling_j_cm2=12.5)
    assert over is not None and over.code == "course_ceiling" and not over.overridable

    # The plot, read back: points per series as recorded.
    series = out["json"]["series"]
    assert len(series["nrs-before"]) == 12 and len(series["nrs-after"]) == 13
    assert len(series["dose-per-session"]) == 12
    svg = base64.b64decode(out["svg"]["content_base64"])
    assert _svg_points(svg) == {
        "nrs-before": 12,
        "nrs-after": 13,
        "odi-before": 12,
        "odi-after": 1,
        "dose-per-session": 12,
    }
    for raw in (base64.b64decode(out["png"]["content_base64"]), out["pbmctl_png"]):
        image = matplotlib.image.imread(io.BytesIO(raw), format="png")
        assert image.shape[:2] == (600, 800)
    plot_text, size = _pdf_text(base64.b64decode(out["plot-pdf"]["content_base64"]))
    assert size[0] > 500 and f"Course {course_id}" in plot_text

    # FHIR R4 bundle, validated by fhir.resources' models.
    bundle = Bundle.model_validate(out["fhir"]["bundle"])
    kinds = [e.resource.get_resource_type() for e in bundle.entry]
    assert kinds.count("Patient") == 1 and kinds.count("Procedure") == 12
    observations = [
        e.resource for e in bundle.entry if e.resource.get_resource_type() == "Observation"
    ]
    codes = [o.code.coding[0].code for o in observations]
    assert codes.count("72514-3") == 12 + 13 and codes.count("97909-6") == 12 + 1
    patient = next(e.resource for e in bundle.entry if e.resource.get_resource_type() == "Patient")
    assert patient.identifier[0].value == PATIENT and str(patient.birthDate) == "1968"
    session_bundle = Bundle.model_validate(out["session_fhir"]["bundle"])
    procedure = next(
        e.resource for e in session_bundle.entry if e.resource.get_resource_type() == "Procedure"
    )
    assert "session 5 of 12" in procedure.code.text
    assert procedure.reasonCode[0].coding[0].code == "M54.5"

    # The printable report, rendered and read back.
    text, size = _pdf_text(base64.b64decode(out["pdf"]["content_base64"]))
    assert size[0] > 700 and size[1] > 1000  # A4 at 100 dpi: 827 × 1169
    assert "Sessions given: 12 of 12" in text, text
    assert "makes no claim" in text
    text, _ = _pdf_text(base64.b64decode(out["session_pdf"]["content_base64"]))
    assert "Session 5 of 12 of course " + course_id in text, text

    # Restarted: the course is intact, and the foreign keys hold.
    records = home.state / "records.sqlite"
    with sqlite3.connect(records) as conn:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []

    def after_restart() -> dict[str, Any]:
        with RawClient(home.socket) as c:
            return dict(c.call("course.show", {"course_id": course_id})["summary"])

    again = await run_service(home, clock, after_restart)
    assert again == out["closed"]
    assert again["course"]["state"] == "closed" and again["sessions_given"] == 12
    assert json.dumps(again["outcomes"]) == json.dumps(summary["outcomes"])
