"""The daemon's protocol library: signed files in, atomically, never backwards.

A file enters the library only if its minisign signature verifies against a
trusted key of the configuration and it passes validation, and only with a
version above any version of that protocol ever installed here (removing a
protocol keeps that high-water mark, so remove-then-install cannot roll back
either). `allow_unsigned` exists for development and says so in the log on
every use.

On disk: `<id>-v<version>.toml` (+ `.minisig`) per protocol, and
`index.json`, the only file that says what is installed. An install writes
the new files under new names, then replaces the index in one rename; a
failure at any point removes what it wrote, so the library is left exactly
as it was. Loading re-checks the file's hash and signature every time.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pbmd.protocols.errors import Issue, ProtocolInvalid
from pbmd.protocols.limits import DEFAULT_LIMITS, Limits
from pbmd.protocols.loader import LoadedProtocol, parse_protocol
from pbmd.protocols.signing import PublicKey, SignatureError, SignatureFault, Verified, verify

log = logging.getLogger("pbmd.protocols.library")

INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
INDEX_FORMAT = 1


class LibraryFault(enum.StrEnum):
    UNSIGNED = "unsigned"
    MALFORMED_SIGNATURE = "malformed-signature"
    UNSUPPORTED_ALGORITHM = "unsupported-algorithm"
    UNKNOWN_KEY = "unknown-key"
    BAD_SIGNATURE = "bad-signature"
    BAD_TRUSTED_COMMENT = "bad-trusted-comment"
    INVALID_PROTOCOL = "invalid-protocol"
    ROLLBACK = "rollback"
    NOT_INSTALLED = "not-installed"
    CORRUPT = "corrupt"
    IO_ERROR = "io-error"


_SIGNATURE_FAULTS = {
    SignatureFault.MALFORMED: LibraryFault.MALFORMED_SIGNATURE,
    SignatureFault.UNSUPPORTED_ALGORITHM: LibraryFault.UNSUPPORTED_ALGORITHM,
    SignatureFault.UNKNOWN_KEY: LibraryFault.UNKNOWN_KEY,
    SignatureFault.BAD_SIGNATURE: LibraryFault.BAD_SIGNATURE,
    SignatureFault.BAD_TRUSTED_COMMENT: LibraryFault.BAD_TRUSTED_COMMENT,
}


class LibraryError(Exception):
    """A refused library operation; `fault` is the machine-readable reason."""

    def __init__(self, fault: LibraryFault, message: str, issues: Sequence[Issue] = ()) -> None:
        super().__init__(message)
        self.fault = fault
        self.issues = tuple(issues)


@dataclass(frozen=True, slots=True)
class InstalledProtocol:
    id: str
    version: int
    title: str
    file: str
    sha256: str
    signed_by: str | None
    trusted_comment: str | None
    installed_at: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` by temp file + fsync + rename: whole or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ProtocolLibrary:
    """Installed protocols of one daemon, in `directory`."""

    def __init__(
        self,
        directory: str | Path,
        trusted_keys: Sequence[PublicKey],
        *,
        allow_unsigned: bool = False,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.directory = Path(directory)
        self.trusted_keys = tuple(trusted_keys)
        self.allow_unsigned = allow_unsigned
        self.limits = limits
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / LOCK_NAME).touch(exist_ok=True)
        if allow_unsigned:
            log.warning(
                "protocols.unsigned_accepted",
                extra={
                    "directory": str(self.directory),
                    "warning": "DEVELOPMENT SETTING: UNSIGNED protocol files are accepted; "
                    "never use this with patients",
                },
            )
        if not self.trusted_keys and not allow_unsigned:
            log.warning(
                "protocols.no_trusted_keys",
                extra={"directory": str(self.directory), "installable": False},
            )

    # -- checking ------------------------------------------------------------
    def check(
        self, data: bytes, signature: bytes | str | None, *, source: str = "<upload>"
    ) -> tuple[LoadedProtocol, Verified | None]:
        """Verify and validate a file without installing it; LibraryError if refused."""
        verified: Verified | None = None
        if signature is None:
            if not self.allow_unsigned:
                raise LibraryError(
                    LibraryFault.UNSIGNED,
                    f"{source} has no signature: sign it with minisign "
                    "(minisign -Sm FILE) using a key the daemon trusts",
                )
            log.warning("protocol.unsigned_checked", extra={"source": source})
        else:
            try:
                verified = verify(data, signature, self.trusted_keys)
            except SignatureError as exc:
                raise LibraryError(
                    _SIGNATURE_FAULTS[exc.fault], f"{source}: signature refused: {exc}"
                ) from None
        try:
            loaded = parse_protocol(data, source=source, limits=self.limits)
        except ProtocolInvalid as exc:
            raise LibraryError(LibraryFault.INVALID_PROTOCOL, str(exc), exc.errors) from None
        return loaded, verified

    # -- reading -------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        path = self.directory / INDEX_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": INDEX_FORMAT, "protocols": {}, "highest_version": {}}
        except OSError as exc:
            raise LibraryError(LibraryFault.IO_ERROR, f"cannot read {path}: {exc}") from None
        try:
            index = json.loads(text)
        except ValueError:
            raise LibraryError(LibraryFault.CORRUPT, f"{path} is not valid JSON") from None
        if (
            not isinstance(index, dict)
            or index.get("format") != INDEX_FORMAT
            or not isinstance(index.get("protocols"), dict)
            or not isinstance(index.get("highest_version"), dict)
        ):
            raise LibraryError(LibraryFault.CORRUPT, f"{path} is not a protocol library index")
        return index

    @staticmethod
    def _entry(protocol_id: str, raw: Any) -> InstalledProtocol:
        try:
            return InstalledProtocol(**raw)
        except TypeError:
            raise LibraryError(
                LibraryFault.CORRUPT, f"index entry of {protocol_id!r} is malformed"
            ) from None

    def list(self) -> list[InstalledProtocol]:
        index = self._read_index()
        return [self._entry(k, v) for k, v in sorted(index["protocols"].items())]

    def show(self, protocol_id: str) -> InstalledProtocol:
        raw = self._read_index()["protocols"].get(protocol_id)
        if raw is None:
            raise LibraryError(LibraryFault.NOT_INSTALLED, f"{protocol_id!r} is not installed")
        return self._entry(protocol_id, raw)

    def highest_version(self, protocol_id: str) -> int:
        """The highest version of a protocol ever installed here (0 if none)."""
        value = self._read_index()["highest_version"].get(protocol_id, 0)
        return value if isinstance(value, int) else 0

    def load(self, protocol_id: str) -> LoadedProtocol:
        """An installed protocol, re-verified (hash, signature, validation) as it is read."""
        entry = self.show(protocol_id)
        path = self.directory / entry.file
        try:
            data = path.read_bytes()
            signature: bytes | None = None
            if entry.signed_by is not None:
                signature = (self.directory / (entry.file + ".minisig")).read_bytes()
        except OSError as exc:
            raise LibraryError(LibraryFault.CORRUPT, f"{protocol_id}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise LibraryError(
                LibraryFault.CORRUPT,
                f"{entry.file} changed after it was installed (hash differs): reinstall it",
            )
        loaded, _ = self.check(data, signature, source=entry.file)
        return loaded

    # -- changing ------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / LOCK_NAME, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def install(
        self, path: str | Path, signature_path: str | Path | None = None
    ) -> InstalledProtocol:
        """Install a file and its signature (default: the file's name + `.minisig`)."""
        path = Path(path)
        sig_path = Path(signature_path) if signature_path else Path(str(path) + ".minisig")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LibraryError(LibraryFault.IO_ERROR, f"cannot read {path}: {exc}") from None
        try:
            signature: bytes | None = sig_path.read_bytes()
        except FileNotFoundError:
            if signature_path is not None:
                raise LibraryError(
                    LibraryFault.IO_ERROR, f"signature {sig_path} not found"
                ) from None
            signature = None
        except OSError as exc:
            raise LibraryError(LibraryFault.IO_ERROR, f"cannot read {sig_path}: {exc}") from None
        return self.install_bytes(data, signature, source=str(path))

    def install_bytes(
        self, data: bytes, signature: bytes | str | None, *, source: str = "<upload>"
    ) -> InstalledProtocol:
        """Verify, validate and install; the library is unchanged if anything fails."""
        loaded, verified = self.check(data, signature, source=source)
        protocol = loaded.protocol
        with self._locked():
            index = self._read_index()
            highest = index["highest_version"].get(protocol.id, 0)
            if protocol.version <= highest:
                installed = index["protocols"].get(protocol.id)
                now = (
                    f"version {installed['version']} is installed"
                    if installed
                    else (f"version {highest} was installed before and removed")
                )
                raise LibraryError(
                    LibraryFault.ROLLBACK,
                    f"{source}: {protocol.id} version {protocol.version} is not above the "
                    f"highest installed version ({now}); a new release needs a higher "
                    "version number",
                )
            name = f"{protocol.id}-v{protocol.version}.toml"
            entry = InstalledProtocol(
                id=protocol.id,
                version=protocol.version,
                title=protocol.title,
                file=name,
                sha256=loaded.sha256,
                signed_by=verified.key.id_hex if verified else None,
                trusted_comment=verified.trusted_comment if verified else None,
                installed_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            )
            old = index["protocols"].get(protocol.id)
            new_index = {
                "format": INDEX_FORMAT,
                "protocols": {**index["protocols"], protocol.id: entry.as_dict()},
                "highest_version": {**index["highest_version"], protocol.id: protocol.version},
            }
            written: list[Path] = []
            try:
                files = [(self.directory / name, data)]
                if signature is not None:
                    sig_bytes = signature.encode() if isinstance(signature, str) else signature
                    files.append((self.directory / (name + ".minisig"), sig_bytes))
                for target, content in files:
                    _write_atomic(target, content)
                    written.append(target)
                self._write_index(new_index)
            except OSError as exc:
                for target in written:
                    with contextlib.suppress(OSError):
                        target.unlink()
                raise LibraryError(
                    LibraryFault.IO_ERROR,
                    f"installing {protocol.id} v{protocol.version} failed ({exc}); "
                    "the library is unchanged",
                ) from None
            if old is not None:
                self._delete_files(str(old.get("file", "")))
        log.info(
            "protocol.installed",
            extra={
                "protocol_id": protocol.id,
                "version": protocol.version,
                "signed_by": entry.signed_by,  # None: unsigned (a development setting)
            },
        )
        return entry

    def remove(self, protocol_id: str) -> InstalledProtocol:
        """Uninstall a protocol; its version stays the floor for a later install."""
        with self._locked():
            index = self._read_index()
            raw = index["protocols"].get(protocol_id)
            if raw is None:
                raise LibraryError(LibraryFault.NOT_INSTALLED, f"{protocol_id!r} is not installed")
            entry = self._entry(protocol_id, raw)
            remaining = {k: v for k, v in index["protocols"].items() if k != protocol_id}
            try:
                self._write_index({**index, "protocols": remaining})
            except OSError as exc:
                raise LibraryError(
                    LibraryFault.IO_ERROR, f"removing {protocol_id} failed ({exc}); unchanged"
                ) from None
            self._delete_files(entry.file)
        log.info("protocol.removed", extra={"protocol_id": entry.id, "version": entry.version})
        return entry

    def _write_index(self, index: dict[str, Any]) -> None:
        data = json.dumps(index, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        _write_atomic(self.directory / INDEX_NAME, data)
        _fsync_dir(self.directory)

    def _delete_files(self, name: str) -> None:
        if not name or "/" in name:
            return
        for file in (name, name + ".minisig"):
            with contextlib.suppress(OSError):
                (self.directory / file).unlink()
