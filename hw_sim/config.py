"""Configuration of a simulated controller."""

from __future__ import annotations

from dataclasses import dataclass, field

from .applicators import APPLICATORS, default_ports

MAX_TIME_SCALE = 120.0
MAX_PORTS = 8


@dataclass
class SimConfig:
    """What the simulated controller reports in INFO and how its physics behave.

    ``time_scale`` makes the device clock run that many times faster than wall
    time (so a 45-minute session takes seconds); the watchdog and the telemetry
    rate stay in wall time (ICD §5a). ``ports`` maps port numbers 1..N to an
    applicator catalog name, or None for an empty port; N is the port count.
    """

    time_scale: float = 1.0
    ports: dict[int, str | None] = field(default_factory=default_ports)
    max_telemetry_hz: int = 200
    watchdog_ms: int = 250
    emission_delay_ms: int = 2000
    serial: str = "PBM-SIM-0001"
    firmware: str = "sim-1.0.0"
    seed: int = 0
    noise_fraction: float = 0.01

    def validate(self) -> None:
        """Refuse a configuration the simulator cannot honour, saying how to fix it."""
        if not 1.0 <= self.time_scale <= MAX_TIME_SCALE:
            raise ValueError(f"time_scale {self.time_scale} must be within 1..{MAX_TIME_SCALE:g}")
        if not self.ports:
            raise ValueError("ports is empty: give at least port 1")
        count = max(self.ports)
        if set(self.ports) - set(range(1, MAX_PORTS + 1)):
            raise ValueError(f"port numbers {sorted(self.ports)} must be within 1..{MAX_PORTS}")
        for port in range(1, count + 1):
            name = self.ports.get(port)
            if name is not None and name not in APPLICATORS:
                known = ", ".join(sorted(APPLICATORS))
                raise ValueError(f"port {port}: unknown applicator {name!r} (known: {known}, none)")
        if not 1 <= self.max_telemetry_hz <= 0xFFFF:
            raise ValueError("max_telemetry_hz must be within 1..65535")
        if not 1 <= self.watchdog_ms <= 0xFFFF or not 0 <= self.emission_delay_ms <= 0xFFFF:
            raise ValueError("watchdog_ms must be 1..65535 and emission_delay_ms 0..65535")
        if len(self.serial.encode()) > 16 or len(self.firmware.encode()) > 12:
            raise ValueError("serial is at most 16 ASCII characters, firmware at most 12")
        if not 0.0 <= self.noise_fraction < 0.5:
            raise ValueError("noise_fraction must be within 0..0.5")

    @property
    def port_count(self) -> int:
        return max(self.ports)
