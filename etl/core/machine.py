"""What this machine gives the run: usable CPUs and memory, container limits included.

Usable CPUs are the affinity mask capped by the cgroup CPU quota (half a CPU still runs
one worker); usable memory is the lower of the cgroup memory limit and what psutil says
is available (inside a container psutil alone reports the host). cgroup v1 and v2 are
both read (hybrid hosts have both), up the cgroup's ancestors: a parent's limit binds
its children. Used by the planner (``etl.run.resources``) and by the stats that quote
CPU use as a share of the cores (``etl.core.stats``, ``run.py bench``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_UNLIMITED = 1 << 60  # v1 writes "no limit" as ~2**63 rounded to a page; no real limit is this big


def usable_cpus(root: Path = Path("/")) -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup CPU quota."""
    return _capped(_affinity(), cgroup_limits(root)[0])


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _capped(affinity: int, quota: float | None) -> int:
    return max(1, min(affinity, math.ceil(quota))) if quota else affinity


@dataclass(frozen=True)
class Machine:
    cpus: int
    """Usable CPUs: affinity mask, capped by the cgroup quota."""
    memory: int
    """Usable bytes: the lower of the cgroup limit and available memory."""
    affinity_cpus: int
    cgroup_cpus: float | None
    cgroup_memory: int | None
    available: int


def machine(root: Path = Path("/")) -> Machine:
    quota, limit = cgroup_limits(root)
    affinity = _affinity()
    cpus = _capped(affinity, quota)
    available = psutil.virtual_memory().available
    memory = min(available, limit) if limit else available
    return Machine(cpus, memory, affinity, quota, limit, available)


def cgroup_limits(root: Path = Path("/")) -> tuple[float | None, int | None]:
    """(CPU quota in CPUs, memory limit in bytes) of this process's cgroup; None = no limit.

    ``root`` is ``/`` or a fixture folder holding ``proc/self/cgroup`` and ``sys/fs/cgroup``.
    Both v1 and v2 hierarchies are read (hybrid hosts have both). The cgroup's folder is
    looked up from ``/proc/self/cgroup`` and every ancestor up to the mount point is read
    too, because a parent's limit binds its children; inside a container the folder is
    often the mount point itself, while ``/proc/self/cgroup`` still names the host path.
    """
    quotas: list[float] = []
    limits: list[int] = []
    for base, rel in _cgroup_dirs(root):
        for folder in _up_to(base, rel):
            if (q := _cpu_quota(folder)) is not None:
                quotas.append(q)
            if (m := _memory_limit(folder)) is not None:
                limits.append(m)
    return (min(quotas) if quotas else None), (min(limits) if limits else None)


def _cgroup_dirs(root: Path) -> list[tuple[Path, str]]:
    """(mount point, path inside it) for the v2 hierarchy and the v1 cpu and memory ones."""
    fs = root / "sys/fs/cgroup"
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" and not controllers:
            found.append((fs if (fs / "cgroup.controllers").exists() else fs / "unified", rel))
        elif {"cpu", "memory"} & set(controllers.split(",")):
            found.append((fs / controllers, rel))
    return found


def _up_to(base: Path, rel: str) -> list[Path]:
    parts = [p for p in rel.split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_quota(folder: Path) -> float | None:
    if (text := _read(folder / "cpu.max")) is not None:  # v2: "max 100000" or "150000 100000"
        quota, _, period = text.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    quota_us, period_us = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota_us is None or period_us is None or int(quota_us) <= 0:  # v1: -1 means no quota
        return None
    return int(quota_us) / int(period_us)


def _memory_limit(folder: Path) -> int | None:
    text = _read(folder / "memory.max")  # v2: "max" or bytes
    if text is None:
        text = _read(folder / "memory.limit_in_bytes")  # v1
    if text is None or text == "max":
        return None
    value = int(text)
    return None if value >= CGROUP_UNLIMITED else value
