"""A test subscriber: records every message it receives and lets tests wait on them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt

from .broker import TlsFiles


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    user_properties: tuple[tuple[str, str], ...]
    correlation_data: bytes | None
    expiry_s: int | None
    arrived_s: float
    """Host monotonic time of arrival."""

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.payload)

    def prop(self, name: str) -> str | None:
        return next((v for k, v in self.user_properties if k == name), None)


def _received(m: aiomqtt.Message) -> Received:
    props = m.properties
    users: tuple[tuple[str, str], ...] = ()
    corr: bytes | None = None
    expiry: int | None = None
    if props is not None:
        users = tuple(getattr(props, "UserProperty", ()) or ())
        corr = getattr(props, "CorrelationData", None)
        expiry = getattr(props, "MessageExpiryInterval", None)
    payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
    return Received(
        m.topic.value, payload, bool(m.retain), m.qos, users, corr, expiry, time.monotonic()
    )


class Subscriber:
    """Subscribes to ``topics`` (QoS 1) and keeps every message, in arrival order.

    ``connect()`` may be called again after the broker went away; the messages
    received so far are kept.
    """

    def __init__(
        self,
        port: int,
        topics: Sequence[str] = ("pbm/v1/#", "homeassistant/#"),
        *,
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port
        self.topics = tuple(topics)
        self.tls = tls
        self.username = username
        self.password = password
        self.messages: list[Received] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; returns once the broker acknowledged the subscriptions."""
        await self.disconnect()
        tls_context: ssl.SSLContext | None = None
        if self.tls is not None:
            tls_context = ssl.create_default_context(cafile=str(self.tls.ca))
            tls_context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        client = aiomqtt.Client(
            "127.0.0.1",
            self.port,
            username=self.username,
            password=self.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=tls_context,
            timeout=timeout_s,
        )
        await client.__aenter__()
        try:
            for topic in self.topics:
                await client.subscribe(topic, qos=1)
        except BaseException:
            await client.__aexit__(None, None, None)
            raise
        self._client = client
        self._task = asyncio.create_task(self._collect(client), name="test-subscriber")

    async def _collect(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for m in client.messages:
                self.messages.append(_received(m))
                self._arrived.set()
        self._arrived.set()

    async def disconnect(self) -> None:
        task, self._task = self._task, None
        client, self._client = self._client, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            misc = getattr(client, "_misc_task", None)
            if misc is not None and not misc.done():
                misc.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await misc

    async def wait_for(
        self,
        predicate: Callable[[Received], bool],
        *,
        timeout_s: float = 10.0,
        start: int = 0,
        what: str = "a matching message",
    ) -> Received:
        """The first message from index ``start`` on that satisfies ``predicate``."""
        i = start
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    while i < len(self.messages):
                        if predicate(self.messages[i]):
                            return self.messages[i]
                        i += 1
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            topics = sorted({m.topic for m in self.messages})
            raise AssertionError(
                f"no {what} within {timeout_s} s ({len(self.messages)} messages on {topics})"
            ) from None

    async def wait_until(
        self,
        condition: Callable[[], bool],
        *,
        timeout_s: float = 10.0,
        what: str = "the condition",
    ) -> None:
        """Wait, message by message, until ``condition()`` holds."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"{what} did not hold within {timeout_s} s") from None

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]
