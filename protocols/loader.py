"""Reading a protocol file: TOML → pydantic models → cross-field checks.

`parse_protocol` either returns a :class:`LoadedProtocol` (the protocol, its
warnings and every step resolved into doses) or raises
:class:`ProtocolInvalid` with all the errors it could find, each pointing at
the file, the line, the field, the value, what is allowed and how to fix it.
It raises nothing else, whatever the input (tests feed it random text).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from pbmd.protocols.anatomy import v1_reading
from pbmd.protocols.checks import PortView, ProtocolView, StepDose, check_view
from pbmd.protocols.errors import Issue, Path, PathPart, ProtocolInvalid, Severity, show_value
from pbmd.protocols.evidence import find_unverifiable
from pbmd.protocols.limits import DEFAULT_LIMITS, Limits
from pbmd.protocols.locate import key_lines, line_of
from pbmd.protocols.model import (
    MAX_PORTS,
    Applicator,
    ContraindicationField,
    Evidence,
    Phase,
    Protocol,
    Site,
    Step,
    Total,
)
from pbmd.protocols.schedule import V1_PHASE_ID, V1_PHASE_TITLE, Item, Timeline, build

MAX_FILE_BYTES = 1 << 20
_M = TypeVar("_M", bound=BaseModel)

_UNITS = (
    ("_mw_cm2", "mW/cm²"),
    ("_j_cm2", "J/cm²"),
    ("_cm2", "cm²"),
    ("_nm", "nm"),
    ("_ns", "ns"),
    ("_mw", "mW"),
    ("_hz", "Hz"),
    ("_permille", "‰"),
    ("_days", "days"),
    ("_j", "J"),
    ("_s", "s"),
)
_TOML_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


@dataclass(frozen=True, slots=True)
class LoadedProtocol:
    """A protocol that passed every check, with what the checks computed."""

    protocol: Protocol
    source: str
    sha256: str
    warnings: tuple[Issue, ...]
    doses: tuple[StepDose, ...]

    @property
    def phases(self) -> list[tuple[str, str]]:
        """(id, title) of each phase in order; a v1 file is one phase of every port."""
        if not self.protocol.phases:
            return [(V1_PHASE_ID, V1_PHASE_TITLE)]
        return [(p.id, p.title) for p in self.protocol.phases]

    def timeline(self) -> Timeline:
        """Which port does what when, with no waiting for the operator."""
        items = [
            Item(
                d.port,
                d.index,
                d.phase,
                d.time_s,
                f"{self.protocol.sites[d.site].label}: {d.wavelength_nm} nm, "
                f"{d.fluence_j_cm2:.3g} J/cm² ({d.energy_j:.3g} J) in {d.time_s:.0f} s",
            )
            for d in self.doses
        ]
        return build(self.phases, items)

    @property
    def session_time_s(self) -> float:
        """The critical path: phases one after another, the longest port of each."""
        return self.timeline().critical_path_s

    @property
    def v1_reading(self) -> list[str]:
        """What a version 1 file means in version 2 (empty for a v2 file)."""
        return v1_reading(self.protocol)

    def as_dict(self) -> dict[str, Any]:
        """The protocol as the API and `protocol validate --json` show it, dose by dose."""
        protocol = self.protocol
        timeline = self.timeline()
        ports = []
        for number, port in sorted(protocol.ports.items()):
            steps: list[dict[str, Any]] = []
            for dose in (d for d in self.doses if d.port == number):
                step = port.steps[dose.index]
                steps.append(
                    {
                        "index": dose.index,
                        "site": dose.site,
                        "site_label": protocol.sites[dose.site].label,
                        "wavelength_nm": dose.wavelength_nm,
                        "mode": dose.mode.value,
                        "pulse_hz": dose.pulse_hz,
                        "duty_permille": None if dose.duty is None else dose.duty * 1000,
                        "technique": dose.technique.value,
                        "power_mw": dose.power_mw,
                        "irradiance_mw_cm2": dose.irradiance_mw_cm2,
                        "beam_area_cm2": dose.area_cm2,
                        "time_s": dose.time_s,
                        "energy_j": dose.energy_j,
                        "fluence_j_cm2": dose.fluence_j_cm2,
                        "target": dose.target.value,
                        "max_time_s": dose.max_time_s,
                        "gating": step.gating.model_dump(),
                        "phase": self.phases[dose.phase][0],
                        "body_region": protocol.sites[dose.site].body_region,
                        "sources": list(step.sources),
                        "basis": step.basis,
                        "assumption": step.assumption,
                    }
                )
            ports.append(
                {
                    "port": number,
                    "applicator": port.applicator.model_dump(mode="json"),
                    "time_s": sum(float(s["time_s"]) for s in steps),
                    "steps": steps,
                }
            )
        return {
            "id": protocol.id,
            "version": protocol.version,
            "title": protocol.title,
            "sha256": self.sha256,
            "session_time_s": self.session_time_s,
            "schema_version": protocol.schema_version,
            "v1_reading": self.v1_reading,
            "course": protocol.course.model_dump(),
            "evidence": [e.model_dump() for e in protocol.evidence],
            "phases": [
                {
                    "id": slot.id,
                    "title": slot.title,
                    "start_s": slot.start_s,
                    "end_s": slot.end_s,
                    "ports": list(slot.ports),
                }
                for slot in timeline.phases
            ],
            "timeline": [
                {
                    "port": slot.item.port,
                    "step": slot.item.index,
                    "phase": self.phases[slot.item.phase][0],
                    "start_s": slot.start_s,
                    "end_s": slot.end_s,
                    "what": slot.item.what,
                }
                for slot in timeline.slots
            ],
            "totals": [t.model_dump(mode="json") for t in protocol.totals],
            "ports": ports,
        }


def load_protocol(path: str | FsPath, limits: Limits = DEFAULT_LIMITS) -> LoadedProtocol:
    """Read and check one protocol file."""
    name = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _unreadable(
            name,
            "unreadable",
            f"cannot read the file: {exc.strerror or exc}",
            fix="check the path and its permissions",
        ) from None
    return parse_protocol(data, source=name, limits=limits)


def parse_protocol(
    data: bytes | str, *, source: str = "<string>", limits: Limits = DEFAULT_LIMITS
) -> LoadedProtocol:
    """Check a protocol's text; ProtocolInvalid lists every error found."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    digest = hashlib.sha256(raw).hexdigest()
    text, document = _read_toml(raw, source)

    issues: list[Issue] = [
        Issue(
            "unverifiable-claim",
            f"the file repeats an unverifiable claim: {claim.claim}",
            line=line,
            allowed="claims with a verified source only",
            fix=claim.instead,
        )
        for line, claim in find_unverifiable(text)
    ]

    protocol: Protocol | None = None
    try:
        protocol = Protocol.model_validate(document)
    except ValidationError as exc:
        issues += [_issue_from_pydantic(error) for error in exc.errors()]
        view = _partial_view(document)
    else:
        view = ProtocolView.of(protocol)

    found_issues, doses = check_view(view, limits)
    issues += found_issues

    lines = key_lines(text)
    located = [
        dataclasses.replace(
            issue,
            file=source,
            line=issue.line if issue.line is not None else line_of(lines, issue.path),
        )
        for issue in issues
    ]
    errors = [i for i in located if i.severity is Severity.ERROR]
    warnings = [i for i in located if i.severity is Severity.WARNING]
    if errors or protocol is None:
        errors.sort(key=lambda i: (i.line is None, i.line or 0))
        raise ProtocolInvalid(source, errors, warnings)
    return LoadedProtocol(protocol, source, digest, tuple(warnings), tuple(doses))


def _unreadable(
    source: str, rule: str, message: str, *, line: int | None = None, fix: str | None = None
) -> ProtocolInvalid:
    """The refusal of a file that cannot be read as TOML at all: one issue, no checks."""
    return ProtocolInvalid(source, [Issue(rule, message, file=source, line=line, fix=fix)])


def _read_toml(raw: bytes, source: str) -> tuple[str, dict[str, Any]]:
    """The file's text and its TOML document; ProtocolInvalid if either cannot be had."""
    if len(raw) > MAX_FILE_BYTES:
        raise _unreadable(
            source,
            "too-large",
            f"the file is larger than {MAX_FILE_BYTES} bytes",
            fix="a protocol is a few kilobytes: check that this is the right file",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _unreadable(
            source,
            "encoding",
            f"byte 0x{raw[exc.start]:02x} is not UTF-8",
            line=raw[: exc.start].count(b"\n") + 1,
            fix="save the file as UTF-8",
        ) from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\(at line (\d+), column (\d+)\)", message)
        reason = re.sub(r" \(at line.*\)$", "", message)
        raise _unreadable(
            source,
            "toml-syntax",
            f"not valid TOML: {reason}",
            line=int(found.group(1)) if found else None,
            fix="correct the syntax at that place (see https://toml.io)",
        ) from None
    except RecursionError:
        raise _unreadable(
            source,
            "toml-syntax",
            "arrays or tables are nested too deeply to read",
            fix="a protocol needs at most a few levels of nesting",
        ) from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise _unreadable(source, "toml-syntax", f"cannot read the TOML: {exc}") from None


# --------------------------------------------------------------------------
# A partial view of a structurally invalid file, for the cross-field checks


def _lenient(model: type[_M], raw: Any) -> tuple[_M, frozenset[str]]:
    """Validate, and if that fails, once more without the fields that failed.

    The failures are reported already; this only lets the cross-field checks
    see the rest of the table (a required field that failed still fails).
    Returns the model and the names of the fields it had to leave out.
    """
    try:
        return model.model_validate(raw), frozenset()
    except ValidationError as exc:
        if not isinstance(raw, dict):
            raise
        bad = frozenset(str(e["loc"][0]) for e in exc.errors() if e["loc"])
        return model.model_validate({k: v for k, v in raw.items() if k not in bad}), bad


def _partial_view(document: Mapping[str, Any]) -> ProtocolView:
    view = ProtocolView()
    version = document.get("schema_version")
    view.schema_version = version if type(version) is int else None
    body_map_id = document.get("body_map")
    view.body_map = body_map_id if isinstance(body_map_id, str) else None
    raw_phases = document.get("phases", [])
    if isinstance(raw_phases, list):
        for index, raw in enumerate(raw_phases):
            try:
                view.phases.append((index, Phase.model_validate(raw)))
            except ValidationError:
                view.phases_complete = False
    else:
        view.phases_complete = False
    raw_totals = document.get("totals", [])
    if isinstance(raw_totals, list):
        for index, raw in enumerate(raw_totals):
            with contextlib.suppress(ValidationError):
                view.totals.append((index, Total.model_validate(raw)))
    raw_sites = document.get("sites")
    if isinstance(raw_sites, dict):
        for key, raw in raw_sites.items():
            try:
                view.sites[key] = _lenient(Site, raw)[0]
            except ValidationError:
                view.sites_complete = False
    else:
        view.sites_complete = False
    try:
        view.contraindications = frozenset(
            TypeAdapter(list[ContraindicationField]).validate_python(
                document.get("contraindications")
            )
        )
    except ValidationError:
        view.contraindications = None
    raw_evidence = document.get("evidence")
    if isinstance(raw_evidence, list):
        for index, raw in enumerate(raw_evidence):
            with contextlib.suppress(ValidationError):
                view.evidence.append((index, _lenient(Evidence, raw)[0]))
    raw_ports = document.get("ports")
    if isinstance(raw_ports, dict):
        for key, raw_port in sorted(raw_ports.items()):
            digits = key.isascii() and key.isdigit()  # "²".isdigit(), but int("²") fails
            if not (digits and 1 <= int(key) <= MAX_PORTS) or not isinstance(raw_port, dict):
                continue
            try:
                applicator: Applicator | None = _lenient(Applicator, raw_port.get("applicator"))[0]
            except ValidationError:
                applicator = None
            port = PortView(key, int(key), applicator)
            raw_steps = raw_port.get("steps")
            if isinstance(raw_steps, list):
                for index, raw_step in enumerate(raw_steps):
                    with contextlib.suppress(ValidationError):
                        step, dropped = _lenient(Step, raw_step)
                        port.steps.append((index, step))
                        if dropped:
                            port.dropped[index] = dropped
            view.ports.append(port)
    return view


# --------------------------------------------------------------------------
# pydantic errors in a technician's words


def _unit(name: PathPart | None) -> str:
    if not isinstance(name, str):
        return ""
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return " " + unit
    return ""


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional down to the type that holds the value."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            arms = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = arms[0]
        else:
            return tp


def _field_at(loc: tuple[PathPart, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model that holds the last element of `loc`, and that element's field."""
    current: Any = Protocol
    owner: type[BaseModel] | None = None
    info: FieldInfo | None = None
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if not isinstance(part, str) or part not in current.model_fields:
                return current, None
            owner, info = current, current.model_fields[part]
            current = info.annotation
            continue
        origin = typing.get_origin(current)
        args = typing.get_args(current)
        if origin is dict and len(args) == 2:
            current = args[0] if part == "[key]" else args[1]
        elif origin is list and args:
            current = args[0]
        else:
            return owner, info
        owner = None
    return owner, info


def _range_text(info: FieldInfo | None, unit: str, ctx: Mapping[str, Any]) -> str | None:
    bounds: dict[str, Any] = dict(ctx)
    if info is not None:
        for meta in info.metadata:
            for attr in ("ge", "gt", "le", "lt"):
                value = getattr(meta, attr, None)
                if value is not None:
                    bounds.setdefault(attr, value)
    low = (
        f"{bounds['ge']:g} ≤ "
        if "ge" in bounds
        else (f"{bounds['gt']:g} < " if "gt" in bounds else "")
    )
    high = (
        f" ≤ {bounds['le']:g}"
        if "le" in bounds
        else (f" < {bounds['lt']:g}" if "lt" in bounds else "")
    )
    if not low and not high:
        return None
    return f"{low}value{high}{unit}"


@dataclass(frozen=True)
class _Failure:
    """One pydantic error, read once: where it points, its kind, and the field it concerns."""

    error: Mapping[str, Any]
    loc: tuple[PathPart, ...]
    kind: str
    ctx: Mapping[str, Any]
    value: Any
    is_key: bool
    path: Path
    name: PathPart | None
    owner: type[BaseModel] | None
    info: FieldInfo | None
    unit: str
    description: str | None

    @classmethod
    def of(cls, error: Mapping[str, Any]) -> _Failure:
        loc: tuple[PathPart, ...] = tuple(error["loc"])
        is_key = bool(loc) and loc[-1] == "[key]"
        path: Path = loc[:-1] if is_key else loc
        name = path[-1] if path else None
        owner, info = _field_at(loc)
        return cls(
            error=error,
            loc=loc,
            kind=error["type"],
            ctx=error.get("ctx") or {},
            value=error.get("input"),
            is_key=is_key,
            path=path,
            name=name,
            owner=owner,
            info=info,
            unit=_unit(name),
            description=info.description if info is not None and info.description else None,
        )

    @property
    def is_port_key(self) -> bool:
        return self.is_key and self.path[:1] == ("ports",)

    def issue(
        self,
        rule: str,
        message: str,
        *,
        allowed: str | None,
        fix: str | None,
        value: str | None = None,
    ) -> Issue:
        """An issue at the failure's path, showing its input unless `value` says otherwise."""
        shown = show_value(self.value) if value is None else value
        return Issue(rule, message, path=self.path, value=shown, allowed=allowed, fix=fix)


def _issue_from_pydantic(error: Mapping[str, Any]) -> Issue:
    """Say a pydantic error in the protocol's words: what is wrong, what is allowed, the fix."""
    failure = _Failure.of(error)
    for applies, explain in _EXPLAINERS:
        if applies(failure):
            return explain(failure)
    return failure.issue(
        "value",
        str(error.get("msg", "invalid value")),
        allowed=_range_text(failure.info, failure.unit, failure.ctx),
        fix=failure.description,
    )


def _unknown_key(f: _Failure) -> Issue:
    name = f.name
    allowed_keys = sorted(f.owner.model_fields) if f.owner is not None else []
    if f.owner is None:
        parent_owner, _ = _field_at(f.loc[:-1])
        if parent_owner is not None:
            allowed_keys = sorted(parent_owner.model_fields)
    close = difflib.get_close_matches(str(name), allowed_keys, n=1)
    if len(f.path) > 1 and name in Protocol.model_fields:
        fix = (
            f"{name!r} is a top-level key: move it above the first [table] header "
            "(in TOML, keys after a header belong to that table)"
        )
    elif close:
        fix = f"did you mean {close[0]!r}? rename it"
    else:
        fix = "remove it"
    return f.issue(
        "unknown-key",
        f"unknown key {name!r}",
        allowed=", ".join(allowed_keys) or None,
        fix=fix,
    )


def _missing_key(f: _Failure) -> Issue:
    return Issue(  # nothing to show: the key is absent
        "missing-key",
        f"required key {f.name!r} is missing" + (f" ({f.description})" if f.description else ""),
        path=f.path,
        allowed=_range_text(f.info, f.unit, {}),
        fix=f"add {f.name} = …",
    )


def _out_of_range(f: _Failure) -> Issue:
    what = "port number" if f.is_port_key else str(f.name)
    return f.issue(
        "range",
        f"{what} is out of range",
        value=show_value(f.value) + f.unit,
        allowed=_range_text(None if f.is_key else f.info, f.unit, f.ctx),
        fix="use a value inside the allowed range"
        + (f" ({f.description})" if f.description else ""),
    )


def _not_a_choice(f: _Failure) -> Issue:
    return f.issue(
        "choice",
        "not one of the allowed values",
        allowed=str(f.ctx.get("expected", "")) or None,
        fix="use one of the allowed values (quoted, lower case)",
    )


def _bad_length(f: _Failure) -> Issue:
    ctx = f.ctx
    return f.issue(
        "length",
        f.error["msg"],
        allowed=(
            f"at least {ctx['min_length']}"
            if f.kind == "too_short" and "min_length" in ctx
            else f"at most {ctx.get('max_length')}"
        )
        + (" items" if isinstance(f.value, list | dict) else " characters"),
        fix="add entries" if f.kind == "too_short" else "shorten it",
    )


def _bad_identifier(f: _Failure) -> Issue:
    return f.issue(
        "pattern",
        "not a valid identifier",
        allowed="3–64 characters: lower-case letters, digits and '-', "
        "starting and ending with a letter or digit",
        fix="rename it, e.g. 'lumbar-chronic'",
    )


def _not_finite(f: _Failure) -> Issue:
    return f.issue(
        "type",
        "inf and nan are not allowed",
        allowed=_range_text(f.info, f.unit, {}) or "a finite number",
        fix="write a finite number",
    )


def _bad_port_key(f: _Failure) -> Issue:
    return f.issue(
        "range",
        "port keys are port numbers",
        value=show_value(f.path[-1] if f.path else f.value),
        allowed=f"1–{MAX_PORTS}",
        fix="name the table [ports.1] … [ports.8]",
    )


_EXPECTED_TYPES = {
    "int_type": "an integer",
    "int_from_float": "an integer (no decimal point)",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
}


def _wrong_type(f: _Failure) -> Issue:
    got = _TOML_TYPES.get(type(f.value), type(f.value).__name__)
    expected = _EXPECTED_TYPES.get(f.kind, f.error["msg"])
    return f.issue(
        "type",
        f"expected {expected}, found {got}",
        allowed=_range_text(f.info, f.unit, {}) or expected,
        fix="write " + expected + (" without quotes" if isinstance(f.value, str) else ""),
    )


# Which explanation a pydantic error gets, first match wins; the rest are said as pydantic says.
_EXPLAINERS: tuple[tuple[Callable[[_Failure], bool], Callable[[_Failure], Issue]], ...] = (
    (lambda f: f.kind == "extra_forbidden", _unknown_key),
    (lambda f: f.kind == "missing", _missing_key),
    (
        lambda f: f.kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"),
        _out_of_range,
    ),
    (lambda f: f.kind in ("enum", "literal_error"), _not_a_choice),
    (lambda f: f.kind in ("too_short", "too_long"), _bad_length),
    (lambda f: f.kind == "string_pattern_mismatch", _bad_identifier),
    (lambda f: f.kind == "finite_number", _not_finite),
    (lambda f: f.kind == "int_parsing" and f.is_port_key, _bad_port_key),
    (
        lambda f: (
            f.kind.endswith("_type") or f.kind in ("int_from_float", "is_instance_of", "model_type")
        ),
        _wrong_type,
    ),
)
