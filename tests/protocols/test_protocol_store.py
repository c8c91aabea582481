"""The protocol library: signed-only, anti-rollback, atomic install, re-verified on load."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from fixtures.protocols import BASE
from fixtures.signing import make_keypair, sign
from protocol_helpers import edit

from pbmd.protocols import library as shipped
from pbmd.protocols.signing import PublicKey
from pbmd.protocols.store import LibraryError, LibraryFault, ProtocolLibrary

TEST_KEY = PublicKey.from_file(shipped.TEST_KEY_FILE)


def version(n: int, text: str = BASE) -> str:
    return edit(text, "\nversion = 1\n", f"\nversion = {n}\n")


def signed_file(directory: Path, text: str, name: str = "protocol.toml") -> Path:
    """`text` written to `directory/name` and signed with the committed TEST key."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    sign(path)
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def lib(tmp_path: Path) -> ProtocolLibrary:
    return ProtocolLibrary(tmp_path / "library", [TEST_KEY])


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    return tmp_path / "incoming"


def refused(action: object, fault: LibraryFault) -> LibraryError:
    assert callable(action)
    with pytest.raises(LibraryError) as caught:
        action()
    assert caught.value.fault is fault, str(caught.value)
    return caught.value


def test_install_list_show_load(lib: ProtocolLibrary, incoming: Path) -> None:
    entry = lib.install(signed_file(incoming, BASE))
    assert (entry.id, entry.version, entry.signed_by) == ("test-base", 1, TEST_KEY.id_hex)
    assert entry.trusted_comment == "pbmd test signature"
    assert lib.list() == [entry]
    assert lib.show("test-base") == entry
    loaded = lib.load("test-base")
    assert loaded.protocol.id == "test-base"
    assert loaded.sha256 == entry.sha256
    assert sorted(p.name for p in lib.directory.iterdir()) == [
        ".lock",
        "index.json",
        "test-base-v1.toml",
        "test-base-v1.toml.minisig",
    ]


def test_the_shipped_library_installs(lib: ProtocolLibrary) -> None:
    for path in shipped.protocol_files():
        lib.install(path)
    assert len(lib.list()) == len(shipped.protocol_files()) == 8
    assert {e.signed_by for e in lib.list()} == {TEST_KEY.id_hex}


def test_new_version_replaces_the_old(lib: ProtocolLibrary, incoming: Path) -> None:
    lib.install(signed_file(incoming, BASE))
    entry = lib.install(signed_file(incoming, version(2)))
    assert entry.version == 2
    assert lib.load("test-base").protocol.version == 2
    names = {p.name for p in lib.directory.iterdir()}
    assert "test-base-v1.toml" not in names and "test-base-v2.toml" in names


@pytest.mark.parametrize("older", [1, 0])
def test_rollback_is_refused(lib: ProtocolLibrary, incoming: Path, older: int) -> None:
    lib.install(signed_file(incoming, version(2), "v2.toml"))
    before = snapshot(lib.directory)
    # older == 0: the very same file again
    path = incoming / "v2.toml" if older == 0 else signed_file(incoming, version(older), "old.toml")
    error = refused(lambda: lib.install(path), LibraryFault.ROLLBACK)
    assert "not above the highest installed version" in str(error)
    assert snapshot(lib.directory) == before


def test_remove_keeps_the_version_floor(lib: ProtocolLibrary, incoming: Path) -> None:
    lib.install(signed_file(incoming, version(3)))
    removed = lib.remove("test-base")
    assert removed.version == 3
    assert lib.list() == []
    assert lib.highest_version("test-base") == 3
    error = refused(
        lambda: lib.install(signed_file(incoming, version(2), "old.toml")), LibraryFault.ROLLBACK
    )
    assert "installed before and removed" in str(error)
    lib.install(signed_file(incoming, version(4), "new.toml"))
    refused(lambda: lib.remove("nothing-here"), LibraryFault.NOT_INSTALLED)
    refused(lambda: lib.show("nothing-here"), LibraryFault.NOT_INSTALLED)


def test_unsigned_is_refused(lib: ProtocolLibrary, incoming: Path) -> None:
    incoming.mkdir()
    path = incoming / "unsigned.toml"
    path.write_text(BASE, encoding="utf-8")
    error = refused(lambda: lib.install(path), LibraryFault.UNSIGNED)
    assert "minisign" in str(error)
    assert lib.list() == []


def test_unsigned_allowed_loudly_in_development(
    tmp_path: Path, incoming: Path, caplog: pytest.LogCaptureFixture
) -> None:
    incoming.mkdir()
    path = incoming / "unsigned.toml"
    path.write_text(BASE, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="pbmd.protocols.library"):
        dev = ProtocolLibrary(tmp_path / "dev", [TEST_KEY], allow_unsigned=True)
        entry = dev.install(path)
        dev.load("test-base")
    assert entry.signed_by is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    events = [r.getMessage() for r in warnings]
    # At start (saying UNSIGNED, for whoever reads the log), at install and at load.
    assert events.count("protocols.unsigned_accepted") == 1
    assert events.count("protocol.unsigned_checked") >= 2
    assert "UNSIGNED" in warnings[events.index("protocols.unsigned_accepted")].__dict__["warning"]
    # a signature that is present must still verify, even in development
    sig = sign(path)
    sig.write_text(sig.read_text().replace("pbmd test signature", "pbmd test signaturE"))
    refused(lambda: dev.install(path), LibraryFault.BAD_TRUSTED_COMMENT)


def test_tampered_file_is_refused(lib: ProtocolLibrary, incoming: Path) -> None:
    path = signed_file(incoming, BASE)
    path.write_text(BASE.replace("sessions = 10", "sessions = 11"), encoding="utf-8")
    refused(lambda: lib.install(path), LibraryFault.BAD_SIGNATURE)
    assert lib.list() == []


def test_tampered_signature_and_comment_are_refused(lib: ProtocolLibrary, incoming: Path) -> None:
    path = signed_file(incoming, BASE)
    sig = Path(str(path) + ".minisig")
    good = sig.read_text()
    sig.write_text(good.replace("pbmd test signature", "pbmd test signature!"))
    refused(lambda: lib.install(path), LibraryFault.BAD_TRUSTED_COMMENT)
    lines = good.split("\n")
    lines[1] = lines[1][:30] + ("A" if lines[1][30] != "A" else "B") + lines[1][31:]
    sig.write_text("\n".join(lines))
    refused(lambda: lib.install(path), LibraryFault.BAD_SIGNATURE)
    sig.write_text("garbage\n")
    refused(lambda: lib.install(path), LibraryFault.MALFORMED_SIGNATURE)
    assert lib.list() == []


def test_unknown_key_is_refused(lib: ProtocolLibrary, incoming: Path, tmp_path: Path) -> None:
    _, secret = make_keypair(tmp_path, "stranger")
    incoming.mkdir()
    path = incoming / "p.toml"
    path.write_text(BASE, encoding="utf-8")
    sign(path, secret)
    error = refused(lambda: lib.install(path), LibraryFault.UNKNOWN_KEY)
    assert "not a trusted key" in str(error)


def test_signed_but_invalid_is_refused_with_the_findings(
    lib: ProtocolLibrary, incoming: Path
) -> None:
    path = signed_file(
        incoming, BASE.replace("irradiance_mw_cm2 = 10.0", "irradiance_mw_cm2 = 250.0")
    )
    error = refused(lambda: lib.install(path), LibraryFault.INVALID_PROTOCOL)
    assert [i.rule for i in error.issues] == ["irradiance-ceiling"]


def test_explicit_signature_path(lib: ProtocolLibrary, incoming: Path) -> None:
    path = signed_file(incoming, BASE)
    moved = incoming / "elsewhere.minisig"
    Path(str(path) + ".minisig").rename(moved)
    refused(lambda: lib.install(path, incoming / "missing.minisig"), LibraryFault.IO_ERROR)
    assert lib.install(path, moved).version == 1


@pytest.mark.parametrize("failing", ["write-protocol", "rename-signature", "write-index"])
def test_a_failed_install_leaves_the_library_exactly_as_it_was(
    lib: ProtocolLibrary, incoming: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    lib.install(signed_file(incoming, BASE, "v1.toml"))
    before = snapshot(lib.directory)
    path = signed_file(incoming, version(2), "v2.toml")

    real_replace = os.replace
    real_fsync = os.fsync
    calls = {"replace": 0, "fsync": 0}

    def flaky_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls["replace"] += 1
        target = str(dst)
        if failing == "rename-signature" and target.endswith(".minisig"):
            raise OSError(28, "No space left on device")
        if failing == "write-index" and target.endswith("index.json"):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    def flaky_fsync(fd: int) -> None:
        calls["fsync"] += 1
        if failing == "write-protocol":
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", flaky_replace)
    monkeypatch.setattr(os, "fsync", flaky_fsync)
    error = refused(lambda: lib.install(path), LibraryFault.IO_ERROR)
    assert "the library is unchanged" in str(error)
    monkeypatch.undo()
    assert snapshot(lib.directory) == before
    assert lib.load("test-base").protocol.version == 1
    # and the install succeeds once the fault is gone
    assert lib.install(path).version == 2


def test_load_re_verifies_what_is_on_disk(lib: ProtocolLibrary, incoming: Path) -> None:
    entry = lib.install(signed_file(incoming, BASE))
    stored = lib.directory / entry.file
    original = stored.read_bytes()
    stored.write_bytes(original.replace(b"sessions = 10", b"sessions = 12"))
    error = refused(lambda: lib.load("test-base"), LibraryFault.CORRUPT)
    assert "changed after it was installed" in str(error)
    stored.write_bytes(original)
    assert lib.load("test-base").protocol.version == 1
    # a library that no longer trusts the signer refuses to load it
    distrustful = ProtocolLibrary(lib.directory, [])
    refused(lambda: distrustful.load("test-base"), LibraryFault.UNKNOWN_KEY)


def test_corrupt_index_is_reported(lib: ProtocolLibrary) -> None:
    (lib.directory / "index.json").write_text("{not json", encoding="utf-8")
    refused(lib.list, LibraryFault.CORRUPT)
    (lib.directory / "index.json").write_text(json.dumps({"format": 99}), encoding="utf-8")
    refused(lib.list, LibraryFault.CORRUPT)
