"""The daemon's configuration: a TOML file checked by pydantic, or the embedded default.

Every problem in a file is reported at once, each with the file, the key, the
value found and what to write instead (Klipper's habit: the operator fixes the
file in one pass, not one error per restart). Relative paths in a file are
relative to the file's directory.

With no file, pbmd runs the embedded development default (`DEFAULT_TOML`): a
simulated four-port controller in the daemon's own process, its state under
the user's state directory, and the shipped protocols, which are signed with
the pbmd TEST key and are NOT FOR CLINICAL USE.

Paths that follow the environment (state directory, control socket) are
resolved here once, for the daemon and for pbmctl alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import importlib
import importlib.util
import os
import pwd
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pbmd.hw_sim.applicators import APPLICATORS, default_ports
from pbmd.hw_sim.config import MAX_PORTS, MAX_TIME_SCALE
from pbmd.protocols.limits import Limits
from pbmd.protocols.signing import PublicKey, SignatureError

SYSTEM_USER = "pbmd"
SYSTEM_STATE_DIR = Path("/var/lib/pbmd")
SYSTEM_SOCKET = Path("/run/pbmd/control.sock")
SYSTEM_CONFIG = Path("/etc/pbmd/pbmd.toml")
SOCKET_NAME = "control.sock"
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes with the terminating NUL
MAX_LOGICAL_PORTS = 8

DEFAULT_SOURCE = "<embedded default>"

DEFAULT_TOML = """\
# pbmd embedded default configuration (development).
# A simulated four-port controller runs inside the daemon (ports 1-3 DUO pads,
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


# --------------------------------------------------------------------------- paths


def _running_as_system_user() -> bool:
    try:
        return pwd.getpwuid(os.getuid()).pw_name == SYSTEM_USER
    except KeyError:
        return False


def default_state_dir() -> Path:
    """$STATE_DIRECTORY (systemd), /var/lib/pbmd for the pbmd user, else the XDG state dir."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    if _running_as_system_user():
        return SYSTEM_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "pbmd"


def default_socket_path(state_dir: Path) -> Path:
    """$RUNTIME_DIRECTORY/control.sock, $XDG_RUNTIME_DIR/pbmd/control.sock, or the state dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "pbmd" / SOCKET_NAME
    return state_dir / SOCKET_NAME


def client_socket_candidates() -> list[Path]:
    """Where pbmctl looks for the daemon, in order, when no socket is given."""
    out: list[Path] = []
    env = os.environ.get("PBMD_SOCKET")
    if env:
        out.append(Path(env))
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        out.append(Path(runtime.split(":")[0]) / SOCKET_NAME)
    out.append(SYSTEM_SOCKET)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        out.append(Path(xdg) / "pbmd" / SOCKET_NAME)
    out.append(default_state_dir() / SOCKET_NAME)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


# --------------------------------------------------------------------------- errors


@dataclasses.dataclass(frozen=True)
class ConfigIssue:
    """One problem: where (key), what was found (value), what is wrong, how to fix it."""

    key: str
    value: Any
    problem: str
    fix: str
    missing: bool = False

    def render(self) -> str:
        shown = "(missing)" if self.missing else toml_value(self.value)
        return f"{self.key} = {shown}: {self.problem}\n    fix: {self.fix}"


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


FsPath = Annotated[Path, Strict(False)]
"""A path: TOML writes it as a string."""


def _fail(problem: str, fix: str) -> PydanticCustomError:
    return PydanticCustomError("pbmd_config", "{problem}", {"problem": problem, "fix": fix})


# --------------------------------------------------------------------------- model


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_LINK_HELP = (
    'link = "sim" (simulator inside pbmd), "socket://HOST:PORT" (e.g. `pbmd sim`), '
    'or a serial device such as "/dev/serial/by-id/usb-…" or "serial:///dev/ttyACM0"'
)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_SOCKET_RE = re.compile(r"^socket://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})/?$")
_HOSTPORT_RE = re.compile(r"^([A-Za-z0-9.-]+|\[[0-9a-fA-F:.]+\]):(\d{1,5})$")


def check_link(link: str) -> str:
    """Accept the link URL forms the daemon can open; raise with the fix otherwise."""
    if link == "sim":
        return link
    if link.startswith("usb://"):
        raise _fail(
            "the USB vendor-class transport is not available yet",
            "use the controller's serial device instead (link = "
            '"/dev/serial/by-id/usb-…"), or "socket://HOST:PORT" for a simulator',
        )
    if link.startswith("socket://"):
        m = _SOCKET_RE.match(link)
        if m is None or not 1 <= int(m.group(2)) <= 65535:
            raise _fail(
                "not a socket URL",
                'write socket://HOST:PORT with a port 1..65535, e.g. "socket://127.0.0.1:7000"',
            )
        return link
    path = link.removeprefix("serial://")
    if path.startswith("/dev/") and len(path) > len("/dev/") and " " not in path:
        return link
    raise _fail("not a controller link", f"write {_LINK_HELP}")


class SimOptions(_Section):
    """The simulated controller run inside the daemon (link = "sim")."""

    time_scale: float = Field(
        default=1.0,
        ge=1.0,
        le=MAX_TIME_SCALE,
        description="Device clock speed-up; 1 is real time. Only for demonstrations and tests.",
    )
    seed: int = Field(default=0, description="Seed of the simulated measurement noise.")
    ports: dict[str, str] | None = Field(
        default=None,
        description='Applicator per port, e.g. { 1 = "duo_pad", 4 = "probe_905" }; '
        '"none" for an empty port. Default: ports 1-3 duo_pad, port 4 probe_905.',
    )
    transport: Literal["tcp", "pty"] = Field(
        default="tcp",
        description="How pbmd talks to its simulator: a loopback TCP port (default; another "
        "local process connecting to it would take the link over) or a pseudo-terminal "
        "(private, like a serial line, but its bytes pass through the kernel's tty "
        "workqueue, which a busy machine can delay past the telemetry staleness limit).",
    )
    control: str | None = Field(
        default=None,
        description='Open the fault-injection control channel on HOST:PORT ("127.0.0.1:0" '
        "for any free port; its address is logged). Tests only.",
    )
    emission_delay_ms: int = Field(default=2000, ge=0, le=65535)
    serial: str = Field(default="PBM-SIM-0001", max_length=16)

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        known = ", ".join(sorted(APPLICATORS))
        for key, name in value.items():
            if not key.isdigit() or not 1 <= int(key) <= MAX_PORTS:
                raise _fail(
                    f"port {key!r} is not a port number",
                    f'use port numbers 1..{MAX_PORTS} as keys, e.g. {{ 4 = "probe_905" }}',
                )
            if name != "none" and name not in APPLICATORS:
                raise _fail(
                    f"port {key}: {name!r} is not a simulated applicator",
                    f'use one of {known}, or "none" for an empty port',
                )
        return value

    @field_validator("control")
    @classmethod
    def _control(cls, value: str | None) -> str | None:
        if value is None:
            return value
        m = _HOSTPORT_RE.match(value)
        if m is None or not 0 <= int(m.group(2)) <= 65535:
            raise _fail("not HOST:PORT", 'write e.g. "127.0.0.1:0" (0: any free port)')
        return value

    def port_map(self) -> dict[int, str | None]:
        if self.ports is None:
            return default_ports()
        count = max(int(k) for k in self.ports) if self.ports else 0
        wiring: dict[int, str | None] = dict.fromkeys(range(1, count + 1))
        for key, name in self.ports.items():
            wiring[int(key)] = None if name == "none" else name
        return wiring


class ControllerConfig(_Section):
    """One PBM-Link controller."""

    name: str = Field(description="A short name: lower-case letters, digits, '-' and '_'.")
    link: str = Field(description="Where the controller is: " + _LINK_HELP + ".")
    sim: SimOptions | None = Field(
        default=None, description='Options of the simulator; only with link = "sim".'
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, le=600)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise _fail(
                "not a controller name",
                'use 1-32 lower-case letters, digits, "-" or "_", starting with a letter or '
                'digit, e.g. "main"',
            )
        return value

    @field_validator("link")
    @classmethod
    def _link(cls, value: str) -> str:
        return check_link(value)

    @model_validator(mode="after")
    def _sim_only_with_sim(self) -> ControllerConfig:
        if self.sim is not None and self.link != "sim":
            raise _fail(
                f"simulator options given for link {self.link!r}",
                f'remove the [controllers.sim] table of "{self.name}", or set link = "sim"',
            )
        return self

    @property
    def sim_options(self) -> SimOptions:
        return self.sim if self.sim is not None else SimOptions()


class ApiConfig(_Section):
    """The control socket (JSON-RPC 2.0, one request per line)."""

    socket: FsPath | None = Field(
        default=None,
        description="Path of the Unix socket. Default: $RUNTIME_DIRECTORY/control.sock, "
        "$XDG_RUNTIME_DIR/pbmd/control.sock, or <state_dir>/control.sock.",
    )
    socket_mode: str = Field(
        default="0666",
        pattern=r"^0?[0-7]{3}$",
        description="Permissions of the socket file (octal). Anyone who can connect is a "
        "reader; roles come from the caller's groups.",
    )
    clinician_group: str = Field(default="pbm-clinician", min_length=1)
    technician_group: str = Field(default="pbm-technician", min_length=1)
    max_request_bytes: int = Field(default=256 * 1024, ge=4096, le=16 * 1024 * 1024)
    max_clients: int = Field(default=256, ge=1, le=4096)
    max_clients_per_uid: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Connections one user may hold (root and pbmd's own user: no limit).",
    )
    send_queue_messages: int = Field(default=256, ge=8, le=65536)
    send_timeout_s: float = Field(default=10.0, gt=0, le=600)
    watch_interval_s: float = Field(default=0.25, ge=0.05, le=10.0)
    requests_per_tick: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="Requests the API serves per event-loop turn, all clients together; "
        "bounds how long the API can hold the loop that also times dose stops.",
    )


class ProtocolsConfig(_Section):
    directory: FsPath | None = Field(default=None, description="Default: <state_dir>/protocols.")
    trusted_keys: list[FsPath] = Field(
        default_factory=list, description="minisign public keys whose signatures are accepted."
    )
    trust_test_key: bool = Field(
        default=False, description="Also trust the shipped pbmd TEST key. NOT FOR CLINICAL USE."
    )
    allow_unsigned: bool = Field(
        default=False, description="Accept unsigned protocol files. Development only."
    )
    preload_shipped: bool = Field(
        default=False, description="Install the shipped protocol library at start."
    )

    @field_validator("trusted_keys")
    @classmethod
    def _keys(cls, value: list[Path]) -> list[Path]:
        for path in value:
            if not path.is_absolute():
                continue  # resolved against the file's directory later
            check_key_file(path)
        return value


def check_key_file(path: Path) -> PublicKey:
    try:
        return PublicKey.from_file(path)
    except FileNotFoundError:
        raise _fail(
            f"no such file {path}",
            "give the path of a minisign public key (.pub), e.g. /etc/pbmd/keys/clinic.pub",
        ) from None
    except OSError as exc:
        raise _fail(
            f"cannot read {path}: {exc.strerror or exc}",
            "make the key file readable by the pbmd user",
        ) from None
    except SignatureError as exc:
        raise _fail(
            f"{path} is not a minisign public key ({exc})",
            "give the .pub file minisign -G wrote (two lines: a comment and the key)",
        ) from None


class RecordsConfig(_Section):
    path: FsPath | None = Field(default=None, description="Default: <state_dir>/records.sqlite.")
    sync_interval_s: float = Field(default=1.0, gt=0, le=60)
    min_free_mb: int = Field(default=64, ge=0)


class EngineConfig(_Section):
    telemetry_hz: int = Field(default=50, ge=10, le=200)


class CalibrationConfig(_Section):
    due: dt.date | None = Field(
        default=None,
        description="Sessions are refused after this date (TOML date, e.g. 2025-06-30).",
    )


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="auto: readable on a terminal, JSON lines with journald priorities otherwise.",
    )


class Config(_Section):
    """A whole configuration file."""

    device_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="Name of this workstation for dashboards (MQTT). Default: the host name.",
    )
    state_dir: FsPath | None = Field(
        default=None,
        description="Records and the protocol library. Default: $STATE_DIRECTORY, "
        "/var/lib/pbmd for the pbmd user, else $XDG_STATE_HOME/pbmd (~/.local/state/pbmd).",
    )
    controllers: Annotated[list[ControllerConfig], Field(min_length=1, max_length=8)]
    ports: dict[str, str] | None = Field(
        default=None,
        description='Logical port -> "controller:port", e.g. { 1 = "main:1" }. Default: every '
        "port of the only controller, numbered as it numbers them.",
    )
    api: ApiConfig = Field(default_factory=ApiConfig)
    protocols: ProtocolsConfig = Field(default_factory=ProtocolsConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: Limits = Field(default_factory=Limits)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    mqtt: dict[str, Any] | None = Field(
        default=None, description="The MQTT publisher; see docs/configuration.md."
    )

    # ------------------------------------------------------------ resolved values

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else default_state_dir()

    @property
    def socket_path(self) -> Path:
        if self.api.socket is not None:
            return self.api.socket
        return default_socket_path(self.resolved_state_dir)

    @property
    def protocols_dir(self) -> Path:
        d = self.protocols.directory
        return d if d is not None else self.resolved_state_dir / "protocols"

    @property
    def records_path(self) -> Path:
        p = self.records.path
        return p if p is not None else self.resolved_state_dir / "records.sqlite"

    @property
    def resolved_device_id(self) -> str:
        if self.device_id:
            return self.device_id
        name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:64]
        return name.strip("-") or "pbmd"

    @property
    def development(self) -> list[str]:
        """Settings that must never be used with patients, as sentences."""
        out = []
        if self.protocols.trust_test_key:
            out.append("the shipped TEST protocol key is trusted: NOT FOR CLINICAL USE")
        if self.protocols.allow_unsigned:
            out.append("UNSIGNED protocol files are accepted: NOT FOR CLINICAL USE")
        sims = [c.name for c in self.controllers if c.link == "sim"]
        if sims:
            scale = max(c.sim_options.time_scale for c in self.controllers if c.link == "sim")
            speed = f", device clock ×{scale:g}" if scale != 1 else ""
            out.append(f"simulated controller ({', '.join(sims)}{speed}): no light is emitted")
        return out

    def port_targets(self) -> dict[int, tuple[str, int]] | None:
        """Logical port -> (controller name, device port); None: all of the only controller."""
        if self.ports is None:
            return None
        return {int(k): _split_target(v) for k, v in self.ports.items()}


def _split_target(text: str) -> tuple[str, int]:
    name, _, port = text.rpartition(":")
    return name, int(port)


# --------------------------------------------------------------------------- checks


def _cross_checks(raw: Mapping[str, Any]) -> list[ConfigIssue]:
    """Checks across sections, on the raw document, so that they run even when other
    parts are wrong (every problem is reported in one pass)."""
    issues: list[ConfigIssue] = []
    controllers = raw.get("controllers")
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
    ports = raw.get("ports")
    if isinstance(ports, dict):
        used: dict[tuple[str, int], str] = {}
        for key, target in ports.items():
            where = f"ports.{key}"
            if not str(key).isdigit() or not 1 <= int(key) <= MAX_LOGICAL_PORTS:
                issues.append(
                    ConfigIssue(
                        where,
                        target,
                        f"{key!r} is not a logical port number",
                        f'use logical ports 1..{MAX_LOGICAL_PORTS} as keys, e.g. 1 = "main:1"',
                    )
                )
                continue
            if not isinstance(target, str) or not re.match(r"^[^:]+:\d+$", target):
                issues.append(
                    ConfigIssue(
                        where,
                        target,
                        "not a controller port",
                        'write "CONTROLLER:PORT", e.g. "main:1"',
                    )
                )
                continue
            name, number = _split_target(target)
            if names and name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                issues.append(
                    ConfigIssue(
                        where,
                        target,
                        f"no controller is named {name!r}{hint}",
                        f"use one of the [[controllers]] names: {', '.join(names)}",
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


# --------------------------------------------------------------------------- MQTT slot


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
        raise ConfigError(
            source,
            [
                ConfigIssue(
                    "(file)",
                    None,
                    f"not valid TOML: {exc}",
                    "correct the TOML syntax at that line (strings in double quotes, one "
                    "key = value per line, [table] headers)",
                    missing=True,
                )
            ],
        ) from None
    return validate(raw, source, base)


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
                    "(file)",
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
                    "(file)",
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
