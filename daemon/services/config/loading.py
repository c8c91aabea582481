"""Reading a configuration: the file or the embedded default, checked in one pass.

Relative paths in a file are relative to the file's directory; command-line
overrides are checked like the file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from pbmd.daemon.services.config.checks import _cross_checks, _issues_from
from pbmd.daemon.services.config.issues import FILE_KEY, ConfigError, ConfigIssue
from pbmd.daemon.services.config.model import Config, check_key_file
from pbmd.daemon.services.config.paths import MAX_SOCKET_PATH_BYTES
from pbmd.hw_sim.config import MAX_TIME_SCALE
from pbmd.protocols.signing import PublicKey

DEFAULT_SOURCE = "<embedded default>"

DEFAULT_TOML = """\
# pbmd embedded default configuration (development).
# A simulated four-port controller runs as the daemon's child (ports 1-3 DUO pads,
# port 4 the 905 nm probe). State goes under the user's state directory and
# the control socket under the runtime directory (see docs/configuration.md).
# The shipped protocols are signed with the pbmd TEST key: NOT FOR CLINICAL USE.

[[controllers]]
name = "sim"
link = "sim"

[controllers.sim]
time_scale = 1.0

[protocols]
trust_test_key = true     # the shipped TEST key; never in a clinic
preload_shipped = true    # install the shipped library at start
"""


def mqtt_config_model() -> type[BaseModel] | None:
    """`pbmd.daemon.services.mqtt.MqttConfig`, when this pbmd has the MQTT publisher."""
    if importlib.util.find_spec("pbmd.daemon.services.mqtt") is None:
        return None
    module = importlib.import_module("pbmd.daemon.services.mqtt")
    model = getattr(module, "MqttConfig", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


# --------------------------------------------------------------------------- loading


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in a file are relative to the file's directory."""

    def fix(section: Any, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            p = Path(section[key]).expanduser()
            section[key] = str(p if p.is_absolute() else base / p)

    fix(raw, "state_dir")
    fix(raw.get("api"), "socket")
    fix(raw.get("protocols"), "directory")
    fix(raw.get("records"), "path")
    mqtt = raw.get("mqtt")
    fix(mqtt, "password_file")
    if isinstance(mqtt, dict):
        for key in ("ca_file", "cert_file", "key_file"):
            fix(mqtt.get("tls"), key)
    protocols = raw.get("protocols")
    if isinstance(protocols, dict) and isinstance(protocols.get("trusted_keys"), list):
        protocols["trusted_keys"] = [
            str(Path(k).expanduser() if Path(k).expanduser().is_absolute() else base / k)
            if isinstance(k, str)
            else k
            for k in protocols["trusted_keys"]
        ]


def parse(text: str, source: str = DEFAULT_SOURCE, base: Path | None = None) -> Config:
    """Check a configuration text; ConfigError lists every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [syntax_issue(text, exc)]) from None
    return validate(raw, source, base)


_TOML_POSITION = re.compile(
    r"^(?P<what>.*?)\s*\(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$"
)
_TOML_HINTS = {
    "Illegal character '\\n'": "a line ends inside a string: close the string with its quote "
    "on the same line",
    "Unterminated string": "a string is never closed: close it with its quote",
    "Expected '=' after a key in a key/value pair": "a key without = and a value",
    "Invalid value": "a value TOML does not know: strings go in double quotes, "
    "dates as 2025-06-30, true/false in lower case",
    "Expected ']' at the end of a table declaration": "a [table] header is not closed with ]",
    "Unclosed array": "an array is not closed with ]",
}


def syntax_issue(text: str, exc: tomllib.TOMLDecodeError) -> ConfigIssue:
    """A TOML syntax error: where (line, column), what is wrong, the line itself."""
    found = _TOML_POSITION.match(str(exc))
    what = found.group("what") if found else str(exc)
    line = int(found.group("line")) if found and found.group("line") else None
    col = int(found.group("col")) if found and found.group("col") else None
    where = f"line {line}, column {col}" if line is not None else "at the end of the file"
    hint = _TOML_HINTS.get(what)
    problem = f"{where}: not valid TOML: " + (f"{hint} ({what})" if hint else what)
    excerpt = ""
    lines = text.splitlines()
    if line is not None and 1 <= line <= len(lines):
        prefix = f"{line} | "
        excerpt = f"{prefix}{lines[line - 1]}\n{' ' * (len(prefix) - 2)}| {' ' * ((col or 1) - 1)}^"
    return ConfigIssue(
        FILE_KEY,
        None,
        problem,
        f"correct line {line} (strings in double quotes, one key = value per line, [table] headers)"
        if line is not None
        else "complete the file (a string, array or table left open?)",
        missing=True,
        excerpt=excerpt,
    )


def validate(raw: dict[str, Any], source: str, base: Path | None = None) -> Config:
    if base is not None:
        _resolve_paths(raw, base)
    issues = _cross_checks(raw)
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        issues = _issues_from(exc) + issues
    mqtt_raw = raw.get("mqtt")
    if mqtt_raw is not None:
        model = mqtt_config_model()
        if model is not None:
            try:
                model.model_validate(mqtt_raw)
            except ValidationError as exc:
                issues += _issues_from(exc, ("mqtt",))
    if config is not None:
        path = config.socket_path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            issues.append(
                ConfigIssue(
                    "api.socket" if config.api.socket is not None else "state_dir",
                    str(path),
                    f"the control socket path is {len(os.fsencode(path))} bytes long; Unix "
                    f"sockets allow {MAX_SOCKET_PATH_BYTES}",
                    "set api.socket to a shorter path, e.g. /run/pbmd/control.sock",
                )
            )
    if issues:
        raise ConfigError(source, _dedupe(issues))
    assert config is not None
    return config


def _dedupe(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    seen: set[tuple[str, str]] = set()
    out = []
    for i in issues:
        if (i.key, i.problem) not in seen:
            seen.add((i.key, i.problem))
            out.append(i)
    return out


def load(path: Path | None) -> tuple[Config, str]:
    """The configuration in `path`, or the embedded default; and where it came from."""
    if path is None:
        return parse(DEFAULT_TOML), DEFAULT_SOURCE
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            source,
            [
                ConfigIssue(
                    FILE_KEY,
                    None,
                    "no such file",
                    "give the path of an existing file to --config, or leave --config out to "
                    "run the embedded development default",
                    missing=True,
                )
            ],
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            source,
            [
                ConfigIssue(
                    FILE_KEY,
                    None,
                    f"cannot read it: {exc}",
                    "make it a UTF-8 text file readable by the user pbmd runs as",
                    missing=True,
                )
            ],
        ) from None
    return parse(text, source, base=path.resolve().parent), source


def with_overrides(
    config: Config,
    source: str,
    *,
    state_dir: Path | None = None,
    socket_path: Path | None = None,
    sim_time_scale: float | None = None,
) -> Config:
    """Command-line overrides, checked like the file (the key names the option)."""
    raw = config.model_dump(mode="python", exclude_unset=False)
    issues: list[ConfigIssue] = []
    if state_dir is not None:
        raw["state_dir"] = state_dir.absolute()
    if socket_path is not None:
        raw["api"]["socket"] = socket_path.absolute()
    if sim_time_scale is not None:
        sims = [c for c in raw["controllers"] if c["link"] == "sim"]
        if not sims:
            issues.append(
                ConfigIssue(
                    "--sim-time-scale",
                    sim_time_scale,
                    "no controller of this configuration is simulated",
                    'leave the option out, or use a controller with link = "sim"',
                )
            )
        elif not 1.0 <= sim_time_scale <= MAX_TIME_SCALE:
            issues.append(
                ConfigIssue(
                    "--sim-time-scale",
                    sim_time_scale,
                    f"must be within 1..{MAX_TIME_SCALE:g}",
                    f"use a speed-up between 1 and {MAX_TIME_SCALE:g}",
                )
            )
        else:
            for c in sims:
                c["sim"] = {**(c.get("sim") or {}), "time_scale": float(sim_time_scale)}
    if issues:
        raise ConfigError(source, issues)
    try:
        return Config.model_validate(_strip_none_sections(raw))
    except ValidationError as exc:
        raise ConfigError(source, _issues_from(exc)) from None


def _strip_none_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """model_dump writes None for optional sections; feed them back as absent."""
    return {k: v for k, v in raw.items() if v is not None}


def check_trusted_keys(config: Config) -> list[PublicKey]:
    """The trusted keys (files checked again: they may have changed since loading)."""
    from pbmd.protocols.library import TEST_KEY_FILE

    keys = [check_key_file(p) for p in config.protocols.trusted_keys]
    if config.protocols.trust_test_key:
        keys.append(PublicKey.from_file(TEST_KEY_FILE))
    return keys
