"""Simulated PBM-Link controller: the MultiPort's firmware, applicator physics, fault injection.

>>> from pbmd.hw_sim import Simulator, SimConfig
>>> async with Simulator(SimConfig(time_scale=60.0)) as sim:
...     url = await sim.listen_tcp("127.0.0.1", 0)   # "socket://127.0.0.1:NNNNN"
...     path = await sim.listen_pty()                # "/dev/pts/N"
...     sim.faults.key(False)                        # open the key switch
...     sim.snapshot()["state"]

See docs/simulator.md for the control channel, the physics and its constants.
"""

from .applicators import APPLICATORS, ApplicatorModel, ChannelSpec, default_ports
from .config import SimConfig
from .faults import FaultInjector, LinkFaults
from .server import Simulator

__all__ = [
    "APPLICATORS",
    "ApplicatorModel",
    "ChannelSpec",
    "FaultInjector",
    "LinkFaults",
    "SimConfig",
    "Simulator",
    "default_ports",
]
