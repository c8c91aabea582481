"""The [clinic_db] table: every refusal says what to fix; passwords never need the TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbmd.daemon.services import config as cfg
from pbmd.daemon.services.clinic_db.connection import describe, server_text

HEAD = '[[controllers]]\nname = "sim"\nlink = "sim"\n[clinic_db]\n'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('url = "mysql://db/pbm"', "not a PostgreSQL URL"),
        ('url = "postgresql://pbmd@db"', "the URL names no database"),
        (
            'url = "postgresql://pbmd:secret@db/pbm"\npassword_env = "PW"',
            "the URL carries a password in clear",
        ),
        (
            'url = "postgresql://pbmd@db/pbm"\npassword_env = "PW"\npassword_file = "/pw"',
            "both password_file and password_env",
        ),
        ('url = "postgresql://pbmd@db/pbm"\nsslmode = "verify-full"', "needs the CA certificate"),
        ('url = "postgresql://pbmd@db/pbm"\nworkstation_id = "room 3"', "not a workstation id"),
        ('url = "postgresql://pbmd@db/pbm"\npasswd = "x"', "clinic_db.passwd"),
    ],
)
def test_refusals(body: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(HEAD + body + "\n", "test.toml")
    assert message in err.value.render()


def test_password_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n", encoding="utf-8")
    config = cfg.parse(
        HEAD + f'url = "postgresql://pbmd@db:5433/pbm"\npassword_file = "{secret}"\n', "t"
    )
    clinic = config.clinic_db
    assert clinic is not None
    assert clinic.connect_kwargs()["password"] == "s3cret"
    assert clinic.resolved_workstation_id("room-3") == "room-3"
    assert server_text(clinic) == "pbmd@db:5433/pbm"
    secret.unlink()
    with pytest.raises(ValueError, match=r"password file .* cannot be read"):
        clinic.password()
    config = cfg.parse(
        HEAD + 'url = "postgresql://pbmd@db/pbm"\npassword_env = "PBMD_TEST_PW"\n', "t"
    )
    clinic = config.clinic_db
    assert clinic is not None
    monkeypatch.delenv("PBMD_TEST_PW", raising=False)
    with pytest.raises(ValueError, match=r"PBMD_TEST_PW .* is not set") as err:
        clinic.password()
    assert describe(err.value, clinic).startswith("the environment variable PBMD_TEST_PW")
    monkeypatch.setenv("PBMD_TEST_PW", "from-env")
    assert clinic.connect_kwargs()["password"] == "from-env"
