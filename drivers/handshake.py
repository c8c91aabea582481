"""ICD §6's opening sequence: HELLO, GET_PORT for each port, SET_TELEMETRY.

Nothing else is sent before it is done, and a controller that is not
PBM-Link v1 is refused (ProtocolMismatch) before anything else is sent to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import structlog

from pbmd.drivers.codec import PROTOCOL_VERSION, DropReason, Info
from pbmd.drivers.errors import ProtocolMismatch, ReplyTimeout, UnexpectedReply

if TYPE_CHECKING:
    from pbmd.drivers.client import ControllerClient

log = structlog.get_logger()

MAX_PORT_COUNT: Final = 8


async def open_session(client: ControllerClient, telemetry_hz: int) -> Info:
    """Run the opening sequence on ``client``; returns the controller's INFO.

    HELLO is asked again after a missed deadline, as every repeatable request
    is, but not once a frame of another protocol version has been seen: that
    controller is refused rather than asked again.
    """
    version_drops = client.stats.dropped[DropReason.VERSION.value]

    def other_version_seen() -> bool:
        return client.stats.dropped[DropReason.VERSION.value] > version_drops

    try:
        info = await client.hello(give_up=other_version_seen)
    except ReplyTimeout as exc:
        if other_version_seen():
            raise ProtocolMismatch(
                "the controller answers with frames of another protocol version"
            ) from exc
        raise
    except UnexpectedReply as exc:
        raise ProtocolMismatch(f"INFO is not PBM-Link v1: {exc.detail}") from exc
    _check_info(info, telemetry_hz)
    client.ports = {}
    for port in range(1, info.port_count + 1):
        await client.get_port(port)
    await client.set_telemetry(telemetry_hz)
    log.info(
        "controller.ready",
        link=client.url,
        serial=info.serial,
        firmware=info.firmware,
        port_count=info.port_count,
        telemetry_hz=telemetry_hz,
    )
    return info


def _check_info(info: Info, telemetry_hz: int) -> None:
    if info.protocol_version != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"controller speaks protocol version {info.protocol_version}, "
            f"this host only {PROTOCOL_VERSION}",
            info,
        )
    if not 1 <= info.port_count <= MAX_PORT_COUNT:
        raise ProtocolMismatch(
            f"controller reports {info.port_count} ports, outside 1..{MAX_PORT_COUNT}", info
        )
    if not 0 <= telemetry_hz <= info.max_telemetry_hz:
        raise ValueError(
            f"telemetry_hz={telemetry_hz} outside 0..{info.max_telemetry_hz} "
            "(the controller's max_telemetry_hz)"
        )
