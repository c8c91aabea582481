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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

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
    Protocol,
    Site,
    Step,
)

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
    def session_time_s(self) -> float:
        """Ports run at once: the longest port's total emission time."""
        per_port: dict[int, float] = {}
        for dose in self.doses:
            per_port[dose.port] = per_port.get(dose.port, 0.0) + dose.time_s
        return max(per_port.values(), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """The protocol as the API and `protocol validate --json` show it, dose by dose."""
        protocol = self.protocol
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
            "course": protocol.course.model_dump(),
            "ports": ports,
        }


def load_protocol(path: str | FsPath, limits: Limits = DEFAULT_LIMITS) -> LoadedProtocol:
    """Read and check one protocol file."""
    name = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ProtocolInvalid(
            name,
            [
                Issue(
                    "unreadable",
                    f"cannot read the file: {exc.strerror or exc}",
                    file=name,
                    fix="check the path and its permissions",
                )
            ],
        ) from None
    return parse_protocol(data, source=name, limits=limits)


def parse_protocol(
    data: bytes | str, *, source: str = "<string>", limits: Limits = DEFAULT_LIMITS
) -> LoadedProtocol:
    """Check a protocol's text; ProtocolInvalid lists every error found."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) > MAX_FILE_BYTES:
        raise ProtocolInvalid(
            source,
            [
                Issue(
                    "too-large",
                    f"the file is larger than {MAX_FILE_BYTES} bytes",
                    file=source,
                    fix="a protocol is a few kilobytes: check that this is the right file",
                )
            ],
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ProtocolInvalid(
            source,
            [
                Issue(
                    "encoding",
                    f"byte 0x{raw[exc.start]:02x} is not UTF-8",
                    file=source,
                    line=line,
                    fix="save the file as UTF-8",
                )
            ],
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\(at line (\d+), column (\d+)\)", message)
        reason = re.sub(r" \(at line.*\)$", "", message)
        raise ProtocolInvalid(
            source,
            [
                Issue(
                    "toml-syntax",
                    f"not valid TOML: {reason}",
                    file=source,
                    line=int(found.group(1)) if found else None,
                    fix="correct the syntax at that place (see https://toml.io)",
                )
            ],
        ) from None
    except RecursionError:
        raise ProtocolInvalid(
            source,
            [
                Issue(
                    "toml-syntax",
                    "arrays or tables are nested too deeply to read",
                    file=source,
                    fix="a protocol needs at most a few levels of nesting",
                )
            ],
        ) from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise ProtocolInvalid(
            source,
            [Issue("toml-syntax", f"cannot read the TOML: {exc}", file=source)],
        ) from None

    issues: list[Issue] = []
    for line, claim in find_unverifiable(text):
        issues.append(
            Issue(
                "unverifiable-claim",
                f"the file repeats an unverifiable claim: {claim.claim}",
                line=line,
                allowed="claims with a verified source only",
                fix=claim.instead,
            )
        )

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
            if not (key.isdigit() and 1 <= int(key) <= MAX_PORTS) or not isinstance(raw_port, dict):
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


def _issue_from_pydantic(error: Mapping[str, Any]) -> Issue:
    loc: tuple[PathPart, ...] = tuple(error["loc"])
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    is_key = bool(loc) and loc[-1] == "[key]"
    path: Path = loc[:-1] if is_key else loc
    name = path[-1] if path else None
    owner, info = _field_at(loc)
    unit = _unit(name)
    description = info.description if info is not None and info.description else None

    if kind == "extra_forbidden":
        allowed_keys = sorted(owner.model_fields) if owner is not None else []
        if owner is None:
            parent_owner, _ = _field_at(loc[:-1])
            if parent_owner is not None:
                allowed_keys = sorted(parent_owner.model_fields)
        close = difflib.get_close_matches(str(name), allowed_keys, n=1)
        if len(path) > 1 and name in Protocol.model_fields:
            fix = (
                f"{name!r} is a top-level key: move it above the first [table] header "
                "(in TOML, keys after a header belong to that table)"
            )
        elif close:
            fix = f"did you mean {close[0]!r}? rename it"
        else:
            fix = "remove it"
        return Issue(
            "unknown-key",
            f"unknown key {name!r}",
            path=path,
            value=show_value(value),
            allowed=", ".join(allowed_keys) or None,
            fix=fix,
        )
    if kind == "missing":
        return Issue(
            "missing-key",
            f"required key {name!r} is missing" + (f" ({description})" if description else ""),
            path=path,
            allowed=_range_text(info, unit, {}),
            fix=f"add {name} = …",
        )
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        what = "port number" if is_key and path[:1] == ("ports",) else str(name)
        return Issue(
            "range",
            f"{what} is out of range",
            path=path,
            value=show_value(value) + unit,
            allowed=_range_text(None if is_key else info, unit, ctx),
            fix="use a value inside the allowed range"
            + (f" ({description})" if description else ""),
        )
    if kind in ("enum", "literal_error"):
        return Issue(
            "choice",
            "not one of the allowed values",
            path=path,
            value=show_value(value),
            allowed=str(ctx.get("expected", "")) or None,
            fix="use one of the allowed values (quoted, lower case)",
        )
    if kind in ("too_short", "too_long"):
        return Issue(
            "length",
            error["msg"],
            path=path,
            value=show_value(value),
            allowed=(
                f"at least {ctx['min_length']}"
                if kind == "too_short" and "min_length" in ctx
                else f"at most {ctx.get('max_length')}"
            )
            + (" items" if isinstance(value, list | dict) else " characters"),
            fix="add entries" if kind == "too_short" else "shorten it",
        )
    if kind == "string_pattern_mismatch":
        return Issue(
            "pattern",
            "not a valid identifier",
            path=path,
            value=show_value(value),
            allowed="3–64 characters: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit",
            fix="rename it, e.g. 'lumbar-chronic'",
        )
    if kind == "finite_number":
        return Issue(
            "type",
            "inf and nan are not allowed",
            path=path,
            value=show_value(value),
            allowed=_range_text(info, unit, {}) or "a finite number",
            fix="write a finite number",
        )
    if kind == "int_parsing" and is_key and path[:1] == ("ports",):
        return Issue(
            "range",
            "port keys are port numbers",
            path=path,
            value=show_value(path[-1] if path else value),
            allowed=f"1–{MAX_PORTS}",
            fix="name the table [ports.1] … [ports.8]",
        )
    if kind.endswith("_type") or kind in ("int_from_float", "is_instance_of", "model_type"):
        got = _TOML_TYPES.get(type(value), type(value).__name__)
        expected = {
            "int_type": "an integer",
            "int_from_float": "an integer (no decimal point)",
            "float_type": "a number",
            "string_type": "a string",
            "bool_type": "true or false",
            "list_type": "an array",
            "dict_type": "a table",
            "model_type": "a table",
        }.get(kind, error["msg"])
        return Issue(
            "type",
            f"expected {expected}, found {got}",
            path=path,
            value=show_value(value),
            allowed=_range_text(info, unit, {}) or expected,
            fix="write " + expected + (" without quotes" if isinstance(value, str) else ""),
        )
    return Issue(
        "value",
        str(error.get("msg", "invalid value")),
        path=path,
        value=show_value(value),
        allowed=_range_text(info, unit, ctx),
        fix=description,
    )
