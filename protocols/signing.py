"""minisign signatures, verified with `cryptography` (Ed25519).

Files are signed with the standard `minisign` tool; pbmd only verifies.
Formats (minisign's documentation):

- public key: an untrusted comment line, then base64 of
  ``"Ed" || key_id[8] || ed25519_public_key[32]``;
- signature file: ``untrusted comment: …``, base64 of
  ``algorithm[2] || key_id[8] || signature[64]``, ``trusted comment: …``,
  base64 of ``global_signature[64]``.

The algorithm is ``ED`` (minisign's default since 0.10: the signature is over
the BLAKE2b-512 hash of the file) or ``Ed`` (legacy, ``minisign -l``: over the
file itself). The global signature covers ``signature || trusted comment``,
so the trusted comment cannot be changed without the secret key. Both are
checked; the key id must be one of the trusted keys.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_KEY_ALGORITHM = b"Ed"
_LEGACY = b"Ed"
_PREHASHED = b"ED"
_TRUSTED_PREFIX = "trusted comment: "
_UNTRUSTED_PREFIX = "untrusted comment: "
MAX_SIGNATURE_BYTES = 4096


class SignatureFault(enum.StrEnum):
    MALFORMED = "malformed"
    UNSUPPORTED_ALGORITHM = "unsupported-algorithm"
    UNKNOWN_KEY = "unknown-key"
    BAD_SIGNATURE = "bad-signature"
    BAD_TRUSTED_COMMENT = "bad-trusted-comment"


class SignatureError(ValueError):
    """A signature (or key) that does not verify; `fault` says which way."""

    def __init__(self, fault: SignatureFault, message: str) -> None:
        super().__init__(message)
        self.fault = fault


def key_id_hex(key_id: bytes) -> str:
    """A key id as minisign prints it: the 8 bytes as a little-endian number in upper-case
    hex, without leading zeros (minisign's "%" PRIX64), so it reads the same in both."""
    return f"{int.from_bytes(key_id, 'little'):X}"


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(SignatureFault.MALFORMED, f"{what} is not valid base64") from None


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A minisign public key."""

    key_id: bytes
    raw: bytes
    comment: str = ""

    @property
    def id_hex(self) -> str:
        return key_id_hex(self.key_id)

    @classmethod
    def from_base64(cls, text: str, comment: str = "") -> PublicKey:
        blob = _b64(text, "public key")
        if len(blob) != 42 or blob[:2] != _KEY_ALGORITHM:
            raise SignatureError(
                SignatureFault.MALFORMED, "not a minisign Ed25519 public key (expected 42 bytes)"
            )
        return cls(blob[2:10], blob[10:], comment)

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """The contents of a minisign .pub file, or its bare base64 line."""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        comment = ""
        if lines and lines[0].startswith(_UNTRUSTED_PREFIX):
            comment = lines.pop(0)[len(_UNTRUSTED_PREFIX) :]
        if len(lines) != 1:
            raise SignatureError(SignatureFault.MALFORMED, "a public key file has one key line")
        return cls.from_base64(lines[0], comment)

    @classmethod
    def from_file(cls, path: str | Path) -> PublicKey:
        return cls.parse(Path(path).read_text(encoding="utf-8"))

    def verify_raw(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Signature:
    """A parsed .minisig file (not yet verified)."""

    algorithm: bytes
    key_id: bytes
    signature: bytes
    untrusted_comment: str
    trusted_comment: str
    global_signature: bytes

    @property
    def key_id_hex(self) -> str:
        return key_id_hex(self.key_id)

    @classmethod
    def parse(cls, data: str | bytes) -> Signature:
        if isinstance(data, bytes):
            if len(data) > MAX_SIGNATURE_BYTES:
                raise SignatureError(SignatureFault.MALFORMED, "signature file is too large")
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise SignatureError(
                    SignatureFault.MALFORMED, "signature file is not UTF-8 text"
                ) from None
        lines = data.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        lines = [line.removesuffix("\r") for line in lines]
        if len(lines) != 4:
            raise SignatureError(
                SignatureFault.MALFORMED, f"a minisign signature has 4 lines, this has {len(lines)}"
            )
        untrusted, sig_line, trusted, global_line = lines
        if not untrusted.startswith(_UNTRUSTED_PREFIX):
            raise SignatureError(SignatureFault.MALFORMED, "line 1 is not an untrusted comment")
        if not trusted.startswith(_TRUSTED_PREFIX):
            raise SignatureError(SignatureFault.MALFORMED, "line 3 is not a trusted comment")
        blob = _b64(sig_line, "signature line")
        if len(blob) != 74:
            raise SignatureError(SignatureFault.MALFORMED, "signature line is not 74 bytes")
        global_signature = _b64(global_line, "global signature")
        if len(global_signature) != 64:
            raise SignatureError(SignatureFault.MALFORMED, "global signature is not 64 bytes")
        algorithm = blob[:2]
        if algorithm not in (_LEGACY, _PREHASHED):
            raise SignatureError(
                SignatureFault.UNSUPPORTED_ALGORITHM,
                f"signature algorithm {algorithm!r} is neither Ed (legacy) nor ED (prehashed)",
            )
        return cls(
            algorithm=algorithm,
            key_id=blob[2:10],
            signature=blob[10:],
            untrusted_comment=untrusted[len(_UNTRUSTED_PREFIX) :],
            trusted_comment=trusted[len(_TRUSTED_PREFIX) :],
            global_signature=global_signature,
        )


@dataclass(frozen=True, slots=True)
class Verified:
    """A signature that verified: who signed, and the trusted comment they signed."""

    key: PublicKey
    trusted_comment: str
    prehashed: bool


def verify(
    data: bytes, signature: str | bytes | Signature, trusted_keys: Iterable[PublicKey]
) -> Verified:
    """Check a file's minisign signature against the trusted keys; SignatureError if not."""
    sig = signature if isinstance(signature, Signature) else Signature.parse(signature)
    key = next((k for k in trusted_keys if k.key_id == sig.key_id), None)
    if key is None:
        raise SignatureError(
            SignatureFault.UNKNOWN_KEY,
            f"signed with key {sig.key_id_hex}, which is not a trusted key",
        )
    prehashed = sig.algorithm == _PREHASHED
    message = hashlib.blake2b(data, digest_size=64).digest() if prehashed else data
    if not key.verify_raw(sig.signature, message):
        raise SignatureError(
            SignatureFault.BAD_SIGNATURE,
            f"the signature by key {key.id_hex} does not match the file (altered or re-signed)",
        )
    comment = sig.trusted_comment.encode("utf-8")
    if not key.verify_raw(sig.global_signature, sig.signature + comment):
        raise SignatureError(
            SignatureFault.BAD_TRUSTED_COMMENT,
            f"the trusted comment is not the one key {key.id_hex} signed (altered)",
        )
    return Verified(key, sig.trusted_comment, prehashed)
