"""Checks across sections, and pydantic's errors said as the operator can fix them."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from pbmd.daemon.services.config.issues import ConfigIssue
from pbmd.daemon.services.config.model import (
    _NAME_RE,
    MAX_LOGICAL_PORTS,
    Config,
    _split_target,
)
from pbmd.hw_sim.config import MAX_PORTS


def _cross_checks(raw: Mapping[str, Any]) -> list[ConfigIssue]:
    """Checks across sections, on the raw document, so that they run even when other
    parts are wrong (every problem is reported in one pass)."""
    issues: list[ConfigIssue] = []
    controllers = raw.get("controllers")
    names = _controller_names(controllers, issues)
    ports = raw.get("ports")
    if isinstance(ports, dict):
        used: dict[tuple[str, int], str] = {}
        for key, target in ports.items():
            issues += _port_issues(key, target, names, used)
    elif ports is None and isinstance(controllers, list) and len(controllers) > 1:
        issues.append(
            ConfigIssue(
                "ports",
                None,
                "with more than one controller the logical port map is required",
                'add a [ports] table, e.g. 1 = "left:1", 2 = "left:2", 3 = "right:1"',
                missing=True,
            )
        )
    protocols = raw.get("protocols")
    if isinstance(protocols, dict) and protocols.get("preload_shipped") is True:
        trusted = protocols.get("trust_test_key") is True or protocols.get("allow_unsigned") is True
        if not trusted:
            issues.append(
                ConfigIssue(
                    "protocols.preload_shipped",
                    True,
                    "the shipped protocols are signed with the TEST key, which is not trusted",
                    "also set protocols.trust_test_key = true (development only), or remove "
                    "preload_shipped",
                )
            )
    return issues


def _controller_names(controllers: Any, issues: list[ConfigIssue]) -> list[str]:
    """The controllers' names in order; a repeated name is an issue."""
    names: list[str] = []
    if isinstance(controllers, list):
        for i, c in enumerate(controllers):
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                if c["name"] in names:
                    issues.append(
                        ConfigIssue(
                            f"controllers[{i + 1}].name",
                            c["name"],
                            "two controllers have this name",
                            "give every controller its own name",
                        )
                    )
                names.append(c["name"])
    return names


def _port_issues(
    key: Any, target: Any, names: Sequence[str], used: dict[tuple[str, int], str]
) -> list[ConfigIssue]:
    """One entry of the [ports] map; ``used`` collects the controller ports mapped so far."""
    where = f"ports.{key}"
    if not str(key).isdigit() or not 1 <= int(key) <= MAX_LOGICAL_PORTS:
        return [
            ConfigIssue(
                where,
                target,
                f"{key!r} is not a logical port number",
                f'use logical ports 1..{MAX_LOGICAL_PORTS} as keys, e.g. 1 = "main:1"',
            )
        ]
    if not isinstance(target, str) or not re.match(r"^[^:]+:\d+$", target):
        return [
            ConfigIssue(
                where, target, "not a controller port", 'write "CONTROLLER:PORT", e.g. "main:1"'
            )
        ]
    issues: list[ConfigIssue] = []
    name, number = _split_target(target)
    if names and name not in names:
        # Only names that are themselves valid are offered: an invalid one is an
        # error of its own (controllers[N].name), not a fix.
        valid = [n for n in names if _NAME_RE.match(n)]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        issues.append(
            ConfigIssue(
                where,
                target,
                f"no controller is named {name!r}{hint}",
                f"use one of the [[controllers]] names: {', '.join(valid)}"
                if valid
                else "correct the [[controllers]] names first, then use one of them here",
            )
        )
    if not 1 <= number <= MAX_PORTS:
        issues.append(
            ConfigIssue(
                where,
                target,
                f"device port {number} does not exist",
                f"controllers number their ports 1..{MAX_PORTS}",
            )
        )
    if (name, number) in used:
        issues.append(
            ConfigIssue(
                where,
                target,
                f"{target} is already logical port {used[(name, number)]}",
                "map each controller port to one logical port only",
            )
        )
    used[(name, number)] = str(key)
    return issues


_TYPE_NAMES = {
    "int": "an integer, e.g. 5",
    "float": "a number, e.g. 2.5",
    "bool": "true or false",
    "string": 'a string in quotes, e.g. "main"',
    "list": "an array, e.g. [1, 2]",
    "dict": "a table",
    "model": "a table",
    "date": "a TOML date, e.g. 2025-06-30",
    "path": 'a path in quotes, e.g. "/var/lib/pbmd"',
}


def _key(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part + 1}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model owning the last key of `loc` (for did-you-mean)."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        model = _unwrap_model(ann)
    return model


def _unwrap_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    meta = getattr(ann, "__origin__", None)
    if meta is not None:
        return _unwrap_model(meta)
    return None


def _number_within_bounds(loc: Sequence[str | int], name: str) -> str:
    """A number's type said with the key's own bounds and an example inside them (its
    default where it has one), never the generic example, which may be out of range."""
    model = _model_at(loc)
    field = model.model_fields.get(str(loc[-1])) if model is not None and loc else None
    if field is None:
        return name
    low = high = None
    for m in field.metadata:
        low = getattr(m, "ge", getattr(m, "gt", low))
        high = getattr(m, "le", getattr(m, "lt", high))
    kind = name.split(", e.g.")[0]
    default = field.default
    example: Any = default if isinstance(default, int | float) and default is not True else None
    if example is None:
        example = low if low is not None else high
    if example is None:
        return name
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}, e.g. {example}"
    bound = f"at least {low}" if low is not None else f"at most {high}"
    return f"{kind} {bound}, e.g. {example}"


def _fix_for(err: Mapping[str, Any]) -> tuple[str, str]:
    kind = str(err["type"])
    ctx = err.get("ctx") or {}
    loc = tuple(err["loc"])
    if kind == "pbmd_config":
        return str(ctx["problem"]), str(ctx["fix"])
    if kind == "missing":
        return "required key is missing", f"add {loc[-1]} = … (see docs/configuration.md)"
    if kind == "extra_forbidden":
        model = _model_at(loc)
        known = sorted(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        return (
            "unknown key",
            f"{hint}remove it or use a known key: {', '.join(known)}"
            if known
            else f"{hint}remove it",
        )
    bounds = {
        "greater_than_equal": ("ge", "at least"),
        "greater_than": ("gt", "above"),
        "less_than_equal": ("le", "at most"),
        "less_than": ("lt", "below"),
    }
    if kind in bounds:
        key, word = bounds[kind]
        return f"must be {word} {ctx.get(key)}", f"use a value {word} {ctx.get(key)}"
    if kind == "literal_error":
        return "not an accepted value", f"use one of {ctx.get('expected')}"
    if kind in ("too_short", "too_long"):
        return str(err["msg"]).lower(), "see docs/configuration.md for what this key holds"
    if kind == "string_pattern_mismatch":
        return "wrong form", f"use a value matching {ctx.get('pattern')}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        base = kind.split("_")[0]
        name = _TYPE_NAMES.get(base, base)
        if base in ("int", "float"):
            name = _number_within_bounds(loc, name)
        return f"wrong type ({type(err.get('input')).__name__})", f"use {name}"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, "), "see docs/configuration.md"
    return str(err["msg"]), "see docs/configuration.md"


def _issues_from(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[ConfigIssue]:
    out = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        problem, fix = _fix_for({**err, "loc": loc})
        missing = err["type"] == "missing"
        out.append(
            ConfigIssue(_key(loc), None if missing else err.get("input"), problem, fix, missing)
        )
    return out
