"""The retained ``state`` topic: controllers, interlocks, faults and ports.

Read from the core's typed status (``daemon.core.status.Hardware``, one
snapshot per sample), never from the drivers; everything else MQTT publishes
comes from ``Session.status()`` or the records outbox. Interlocks carry the
control API's names (``key``, ``remote``, ``estop_released``, ``footswitch``);
telemetry older than its staleness limit is shown as unknown, with its age.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pbmd.daemon.core.status import (
    ControllerStatus,
    Hardware,
    PortStatus,
    lower_name,
)
from pbmd.drivers import codec

if TYPE_CHECKING:
    from pbmd.daemon.core.engine import Engine
    from pbmd.daemon.services.records import RecordStore


def state_key(hw: Hardware, engine: Engine, store: RecordStore) -> tuple[Any, Any]:
    """What ``state`` is made of, as cheap tuples: (everything but temperatures,
    temperatures to 0.1 °C). Compared every sample; the payload is only built
    when it moved."""
    controllers = tuple(
        (c.name, c.connected, c.stale, c.reported_state, c.interlocks, c.fault_code)
        for c in hw.controllers
    )
    ports = tuple(
        (
            p.port,
            None if p.applicator is None else (p.applicator.kind, p.applicator.serial),
            p.applicator_known,
            None if p.reading is None else p.reading.flags,
        )
        for p in hw.ports
    )
    temperatures = tuple(
        None if p.reading is None else round(p.reading.temperature_c * 10) for p in hw.ports
    )
    key = (controllers, ports, engine.service_required, store.healthy)
    return key, temperatures


def state_payload(hw: Hardware, engine: Engine, store: RecordStore) -> dict[str, Any]:
    """The controller/interlock/fault snapshot."""
    return {
        "controllers": [_controller_entry(c) for c in hw.controllers],
        "ports": [_port_entry(p) for p in hw.ports],
        "service_required": engine.service_required,
        "records_healthy": store.healthy,
    }


def _controller_entry(c: ControllerStatus) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": c.name, "connected": c.connected}
    if c.serial is not None:
        entry["serial"] = c.serial
        entry["firmware"] = c.firmware
    if c.reported_state is None or c.stale:
        entry.update(state=None, interlocks=None, run_permitted=None, fault=None)
        if c.reported_state is not None:
            entry["state"] = "unknown"
    else:
        assert c.interlocks is not None and c.fault_code is not None
        entry.update(
            state=c.reported_state,
            interlocks=c.interlocks.as_dict(),
            run_permitted=c.interlocks.run_permitted,
            fault=lower_name(codec.FaultCode, c.fault_code),
            fault_code=c.fault_code,
        )
    entry.update(telemetry_stale=c.stale, telemetry_age_s=c.freshness.rounded_age_s)
    return entry


def _port_entry(p: PortStatus) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "port": p.port,
        "controller": p.controller,
        "device_port": p.device_port,
        "applicator": None if p.applicator is None else p.applicator.as_dict(),
    }
    r = p.reading
    if r is None:
        entry.update(
            applicator_present=None, emitting=None, contact=None, fault=None, temperature_c=None
        )
    else:
        entry.update(
            applicator_present=r.applicator_present,
            emitting=r.emitting,
            contact=r.contact,
            fault=r.fault,
            temperature_c=round(r.temperature_c, 1),
        )
    entry["telemetry_stale"] = p.telemetry_stale
    return entry
