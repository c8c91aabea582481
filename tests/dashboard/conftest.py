"""Fixtures of the dashboard tests: a WebSockets-enabled mosquitto and workstations.

The workstations are real `pbmd run` daemons (the service tests' harness) on the
embedded simulator, each publishing under its own device id with its own
credentials.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mqtt.broker import MOSQUITTO
from service.harness import Daemon, toml_config

from .broker import WsBroker, mqtt_table

if not Path(MOSQUITTO).exists():  # `make test` installs it; say so rather than skip silently
    raise RuntimeError(f"mosquitto not found at {MOSQUITTO}: run `make system-deps`")

Workstations = Callable[..., dict[str, Daemon]]


@pytest.fixture
def start_broker(workdir: Path) -> Iterator[Callable[[Sequence[str]], WsBroker]]:
    made: list[WsBroker] = []

    def start(workstations: Sequence[str]) -> WsBroker:
        broker = WsBroker(workdir / "broker", workstations)
        made.append(broker)
        broker.start()
        return broker

    yield start
    for b in made:
        b.stop()


@pytest.fixture
def workstations(workdir: Path) -> Iterator[Workstations]:
    """Start `pbmd run` daemons (in parallel) for the given device ids; all stopped after."""
    made: list[Daemon] = []

    def start(
        broker: WsBroker, names: Sequence[str], *, time_scale: float = 30.0
    ) -> dict[str, Daemon]:
        daemons: dict[str, Daemon] = {}
        for ws in names:
            home = workdir / ws
            home.mkdir()
            home.chmod(0o755)
            config = home / "pbmd.toml"
            text = toml_config(
                home / "state",
                home / "control.sock",
                time_scale=time_scale,
                extra=mqtt_table(broker, ws, home),
            )
            config.write_text(text, encoding="utf-8")
            daemons[ws] = Daemon(config, home / "control.sock", home / "state")
            made.append(daemons[ws])
        with ThreadPoolExecutor(len(daemons)) as pool:
            list(pool.map(lambda d: d.start(), daemons.values()))
        return daemons

    yield start
    with ThreadPoolExecutor(max(1, len(made))) as pool:
        list(pool.map(_stop, made))


def _stop(d: Daemon) -> None:
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    d.kill()
