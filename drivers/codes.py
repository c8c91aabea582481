"""The named codes of PBM-Link v1 (shared/ICD.md §4): states, flags, reasons, errors.

Message fields keep raw ints, so a frame from another implementation with a
code this version does not know still decodes; these enumerations name them.
``pbmd.drivers.codec`` re-exports every name, so either import works.
"""

from __future__ import annotations

import enum


class ApplicatorKind(enum.IntEnum):
    NONE = 0
    PAD = 1
    PROBE = 2


class ControllerState(enum.IntEnum):
    STANDBY = 0
    ARMED_DELAY = 1
    ARMED_READY = 2
    FAULT = 3


class Interlock(enum.IntFlag):
    KEY = 0x01
    REMOTE = 0x02
    ESTOP_RELEASED = 0x04
    FOOTSWITCH = 0x08

    @classmethod
    def run_state(cls) -> Interlock:
        """The bits that gate emission (the footswitch is information only)."""
        return cls.KEY | cls.REMOTE | cls.ESTOP_RELEASED


class PortFlag(enum.IntFlag):
    APPLICATOR = 0x01
    EMITTING = 0x02
    CONTACT = 0x04
    FAULT = 0x08


class ChannelMode(enum.IntFlag):
    CONTINUOUS = 0x01
    PULSED = 0x02


class ChannelModes:
    """``continuous``/``pulsed`` read from a ``modes`` bit field (ICD §4 PORT_INFO).

    Shared by the wire record (codec.Channel) and the simulator's catalog entry.
    """

    __slots__ = ()
    modes: int

    @property
    def continuous(self) -> bool:
        return bool(self.modes & ChannelMode.CONTINUOUS)

    @property
    def pulsed(self) -> bool:
        return bool(self.modes & ChannelMode.PULSED)


class EmitMode(enum.IntEnum):
    CONTINUOUS = 0
    PULSED = 1


class EventCode(enum.IntEnum):
    EMISSION_ENDED = 1
    INTERLOCK_CHANGED = 2
    APPLICATOR_CHANGED = 3
    FAULT = 4
    WATCHDOG_EXPIRED = 5
    CONTACT_CHANGED = 6


class StopReason(enum.IntEnum):
    NONE = 0
    HOST_STOP = 1
    ENERGY_BUDGET = 2
    MAX_DURATION = 3
    INTERLOCK = 4
    WATCHDOG = 5
    OVERPOWER = 6
    OVER_TEMPERATURE = 7
    APPLICATOR_REMOVED = 8
    ALL_OFF = 9
    DISARM = 10
    CONTACT_LOST = 11


class FaultCode(enum.IntEnum):
    NONE = 0
    WATCHDOG = 1
    OVERPOWER = 2
    OVER_TEMPERATURE = 3
    PHOTODIODE = 4
    INTERNAL = 5


class NakError(enum.IntEnum):
    BAD_PORT = 1
    NO_APPLICATOR = 2
    WAVELENGTH_NOT_ON_APPLICATOR = 3
    POWER_ABOVE_MAXIMUM = 4
    NOT_ARMED = 5
    EMISSION_DELAY_ACTIVE = 6
    INTERLOCK_OPEN = 7
    FAULT_LATCHED = 8
    PORT_ALREADY_EMITTING = 9
    BAD_PARAMETER = 10
    UNKNOWN_MESSAGE_TYPE = 11
    NO_SKIN_CONTACT = 12

    @property
    def meaning(self) -> str:
        return _NAK_MEANINGS[self]


_NAK_MEANINGS = {
    NakError.BAD_PORT: "port number outside 1..port_count",
    NakError.NO_APPLICATOR: "no applicator plugged into the port",
    NakError.WAVELENGTH_NOT_ON_APPLICATOR: "the applicator has no channel of that wavelength",
    NakError.POWER_ABOVE_MAXIMUM: "power setpoint above the channel maximum",
    NakError.NOT_ARMED: "controller not armed",
    NakError.EMISSION_DELAY_ACTIVE: "emission delay after ARM has not elapsed",
    NakError.INTERLOCK_OPEN: "an interlock (key, remote loop or emergency stop) is open",
    NakError.FAULT_LATCHED: "a fault is latched; clear it and re-arm",
    NakError.PORT_ALREADY_EMITTING: "the port is already emitting",
    NakError.BAD_PARAMETER: "bad parameter or payload length",
    NakError.UNKNOWN_MESSAGE_TYPE: "unknown message type",
    NakError.NO_SKIN_CONTACT: "probe not in skin contact",
}


def describe(enum_cls: type[enum.IntEnum], code: int) -> str:
    """Name a wire code, tolerating values this version does not know."""
    try:
        return enum_cls(code).name
    except ValueError:
        return f"{enum_cls.__name__}({code})"
