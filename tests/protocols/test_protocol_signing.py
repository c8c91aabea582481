"""minisign signatures from the real binary, verified with `cryptography`; tampering refused."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from fixtures.protocols import BASE
from fixtures.signing import make_keypair, run_minisign, sign

from pbmd.protocols.signing import (
    PublicKey,
    Signature,
    SignatureError,
    SignatureFault,
    key_id_hex,
    verify,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(directory, name) for name in ("good", "other")}


@pytest.fixture
def signed(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> tuple[Path, Path, PublicKey]:
    path = tmp_path / "protocol.toml"
    path.write_text(BASE, encoding="utf-8")
    public, secret = keys["good"]
    return (
        path,
        sign(path, secret, trusted_comment="pbmd protocol test-base v1"),
        PublicKey.from_file(public),
    )


def flip_base64_char(line: str, index: int) -> str:
    """Change one base64 character so that the decoded bytes differ."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    old = line[index]
    new = alphabet[(alphabet.index(old) + 1) % 64]
    return line[:index] + new + line[index + 1 :]


def test_prehashed_signature_verifies(signed: tuple[Path, Path, PublicKey]) -> None:
    path, sig, key = signed
    verified = verify(path.read_bytes(), sig.read_bytes(), [key])
    assert verified.prehashed  # minisign's default: "ED", Ed25519 over BLAKE2b-512
    assert verified.trusted_comment == "pbmd protocol test-base v1"
    assert verified.key == key
    assert Signature.parse(sig.read_text()).algorithm == b"ED"


def test_legacy_signature_verifies(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    path = tmp_path / "protocol.toml"
    path.write_text(BASE, encoding="utf-8")
    public, secret = keys["good"]
    sig = sign(path, secret, legacy=True)
    assert Signature.parse(sig.read_text()).algorithm == b"Ed"
    verified = verify(path.read_bytes(), sig.read_text(), [PublicKey.from_file(public)])
    assert not verified.prehashed


def test_key_id_matches_what_minisign_prints(keys: dict[str, tuple[Path, Path]]) -> None:
    public, _ = keys["good"]
    key = PublicKey.from_file(public)
    assert public.read_text().splitlines()[0].split()[-1] == key.id_hex
    assert key_id_hex(key.key_id) == key.id_hex
    # minisign prints no leading zeros (one key in sixteen has one).
    assert key_id_hex(bytes.fromhex("3039e80ddd2ed807")) == "7D82EDD0DE83930"
    assert key_id_hex(bytes(8)) == "0"
    assert PublicKey.from_base64(public.read_text().splitlines()[1]) == PublicKey(
        key.key_id, key.raw, ""
    )


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_byte_of_the_file_changed_is_refused(
    signed: tuple[Path, Path, PublicKey], where: str
) -> None:
    path, sig, key = signed
    data = bytearray(path.read_bytes())
    index = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[index] ^= 0x01
    with pytest.raises(SignatureError) as caught:
        verify(bytes(data), sig.read_bytes(), [key])
    assert caught.value.fault is SignatureFault.BAD_SIGNATURE


def test_one_byte_of_the_signature_changed_is_refused(signed: tuple[Path, Path, PublicKey]) -> None:
    path, sig, key = signed
    lines = sig.read_text().split("\n")
    lines[1] = flip_base64_char(lines[1], 40)  # inside the 64 signature bytes
    with pytest.raises(SignatureError) as caught:
        verify(path.read_bytes(), "\n".join(lines), [key])
    assert caught.value.fault is SignatureFault.BAD_SIGNATURE


def test_one_byte_of_the_trusted_comment_changed_is_refused(
    signed: tuple[Path, Path, PublicKey],
) -> None:
    path, sig, key = signed
    text = sig.read_text().replace("test-base v1", "test-base v9")
    with pytest.raises(SignatureError) as caught:
        verify(path.read_bytes(), text, [key])
    assert caught.value.fault is SignatureFault.BAD_TRUSTED_COMMENT
    # minisign itself agrees
    sig.write_text(text)
    with pytest.raises(subprocess.CalledProcessError):
        run_minisign(
            "-V", "-P", base64.b64encode(b"Ed" + key.key_id + key.raw).decode(), "-m", str(path)
        )


def test_one_byte_of_the_global_signature_changed_is_refused(
    signed: tuple[Path, Path, PublicKey],
) -> None:
    path, sig, key = signed
    lines = sig.read_text().split("\n")
    lines[3] = flip_base64_char(lines[3], 10)
    with pytest.raises(SignatureError) as caught:
        verify(path.read_bytes(), "\n".join(lines), [key])
    assert caught.value.fault is SignatureFault.BAD_TRUSTED_COMMENT


def test_the_untrusted_comment_is_not_covered(signed: tuple[Path, Path, PublicKey]) -> None:
    path, sig, key = signed
    lines = sig.read_text().split("\n")
    lines[0] = "untrusted comment: anything at all"
    assert verify(path.read_bytes(), "\n".join(lines), [key]).trusted_comment


def test_signature_by_an_untrusted_key_is_refused(
    signed: tuple[Path, Path, PublicKey], keys: dict[str, tuple[Path, Path]]
) -> None:
    path, sig, _ = signed
    other = PublicKey.from_file(keys["other"][0])
    with pytest.raises(SignatureError) as caught:
        verify(path.read_bytes(), sig.read_bytes(), [other])
    assert caught.value.fault is SignatureFault.UNKNOWN_KEY
    assert "not a trusted key" in str(caught.value)


def test_wrong_key_with_the_right_id_is_refused(
    signed: tuple[Path, Path, PublicKey], keys: dict[str, tuple[Path, Path]]
) -> None:
    path, sig, key = signed
    other = PublicKey.from_file(keys["other"][0])
    impostor = PublicKey(key.key_id, other.raw, "impostor")
    with pytest.raises(SignatureError) as caught:
        verify(path.read_bytes(), sig.read_bytes(), [impostor])
    assert caught.value.fault is SignatureFault.BAD_SIGNATURE


def test_resigned_by_another_key_is_refused(
    signed: tuple[Path, Path, PublicKey], keys: dict[str, tuple[Path, Path]]
) -> None:
    path, _, key = signed
    path.write_text(BASE.replace("sessions = 10", "sessions = 60"), encoding="utf-8")
    sig = sign(path, keys["other"][1])
    with pytest.raises(SignatureError) as caught:
        verify(path.read_bytes(), sig.read_bytes(), [key])
    assert caught.value.fault is SignatureFault.UNKNOWN_KEY


def test_any_trusted_key_may_sign(
    signed: tuple[Path, Path, PublicKey], keys: dict[str, tuple[Path, Path]]
) -> None:
    path, sig, key = signed
    other = PublicKey.from_file(keys["other"][0])
    assert verify(path.read_bytes(), sig.read_bytes(), [other, key]).key == key


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("", SignatureFault.MALFORMED),
        ("untrusted comment: x\nAAAA\n", SignatureFault.MALFORMED),
        ("untrusted comment: x\n!!!!\ntrusted comment: y\nAAAA\n", SignatureFault.MALFORMED),
        ("nope\n" + "A" * 100 + "\ntrusted comment: y\nAAAA\n", SignatureFault.MALFORMED),
        (
            "untrusted comment: x\n"
            + base64.b64encode(b"Xx" + bytes(72)).decode()
            + "\ntrusted comment: y\n"
            + base64.b64encode(bytes(64)).decode()
            + "\n",
            SignatureFault.UNSUPPORTED_ALGORITHM,
        ),
        (
            "untrusted comment: x\n"
            + base64.b64encode(b"ED" + bytes(72)).decode()
            + "\ntrusted comment: y\n"
            + base64.b64encode(bytes(10)).decode()
            + "\n",
            SignatureFault.MALFORMED,
        ),
    ],
    ids=["empty", "short", "bad-base64", "no-comment-prefix", "algorithm", "short-global"],
)
def test_malformed_signatures_are_refused(text: str, fault: SignatureFault) -> None:
    with pytest.raises(SignatureError) as caught:
        Signature.parse(text)
    assert caught.value.fault is fault


def test_binary_garbage_is_a_malformed_signature() -> None:
    with pytest.raises(SignatureError) as caught:
        Signature.parse(b"\xff\xfe" * 10)
    assert caught.value.fault is SignatureFault.MALFORMED
    with pytest.raises(SignatureError):
        Signature.parse(b"x" * 10_000)


@pytest.mark.parametrize(
    "text",
    ["", "untrusted comment: x\n", "a\nb\nc\n", base64.b64encode(b"Ed" + bytes(10)).decode()],
)
def test_malformed_public_keys_are_refused(text: str) -> None:
    with pytest.raises(SignatureError) as caught:
        PublicKey.parse(text)
    assert caught.value.fault is SignatureFault.MALFORMED


def test_crlf_signature_files_verify(signed: tuple[Path, Path, PublicKey]) -> None:
    path, sig, key = signed
    crlf = sig.read_text().replace("\n", "\r\n")
    assert verify(path.read_bytes(), crlf, [key]).trusted_comment == "pbmd protocol test-base v1"
