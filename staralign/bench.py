"""Benchmarks: ``staralign bench {loss,infer,data,train} ... --json``.

Each benchmark prints one JSON object (one line with ``--json``) naming the
device, so figures can be compared only where the machine is the same.  Timing
uses CUDA events on GPUs and ``perf_counter`` on CPUs, after warm-up, and
reports the median and spread of repeated runs.

Benchmarks register in ``BENCHES``: name -> (add_arguments, run), where ``run``
takes the parsed arguments and returns the result dict.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

BENCHES: dict[str, tuple[Callable, Callable]] = {}


def bench(name: str, add_arguments: Callable):
    """Decorator registering ``run(args) -> dict`` as ``staralign bench NAME``."""

    def deco(run: Callable) -> Callable:
        BENCHES[name] = (add_arguments, run)
        return run

    return deco


# --------------------------------------------------------------------------- helpers


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("staralign bench: --device cuda asked for, but no CUDA device is available")
    return torch.device(name)


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


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=False))
    else:
        print(json.dumps(result, indent=2))


# --------------------------------------------------------------------------- loss


def _loss_args(p) -> None:
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--points", type=int, default=98)
    p.add_argument("--size", type=int, default=64, help="heatmap side")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the reference-style implementation (CPU eigh round trip)")


def _reference_style_star(heatmap, gt, w: float = 1.0, eps: float = 1e-5):
    """The original's *approach*, re-expressed here as a timing baseline only.

    It materialises (v - m) for every pixel, forms covariances with a batched
    matrix product, and copies them to the CPU for ``torch.linalg.eigh``, as the
    authors' code does.  Numerically equivalent to ``STARLoss`` (v2, smoothl1).
    """
    import torch

    from .losses.distances import elementwise

    b, n, h, wd = heatmap.shape
    p = heatmap / heatmap.sum((2, 3)).clamp(min=1e-6).view(b, n, 1, 1)
    ys = torch.linspace(-1, 1, h, device=heatmap.device)
    xs = torch.linspace(-1, 1, wd, device=heatmap.device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    mean = torch.stack([(p * xx).sum((2, 3)), (p * yy).sum((2, 3))], -1)
    dx = (xx - mean[..., 0, None, None]).reshape(b * n, 1, h * wd)
    dy = (yy - mean[..., 1, None, None]).reshape(b * n, 1, h * wd)
    vec = torch.cat([dx, dy], 1)
    pv = p.reshape(b * n, 1, h * wd).expand(-1, 2, -1)
    cov = torch.bmm(pv * vec, vec.transpose(1, 2)).view(b, n, 2, 2)
    v1 = p.sum((2, 3)) + eps
    v2 = p.pow(2).sum((2, 3)) + eps
    cov = cov / (v1 - v2 / v1)[..., None, None]
    evals, evecs = torch.linalg.eigh(cov.view(-1, 2, 2).cpu())
    evals = evals.view(b, n, 2).to(heatmap)
    evecs = evecs.view(b, n, 2, 2).to(heatmap)
    err = gt - mean
    proj = torch.einsum("bnki,bni->bnk", evecs, err)
    trans = (elementwise("smoothl1", proj) / torch.sqrt(evals + eps)).sum(-1)
    return (trans + w * evals.abs().sum(-1)).mean()


@bench("loss", _loss_args)
def bench_loss(args) -> dict:
    """Forward + backward of STAR (v2, smoothl1) on (B, N, S, S) heatmaps."""
    import torch

    from .losses import STARLoss

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.points, args.size, args.size)
    heat = torch.rand(shape, generator=gen).pow(8).to(device=device, dtype=dtype).requires_grad_(True)
    gt = (torch.rand(shape[:2] + (2,), generator=gen) * 1.6 - 0.8).to(device)
    loss_fn = STARLoss()

    def step(fn):
        def run():
            heat.grad = None
            fn(heat, gt).backward()

        return run

    result: dict[str, Any] = {"bench": "loss", "shape": list(shape), "dtype": args.dtype}
    result.update(device_info(device))
    result["staralign"] = time_fn(step(loss_fn), device, iters=args.iters)
    if not args.no_baseline and args.dtype == "float32":
        result["reference_style"] = time_fn(step(_reference_style_star), device, iters=args.iters)
        result["speedup_vs_reference_style"] = (
            result["reference_style"]["ms_median"] / result["staralign"]["ms_median"]
        )
    return result


# --------------------------------------------------------------------------- CLI


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed benchmarks (JSON output)")
    bsub = p.add_subparsers(dest="bench_name", metavar="BENCH", required=True)
    for name, (add_arguments, run) in BENCHES.items():
        bp = bsub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0])
        bp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
        bp.add_argument("--json", action="store_true", help="one JSON line on stdout")
        add_arguments(bp)
        bp.set_defaults(func=lambda a, _run=run: emit(_run(a), a.json) or 0)
