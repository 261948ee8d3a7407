"""How many CPU threads this process may really use, and setting torch to it.

In a container `os.cpu_count()` reports the host's cores, not the pod's CPU limit; torch
then starts one OpenMP thread per host core, and with a limit of 2 CPUs the kernel
throttles the process (CFS quota) so that decode speed collapses. The limit lives in the
cgroup: v2 `cpu.max` ("200000 100000" = 2 CPUs, "max 100000" = none), v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`. The affinity mask (taskset, cpuset) bounds it too.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("modeldeploy.engine")

#: Environment override, for a user who knows better (e.g. leaving cores to a sidecar).
THREADS_ENV = "MODELDEPLOY_THREADS"

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (may be fractional), or None when unlimited/unknown."""
    v2 = _read(root / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max":
            try:
                return int(quota) / int(period or "100000")
            except ValueError:
                return None
        return None
    for base in (root / "cpu", root / "cpu,cpuacct", root):
        quota, period = _read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            try:
                q, p = int(quota), int(period)
            except ValueError:
                return None
            return q / p if q > 0 and p > 0 else None
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs this process can use: min(affinity mask, cgroup quota rounded up), >= 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads from `requested`, $MODELDEPLOY_THREADS or the CPU limit.

    Inter-op threads go to 1: the engine runs one forward at a time, and a second pool
    would only compete for the same cores. Returns the number set.
    """
    import torch

    env = os.environ.get(THREADS_ENV, "").strip()
    if requested is None and env:
        try:
            requested = int(env)
        except ValueError:
            log.warning("ignoring %s=%r: not an integer", THREADS_ENV, env)
    n = requested if requested and requested > 0 else available_cpus()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; harmless then
        pass
    log.info("torch threads: %d (cpu limit %s)", n, cgroup_cpu_limit())
    return n
