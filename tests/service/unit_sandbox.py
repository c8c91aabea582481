"""Run a command under the sandbox a systemd unit describes, without systemd.

Where PID 1 is not systemd (a container, this CI), `systemd-run` cannot start a
unit. What systemd does at exec for the unit's process can still be done here,
in the same order, and that is what this launcher does before it execs the
command:

- CPUSchedulingPolicy/CPUSchedulingPriority (then, as systemd, Nice= is moot
  under SCHED_FIFO), UMask;
- CapabilityBoundingSet= (every capability dropped from the bounding set, the
  ambient set cleared: even root has none after exec), NoNewPrivileges;
- the seccomp filters: SystemCallFilter (the groups as this machine's
  `systemd-analyze syscall-filter` lists them, @default always allowed, the
  rest refused with SystemCallErrorNumber), SystemCallArchitectures=native,
  RestrictAddressFamilies, RestrictRealtime, RestrictNamespaces,
  MemoryDenyWriteExecute, LockPersonality, RestrictSUIDSGID, and the system
  calls ProtectClock, ProtectHostname, ProtectKernelModules and
  ProtectKernelLogs take away. Each is its own filter, as systemd loads them;
  the kernel applies the most restrictive answer.

Not applied (they need systemd's mount namespace, cgroups or user switch):
ProtectSystem, ProtectHome, PrivateTmp, PrivateMounts, ProtectKernelTunables,
ProtectControlGroups, ProtectProc, ProcSubset, DevicePolicy/DeviceAllow,
RemoveIPC, CPUWeight, User/Group. `NOT_APPLIED` lists them.

Usage: python unit_sandbox.py UNIT_FILE -- COMMAND [ARG...]
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

NOT_APPLIED = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateMounts",
    "ProtectKernelTunables",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "DevicePolicy",
    "DeviceAllow",
    "RemoveIPC",
    "CPUWeight",
    "User",
    "Group",
)

# <seccomp.h>
_ALLOW = 0x7FFF0000
_CMP_NE, _CMP_EQ, _CMP_GE, _CMP_MASKED_EQ = 1, 4, 5, 7
# <linux/prctl.h>, <sys/mman.h>, <linux/sched.h>, <sys/stat.h>
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000
_SCHED_DEADLINE = 6
_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
_AF_MAX = 46
_ADDRESS_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


@cache
def libseccomp() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """The [Service] section's settings, each key's values in file order."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _yes(settings: dict[str, list[str]], key: str) -> bool:
    return settings.get(key, ["no"])[-1].lower() in ("yes", "true", "1", "on", "strict")


@cache
def syscall_groups() -> dict[str, tuple[str, ...]]:
    """Each @group as this machine's systemd lists it (nested groups by name)."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None:
            word = line.strip()
            if word and not word.startswith("#"):
                current.append(word)
        else:
            current = None
    return {name: tuple(members) for name, members in groups.items()}


def expand(names: Iterable[str]) -> set[str]:
    groups = syscall_groups()
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            out |= expand(groups[name])
        else:
            out.add(name.split(":", 1)[0])
    return out


def allowed_syscalls(settings: dict[str, list[str]]) -> set[str]:
    """SystemCallFilter= as systemd reads it: an allow list (with @default) that the
    `~` entries and the Protect* settings take calls out of."""
    allowed: set[str] = set()
    denied: set[str] = set()
    for entry in settings.get("SystemCallFilter", []):
        if entry.startswith("~"):
            denied |= expand(entry[1:].split())
        else:
            allowed |= expand(entry.split())
    if not allowed:
        raise ValueError("the unit has no SystemCallFilter allow list")
    allowed |= expand(["@default"])
    if _yes(settings, "ProtectClock"):
        denied |= expand(["@clock"])
    if _yes(settings, "ProtectKernelModules"):
        denied |= expand(["@module"])
    if _yes(settings, "ProtectKernelLogs"):
        denied.add("syslog")
    if _yes(settings, "ProtectHostname"):
        denied |= {"sethostname", "setdomainname"}
    return allowed - denied


class _Filter:
    """One seccomp filter: a default action and rules, loaded as one program."""

    def __init__(self, default_action: int) -> None:
        lib = libseccomp()
        assert lib is not None
        self.lib = lib
        self.ctx = lib.seccomp_init(default_action)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def rule(self, action: int, syscall: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.lib.seccomp_syscall_resolve_name(syscall.encode())
        if nr == -1:  # __NR_SCMP_ERROR: unknown to this libseccomp
            return
        array = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), array)
        # -EDOM/-EFAULT: a call this architecture does not have (cacheflush on x86).
        if rc < 0 and -rc not in (errno.EDOM, errno.EFAULT, errno.EOPNOTSUPP):
            raise OSError(-rc, f"seccomp rule for {syscall}: {os.strerror(-rc)}")

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        self.lib.seccomp_release(self.ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def _system_call_filter(settings: dict[str, list[str]]) -> None:
    name = settings.get("SystemCallErrorNumber", ["EPERM"])[-1]
    f = _Filter(_errno_action(getattr(errno, name)))
    for syscall in sorted(allowed_syscalls(settings)):
        f.rule(_ALLOW, syscall)
    f.load()


def _address_families(settings: dict[str, list[str]]) -> None:
    names = " ".join(settings["RestrictAddressFamilies"]).split()
    allowed = {_ADDRESS_FAMILIES[n] for n in names}
    f = _Filter(_ALLOW)
    refuse = _errno_action(errno.EAFNOSUPPORT)
    for family in range(_AF_MAX):
        if family not in allowed:
            f.rule(refuse, "socket", (0, _CMP_EQ, family, 0))
    f.rule(refuse, "socket", (0, _CMP_GE, _AF_MAX, 0))
    f.load()


def _restrictions(settings: dict[str, list[str]]) -> None:
    """RestrictRealtime, RestrictNamespaces, MemoryDenyWriteExecute, LockPersonality,
    RestrictSUIDSGID: calls allowed except with the arguments these forbid."""
    eperm = _errno_action(errno.EPERM)
    f = _Filter(_ALLOW)
    if _yes(settings, "RestrictRealtime"):
        for policy in (os.SCHED_FIFO, os.SCHED_RR, _SCHED_DEADLINE):
            f.rule(eperm, "sched_setscheduler", (1, _CMP_EQ, policy, 0))
    if _yes(settings, "RestrictNamespaces"):
        f.rule(eperm, "setns")
        for flag in _NAMESPACE_FLAGS:
            f.rule(eperm, "unshare", (0, _CMP_MASKED_EQ, flag, flag))
            f.rule(eperm, "clone", (0, _CMP_MASKED_EQ, flag, flag))
        f.rule(_errno_action(errno.ENOSYS), "clone3")  # as systemd: glibc falls back to clone
    if _yes(settings, "MemoryDenyWriteExecute"):
        wx = _PROT_WRITE | _PROT_EXEC
        f.rule(eperm, "mmap", (2, _CMP_MASKED_EQ, wx, wx))
        f.rule(eperm, "mprotect", (2, _CMP_MASKED_EQ, _PROT_EXEC, _PROT_EXEC))
        f.rule(eperm, "pkey_mprotect", (2, _CMP_MASKED_EQ, _PROT_EXEC, _PROT_EXEC))
        f.rule(eperm, "shmat", (2, _CMP_MASKED_EQ, _SHM_EXEC, _SHM_EXEC))
    if _yes(settings, "LockPersonality"):
        f.rule(eperm, "personality", (0, _CMP_NE, 0, 0))  # PER_LINUX, as started
    if _yes(settings, "RestrictSUIDSGID"):
        for bit in (0o4000, 0o2000):
            f.rule(eperm, "chmod", (1, _CMP_MASKED_EQ, bit, bit))
            f.rule(eperm, "fchmod", (1, _CMP_MASKED_EQ, bit, bit))
            f.rule(eperm, "fchmodat", (2, _CMP_MASKED_EQ, bit, bit))
    f.load()


def _prctl(*args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl{args}: {os.strerror(code)}")


def apply(settings: dict[str, list[str]]) -> None:
    """Everything this module can apply, in systemd's order (seccomp last)."""
    policy = settings.get("CPUSchedulingPolicy", [""])[-1]
    if policy == "fifo" and os.geteuid() == 0:
        priority = int(settings.get("CPUSchedulingPriority", ["1"])[-1])
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    if "UMask" in settings:
        os.umask(int(settings["UMask"][-1], 8))
    if settings.get("CapabilityBoundingSet", [None])[-1] == "":
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        for cap in range(last + 1):
            _prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if _yes(settings, "NoNewPrivileges"):
        _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _restrictions(settings)
    if "RestrictAddressFamilies" in settings:
        _address_families(settings)
    _system_call_filter(settings)  # last: it refuses the prctl and seccomp calls above


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    apply(unit_settings(Path(argv[0])))
    command = argv[2:]
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"unit_sandbox: cannot run {shlex.join(command)}: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
