"""The API's parts in-process: registry, encoding, the per-turn budget, slow readers."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from pbmd.daemon.core.status import (
    ControllerStatus,
    Freshness,
    Interlocks,
    PortReading,
    PortStatus,
)
from pbmd.daemon.services import api
from pbmd.daemon.services import log as daemon_log
from pbmd.daemon.services.api.status import controller_json, port_json


class Count(api.Params):
    n: int = Field(ge=1, le=100_000)
    size: int = Field(default=10_000, ge=1, le=1_000_000)


def registry() -> api.Registry:
    reg = api.Registry()

    @reg.add("echo", api.NoParams, api.ANYONE, "who am I")
    async def echo(caller: api.Caller, p: api.NoParams) -> Any:
        return caller.peer.as_dict()

    @reg.add("spam", Count, api.ANYONE, "n notifications of `size` bytes")
    async def spam(caller: api.Caller, p: Count) -> Any:
        sent = 0
        for _ in range(p.n):
            if not caller.notify("spam", {"x": "x" * p.size}):
                break
            sent += 1
        return {"sent": sent}

    @reg.add("secret", api.NoParams, api.TECHNICIAN, "technicians only")
    async def secret(caller: api.Caller, p: api.NoParams) -> Any:
        return "ok"

    return reg


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    srv = api.JsonRpcServer(
        registry(),
        api.RoleResolver("no-such-group-x", "no-such-group-y"),
        tmp_path / "api.sock",
        queue_messages=16,
        send_timeout_s=2.0,
        requests_per_tick=2,
    )
    await srv.start()
    yield srv
    await srv.close()


async def rpc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: Any) -> Any:
    writer.write(json.dumps(msg).encode() + b"\n")
    await writer.drain()
    return json.loads(await reader.readline())


async def test_registry_checks_roles_and_params(server: api.JsonRpcServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    try:
        me = await rpc(reader, writer, {"jsonrpc": "2.0", "id": 1, "method": "echo"})
        assert me["result"]["uid"] == os.getuid()
        assert "technician" in me["result"]["roles"]  # the daemon's own uid
        bad = await rpc(
            reader, writer, {"jsonrpc": "2.0", "id": 2, "method": "spam", "params": {"n": 0}}
        )
        assert bad["error"]["code"] == api.INVALID_PARAMS
        assert bad["error"]["data"]["errors"][0]["param"] == "n"
        batch = [
            {"jsonrpc": "2.0", "id": 3, "method": "secret"},
            {"jsonrpc": "2.0", "id": 4, "method": "nope"},
        ]
        replies = await rpc(reader, writer, batch)
        assert replies[0]["result"] == "ok" and replies[1]["error"]["code"] == -32601
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_watcher_that_does_not_read_is_dropped(server: api.JsonRpcServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    other_r, other_w = await asyncio.open_unix_connection(str(server.path))
    try:
        writer.write(b'{"jsonrpc": "2.0", "id": 1, "method": "spam", "params": {"n": 5000}}\n')
        await writer.drain()
        # The handler notifies faster than anyone reads: the socket buffers fill, then
        # the bounded queue, and the connection is dropped within the handler. Reading
        # now gets what made it into the socket, then EOF.
        while await reader.read(1 << 16):
            pass
        assert server.stats.dropped_slow == 1
        me = await rpc(other_r, other_w, {"jsonrpc": "2.0", "id": 2, "method": "echo"})
        assert "result" in me
        assert len(server.connections) == 1
    finally:
        for w in (writer, other_w):
            w.close()
            await w.wait_closed()


async def test_budget_spreads_a_burst_over_loop_turns() -> None:
    budget = api.Budget(per_tick=3)
    loop = asyncio.get_running_loop()
    turn = 0
    turns: list[int] = []

    def tick() -> None:
        nonlocal turn
        turn += 1
        loop.call_soon(tick)

    loop.call_soon(tick)

    async def one() -> None:
        await budget.take()
        turns.append(turn)

    await asyncio.gather(*(one() for _ in range(12)))
    per_turn: dict[int, int] = {}
    for t in turns:
        per_turn[t] = per_turn.get(t, 0) + 1
    assert max(per_turn.values()) <= 3
    assert len(per_turn) >= 4
    assert budget.deferred >= 9


def test_encode_raw_and_non_finite() -> None:
    reply = {"jsonrpc": "2.0", "id": 7, "result": api.RawJson(b'{"a": 1}')}
    assert json.loads(api.encode(reply)) == {"jsonrpc": "2.0", "id": 7, "result": {"a": 1}}
    both = json.loads(api.encode([reply, {"jsonrpc": "2.0", "id": 8, "result": float("inf")}]))
    assert both[0]["result"] == {"a": 1} and both[1]["result"] is None


def test_roles_from_groups() -> None:
    resolver = api.RoleResolver("0", "12345")
    assert resolver.peer(1, 0, 0, frozenset()).roles >= api.STAFF  # root
    other = resolver.peer(1, 54321, 54321, frozenset({0}))  # gid 0 = clinician group here
    assert other.roles == {api.Role.READER, api.Role.CLINICIAN}
    tech = resolver.peer(1, 54321, 12345, frozenset())  # primary group counts
    assert api.Role.TECHNICIAN in tech.roles
    nobody = resolver.peer(1, 54321, 54321, frozenset())
    assert nobody.roles == {api.Role.READER} and not nobody.sees_patients
    assert "12345" in resolver.role_help(api.TECHNICIAN)


def test_log_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog

    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> int:
            self.text += s
            return len(s)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    tty = Tty()
    daemon_log.configure("info", "auto", stream=tty)  # type: ignore[arg-type]
    structlog.get_logger().warning("hello.console", port=3)
    daemon_log.shutdown()
    assert "hello.console" in tty.text and not tty.text.startswith("<")

    # A file (or a pipe): plain JSON lines, whatever $JOURNAL_STREAM a parent left.
    path = tmp_path / "log.jsonl"
    other = tmp_path / "elsewhere"
    other.touch()
    st = other.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with path.open("w") as out:
        daemon_log.configure("debug", "auto", stream=out)
        daemon_log.bind(session_id="s-1")
        structlog.get_logger().error("hello.json", port=3)
        structlog.get_logger().debug("quiet")
        daemon_log.shutdown()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["hello.json", "quiet"]
    assert json.loads(lines[0])["session_id"] == "s-1"
    # The journal's own stream (systemd names its device and inode): priority prefixes.
    journal = tmp_path / "journal.jsonl"
    with journal.open("w") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        daemon_log.configure("debug", "json", stream=out)
        structlog.get_logger().error("hello.json", port=3)
        structlog.get_logger().debug("quiet")
        daemon_log.shutdown()
    lines = journal.read_text().splitlines()
    assert lines[0].startswith("<3>{")
    assert json.loads(lines[0][3:])["session_id"] == "s-1"
    assert lines[1].startswith("<7>")
    structlog.contextvars.clear_contextvars()


def test_every_method_is_documented() -> None:
    from types import SimpleNamespace

    fake = SimpleNamespace(
        roles=api.RoleResolver("a", "b"), engine=None, watch_hub=api.WatchHub(0.25)
    )
    reg = api.build_registry(fake)  # type: ignore[arg-type]
    text = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    missing = [ep.name for ep in reg if f"`{ep.name}`" not in text]
    assert not missing, f"docs/api.md does not describe {missing}"


def _typed_status(age_s: float, *, link_open: bool = True) -> tuple[Any, Any]:
    """A controller and a port that emitted 721 mW in their last sample, `age_s` ago."""
    fresh = Freshness(age_s, 0.1, link_open)
    ctrl = ControllerStatus(
        name="main", connected=link_open, serial="PBM-1", firmware="1.0", freshness=fresh,
        reported_state="armed_ready", fault_code=0,
        interlocks=Interlocks(key=True, remote=True, estop_released=True, footswitch=False),
        device_time_s=12.0,
    )  # fmt: skip
    reading = PortReading(
        applicator_present=True, emitting=True, power_mw=721.0, contact=True, fault=False,
        temperature_c=25.0, flags=0x07,
    )  # fmt: skip
    port = PortStatus(
        port=1, controller="main", device_port=1, applicator_known=True, applicator=None,
        reading=None if fresh.stale else reading, freshness=fresh,
    )  # fmt: skip
    return ctrl, port


def test_status_never_shows_stale_telemetry_as_present() -> None:
    """A fresh sample is shown as it is; one older than the staleness limit (or over a
    lost link) reads unknown, with its age, in one interlock vocabulary."""
    ctrl, port = _typed_status(0.02)
    c = controller_json(ctrl)
    assert c["state"] == "armed_ready" and c["telemetry_stale"] is False
    assert c["interlocks"] == {
        "key": True, "remote": True, "estop_released": True, "footswitch": False,
    }  # fmt: skip
    p = port_json(port)
    assert p["emitting"] is True and p["power_mw"] == 721.0 and p["telemetry_stale"] is False
    for ctrl, port, state in (
        (*_typed_status(3.21), "unknown (stale 3.2 s)"),
        (*_typed_status(0.02, link_open=False), "unknown (link lost, stale 0.0 s)"),
    ):
        c = controller_json(ctrl)
        assert c["state"] == state and c["telemetry_stale"] is True
        p = port_json(port)
        assert p["telemetry_stale"] is True and p["telemetry_age_s"] == port.freshness.age_s
        assert p["emitting"] is None and p["power_mw"] is None and p["contact"] is None
