"""The engine's operator use cases, called directly (no API): start an installed
protocol by id with the screening answers, and the commands on a running session."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_rig import Rig, is_msg, pad_step, probe_step, protocol

from pbmd.daemon.core.engine import (
    CommandRefused,
    NoSession,
    NotRunnable,
    StartCommand,
    StartRefused,
    Unanswered,
)
from pbmd.daemon.core.session import SessionState
from pbmd.drivers import codec
from pbmd.protocols.store import LibraryError, LibraryFault, ProtocolLibrary


def library(tmp_path: Path, *texts: str) -> ProtocolLibrary:
    """A library accepting unsigned files (tests only) with `texts` installed."""
    lib = ProtocolLibrary(tmp_path / "protocols", (), allow_unsigned=True)
    for text in texts:
        lib.install_bytes(text.encode("utf-8"), None, source="test.toml")
    return lib


def command(
    protocol_id: str = "engine-test",
    answers: dict[str, bool] | None = None,
    ports: tuple[int, ...] | None = None,
) -> StartCommand:
    return StartCommand(
        protocol_id=protocol_id,
        patient_ref="P-TEST",
        contraindications={"cancer": False, "pregnancy": False} if answers is None else answers,
        ports=ports,
        operator="tester",
    )


async def test_start_protocol_runs_an_installed_protocol(tmp_path: Path) -> None:
    """By id, with every listed contraindication answered: the session runs, the
    record names the protocol's signer and the operator."""
    async with Rig(tmp_path) as rig:
        lib = library(tmp_path, protocol({1: [pad_step()]}))
        session = await rig.engine.start_protocol(lib, command())
        rig.session = session
        assert rig.engine.session is session
        assert session.protocol_id == "engine-test"
        await rig.emitting(1)
        await rig.engine.abort("test over", "tester")
        assert session.state is SessionState.ABORTED


async def test_start_protocol_refuses_an_unknown_protocol(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        lib = library(tmp_path)
        with pytest.raises(LibraryError) as err:
            await rig.engine.start_protocol(lib, command("no-such-protocol"))
        assert err.value.fault is LibraryFault.NOT_INSTALLED
        assert rig.engine.session is None
        assert rig.rx.find(is_msg(codec.Arm)) is None


async def test_start_protocol_refuses_unanswered_contraindications(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        lib = library(tmp_path, protocol({1: [pad_step()]}))
        with pytest.raises(Unanswered, match="unanswered: pregnancy") as err:
            await rig.engine.start_protocol(lib, command(answers={"cancer": False}))
        assert err.value.missing == ["pregnancy"]
        assert rig.engine.session is None
        assert rig.rx.find(is_msg(codec.Arm)) is None


async def test_start_protocol_refuses_a_contraindicated_patient(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        lib = library(tmp_path, protocol({1: [pad_step()]}))
        with pytest.raises(StartRefused, match="contraindicated for this patient: cancer"):
            await rig.engine.start_protocol(
                lib, command(answers={"cancer": True, "pregnancy": False})
            )
        assert rig.engine.session is None
        assert rig.rx.find(is_msg(codec.Arm)) is None


async def test_start_protocol_refuses_the_wrong_applicator(tmp_path: Path) -> None:
    """A protocol for the 905 nm probe on port 1, where a pad is connected."""
    async with Rig(tmp_path) as rig:
        lib = library(tmp_path, protocol({1: [probe_step()]}, applicators={1: "probe_905"}))
        with pytest.raises(NotRunnable, match="cannot run on the connected applicators") as err:
            await rig.engine.start_protocol(lib, command())
        assert err.value.issues
        assert rig.engine.session is None
        assert rig.rx.find(is_msg(codec.Arm)) is None


async def test_start_protocol_refuses_ports_the_protocol_does_not_use(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        lib = library(tmp_path, protocol({1: [pad_step()]}))
        with pytest.raises(StartRefused, match=r"ports \[3\] are not in protocol"):
            await rig.engine.start_protocol(lib, command(ports=(3,)))
        assert rig.engine.session is None
        assert rig.rx.find(is_msg(codec.Arm)) is None


async def test_commands_without_a_session_say_so(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        for what, call in (
            ("confirm", lambda: rig.engine.confirm(1)),
            ("pause", lambda: rig.engine.pause(None)),
            ("resume", lambda: rig.engine.resume(1)),
        ):
            with pytest.raises(NoSession, match=f"nothing to {what}"):
                call()
        with pytest.raises(NoSession, match="nothing to abort"):
            await rig.engine.abort("why", "tester")


async def test_clear_fault_refuses_mid_session_and_unconnected(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        with pytest.raises(CommandRefused, match="controller main is not connected"):
            await rig.engine.clear_fault(None, "main", "tech")
        lib = library(tmp_path, protocol({1: [pad_step()]}))
        rig.session = await rig.engine.start_protocol(lib, command())
        with pytest.raises(CommandRefused, match="a session is running"):
            await rig.engine.clear_fault(rig.handle, "main", "tech")
        assert rig.rx.find(is_msg(codec.ClearFault)) is None
        await rig.engine.abort("test over", "tester")


async def test_clear_service_required(tmp_path: Path) -> None:
    """Nothing to clear is refused; a stored copy that cannot be removed keeps the latch;
    otherwise the latch clears and the record says who serviced it."""
    async with Rig(tmp_path) as rig:
        engine = rig.engine
        forgotten: list[str] = []
        with pytest.raises(CommandRefused, match="nothing to clear"):
            engine.clear_service_required("tech", "checked", lambda: forgotten.append("x"))
        engine.service_required = "E301 port 1 stayed lit"

        def cannot() -> None:
            raise CommandRefused("cannot clear the stored latch: read-only")

        with pytest.raises(CommandRefused, match="read-only"):
            engine.clear_service_required("tech", "checked", cannot)
        assert engine.service_required == "E301 port 1 stayed lit"
        cause = engine.clear_service_required("tech", "checked", lambda: forgotten.append("x"))
        assert cause == "E301 port 1 stayed lit"
        assert forgotten == ["x"]
        assert engine.service_required is None
