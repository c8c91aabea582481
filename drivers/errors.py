"""What can go wrong with a request to a PBM-Link controller (ICD §3, §6).

Every error a caller of :class:`pbmd.drivers.client.ControllerClient` sees is
a :class:`ClientError`; ``pbmd.drivers.client`` re-exports all of them.
"""

from __future__ import annotations

from pbmd.drivers.codec import Info, Message, NakError


class ClientError(Exception):
    """A request to the controller did not succeed."""


class LinkClosed(ClientError, ConnectionError):
    """The link is gone (lost, or closed by the host); nothing more can be sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ReplyTimeout(ClientError, TimeoutError):
    """No reply by the deadline, and the link is judged faulty (ICD §6, E202).

    One missed reply is not a link fault: a repeatable request is asked again
    first (see ``pbmd.drivers.replies``). This is raised when several requests
    in a row went unanswered or one request's retry budget is spent.
    """

    def __init__(self, request: Message, seq: int, timeout_s: float) -> None:
        super().__init__(request, seq, timeout_s)
        self.request = request
        self.seq = seq
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return (
            f"no reply to {type(self.request).__name__} (seq {self.seq}) "
            f"within {self.timeout_s * 1000:.0f} ms"
        )


class ReplyMissed(ClientError):
    """One reply missed its deadline while the link is still judged healthy.

    Internal to the client: a repeatable request is asked again; callers see
    a reply, :class:`OutcomeUnknown` or :class:`ReplyTimeout`, never this.
    """

    def __init__(self, request: Message, seq: int, timeout_s: float) -> None:
        super().__init__(request, seq, timeout_s)
        self.request = request
        self.seq = seq
        self.timeout_s = timeout_s


class NakReceived(ClientError):
    """The controller refused a request; ``code`` is the ICD §4 NAK error."""

    def __init__(self, code: int, request: Message, seq: int) -> None:
        super().__init__(code, request, seq)
        try:
            self.code: NakError | int = NakError(code)
        except ValueError:
            self.code = code
        self.request = request
        self.seq = seq

    @property
    def error(self) -> NakError | None:
        """The code as a NakError, or None for a code this version does not know."""
        return self.code if isinstance(self.code, NakError) else None

    @property
    def meaning(self) -> str:
        if isinstance(self.code, NakError):
            return self.code.meaning
        return f"unknown NAK error {self.code}"

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, NakError) else "?"
        request = type(self.request).__name__
        return f"{request} refused: NAK {int(self.code)} {name} ({self.meaning})"


class UnexpectedReply(ClientError):
    """A reply with the request's seq that is not a valid answer to it."""

    def __init__(self, request: Message, reply: Message | None, detail: str) -> None:
        super().__init__(request, reply, detail)
        self.request = request
        self.reply = reply
        self.detail = detail

    def __str__(self) -> str:
        return f"bad reply to {type(self.request).__name__}: {self.detail}"


class ProtocolMismatch(ClientError):
    """The controller does not speak PBM-Link v1 (ICD §6: refuse it)."""

    def __init__(self, detail: str, info: Info | None = None) -> None:
        super().__init__(detail)
        self.info = info


class EmissionInhibited(ClientError):
    """EMIT_START refused on the host side: emission is inhibited (a trip latched)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"emission inhibited: {reason}")
        self.reason = reason


class SubscriptionOverflow(ClientError):
    """A lossless subscription fell behind and lost items; resynchronise."""


class OutcomeUnknown(ReplyTimeout):
    """EMIT_START or ARM got no reply, and the link is not (yet) judged faulty.

    ICD §6: these two are never sent again blindly. The request may have been
    executed (the reply was lost) or not (the request was lost); the caller
    learns which from telemetry (the port's emitting flag, the controller
    state) or GET_PORT/GET_COUNTERS before it does anything else.

    It is a :class:`ReplyTimeout`, so a caller that does not tell the two
    apart still treats it as a link fault (the safe reading); one that does
    catches ``OutcomeUnknown`` first. Reply-timeout listeners are not called
    for it: it is not a link fault by itself.
    """

    def __str__(self) -> str:
        return (
            f"no reply to {type(self.request).__name__} (seq {self.seq}) "
            f"within {self.timeout_s * 1000:.0f} ms: outcome unknown, not sent again"
        )
