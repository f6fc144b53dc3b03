"""Where an eager training step spends its time: wall clock per step against the GPU's
busy time (the sum of its kernels' durations), and the kernels that take the most.

A step whose wall time is well above its kernel time is launch-bound: the GPU waits for
the CPU to issue the next kernel.  One JSON line on stdout (docs/benchmarks.md).

    python benchmarks/profile_train_step.py --device cuda --batch-size 32 [--amp bf16] [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from staralign.config import LossConfig, ModelConfig, OptimConfig
from staralign.data.targets import batch_targets
from staralign.data.transforms import normalize_points
from staralign.definitions import get_definition
from staralign.engine.ema import ModelEMA, default_decay
from staralign.engine.trainer import build_optimizer, network_input, train_step
from staralign.losses.recipe import RecipeLoss
from staralign.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--amp", default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--small", action="store_true", help="a tiny model (dry runs)")
    a = p.parse_args()
    device = torch.device(a.device)
    definition = get_definition("WFLW")
    cfg = (ModelConfig(definition="WFLW", nstack=1, nlevels=2, channels=32, input_size=64) if a.small
           else ModelConfig(definition="WFLW"))
    size, hsize = cfg.input_size, cfg.input_size // 4
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = build_model(cfg, definition).to(device).train()
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion, optimizer = RecipeLoss(LossConfig()), build_optimizer(model, OptimConfig())
    ema = ModelEMA(model, default_decay(a.batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (a.batch_size, 3, size, size), generator=gen, dtype=torch.uint8).to(device)
    points = (torch.rand(a.batch_size, definition.num_points, 2, generator=gen) * 0.5 + 0.25) * size
    pm, em = batch_targets({"points": points}, definition, size, hsize, device)
    landmarks = normalize_points(points, size).to(device)

    def step() -> None:
        train_step(model, model, criterion, optimizer, scaler, ema, network_input(images, a.channels_last),
                   landmarks, pm, em, amp=a.amp, grad_clip=0.0)

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) * 1000 / a.steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(a.steps):
            step()
        sync()
    # Device-side events only, less the ranges that annotate a span of kernels (the optimiser's
    # "Optimizer.step#Adam.step"), which would count those kernels twice.
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)
               and "#" not in e.name]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, [0.0, 0])
        by_name[e.name][0] += e.device_time / 1000 / a.steps
        by_name[e.name][1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    print(json.dumps({
        "bench": "profile_train_step", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": a.batch_size, "amp": a.amp, "channels_last": a.channels_last,
        "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": sum(v[0] for v in by_name.values()),
        "kernels_per_step": len(kernels) / a.steps,
        "top_kernels": [{"name": k[:90], "ms_per_step": round(v[0], 3), "calls_per_step": v[1] / a.steps}
                        for k, v in top],
    }))


if __name__ == "__main__":
    main()
