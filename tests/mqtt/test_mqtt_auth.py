"""TLS (with client certificates) and password authentication against a broker
configured for them; refused connections are retried without harm."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from .broker import Mosquitto, TlsFiles, make_password_file, make_tls_files
from .conftest import PublisherFactory, RigFactory, wait_stats
from .subscriber import Subscriber

PREFIX = "pbm/v1/ws-01"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def tls_broker(tmp_path: Path, pki: TlsFiles) -> AsyncIterator[Mosquitto]:
    b = Mosquitto(tmp_path / "tls-broker", tls=pki)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def _tls(pki: TlsFiles, *, client_cert: bool = True, ca: Path | None = None) -> dict[str, str]:
    out = {"ca_file": str(ca or pki.ca)}
    if client_cert:
        out |= {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    return out


async def test_tls_with_client_certificate(
    tls_broker: Mosquitto, pki: TlsFiles, make_rig: RigFactory, make_publisher: PublisherFactory
) -> None:
    sub = Subscriber(tls_broker.port, tls=pki)
    await sub.connect()
    try:
        rig = await make_rig()
        pub = await make_publisher(rig, tls_broker.port, tls=_tls(pki))
        await sub.wait_for(
            lambda m: m.topic == f"{PREFIX}/status" and m.text == "online", what="online"
        )
        await sub.wait_for(lambda m: m.topic == f"{PREFIX}/state", what="state over TLS")
        await pub.close()
        await sub.wait_for(
            lambda m: m.topic == f"{PREFIX}/status" and m.text == "offline", what="offline"
        )
    finally:
        await sub.disconnect()


async def test_tls_refusals_are_retried_without_harm(
    tls_broker: Mosquitto,
    pki: TlsFiles,
    tmp_path: Path,
    make_rig: RigFactory,
    make_publisher: PublisherFactory,
) -> None:
    rig = await make_rig()
    # No client certificate: the broker requires one (and says so in its log).
    pub = await make_publisher(rig, tls_broker.port, tls=_tls(pki, client_cert=False))
    stats = await wait_stats(pub, lambda s: s.connect_failures >= 2)
    assert stats.connects == 0 and not pub.connected
    await tls_broker.wait_log(r"OpenSSL Error.*certificate")
    await pub.close()
    # A broker certificate from a CA we do not trust.
    other = make_tls_files(tmp_path / "other-pki", name="untrusted")
    pub = await make_publisher(rig, tls_broker.port, tls=_tls(pki, ca=other.ca))
    stats = await wait_stats(pub, lambda s: s.connect_failures >= 2)
    assert stats.connects == 0 and not pub.connected
    assert "certificate verify failed" in (stats.last_error or "")
    await pub.close()
    # Nothing of the treatment side noticed.
    rig.engine.check_ready()


async def test_password_authentication(
    tmp_path: Path, make_rig: RigFactory, make_publisher: PublisherFactory
) -> None:
    passwords = make_password_file(
        tmp_path / "mosquitto.passwd", {"pbmd": "correct horse", "dashboard": "read"}
    )
    broker = Mosquitto(tmp_path / "auth-broker", password_file=passwords)
    await broker.start()
    sub = Subscriber(broker.port, username="dashboard", password="read")
    try:
        await sub.connect()
        secret = tmp_path / "mqtt-password"
        secret.write_text("wrong\n", encoding="utf-8")
        rig = await make_rig()
        pub = await make_publisher(rig, broker.port, username="pbmd", password_file=str(secret))
        stats = await wait_stats(pub, lambda s: s.connect_failures >= 1)
        assert stats.connects == 0 and "not authorized" in (stats.last_error or "").lower()
        await broker.wait_log(r"disconnected, not authori[sz]ed")
        # The password file is read at every attempt: fixing it is enough.
        secret.write_text("correct horse\n", encoding="utf-8")
        online = await sub.wait_for(
            lambda m: m.topic == f"{PREFIX}/status" and m.text == "online", what="online"
        )
        assert online.prop("reason") == "connected"
        assert pub.connected
        # Anonymous clients are refused by this broker.
        anonymous = Subscriber(broker.port)
        with pytest.raises(aiomqtt.MqttError):
            await anonymous.connect()
    finally:
        await sub.disconnect()
        await broker.stop()
