"""One connection to the broker: the client, its last will, and the clean-up after it.

Everything that knows aiomqtt's and paho's details is here; the publisher only
publishes through the client this module makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ssl
from collections.abc import Iterable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from pbmd.daemon.services.mqtt.config import MqttConfig

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"


def _props(packet_type: int, **values: Any) -> Properties:
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


class _Client(aiomqtt.Client):
    """aiomqtt's client, failing a connect at once when the link closes before CONNACK.

    aiomqtt ignores a disconnect that comes before the broker's CONNACK and lets
    the connect wait for its timeout; a broker that rejects the client during
    the TLS 1.3 handshake (no or a wrong client certificate) closes just then.
    """

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if not self._connected.done():
            error = aiomqtt.MqttError(
                f"connection closed before the broker accepted it: {reason_code}"
            )
            self._loop.call_soon_threadsafe(_fail_pending, self._connected, error)
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)


def _fail_pending(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def make_client(
    config: MqttConfig, *, status_topic: str, client_id: str, pending_calls_threshold: int
) -> aiomqtt.Client:
    """A client for one connection attempt, its will marking ``status_topic`` offline.

    The password file is read at every connect, so a rotated password is picked
    up without a restart.
    """
    cfg = config
    password: str | None = None
    if cfg.password_file is not None:
        text = await asyncio.to_thread(cfg.password_file.read_text, encoding="utf-8")
        password = text.rstrip("\r\n")
    tls_params: aiomqtt.TLSParameters | None = None
    if cfg.tls is not None:
        tls_params = aiomqtt.TLSParameters(
            ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
            certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
            keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    will = aiomqtt.Will(
        status_topic,
        STATUS_OFFLINE,
        qos=1,
        retain=True,
        properties=_props(PacketTypes.WILLMESSAGE, UserProperty=("reason", "connection lost")),
    )
    client = _Client(
        cfg.host,
        cfg.port,
        username=cfg.username,
        password=password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        will=will,
        keepalive=cfg.keepalive_s,
        timeout=cfg.connect_timeout_s,
        tls_params=tls_params,
        tls_insecure=cfg.tls.insecure if cfg.tls is not None and cfg.tls.insecure else None,
    )
    client.pending_calls_threshold = pending_calls_threshold
    return client


def _first_mqtt_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The MqttError that ended a connection's tasks, else the group itself."""
    for exc in _leaves(group):
        if isinstance(exc, aiomqtt.MqttError):
            return exc
    return group


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


async def _reap(client: aiomqtt.Client) -> None:
    """aiomqtt cancels its keepalive task from the socket-close callback; wait for it so
    that nothing of a connection outlives it."""
    task: asyncio.Task[None] | None = getattr(client, "_misc_task", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def pbmd_version() -> str:
    try:
        return importlib.metadata.version("pbmd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
