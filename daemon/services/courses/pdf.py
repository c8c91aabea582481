"""A printable treatment report (PDF) of a session or of a course, for the patient file.

fpdf2 writes the pages (text a PDF reader can search and copy, with the course
plot as a picture); matplotlib's own PDF output is a figure, not a document of
tables and text. The built-in PDF fonts cover Latin-1 only, so other characters
are written in plain equivalents.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from fpdf import FPDF

from pbmd.daemon.services.courses import plot

_PLAIN = str.maketrans(
    {
        "–": "-",
        "—": "-",
        "…": "...",
        "×": "x",
        "≥": ">=",
        "≤": "<=",
        "’": "'",
        "‘": "'",
        "“": '"',
        "”": '"',
        "→": "->",
    }
)
MEASURED_ONLY = (
    "Values as measured and recorded. This report shows what was delivered and measured; "
    "it makes no claim that the treatment caused any change."
)


def _latin1(text: Any) -> str:
    return str(text).translate(_PLAIN).encode("latin-1", "replace").decode("latin-1")


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


class _Report(FPDF):
    def __init__(self, title: str) -> None:
        super().__init__(format="A4")
        self.report_title = _latin1(title)
        self.set_title(self.report_title)
        self.set_creator("pbmd")
        self.set_auto_page_break(auto=True, margin=15)
        self.add_page()

    def header(self) -> None:
        self.set_font("Helvetica", "B", 13)
        self.cell(0, 8, self.report_title, new_x="LMARGIN", new_y="NEXT")
        self.set_font("Helvetica", "", 9)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("Helvetica", "I", 8)
        self.cell(0, 6, f"pbmd treatment report - page {self.page_no()}", align="C")

    def heading(self, text: str) -> None:
        self.ln(2)
        self.set_font("Helvetica", "B", 11)
        self.cell(0, 7, _latin1(text), new_x="LMARGIN", new_y="NEXT")
        self.set_font("Helvetica", "", 9)

    def line_text(self, text: str) -> None:
        self.multi_cell(0, 5, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    def rows(self, head: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        with self.table(text_align="LEFT", line_height=5, first_row_as_headings=True) as t:
            r = t.row()
            for h in head:
                r.cell(_latin1(h))
            for row in rows:
                r = t.row()
                for value in row:
                    r.cell(_latin1(value))


def _course_part(doc: _Report, summary: Mapping[str, Any], with_plot: bool) -> None:
    c, plan = summary["course"], summary["plan"]
    doc.heading("Course")
    code = f" [{c['diagnosis_code']}]" if c.get("diagnosis_code") else ""
    doc.line_text(f"Course {c['id']} ({c['state']}), opened {c['opened_utc'][:10]}")
    doc.line_text(f"Diagnosis: {c['diagnosis']}{code}")
    doc.line_text(
        f"Protocol {c['protocol_id']} version {c['protocol_version']}; plan: {plan['sessions']} "
        f"sessions at least {plan['min_interval_days']:g} day(s) apart"
        + (f", at most {plan['sessions_per_week']} a week" if plan["sessions_per_week"] else "")
        + (f", reassessment after {plan['reassess_after']}" if plan["reassess_after"] else "")
    )
    doc.line_text(f"Sessions given: {summary['sessions_given']} of {plan['sessions']}")
    doc.heading("Sessions")
    doc.rows(
        ("#", "date (UTC)", "outcome", "delivered J", "prescribed J", "override"),
        [
            (
                v["number"],
                v["visit_utc"][:16].replace("T", " "),
                v["session_outcome"] or "running",
                _num(v["delivered_energy_j"], 1),
                _num(v["prescribed_energy_j"], 1),
                f"{', '.join(v['overridden'])}: {v['override_reason']}" if v["overridden"] else "",
            )
            for v in summary["visits"]
        ],
    )
    doc.heading("Outcome measures (pain NRS 0-10, ODI %)")
    if summary.get("outcomes_hidden"):
        doc.line_text("Not shown to this role.")
    elif not summary["outcomes"]:
        doc.line_text("None recorded.")
    else:
        doc.rows(
            ("session", "timing", "pain NRS", "ODI %", "recorded (UTC)", "by"),
            [
                (
                    o["visit_number"],
                    o["timing"],
                    "-" if o["nrs_pain"] is None else o["nrs_pain"],
                    _num(o["odi_percent"], 1),
                    o["recorded_utc"][:16].replace("T", " "),
                    o["recorded_by"] or "",
                )
                for o in summary["outcomes"]
            ],
        )
    doc.heading(
        f"Cumulative fluence over the course (ceiling {summary['course_ceiling_j_cm2']:g} J/cm2 "
        "per patch of skin and wavelength)"
    )
    doc.rows(
        ("patch of skin", "wavelength nm", "J/cm2", "sessions"),
        [
            (d["label"], d["wavelength_nm"], _num(d["delivered_j_cm2"], 3), d["sessions"])
            for d in summary["cumulative_dose"]
        ],
    )
    if with_plot:
        doc.add_page()
        doc.heading("Trend as measured")
        doc.image(io.BytesIO(plot.render(summary, "png")), w=180)


def course_pdf(summary: Mapping[str, Any]) -> bytes:
    c = summary["course"]
    doc = _Report(f"Treatment course report - patient {c['patient_id']}")
    _course_part(doc, summary, with_plot=True)
    doc.ln(3)
    doc.line_text(MEASURED_ONLY)
    return bytes(doc.output())


def session_pdf(session: Mapping[str, Any], context: Mapping[str, Any] | None) -> bytes:
    doc = _Report(f"Treatment session report - patient {session['patient_ref']}")
    if context is not None:
        doc.line_text(
            f"Session {context['session_number']} of {context['plan']['sessions']} of course "
            f"{context['course']['id']}"
        )
    doc.heading("Session")
    doc.line_text(f"Session {session['id']}")
    doc.line_text(
        f"Protocol {session['protocol_id']} version {session['protocol_version']}"
        f" ({session.get('protocol_title') or ''})"
    )
    doc.line_text(
        f"Started {str(session['started_utc'])[:19]} UTC, ended "
        f"{str(session.get('ended_utc') or '-')[:19]}; outcome {session.get('outcome') or '-'}"
    )
    doc.line_text(
        f"Operator {session.get('operator') or '-'}; controller "
        f"{session.get('controller_serial') or '-'}; skin type {session.get('skin_type') or '-'}"
    )
    doc.heading("Steps")
    doc.rows(
        ("port", "step", "site", "nm", "prescribed J", "delivered J", "J/cm2", "outcome"),
        [
            (
                s["port"],
                int(s["step_index"]) + 1,
                s.get("site_label") or s["site"],
                s["wavelength_nm"],
                _num(s.get("prescribed_energy_j")),
                _num(s.get("delivered_controller_j")),
                _num(s.get("delivered_fluence_j_cm2"), 3),
                s.get("outcome") or "-",
            )
            for s in session["steps"]
        ],
    )
    if context is not None:
        _course_part(doc, context, with_plot=False)
    doc.ln(3)
    doc.line_text(MEASURED_ONLY)
    return bytes(doc.output())
