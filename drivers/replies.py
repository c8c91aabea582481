"""Which reply each request gets, which requests may be asked again, and reply checks.

ICD §3 gives each request exactly one reply type (or NAK). ICD §6 splits the
requests by what a lost reply means: most are safe to repeat, so a missed
reply is asked again with a new seq; EMIT_START and ARM are not, because
the controller may have executed them (only the reply was lost), and sending
them again could start what the host did not mean.
"""

from __future__ import annotations

from typing import Final

from pbmd.drivers import codec
from pbmd.drivers.codec import CodecError, Frame, Message, Nak
from pbmd.drivers.errors import ClientError, NakReceived, UnexpectedReply

REPLY_TYPES: Final[dict[type[Message], type[Message]]] = {
    codec.Hello: codec.Info,
    codec.Ping: codec.Pong,
    codec.GetPort: codec.PortInfo,
    codec.SetTelemetry: codec.Ack,
    codec.Arm: codec.Ack,
    codec.Disarm: codec.Ack,
    codec.EmitStart: codec.Ack,
    codec.EmitStop: codec.Stopped,
    codec.AllOff: codec.Ack,
    codec.ClearFault: codec.Ack,
    codec.GetCounters: codec.Counters,
}
"""ICD §3: the one reply type (besides NAK) that each request may get."""

REPEATABLE_REQUESTS: Final[tuple[type[Message], ...]] = (
    codec.Hello,
    codec.Ping,
    codec.GetPort,
    codec.GetCounters,
    codec.SetTelemetry,
    codec.EmitStop,
    codec.AllOff,
    codec.Disarm,
    codec.ClearFault,
)
"""ICD §6: asked again with a new seq when the reply is missing. Sending one
twice leaves the controller as sending it once would (EMIT_STOP on an idle
port answers the last STOPPED). HELLO changes nothing on the controller."""

OUTCOME_UNKNOWN_REQUESTS: Final[tuple[type[Message], ...]] = (codec.EmitStart, codec.Arm)
"""ICD §6: never sent again after a missing reply; the outcome is learned
from telemetry or GET_PORT instead (see errors.OutcomeUnknown)."""

REPLY_TYPE_CODES: Final = frozenset(cls.TYPE for cls in REPLY_TYPES.values()) | {Nak.TYPE}
_PORT_REQUESTS: Final = (codec.GetPort, codec.EmitStop, codec.GetCounters)


def check_reply(request: Message, seq: int, frame: Frame) -> Message | ClientError:
    """The reply to ``request`` that ``frame`` carries, or the error it amounts to.

    A NAK becomes NakReceived; a malformed payload, a reply of another type or
    one for another port becomes UnexpectedReply.
    """
    try:
        reply = frame.message()
    except CodecError as exc:
        return UnexpectedReply(request, None, f"malformed reply: {exc}")
    if isinstance(reply, Nak):
        return NakReceived(reply.error, request, seq)
    expected = REPLY_TYPES[type(request)]
    if type(reply) is not expected:
        return UnexpectedReply(
            request, reply, f"got {type(reply).__name__}, expected {expected.__name__}"
        )
    if isinstance(request, _PORT_REQUESTS) and getattr(reply, "port", None) != request.port:
        return UnexpectedReply(
            request,
            reply,
            f"{type(reply).__name__} for port {getattr(reply, 'port', None)}, "
            f"asked for port {request.port}",
        )
    return reply
