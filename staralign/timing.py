"""How the benchmarks time things and name the machine: shared by ``staralign bench``'s
modules (:mod:`staralign.bench`, :mod:`staralign.bench_weights`) so neither imports the other.

Timing uses CUDA events on GPUs and ``perf_counter`` on CPUs, after warm-up, and
reports the median and spread of repeated runs.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["device_info", "resolve_device", "time_fn"]


def resolve_device(name: str):
    from .devices import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as exc:
        raise SystemExit(f"staralign bench: {exc}") from None


def device_info(device) -> dict[str, Any]:
    """What ran the benchmark: GPU name, or CPU model and thread count."""
    import torch

    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["device_name"] = cpu
        info["threads"] = torch.get_num_threads()
    return info


def time_fn(fn: Callable[[], Any], device, warmup: int = 3, iters: int = 20, repeats: int = 5) -> dict:
    """Milliseconds per call of ``fn``: median, min and max over ``repeats`` runs of ``iters`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1000 / iters)
    return {
        "ms_median": statistics.median(samples),
        "ms_min": min(samples),
        "ms_max": max(samples),
        "iters": iters,
        "repeats": repeats,
    }
