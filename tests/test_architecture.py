"""The house's walls: which room of pbmd may import which.

The safety core (`pbmd.daemon.core`) must run with nothing around it: it imports
no service (API, records storage, MQTT, reports, configuration, logging set-up,
the process), no client, and no library that only a service needs. Services may
use the core; clients talk to the daemon over its socket and import neither.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

DAEMON = Path(__file__).resolve().parent.parent / "daemon"

CORE_FORBIDDEN = (
    "pbmd.daemon.services",
    "pbmd.daemon.clients",
    "pbmd.hw_sim",
    "sqlite3",
    "aiomqtt",
    "rich",
    "psycopg",
)
SERVICES_FORBIDDEN = ("pbmd.daemon.clients",)
CLIENTS_FORBIDDEN = ("pbmd.daemon.core", "pbmd.daemon.services", "pbmd.hw_sim")
ALLOWED = ("pbmd.daemon.services.config",)
"""pbmctl reads the daemon's configuration file to find its socket."""


def imported_modules(path: Path, daemon: Path) -> Iterator[tuple[int, str]]:
    """Every module a file imports, at any depth (function-local imports count too)."""
    package = ".".join(("pbmd", "daemon", *path.relative_to(daemon).parts[:-1]))
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{name}.{alias.name}"


def violations(daemon: Path, room: str, forbidden: tuple[str, ...]) -> list[str]:
    found: list[tuple[str, int, str]] = []
    for path in sorted((daemon / room).rglob("*.py")):
        for line, module in imported_modules(path, daemon):
            if within(module, forbidden) and not within(module, ALLOWED):
                found.append((str(path.relative_to(daemon)), line, module))
    return [f"{path}:{line} imports {module}" for path, line, module in sorted(found)]


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [("core", CORE_FORBIDDEN), ("services", SERVICES_FORBIDDEN), ("clients", CLIENTS_FORBIDDEN)],
)
def test_room_imports_only_what_it_may(room: str, forbidden: tuple[str, ...]) -> None:
    assert (DAEMON / room / "__init__.py").is_file()
    assert violations(DAEMON, room, forbidden) == []


def test_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    """The check itself catches imports at any depth and in relative form."""
    room = tmp_path / "core"
    room.mkdir()
    (room / "bad.py").write_text(
        "import sqlite3\n"
        "def f():\n    from pbmd.daemon.services import records\n"
        "from ..clients import pbmctl\n"
        "from .session import Session\n"
    )
    assert violations(tmp_path, "core", CORE_FORBIDDEN) == [
        "core/bad.py:1 imports sqlite3",
        "core/bad.py:3 imports pbmd.daemon.services.records",
        "core/bad.py:4 imports pbmd.daemon.clients.pbmctl",
    ]


def test_every_package_is_shipped() -> None:
    """A sub-package missing from pyproject.toml would be missing from the wheel."""
    import tomllib

    root = DAEMON.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(config["packages"])
    folders = {
        f"pbmd.{name}": root / path
        for name, path in ((k.removeprefix("pbmd."), v) for k, v in config["package-dir"].items())
    }
    found = {
        ".".join((name, *init.parent.relative_to(folder).parts))
        for name, folder in folders.items()
        for init in folder.rglob("__init__.py")
    }
    assert found - shipped == set()
