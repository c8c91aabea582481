"""pbmctl's human output: status, protocols, records and the live session view (rich).

Everything here renders the JSON the API returns; nothing is computed that
the daemon did not report, so the screen and `--json` always agree.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Container, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

FINAL_STATES = ("completed", "aborted", "faulted", "interrupted")

STATE_STYLE = {
    "emitting": "bold green",
    "gated": "bold yellow",
    "paused": "yellow",
    "waiting": "dim",
    "done": "green",
    "skipped": "dim",
    "stopped": "bold red",
    "completed": "bold green",
    "aborted": "bold red",
    "faulted": "bold red",
    "interrupted": "bold red",
    "running": "bold green",
    "armed": "bold yellow",
    "ready": "yellow",
}


def _num(v: Any, fmt: str = ".1f", dash: str = "—") -> str:
    if v is None:
        return dash
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return str(v)


def mmss(seconds: Any) -> str:
    if seconds is None:
        return "—"
    s = max(0, round(float(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def short_site(label: str | None, site: str | None = None) -> str:
    """ "L4–5, left, 2 cm lateral …" → "L4–5 left"; long pad labels are cut."""
    text = label or site or "?"
    parts = [p.strip() for p in text.split(",")]
    short = " ".join(parts[:2]) if len(parts) > 1 and len(parts[0]) <= 8 else parts[0]
    return short if len(short) <= 34 else short[:33] + "…"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


_WAITS = {
    "confirm placement": "confirm",
    "waiting for skin contact": "contact?",
    "paused by operator": "paused",
    "press the footswitch": "footswitch",
}


def _short_wait(reason: str) -> str:
    """ "confirm placement; waiting for skin contact" → "confirm+contact?"."""
    return "+".join(_WAITS.get(r.strip(), r.strip()) for r in reason.split(";"))


def _cell_site(p: Mapping[str, Any]) -> str:
    short = short_site(p.get("label"), p.get("site"))
    if len(short) > 18 and p.get("site"):
        short = str(p["site"])
    return _cut(short, 18)


def cause_text(code: Any, message: Any) -> str:
    """A stop cause with its code once: a trip's message already starts with its code
    ("E201 The controller…"), an operator's abort has a code and a plain message."""
    code_s = str(code or "")
    msg = str(message or "")
    if code_s and code_s not in msg.split():
        return f"{code_s} {msg}".strip()
    return msg or code_s


def ago(utc: Any) -> str:
    if not isinstance(utc, int | float):
        return ""
    return dt.datetime.fromtimestamp(float(utc)).strftime("%H:%M:%S")


# --------------------------------------------------------------------------- status


def _table(columns: Sequence[str], *, left: Container[str]) -> Table:
    """A plain table: the columns named in ``left`` are aligned left, the others right."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def render_status(console: Console, st: Mapping[str, Any]) -> None:
    d = st["daemon"]
    console.print(
        f"[bold]pbmd {d['version']}[/] · pid {d['pid']} · up {mmss(d['uptime_s'])} · "
        f"config {d['config']} · socket {d['socket']}",
        highlight=False,
    )
    for line in d.get("warnings", []):
        console.print(f"[bold yellow]⚠ {line}[/]", highlight=False)
    for c in st.get("controllers", []):
        _render_controller(console, c)
    console.print(_port_table(st.get("ports", [])))
    _render_health(console, st)
    s = st.get("session")
    if s is None:
        console.print("session: none since pbmd started")
    else:
        style = STATE_STYLE.get(s["state"], "")
        console.print(
            f"session {s['session_id']} · {s['protocol_id']} v{s['protocol_version']} · "
            f"patient {s.get('patient_ref') or '(hidden)'} · [{style}]{s['state']}[/]"
            + (
                f" · {cause_text(s['cause_code'], s.get('cause_message'))}"
                if s.get("cause_code")
                else ""
            ),
            highlight=False,
        )
    you = st.get("caller") or {}
    if you:
        roles = ", ".join(r for r in you.get("roles", []) if r != "reader") or "read-only"
        console.print(f"you: {you.get('user')} ({roles})", style="dim", highlight=False)


def _render_controller(console: Console, c: Mapping[str, Any]) -> None:
    if not c.get("connected"):
        console.print(
            f"[bold red]controller {c['name']}: not connected[/] ({c.get('lost') or c['url']})",
            highlight=False,
        )
        return
    il = c.get("interlocks") or {}
    marks = " ".join(
        f"{name} {'[green]✓[/]' if il.get(key) else '[red]✗[/]'}"
        for key, name in (("key", "key"), ("remote", "remote"), ("estop_released", "e-stop"))
    )
    scale = c.get("time_scale") or 1.0
    speed = f" · [yellow]simulated, device clock ×{scale:.0f}[/]" if c.get("simulated") else ""
    fault = f" · [bold red]FAULT {c['fault']}[/]" if c.get("fault") else ""
    console.print(
        f"controller [bold]{c['name']}[/] {c.get('serial')} fw {c.get('firmware')} · "
        f"{c.get('state')}{fault} · interlocks {marks}{speed}",
        highlight=False,
    )


def _port_table(ports: Sequence[Mapping[str, Any]]) -> Table:
    table = _table(
        ("port", "controller", "applicator", "λ nm", "area cm²", "emitting", "mW", "°C", "contact"),
        left=("controller", "applicator"),
    )
    for p in ports:
        app = p.get("applicator")
        table.add_row(
            str(p["port"]),
            f"{p['controller']}:{p['device_port']}",
            f"{app['kind']} {app['serial']}" if app else "[dim]none[/]",
            "/".join(str(w) for w in app["channels_nm"]) if app else "",
            _num(app["area_cm2"], "g") if app else "",
            _emitting(p),
            _num(p.get("power_mw"), ".0f"),
            _num(p.get("temperature_c"), ".1f"),
            "yes" if p.get("contact") else "no" if p.get("contact") is not None else "?",
        )
    return table


def _emitting(p: Mapping[str, Any]) -> str:
    """Whether a port emits; a stale reading says so (and how old it is) instead."""
    if p.get("telemetry_stale"):
        age = p.get("telemetry_age_s")
        return f"[yellow]stale {age:.1f} s[/]" if age is not None else "[yellow]stale[/]"
    if p.get("emitting") is None:
        return "?"
    return "[bold green]yes[/]" if p["emitting"] else "no"


def _render_health(console: Console, st: Mapping[str, Any]) -> None:
    """Readiness, records, calibration and the service latch."""
    ready = st["ready"]
    if ready["ok"]:
        console.print("ready for a session: [bold green]yes[/]")
    else:
        console.print(f"ready for a session: [bold red]no[/] — {ready['reason']}", highlight=False)
    rec = st["records"]
    free = rec.get("free_bytes")
    console.print(
        f"records: {'[green]healthy[/]' if rec['healthy'] else '[bold red]FAILING[/]'} · "
        f"{rec['path']}" + (f" · {free / 1e9:.1f} GB free" if free else ""),
        highlight=False,
    )
    cal = st["calibration"]
    if cal["due"]:
        flag = "[bold red]OVERDUE[/]" if cal["overdue"] else "[green]ok[/]"
        console.print(f"calibration due {cal['due']} {flag} ({cal['source']})", highlight=False)
    else:
        console.print("calibration: no due date configured", highlight=False)
    if st.get("service_required"):
        console.print(f"[bold red]SERVICE REQUIRED: {st['service_required']}[/]", highlight=False)


# --------------------------------------------------------------------------- protocols


def render_protocol_list(console: Console, protocols: Sequence[Mapping[str, Any]]) -> None:
    if not protocols:
        console.print("no protocols installed; install one with `pbmctl protocol install FILE`")
        return
    table = _table(
        ("id", "v", "title", "signed by", "installed"),
        left=("id", "title", "signed by", "installed"),
    )
    for p in protocols:
        table.add_row(
            p["id"],
            str(p["version"]),
            p["title"],
            p.get("signed_by") or "[bold red]UNSIGNED[/]",
            str(p.get("installed_at", "")),
        )
    console.print(table)


def render_protocol(console: Console, data: Mapping[str, Any]) -> None:
    entry = data.get("installed") or {}
    proto = data["protocol"]
    console.print(f"[bold]{proto['id']}[/] v{proto['version']} — {proto['title']}", highlight=False)
    if entry:
        console.print(
            f"signed by {entry.get('signed_by') or 'nobody (UNSIGNED)'} · installed "
            f"{entry.get('installed_at')} · sha256 {proto['sha256'][:16]}…",
            style="dim",
            highlight=False,
        )
    for port in proto["ports"]:
        app = port["applicator"]
        table = Table(
            title=f"port {port['port']}: {app['kind']}, "
            f"{', '.join(str(c) for c in app['channels_nm'])} nm, {app['beam_area_cm2']:g} cm²",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for col in ("#", "site", "λ nm", "mode", "mW", "mW/cm²", "time", "J", "J/cm²", "gate"):
            table.add_column(col, justify="left" if col in ("site", "mode") else "right")
        for s in port["steps"]:
            gating = s.get("gating") or {}
            gates = "".join(
                letter
                for letter, key in (
                    ("P", "confirm_placement"),
                    ("C", "skin_contact"),
                    ("F", "footswitch"),
                )
                if gating.get(key)
            )
            mode = s["mode"]
            if mode == "pulsed":
                mode = f"pulsed {s['pulse_hz']} Hz"
            table.add_row(
                str(s["index"] + 1),
                s["site"],
                str(s["wavelength_nm"]),
                mode,
                _num(s["power_mw"], ".4g"),
                _num(s["irradiance_mw_cm2"], ".4g"),
                mmss(s["time_s"]),
                _num(s["energy_j"], ".4g"),
                _num(s["fluence_j_cm2"], ".3g"),
                gates or "-",
            )
        console.print(table)
    console.print(
        f"session {mmss(proto['session_time_s'])} of emission (the phases one after another, "
        "the ports of a phase at once) · gates: P placement confirmed, C skin contact, "
        "F footswitch",
        highlight=False,
    )
    render_timeline(console, proto)
    contra = data.get("contraindications") or []
    if contra:
        console.print("contraindications (answer each with --contraindication NAME=yes|no):")
        for c in contra:
            console.print(f"  {c['name']}: {c['description']}", highlight=False)
    runnable = data.get("runnable")
    if runnable is not None:
        if runnable["ok"]:
            console.print("runs on the connected applicators: [green]yes[/]")
        else:
            console.print("runs on the connected applicators: [bold red]no[/]")
            for issue in runnable["issues"]:
                console.print(f"  {issue.get('message')}", highlight=False)


# --------------------------------------------------------------------------- records


def render_records(console: Console, sessions: Sequence[Mapping[str, Any]]) -> None:
    if not sessions:
        console.print("no sessions in the records")
        return
    table = _table(
        ("session", "started (UTC)", "protocol", "patient", "outcome", "steps", "prescribed J",
         "delivered J", "cause"),
        left=("session", "started (UTC)", "protocol", "patient", "outcome", "cause"),
    )  # fmt: skip
    for s in sessions:
        outcome = s.get("outcome") or s.get("state") or "?"
        table.add_row(
            str(s["id"]),
            str(s.get("started_utc", ""))[:19].replace("T", " "),
            f"{s.get('protocol_id')} v{s.get('protocol_version')}",
            str(s.get("patient_ref") or ""),
            f"[{STATE_STYLE.get(outcome, '')}]{outcome}[/]",
            str(s.get("steps") or 0),
            _num(s.get("prescribed_energy_j"), ".1f"),
            _num(s.get("delivered_controller_j") or s.get("delivered_host_j"), ".1f"),
            str(s.get("stop_cause_code") or ""),
        )
    console.print(table)


def render_record(console: Console, s: Mapping[str, Any]) -> None:
    console.print(
        f"[bold]session {s['id']}[/] · {s.get('protocol_id')} v{s.get('protocol_version')} · "
        f"patient {s.get('patient_ref')} · operator {s.get('operator') or '—'}",
        highlight=False,
    )
    outcome = s.get("outcome") or s.get("state")
    console.print(
        f"started {s.get('started_utc')} · ended {s.get('ended_utc') or '—'} · "
        f"[{STATE_STYLE.get(str(outcome), '')}]{outcome}[/]"
        + (
            f" · {cause_text(s['stop_cause_code'], s.get('stop_cause_message'))}"
            if s.get("stop_cause_code")
            else ""
        ),
        highlight=False,
    )
    table = _table(
        ("port", "#", "site", "λ nm", "prescribed J", "host J", "ctrl J", "J/cm²", "time s",
         "outcome"),
        left=("site", "outcome"),
    )  # fmt: skip
    for st in s.get("steps") or []:
        table.add_row(
            str(st["port"]),
            str(int(st["step_index"]) + 1),
            str(st["site"]),
            str(st["wavelength_nm"]),
            _num(st.get("prescribed_energy_j"), ".3f"),
            _num(st.get("delivered_host_j"), ".3f"),
            _num(st.get("delivered_controller_j"), ".3f"),
            _num(st.get("delivered_fluence_j_cm2"), ".3f"),
            _num(st.get("emitting_time_s"), ".1f"),
            str(st.get("outcome") or "—"),
        )
    console.print(table)
    events = s.get("events") or []
    if events:
        console.print(f"{len(events)} events; `--json` shows them all", style="dim")


# --------------------------------------------------------------------------- live view

_EVENT_KINDS = {
    "state",
    "step_started",
    "step_completed",
    "step_skipped",
    "port_waiting",
    "confirmed",
    "trip",
    "abort",
    "interrupt",
    "pause_requested",
    "resumed",
    "emission_ended",
}


def placement_waits(status: Mapping[str, Any] | None) -> list[tuple[int, int, str]]:
    """Ports waiting for the operator to confirm a placement: (port, step, site)."""
    out = []
    for p in (status or {}).get("ports") or []:
        reason = p.get("wait_reason") or ""
        if (
            p.get("state") == "gated"
            and "confirm placement" in reason
            and p.get("step") is not None
        ):
            out.append((int(p["port"]), int(p["step"]), short_site(p.get("label"), p.get("site"))))
    return out


def progress_line(p: Mapping[str, Any]) -> str:
    """A port's progress on one line, for logs and pipes:
    "10:02:03 port 1 step 1/2 660 nm emitting 40% 1.60/4.00 J/cm² 3:58 left"."""
    pstate = str(p.get("state"))
    shown = pstate
    if pstate in ("gated", "paused") and p.get("wait_reason"):
        shown = f"{pstate} ({p['wait_reason']})"
    step = f"step {int(p['step']) + 1}/{p.get('steps')}" if p.get("step") is not None else "—"
    frac = float(p.get("fraction") or 0.0)
    if pstate == "done" and p.get("step") is not None:
        frac = 1.0
    frac = min(frac, 1.0)
    nm = f"{p['wavelength_nm']} nm " if p.get("wavelength_nm") else ""
    left = f" {mmss(p.get('remaining_s'))} left" if pstate not in ("done", "skipped") else ""
    return (
        f"{time.strftime('%H:%M:%S')} port {p['port']} {step} {nm}{shown} {frac * 100:.0f}% "
        f"{_num(p.get('fluence_j_cm2'), '.2f')}/{_num(p.get('target_fluence_j_cm2'), '.2f')} "
        f"J/cm²{left}"
    )


def _cause_line(s: Mapping[str, Any]) -> Text:
    return Text(cause_text(s["cause_code"], s.get("cause_message")), style="bold red")


class SessionView:
    """The live view of one session: a row per port, prompts, recent events."""

    def __init__(self, status: Mapping[str, Any], *, auto_confirm: bool, interactive: bool) -> None:
        self.status: dict[str, Any] = dict(status)
        self.auto_confirm = auto_confirm
        self.interactive = interactive
        self.events: collections.deque[Text] = collections.deque(maxlen=7)
        self.notes: collections.deque[Text] = collections.deque(maxlen=4)
        self.time_scale: float | None = None
        self.started = time.monotonic()
        self.final_state: str | None = None
        self.typed = ""
        """What the operator has typed so far (the terminal does not echo it)."""

    def note(self, text: str, style: str = "") -> None:
        self.notes.append(Text(f"{time.strftime('%H:%M:%S')} {text}", style=style))

    def event_text(self, ev: Mapping[str, Any]) -> Text | None:
        kind = ev.get("kind")
        if kind not in _EVENT_KINDS:
            return None
        port = ev.get("port")
        step = ev.get("step")
        where = f"port {port}" if port is not None else "session"
        if step is not None:
            where += f" step {int(step) + 1}"
        style = {
            "trip": "bold red",
            "abort": "bold red",
            "interrupt": "bold red",
            "step_completed": "green",
            "port_waiting": "yellow",
        }.get(str(kind), "")
        return Text(
            f"{ago(ev.get('utc'))} {where}: {kind.replace('_', ' ')} — {ev.get('message')}",
            style=style,
        )

    def add_event(self, ev: Mapping[str, Any]) -> Text | None:
        text = self.event_text(ev)
        if text is not None:
            self.events.append(text)
        return text

    def render(self) -> RenderableType:
        s = self.status
        state = str(s.get("state"))
        head = Text.assemble(
            ("session ", "bold"),
            (str(s.get("session_id", ""))[:8], "bold"),
            f" · {s.get('protocol_id')} v{s.get('protocol_version')} · patient "
            f"{s.get('patient_ref') or '(hidden)'} · ",
            (state.upper(), STATE_STYLE.get(state, "")),
            f" · {mmss(time.monotonic() - self.started)} on screen",
        )
        parts: list[RenderableType] = [head]
        if self.time_scale and self.time_scale > 1.5:
            parts.append(
                Text(
                    f"simulated controller, device clock ×{self.time_scale:.0f}: doses and "
                    "times are treatment (device) time",
                    style="yellow",
                )
            )
        if s.get("cause_code"):
            parts.append(_cause_line(s))
        parts.append(self._port_table())
        waits = placement_waits(s) if state not in FINAL_STATES else []
        for port, _step, site in waits:
            if self.auto_confirm:
                continue
            hint = " [enter]" if self.interactive else " (pbmctl session confirm " + str(port) + ")"
            parts.append(
                Text(f"port {port}: confirm placement at {site}{hint}", style="bold yellow")
            )
        parts.extend(self.notes)
        if self.events:
            parts.append(Text("recent events", style="dim"))
            parts.extend(self.events)
        if self.interactive and state not in FINAL_STATES:
            if self.typed:
                parts.append(Text(f"> {self.typed}", style="bold"))
            parts.append(
                Text(
                    "enter: confirm the first prompt · N enter: confirm port N · p: pause all · "
                    "r: resume all · abort enter: stop everything · Ctrl-C: leave this view "
                    "(the session keeps running)",
                    style="dim",
                )
            )
        return Group(*parts)

    def _port_table(self) -> Table:
        table = Table(
            box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0), expand=False
        )
        for col, just, width in (
            ("port", "right", 4),
            ("step", "right", 4),
            ("site", "left", 18),
            ("λ nm", "right", 4),
            ("state", "left", None),
            ("dose", "left", 14),
            ("", "right", 4),
            ("mW/cm²", "right", 6),
            ("J/cm²", "right", 9),
            ("left", "right", 7),
            ("°C", "right", 4),
        ):
            # The state takes the room it needs ("paused+confirm"): never cut.
            table.add_column(
                col,
                justify=just,  # type: ignore[arg-type]
                no_wrap=width is not None,
                width=width,
                min_width=10 if width is None else None,
                overflow="fold",
            )
        for p in self.status.get("ports") or []:
            table.add_row(*self._port_row(p))
        return table

    def _port_row(self, p: Mapping[str, Any]) -> tuple[RenderableType, ...]:
        pstate = str(p.get("state"))
        frac = float(p.get("fraction") or 0.0)
        if pstate == "done":
            frac = max(frac, 1.0) if p.get("step") is not None else frac
        shown_state = pstate
        if pstate in ("gated", "paused") and p.get("wait_reason"):
            shown_state = _short_wait(str(p["wait_reason"]))
        step_text = f"{int(p['step']) + 1}/{p.get('steps')}" if p.get("step") is not None else "—"
        return (
            str(p["port"]),
            step_text,
            _cell_site(p),
            str(p.get("wavelength_nm") or "—"),
            Text(shown_state, style=STATE_STYLE.get(pstate, "")),
            ProgressBar(total=1.0, completed=min(frac, 1.0), width=14),
            f"{min(frac, 1.0) * 100:3.0f}%",
            _num(p.get("irradiance_mw_cm2"), ".1f"),
            _num(p.get("fluence_j_cm2"), ".2f") + "/" + _num(p.get("target_fluence_j_cm2"), ".2f"),
            mmss(p.get("remaining_s")) if pstate not in ("done", "skipped") else "—",
            _num(p.get("temperature_c"), ".1f"),
        )

    def render_final(self) -> RenderableType:
        s = self.status
        state = str(s.get("state"))
        lines: list[RenderableType] = [
            Text.assemble(
                ("session ", "bold"),
                (str(s.get("session_id")), "bold"),
                " ended: ",
                (state.upper(), STATE_STYLE.get(state, "")),
            )
        ]
        if s.get("cause_code"):
            lines.append(_cause_line(s))
        lines.append(
            Text(f"the treatment report: pbmctl report {s.get('session_id')}", style="dim")
        )
        return Group(*lines)


def render_timeline(console: Console, proto: Mapping[str, Any]) -> None:
    """Which port does what when (no waiting for the operator), each dose's source, and
    what a version 1 file means in version 2: the session as a clinician reads it first."""
    phases = proto.get("phases") or []
    timeline = proto.get("timeline") or []
    if phases:
        console.print("[bold]timeline[/] (if nobody waits; each phase starts when the last ends)")
    for number, phase in enumerate(phases, 1):
        console.print(
            f"  phase {number} {phase['id']!r}  {mmss(phase['start_s'])}–{mmss(phase['end_s'])}"
            f"  ports {', '.join(str(p) for p in phase['ports'])}: {phase['title']}",
            highlight=False,
        )
        for slot in timeline:
            if slot["phase"] == phase["id"]:
                console.print(
                    f"    {mmss(slot['start_s'])}–{mmss(slot['end_s'])}  port {slot['port']} "
                    f"step {slot['step'] + 1}: {slot['what']}",
                    highlight=False,
                )
    evidence = proto.get("evidence") or []
    if evidence:
        console.print("[bold]sources[/]")
        for e in evidence:
            console.print(f"  {e['ref']}: {e['relevance']}", highlight=False)
    for port in proto.get("ports") or []:
        for s in port["steps"]:
            if s.get("sources") or s.get("assumption"):
                console.print(
                    f"  port {port['port']} step {s['index'] + 1} dose — {_provenance(s)}",
                    highlight=False,
                )
    for total in proto.get("totals") or []:
        stated = ", ".join(
            text
            for text in (
                f"{total['energy_j']:g} J" if total.get("energy_j") is not None else "",
                f"{total['points']} points" if total.get("points") is not None else "",
            )
            if text
        )
        console.print(f"  total {total['label']}: {stated} — {_provenance(total)}", highlight=False)
    for line in proto.get("v1_reading") or []:
        console.print(f"[yellow]{line}[/]", highlight=False)


def _provenance(item: Mapping[str, Any]) -> str:
    """Where a dose or a total comes from: its sources and what they state, and the
    assumption it rests on where there is one (a dose may have both)."""
    parts = []
    if item.get("sources"):
        parts.append(f"{', '.join(item['sources'])}: {item.get('basis') or ''}")
    if item.get("assumption"):
        parts.append(f"assumption: {item['assumption']}")
    return " · ".join(parts)
