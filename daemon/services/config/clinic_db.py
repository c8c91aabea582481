"""The ``[clinic_db]`` table: the clinic's PostgreSQL server that the records are copied to.

The workstation's SQLite records stay the source of truth; this only says where
the copy goes (see docs/clinic-db.md). A password never needs to be in the TOML:
it comes from ``password_file`` or the ``password_env`` variable (or libpq's own
``PGPASSWORD``/``~/.pgpass``), and a URL that carries one is refused when a file
or variable is given.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from pbmd.daemon.services.config.issues import _fail

FsPath = Annotated[Path, Strict(False)]

_WORKSTATION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ClinicDbConfig(BaseModel):
    """Where the clinic's copy of the records lives, and how pbmd reaches it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    enabled: bool = True
    url: str = Field(description='The server and database: "postgresql://USER@HOST:PORT/DATABASE".')
    password_file: FsPath | None = Field(
        default=None, description="A file whose first line is the password (mode 0600)."
    )
    password_env: str | None = Field(
        default=None, description="The environment variable that holds the password."
    )
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    sslrootcert: FsPath | None = Field(
        default=None, description="The CA certificate that signed the server's (verify-*)."
    )
    workstation_id: str | None = Field(
        default=None,
        description="This workstation's name in the clinic database. Default: device_id.",
    )
    migrate: bool = Field(
        default=True, description="Create or upgrade the clinic schema when pbmd starts."
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    retry_s: float = Field(default=5.0, gt=0, le=600)
    batch_rows: int = Field(
        default=100,
        ge=1,
        le=10000,
        description="Rows per server transaction (each batch costs the event loop ~2 ms).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres") or not parts.netloc:
            raise _fail(
                "not a PostgreSQL URL",
                'write "postgresql://USER@HOST:PORT/DATABASE", e.g. '
                '"postgresql://pbmd@records.clinic.lan/pbm"',
            )
        if not parts.path.strip("/"):
            raise _fail(
                "the URL names no database",
                'add the database after the host: "postgresql://pbmd@HOST/pbm"',
            )
        return value

    @field_validator("workstation_id")
    @classmethod
    def _workstation(cls, value: str | None) -> str | None:
        if value is not None and not _WORKSTATION_RE.match(value):
            raise _fail(
                "not a workstation id",
                'use 1-64 letters, digits, ".", "-" or "_", e.g. "room-2"',
            )
        return value

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
            raise _fail("not an environment variable name", 'e.g. "PBMD_CLINIC_DB_PASSWORD"')
        return value

    @model_validator(mode="after")
    def _one_password(self) -> ClinicDbConfig:
        if self.password_file is not None and self.password_env is not None:
            raise _fail(
                "both password_file and password_env are given",
                "keep one of them",
            )
        if urlsplit(self.url).password is not None and (
            self.password_file is not None or self.password_env is not None
        ):
            raise _fail(
                "the URL carries a password in clear while a password file or variable is given",
                'remove ":PASSWORD" from the URL: the password comes from the file or variable',
            )
        if self.sslmode in ("verify-ca", "verify-full") and self.sslrootcert is None:
            raise _fail(
                f"sslmode = {self.sslmode!r} needs the CA certificate",
                'set sslrootcert = "/etc/pbmd/clinic-ca.pem" (the CA that signed the server)',
            )
        return self

    def resolved_workstation_id(self, device_id: str) -> str:
        return self.workstation_id or device_id

    def password(self) -> str | None:
        """The password from the file or the variable (None: libpq's own sources).

        Raises ValueError with a sentence that says what to fix."""
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(
                    f"the clinic database password file {self.password_file} cannot be read "
                    f"({exc.strerror or exc}); make it readable by the pbmd user (mode 0600)"
                ) from None
            return text.splitlines()[0] if text else ""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(
                    f"the environment variable {self.password_env} (clinic_db.password_env) "
                    "is not set; set it in the service's environment file"
                )
            return value
        return None

    def connect_kwargs(self) -> dict[str, str | int]:
        """libpq parameters beside the URL (TLS, timeout, password)."""
        kwargs: dict[str, str | int] = {
            "sslmode": self.sslmode,
            "connect_timeout": max(1, round(self.connect_timeout_s)),
            "application_name": "pbmd",
            # A server that vanished without closing the connection is noticed in
            # about a minute, not after the kernel's two hours.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        if self.sslrootcert is not None:
            kwargs["sslrootcert"] = str(self.sslrootcert)
        password = self.password()
        if password is not None:
            kwargs["password"] = password
        return kwargs
