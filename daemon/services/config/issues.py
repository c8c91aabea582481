"""A configuration problem as the operator reads it: key, value found, problem, fix."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from pydantic_core import PydanticCustomError


@dataclasses.dataclass(frozen=True)
class ConfigIssue:
    """One problem: where (key), what was found (value), what is wrong, how to fix it."""

    key: str
    value: Any
    problem: str
    fix: str
    missing: bool = False
    excerpt: str = ""
    """Lines of the file to show under the problem (a syntax error's line and a caret)."""

    def render(self) -> str:
        if self.key == FILE_KEY:  # the file as a whole: no key, no value to show
            head = self.problem
        else:
            shown = "(missing)" if self.missing else toml_value(self.value)
            head = f"{self.key} = {shown}: {self.problem}"
        shown_lines = "".join(f"\n      {line}" for line in self.excerpt.splitlines())
        return f"{head}{shown_lines}\n    fix: {self.fix}"


FILE_KEY = "(file)"
"""The key of a problem with the file itself (absent, unreadable, not TOML)."""


class ConfigError(Exception):
    """The configuration cannot be used; `issues` lists every problem found."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.issues)
        head = f"{self.source}: {n} configuration error{'s' if n != 1 else ''}:"
        return "\n".join([head, *(f"  {i.render()}" for i in self.issues)])


def toml_value(value: Any, limit: int = 60) -> str:
    """A value as TOML would spell it (shortened)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif isinstance(value, dict):
        text = "{ " + ", ".join(f"{k} = {toml_value(v, 20)}" for k, v in value.items()) + " }"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(toml_value(v, 20) for v in value) + "]"
    elif isinstance(value, dt.date | dt.datetime):
        text = value.isoformat()
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fail(problem: str, fix: str) -> PydanticCustomError:
    return PydanticCustomError("pbmd_config", "{problem}", {"problem": problem, "fix": fix})
