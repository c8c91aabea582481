"""Fixtures of the service tests: daemons, configured in `workdir` (tests/conftest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.paths import public_dir

from .harness import DEPLOYED_NICE, Daemon, toml_config

DaemonFactory = Callable[..., Daemon]


def _factory(base: Path, made: list[Daemon]) -> DaemonFactory:
    def make(
        name: str = "d",
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        nice: int | None = DEPLOYED_NICE,
        socket: Path | None = None,
        **config: Any,
    ) -> Daemon:
        home = base / name
        home.mkdir(exist_ok=True)
        home.chmod(0o755)
        state = home / "state"
        sock = socket or home / "control.sock"
        path = home / "pbmd.toml"
        path.write_text(toml_config(state, sock, **config), encoding="utf-8")
        daemon = Daemon(path, sock, state, env=env, extra_args=args, nice=nice)
        made.append(daemon)
        return daemon

    return make


@pytest.fixture
def make_daemon(workdir: Path) -> Iterator[DaemonFactory]:
    """Daemons configured in the work directory; every one is stopped at the end."""
    made: list[Daemon] = []
    yield _factory(workdir, made)
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        d.kill()


@pytest.fixture
def daemon(make_daemon: DaemonFactory) -> Daemon:
    """A started daemon on the embedded simulator at ×30."""
    return make_daemon().start()


@pytest.fixture(scope="module")
def module_daemon() -> Iterator[Daemon]:
    """One daemon for a whole module (property tests share it)."""
    base = public_dir()
    made: list[Daemon] = []
    try:
        yield _factory(base, made)().start()
    finally:
        for d in made:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
            d.kill()
        shutil.rmtree(base, ignore_errors=True)
