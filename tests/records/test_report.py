"""The treatment report: the Jenkins & Carroll set per step, prescribed vs delivered on
both channels, per port, every stop cause; JSON with stable keys; plain text; "—" for
anything not recorded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pbmd.daemon.services.records import RecordStore
from pbmd.daemon.services.report import DASH, build_report, render_text, session_report

from . import synthetic as syn

REPORT_KEYS = [
    "report_version", "session_id", "patient_ref", "operator", "started_utc", "ended_utc",
    "duration_s", "state", "outcome", "stop_cause_code", "stop_cause_message", "protocol_id",
    "protocol_version", "protocol_title", "protocol_sha256", "signing_key_id", "plan_hash",
    "controller_serial", "controller_firmware", "controllers", "session_token", "time_scale",
    "course_sessions", "course_interval_days", "notes", "contraindications", "steps", "ports",
    "energy_prescribed_j", "energy_host_j", "energy_controller_j", "controller_channel_final",
    "stop_causes", "unassigned_emissions", "alerts",
    "skin_type", "phases", "skin_patches",
]
STEP_KEYS = [
    "port", "step_index", "site", "site_label", "region", "points_at_site",
    "area_covered_cm2", "technique", "wavelength_nm", "mode", "average_power_setpoint_mw",
    "average_power_delivered_mw", "peak_power_mw", "pulse_hz", "pulse_width_ns",
    "duty_percent", "beam_area_cm2", "irradiance_setpoint_mw_cm2",
    "irradiance_delivered_mw_cm2", "target_kind", "target_value", "exposure_time_planned_s",
    "exposure_time_delivered_s", "energy_prescribed_j", "energy_host_j",
    "energy_controller_j", "energy_host_vs_prescribed_percent",
    "energy_controller_vs_prescribed_percent", "controller_channel_final",
    "fluence_prescribed_j_cm2", "fluence_delivered_j_cm2", "outcome", "stop_cause_code",
    "stop_cause_message", "started_utc", "ended_utc", "emissions",
]


async def stored(store: RecordStore, write: Any, session_id: str) -> dict[str, Any]:
    write(store, session_id)
    await store.sync()
    s = await store.get_session(session_id)
    assert s is not None
    return s


async def test_completed_session_json(store: RecordStore) -> None:
    report = build_report(await stored(store, syn.write_completed, "ok"))
    doc = json.loads(report.to_json())
    assert list(doc) == REPORT_KEYS
    assert all(list(step) == STEP_KEYS for step in doc["steps"])
    assert doc["report_version"] == 2 and doc["outcome"] == "completed"
    assert doc["protocol_id"] == "chronic-lumbar" and doc["protocol_version"] == 3
    assert doc["protocol_sha256"] == "a" * 64 and doc["signing_key_id"] == "RWTtestkey"
    assert doc["plan_hash"] == "b" * 64 and doc["patient_ref"] == "PAT-0042"
    assert doc["duration_s"] == pytest.approx(700.0)
    assert doc["contraindications"] == [
        {"name": "cancer", "present": None,
         "description": "histologically proven cancer at or near the treated site"},
        {"name": "epilepsy", "present": False,
         "description": "epilepsy (pulsed red light at 5–10 Hz can trigger seizures)"},
        {"name": "pregnancy", "present": False,
         "description": "pregnancy, when treating the abdomen, low back or pelvis"},
    ]

    red, infrared, probe = doc["steps"]
    assert (red["port"], red["step_index"], red["wavelength_nm"]) == (1, 0, 660)
    assert red["mode"] == "continuous" and red["technique"] == "contact"
    # the pad's 660 and 830 nm steps are one placement: one point, not two
    assert red["points_at_site"] == 1 and probe["points_at_site"] == 1
    assert red["average_power_setpoint_mw"] == 1800.0
    assert red["average_power_delivered_mw"] == pytest.approx(1800.0, rel=1e-4)
    assert red["irradiance_setpoint_mw_cm2"] == pytest.approx(10.0)
    assert red["irradiance_delivered_mw_cm2"] == pytest.approx(10.0, rel=1e-4)
    assert red["beam_area_cm2"] == 180.0 and red["area_covered_cm2"] == 180.0
    assert red["energy_prescribed_j"] == 720.0
    assert red["energy_host_j"] == pytest.approx(720.36)
    assert red["energy_controller_j"] == pytest.approx(719.64)
    assert red["energy_host_vs_prescribed_percent"] == pytest.approx(0.05)
    assert red["energy_controller_vs_prescribed_percent"] == pytest.approx(-0.05)
    assert red["fluence_prescribed_j_cm2"] == pytest.approx(4.0)
    assert red["fluence_delivered_j_cm2"] == pytest.approx(719.64 / 180)
    assert red["controller_channel_final"] is True
    # continuous: no pulse parameters, none invented
    assert red["pulse_hz"] is None and red["pulse_width_ns"] is None
    assert red["duty_percent"] is None and red["peak_power_mw"] is None
    assert infrared["wavelength_nm"] == 830

    # the superpulsed probe: width follows from duty and rate (0.2 % at 10 kHz = 200 ns)
    assert probe["mode"] == "pulsed" and probe["pulse_hz"] == 10_000.0
    assert probe["duty_percent"] == pytest.approx(0.2)
    assert probe["pulse_width_ns"] == pytest.approx(200.0)
    assert probe["peak_power_mw"] == 100_000.0
    assert probe["irradiance_setpoint_mw_cm2"] == pytest.approx(400.0)
    assert probe["target_kind"] == "energy_j" and probe["target_value"] == 4.0
    assert probe["emissions"][0]["energy_budget_j"] == pytest.approx(4.2)
    assert probe["emissions"][0]["controller_stop_reason"] == "host_stop"

    ports = {p["port"]: p for p in doc["ports"]}
    assert ports[1]["applicator_serial"] == "DUO-1001" and ports[1]["steps"] == 2
    assert ports[1]["steps_completed"] == 2
    assert ports[1]["energy_prescribed_j"] == pytest.approx(1440.0)
    assert ports[1]["energy_host_j"] == pytest.approx(1440.36)
    assert ports[1]["energy_controller_j"] == pytest.approx(1440.36)
    assert ports[1]["energy_host_vs_prescribed_percent"] == pytest.approx(0.025)
    assert ports[4]["energy_controller_j"] == pytest.approx(3.998)
    assert doc["energy_prescribed_j"] == pytest.approx(1444.0)

    sources = [c["source"] for c in doc["stop_causes"]]
    assert sources.count("session") == 1
    assert sources.count("emission (controller)") == 3 and sources.count("emission (host)") == 3
    assert doc["alerts"] == [] and doc["unassigned_emissions"] == []


async def test_faulted_session_reports_every_stop_cause(store: RecordStore) -> None:
    report = build_report(await stored(store, syn.write_faulted, "bad"))
    assert report.outcome == "faulted" and report.stop_cause_code == "E105"
    assert report.signing_key_id is None

    causes = [(c.source, c.port, c.step_index, c.code) for c in report.stop_causes]
    assert causes[0] == ("session", None, None, "E105")
    assert ("step", 4, 0, "E404") in causes
    assert ("step", 1, 1, "E105") in causes
    assert ("emission (controller)", 4, 0, "energy_budget") in causes
    assert ("emission (controller)", 1, 1, "all_off") in causes
    assert ("emission (controller)", 1, 0, "host_stop") in causes
    messages = [c.message for c in report.stop_causes]
    assert "controller energy budget reached (secondary dose channel)" in messages
    assert "trip E105" in messages and "ended by the controller" in messages
    assert [(a.code, a.severity) for a in report.alerts] == [("E105", "error")]

    by_key = {(s.port, s.step_index): s for s in report.steps}
    ir = by_key[(1, 1)]
    assert ir.outcome == "faulted"
    assert ir.energy_controller_vs_prescribed_percent == pytest.approx((190 / 720 - 1) * 100)
    probe = by_key[(4, 0)]
    assert probe.energy_host_vs_prescribed_percent == pytest.approx(-7.5)
    assert probe.energy_controller_vs_prescribed_percent == pytest.approx(5.0)

    text = render_text(report)
    assert "FAULTED — E105 The daemon's and the controller's dose measurements disagree." in text
    assert "Signing key       —" in text
    for line in (
        "session: E105 The daemon's and the controller's dose measurements disagree.",
        "step (port 4, step 1): E404 step faulted: A backup dose channel ended an emission",
        "emission (controller) (port 4, step 1, emission #",
        ": controller energy budget reached (secondary dose channel)",
        "ALL_OFF: every port stopped",
        "emission (host) (port 1, step 2, emission #",
    ):
        assert line in text, line
    section = text.split("Warnings and errors")[1]
    assert "E105" in section and "error" in section


async def test_text_report_layout(store: RecordStore) -> None:
    report = await session_report(store, "none")
    assert report is None
    syn.write_completed(store, "ok")
    await store.sync()
    report = await session_report(store, "ok")
    assert report is not None
    text = report.to_text()
    print(text)
    for heading in (
        "PHOTOBIOMODULATION TREATMENT REPORT",
        "Contraindication screening",
        "Beam and exposure parameters per step (Jenkins & Carroll 2011)",
        "Dose per step: prescribed vs delivered (host and controller channels)",
        "Per port",
        "Emissions",
        "Stop causes",
        "Warnings and errors",
    ):
        assert heading in text
    assert "chronic-lumbar version 3 (Chronic low back pain, lumbar)" in text
    assert "10 sessions, at least 2 day(s) apart" in text
    assert "60x (simulated controller)" in text
    assert "\x1b" not in text  # plain text: no terminal styling

    lines = text.splitlines()
    # every table: header, dashes, rows; columns line up (the dashes' width is the width)
    for i, line in enumerate(lines):
        if line.startswith("  --"):
            header, rule = lines[i - 1], line
            assert len(header.rstrip()) <= len(rule)
            for row in lines[i + 1:]:
                if not row.startswith("  ") or not row.strip():
                    break
                assert len(row) <= len(rule), row

    beam = lines[lines.index("Beam and exposure parameters per step (Jenkins & Carroll 2011)")
                 + 3]
    assert beam.split()[:7] == ["1", "1", "Lumbar,", "L1–S1", "contact", "1", "660"]
    assert DASH in beam  # no pulse parameters for a continuous step
    probe = lines[lines.index("Beam and exposure parameters per step (Jenkins & Carroll 2011)")
                  + 5]
    assert "100000.0" in probe and "200" in probe and "0.20" in probe
    dose = lines[lines.index(
        "Dose per step: prescribed vs delivered (host and controller channels)") + 3]
    assert "720.000" in dose and "720.360" in dose and "+0.05" in dose and "-0.05" in dose
    total = next(line for line in lines if line.startswith("  all"))
    assert "1444.000" in total and "3/3" in total


def test_missing_values_are_dashes_never_invented() -> None:
    """A session with the bare minimum recorded: a step that never emitted."""
    session: dict[str, Any] = {
        "id": "bare",
        "started_utc": "2024-05-01T10:00:00.000000Z",
        "ended_utc": None,
        "state": "running",
        "outcome": None,
        "contraindications": {},
        "ports": [],
        "steps": [
            {
                "port": 2, "step_index": 0, "site": "knee", "wavelength_nm": 830,
                "mode": "pulsed", "power_setpoint_mw": 100.0, "area_cm2": 0.5,
                "target_kind": "energy_j", "target_value": 4.0, "pulse_hz": 1000.0,
            }
        ],
        "emissions": [],
        "events": [],
    }
    report = build_report(session)
    doc = report.to_dict()
    step = doc["steps"][0]
    for key in (
        "energy_prescribed_j", "energy_host_j", "energy_controller_j",
        "energy_host_vs_prescribed_percent", "average_power_delivered_mw",
        "pulse_width_ns", "duty_percent", "peak_power_mw", "exposure_time_delivered_s",
        "fluence_delivered_j_cm2", "outcome", "technique", "controller_channel_final",
    ):
        assert step[key] is None, key
    assert doc["duration_s"] is None and doc["protocol_id"] is None
    assert doc["stop_causes"] == []  # nothing stopped yet: no cause is made up
    text = render_text(report)
    assert "UNFINISHED" in text
    assert "Patient           —" in text and "Protocol SHA-256  —" in text
    beam, dose = [line for line in text.splitlines() if line.split()[:3] == ["2", "1", "knee"]
                  or line.split()[:3] == ["2", "1", "energy_j"]]
    assert beam.count(DASH) == 7 and dose.count(DASH) == 11
    assert "0.0" not in dose.replace("100.0", "")  # no zero stands in for an unknown


async def test_dose_recovered_from_counters_is_reported(store: RecordStore) -> None:
    """An emission whose step row was lost: its dose is shown, not dropped."""
    store.session_started(syn.session_start("r"))
    store.reconcile_port("r", 4, controller_session_delivered_uj=2_500_000)
    store.session_ended("r", outcome="interrupted", stop_cause_code="E902",
                        stop_cause_message="daemon restarted during the session")
    await store.sync()
    s = await store.get_session("r")
    assert s is not None
    report = build_report(s)
    assert len(report.unassigned_emissions) == 1
    assert report.unassigned_emissions[0].controller_energy_j == pytest.approx(2.5)
    assert report.energy_controller_j == pytest.approx(2.5)
    assert any("unrecorded" in c.message for c in report.stop_causes)
    assert "unrecorded (reconciled from the controller counters)" in report.to_text()


async def test_aborted_session_shows_every_planned_step(store: RecordStore) -> None:
    """What was missed: the steps the session ended before are listed with 0 delivered,
    and the prescribed total is the whole plan's, not only the steps that started."""
    report = build_report(await stored(store, syn.write_aborted_early, "cut"))
    by_key = {(s.port, s.step_index): s for s in report.steps}
    assert sorted(by_key) == [(1, 0), (1, 1), (4, 0)]
    assert by_key[(1, 0)].outcome == "aborted"
    for key in ((1, 1), (4, 0)):
        missed = by_key[key]
        assert missed.outcome == "not started"
        assert missed.energy_host_j == 0.0 and missed.energy_controller_j == 0.0
        assert missed.energy_controller_vs_prescribed_percent == pytest.approx(-100.0)
    assert by_key[(1, 1)].energy_prescribed_j == pytest.approx(720.0)
    assert report.energy_prescribed_j == pytest.approx(720.0 + 720.0 + 4.0)
    ports = {p.port: p for p in report.ports}
    assert (ports[1].steps_completed, ports[1].steps) == (0, 2)
    assert (ports[4].steps, ports[4].controller) == (1, "b")

    text = render_text(report)
    total = next(line for line in text.splitlines() if line.startswith("  all"))
    assert "0/3" in total and "1444.000" in total
    assert "2 planned step(s) not started" in text
    # both controllers are named in the header
    assert "a: serial SIM-A, firmware 1.2.3, ports 1" in text
    assert "b: serial SIM-B, firmware 1.2.4, ports 4" in text
    # the probe's covered area as recorded (0.5 cm²), not rounded to 0
    beam = next(line.split() for line in text.splitlines() if line.split()[:2] == ["4", "1"])
    assert "0.5" in beam


async def test_cause_code_once_and_repeated_causes_counted(store: RecordStore) -> None:
    """A trip's message starts with its code: the code is not printed twice; a step
    paused three times says so once, with the count."""
    report = build_report(await stored(store, syn.write_aborted_early, "paused"))
    step = next(s for s in report.steps if (s.port, s.step_index) == (1, 0))
    assert step.stop_cause_message == "paused by operator ×3; aborted by operator"
    session = await stored(store, syn.write_faulted, "trip")
    session["stop_cause_message"] = "E105 " + syn.E105  # as a trip's describe() writes it
    text = render_text(build_report(session))
    assert "FAULTED — E105 The daemon's" in text and "E105 E105" not in text
