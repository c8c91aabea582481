"""Who may call what: the three roles and the kernel's word on who is calling (SO_PEERCRED)."""

from __future__ import annotations

import contextlib
import enum
import grp
import math
import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pbmd.daemon.services.api.registry import Caller
    from pbmd.daemon.services.service import Service

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux ≥ 4.13

# --------------------------------------------------------------------------- roles


class Role(enum.StrEnum):
    READER = "reader"
    CLINICIAN = "clinician"
    TECHNICIAN = "technician"


ANYONE = frozenset({Role.READER})
CLINICIAN = frozenset({Role.CLINICIAN})
TECHNICIAN = frozenset({Role.TECHNICIAN})
STAFF = frozenset({Role.CLINICIAN, Role.TECHNICIAN})


@dataclass(frozen=True)
class Peer:
    """Who is calling, as the kernel says."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    user: str
    roles: frozenset[Role]

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "user": self.user,
            "roles": sorted(r.value for r in self.roles),
        }

    @property
    def sees_patients(self) -> bool:
        return bool(self.roles & STAFF)


class RoleResolver:
    """Roles from uid and groups; group names are looked up again every `ttl_s`."""

    def __init__(self, clinician_group: str, technician_group: str, ttl_s: float = 10.0) -> None:
        self.clinician_group = clinician_group
        self.technician_group = technician_group
        self.ttl_s = ttl_s
        self.daemon_uid = os.getuid()
        self._gids: tuple[int | None, int | None] = (None, None)
        self._gids_at = -math.inf
        self._users: dict[int, tuple[str, float]] = {}

    @staticmethod
    def _gid(name: str) -> int | None:
        if name.isdigit():
            return int(name)
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None

    def gids(self) -> tuple[int | None, int | None]:
        now = time.monotonic()
        if now - self._gids_at > self.ttl_s:
            self._gids = (self._gid(self.clinician_group), self._gid(self.technician_group))
            self._gids_at = now
        return self._gids

    def missing_groups(self) -> list[str]:
        clin, tech = self.gids()
        out = []
        if clin is None:
            out.append(self.clinician_group)
        if tech is None:
            out.append(self.technician_group)
        return out

    def user(self, uid: int) -> str:
        now = time.monotonic()
        cached = self._users.get(uid)
        if cached is not None and now - cached[1] < self.ttl_s:
            return cached[0]
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid {uid}"
        self._users[uid] = (name, now)
        return name

    def peer(self, pid: int, uid: int, gid: int, groups: frozenset[int]) -> Peer:
        roles = {Role.READER}
        if uid == 0 or uid == self.daemon_uid:
            roles |= STAFF
        clin, tech = self.gids()
        all_groups = groups | {gid}
        if clin is not None and clin in all_groups:
            roles.add(Role.CLINICIAN)
        if tech is not None and tech in all_groups:
            roles.add(Role.TECHNICIAN)
        return Peer(pid, uid, gid, frozenset(all_groups), self.user(uid), frozenset(roles))

    def role_help(self, roles: frozenset[Role]) -> str:
        names = []
        if Role.CLINICIAN in roles:
            names.append(f"the clinician group ({self.clinician_group})")
        if Role.TECHNICIAN in roles:
            names.append(f"the technician group ({self.technician_group})")
        return " or ".join(names) or "no group"


def peer_credentials(sock: Any) -> tuple[int, int, int, frozenset[int]]:
    """pid, uid, gid and supplementary groups of the process at the other end."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: frozenset[int] = frozenset()
    try:
        # 1024 bytes (256 groups) is the most Python's getsockopt() will ask for; a
        # caller in more groups gets ERANGE and the user database below.
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4]))
    except OSError:
        # Older kernels: the user database's view of the user's groups.
        with contextlib.suppress(KeyError):
            name = pwd.getpwuid(uid).pw_name
            groups = frozenset(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
    return pid, uid, gid, groups


def sees_outcomes(service: Service, caller: Caller) -> bool:
    """Outcome measures are clinical: clinicians see them, technicians only where the
    clinic allows it (``[courses] technicians_see_outcomes``)."""
    roles = caller.peer.roles
    if Role.CLINICIAN in roles:
        return True
    return Role.TECHNICIAN in roles and service.config.courses.technicians_see_outcomes
