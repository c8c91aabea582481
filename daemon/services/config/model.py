"""The configuration's sections as pydantic models, and the checks of single values.

Checks that span sections (names, the port map) are in ``checks``; they run on
the raw document so that every problem is reported in one pass.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

from pbmd.daemon.services.config.clinic_db import ClinicDbConfig
from pbmd.daemon.services.config.issues import _fail
from pbmd.daemon.services.config.paths import default_socket_path, default_state_dir
from pbmd.drivers.transport import LinkURLError
from pbmd.drivers.usb import parse_usb_url
from pbmd.hw_sim.applicators import APPLICATORS, default_ports
from pbmd.hw_sim.config import MAX_PORTS, MAX_TIME_SCALE
from pbmd.protocols.limits import Limits
from pbmd.protocols.signing import PublicKey, SignatureError

MAX_LOGICAL_PORTS = 8

FsPath = Annotated[Path, Strict(False)]
"""A path: TOML writes it as a string."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_LINK_HELP = (
    'link = "sim" (a simulator run by pbmd), "socket://HOST:PORT" (e.g. `pbmd sim`), '
    'a serial device such as "/dev/serial/by-id/usb-…" or "serial:///dev/ttyACM0", '
    'or the USB interface "usb://VID:PID" or "usb://VID:PID/SERIAL"'
)
TEST_USB_LINK = "usb://1209:0001"
"""The pid.codes test ID (ICD §2a): simulators and development units only."""
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_SOCKET_RE = re.compile(r"^socket://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})/?$")
_HOSTPORT_RE = re.compile(r"^([A-Za-z0-9.-]+|\[[0-9a-fA-F:.]+\]):(\d{1,5})$")


def check_link(link: str) -> str:
    """Accept the link URL forms the daemon can open; raise with the fix otherwise."""
    if link == "sim":
        return link
    if link.lower().startswith("usb://"):
        try:
            target = parse_usb_url(link)
        except LinkURLError:
            target = None
        if target is None or target.backend is not None:
            raise _fail(
                "not a USB URL",
                "write usb://VID:PID or usb://VID:PID/SERIAL with the controller's IDs in "
                'hexadecimal (as lsusb prints them), e.g. "usb://1209:0001/PBM-0042"; for the '
                'simulator over USB use link = "sim" with transport = "usb" in [controllers.sim]',
            )
        return link
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
    """The simulated controller the daemon runs as a child process (link = "sim")."""

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
    transport: Literal["tcp", "pty", "usb"] = Field(
        default="tcp",
        description="How pbmd talks to its simulator: a loopback TCP port (default; another "
        "local process connecting to it would take the link over), a pseudo-terminal "
        "(private, like a serial line, but its bytes pass through the kernel's tty "
        "workqueue, which a busy machine can delay past the telemetry staleness limit), or "
        'USB: the simulator as a vendor-class device (VID:PID 1209:0001, serial = "serial") '
        "on a simulated bus, opened through pyusb like a real controller.",
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


class CoursesConfig(_Section):
    """Treatment courses, patients and outcomes (docs/courses.md)."""

    screening_max_age_days: float = Field(
        default=30.0,
        gt=0,
        le=3650,
        description="A contraindication answer older than this is asked again before a "
        "session of a course.",
    )
    course_fluence_ceiling_j_cm2: float | None = Field(
        default=None,
        gt=0,
        le=10000,
        description="Most fluence a course may put on one patch of skin at one wavelength, "
        "summed over its sessions. Default: the per-session ceiling ([limits] "
        "fluence_ceiling_j_cm2) times the course's planned sessions.",
    )
    technicians_see_outcomes: bool = Field(
        default=False,
        description="Technicians may read outcome measures (pain, ODI); clinicians always may.",
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
    courses: CoursesConfig = Field(default_factory=CoursesConfig)
    mqtt: dict[str, Any] | None = Field(
        default=None, description="The MQTT publisher; see docs/configuration.md."
    )
    clinic_db: ClinicDbConfig | None = Field(
        default=None, description="The clinic's PostgreSQL copy of the records; docs/clinic-db.md."
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
        test_ids = [c.name for c in self.controllers if c.link.lower().startswith(TEST_USB_LINK)]
        if test_ids:
            out.append(
                f"USB test ID 1209:0001 ({', '.join(test_ids)}): a development unit, not a "
                "production controller"
            )
        return out

    def port_targets(self) -> dict[int, tuple[str, int]] | None:
        """Logical port -> (controller name, device port); None: all of the only controller."""
        if self.ports is None:
            return None
        return {int(k): _split_target(v) for k, v in self.ports.items()}


def _split_target(text: str) -> tuple[str, int]:
    name, _, port = text.rpartition(":")
    return name, int(port)
