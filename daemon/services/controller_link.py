"""One configured controller as the process holds it: (embedded) simulator, client, handle.

The embedded simulator (link = "sim") runs in a child process (sim_process.py).

Opening a link means the handshake and a first telemetry sample; a link that
cannot open raises StartupError saying what to check. The service reopens a
lost link once no session runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from pbmd.daemon.core.controllers import ControllerHandle
from pbmd.daemon.core.status import ControllerStatus
from pbmd.daemon.services import config as cfg
from pbmd.daemon.services.api.status import controller_json
from pbmd.daemon.services.errors import StartupError
from pbmd.daemon.services.sim_process import SimProcess, SimStartError
from pbmd.drivers.client import ClientError, ControllerClient, open_controller
from pbmd.drivers.transport import LinkURLError

log = structlog.get_logger()

DEVICE_POLL_S = 2.0
"""How often a USB or serial controller that is not there yet is looked for at start-up."""
DEVICE_WAIT_EXTEND_S = 30.0
"""Each look extends systemd's start timeout by this much: waiting is not a hung start."""


class ControllerLink:
    """One configured controller: its (embedded) simulator, client and handle."""

    def __init__(self, config: cfg.ControllerConfig) -> None:
        self.config = config
        self.name = config.name
        self.sim: SimProcess | None = None
        self.url: str | None = None
        self.control_address: str | None = None
        self.client: ControllerClient | None = None
        self.handle: ControllerHandle | None = None
        self.lost: str | None = None
        self.connected_utc: float | None = None

    async def open(self, telemetry_hz: int, on_lost: Callable[[ControllerLink, str], None]) -> None:
        c = self.config
        if c.link == "sim" and (self.sim is None or not self.sim.alive):
            await self._start_sim()
        elif c.link != "sim":
            self.url = c.link
        assert self.url is not None
        try:
            client = await asyncio.wait_for(
                open_controller(self.url, telemetry_hz=telemetry_hz), c.connect_timeout_s
            )
        except TimeoutError:
            raise StartupError(
                f"controller {c.name} at {self.url} did not complete the handshake within "
                f"{c.connect_timeout_s:g} s; check that it is powered and connected (and the "
                "link URL), then start pbmd again"
            ) from None
        except (OSError, ClientError, LinkURLError) as exc:
            raise StartupError(
                f"controller {c.name} at {self.url}: {exc}; check the link URL in "
                "[[controllers]], the cable or the simulator, then start pbmd again"
            ) from exc
        handle = ControllerHandle(c.name, client)
        try:
            await handle.next_sample(max(2.0, 20.0 / telemetry_hz))
        except TimeoutError:
            handle.detach()
            await client.close()
            raise StartupError(
                f"controller {c.name} at {self.url} answered but sends no telemetry; check "
                "its firmware (ICD §7), then start pbmd again"
            ) from None
        client.add_link_lost_listener(lambda exc: on_lost(self, str(exc)))
        self.client = client
        self.handle = handle
        self.lost = None
        self.connected_utc = time.time()
        info = client.info
        log.info(
            "controller.connected",
            controller=c.name,
            link=self.url,
            serial=info.serial,
            firmware=info.firmware,
            ports=info.port_count,
        )

    async def _start_sim(self) -> None:
        """The embedded simulator in a process of its own; a dead one is started again
        (a power-cycled controller) when the link is reopened."""
        c = self.config
        opts = c.sim_options
        if self.sim is not None:
            await self.sim.close()
            self.sim = None
        try:
            sim = await SimProcess.start(opts)
        except (OSError, SimStartError) as exc:
            raise StartupError(
                f"controller {c.name}: the embedded simulator did not start ({exc}); try "
                'transport = "tcp" in [controllers.sim], or run `pbmd sim` to see why'
            ) from exc
        self.sim = sim
        self.url = sim.url
        self.control_address = sim.control_address
        log.info(
            "controller.simulated",
            controller=c.name,
            link=self.url,
            time_scale=opts.time_scale,
            control=self.control_address,
            pid=sim.pid,
        )

    # -- waiting for a controller at start-up (USB and serial links) -------------------

    @property
    def device_link(self) -> bool:
        """USB or serial: a controller that udev adds when it is plugged in, worth waiting for."""
        return self.config.link.lower().startswith(("usb://", "/dev/", "serial://"))

    async def open_when_present(
        self,
        telemetry_hz: int,
        on_lost: Callable[[ControllerLink, str], None],
        *,
        waiting: Callable[[str, bool], None],
        stop: asyncio.Event,
    ) -> bool:
        """Open; a USB or serial controller that cannot be opened yet is waited for.

        ``waiting(reason, changed)`` is called on every failed attempt (to say so in
        the service's status); returns False if ``stop`` is set meanwhile. Other links
        (the simulator, socket://) fail at once, as before.
        """
        while True:
            try:
                await self.open(telemetry_hz, on_lost)
                return True
            except StartupError as exc:
                if not self.device_link:
                    raise
                reason = f"waiting for the controller: {exc}"
                changed, self.lost = reason != self.lost, reason
                waiting(str(exc), changed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DEVICE_POLL_S)
            if stop.is_set():
                return False

    async def close_client(self) -> None:
        if self.handle is not None:
            self.handle.detach()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()

    async def close(self) -> None:
        await self.close_client()
        if self.sim is not None:
            await self.sim.close()
            self.sim = None

    def status(self, seen: ControllerStatus | None) -> dict[str, Any]:
        """The link as the API shows it; ``seen`` is the core's view of its controller."""
        out: dict[str, Any] = {
            "name": self.name,
            "link": self.config.link,
            "url": self.url,
            "simulated": self.config.link == "sim",
            "connected": bool(self.client is not None and self.client.is_open),
            "lost": self.lost,
        }
        if self.control_address is not None:
            out["sim_control"] = self.control_address
        client, handle = self.client, self.handle
        if client is None or handle is None:
            return out
        info = client.info
        stats = client.stats
        out.update(
            serial=info.serial,
            firmware=info.firmware,
            port_count=info.port_count,
            watchdog_ms=info.watchdog_ms,
            emission_delay_ms=info.emission_delay_ms,
            time_scale=self.config.sim_options.time_scale
            if self.config.link == "sim"
            else round(handle.clock.ratio, 3),
            clock_ratio=round(handle.clock.ratio, 3),
            rtt_ms_p99=stats.rtt_ms.p99_ms,
            frames_dropped=stats.dropped_total,
            emission_inhibited=client.emission_inhibited,
        )
        if seen is not None:
            out.update(controller_json(seen))
        return out
