"""How many CPU threads inference may use: the cores this process can actually run on.

Why: PyTorch and onnxruntime size their intra-op thread pools from the machine's
core count, not from what the process is allowed.  In a container limited by a
cgroup CPU quota, or a process pinned to a few cores (``taskset``), that
oversubscribes the allowed cores: the spinning worker threads wait on each
other and a forward pass can take many times longer than on one thread.  The
count here is the smaller of the CPU affinity mask and the cgroup quota
(rounded up, at least 1), and ``--threads N`` overrides it.

No torch or onnxruntime import here: :func:`apply_torch_threads` imports torch
only when called, and onnxruntime takes the count as a session option.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["ThreadChoice", "affinity_cpus", "apply_torch_threads", "cgroup_cpu_limit", "resolve_threads"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> int:
    """CPUs in this process' affinity mask (``os.cpu_count()`` where the OS has no masks)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _quota_v2(text: str) -> float | None:
    """``cpu.max`` ("max 100000" or "150000 100000") -> CPUs, None when unlimited."""
    parts = text.split()
    if len(parts) < 1 or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100000.0
    quota = float(parts[0])
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(quota_file: Path, period_file: Path) -> float | None:
    quota = float(quota_file.read_text().strip())
    period = float(period_file.read_text().strip())
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """This process' cgroup directory and its ancestors up to ``root`` (the limit may sit on any)."""
    rel = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            fields = line.split(":", 2)
            # v2: "0::/path"; v1: "N:cpu,cpuacct:/path"
            if len(fields) == 3 and (fields[0] == "0" or "cpu" in fields[1].split(",")):
                rel = fields[2].strip().lstrip("/")
                break
    except OSError:
        pass
    dirs, here = [], Path(rel) if rel else None
    while here is not None and str(here) not in ("", "."):
        dirs.append(root / here)
        here = here.parent if here.parent != here else None
    dirs.append(root)
    return dirs


def cgroup_cpu_limit(root: str | os.PathLike = CGROUP_ROOT,
                     proc_cgroup: str | os.PathLike = PROC_CGROUP) -> float | None:
    """The tightest cgroup CPU quota on this process, in CPUs (1.5 = 150 ms per 100 ms), or None.

    Reads cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``
    (also under a ``cpu`` or ``cpu,cpuacct`` sub-folder), in the process' own
    cgroup and every ancestor; unreadable files count as no limit.
    """
    root = Path(root)
    limits: list[float] = []
    for d in _cgroup_dirs(root, Path(proc_cgroup)):
        try:
            q = _quota_v2((d / "cpu.max").read_text())
        except (OSError, ValueError, IndexError):
            continue
        if q is not None:
            limits.append(q)
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for d in _cgroup_dirs(root / sub, Path(proc_cgroup)):
            try:
                q = _quota_v1(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
            except (OSError, ValueError):
                continue
            if q is not None:
                limits.append(q)
    return min(limits) if limits else None


class ThreadChoice(dict):
    """The resolved count and where it came from, as the JSON the benchmarks record."""

    @property
    def threads(self) -> int:
        return int(self["threads"])


def resolve_threads(requested: int | None = None, *, cgroup_root: str | os.PathLike = CGROUP_ROOT,
                    proc_cgroup: str | os.PathLike = PROC_CGROUP) -> ThreadChoice:
    """Intra-op threads to use: ``requested`` if given (>= 1), else the CPUs this process may use.

    Returns a :class:`ThreadChoice` (a dict): ``threads``, ``source`` ("requested",
    "affinity" or "cgroup"), ``affinity_cpus``, ``cgroup_cpus`` (None: no quota),
    ``machine_cpus``.
    """
    affinity = affinity_cpus()
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    allowed, source = affinity, "affinity"
    if quota is not None and math.ceil(quota) < affinity:
        allowed, source = max(1, math.ceil(quota)), "cgroup"
    if requested is not None:
        if isinstance(requested, bool) or int(requested) < 1:
            raise ValueError(f"threads must be at least 1, got {requested!r}")
        allowed, source = int(requested), "requested"
    return ThreadChoice(threads=allowed, source=source, affinity_cpus=affinity,
                        cgroup_cpus=None if quota is None else round(quota, 3),
                        machine_cpus=os.cpu_count())


def apply_torch_threads(requested: int | None = None) -> ThreadChoice:
    """Set torch's intra-op pool: to ``requested``, else capped at the CPUs this process may use
    (a lower count set earlier, by the user or a test, stays); returns the resolved choice."""
    import torch

    choice = resolve_threads(requested)
    current = torch.get_num_threads()
    if requested is not None and current != choice.threads or requested is None and current > choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
