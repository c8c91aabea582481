"""The effective configuration written back as TOML (`pbmd config show`)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from pbmd.daemon.services.config.model import Config


def render_toml(config: Config) -> str:
    """The effective configuration as TOML (for `pbmd config show`)."""
    data = config.model_dump(mode="python", exclude_none=True)
    data["state_dir"] = str(config.resolved_state_dir)
    data.setdefault("api", {})["socket"] = str(config.socket_path)
    data.setdefault("device_id", config.resolved_device_id)
    lines: list[str] = []
    _emit_toml(lines, data, ())
    return "\n".join(lines).strip() + "\n"


def _emit_toml(lines: list[str], table: Mapping[str, Any], path: tuple[str, ...]) -> None:
    scalars = {
        k: v
        for k, v in table.items()
        if not isinstance(v, dict | list)
        or (isinstance(v, list) and not any(isinstance(x, dict) for x in v))
    }
    for k, v in scalars.items():
        lines.append(f"{_bare(str(k))} = {_toml_literal(v)}")
    for k, v in table.items():
        if k in scalars:
            continue
        sub = (*path, _bare(str(k)))
        if isinstance(v, dict):
            if not v:
                continue
            lines.append("")
            lines.append(f"[{'.'.join(sub)}]")
            _emit_toml(lines, v, sub)
        else:
            for item in v:
                lines.append("")
                lines.append(f"[[{'.'.join(sub)}]]")
                _emit_toml(lines, item, sub)


def _bare(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else f'"{key}"'


def _toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
