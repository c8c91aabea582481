"""The retained ``state`` topic: controllers, interlocks, faults and ports.

This is the one place MQTT reads the controllers; everything else it publishes
comes from ``Session.status()`` or the records outbox. What it reads, for the
typed status values that will replace these reads:

- ``engine.controllers``: each handle's ``name``, ``telemetry`` (``state``,
  ``interlocks``, ``fault_code``), ``info`` (``serial``, ``firmware``) and the
  driver client's ``is_open`` (``ctrl.client.is_open``: the handle offers no
  link state of its own);
- ``engine.port_map``: each target's ``controller``, ``device_port``,
  ``applicator`` (PORT_INFO: kind, serial, area, channel wavelengths; missing
  while a controller has not reported it) and ``controller.sample(device_port)``
  (``flags``, ``temp_centi_c``, ``applicator_present``, ``emitting``, ``contact``);
- ``engine.service_required`` and ``store.healthy``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pbmd.drivers import codec

if TYPE_CHECKING:
    from pbmd.daemon.core.controllers import ControllerHandle, PortTarget
    from pbmd.daemon.core.engine import Engine
    from pbmd.daemon.services.records import RecordStore


def _lower_name(enum_cls: type[Any], code: int) -> str:
    return codec.describe(enum_cls, code).lower()


def _interlocks(bits: int) -> dict[str, bool]:
    return {
        "key_on": bool(bits & codec.Interlock.KEY),
        "remote_closed": bool(bits & codec.Interlock.REMOTE),
        "estop_released": bool(bits & codec.Interlock.ESTOP_RELEASED),
        "footswitch_pressed": bool(bits & codec.Interlock.FOOTSWITCH),
    }


def _applicator(target: PortTarget) -> codec.PortInfo | None:
    """The port's PORT_INFO, None while its controller has not reported it."""
    try:
        return target.applicator
    except KeyError:
        return None


def state_key(engine: Engine, store: RecordStore) -> tuple[Any, Any]:
    """What ``state`` is made of, as cheap tuples: (everything but temperatures,
    temperatures to 0.1 °C). Compared every sample; the payload is only built
    when it moved."""
    controllers = []
    for ctrl in engine.controllers:
        t = ctrl.telemetry
        raw = None if t is None else (t.state, t.interlocks, t.fault_code)
        controllers.append((ctrl.name, ctrl.client.is_open, raw))
    ports = []
    temperatures = []
    for port, target in engine.port_map.items():
        info = _applicator(target)
        sample = target.controller.sample(target.device_port)
        ports.append(
            (
                port,
                None if info is None else (info.applicator_kind, info.applicator_serial),
                None if sample is None else sample.flags,
            )
        )
        temperatures.append(None if sample is None else round(sample.temp_centi_c / 10))
    key = (tuple(controllers), tuple(ports), engine.service_required, store.healthy)
    return key, tuple(temperatures)


def state_payload(engine: Engine, store: RecordStore) -> dict[str, Any]:
    """The controller/interlock/fault snapshot."""
    return {
        "controllers": [_controller_entry(ctrl) for ctrl in engine.controllers],
        "ports": [_port_entry(port, target) for port, target in engine.port_map.items()],
        "service_required": engine.service_required,
        "records_healthy": store.healthy,
    }


def _controller_entry(ctrl: ControllerHandle) -> dict[str, Any]:
    t = ctrl.telemetry
    entry: dict[str, Any] = {"name": ctrl.name, "connected": ctrl.client.is_open}
    with contextlib.suppress(Exception):
        entry["serial"] = ctrl.info.serial
        entry["firmware"] = ctrl.info.firmware
    if t is None:
        entry.update(state=None, interlocks=None, run_permitted=None, fault=None)
    else:
        run = codec.Interlock.run_state()
        entry.update(
            state=_lower_name(codec.ControllerState, t.state),
            interlocks=_interlocks(t.interlocks),
            run_permitted=(t.interlocks & run) == run,
            fault=_lower_name(codec.FaultCode, t.fault_code),
            fault_code=t.fault_code,
        )
    return entry


def _port_entry(port: int, target: PortTarget) -> dict[str, Any]:
    ctrl = target.controller
    entry: dict[str, Any] = {
        "port": port,
        "controller": ctrl.name,
        "device_port": target.device_port,
    }
    info = _applicator(target)
    entry["applicator"] = (
        None
        if info is None or info.applicator_kind == codec.ApplicatorKind.NONE
        else {
            "kind": _lower_name(codec.ApplicatorKind, info.applicator_kind),
            "serial": info.applicator_serial,
            "area_cm2": info.area_mm2 / 100.0,
            "channels_nm": [c.wavelength_nm for c in info.channels],
        }
    )
    sample = ctrl.sample(target.device_port)
    if sample is None:
        entry.update(
            applicator_present=None, emitting=None, contact=None, fault=None, temperature_c=None
        )
    else:
        entry.update(
            applicator_present=sample.applicator_present,
            emitting=sample.emitting,
            contact=sample.contact,
            fault=bool(sample.flags & codec.PortFlag.FAULT),
            temperature_c=round(sample.temp_centi_c / 100.0, 1),
        )
    return entry
