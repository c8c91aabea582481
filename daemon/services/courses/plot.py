"""The course's trend as a figure: pain and ODI over the sessions, and the dose of
each session, for a clinician to print or attach (PNG, SVG or PDF).

matplotlib with its Agg canvas (no display, no GUI toolkit), built in a worker
thread. Each series carries an id (``gid``), so an SVG names its points: a
reader (or a test) can count them. The figure shows what was measured; it draws
no trend line and claims nothing about cause.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display

from matplotlib.figure import Figure

PlotFormat = Literal["png", "svg", "pdf"]
SERIES = ("nrs-before", "nrs-after", "odi-before", "odi-after", "dose-per-session")
"""The plotted series; in an SVG a line's points are the markers of the group with its
id, and each session's bar is the group ``dose-per-session-N``."""


def series(summary: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """(visit number, value) of every series, as plotted; the same data `--json` gives."""
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in SERIES}
    for o in summary.get("outcomes") or []:
        timing = "before" if o["timing"] == "before" else "after"
        if o["nrs_pain"] is not None:
            out[f"nrs-{timing}"].append((int(o["visit_number"]), float(o["nrs_pain"])))
        if o["odi_percent"] is not None:
            out[f"odi-{timing}"].append((int(o["visit_number"]), float(o["odi_percent"])))
    for v in summary.get("visits") or []:
        out["dose-per-session"].append((int(v["number"]), float(v["delivered_energy_j"])))
    return out


def render(summary: Mapping[str, Any], fmt: PlotFormat = "png") -> bytes:
    """The figure as bytes of the given format."""
    data = series(summary)
    course = summary["course"]
    fig = Figure(figsize=(8.0, 6.0), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    odi_axis = top.twinx()
    styles = {
        "nrs-before": (top, "o-", "tab:red", "pain NRS before"),
        "nrs-after": (top, "o--", "tab:orange", "pain NRS after"),
        "odi-before": (odi_axis, "s-", "tab:blue", "ODI % before"),
        "odi-after": (odi_axis, "s--", "tab:cyan", "ODI % after"),
    }
    handles = []
    for name, (axis, style, colour, label) in styles.items():
        points = data[name]
        if not points:
            continue
        (line,) = axis.plot(
            [p[0] for p in points], [p[1] for p in points], style, color=colour, label=label
        )
        line.set_gid(name)
        handles.append(line)
    top.set_ylim(-0.5, 10.5)
    top.set_ylabel("pain NRS (0–10)")
    odi_axis.set_ylim(-5, 105)
    odi_axis.set_ylabel("ODI (%)")
    if handles:
        top.legend(handles=handles, loc="upper right", fontsize="small")
    else:
        top.text(0.5, 0.5, "no outcomes recorded or shown", ha="center", transform=top.transAxes)
    top.set_title(
        f"Course {course['id']}: {course['diagnosis']} — measured values, not a claim of effect",
        fontsize="medium",
    )
    doses = data["dose-per-session"]
    bars = bottom.bar([p[0] for p in doses], [p[1] for p in doses], color="tab:green")
    for (number, _), bar in zip(doses, bars.patches, strict=True):
        bar.set_gid(f"dose-per-session-{number}")
    bottom.set_ylabel("delivered energy (J)")
    bottom.set_xlabel(
        "session of the course (outcomes 'before' belong to the session they precede)"
    )
    planned = int(summary["plan"]["sessions"])
    bottom.set_xlim(0.3, planned + 0.7)
    bottom.set_xticks(range(1, planned + 1))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, metadata=_metadata(fmt, course))
    return buf.getvalue()


def _metadata(fmt: PlotFormat, course: Mapping[str, Any]) -> dict[str, Any]:
    title = f"pbmd course {course['id']}"
    if fmt == "png":
        return {"Title": title, "Software": "pbmd"}
    if fmt == "pdf":
        return {"Title": title, "Creator": "pbmd"}
    return {"Title": title}
