"""Findings about a protocol that a technician can act on.

Every finding names the file, the field (and line where the text allows),
the value found, what is allowed and how to fix it. A loader collects all of
them before it refuses a file, so one edit-and-retry cycle fixes them all.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PathPart = str | int
Path = tuple[PathPart, ...]


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"


def format_path(path: Sequence[PathPart]) -> str:
    """`ports.4.steps[2].power_mw`: TOML keys joined with dots, list indices in brackets."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(file)"


@dataclass(frozen=True, slots=True)
class Issue:
    """One finding: an error refuses the file, a warning is shown and kept."""

    rule: str
    message: str
    file: str = "<string>"
    path: Path = ()
    line: int | None = None
    value: str | None = None
    allowed: str | None = None
    fix: str | None = None
    severity: Severity = Severity.ERROR

    @property
    def field(self) -> str:
        return format_path(self.path)

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        text = f"{where}: {self.severity.value}: {self.field}"
        if self.value is not None:
            text += f" = {self.value}"
        text += f": {self.message}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        if self.fix:
            text += f"; fix: {self.fix}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity.value,
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "value": self.value,
            "message": self.message,
            "allowed": self.allowed,
            "fix": self.fix,
        }


def show_value(value: Any) -> str:
    """A short, TOML-like rendering of an offending value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{table}"
    if isinstance(value, list | tuple):
        text = repr(list(value))
        return text if len(text) <= 60 else f"[{len(value)} items]"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class IssuesError(ValueError):
    """A refusal with every reason for it: a headline, then one issue a line."""

    def __init__(self, headline: str, errors: tuple[Issue, ...]) -> None:
        self.errors = errors
        super().__init__("\n".join([headline, *(f"  {issue}" for issue in errors)]))

    @property
    def rules(self) -> set[str]:
        return {issue.rule for issue in self.errors}


class ProtocolInvalid(IssuesError):
    """A protocol file was refused; `errors` holds every reason, `warnings` the rest."""

    def __init__(
        self, source: str, errors: Iterable[Issue], warnings: Iterable[Issue] = ()
    ) -> None:
        self.source = source
        self.warnings: tuple[Issue, ...] = tuple(warnings)
        found = tuple(errors)
        count = len(found)
        super().__init__(f"{source}: {count} error{'s' if count != 1 else ''}", found)


class PlanError(IssuesError):
    """A protocol cannot be planned on the applicators the controller reported."""

    def __init__(self, protocol_id: str, errors: Iterable[Issue]) -> None:
        self.protocol_id = protocol_id
        super().__init__(
            f"protocol {protocol_id!r} cannot run on the connected applicators:", tuple(errors)
        )
